//! Search queries: the words a user typed, as rows the model reads.
//!
//! A query becomes up to [`QUERY_TERMS_MAX`] terms: the text is lowercased, runs of Han
//! characters are segmented into words by jieba (a dictionary segmenter; Unicode's word
//! rules alone would cut Chinese into single characters), everything else by Unicode
//! word boundaries (UAX #29: letters, digits, apostrophes inside words; punctuation and
//! spaces dropped). Repeated terms count once, in the order first typed; terms after the
//! sixteenth are ignored (documented on the proto field).
//!
//! The model reads a query three ways:
//! - **query rows** (feature table): one per term and one per pair of consecutive terms
//!   ("red dress"), averaged and added to the user side of the tower input, so the query
//!   moves u and with it every candidate's score u · v;
//! - **crosses** (the `query_cross` table, width 1): one row per (term, item feature) and
//!   per (term, item id) pair, averaged over the terms and added to the candidate's
//!   logit. They are what lets "red" prefer items with `color=red` directly, and one
//!   query term prefer the items its users bought, whatever the embeddings have learned.
//!
//! - **lexical match** (the `lexical_match` table, width 1): how many of the query's terms
//!   a candidate's title holds and how many it lacks, as one of [`LEXICAL_LEVELS`] levels
//!   ([`lexical_level`]), each level's weight (one learned row plus the fixed
//!   [`lexical_prior`]) added to the logit. The crosses
//!   learn a term's items one pair at a time; a level's weight learns from every search's
//!   clicks at once, so "the title holds what was typed" ranks a new item (or a rare
//!   word's) before any of its crosses has seen a click. The gateway computes the levels
//!   from the titles of the version it serves and logs them in the impression, so
//!   training sees the levels the ranking used.
//!
//! Ids are fixed forever (they name rows on the cluster): a term is
//! `fnv1a64("q:<term>")`; a pair of terms and a cross mix two ids with FNV-1a over a tag
//! byte and both ids' little-endian bytes.

use std::sync::LazyLock;

use freshet_proto::{fnv1a64, FieldError};
use unicode_segmentation::UnicodeSegmentation;

/// Longest query accepted, in bytes of UTF-8.
pub const QUERY_BYTES_MAX: usize = 1024;
/// Terms of a query the model reads (the rest are ignored).
pub const QUERY_TERMS_MAX: usize = 16;

/// Words of a title that are read (indexed for search, matched against a query); the rest
/// are ignored.
pub const TITLE_TERMS_MAX: usize = 64;
/// Levels of [`lexical_level`] (1..=LEXICAL_LEVELS; 0 means no level).
pub const LEXICAL_LEVELS: u8 = 16;

/// jieba's dictionary is built on first use (once per process, about 0.3 s and tens of
/// MiB): only a process that sees Chinese text pays for it.
static JIEBA: LazyLock<jieba_rs::Jieba> = LazyLock::new(jieba_rs::Jieba::new);

fn is_han(c: char) -> bool {
    matches!(c,
        '\u{3400}'..='\u{4DBF}'
        | '\u{4E00}'..='\u{9FFF}'
        | '\u{F900}'..='\u{FAFF}'
        | '\u{20000}'..='\u{2FA1F}')
}

/// The words of a query, lowercased, in order, each once, at most [`QUERY_TERMS_MAX`].
pub fn query_terms(text: &str) -> Vec<String> {
    text_terms(text, QUERY_TERMS_MAX)
}

/// The words of `text` (a query or an item's title), lowercased, in order, each once, at
/// most `max`: one tokenizer for both sides, so a title's words match a query's.
pub fn text_terms(text: &str, max: usize) -> Vec<String> {
    let lower = text.to_lowercase();
    let mut out: Vec<String> = Vec::new();
    let mut push = |w: &str| {
        if out.len() < max && w.chars().any(char::is_alphanumeric) && !out.iter().any(|t| t == w) {
            out.push(w.to_string());
        }
    };
    // Alternate runs of Han and other characters, each to its segmenter.
    let mut rest = lower.as_str();
    while !rest.is_empty() {
        let han = rest.starts_with(is_han);
        let end = rest
            .char_indices()
            .find(|&(_, c)| is_han(c) != han)
            .map_or(rest.len(), |(i, _)| i);
        let (run, tail) = rest.split_at(end);
        if han {
            for w in JIEBA.cut(run, false) {
                push(w);
            }
        } else {
            for w in run.unicode_words() {
                push(w);
            }
        }
        rest = tail;
    }
    out
}

