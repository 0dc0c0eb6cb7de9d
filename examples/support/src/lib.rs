//! Helpers shared by sockmap-fastpath's examples, integration tests and
//! benchmarks. A workspace member that is never published: nothing here is
//! part of the library's API.

pub mod attach;
pub mod connect;
pub mod limits;
pub mod netns;
pub mod reference;
pub mod relay;
pub mod report;
pub mod signals;
pub mod sockopt;
pub mod workloads;
