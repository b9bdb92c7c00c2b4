//! The daemon's error enum, [`Error`], and the gRPC status each variant travels as: codes that
//! mean what they say, messages a person can act on.

use tonic::{Code, Status};

use super::record::VmPhase;

/// Why an operation of the daemon was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No VM has that id or name (`NOT_FOUND`).
    #[error("no VM is named {0:?} or has that id (see `dittoctl list`)")]
    NotFound(String),
    /// No checkpoint has that id (`NOT_FOUND`).
    #[error("no checkpoint has the id {0:?} (see `dittoctl checkpoints`)")]
    CheckpointNotFound(String),
    /// A request field is invalid (`INVALID_ARGUMENT`); the message starts with the field.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The field, as named in the request (`spec.drives[1].path`).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A name or a vsock context id is taken (`ALREADY_EXISTS`).
    #[error("{0}")]
    AlreadyExists(String),
    /// The VM is in a state the operation does not apply to (`FAILED_PRECONDITION`).
    #[error("cannot {op} VM {vm:?}: it is {state}{hint}")]
    WrongState {
        /// The VM's name.
        vm: String,
        /// The refused operation.
        op: &'static str,
        /// Its state.
        state: VmPhase,
        /// What to do instead, starting with "; " (or empty).
        hint: &'static str,
    },
    /// Another precondition does not hold (`FAILED_PRECONDITION`).
    #[error("{0}")]
    Precondition(String),
    /// A limit of this host is reached (`RESOURCE_EXHAUSTED`).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The guest agent does not answer (`UNAVAILABLE`).
    #[error("the guest agent of VM {vm:?} does not answer: {reason}")]
    AgentUnavailable {
        /// The VM's name.
        vm: String,
        /// Why.
        reason: String,
    },
    /// A wait ran out (`DEADLINE_EXCEEDED`).
    #[error("{0}")]
    Deadline(String),
    /// The VMM failed (`INTERNAL`).
    #[error("{0}")]
    Vmm(String),
    /// The daemon could not read or write its state (`INTERNAL`).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

impl Error {
    /// An invalid field.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// An I/O failure while doing `what`.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }

    /// The gRPC status code this error travels as.
    pub fn code(&self) -> Code {
        match self {
            Self::NotFound(_) | Self::CheckpointNotFound(_) => Code::NotFound,
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::WrongState { .. } | Self::Precondition(_) => Code::FailedPrecondition,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::AgentUnavailable { .. } => Code::Unavailable,
            Self::Deadline(_) => Code::DeadlineExceeded,
            Self::Vmm(_) | Self::Io { .. } => Code::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        Status::new(e.code(), e.to_string())
    }
}
