//! virtio devices: the device-side contract ([`VirtioDevice`]), the virtio-mmio transport
//! ([`mmio`]) and the devices ([`block`], [`vsock`], and [`balloon`] for free-page hints).

pub mod balloon;
pub mod block;
pub mod mmio;
pub mod ranges;
pub mod vsock;

#[cfg(test)]
mod driver_tests;

use virtio_queue::Queue;

use crate::kvm::memory::GuestMemory;

/// Feature bit every modern (virtio 1.x) device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// What a virtio device model offers its transport.
pub trait VirtioDevice {
    /// The virtio device id (2 for block, 5 for balloon, 19 for vsock).
    fn device_type(&self) -> u32;
    /// The feature bits the device offers.
    fn avail_features(&self) -> u64;
    /// The maximum size of each of the device's queues (one entry per queue).
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads device configuration space at `offset`; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space at `offset`; writes the device does not accept are
    /// ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Called when the driver sets DRIVER_OK, with the features it acknowledged.
    fn activate(&mut self, acked_features: u64);
    /// Processes the available buffers of queue `index`; returns whether the driver should be
    /// interrupted (used buffers were added and the queue wants a notification).
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemory) -> bool;
    /// Returns the device to its initial state (the driver wrote 0 to the status register).
    fn reset(&mut self);
}

/// Copies the bytes of configuration space `space` at `offset` into `data`; bytes past its end
/// read as zero.
pub fn read_config_space(space: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    if let Ok(offset) = usize::try_from(offset)
        && offset < space.len()
    {
        let n = data.len().min(space.len() - offset);
        data[..n].copy_from_slice(&space[offset..offset + n]);
    }
}
