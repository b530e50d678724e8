//! Counters the VMM keeps about one VM: VM exits by reason and by port, boot stage
//! timestamps reported by the guest, and the VMM's peak resident memory. Written as
//! JSON with `--metrics FILE`; the boot benchmark reads them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

/// Why a vCPU left `KVM_RUN`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// Port read.
    IoIn,
    /// Port write.
    IoOut,
    /// MMIO read.
    MmioRead,
    /// MMIO write.
    MmioWrite,
    /// HLT reached userspace.
    Hlt,
    /// Triple fault.
    Shutdown,
    /// KVM system event (reset, shutdown).
    SystemEvent,
    /// Interrupted by a signal.
    Intr,
    /// Anything else.
    Other,
}

const KINDS: [(ExitKind, &str); 9] = [
    (ExitKind::IoIn, "io_in"),
    (ExitKind::IoOut, "io_out"),
    (ExitKind::MmioRead, "mmio_read"),
    (ExitKind::MmioWrite, "mmio_write"),
    (ExitKind::Hlt, "hlt"),
    (ExitKind::Shutdown, "shutdown"),
    (ExitKind::SystemEvent, "system_event"),
    (ExitKind::Intr, "intr"),
    (ExitKind::Other, "other"),
];

const STAGES: [&str; 4] = ["", "init", "ready", "command"];

/// Most distinct MMIO pages counted one by one: the guest chooses the addresses, so
/// the map is bounded; exits beyond it are counted under [`OTHER_PAGES`].
const MAX_MMIO_PAGES: usize = 256;
/// The bucket for MMIO exits on pages beyond [`MAX_MMIO_PAGES`].
const OTHER_PAGES: u64 = u64::MAX;

/// Live counters, shared by the vCPU threads and devices.
#[derive(Debug)]
pub struct VmMetrics {
    start: Instant,
    exits: [AtomicU64; KINDS.len()],
    stages: [AtomicU64; STAGES.len()],
    bad_stage_writes: AtomicU64,
    /// µs + 1 from launch to the guest's first exit to userspace (0: none yet).
    first_exit: AtomicU64,
    ports: Mutex<BTreeMap<u16, u64>>,
    mmio_pages: Mutex<BTreeMap<u64, u64>>,
    phases: Mutex<Vec<(&'static str, u64)>>,
}

/// A point-in-time copy, as written to JSON.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Microseconds from VMM launch to each boot stage the guest reported.
    pub stages_us: BTreeMap<String, u64>,
    /// All VM exits.
    pub exits_total: u64,
    /// VM exits by reason.
    pub exits: BTreeMap<String, u64>,
    /// Microseconds from launch to the end of each VMM set-up phase, in order.
    pub vmm_phases_us: Vec<(String, u64)>,
    /// Port I/O exits by port (hex).
    pub io_ports: BTreeMap<String, u64>,
    /// MMIO exits by 4 KiB page (hex).
    pub mmio_pages: BTreeMap<String, u64>,
    /// Writes of unknown stage numbers.
    pub bad_stage_writes: u64,
    /// Microseconds from launch to the guest's first exit to userspace (the
    /// kernel's first port access: the end of its earliest boot code).
    pub first_exit_us: Option<u64>,
    /// Microseconds since launch at the time of the snapshot.
    pub wall_us: u64,
    /// Peak resident set of the VMM process (guest memory it touched included).
    pub vmm_rss_kib: u64,
}

