//! The device event loop: one thread per VM waiting on every activated device's
//! fds (queue notifications, backends) and calling the device that owns each.
//!
//! Transports add and remove watches directly on the shared epoll instance (epoll_ctl
//! is thread-safe); the epoll data carries `device index << 32 | source`. The VMM
//! drives the thread through an [`EventLoopHandle`]: pause (no device runs until
//! resume, so a snapshot sees still devices), resume, exit. An epoll failure ends the
//! VM through the event sink instead of silently leaving the devices dead.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::VirtioDevice;
use crate::devices::legacy::EventSink;
use crate::vstate::VmEvent;

/// Epoll data of the loop's own control eventfd (no device has this index).
const CONTROL: u64 = u64::MAX;
/// How long pause and resume may take to be acknowledged.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// What the VMM asks of the loop.
#[derive(Debug)]
enum Command {
    Pause,
    Resume,
    Exit,
}

/// The loop and the devices it serves.
pub struct EventLoop {
    epoll: Arc<Epoll>,
    devices: Vec<Arc<Mutex<dyn VirtioDevice>>>,
    control: EventFd,
    commands: Receiver<Command>,
    acks: Sender<()>,
    sink: Arc<EventSink>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("devices", &self.devices.len())
            .finish()
    }
}

/// Why the loop did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// Creating its control eventfd or thread.
    #[error("cannot start the device event loop")]
    Start(#[source] std::io::Error),
    /// The thread is gone.
    #[error("the device event loop has stopped")]
    Gone,
    /// No answer in time.
    #[error("the device event loop did not answer within {0:?}")]
    Timeout(Duration),
}

/// The VMM's side of the loop's thread.
#[derive(Debug)]
pub struct EventLoopHandle {
    thread: Option<JoinHandle<()>>,
    control: EventFd,
    commands: Sender<Command>,
    acks: Receiver<()>,
}

/// What one wait ended with.
enum Wake {
    /// Dispatched device events (or none: interrupted).
    Events,
    /// A command is waiting.
    Command,
}

impl EventLoop {
    /// A loop over `devices` (index = position) watching `epoll`, reporting a failure
    /// of its own to `sink`; and its handle.
    pub fn new(
        epoll: Arc<Epoll>,
        devices: Vec<Arc<Mutex<dyn VirtioDevice>>>,
        sink: Arc<EventSink>,
    ) -> std::io::Result<(Self, EventLoopHandle)> {
        let control = EventFd::new(libc::EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            std::os::unix::io::AsRawFd::as_raw_fd(&control),
            EpollEvent::new(EventSet::IN, CONTROL),
        )?;
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (ack_tx, ack_rx) = mpsc::channel();
        let handle = EventLoopHandle {
            thread: None,
            control: control.try_clone()?,
            commands: cmd_tx,
            acks: ack_rx,
        };
        Ok((
            Self {
                epoll,
                devices,
                control,
                commands: cmd_rx,
                acks: ack_tx,
                sink,
            },
            handle,
        ))
    }

    /// Waits for and dispatches one batch of events (`timeout_ms` -1 = forever).
    fn run_once(&self, timeout_ms: i32) -> std::io::Result<Wake> {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(timeout_ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(Wake::Events),
            Err(e) => return Err(e),
        };
        let mut command = false;
        for ev in &events[..n] {
            let data = ev.data();
            if data == CONTROL {
                let _ = self.control.read();
                command = true;
                continue;
            }
            let index = (data >> 32) as usize;
            let source = data as u32;
            if let Some(dev) = self.devices.get(index) {
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .process_event(source, ev.event_set());
            }
        }
        Ok(if command { Wake::Command } else { Wake::Events })
    }

    /// Serves events until told to exit; an epoll failure ends the VM.
    pub fn run(self) {
        loop {
            match self.run_once(-1) {
                Ok(Wake::Events) => {}
                Ok(Wake::Command) => {
                    if !self.serve_commands() {
                        return;
                    }
                }
                Err(e) => {
                    self.sink.send(VmEvent::VcpuError(format!(
                        "the device event loop failed ({e}): the VM's devices cannot run"
                    )));
                    return;
                }
            }
        }
    }