/// A term's id (its row in the feature table).
pub fn query_term_id(term: &str) -> u64 {
    fnv1a64(&format!("q:{term}"))
}

fn mix(tag: u8, a: u64, b: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in std::iter::once(tag)
        .chain(a.to_le_bytes())
        .chain(b.to_le_bytes())
    {
        h ^= u64::from(byte);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The term ids of an item's title (its first [`TITLE_TERMS_MAX`] words), sorted: what
/// [`lexical_level`] matches a query against.
pub fn title_term_ids(title: &str) -> Vec<u64> {
    let mut ids: Vec<u64> = text_terms(title, TITLE_TERMS_MAX)
        .iter()
        .map(|t| query_term_id(t))
        .collect();
    ids.sort_unstable();
    ids
}

/// How a candidate's title matches a query: 1 + 4 · min(matched, 3) + min(missing, 3),
/// where `matched` counts the query's terms the title holds and `missing` the rest
/// (1..=[`LEXICAL_LEVELS`]); 0 (no level, no weight) without a query or without a title.
/// `title` is sorted ([`title_term_ids`]).
pub fn lexical_level(query: &[u64], title: &[u64]) -> u8 {
    if query.is_empty() || title.is_empty() {
        return 0;
    }
    let matched = query
        .iter()
        .filter(|t| title.binary_search(t).is_ok())
        .count();
    let missing = query.len() - matched;
    // At most 1 + 12 + 3 = 16: fits.
    (1 + 4 * matched.min(3) + missing.min(3)) as u8
}

/// The scale of [`lexical_prior`]: a title that holds every typed word starts at e²
/// (about 7.4) times the odds of one that holds none.
pub const LEXICAL_PRIOR: f32 = 2.0;

/// A level's cold-start weight, added to what its row has learned: [`LEXICAL_PRIOR`]
/// times the share of the query's terms the title holds (as the level counts them, each
/// count capped at 3); 0 for level 0. With every row at 0, a new cluster ranks a
/// search's candidates by how much of the query their titles hold, as a lexical engine
/// would, instead of at random until the levels have learned (in the search simulator
/// BM25 order was ahead for the first 200 searches); the rows then learn what the prior
/// gets wrong, from the same clicks as before.
pub fn lexical_prior(level: u8) -> f32 {
    let Some(l) = level.checked_sub(1) else {
        return 0.0;
    };
    let (matched, missing) = (l / 4, l % 4);
    if matched + missing == 0 {
        return 0.0;
    }
    LEXICAL_PRIOR * f32::from(matched) / f32::from(matched + missing)
}

/// The `lexical_match` row of a level (`None` for level 0).
pub fn lexical_row(level: u8) -> Option<u64> {
    (level != 0).then(|| mix(b'l', u64::from(level), 0))
}

/// The terms' ids of a request's `query` (empty for no query).
///
/// # Errors
/// A query over [`QUERY_BYTES_MAX`] bytes, or one with no word in it, names `field`.
pub fn parse_query(text: &str, field: &str) -> Result<Vec<u64>, FieldError> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    if text.len() > QUERY_BYTES_MAX {
        return Err(FieldError::new(
            field,
            format!("at most {QUERY_BYTES_MAX} bytes"),
        ));
    }
    let terms = query_terms(text);
    if terms.is_empty() {
        return Err(FieldError::new(
            field,
            "has no words (letters or digits); leave it empty for no query",
        ));
    }
    Ok(terms.iter().map(|t| query_term_id(t)).collect())
}

/// The feature-table rows of a query: its terms, then each pair of consecutive terms.
pub fn query_rows(terms: &[u64]) -> Vec<u64> {
    let mut rows = terms.to_vec();
    rows.extend(terms.windows(2).map(|w| mix(b'b', w[0], w[1])));
    rows
}

/// The cross row of query term `term` with item `item` (one of [`cross_rows`]).
pub fn item_cross_row(term: u64, item: u64) -> u64 {
    mix(b'i', term, item)
}

/// The cross row of query term `term` with item feature `feature` (one of
/// [`cross_rows`]).
pub fn feature_cross_row(term: u64, feature: u64) -> u64 {
    mix(b'x', term, feature)
}

/// The cross rows of one candidate under a query: (term, item id) then (term, feature)
/// for every term, in that order.
pub fn cross_rows<'a>(
    terms: &'a [u64],
    item: u64,
    feature_ids: &'a [u64],
) -> impl Iterator<Item = u64> + 'a {
    terms.iter().flat_map(move |&t| {
        std::iter::once(item_cross_row(t, item))
            .chain(feature_ids.iter().map(move |&f| feature_cross_row(t, f)))
    })
}
