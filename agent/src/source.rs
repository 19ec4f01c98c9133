//! Where the agent learns about the cluster. Each source gathers Kubernetes objects, turns them
//! into one [`ClusterState`](crate::state::ClusterState) through the same translation
//! ([`translate`]), and publishes a new state whenever they change.

pub(crate) mod file;
mod translate;

pub use file::{FileSource, SourceError};
pub use translate::ObjectError;