impl VmMetrics {
    /// Counters whose clock starts at `start` (the VMM's launch).
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            exits: Default::default(),
            stages: Default::default(),
            bad_stage_writes: AtomicU64::new(0),
            first_exit: AtomicU64::new(0),
            ports: Mutex::new(BTreeMap::new()),
            mmio_pages: Mutex::new(BTreeMap::new()),
            phases: Mutex::new(Vec::new()),
        }
    }

    /// Records that VMM set-up phase `name` ended now.
    pub fn record_phase(&self, name: &'static str) {
        let us = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.phases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((name, us));
    }

    /// Counts one exit.
    pub fn count_exit(&self, kind: ExitKind) {
        if self.first_exit.load(Ordering::Relaxed) == 0 {
            let us = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX - 1) + 1;
            let _ = self
                .first_exit
                .compare_exchange(0, us, Ordering::Relaxed, Ordering::Relaxed);
        }
        if let Some(i) = KINDS.iter().position(|(k, _)| *k == kind) {
            self.exits[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts one port I/O exit at `port`.
    pub fn count_port(&self, port: u16, write: bool) {
        self.count_exit(if write {
            ExitKind::IoOut
        } else {
            ExitKind::IoIn
        });
        let mut p = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        *p.entry(port).or_insert(0) += 1;
    }

    /// Counts one MMIO exit at `addr`.
    pub fn count_mmio(&self, addr: u64, write: bool) {
        self.count_exit(if write {
            ExitKind::MmioWrite
        } else {
            ExitKind::MmioRead
        });
        let mut p = self.mmio_pages.lock().unwrap_or_else(|e| e.into_inner());
        let page = addr & !0xfff;
        let key = if p.len() < MAX_MMIO_PAGES || p.contains_key(&page) {
            page
        } else {
            OTHER_PAGES
        };
        *p.entry(key).or_insert(0) += 1;
    }

    /// Records boot stage `stage` now (the first report of each stage wins).
    pub fn record_stage(&self, stage: u8) {
        let idx = usize::from(stage);
        if idx == 0 || idx >= STAGES.len() {
            self.bad_stage_writes.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Stored as µs + 1 so that 0 means "not reached".
        let us = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX - 1) + 1;
        let _ = self.stages[idx].compare_exchange(0, us, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// Microseconds from launch to `stage`, if reached.
    pub fn stage_us(&self, stage: u8) -> Option<u64> {
        let v = self.stages.get(usize::from(stage))?.load(Ordering::Relaxed);
        (v != 0).then(|| v - 1)
    }

    /// Copies the counters.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let exits: BTreeMap<String, u64> = KINDS
            .iter()
            .zip(&self.exits)
            .map(|((_, name), v)| (name.to_string(), v.load(Ordering::Relaxed)))
            .filter(|(_, v)| *v > 0)
            .collect();
        let stages_us = (1..STAGES.len() as u8)
            .filter_map(|s| {
                self.stage_us(s)
                    .map(|us| (STAGES[usize::from(s)].to_string(), us))
            })
            .collect();
        let phases = self.phases.lock().unwrap_or_else(|e| e.into_inner());
        let ports = self.ports.lock().unwrap_or_else(|e| e.into_inner());
        let pages = self.mmio_pages.lock().unwrap_or_else(|e| e.into_inner());
        MetricsSnapshot {
            stages_us,
            exits_total: exits.values().sum(),
            exits,
            vmm_phases_us: phases.iter().map(|(n, us)| (n.to_string(), *us)).collect(),
            io_ports: ports.iter().map(|(p, n)| (format!("{p:#x}"), *n)).collect(),
            mmio_pages: pages
                .iter()
                .map(|(p, n)| match *p {
                    OTHER_PAGES => ("other".to_string(), *n),
                    p => (format!("{p:#x}"), *n),
                })
                .collect(),
            bad_stage_writes: self.bad_stage_writes.load(Ordering::Relaxed),
            first_exit_us: match self.first_exit.load(Ordering::Relaxed) {
                0 => None,
                v => Some(v - 1),
            },
            wall_us: u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX),
            vmm_rss_kib: peak_rss_kib().unwrap_or(0),
        }
    }
}

/// The peak resident set of this process in KiB (getrusage: no `/proc` needed,
/// which the jail takes away).
pub fn peak_rss_kib() -> Option<u64> {
    // SAFETY: a zeroed rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage(2) fills the struct we own.
    let r = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    (r == 0).then(|| u64::try_from(usage.ru_maxrss).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_count_exits_by_reason_and_port() {
        let m = VmMetrics::new(Instant::now());
        m.count_port(0x3f8, true);
        m.count_port(0x3f8, true);
        m.count_port(0x3fd, false);
        m.count_mmio(0xd000_0010, false);
        let s = m.snapshot();
        assert_eq!(s.exits_total, 4);
        assert_eq!(s.exits["io_out"], 2);
        assert_eq!(s.exits["io_in"], 1);
        assert_eq!(s.io_ports["0x3f8"], 2);
        assert_eq!(s.mmio_pages["0xd0000000"], 1);
        assert!(s.first_exit_us.is_some());
        assert!(s.vmm_rss_kib > 0);
    }

    #[test]
    fn metrics_mmio_page_map_is_bounded_against_a_scanning_guest() {
        let m = VmMetrics::new(Instant::now());
        for page in 0..10_000u64 {
            m.count_mmio(page << 12, false);
        }
        let s = m.snapshot();
        assert_eq!(s.mmio_pages.len(), MAX_MMIO_PAGES + 1);
        assert_eq!(s.mmio_pages["other"], 10_000 - MAX_MMIO_PAGES as u64);
        assert_eq!(s.exits_total, 10_000);
    }

    #[test]
    fn metrics_first_stage_report_wins() {
        let m = VmMetrics::new(Instant::now());
        assert_eq!(m.stage_us(2), None);
        m.record_stage(2);
        let first = m.stage_us(2).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        m.record_stage(2);
        assert_eq!(m.stage_us(2), Some(first));
        m.record_stage(0);
        assert_eq!(m.snapshot().bad_stage_writes, 1);
        m.record_phase("a");
        m.record_phase("b");
        let names: Vec<String> = m
            .snapshot()
            .vmm_phases_us
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["a", "b"]);
    }
}
