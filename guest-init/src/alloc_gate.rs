//! The agent's allocator, with a gate for cloning.
//!
//! youki's `libcontainer` starts container processes with the raw `clone3`
//! system call from the agent, which has many threads. A raw clone runs none of
//! glibc's fork handlers: if another thread is inside `malloc` at that instant,
//! the child inherits the allocator's lock held by a thread that does not exist in
//! it, and the child's first allocation waits forever (and with it the ExecSync or
//! CreateContainer that started it). The 10,000-ExecSync probe run hit that once in
//! 7,389 calls.
//!
//! [`GatedAlloc`] wraps the system allocator: every allocation holds a shared gate,
//! and [`exclusive`] holds it alone around the code that clones, so no other thread
//! is inside the allocator when the clone happens. The thread holding the gate
//! (and every process cloned from it, which inherits its thread-local flag and is
//! single-threaded) allocates without touching it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::RwLock;

/// The gate: shared by allocations, held alone around a clone.
static GATE: RwLock<()> = RwLock::new(());

thread_local! {
    /// This thread holds the gate alone (or is a process cloned under it).
    static HOLDER: Cell<bool> = const { Cell::new(false) };
}

/// The system allocator behind the clone gate.
#[derive(Debug)]
pub struct GatedAlloc;

fn is_holder() -> bool {
    // A thread being torn down has no thread-locals left: it is not the holder.
    HOLDER.try_with(Cell::get).unwrap_or(false)
}

/// Runs `f` while `GATE` is shared (for one call into the system allocator).
fn shared<T>(f: impl FnOnce() -> T) -> T {
    if is_holder() {
        return f();
    }
    let _g = GATE
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    f()
}

// SAFETY: every method forwards to `System` with the same arguments, which upholds
// GlobalAlloc's contract; the gate only orders calls between threads. The lock
// used (std's futex-based RwLock) does not allocate.
unsafe impl GlobalAlloc for GatedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is; the caller upholds `alloc`'s contract.
        shared(|| unsafe { System.alloc(layout) })
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is; `ptr` came from `System` through `alloc`.
        shared(|| unsafe { System.dealloc(ptr, layout) });
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        shared(|| unsafe { System.alloc_zeroed(layout) })
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is; `ptr` came from `System` with `layout`.
        shared(|| unsafe { System.realloc(ptr, layout, new_size) })
    }
}

/// Runs `f` (which clones processes) with the gate held alone: no other thread of
/// the process is inside the allocator meanwhile, so a clone made in `f` starts
/// with the allocator free. Other threads wait at their next allocation.
pub fn exclusive<T>(f: impl FnOnce() -> T) -> T {
    if is_holder() {
        return f();
    }
    let guard = GATE
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    HOLDER.with(|h| h.set(true));
    /// Clears the flag and opens the gate even if `f` panics.
    struct Release<'a>(#[allow(dead_code)] std::sync::RwLockWriteGuard<'a, ()>);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            HOLDER.with(|h| h.set(false));
        }
    }
    let _release = Release(guard);
    f()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// Children cloned (raw, as libcontainer does) inside `exclusive` while other
    /// threads allocate all the time can always allocate and exit.
    #[test]
    fn processes_cloned_under_the_gate_can_allocate_while_other_threads_do() {
        let stop = Arc::new(AtomicBool::new(false));
        let busy: Vec<_> = (0..4)
            .map(|_| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut keep = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        keep.push(vec![0u8; 4096]);
                        if keep.len() > 64 {
                            keep.clear();
                        }
                    }
                })
            })
            .collect();
        for _ in 0..200 {
            let pid = exclusive(|| {
                // SAFETY: a raw clone with only SIGCHLD (a fork without glibc's
                // handlers, as libcontainer's clone3). The child allocates, then
                // leaves with _exit, touching nothing else of the parent.
                let pid = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) };
                if pid == 0 {
                    let v: Vec<u64> = (0..10_000).collect();
                    let code = i32::from(v.len() != 10_000);
                    // SAFETY: ends the child at once.
                    unsafe { libc::_exit(code) };
                }
                pid as libc::pid_t
            });
            assert!(pid > 0, "clone failed");
            let start = Instant::now();
            loop {
                let mut status = 0;
                // SAFETY: waits for our own child, without blocking.
                let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
                if r == pid {
                    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "a child cloned under the gate hung in the allocator"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        stop.store(true, Ordering::Relaxed);
        for b in busy {
            b.join().unwrap();
        }
    }
}
