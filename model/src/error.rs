//! The one error type of `tessera-model`.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running the model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file is malformed or has a field of the wrong type.
    #[error("cannot parse {path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A configuration value is present but not supported or inconsistent.
    #[error("config field `{field}`: {message}")]
    Config { field: String, message: String },
    /// A tensor the model needs is not in the checkpoint.
    #[error("tensor `{name}` is missing from the checkpoint")]
    MissingTensor { name: String },
    /// A tensor in the checkpoint does not have the shape the config implies.
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A tensor in the checkpoint is stored in a dtype Tessera cannot load.
    #[error(
        "tensor `{name}` is stored as {dtype}, which Tessera cannot load (expected BF16, F16 or F32)"
    )]
    TensorDtype { name: String, dtype: String },
    /// The tokenizer could not be loaded or failed to encode/decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The conversation or prompt cannot be turned into tokens.
    #[error("invalid prompt: {0}")]
    Prompt(String),
    /// An image cannot be decoded, is too large, or is not a supported format.
    #[error("invalid image: {0}")]
    Image(String),
    /// A generation request is not valid (bad sampling parameters, empty prompt, ...).
    #[error("invalid request: {0}")]
    Request(String),
    /// An expert backend failed to compute routed experts. The source is the
    /// backend's own error, typed: a caller that knows the backend downcasts it
    /// (`Error::into_experts`).
    #[error("routed experts: {0}")]
    Experts(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An expert backend's failure that is only a message.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ExpertMessage(pub String);

impl Error {
    /// An expert backend failure described by `message`.
    pub fn experts(message: impl Into<String>) -> Self {
        Self::Experts(Box::new(ExpertMessage(message.into())))
    }

    /// An expert backend failure whose source is the backend's error `e`.
    pub fn experts_from(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Experts(Box::new(e))
    }

    /// The backend's own error of type `E` behind an [`Error::Experts`], or the
    /// error unchanged.
    pub fn into_experts<E: std::error::Error + 'static>(self) -> std::result::Result<E, Self> {
        match self {
            Self::Experts(source) => match source.downcast::<E>() {
                Ok(e) => Ok(*e),
                Err(other) => Err(Self::Experts(other)),
            },
            other => Err(other),
        }
    }

    pub(crate) fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config {
            field: field.into(),
            message: message.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn json(path: impl Into<PathBuf>, source: serde_json::Error) -> Self {
        Self::Json {
            path: path.into(),
            source,
        }
    }
}

/// Reads and parses a JSON file, naming the file in every error.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::json(path, e))
}
