//! The service's core: the model registry (loading, warming, readiness), the request pipeline, the request
//! options, the models' tasks, and the typed [`answer::Answer`] the pipeline returns. No protocol here: `crate::api`
//! and the CLI turn requests into calls on [`pipeline::Service`] and encode its answers.

pub mod answer;
pub mod explanations;
pub mod jobs;
pub mod options;
pub mod pipeline;
pub mod loading;
pub mod task;
