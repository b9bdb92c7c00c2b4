//! Address buses for port I/O and MMIO exits: devices registered on non-overlapping ranges,
//! dispatched by address. An access to no device reads as all ones (like an empty ISA/PCI bus)
//! and writes are dropped, so a guest probing absent hardware cannot stop the VMM.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::virtio::VirtioDevice;
use super::virtio::mmio::MmioTransport;

/// A device on a bus; offsets are relative to the start of its range.
pub trait BusDevice: Send {
    /// A read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

impl<D: VirtioDevice + Send> BusDevice for MmioTransport<D> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data);
    }
}

/// A shared device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// What can go wrong when laying out a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or wraps around the address space.
    #[error("bus range at {base:#x} of {len:#x} bytes is empty or wraps")]
    BadRange {
        /// Start of the range.
        base: u64,
        /// Length of the range.
        len: u64,
    },
    /// The range overlaps a device already on the bus.
    #[error("bus range at {base:#x} of {len:#x} bytes overlaps another device")]
    Overlap {
        /// Start of the range.
        base: u64,
        /// Length of the range.
        len: u64,
    },
}

/// The two buses a vCPU's exits go to.
#[derive(Debug, Default)]
pub struct Buses {
    /// Port I/O.
    pub pio: Bus,
    /// Memory-mapped I/O.
    pub mmio: Bus,
}

/// A bus: address ranges mapped to devices.
#[derive(Default)]
pub struct Bus {
    /// base → (length, device).
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<(u64, u64)> = self.devices.iter().map(|(&b, &(l, _))| (b, l)).collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        let before = self.devices.range(..end).next_back();
        if before.is_some_and(|(&b, &(l, _))| b + l > base) {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (&base, (len, device)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= *len).then_some((offset, device))
    }

    /// Dispatches a read; returns whether a device took it (otherwise `data` is all ones).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, device)) => {
                match device.lock() {
                    Ok(mut d) => d.read(offset, data),
                    Err(poisoned) => poisoned.into_inner().read(offset, data),
                }
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns whether a device took it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((offset, device)) = self.find(addr, data.len()) else {
            return false;
        };
        match device.lock() {
            Ok(mut d) => d.write(offset, data),
            Err(poisoned) => poisoned.into_inner().write(offset, data),
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<(u64, Vec<u8>)>);

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }

        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_by_range_and_reject_overlaps() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x100, 8, a.clone()).expect("a");
        bus.insert(0x108, 8, Arc::new(Mutex::new(Recorder::default())))
            .expect("adjacent");
        for (base, len) in [(0x0fc, 8), (0x104, 1), (0x10f, 2)] {
            let dev = Arc::new(Mutex::new(Recorder::default()));
            assert_eq!(
                bus.insert(base, len, dev),
                Err(BusError::Overlap { base, len })
            );
        }
        let dev = Arc::new(Mutex::new(Recorder::default()));
        assert!(matches!(
            bus.insert(u64::MAX, 2, dev.clone()),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(0x200, 0, dev),
            Err(BusError::BadRange { .. })
        ));

        let mut data = [0u8; 2];
        assert!(bus.read(0x103, &mut data));
        assert_eq!(data, [3, 3]);
        assert!(!bus.read(0x107, &mut [0u8; 2]), "straddles two devices");
        let mut absent = [0u8; 4];
        assert!(!bus.read(0x50, &mut absent));
        assert_eq!(absent, [0xff; 4]);
        assert!(bus.write(0x101, &[9]));
        assert!(!bus.write(0x300, &[9]));
        assert_eq!(a.lock().expect("a").0, vec![(1, vec![9])]);
    }
}
