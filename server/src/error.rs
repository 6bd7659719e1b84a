//! Typed errors of the PS node and the one table that maps them to gRPC status codes.

use freshet_proto::metadata;

use crate::fsm::Rejection;

/// Everything a PS operation can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PsError {
    /// Bad input; `field` names the offending request field.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists with a different spec")]
    AlreadyExists(String),
    /// This replica is not the shard leader; the hint is the leader's id and address if known.
    #[error("shard {shard} is led elsewhere")]
    NotLeader {
        shard: u32,
        leader_id: u64,
        leader_addr: Option<String>,
    },
    #[error("shard {0} is not hosted on this node")]
    ShardNotHere(u32),
    #[error("overloaded: {0}")]
    Overloaded(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("deadline exceeded: {0}")]
    Timeout(String),
    #[error("node is shutting down")]
    ShuttingDown,
    /// Transient: retry (e.g. this node's meta replica has not seen a registration yet).
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("storage: {0}")]
    Storage(String),
    #[error("corrupt data: {0}")]
    Corrupt(String),
    #[error("raft: {0}")]
    Raft(String),
}

impl PsError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        PsError::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// An INVALID_ARGUMENT's field prefixed with the part it came from (`sparse[2]`
    /// turns `ids[0]` into `sparse[2].ids[0]`); other errors unchanged.
    pub fn in_field(self, prefix: &str) -> Self {
        match self {
            PsError::InvalidArgument { field, reason } => PsError::InvalidArgument {
                field: format!("{prefix}.{field}"),
                reason,
            },
            other => other,
        }
    }
}

impl From<freshet_proto::FieldError> for PsError {
    fn from(e: freshet_proto::FieldError) -> Self {
        PsError::InvalidArgument {
            field: e.field,
            reason: e.reason,
        }
    }
}

/// The one mapping of a state machine's [`Rejection`] to a gRPC-facing error.
impl From<Rejection> for PsError {
    fn from(r: Rejection) -> Self {
        let msg = r.to_string();
        match r {
            Rejection::Invalid(f) => f.into(),
            Rejection::SeqAhead { .. } | Rejection::Fenced(_) | Rejection::Fixed(_) => {
                PsError::FailedPrecondition(msg)
            }
            Rejection::TableExists(name) => PsError::AlreadyExists(format!("table {name:?}")),
            Rejection::NoTable(name) => PsError::NotFound(format!("table {name:?}")),
            Rejection::TooManyTables | Rejection::Full(_) => PsError::Overloaded(msg),
            Rejection::MetaGroup(_) | Rejection::SealGap { .. } | Rejection::Malformed(_) => {
                PsError::invalid("request", msg)
            }
        }
    }
}

impl From<Rejection> for tonic::Status {
    fn from(r: Rejection) -> Self {
        PsError::from(r).into()
    }
}

impl From<std::io::Error> for PsError {
    fn from(e: std::io::Error) -> Self {
        PsError::Storage(e.to_string())
    }
}

impl From<raft::Error> for PsError {
    fn from(e: raft::Error) -> Self {
        PsError::Raft(e.to_string())
    }
}

impl From<PsError> for tonic::Status {
    fn from(e: PsError) -> Self {
        use tonic::Code;
        let msg = freshet_proto::bounded(e.to_string());
        match e {
            PsError::InvalidArgument { .. } => tonic::Status::new(Code::InvalidArgument, msg),
            PsError::NotFound(_) => tonic::Status::new(Code::NotFound, msg),
            PsError::AlreadyExists(_) => tonic::Status::new(Code::AlreadyExists, msg),
            PsError::NotLeader {
                leader_id,
                leader_addr,
                ..
            } => {
                let mut s = tonic::Status::new(Code::Unavailable, msg);
                if leader_id != 0 {
                    if let Ok(v) = leader_id.to_string().parse() {
                        s.metadata_mut().insert(metadata::LEADER_ID, v);
                    }
                }
                if let Some(addr) = leader_addr {
                    if let Ok(v) = addr.parse() {
                        s.metadata_mut().insert(metadata::LEADER_ADDR, v);
                    }
                }
                s
            }
            PsError::ShardNotHere(_) | PsError::ShuttingDown | PsError::Unavailable(_) => {
                tonic::Status::new(Code::Unavailable, msg)
            }
            PsError::Overloaded(_) => tonic::Status::new(Code::ResourceExhausted, msg),
            PsError::FailedPrecondition(_) => tonic::Status::new(Code::FailedPrecondition, msg),
            PsError::Timeout(_) => tonic::Status::new(Code::DeadlineExceeded, msg),
            PsError::Storage(_) | PsError::Corrupt(_) | PsError::Raft(_) => {
                tonic::Status::new(Code::Internal, msg)
            }
        }
    }
}
