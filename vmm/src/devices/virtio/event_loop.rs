//! The device event loop: one thread per VM waiting on every activated device's
//! fds (queue notifications, backends) and calling the device that owns each.
//!
//! Transports add and remove watches directly on the shared epoll instance (epoll_ctl
//! is thread-safe); the epoll data carries `device index << 32 | source`.

use std::sync::{Arc, Mutex};

use vmm_sys_util::epoll::{Epoll, EpollEvent};

use super::VirtioDevice;

/// The loop and the devices it serves.
pub struct EventLoop {
    epoll: Arc<Epoll>,
    devices: Vec<Arc<Mutex<dyn VirtioDevice>>>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("devices", &self.devices.len())
            .finish()
    }
}

impl EventLoop {
    /// A loop over `devices` (index = position) watching `epoll`.
    pub fn new(epoll: Arc<Epoll>, devices: Vec<Arc<Mutex<dyn VirtioDevice>>>) -> Self {
        Self { epoll, devices }
    }

    /// Waits for and dispatches one batch of events (`timeout_ms` -1 = forever).
    /// Returns how many events were dispatched.
    pub fn run_once(&self, timeout_ms: i32) -> std::io::Result<usize> {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(timeout_ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(0),
            Err(e) => return Err(e),
        };
        for ev in &events[..n] {
            let data = ev.data();
            let index = (data >> 32) as usize;
            let source = data as u32;
            if let Some(dev) = self.devices.get(index) {
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .process_event(source, ev.event_set());
            }
        }
        Ok(n)
    }

    /// Serves events until an epoll error.
    pub fn run(self) {
        loop {
            if let Err(e) = self.run_once(-1) {
                tracing::error!("device event loop stopped: {e}");
                return;
            }
        }
    }
}
