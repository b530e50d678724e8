//! Legacy PC devices: the 16550 UART console, the i8042 (for reset only) and
//! Atoll's debug ports (guest exit status and boot stages).

pub mod debug_port;
pub mod i8042;
pub mod serial;

use std::sync::mpsc::Sender;
use std::sync::Mutex;

use crate::vstate::VmEvent;

/// Sends a [`VmEvent`] to the VMM's main thread; what the reset line of the i8042
/// and the exit port pull.
#[derive(Debug)]
pub struct EventSink(Mutex<Sender<VmEvent>>);

impl EventSink {
    /// Wraps a sender.
    pub fn new(tx: Sender<VmEvent>) -> Self {
        Self(Mutex::new(tx))
    }

    /// Sends; a VMM that is already going away has dropped the receiver, which is
    /// fine.
    pub fn send(&self, ev: VmEvent) {
        let tx = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = tx.send(ev);
    }
}
