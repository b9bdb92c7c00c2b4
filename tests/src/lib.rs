//! Shared pieces of ditto's end-to-end tests.
//!
//! The tests in `tests/tests/` run twice under `cargo xtask test`: once on the development
//! machine (against its own `/dev/kvm`) and once inside the KVM test box, where the guest images
//! are in the folder named by `$DITTO_IMAGES`. Tests that need a Linux guest are `#[ignore]`d
//! locally and run with `--include-ignored` in the box. [`vmm`] runs guests under ditto-vmm there,
//! [`dittod`] under the real daemon and its CLI.
//! [`scenario`] drives the measured checkpoint runs of `ditto-demo` and `ditto-bench` (the binaries
//! `cargo xtask demo` and `cargo xtask bench` run in the box).

pub mod dittod;
pub mod fixture;
pub mod microvm;
pub mod payload;
pub mod rounds;
pub mod scenario;
pub mod vmm;
pub mod workload;

/// Runs `work` to completion on a new single-threaded tokio runtime (the end-to-end tests are
/// plain `#[test]`s that drive gRPC clients).
pub fn block_on<F: std::future::Future>(work: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(work)
}
