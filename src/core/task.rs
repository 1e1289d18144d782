//! A model's task: how its outputs are decoded, what a target is, and which answer fields exist. The registry sets
//! it at load, the pipeline decodes through it, the encoders write its result ([`TaskResult`]). A new task (the
//! detection and dense-prediction issues) is a variant here and its result type in answer.rs, not `if` branches
//! across files.

use super::answer::{Classification, Prediction, TaskResult};
use crate::backend::engine::{ranked, ModelInfo};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Class logits `[N, K]`: targets are classes; the answer has `predictions`.
    Classification,
}

impl Task {
    pub fn as_str(self) -> &'static str {
        match self {
            Task::Classification => "classification",
        }
    }

    /// The task of a loaded model. Every model camserve loads today is a classifier.
    pub fn of(_info: &ModelInfo) -> Task {
        Task::Classification
    }

    /// The image's result from the first row of the request's pass: `logits` and their softmax `probabilities`
    /// (computed once by the pipeline), the best `n` classes.
    pub fn decode(self, info: &ModelInfo, logits: Vec<f32>, probabilities: Vec<f32>, n: usize) -> TaskResult {
        match self {
            Task::Classification => {
                let top = ranked(logits.iter().copied())
                    .into_iter()
                    .take(n.min(info.num_classes))
                    .map(|i| Prediction { index: i, label: info.label(i).map(str::to_string), score: probabilities[i], logit: logits[i] })
                    .collect();
                TaskResult::Classification(Classification { logits, probabilities, top })
            }
        }
    }
}
