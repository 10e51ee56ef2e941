//! The one error type of `tessera-vision-worker`, and its gRPC status.

/// Everything that can go wrong while starting the worker or encoding images.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The snapshot's configs, vision weights or fingerprint could not be loaded.
    #[error("cannot load the vision model: {0}")]
    Load(#[source] tessera_model::Error),
    /// The model thread could not be started.
    #[error("cannot start the vision model thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// The member lifecycle failed (listening, serving, registering).
    #[error(transparent)]
    Member(#[from] tessera_runtime::member::Error),
    /// A request arrived before the model finished loading.
    #[error("the vision-worker is still loading its model; retry shortly")]
    Loading,
    /// The request comes from a member serving another model.
    #[error("model fingerprint mismatch: request has {request:?}, this worker serves {ours:?}")]
    FingerprintMismatch { request: String, ours: String },
    /// The request has no images.
    #[error("the request has no images; send at least one")]
    NoImages,
    /// One image's MIME type is not an image type.
    #[error("image {index}: the MIME type is not image/* (leave it empty to detect the format)")]
    MimeType { index: usize },
    /// One image cannot be decoded, is too large or is in an unsupported format.
    #[error("image {index}: {source}")]
    BadImage {
        index: usize,
        #[source]
        source: tessera_model::Error,
    },
    /// Too many tower passes are already waiting.
    #[error("the vision-worker is overloaded ({queued} encodes queued); retry later")]
    Overloaded { queued: usize },
    /// Tiling or the vision tower failed.
    #[error("image encoding failed: {0}")]
    Compute(#[source] tessera_model::Error),
    /// The embeddings could not be put on the wire.
    #[error("cannot encode the embeddings: {0}")]
    Codec(#[from] tessera_proto::CodecError),
    /// The model thread stopped (it panicked, or the worker is shutting down).
    #[error("the vision model thread has stopped")]
    ModelStopped,
    /// A blocking task panicked or was cancelled.
    #[error("worker task failed: {0}")]
    Join(#[source] tokio::task::JoinError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        let message = e.to_string();
        match e {
            Error::NoImages | Error::MimeType { .. } | Error::BadImage { .. } => {
                Self::invalid_argument(message)
            }
            Error::FingerprintMismatch { .. } => Self::failed_precondition(message),
            Error::Loading | Error::ModelStopped => Self::unavailable(message),
            Error::Overloaded { .. } => Self::resource_exhausted(message),
            Error::Load(_)
            | Error::Spawn(_)
            | Error::Member(_)
            | Error::Compute(_)
            | Error::Codec(_)
            | Error::Join(_) => Self::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn a_bad_image_is_the_callers_mistake_and_names_its_index() {
        let status: tonic::Status = Error::BadImage {
            index: 1,
            source: tessera_model::Error::Image("the image data is empty (0 bytes)".into()),
        }
        .into();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().starts_with("image 1: invalid image: "),
            "{}",
            status.message()
        );
        let empty: tonic::Status = Error::NoImages.into();
        assert_eq!(empty.code(), Code::InvalidArgument);
    }

    #[test]
    fn loading_overload_and_mismatch_have_their_own_codes() {
        let loading: tonic::Status = Error::Loading.into();
        assert_eq!(loading.code(), Code::Unavailable);
        assert!(loading.message().contains("still loading"));
        let busy: tonic::Status = Error::Overloaded { queued: 4 }.into();
        assert_eq!(busy.code(), Code::ResourceExhausted);
        let fp: tonic::Status = Error::FingerprintMismatch {
            request: "a".into(),
            ours: "b".into(),
        }
        .into();
        assert_eq!(fp.code(), Code::FailedPrecondition);
    }
}
