//! Atoll's debug ports (docs/guest-contract.md): port 0xf4 takes the guest's exit
//! status (compatible with QEMU's isa-debug-exit), port 0x440 takes boot stage
//! numbers that the VMM timestamps.

use std::sync::Arc;

use super::EventSink;
use crate::devices::bus::BusDevice;
use crate::metrics::VmMetrics;
use crate::vstate::VmEvent;

/// The exit status port.
pub const EXIT_PORT: u16 = 0xf4;
/// The boot stage port.
pub const STAGE_PORT: u16 = 0x440;

/// Guest writes its exit status here.
#[derive(Debug)]
pub struct ExitPort {
    sink: Arc<EventSink>,
}

impl ExitPort {
    /// A port that reports to `sink`.
    pub fn new(sink: Arc<EventSink>) -> Self {
        Self { sink }
    }
}

impl BusDevice for ExitPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Only a byte write at the port itself counts; anything else is ignored.
        if let (0, [status]) = (offset, data) {
            self.sink.send(VmEvent::Exit(*status));
        }
    }
}

/// Guest writes boot stage numbers here.
#[derive(Debug)]
pub struct StagePort {
    metrics: Arc<VmMetrics>,
}

impl StagePort {
    /// A port that records into `metrics`.
    pub fn new(metrics: Arc<VmMetrics>) -> Self {
        Self { metrics }
    }
}

impl BusDevice for StagePort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (0, [stage]) = (offset, data) {
            self.metrics.record_stage(*stage);
            if *stage == 3 {
                crate::seccomp::trip();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::time::Instant;

    #[test]
    fn exit_port_reports_byte_writes_only() {
        let (tx, rx) = channel();
        let sink = Arc::new(EventSink::new(tx));
        let mut p = ExitPort::new(sink.clone());
        p.write(0, &[7, 0]);
        p.write(1, &[7]);
        assert!(rx.try_recv().is_err());
        assert!(!sink.stopping());
        p.write(0, &[7]);
        assert!(matches!(
            rx.try_recv(),
            Ok(crate::vstate::VmMessage::Vm(VmEvent::Exit(7)))
        ));
        assert!(
            sink.stopping(),
            "vCPUs stop running the guest once it reported"
        );
    }

    #[test]
    fn stage_port_timestamps_known_stages() {
        let m = Arc::new(VmMetrics::new(Instant::now()));
        let mut p = StagePort::new(m.clone());
        p.write(0, &[2]);
        p.write(0, &[200]);
        let snap = m.snapshot();
        assert!(snap.stages_us.contains_key("ready"));
        assert_eq!(
            snap.stages_us.len(),
            1,
            "unknown stage numbers are counted, not stored"
        );
        assert_eq!(snap.bad_stage_writes, 1);
    }
}
