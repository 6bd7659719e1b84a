//! Lexical candidates for search: BM25 over catalog item titles, one tantivy index per
//! shard view, kept at the view's epoch.
//!
//! The replica owns each shard's index writer (one writer, one thread applying change
//! sets in order) and re-indexes every item an epoch's change set upserts: its title's
//! words while it is active, nothing once it is inactive or has no title. After the
//! change set (or a snapshot) the writer commits and the view keeps a searcher of that
//! commit, so a Recommend at epoch E searches exactly the titles of E, like the model's
//! retrieval; older versions keep their own searchers. Titles are cut into words by the
//! model's own tokenizer ([`freshet_model::query::text_terms`]: Unicode words, jieba for
//! Chinese) and indexed pre-tokenized (tantivy's whitespace tokenizer), so a query's
//! words and a title's match the same way. A catalog with no titles never creates an
//! index. BM25 is per shard (each shard's own document frequencies); Recommend merges the
//! shards' best by score.

use std::sync::Arc;

use freshet_model::query::TITLE_TERMS_MAX;
use freshet_proto::ps::v1::Item;
use parking_lot::Mutex;
use tantivy::collector::TopDocs;
use tantivy::columnar::Column;
use tantivy::query::BooleanQuery;
use tantivy::schema::{
    Field, IndexRecordOption, NumericOptions, Schema, TextFieldIndexing, TextOptions,
};
use tantivy::{Index, IndexReader, IndexWriter, ReloadPolicy, Searcher, TantivyDocument, Term};

/// The writer's buffer (tantivy's minimum): titles are small, commits frequent.
const WRITER_BYTES: usize = 15_000_000;

struct Writer {
    writer: Mutex<IndexWriter>,
    reader: IndexReader,
    id: Field,
    words: Field,
}

/// One shard view's title index (cheap to clone: the writer is shared, the searcher is
/// this view's own snapshot).
#[derive(Clone, Default)]
pub struct Lexical {
    writer: Option<Arc<Writer>>,
    searcher: Option<Searcher>,
    /// The searcher's item-id columns, by segment ordinal: opened once per commit (opening
    /// one per hit parsed its header each time, three quarters of a Search call's lexical
    /// cost).
    ids: Arc<Vec<Column<u64>>>,
    dirty: bool,
}

impl Writer {
    fn new() -> tantivy::Result<Self> {
        let mut schema = Schema::builder();
        let id = schema.add_u64_field("id", NumericOptions::default().set_indexed().set_fast());
        let words = schema.add_text_field(
            "words",
            TextOptions::default().set_indexing_options(
                TextFieldIndexing::default()
                    .set_tokenizer("whitespace")
                    .set_index_option(IndexRecordOption::WithFreqs),
            ),
        );
        let index = Index::create_in_ram(schema.build());
        let options = tantivy::indexer::IndexWriterOptions::builder()
            .memory_budget_per_thread(WRITER_BYTES)
            .num_worker_threads(1)
            .num_merge_threads(1)
            .build();
        let writer = index.writer_with_options(options)?;
        let reader = index
            .reader_builder()
            .reload_policy(ReloadPolicy::Manual)
            .try_into()?;
        Ok(Writer {
            writer: Mutex::new(writer),
            reader,
            id,
            words,
        })
    }
}

impl Lexical {
    /// Re-indexes `items` (staged until [`Lexical::commit`]).
    ///
    /// # Errors
    /// The index could not be created or written (in memory: a broken invariant).
    pub fn upsert(&mut self, items: &[Item]) -> tantivy::Result<()> {
        if self.writer.is_none() {
            if items.iter().all(|i| i.title.is_empty()) {
                return Ok(());
            }
            self.writer = Some(Arc::new(Writer::new()?));
        }
        let w = self.writer.as_ref().expect("created above");
        let writer = w.writer.lock();
        for item in items {
            writer.delete_term(Term::from_field_u64(w.id, item.id));
            if item.active && !item.title.is_empty() {
                let words = freshet_model::query::text_terms(&item.title, TITLE_TERMS_MAX);
                let mut doc = TantivyDocument::default();
                doc.add_u64(w.id, item.id);
                doc.add_text(w.words, words.join(" "));
                writer.add_document(doc)?;
            }
        }
        self.dirty = true;
        Ok(())
    }

