//! The one error type of `tessera-gateway`, and its gRPC status.
//!
//! Bad input is INVALID_ARGUMENT with a message the caller can act on (never the
//! prompt or the pixels); a status from a vision-worker or scheduler keeps its
//! code, except that a member gone or broken (UNKNOWN, CANCELLED, or INTERNAL made
//! by this side's transport) and a request no member could serve are UNAVAILABLE,
//! never UNKNOWN; a member that answers against the protocol is INTERNAL.

use std::path::PathBuf;

use tessera_runtime::Role;

/// Everything that can go wrong while starting the gateway or serving a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of range.
    #[error("invalid gateway configuration: {0}")]
    Config(String),
    /// The snapshot's configuration, tokenizer or fingerprint could not be loaded.
    #[error("cannot load the model files of {path}: {source}")]
    Load {
        path: PathBuf,
        #[source]
        source: tessera_model::Error,
    },
    /// The HTTP API's address cannot be listened on, or read.
    #[error("HTTP listener: {0}")]
    Listener(#[source] std::io::Error),
    /// The member lifecycle failed (listening, serving, registering).
    #[error(transparent)]
    Member(#[from] tessera_runtime::member::Error),
    /// The call has no valid API key (`--api-key-file`).
    #[error("{0}")]
    Unauthenticated(String),
    /// The caller's key is over one of its limits (`--max-concurrent-per-key`,
    /// `--requests-per-minute-per-key`).
    #[error("{0}")]
    OverKeyLimit(String),
    /// A request arrived before the model files were loaded.
    #[error("the gateway is still loading the model files; retry shortly")]
    Loading,
    /// The request is not valid; the message says what to change.
    #[error("{0}")]
    InvalidArgument(String),
    /// No member with the role the request needs is registered.
    #[error("no {0} is registered")]
    NoMember(Role),
    /// A member's address is not a valid endpoint.
    #[error("{role} {id:?} registered the invalid address {address:?}")]
    BadAddress {
        role: Role,
        id: String,
        address: String,
    },
    /// A vision-worker or scheduler answered with an error status.
    #[error("{role}: {}", .status.message())]
    Upstream { role: Role, status: tonic::Status },
    /// Every member of `role` tried failed (gone or broken), or none other was left
    /// to try (`crate::failover`).
    #[error("no {role} could serve the request ({} failed; the last: {last})", .failed.join(", "))]
    Unserved {
        role: Role,
        /// The ids of the members that failed, in order.
        failed: Vec<String>,
        /// Why the last one failed.
        last: String,
    },
    /// A vision-worker or scheduler answered against the protocol.
    #[error("{role} answered against the protocol: {message}")]
    Protocol { role: Role, message: String },
    /// The request ran longer than the gateway's request timeout.
    #[error("the request did not finish within {0} s (the gateway's request timeout)")]
    Timeout(u64),
    /// The client cancelled the call or stopped reading its stream.
    #[error("the client cancelled the request")]
    ClientGone,
    /// Tokenizing or detokenizing failed.
    #[error("tokenizer: {0}")]
    Tokenizer(#[source] tessera_model::Error),
    /// A blocking task panicked or was cancelled.
    #[error("gateway task failed: {0}")]
    Join(#[source] tokio::task::JoinError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An INVALID_ARGUMENT error with `message`.
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidArgument(message.into())
    }

    /// A status from `role`, kept with its code.
    pub(crate) fn upstream(role: Role, status: tonic::Status) -> Self {
        Self::Upstream { role, status }
    }

    /// A protocol violation by `role`.
    pub(crate) fn protocol(role: Role, message: impl Into<String>) -> Self {
        Self::Protocol {
            role,
            message: message.into(),
        }
    }

    /// A model-crate error met while planning a prompt: a bad conversation or image is
    /// the caller's to fix; anything else is ours.
    pub(crate) fn from_planning(e: tessera_model::Error) -> Self {
        match e {
            tessera_model::Error::Prompt(m)
            | tessera_model::Error::Image(m)
            | tessera_model::Error::Request(m) => Self::InvalidArgument(m),
            other => Self::Tokenizer(other),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::InvalidArgument(_) => Self::invalid_argument(message),
            Error::Unauthenticated(_) => Self::unauthenticated(message),
            Error::OverKeyLimit(_) => Self::resource_exhausted(message),
            Error::Loading | Error::NoMember(_) | Error::Unserved { .. } => {
                Self::unavailable(message)
            }
            Error::Upstream { status, .. } => Self::new(client_code(&status), message),
            Error::Timeout(_) => Self::deadline_exceeded(message),
            Error::ClientGone => Self::cancelled(message),
            Error::Config(_)
            | Error::Load { .. }
            | Error::Listener(_)
            | Error::Member(_)
            | Error::BadAddress { .. }
            | Error::Protocol { .. }
            | Error::Tokenizer(_)
            | Error::Join(_) => Self::internal(message),
        }
    }
}

/// The code a member's `status` reaches the client with: its own, except that a
/// member gone or broken is UNAVAILABLE: UNKNOWN (what tonic makes of a broken
/// stream), CANCELLED (the client did not cancel) and INTERNAL with a source error
/// (made by this side's transport, not sent by the member).
fn client_code(status: &tonic::Status) -> tonic::Code {
    use tonic::Code;
    match status.code() {
        Code::Unknown | Code::Cancelled => Code::Unavailable,
        Code::Internal if std::error::Error::source(status).is_some() => Code::Unavailable,
        code => code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn upstream_codes_pass_through_and_caller_mistakes_are_invalid_arguments() {
        for code in [
            Code::InvalidArgument,
            Code::Unavailable,
            Code::ResourceExhausted,
            Code::FailedPrecondition,
        ] {
            let status: tonic::Status =
                Error::upstream(Role::Scheduler, tonic::Status::new(code, "busy")).into();
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), "scheduler: busy");
        }
        let none: tonic::Status = Error::NoMember(Role::VisionWorker).into();
        assert_eq!(none.code(), Code::Unavailable);
        assert_eq!(none.message(), "no vision-worker is registered");
        let bad: tonic::Status =
            Error::from_planning(tessera_model::Error::Prompt("no messages".into())).into();
        assert_eq!(bad.code(), Code::InvalidArgument);
        let broken: tonic::Status = Error::protocol(Role::Scheduler, "no finish").into();
        assert_eq!(broken.code(), Code::Internal);
    }

    #[test]
    fn a_member_gone_or_broken_is_unavailable_never_unknown() {
        for code in [Code::Unknown, Code::Cancelled] {
            let status: tonic::Status = Error::upstream(
                Role::Scheduler,
                tonic::Status::new(code, "h2 protocol error"),
            )
            .into();
            assert_eq!(status.code(), Code::Unavailable, "{code:?}");
            assert_eq!(status.message(), "scheduler: h2 protocol error");
        }
        // INTERNAL from this side's transport (it carries the cause) ...
        let mut transport = tonic::Status::internal("h2 protocol error: stream reset");
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        transport.set_source(std::sync::Arc::new(io));
        let status: tonic::Status = Error::upstream(Role::VisionWorker, transport).into();
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().starts_with("vision-worker: "),
            "{status:?}"
        );
        // ... but INTERNAL sent by the member keeps its code.
        let sent = tonic::Status::internal("model failed");
        let status: tonic::Status = Error::upstream(Role::Scheduler, sent).into();
        assert_eq!(status.code(), Code::Internal);

        let unserved = Error::Unserved {
            role: Role::Scheduler,
            failed: vec!["s-a".into(), "s-b".into()],
            last: "scheduler: Unknown: h2 protocol error".into(),
        };
        let status: tonic::Status = unserved.into();
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.message(),
            "no scheduler could serve the request (s-a, s-b failed; the last: scheduler: \
             Unknown: h2 protocol error)"
        );
    }
}
