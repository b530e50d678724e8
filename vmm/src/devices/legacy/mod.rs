//! Legacy PC devices: the 16550 UART console, the i8042 (for reset only) and
//! Atoll's debug ports (guest exit status and boot stages).

pub mod debug_port;
pub mod i8042;
pub mod serial;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Mutex;

use crate::vstate::{VmEvent, VmMessage};

/// Sends a [`VmEvent`] to the VMM's main thread; what the reset line of the i8042
/// and the exit port pull. Every event ends the VM, so sending one also raises the
/// `stopping` flag that the vCPU loops check after each exit: the guest does not run
/// on after it reported its status.
#[derive(Debug)]
pub struct EventSink {
    tx: Mutex<Sender<VmMessage>>,
    stopping: AtomicBool,
}

impl EventSink {
    /// Wraps a sender.
    pub fn new(tx: Sender<VmMessage>) -> Self {
        Self {
            tx: Mutex::new(tx),
            stopping: AtomicBool::new(false),
        }
    }

    /// Sends; a VMM that is already going away has dropped the receiver, which is
    /// fine.
    pub fn send(&self, ev: VmEvent) {
        self.stopping.store(true, Ordering::SeqCst);
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let _ = tx.send(VmMessage::Vm(ev));
    }

    /// Raises the `stopping` flag without an event (the VMM is tearing down).
    pub fn mark_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// True once any event was sent: the VM is ending.
    pub fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}
