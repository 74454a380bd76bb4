//! Where replication work runs on the protected machine: shipping (sealing batches, TLS to the
//! process server), the initial sync, resyncs and scans get their own threads at a lower CPU
//! priority (nice 10 by default, `--replication-nice`), while the NBD write path stays at the
//! workload's priority. On a busy machine the workload's writes come first and replication
//! takes the CPU they leave: a burst then shows up as a growing RPO and backlog (absorbed by
//! the capture queue and its spill file) instead of slower writes. CFS never starves a nice
//! thread outright, and once the backlog reaches the flow-control mark the workload's writes
//! wait, which hands the CPU to replication. Some replication steps hold the capture lock
//! briefly (an initial-sync or resync read of at most 8 MiB, taking items and reading spilled
//! ones back); on a saturated CPU a workload write can wait behind them a little longer than
//! at equal priority. Hooks started from these threads (scan freeze/thaw) inherit the nice
//! value.
use std::future::Future;
use std::sync::OnceLock;
use tokio::runtime::{Builder, Runtime};

/// Nice value of replication threads unless configured.
pub const DEFAULT_NICE: i32 = 10;

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static NICE: OnceLock<i32> = OnceLock::new();

/// Sets the nice value of replication threads (0: the workload's priority). Only the first
/// call counts; call it before the first disk starts.
pub fn configure(nice: i32) {
    let _ = NICE.set(nice.clamp(0, 19));
}

fn lower_this_thread(nice: i32) {
    if nice == 0 {
        return;
    }
    // SAFETY: gettid and setpriority only take integers. On Linux PRIO_PROCESS with a thread
    // id changes that thread alone; threads it starts inherit the value.
    let result = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
    };
    if result != 0 {
        tracing::debug!(
            "cannot lower the priority of a replication thread: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn runtime() -> &'static Runtime {
    RUNTIME.get_or_init(|| {
        let nice = *NICE.get_or_init(|| DEFAULT_NICE);
        Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("lifeboat-replication")
            .on_thread_start(move || lower_this_thread(nice))
            .enable_all()
            .build()
            .expect("the replication runtime starts")
    })
}

/// Runs `future` on the replication threads. Tasks and blocking work it starts, and the
/// connections it opens, stay there.
pub fn spawn<F>(future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    runtime().spawn(future)
}
