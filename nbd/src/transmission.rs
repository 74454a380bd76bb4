//! The transmission phase of one connection: read requests, run them concurrently against
//! the export's backend, write simple replies.
//!
//! Three roles per connection:
//! * the **reader** (this module's [`serve`], on the connection's task) parses request
//!   headers and write payloads in order, validates them, and either answers at once
//!   (refusals) or spawns one task per request;
//! * **request tasks** await the backend and hand a finished reply to the writer; they
//!   complete in any order, so a slow request does not hold up the ones behind it;
//! * the **writer** task owns the socket's write half and writes each reply whole (header plus
//!   read data), batching whatever replies are ready into one flush.
//!
//! Backpressure: each request holds a slot of `max_in_flight_requests` and a share of
//! `max_in_flight_bytes` from before its payload is read until its reply has been written, and
//! the reader waits for both before reading on. A client that pipelines too much (or stops
//! reading replies) is therefore slowed by TCP flow control instead of growing our memory.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::export::Export;
use crate::protocol::*;
use crate::stats::Op;
use crate::{wire, Error, ServerConfig};

/// Granularity of the in-flight byte budget.
const BUDGET_UNIT: usize = 64 * 1024;
/// Reads of request headers are buffered; large payloads bypass the buffer.
const READ_BUFFER: usize = 128 * 1024;
const WRITE_BUFFER: usize = 256 * 1024;

/// A validated request, ready for the backend.
enum Job {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    },
}

/// What to do with one request header.
enum Plan {
    Run(Job),
    /// Answer at once with this error value (0: nothing to do, e.g. a zero-length request).
    Reply(u32),
    Disconnect,
}

/// A reply on its way to the writer. The permits are released when it is dropped, after
/// it has been written.
struct Reply {
    cookie: u64,
    error: u32,
    data: Option<Vec<u8>>,
    _permits: Permits,
}

struct Permits {
    _slot: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// Serves requests for `export` until the client disconnects, breaks the protocol, or
/// `cancel` fires; then lets in-flight requests finish, writes their replies and closes.
pub(crate) async fn serve<R, W>(
    reader: R,
    writer: W,
    export: Export,
    config: &ServerConfig,
    cancel: CancellationToken,
) -> Result<(), Error>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // Cancelled by the server (graceful stop) or by the writer (socket failed).
    let conn_cancel = cancel.child_token();
    let (tx, rx) = mpsc::unbounded_channel();
    let mut writer_task = tokio::spawn(write_replies(writer, rx, conn_cancel.clone()));
    let tasks = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(config.max_in_flight_requests.max(1)));
    let budget_units = config.max_in_flight_bytes.div_ceil(BUDGET_UNIT).max(1);
    let budget = Arc::new(Semaphore::new(budget_units));
    let mut reader = BufReader::with_capacity(READ_BUFFER, reader);

    let result = loop {
        let slot = tokio::select! {
            biased;
            _ = conn_cancel.cancelled() => break Ok(()),
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break Ok(()),
            },
        };
        let mut header = [0u8; REQUEST_LEN];
        let got = tokio::select! {
            biased;
            _ = conn_cancel.cancelled() => break Ok(()),
            got = wire::read_or_eof(&mut reader, &mut header, "a request header") => got,
        };
        match got {
            Ok(true) => {}
            Ok(false) => break Ok(()), // closed without NBD_CMD_DISC: treated the same
            Err(e) => break Err(e),
        }
        let Some(req) = Request::parse(&header) else {
            break Err(Error::protocol("bad request magic"));
        };

        // Bytes this request may hold in memory: its payload or its read data.
        let held = match req.kind {
            CMD_WRITE | CMD_READ if req.len <= config.max_request_size => req.len as usize,
            _ => 0,
        };
        if req.kind == CMD_WRITE && req.len > config.max_request_size {
            // The payload cannot be skipped cheaply; the spec allows disconnecting instead.
            break Err(Error::protocol(format!(
                "write of {} bytes over the limit",
                req.len
            )));
        }
        let bytes = if held > 0 {
            let units = held.div_ceil(BUDGET_UNIT).min(budget_units) as u32;
            tokio::select! {
                biased;
                _ = conn_cancel.cancelled() => break Ok(()),
                permit = Arc::clone(&budget).acquire_many_owned(units) => match permit {
                    Ok(p) => Some(p),
                    Err(_) => break Ok(()),
                },
            }
        } else {
            None
        };
        let permits = Permits {
            _slot: slot,
            _bytes: bytes,
        };

        let payload = if req.kind == CMD_WRITE {
            let read = tokio::select! {
                biased;
                _ = conn_cancel.cancelled() => break Ok(()),
                read = wire::read_vec(&mut reader, req.len as usize, "a write payload") => read,
            };
            match read {
                Ok(data) => data,
                Err(e) => break Err(e),
            }
        } else {
            Vec::new()
        };

        match plan(&req, payload, &export, config.max_request_size) {
            Plan::Disconnect => break Ok(()),
            Plan::Reply(error) => {
                if error != 0 {
                    export.counters.rejected();
                    tracing::debug!(?req, error, "request refused");
                }
                let _ = tx.send(Reply {
                    cookie: req.cookie,
                    error,
                    data: None,
                    _permits: permits,
                });
            }
            Plan::Run(job) => {
                let guard = ReplyGuard {
                    tx: Some(tx.clone()),
                    cookie: req.cookie,
                    permits: Some(permits),
                };
                tasks.spawn(run(export.clone(), job, guard));
            }
        }
    };

    // Finish what was accepted, then let the writer drain and close the socket.
    tasks.close();
    tasks.wait().await;
    drop(tx);
    let grace = async {
        cancel.cancelled().await;
        tokio::time::sleep(config.shutdown_grace).await;
    };
    let written = tokio::select! {
        done = &mut writer_task => done,
        _ = grace => {
            // The client stopped reading replies during a server stop: give up on it.
            writer_task.abort();
            return result;
        }
    };
    match written {
        Ok(Ok(())) => result,
        // A broken socket explains a reader error too: report the first cause.
        Ok(Err(e)) => result.and(Err(Error::Io(e))),
        Err(join) => result.and(Err(Error::Io(io::Error::other(join)))),
    }
}

