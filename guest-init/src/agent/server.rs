//! The vsock listeners: one accept thread per port, one thread per connection, at
//! most [`MAX_CONNECTIONS`] connections at once (one more is closed right away).
//!
//! An accepted vsock socket is wrapped in a `UnixStream`: every method the agent uses
//! on it (read, write, shutdown, try_clone) is a plain socket call that does not care
//! about the address family, and the handlers stay testable over `UnixStream::pair`.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// Most control + stream connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

/// A listening `AF_VSOCK` stream socket.
#[derive(Debug)]
pub struct VsockListener {
    fd: OwnedFd,
    port: u32,
}

impl VsockListener {
    /// Listens on `port` of any CID (`VMADDR_CID_ANY`).
    pub fn bind(port: u32) -> io::Result<Self> {
        // SAFETY: socket has no memory arguments.
        let raw =
            unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_vm is plain old data; all zeros is valid before filling.
        let mut addr: libc::sockaddr_vm = unsafe { mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        let len = libc::socklen_t::try_from(mem::size_of::<libc::sockaddr_vm>())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes for the call.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                len,
            )
        };
        if rc == -1 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: listen has no memory arguments.
        if unsafe { libc::listen(fd.as_raw_fd(), 128) } == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd, port })
    }

    /// The port it listens on.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Waits for one connection.
    pub fn accept(&self) -> io::Result<UnixStream> {
        loop {
            // SAFETY: null address pointers are allowed: the peer address is not wanted.
            let raw = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if raw >= 0 {
                // SAFETY: a new connected socket that nothing else owns.
                return Ok(UnixStream::from(unsafe { OwnedFd::from_raw_fd(raw) }));
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

/// Counts live connections; a [`Slot`] gives its place back when dropped.
#[derive(Debug, Default)]
pub struct ConnectionLimit {
    live: AtomicUsize,
}

/// One taken connection place.
#[derive(Debug)]
pub struct Slot(Arc<ConnectionLimit>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnectionLimit {
    /// Connections being served now.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// A place, or `None` when [`MAX_CONNECTIONS`] are live.
    pub fn try_take(self: &Arc<Self>) -> Option<Slot> {
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_CONNECTIONS).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(Arc::clone(self)))
    }
}

/// Accepts on `listener` forever, serving each connection on its own thread with
/// `serve`. Returns only if the thread cannot be started.
pub fn spawn_acceptor<F>(
    listener: VsockListener,
    limit: Arc<ConnectionLimit>,
    serve: F,
) -> io::Result<thread::JoinHandle<()>>
where
    F: Fn(UnixStream) + Send + Sync + 'static,
{
    let serve = Arc::new(serve);
    thread::Builder::new()
        .name(format!("accept-{}", listener.port()))
        .spawn(move || loop {
            let conn = match listener.accept() {
                Ok(conn) => conn,
                Err(err) => {
                    eprintln!(
                        "atoll-init agent: accept on vsock port {}: {err}",
                        listener.port()
                    );
                    // EMFILE and the like: do not spin.
                    thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            let Some(slot) = limit.try_take() else {
                // Over the limit: closing is the refusal.
                drop(conn);
                continue;
            };
            let serve = Arc::clone(&serve);
            let spawned = thread::Builder::new()
                .name(format!("conn-{}", listener.port()))
                .spawn(move || {
                    let _slot = slot;
                    serve(conn);
                });
            if let Err(err) = spawned {
                eprintln!("atoll-init agent: cannot start a connection thread: {err}");
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limit_refuses_the_65th_and_frees_on_drop() {
        let limit = Arc::new(ConnectionLimit::default());
        let slots: Vec<Slot> = (0..MAX_CONNECTIONS)
            .map(|_| limit.try_take().unwrap())
            .collect();
        assert!(limit.try_take().is_none());
        drop(slots);
        assert!(limit.try_take().is_some());
    }
}
