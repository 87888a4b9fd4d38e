//! Errors from finding, reading and checking checkpoints. Each names the file and the problem.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("model folder {0} does not exist")]
    MissingFolder(PathBuf),

    #[error("{file} not found in {folder}")]
    MissingFile { folder: String, file: String },

    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{path} is not a valid {what}: {message}")]
    Invalid {
        path: PathBuf,
        what: &'static str,
        message: String,
    },

    #[error("unknown model_type `{model_type}` in {path}; supported: {supported}")]
    UnknownModelType {
        path: PathBuf,
        model_type: String,
        supported: &'static str,
    },

    #[error("hub: {0}")]
    Hub(String),

    #[error("{context}: {source}")]
    Candle {
        context: String,
        source: candle_core::Error,
    },

    #[error("{0}")]
    Unsupported(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Attaches a description of what was being done to a Candle error.
pub trait CandleContext<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> CandleContext<T> for candle_core::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Candle {
            context: what(),
            source,
        })
    }
}
