//! The process server's durable disk cache: per-disk append-only segments of compressed,
//! encrypted change batches (see `segment`, `crypto`), recovered after a crash, released
//! once the master target has applied them, and reused (see `spares`).
mod compress_probe;
pub mod crypto;
pub mod disk_cache;
mod gcm_stream;
pub mod segment;
mod spares;

pub use crypto::CacheKey;
pub use disk_cache::{CacheError, Cursor, DiskCache};
