//! gRPC services of the configuration server. Handlers are thin: they authorize the caller,
//! check the request, and call into `Node` and `state`.
pub mod admin;
mod balance;
pub mod bootstrap;
pub mod cluster;
pub mod component;
pub mod policy_rules;
pub mod protection;
mod switch;
