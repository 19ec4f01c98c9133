//! Privileged end-to-end tests and benchmarks of ambit on real network namespaces: nodes and
//! pods as namespaces joined by veth pairs, agents as child processes, real kernel rules.
