//! The one error type of `tessera-scheduler` and its mapping to `tonic::Status`.

use std::path::PathBuf;

use tonic::Status;

/// Everything that can go wrong while starting the scheduler or running a request.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag has a value the scheduler cannot run with.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The snapshot could not be loaded.
    #[error("cannot load the model from {}: {source}", path.display())]
    Load {
        path: PathBuf,
        #[source]
        source: tessera_model::Error,
    },
    /// A request is malformed; the message says which field and why.
    #[error("{0}")]
    InvalidArgument(String),
    /// A request with this id is already queued or running.
    #[error("request id {0:?} is already running; request ids must be unique")]
    DuplicateRequest(String),
    /// The model is not loaded yet.
    #[error("the scheduler is still loading the model; retry shortly")]
    Loading,
    /// The request was made for another model.
    #[error("the request is for model {requested}, this scheduler serves {served}")]
    FingerprintMismatch { requested: String, served: String },
    /// The queue of waiting requests is full.
    #[error("scheduler queue is full ({0} requests); retry later")]
    QueueFull(usize),
    /// Routed experts had no ready owner for longer than the configured wait.
    #[error("routed experts unavailable: {0}")]
    ExpertsUnavailable(String),
    /// An expert-worker answered with an error retrying cannot fix.
    #[error("expert-worker {worker} failed: {code:?}: {message}")]
    Worker {
        worker: String,
        code: tonic::Code,
        message: String,
    },
    /// The request was cancelled (Cancel, the client went away, or shutdown).
    #[error("the request was cancelled")]
    Cancelled,
    /// The request ran past its deadline (the client's gRPC deadline or
    /// `--request-timeout-seconds`).
    #[error("the request ran past its deadline")]
    DeadlineExceeded,
    /// The engine thread is gone (shutting down).
    #[error("the scheduler is shutting down")]
    EngineStopped,
    /// The model failed while running a request.
    #[error("model: {0}")]
    Model(#[source] tessera_model::Error),
    /// A blocking task panicked or was cancelled.
    #[error("background task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// The engine thread could not be started.
    #[error("cannot start the engine thread: {0}")]
    Thread(#[source] std::io::Error),
    /// A generation in this process ([`crate::local`]) ended with this status.
    #[error("{}", .0.message())]
    Ended(Status),
    /// The member lifecycle failed (listening, serving, registering).
    #[error(transparent)]
    Member(#[from] tessera_runtime::member::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A model error raised while running a request: a bad request stays
    /// INVALID_ARGUMENT, the remote experts' own error comes back as it was
    /// (typed, not a message), anything else is internal.
    pub fn from_model(e: tessera_model::Error) -> Self {
        match e {
            tessera_model::Error::Request(message) => Self::InvalidArgument(message),
            e => match e.into_experts::<Error>() {
                Ok(ours) => ours,
                Err(other) => Self::Model(other),
            },
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::InvalidArgument(_) | Error::DuplicateRequest(_) => {
                Status::invalid_argument(message)
            }
            Error::Loading | Error::ExpertsUnavailable(_) | Error::EngineStopped => {
                Status::unavailable(message)
            }
            Error::FingerprintMismatch { .. } => Status::failed_precondition(message),
            Error::QueueFull(_) => Status::resource_exhausted(message),
            Error::Cancelled => Status::cancelled(message),
            Error::Ended(status) => status,
            Error::DeadlineExceeded => Status::deadline_exceeded(message),
            Error::Config(_)
            | Error::Load { .. }
            | Error::Worker { .. }
            | Error::Model(_)
            | Error::Join(_)
            | Error::Thread(_)
            | Error::Member(_) => Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_documented_codes() {
        let code = |e: Error| Status::from(e).code();
        assert_eq!(
            code(Error::InvalidArgument("x".into())),
            tonic::Code::InvalidArgument
        );
        assert_eq!(code(Error::QueueFull(64)), tonic::Code::ResourceExhausted);
        assert_eq!(
            code(Error::ExpertsUnavailable("layer 1".into())),
            tonic::Code::Unavailable
        );
        assert_eq!(code(Error::Loading), tonic::Code::Unavailable);
        assert_eq!(
            code(Error::from_model(tessera_model::Error::Request(
                "bad".into()
            ))),
            tonic::Code::InvalidArgument
        );
        let typed = tessera_model::Error::experts_from(Error::ExpertsUnavailable("x".into()));
        assert_eq!(code(Error::from_model(typed)), tonic::Code::Unavailable);
        let cancelled = tessera_model::Error::experts_from(Error::Cancelled);
        assert!(matches!(Error::from_model(cancelled), Error::Cancelled));
        let full = Status::from(Error::QueueFull(64));
        assert_eq!(
            full.message(),
            "scheduler queue is full (64 requests); retry later"
        );
    }
}
