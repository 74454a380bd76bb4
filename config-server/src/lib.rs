//! The Lifeboat configuration server: the cluster's single source of truth (registry,
//! passphrase, audit log; later policies, replication state, jobs, plans), replicated with
//! openraft over gRPC and stored in sled.
//!
//! - `state`: what is stored and how commands change it, independent of Raft and sled;
//! - `raft`: openraft types, sled log and state machine, gRPC network;
//! - `node`: a running node (writes with forwarding, authorization);
//! - `services`: the gRPC handlers; `ca`: certificates; `guard`: bootstrap protections;
//! - `liveness`: heartbeats in memory; `tasks`: background work; `init`, `server`: lifecycle.
pub mod alerts;
pub mod balance;
pub mod ca;
pub mod groups;
pub mod guard;
pub mod init;
pub mod liveness;
pub mod node;
pub mod placement;
pub mod progress;
pub mod raft;
pub mod reconcile;
pub mod recovery;
pub mod retention;
pub mod server;
pub mod services;
pub mod settings;
pub mod state;
pub mod status_wait;
pub mod switching;
pub mod tasks;
