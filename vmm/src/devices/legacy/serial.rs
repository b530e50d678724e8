//! The console UART: vm-superio's 16550 model on a bus, its interrupt raised through
//! an eventfd that KVM injects (irqfd), output to any writer, input fed from the host.

use std::io::{self, Write};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

/// An interrupt line backed by an eventfd registered as a KVM irqfd.
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// The UART's guest-visible state: DLL, DLH, IER, IIR, LCR, LSR, MCR, MSR, SCR,
/// and the input the guest has not read yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// The registers, in the order above.
    pub registers: [u8; 9],
    /// Pending input.
    pub input: Vec<u8>,
}

/// The UART as a bus device.
pub struct SerialDevice {
    inner: Serial<IrqLine, NoEvents, Box<dyn Write + Send>>,
    write_errors: u64,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART that raises `irq` and writes what the guest sends to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            inner: Serial::new(IrqLine(irq), out),
            write_errors: 0,
        }
    }

    /// A UART that continues from a snapshot's register state.
    pub fn from_state(
        state: &SerialSnapshot,
        irq: EventFd,
        out: Box<dyn Write + Send>,
    ) -> io::Result<Self> {
        let [dll, dlh, ier, iir, lcr, lsr, mcr, msr, scr] = state.registers;
        let s = SerialState {
            baud_divisor_low: dll,
            baud_divisor_high: dlh,
            interrupt_enable: ier,
            interrupt_identification: iir,
            line_control: lcr,
            line_status: lsr,
            modem_control: mcr,
            modem_status: msr,
            scratch: scr,
            in_buffer: state.input.clone(),
        };
        let inner = Serial::from_state(&s, IrqLine(irq), NoEvents, out)
            .map_err(|e| io::Error::other(format!("bad serial state: {e:?}")))?;
        Ok(Self {
            inner,
            write_errors: 0,
        })
    }

    /// The registers and pending input, for a snapshot.
    pub fn save_state(&self) -> SerialSnapshot {
        let s = self.inner.state();
        SerialSnapshot {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            input: s.in_buffer,
        }
    }

    /// Queues host input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.inner.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Free room in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.inner.fifo_capacity()
    }

    /// Flushes the output.
    pub fn flush(&mut self) {
        let _ = self.inner.writer_mut().flush();
    }

    /// Writes that the host side could not complete (a closed stdout, say).
    pub fn write_errors(&self) -> u64 {
        self.write_errors
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // 8 one-byte registers; wider or out-of-range reads see nothing.
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) if off < 8 => data[0] = self.inner.read(off),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            if off < 8 && self.inner.write(off, *value).is_err() {
                self.write_errors += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const THR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;

    fn device() -> (SerialDevice, Shared, EventFd) {
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        (dev, out, irq)
    }

    #[test]
    fn serial_thr_writes_reach_the_host_writer() {
        let (mut dev, out, _) = device();
        for b in b"hi\n" {
            dev.write(THR, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn serial_lsr_reports_transmitter_empty_and_data_ready() {
        let (mut dev, _, irq) = device();
        let mut lsr = [0u8];
        dev.read(LSR, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60, "THR and transmitter empty");
        assert_eq!(lsr[0] & 1, 0, "no data yet");
        // Enable the received-data interrupt, then feed input.
        dev.write(IER, &[0x1]);
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        assert_eq!(irq.read().unwrap(), 1, "input raised the IRQ");
        dev.read(LSR, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut rbr = [0u8];
        dev.read(0, &mut rbr);
        assert_eq!(rbr[0], b'a');
    }

    #[test]
    fn serial_state_round_trips_registers_and_pending_input() {
        let (mut dev, _, _) = device();
        dev.write(IER, &[0x1]);
        dev.write(7, &[0x5a]);
        dev.enqueue_input(b"q");
        let saved = dev.save_state();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut back = SerialDevice::from_state(&saved, irq, Box::new(Shared::default())).unwrap();
        let (mut ier, mut scr, mut rbr) = ([0u8], [0u8], [0u8]);
        back.read(IER, &mut ier);
        back.read(7, &mut scr);
        back.read(0, &mut rbr);
        assert_eq!((ier[0], scr[0], rbr[0]), (0x1, 0x5a, b'q'));
        assert_eq!(back.save_state().input, b"");
    }

    #[test]
    fn serial_ignores_wide_and_out_of_range_accesses() {
        let (mut dev, out, _) = device();
        dev.write(THR, b"xy");
        dev.write(8, b"z");
        dev.write(u64::MAX, b"z");
        let mut wide = [0xffu8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0; 4]);
        assert!(out.0.lock().unwrap().is_empty());
    }
}
