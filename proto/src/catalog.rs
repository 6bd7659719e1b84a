//! Validation of catalog items and candidate sets: the same rules at the gateway (which
//! answers a bad upsert before any PS round trip), the PS service and the shard state
//! machine (which refuses what a buggy client got past both).

use crate::field::FieldError;
use crate::ps::v1::{CandidateSet, Item};

/// Items one UpsertItems call carries.
pub const ITEMS_PER_CALL_MAX: usize = 10_000;
/// Candidate sets one UpsertItems call may carry.
pub const SETS_PER_CALL_MAX: usize = 1000;
/// Features per item, and bytes per feature.
pub const ITEM_FEATURES_MAX: usize = 64;
pub const FEATURE_BYTES_MAX: usize = 128;
/// Bytes of an item's title.
pub const TITLE_BYTES_MAX: usize = 1024;
/// Items per candidate set.
pub const SET_ITEMS_MAX: usize = 100_000;

/// Checks one candidate set; `field` names it in the error.
///
/// # Errors
/// The first field that breaks a rule.
pub fn validate_set(set: &CandidateSet, field: &str) -> Result<(), FieldError> {
    if set.name.is_empty()
        || set.name.len() > 128
        || !set
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
    {
        return Err(FieldError::new(
            format!("{field}.name"),
            "1..=128 bytes of [A-Za-z0-9_.-]",
        ));
    }
    if set.items.len() > SET_ITEMS_MAX {
        return Err(FieldError::new(
            format!("{field}.items"),
            format!("at most {SET_ITEMS_MAX}"),
        ));
    }
    Ok(())
}

/// Checks one catalog item; `field` names it in the error.
///
/// # Errors
/// The first field that breaks a rule.
pub fn validate_item(item: &Item, field: &str) -> Result<(), FieldError> {
    if item.title.len() > TITLE_BYTES_MAX {
        return Err(FieldError::new(
            format!("{field}.title"),
            format!("at most {TITLE_BYTES_MAX} bytes"),
        ));
    }
    if item.features.len() > ITEM_FEATURES_MAX {
        return Err(FieldError::new(
            format!("{field}.features"),
            format!("at most {ITEM_FEATURES_MAX}"),
        ));
    }
    for (i, f) in item.features.iter().enumerate() {
        if f.is_empty() || f.len() > FEATURE_BYTES_MAX {
            return Err(FieldError::new(
                format!("{field}.features[{i}]"),
                format!("must be 1..={FEATURE_BYTES_MAX} bytes"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_offending_field() {
        let item = Item {
            id: 1,
            features: vec!["ok".into(), String::new()],
            ..Default::default()
        };
        let e = validate_item(&item, "items[3]").unwrap_err();
        assert_eq!(e.field, "items[3].features[1]");
        let set = CandidateSet {
            name: "bad name".into(),
            ..Default::default()
        };
        assert_eq!(
            validate_set(&set, "sets[0]").unwrap_err().field,
            "sets[0].name"
        );
    }
}
