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
        // The path is cut first: it may quote the caller's input too (a map key), and the
        // message must still name the field and its reason within the bound (a 100 KB
        // key once pushed the ": reason" past it).
        let field = cut_to(&e.field, FIELD_PATH_BYTES_MAX);
        tonic::Status::invalid_argument(bounded(format!("{field}: {}", e.reason)))
    }
}

/// The most bytes of a field path a message quotes.
pub const FIELD_PATH_BYTES_MAX: usize = 256;

/// `s` cut to at most `max` bytes at a character boundary, `…` marking a cut.
fn cut_to(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if s.len() <= max {
        return s.into();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end]).into()
}

/// The most bytes of an error message a server sends.
pub const MESSAGE_BYTES_MAX: usize = 1024;

/// `msg` cut to [`MESSAGE_BYTES_MAX`] (at a character boundary, saying how much was
/// cut): messages quote the caller's input, and a status message travels in an HTTP/2
/// header, so a 1 MB name must not turn INVALID_ARGUMENT into a transport error.
pub fn bounded(mut msg: String) -> String {
    if msg.len() <= MESSAGE_BYTES_MAX {
        return msg;
    }
    let total = msg.len();
    let mut cut = MESSAGE_BYTES_MAX;
    while !msg.is_char_boundary(cut) {
        cut -= 1;
    }
    msg.truncate(cut);
    msg.push_str(&format!("… ({} of {total} bytes cut)", total - cut));
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_bounded_at_a_char_boundary() {
        assert_eq!(bounded("short".into()), "short");
        let long = format!("name: {}", "é".repeat(1_000_000));
        let b = bounded(long.clone());
        assert!(b.len() < MESSAGE_BYTES_MAX + 64, "{}", b.len());
        assert!(
            b.starts_with("name: é") && b.ends_with(" bytes cut)"),
            "{b}"
        );
        let s = tonic::Status::from(FieldError::new("table", long));
        assert!(s.message().len() < MESSAGE_BYTES_MAX + 64);
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        // A field path that quotes a huge key: the message still names it and the
        // reason (found by a 100,000-input fuzz run).
        let key = "x".repeat(100_000);
        let s = tonic::Status::from(FieldError::new(
            format!("user.categorical[{key:?}]"),
            "names and values must be 1..=128 bytes",
        ));
        let m = s.message();
        assert!(m.len() < MESSAGE_BYTES_MAX + 64, "{}", m.len());
        assert!(m.starts_with("user.categorical[\"xxx"), "{m}");
        assert!(
            m.contains("…: names and values must be 1..=128 bytes"),
            "{m}"
        );
    }
}
