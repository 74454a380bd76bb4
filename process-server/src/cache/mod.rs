//! The process server's durable disk cache: per-disk append-only segments of compressed,
//! encrypted change batches (see `segment`, `crypto`), recovered after a crash, released
//! once the master target has applied them.
pub mod crypto;
pub mod disk_cache;
pub mod segment;

pub use crypto::CacheKey;
pub use disk_cache::{CacheError, Cursor, DiskCache};
