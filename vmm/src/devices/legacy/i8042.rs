//! The i8042 keyboard controller, only so that `reboot=k` (command 0xfe on port 0x64)
//! resets the VM. vm-superio models it; we put it on the port bus.

use vm_superio::{I8042Device, Trigger};

use super::EventSink;
use crate::devices::bus::BusDevice;
use crate::vstate::VmEvent;

/// Pulls the VM's reset line.
#[derive(Debug)]
pub struct ResetLine(pub std::sync::Arc<EventSink>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.send(VmEvent::Reset(
            "the guest reset the i8042 controller (reboot)",
        ));
        Ok(())
    }
}

/// The controller on ports 0x60..=0x64 (offset 0 data, offset 4 command/status).
pub struct I8042(I8042Device<ResetLine>);

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("I8042")
    }
}

impl I8042 {
    /// A controller whose reset command sends [`VmEvent::Reset`].
    pub fn new(sink: std::sync::Arc<EventSink>) -> Self {
        Self(I8042Device::new(ResetLine(sink)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) => data[0] = self.0.read(off),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [v]) = (u8::try_from(offset), data) {
            let _ = self.0.write(off, *v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::sync::Arc;

    #[test]
    fn i8042_reset_command_resets_the_vm() {
        let (tx, rx) = channel();
        let mut dev = I8042::new(Arc::new(EventSink::new(tx)));
        dev.write(0, &[0xfe]);
        assert!(
            rx.try_recv().is_err(),
            "0xfe on the data port is not a reset"
        );
        dev.write(4, &[0xfe]);
        assert!(matches!(
            rx.try_recv(),
            Ok(crate::vstate::VmMessage::Vm(VmEvent::Reset(_)))
        ));
        let mut status = [0xffu8];
        dev.read(4, &mut status);
        assert_eq!(
            status[0] & 0x2,
            0,
            "input buffer empty, so reboot=k proceeds"
        );
    }
}
