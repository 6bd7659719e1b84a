//! The gateway's typed errors and their one mapping to gRPC status codes.

use freshet_proto::FieldError;

/// What starting or running the gateway role can fail with.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A config or request field out of range; names the field.
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// The embedded descriptor set is broken (a build problem).
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

impl From<GatewayError> for tonic::Status {
    fn from(e: GatewayError) -> Self {
        match e {
            GatewayError::Invalid(f) => f.into(),
            GatewayError::Reflection(_) => tonic::Status::internal(e.to_string()),
        }
    }
}