/// Validates a request against the export. `payload` is the write data (empty otherwise).
fn plan(req: &Request, payload: Vec<u8>, export: &Export, max_request: u32) -> Plan {
    if req.kind == CMD_DISC {
        // Never answered, whatever its flags: the client is gone after sending it.
        return Plan::Disconnect;
    }
    let (offset, len) = (req.offset, req.len);
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let no_hole = req.flags & CMD_FLAG_NO_HOLE != 0;
    // FUA is accepted (and ignored where meaningless) on every command, as the spec asks.
    let allowed = match req.kind {
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => CMD_FLAG_FUA,
    };
    if req.flags & !allowed != 0 {
        return Plan::Reply(EINVAL);
    }
    let in_range = offset
        .checked_add(u64::from(len))
        .is_some_and(|end| end <= export.size());
    let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && export.read_only() {
        return Plan::Reply(EPERM);
    }
    match req.kind {
        CMD_FLUSH => Plan::Run(Job::Flush),
        CMD_READ if len > max_request => Plan::Reply(EINVAL),
        // The spec asks for ENOSPC on writes past the end, EINVAL elsewhere.
        CMD_WRITE | CMD_WRITE_ZEROES if !in_range => Plan::Reply(ENOSPC),
        CMD_READ | CMD_TRIM if !in_range => Plan::Reply(EINVAL),
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES if len == 0 => Plan::Reply(0),
        CMD_READ => Plan::Run(Job::Read { offset, len }),
        CMD_WRITE => Plan::Run(Job::Write {
            offset,
            data: payload,
            fua,
        }),
        CMD_TRIM => Plan::Run(Job::Trim { offset, len, fua }),
        CMD_WRITE_ZEROES => Plan::Run(Job::WriteZeroes {
            offset,
            len,
            no_hole,
            fua,
        }),
        _ => Plan::Reply(EINVAL),
    }
}

/// Runs one job against the backend and hands its reply to the writer.
async fn run(export: Export, job: Job, mut guard: ReplyGuard) {
    let be = &export.backend;
    let (op, bytes, result) = match job {
        Job::Read { offset, len } => {
            let r = be.read(offset, len).await.and_then(|data| {
                if data.len() == len as usize {
                    Ok(Some(data))
                } else {
                    // Sending a short buffer would desynchronise the stream.
                    Err(io::Error::other(format!(
                        "backend read {} of {len} bytes",
                        data.len()
                    )))
                }
            });
            (Op::Read, len, r)
        }
        Job::Write { offset, data, fua } => {
            let len = data.len() as u32;
            (
                Op::Write,
                len,
                be.write(offset, data, fua).await.map(|()| None),
            )
        }
        Job::Flush => (Op::Flush, 0, be.flush().await.map(|()| None)),
        Job::Trim { offset, len, fua } => (
            Op::Trim,
            len,
            be.trim(offset, len, fua).await.map(|()| None),
        ),
        Job::WriteZeroes {
            offset,
            len,
            no_hole,
            fua,
        } => {
            let r = be.write_zeroes(offset, len, no_hole, fua).await;
            (Op::WriteZeroes, len, r.map(|()| None))
        }
    };
    match result {
        Ok(data) => {
            export.counters.record_ok(op, u64::from(bytes));
            guard.send(0, data);
        }
        Err(e) => {
            export.counters.backend_error();
            tracing::warn!(export = export.name(), ?op, error = %e, "backend request failed");
            guard.send(errno_for(&e), None);
        }
    }
}

/// Sends the reply for one request exactly once: explicitly, or with EIO if the request
/// task is dropped first (a panicking backend), so the client is never left waiting.
struct ReplyGuard {
    tx: Option<mpsc::UnboundedSender<Reply>>,
    cookie: u64,
    permits: Option<Permits>,
}

impl ReplyGuard {
    fn send(&mut self, error: u32, data: Option<Vec<u8>>) {
        if let (Some(tx), Some(permits)) = (self.tx.take(), self.permits.take()) {
            // Fails only if the writer is gone, i.e. the socket is already dead.
            let _ = tx.send(Reply {
                cookie: self.cookie,
                error,
                data,
                _permits: permits,
            });
        }
    }
}

impl Drop for ReplyGuard {
    fn drop(&mut self) {
        self.send(EIO, None);
    }
}

/// The writer task: writes replies whole, flushing when no further reply is ready.
async fn write_replies<W>(
    writer: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    conn_cancel: CancellationToken,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut w = BufWriter::with_capacity(WRITE_BUFFER, writer);
    let result = async {
        while let Some(mut reply) = rx.recv().await {
            loop {
                w.write_all(&simple_reply(reply.error, reply.cookie))
                    .await?;
                if let Some(data) = &reply.data {
                    w.write_all(data).await?;
                }
                drop(reply); // releases its in-flight slot and bytes
                match rx.try_recv() {
                    Ok(next) => reply = next,
                    Err(_) => break,
                }
            }
            w.flush().await?;
        }
        w.shutdown().await
    }
    .await;
    if result.is_err() {
        // Stop the reader: nothing it reads could be answered.
        conn_cancel.cancel();
    }
    result
}
