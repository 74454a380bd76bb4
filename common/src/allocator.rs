//! Allocator settings for processes on the data path.
//!
//! Batch-sized buffers (tonic's encode and decode buffers, reads of the source disk) are
//! allocated and freed thousands of times a second. With glibc's adaptive defaults, memory
//! freed at the top of a thread's arena is handed back to the kernel once it exceeds the trim
//! threshold, and the next batch faults it in again page by page, zeroed: during an initial
//! sync about 12% of each component's CPU went to those page faults. Fixed thresholds keep
//! freed memory in the arena for the next batch; what is kept is bounded by what was in use
//! at the peak.
//!
//! The trim threshold alone is not enough: a thread's arena is a chain of 64 MiB heaps, and
//! glibc unmaps a heap once nothing in it is in use, whatever the threshold (unless that
//! would leave the arena less free room than the top pad). Batch buffers of a few MiB empty
//! a heap often, so every sync touched fresh memory again: 30,000 to 60,000 page faults per
//! GiB replicated in the master target, half as many in the process server. On a VM whose
//! host backs guest memory lazily and takes back what the guest frees, touching such memory
//! costs several times the copy it is for. The top pad makes an arena keep that much free
//! memory at its top instead, heaps included.

/// Largest allocation served from an arena; larger ones are mapped and unmapped each time.
/// Batches are at most a few MiB, so they stay below it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;
/// Free memory an arena keeps at its top before returning it to the kernel.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 32 << 20;
/// Free memory an arena keeps at its top when it trims, and the least it grows by.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TOP_PAD: libc::c_int = 64 << 20;

/// Applies the settings; call before the first thread starts. Does nothing where the C
/// library is not glibc.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's parameters; it is called before any other
    // thread exists, and returns 0 (ignored: the defaults stay) if a value is refused.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        libc::mallopt(libc::M_TOP_PAD, TOP_PAD);
    }
}
