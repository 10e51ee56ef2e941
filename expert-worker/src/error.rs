//! The one error type of `tessera-expert-worker`, and its gRPC status.

/// Everything that can go wrong while loading experts or serving a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The snapshot or its experts could not be loaded at start-up.
    #[error("cannot load experts: {0}")]
    Load(#[source] tessera_model::Error),
    /// The server failed to bind or serve.
    #[error("gRPC transport: {0}")]
    Transport(#[source] tonic::transport::Error),
    /// The request comes from a scheduler serving another model.
    #[error("model fingerprint mismatch: request has {request:?}, this worker serves {ours:?}")]
    FingerprintMismatch { request: String, ours: String },
    /// The request is malformed (lengths, shapes, row indices).
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The request's rows tensor could not be decoded.
    #[error("cannot decode rows: {0}")]
    Codec(#[from] tessera_proto::CodecError),
    /// The request routes a row to an expert this worker does not hold.
    #[error("layer {layer} expert {expert} is not held by this worker")]
    NotHeld { layer: usize, expert: usize },
    /// The experts failed to compute.
    #[error("expert computation failed: {0}")]
    Compute(#[source] tessera_model::Error),
    /// A blocking task panicked or was cancelled.
    #[error("worker task failed: {0}")]
    Join(#[source] tokio::task::JoinError),
    /// The listener's address could not be read.
    #[error("cannot use the listener: {0}")]
    Bind(#[source] std::io::Error),
    /// The metrics endpoint could not listen (the message names the address).
    #[error("metrics endpoint: {0}")]
    Metrics(std::io::Error),
    /// Registration in discovery failed.
    #[error("cannot register in discovery: {0}")]
    Discovery(#[source] tessera_runtime::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::Malformed(_) | Error::Codec(_) => Self::invalid_argument(message),
            Error::FingerprintMismatch { .. } | Error::NotHeld { .. } => {
                Self::failed_precondition(message)
            }
            Error::Load(_)
            | Error::Transport(_)
            | Error::Compute(_)
            | Error::Join(_)
            | Error::Bind(_)
            | Error::Metrics(_)
            | Error::Discovery(_) => Self::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn client_mistakes_are_not_internal_errors() {
        let not_held: tonic::Status = Error::NotHeld {
            layer: 1,
            expert: 7,
        }
        .into();
        assert_eq!(not_held.code(), Code::FailedPrecondition);
        assert!(not_held.message().contains("layer 1 expert 7"));
        let fp: tonic::Status = Error::FingerprintMismatch {
            request: "a".into(),
            ours: "b".into(),
        }
        .into();
        assert_eq!(fp.code(), Code::FailedPrecondition);
        let bad: tonic::Status = Error::Malformed("x".into()).into();
        assert_eq!(bad.code(), Code::InvalidArgument);
    }
}
