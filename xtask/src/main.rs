//! `cargo xtask`: ditto's automation — machine setup, guest images, the patched guest kernel,
//! the KVM test box, the test pipeline, the demo and the benchmark. Run `cargo xtask --help` for the commands.

mod cmd;
mod debian;
mod demo;
mod disk_space;
mod images;
mod initramfs;
mod kernel;
mod paths;
mod qemu;
mod setup;
mod soak;
mod stamp;
mod test;
mod testbox;

use clap::{Parser, Subcommand};

/// ditto's development automation.
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what this machine lacks (Debian packages, Rust target and components).
    Setup,
    /// Build the guest images (vmlinuz, initramfs.img, rootfs.ext4) and print their paths.
    Images(images::ImagesArgs),
    /// Build the patched guest kernel (kernel-patch/: /proc/kpageblock) as vmlinuz-ditto.
    Kernel(kernel::KernelArgs),
    /// Run a command inside the KVM test box (or natively with --native).
    #[command(name = "box")]
    Box(testbox::BoxArgs),
    /// Format and lint checks, unit and integration tests, then the end-to-end tests in the box.
    Test(test::TestArgs),
    /// Boot a guest, take a full and a ditto checkpoint of it, restore the ditto one, compare.
    Demo(demo::DemoArgs),
    /// Full, free-only and ditto checkpoints of four workloads, with restores; a table.
    Bench(demo::BenchArgs),
    /// Many checkpoints in a row of a busy guest in the box; every one restorable.
    Soak(soak::SoakArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::ensure(setup::Report::Always).map(|()| 0),
        Command::Images(args) => images::run(&args).map(|()| 0),
        Command::Kernel(args) => kernel::run(&args).map(|()| 0),
        Command::Box(args) => testbox::run(&args),
        Command::Test(args) => test::run(&args).map(|()| 0),
        Command::Demo(args) => demo::demo(&args),
        Command::Bench(args) => demo::bench(&args),
        Command::Soak(args) => soak::run(&args),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
