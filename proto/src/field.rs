//! The one error type for a request field that fails validation. Every server maps it to
//! INVALID_ARGUMENT with the field named first, so a caller (or grpcurl user) sees which
//! part of the request to fix.

/// A request field that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    /// The field's path in the request (`items[3].features[0]`).
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The same error with the field prefixed by the part it came from (`sparse[2]` turns
    /// `ids[0]` into `sparse[2].ids[0]`).
    #[must_use]
    pub fn in_field(self, prefix: &str) -> Self {
        FieldError {
            field: format!("{prefix}.{}", self.field),
            reason: self.reason,
        }
    }
}

impl From<FieldError> for tonic::Status {
    fn from(e: FieldError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}
