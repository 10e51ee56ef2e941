//! The one error type of `tessera-expert-worker`, and its gRPC status.

/// Everything that can go wrong while loading experts or serving a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model is not open yet (the worker is starting).
    #[error("the expert-worker is still loading the model; retry shortly")]
    Loading,
    /// The snapshot or its experts could not be loaded at start-up.
    #[error("cannot load experts: {0}")]
    Load(#[source] tessera_model::Error),
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
    /// The member lifecycle failed (listening, serving, registering).
    #[error(transparent)]
    Member(#[from] tessera_runtime::member::Error),
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
            Error::Loading => Self::unavailable(message),
            Error::Load(_) | Error::Compute(_) | Error::Join(_) | Error::Member(_) => {
                Self::internal(message)
            }
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
