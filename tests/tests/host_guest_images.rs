//! The guest images boot: run on the development machine under QEMU's microvm (software
//! emulation, ACPI-described virtio-mmio) by `cargo xtask test` once the images are built. These
//! are about the stock kernel and its initramfs, so they boot it whatever `$DITTO_GUEST_KERNEL`
//! says.

use std::time::{Duration, Instant};

use ditto_tests::microvm::{KernelChoice, boot_kernel_until, images_dir};

const BOOT: Duration = Duration::from_secs(180);

#[test]
#[ignore = "needs the guest images ($DITTO_IMAGES) and QEMU; `cargo xtask test` runs it"]
fn the_root_disks_init_mounts_the_system_and_starts_the_agent() {
    let images = images_dir().unwrap();
    let started = Instant::now();
    // rcS prints its line once /proc, /sys and /dev are mounted; then init starts the agent,
    // which logs on the console when it listens on vsock.
    let stock = KernelChoice::Stock.in_images(&images).unwrap();
    let console = boot_kernel_until(&stock, &images, &[], "", "ditto-agent serving", BOOT).unwrap();
    assert!(
        console.iter().any(|l| l.contains("ditto guest: up")),
        "the agent ran before rcS finished:\n{}",
        console.join("\n")
    );
    println!("booted to rcS in {:.1} s", started.elapsed().as_secs_f64());
}

#[test]
#[ignore = "needs the guest images ($DITTO_IMAGES) and QEMU; `cargo xtask test` runs it"]
fn the_initramfs_honours_init_and_passes_its_arguments() {
    let images = images_dir().unwrap();
    let cmdline = concat!(
        "init=/bin/sh -- -c \"mount -t sysfs sysfs /sys; ",
        "echo ditto-init-ok:$(cat /sys/block/vda/serial):$(cat /etc/hostname); poweroff -f\""
    );
    let stock = KernelChoice::Stock.in_images(&images).unwrap();
    boot_kernel_until(
        &stock,
        &images,
        &[],
        cmdline,
        "ditto-init-ok:root:ditto-guest",
        BOOT,
    )
    .unwrap();
}