    /// Serves waiting commands (blocking while paused); false on exit.
    fn serve_commands(&self) -> bool {
        let mut paused = false;
        loop {
            let cmd = if paused {
                self.commands.recv().ok()
            } else {
                match self.commands.try_recv() {
                    Ok(c) => Some(c),
                    Err(mpsc::TryRecvError::Empty) => return true,
                    Err(mpsc::TryRecvError::Disconnected) => None,
                }
            };
            match cmd {
                None | Some(Command::Exit) => return false,
                Some(Command::Pause) => paused = true,
                Some(Command::Resume) => paused = false,
            }
            let _ = self.acks.send(());
        }
    }

    /// Starts the loop on its own thread; the handle drives it from then on.
    pub fn spawn(self, mut handle: EventLoopHandle) -> Result<EventLoopHandle, EventLoopError> {
        let t = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::Thread::Devices);
                self.run()
            })
            .map_err(EventLoopError::Start)?;
        handle.thread = Some(t);
        Ok(handle)
    }
}

impl EventLoopHandle {
    fn command(&self, cmd: Command) -> Result<(), EventLoopError> {
        self.commands.send(cmd).map_err(|_| EventLoopError::Gone)?;
        let _ = self.control.write(1);
        match self.acks.recv_timeout(COMMAND_TIMEOUT) {
            Ok(()) => Ok(()),
            Err(RecvTimeoutError::Timeout) => Err(EventLoopError::Timeout(COMMAND_TIMEOUT)),
            Err(RecvTimeoutError::Disconnected) => Err(EventLoopError::Gone),
        }
    }

    /// Stops every device between two events; returns once they are still.
    pub fn pause(&self) -> Result<(), EventLoopError> {
        self.command(Command::Pause)
    }

    /// Lets the devices run again.
    pub fn resume(&self) -> Result<(), EventLoopError> {
        self.command(Command::Resume)
    }

    /// Ends the thread and waits for it.
    pub fn exit(&mut self) {
        let _ = self.commands.send(Command::Exit);
        let _ = self.control.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for EventLoopHandle {
    fn drop(&mut self) {
        self.exit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::AsRawFd;
    use std::sync::mpsc::channel;

    fn sink() -> (Arc<EventSink>, Receiver<crate::vstate::VmMessage>) {
        let (tx, rx) = channel();
        (Arc::new(EventSink::new(tx)), rx)
    }

    #[test]
    fn event_loop_epoll_failure_ends_the_vm_instead_of_dying_quietly() {
        let epoll = Arc::new(Epoll::new().unwrap());
        let (sink, rx) = sink();
        let (el, handle) = EventLoop::new(epoll.clone(), vec![], sink).unwrap();
        // Turn the epoll fd into something epoll_wait refuses (EINVAL).
        let null = std::fs::File::open("/dev/null").unwrap();
        // SAFETY: both fds are open; dup2 replaces the epoll fd number with /dev/null.
        assert!(unsafe { libc::dup2(null.as_raw_fd(), epoll.as_raw_fd()) } >= 0);
        let handle = el.spawn(handle).unwrap();
        let msg = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the VM is told");
        let crate::vstate::VmMessage::Vm(VmEvent::VcpuError(why)) = msg else {
            panic!("unexpected {msg:?}");
        };
        assert!(why.contains("device event loop failed"), "{why}");
        assert!(matches!(handle.pause(), Err(EventLoopError::Gone)));
    }

    #[test]
    fn event_loop_pause_holds_devices_until_resume_and_exit_joins() {
        let epoll = Arc::new(Epoll::new().unwrap());
        let (sink, _rx) = sink();
        let (el, handle) = EventLoop::new(epoll, vec![], sink).unwrap();
        let mut handle = el.spawn(handle).unwrap();
        handle.pause().unwrap();
        handle.pause().unwrap();
        handle.resume().unwrap();
        handle.exit();
        assert!(matches!(handle.pause(), Err(EventLoopError::Gone)));
    }
}
