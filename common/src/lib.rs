//! Shared pieces of every Lifeboat service: roles, the passphrase handshake, on-disk identities,
//! TLS, registration and heartbeats of components, configuration, telemetry and shutdown.
//! Nothing here knows about Raft, replication or the state of the configuration server.

pub mod allocator;
pub mod assigned;
pub mod assignment_watch;
pub mod batch;
pub mod blockhash;
pub mod component;
pub mod component_cli;
pub mod config;
pub mod crc;
pub mod facts;
pub mod fsutil;
pub mod group;
pub mod identity;
pub mod kept_gauges;
pub mod passphrase;
pub mod peer;
pub mod rate;
pub mod record_layer;
pub mod register;
pub mod role;
pub mod serve;
pub mod service_args;
pub mod shutdown;
pub mod stream_owner;
pub mod telemetry;
pub mod tls;
pub mod tls_connect;

pub use identity::Identity;
pub use role::Role;

/// Formats an error with all its sources: "a: b: c". tonic and hyper hide the useful part of
/// an error (the TLS or connect failure) in its source chain.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
