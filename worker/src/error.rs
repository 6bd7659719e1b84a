//! The worker's typed errors and their one mapping to gRPC status codes.

use freshet_proto::FieldError;

/// What the worker role and its Train calls can fail with.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A config or request field out of range; names the field.
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// Every step slot is busy and the queue is full; the gateway tries another worker.
    #[error("worker queue is full")]
    QueueFull,
    #[error("worker stopping")]
    Stopping,
    /// The step's events could not be claimed on their shards (nothing of this call
    /// trains in it; the incarnation is given up).
    #[error("claiming events failed: {0}")]
    Claim(String),
    /// The cluster's model spec is one this build cannot train.
    #[error("the cluster's model spec does not fit this worker: {0}")]
    ModelMismatch(String),
    /// The cluster was bootstrapped without a model spec.
    #[error("the cluster holds no model spec: {0}")]
    NoModel(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The embedded descriptor set did not load (a build problem).
    #[error("grpc reflection: {0}")]
    Reflection(String),
}

/// The one mapping to gRPC codes.
impl From<WorkerError> for tonic::Status {
    fn from(e: WorkerError) -> Self {
        use tonic::Status;
        let msg = freshet_proto::bounded(e.to_string());
        match e {
            WorkerError::Invalid(f) => f.into(),
            WorkerError::QueueFull => Status::resource_exhausted(msg),
            WorkerError::Stopping | WorkerError::Claim(_) => Status::unavailable(msg),
            WorkerError::ModelMismatch(_) | WorkerError::NoModel(_) => {
                Status::failed_precondition(msg)
            }
            WorkerError::Io(_) | WorkerError::Transport(_) | WorkerError::Reflection(_) => {
                Status::internal(msg)
            }
        }
    }
}
