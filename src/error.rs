//! The one error type of the serving half (core/, methods/, the protocols): what can go wrong in a request.
//! `api::error` maps each kind to its HTTP status (the only place that does); the protocols' own error forms
//! (problem+json, OIP's `{"error"}`) come from that mapping.

use std::time::Duration;

use crate::preprocess::ImageError;

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request is malformed (400).
    #[error("{0}")]
    BadRequest(String),
    #[error("no model named `{0}`")]
    UnknownModel(String),
    #[error("{0}")]
    TooLarge(String),
    /// Well-formed but not acceptable: an invalid option, a target out of range, over the budget (422).
    #[error("{0}")]
    Unprocessable(String),
    #[error("the queue of model `{0}` is full; retry shortly")]
    QueueFull(String),
    #[error("the request waited longer than {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    NotReady(String),
    #[error("{0}")]
    Internal(String),
}

impl From<ImageError> for ServiceError {
    fn from(e: ImageError) -> Self {
        match e {
            ImageError::TooLarge { .. } | ImageError::OverDecoderLimit(_) => ServiceError::TooLarge(e.to_string()),
            _ => ServiceError::BadRequest(e.to_string()),
        }
    }
}

/// The text of a caught panic's payload (`panic!` with a literal or with a formatted message).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "no message".into())
}
