//! The service's core: the model registry (loading, warming, readiness), the request pipeline and the request
//! options. No HTTP here: `crate::api` turns requests into calls on [`pipeline::Service`].

pub mod explanations;
pub mod options;
pub mod pipeline;
pub mod registry;
