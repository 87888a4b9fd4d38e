//! Errors of the pipelines and trainers, wrapping the model and data errors they pass on.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] zoo_models::Error),
    #[error(transparent)]
    Data(#[from] zoo_datasets::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Input(String),
}

pub type Result<T> = std::result::Result<T, Error>;
