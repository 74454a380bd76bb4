//! Direct writes in flight: handed to a few writer threads shared by the whole process, so
//! the caller goes on preparing the next data while the disk works.
//!
//! A direct write returns only once the disk has the data. Issued one after the other by the
//! thread that prepares them, the CPU waits while the disk works and the disk waits while the
//! CPU prepares the next piece; and a virtual disk that is fast only with several large
//! requests in flight (two benchmark VMs were 2–4 times slower with one) serves them at its
//! slowest. The page cache's write-back keeps several requests in flight by itself; this is
//! what lets direct writes do the same.
//!
//! A [`Flight`] is one file's writes in flight. It keeps them apart: a write over a range
//! still in flight waits for it first, so writes land in the order they were made wherever
//! they overlap. At most [`MAX_IN_FLIGHT_BYTES`] of a file are in flight at once (that much
//! memory per file being written). A failed write's error is kept and returned by the next
//! call that submits or waits: the caller treats everything since its last successful wait as
//! not written.
//!
//! A write's buffer goes back to a pool the whole process shares once it has landed (up to
//! [`POOL_BYTES`]), and the writers take their next buffers from there: a new buffer of
//! several MiB costs zeroing, or fresh pages from the kernel, each time.
use crate::AlignedBuf;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, OnceLock};

/// Most bytes of one file in direct writes in flight at once: four of the process server's
/// 4 MiB stages, two of the master target's 8 MiB gathered writes.
const MAX_IN_FLIGHT_BYTES: usize = 16 * 1024 * 1024;
/// Threads issuing direct writes, for every file of the process together.
const WRITERS: usize = 4;
/// Most bytes of buffers kept for reuse, for every file of the process together.
const POOL_BYTES: usize = 64 * 1024 * 1024;

/// Buffers of landed writes, and the bytes they hold.
static POOL: Mutex<(Vec<AlignedBuf>, usize)> = Mutex::new((Vec::new(), 0));

/// A buffer for the next writes: an empty one from the pool (the largest), or a new one.
pub(crate) fn spare() -> AlignedBuf {
    let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
    match pool.0.pop() {
        Some(buf) => {
            pool.1 -= buf.capacity();
            buf
        }
        None => AlignedBuf::new(),
    }
}

/// Keeps `buf` for reuse if the pool has room.
fn recycle(mut buf: AlignedBuf) {
    buf.clear();
    let mut pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
    if buf.capacity() > 0 && pool.1 + buf.capacity() <= POOL_BYTES {
        pool.1 += buf.capacity();
        pool.0.push(buf);
        // The largest last, taken first.
        pool.0.sort_by_key(|b| b.capacity());
    }
}

/// One file's direct writes in flight.
#[derive(Debug, Default)]
pub(crate) struct Flight {
    state: Mutex<State>,
    landed: Condvar,
    /// The kernel refused a direct write of this file (`EINVAL`, `EOPNOTSUPP`): its file
    /// system takes them at open but not at write. That write was made buffered instead.
    /// Read before every write (see `DirectFile::alignment`), so kept out of the lock.
    refused: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    /// (offset, length) of each write in flight.
    ranges: Vec<(u64, u64)>,
    /// Bytes in flight.
    bytes: usize,
    /// The first error of a write that ended since the caller last heard of one.
    error: Option<io::Error>,
}

impl State {
    fn overlaps(&self, offset: u64, len: u64) -> bool {
        self.ranges
            .iter()
            .any(|&(at, n)| at < offset + len && offset < at + n)
    }
}

struct Job {
    direct: Arc<File>,
    buffered: Arc<File>,
    buf: AlignedBuf,
    offset: u64,
    flight: Arc<Flight>,
}

/// Whether `e` is the kernel refusing how a write was issued rather than failing it.
fn is_refusal(e: &io::Error) -> bool {
    use rustix::io::Errno;
    [Errno::INVAL, Errno::OPNOTSUPP, Errno::NOTSUP]
        .iter()
        .any(|r| e.raw_os_error() == Some(r.raw_os_error()))
}

