//! Where the agent learns about the cluster. Each source turns Kubernetes objects into one
//! [`ClusterState`](crate::state::ClusterState) and publishes a new one whenever they change.

pub(crate) mod file;

pub use file::{FileSource, SourceError};
