//! The gateway's typed errors and their one mapping to gRPC status codes.

use freshet_proto::FieldError;

/// What the gateway role and its calls can fail with.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A config or request field out of range; names the field.
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// A request the gateway cannot serve as it stands (an unknown impression or item).
    #[error("{0}")]
    NotFound(String),
    /// Not now: bootstrapping, stopping, no worker or PS node reachable. Retry.
    #[error("{0}")]
    Unavailable(String),
    /// The cluster's state does not allow it (the model's tables do not fit).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A bound was reached (queues, impressions); retry later.
    #[error("{0}")]
    Overloaded(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A bug: a task of the gateway failed.
    #[error("{0}")]
    Internal(String),
    /// The embedded descriptor set is broken (a build problem).
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// A PS or worker call's own status, passed on as it is.
    #[error("{}", .0.message())]
    Upstream(tonic::Status),
}

impl GatewayError {
    pub fn not_found(m: impl Into<String>) -> Self {
        GatewayError::NotFound(m.into())
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        GatewayError::Unavailable(m.into())
    }
    pub fn failed_precondition(m: impl Into<String>) -> Self {
        GatewayError::FailedPrecondition(m.into())
    }
    pub fn overloaded(m: impl Into<String>) -> Self {
        GatewayError::Overloaded(m.into())
    }
    pub fn deadline_exceeded(m: impl Into<String>) -> Self {
        GatewayError::DeadlineExceeded(m.into())
    }
    pub fn internal(m: impl Into<String>) -> Self {
        GatewayError::Internal(m.into())
    }
}

/// The one mapping to gRPC codes.
impl From<GatewayError> for tonic::Status {
    fn from(e: GatewayError) -> Self {
        use tonic::Status;
        let msg = freshet_proto::bounded(e.to_string());
        match e {
            GatewayError::Invalid(f) => f.into(),
            GatewayError::NotFound(_) => Status::not_found(msg),
            GatewayError::Unavailable(_) => Status::unavailable(msg),
            GatewayError::FailedPrecondition(_) => Status::failed_precondition(msg),
            GatewayError::Overloaded(_) => Status::resource_exhausted(msg),
            GatewayError::DeadlineExceeded(_) => Status::deadline_exceeded(msg),
            GatewayError::Internal(_) | GatewayError::Reflection(_) => Status::internal(msg),
            GatewayError::Upstream(s) => s,
        }
    }
}
