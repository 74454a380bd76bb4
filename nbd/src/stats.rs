//! Counters for metrics: lock-free atomics updated on the request path, and the plain
//! snapshot structs callers read.
//!
//! The crate deliberately depends on no metrics library: the agent and the master target
//! export these numbers through whatever they already use (Prometheus text, logs).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Per-export counters, as seen at one instant. All values count since the export was added.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Connections that entered transmission on this export.
    pub connections: u64,
    /// `NBD_CMD_READ` requests completed successfully.
    pub reads: u64,
    /// `NBD_CMD_WRITE` requests completed successfully.
    pub writes: u64,
    /// `NBD_CMD_FLUSH` requests completed successfully.
    pub flushes: u64,
    /// `NBD_CMD_TRIM` requests completed successfully.
    pub trims: u64,
    /// `NBD_CMD_WRITE_ZEROES` requests completed successfully.
    pub write_zeroes: u64,
    /// Bytes returned by successful reads.
    pub bytes_read: u64,
    /// Bytes stored by successful writes.
    pub bytes_written: u64,
    /// Bytes covered by successful trims.
    pub bytes_trimmed: u64,
    /// Bytes covered by successful write-zeroes.
    pub bytes_zeroed: u64,
    /// Requests refused before reaching the backend (out of range, bad flags, read-only,
    /// unknown command): answered with EINVAL, ENOSPC or EPERM.
    pub rejected: u64,
    /// Requests the backend failed (its error was mapped to an NBD error value).
    pub backend_errors: u64,
}

/// Server-wide counters, as seen at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    /// TCP connections (or streams) accepted.
    pub connections_accepted: u64,
    /// Connections currently open, in handshake or transmission.
    pub connections_active: u64,
    /// Handshakes that ended in transmission.
    pub handshakes_completed: u64,
    /// Connections closed because the peer broke the protocol (bad magic, unknown client
    /// flags, oversized write, truncated message, handshake timeout).
    pub protocol_errors: u64,
}

/// Kinds of completed requests, for [`ExportCounters::record_ok`].
#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
}

#[derive(Debug, Default)]
pub(crate) struct ExportCounters {
    connections: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    write_zeroes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    bytes_trimmed: AtomicU64,
    bytes_zeroed: AtomicU64,
    rejected: AtomicU64,
    backend_errors: AtomicU64,
}

impl ExportCounters {
    pub(crate) fn connection(&self) {
        self.connections.fetch_add(1, Relaxed);
    }

    pub(crate) fn record_ok(&self, op: Op, bytes: u64) {
        let (count, total) = match op {
            Op::Read => (&self.reads, Some(&self.bytes_read)),
            Op::Write => (&self.writes, Some(&self.bytes_written)),
            Op::Flush => (&self.flushes, None),
            Op::Trim => (&self.trims, Some(&self.bytes_trimmed)),
            Op::WriteZeroes => (&self.write_zeroes, Some(&self.bytes_zeroed)),
        };
        count.fetch_add(1, Relaxed);
        if let Some(total) = total {
            total.fetch_add(bytes, Relaxed);
        }
    }

    pub(crate) fn rejected(&self) {
        self.rejected.fetch_add(1, Relaxed);
    }

    pub(crate) fn backend_error(&self) {
        self.backend_errors.fetch_add(1, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> ExportStats {
        ExportStats {
            connections: self.connections.load(Relaxed),
            reads: self.reads.load(Relaxed),
            writes: self.writes.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            trims: self.trims.load(Relaxed),
            write_zeroes: self.write_zeroes.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            bytes_trimmed: self.bytes_trimmed.load(Relaxed),
            bytes_zeroed: self.bytes_zeroed.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            backend_errors: self.backend_errors.load(Relaxed),
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct ServerCounters {
    pub(crate) connections_accepted: AtomicU64,
    pub(crate) connections_active: AtomicU64,
    pub(crate) handshakes_completed: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
}

impl ServerCounters {
    pub(crate) fn snapshot(&self) -> ServerStats {
        ServerStats {
            connections_accepted: self.connections_accepted.load(Relaxed),
            connections_active: self.connections_active.load(Relaxed),
            handshakes_completed: self.handshakes_completed.load(Relaxed),
            protocol_errors: self.protocol_errors.load(Relaxed),
        }
    }
}
