//! An address bus: non-overlapping ranges, each served by one device. One bus serves
//! port I/O, another MMIO. Lookups are a `BTreeMap` range query.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of the device's range.
/// Guest-controlled: `data` may be any length from 1 to 8 and any offset in range.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Why a device could not be placed on a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps one already there.
    #[error("bus range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap {
        /// Start.
        base: u64,
        /// Length.
        len: u64,
    },
    /// Empty or wrapping range.
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange {
        /// Start.
        base: u64,
        /// Length.
        len: u64,
    },
}

/// A shared, lockable device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// The bus.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|(b, (l, _))| (*b, *l)))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `base..base + len`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        if let Some((b, (l, _))) = self.ranges.range(..end).next_back() {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64, len: usize) -> Option<(u64, &SharedDevice)> {
        let (base, (dev_len, dev)) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must fall inside the device.
        let end = offset.checked_add(len as u64)?;
        (end <= *dev_len).then_some((offset, dev))
    }

    /// Serves a read; `false` when no device covers the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                // A device that panicked while locked is poisoned; keep serving it
                // rather than taking the VMM down.
                let mut d = dev.lock().unwrap_or_else(|p| p.into_inner());
                d.read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Serves a write; `false` when no device covers the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                let mut d = dev.lock().unwrap_or_else(|p| p.into_inner());
                d.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn bus_routes_by_range_and_offset() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b, [2]);
        assert!(bus.write(0x3ff, &[9]));
        assert_eq!(dev.lock().unwrap().writes, vec![(7, vec![9])]);
    }

    #[test]
    fn bus_misses_outside_and_straddling_accesses() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x100, 4)
            .unwrap();
        let mut b = [0u8; 2];
        assert!(!bus.read(0xff, &mut b[..1]));
        assert!(!bus.read(0x104, &mut b[..1]));
        assert!(!bus.read(0x103, &mut b), "2-byte access straddles the end");
        assert!(!bus.write(u64::MAX, &[1, 2]));
    }

    #[test]
    fn bus_rejects_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        let d = || Arc::new(Mutex::new(Recorder::default())) as SharedDevice;
        bus.insert(d(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(d(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(d(), 0xf8, 9),
            Err(BusError::Overlap { base: 0xf8, len: 9 })
        );
        assert!(bus.insert(d(), 0xf8, 8).is_ok());
        assert!(bus.insert(d(), 0x110, 1).is_ok());
        assert_eq!(
            bus.insert(d(), 5, 0),
            Err(BusError::BadRange { base: 5, len: 0 })
        );
        assert!(matches!(
            bus.insert(d(), u64::MAX, 2),
            Err(BusError::BadRange { .. })
        ));
    }
}