impl Job {
    fn run(self) {
        let Job {
            direct,
            buffered,
            buf,
            offset,
            flight,
        } = self;
        let mut result = direct.write_all_at(buf.as_slice(), offset);
        let refused = result.as_ref().is_err_and(is_refusal);
        if refused {
            result = buffered.write_all_at(buf.as_slice(), offset);
        }
        flight.landed(offset, buf, result, refused);
    }
}

/// The writer threads' queue; `None` if no thread could be started (writes are then made by
/// the caller, one at a time).
fn writers() -> Option<&'static mpsc::Sender<Job>> {
    static WRITERS_QUEUE: OnceLock<Option<mpsc::Sender<Job>>> = OnceLock::new();
    WRITERS_QUEUE
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Job>();
            let rx = Arc::new(Mutex::new(rx));
            let mut started = 0;
            for i in 0..WRITERS {
                let rx = rx.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("dio-writer-{i}"))
                    .spawn(move || loop {
                        // The lock is held only to take a job, not while writing it.
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job.run(),
                            Err(_) => return,
                        }
                    });
                started += usize::from(spawned.is_ok());
            }
            (started > 0).then_some(tx)
        })
        .as_ref()
}

impl Flight {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A writer thread never panics while holding the lock; if one did, the state (ranges
        // and counts) is still consistent, so carry on with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands `buf` to a writer thread, to be written direct at `offset` (buffered if the
    /// kernel refuses). Waits first for room, and for writes in flight over the same range.
    /// Returns an error of an earlier write, if one ended since the caller last heard.
    pub(crate) fn submit(
        self: &Arc<Self>,
        direct: &Arc<File>,
        buffered: &Arc<File>,
        buf: AlignedBuf,
        offset: u64,
    ) -> io::Result<()> {
        let len = buf.len();
        {
            let mut state = self
                .landed
                .wait_while(self.lock(), |s| {
                    s.error.is_none()
                        && (s.overlaps(offset, len as u64)
                            || (s.bytes > 0 && s.bytes + len > MAX_IN_FLIGHT_BYTES))
                })
                .unwrap_or_else(|p| p.into_inner());
            if let Some(e) = state.error.take() {
                return Err(e);
            }
            state.ranges.push((offset, len as u64));
            state.bytes += len;
        }
        let job = Job {
            direct: direct.clone(),
            buffered: buffered.clone(),
            buf,
            offset,
            flight: self.clone(),
        };
        match writers() {
            Some(queue) => {
                if let Err(mpsc::SendError(job)) = queue.send(job) {
                    job.run();
                }
            }
            None => job.run(),
        }
        Ok(())
    }

    fn landed(&self, offset: u64, buf: AlignedBuf, result: io::Result<()>, refused: bool) {
        let len = buf.len();
        recycle(buf);
        let mut state = self.lock();
        if let Some(i) = state.ranges.iter().position(|&r| r == (offset, len as u64)) {
            state.ranges.swap_remove(i);
        }
        state.bytes -= len.min(state.bytes);
        if refused {
            self.refused.store(true, Ordering::Relaxed);
        }
        if let Err(e) = result {
            state.error.get_or_insert(e);
        }
        drop(state);
        self.landed.notify_all();
    }

    /// Waits until no write in flight covers any of `offset..offset + len`.
    pub(crate) fn wait_for_range(&self, offset: u64, len: u64) {
        let _state = self
            .landed
            .wait_while(self.lock(), |s| s.overlaps(offset, len))
            .unwrap_or_else(|p| p.into_inner());
    }

    /// Waits until every write in flight has landed; returns the first error among those
    /// the caller has not heard of.
    pub(crate) fn wait(&self) -> io::Result<()> {
        let mut state = self
            .landed
            .wait_while(self.lock(), |s| !s.ranges.is_empty())
            .unwrap_or_else(|p| p.into_inner());
        match state.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Whether the kernel refused a direct write of this file.
    pub(crate) fn refused(&self) -> bool {
        self.refused.load(Ordering::Relaxed)
    }
}