    /// Makes what [`Lexical::upsert`] staged searchable from this view.
    ///
    /// # Errors
    /// The commit or the reload failed.
    pub fn commit(&mut self) -> tantivy::Result<()> {
        let Some(w) = &self.writer else {
            return Ok(());
        };
        if !self.dirty {
            return Ok(());
        }
        w.writer.lock().commit()?;
        w.reader.reload()?;
        let searcher = w.reader.searcher();
        self.ids = Arc::new(
            searcher
                .segment_readers()
                .iter()
                .map(|r| r.fast_fields().u64("id"))
                .collect::<tantivy::Result<_>>()?,
        );
        self.searcher = Some(searcher);
        self.dirty = false;
        Ok(())
    }

    /// The best `n` items of this view by BM25 of `terms` against their titles: (score,
    /// item id), best first.
    ///
    /// # Errors
    /// A search or a fast-field read failed.
    pub fn search(&self, terms: &[String], n: usize) -> tantivy::Result<Vec<(f32, u64)>> {
        let (Some(w), Some(searcher)) = (&self.writer, &self.searcher) else {
            return Ok(Vec::new());
        };
        if terms.is_empty() || n == 0 {
            return Ok(Vec::new());
        }
        let query = BooleanQuery::new_multiterms_query(
            terms
                .iter()
                .map(|t| Term::from_field_text(w.words, t))
                .collect(),
        );
        let top = searcher.search(&query, &TopDocs::with_limit(n).order_by_score())?;
        let mut out = Vec::with_capacity(top.len());
        for (score, addr) in top {
            let id = self
                .ids
                .get(addr.segment_ord as usize)
                .and_then(|ids| ids.first(addr.doc_id));
            if let Some(id) = id {
                out.push((score, id));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: u64, title: &str, active: bool) -> Item {
        Item {
            id,
            features: vec![],
            active,
            title: title.into(),
        }
    }

    #[test]
    fn titles_are_searchable_at_the_epoch_that_wrote_them() {
        let mut l = Lexical::default();
        // No titles: no index at all.
        l.upsert(&[item(1, "", true)]).unwrap();
        l.commit().unwrap();
        assert!(l.writer.is_none());
        l.upsert(&[
            item(2, "Crimson evening gown", true),
            item(3, "Blue running shoe", true),
            item(4, "Crimson red sneaker, crimson laces", true),
            item(5, "红色连衣裙", true),
        ])
        .unwrap();
        // Staged, not yet visible.
        assert!(l.search(&["crimson".into()], 10).unwrap().is_empty());
        l.commit().unwrap();
        let old = l.clone();
        let ids = |r: Vec<(f32, u64)>| r.into_iter().map(|(_, id)| id).collect::<Vec<_>>();
        let q = freshet_model::query::query_terms("CRIMSON gown");
        assert_eq!(ids(l.search(&q, 10).unwrap()), [2, 4]);
        let zh = freshet_model::query::query_terms("连衣裙");
        assert_eq!(ids(l.search(&zh, 10).unwrap()), [5]);
        // A new title replaces the old words; a deactivated item leaves the index.
        l.upsert(&[
            item(2, "Green scarf", true),
            item(4, "Crimson sneaker", false),
        ])
        .unwrap();
        l.commit().unwrap();
        assert!(l.search(&q, 10).unwrap().is_empty());
        assert_eq!(ids(l.search(&["scarf".into()], 10).unwrap()), [2]);
        // The earlier view still answers from its own epoch.
        assert_eq!(ids(old.search(&q, 10).unwrap()), [2, 4]);
    }
}
