//! `ditto-workload`: a guest program whose memory and files can be proven intact.
//!
//! `ditto-workload run` fills anonymous memory with a seeded pattern in which every 4 KiB page
//! differs ([`pattern`], [`memory`]), optionally writes and fsyncs seeded files and records their
//! SHA-256 ([`files`]), optionally reads folders into the page cache ([`pagecache`]), and then
//! keeps running: a heartbeat counts and re-touches a few pages ([`workload`]) while the
//! control socket ([`server`], [`protocol`]) answers `status`, `verify` and `stop`
//! ([`client`]). Tests of VM checkpoint and restore use it to prove that a restored guest holds
//! exactly the memory and files it had and kept running; benchmarks use it to create page cache
//! and anonymous memory.

pub mod client;
pub mod files;
pub mod memory;
pub mod pagecache;
pub mod pattern;
pub mod protocol;
pub mod scribble;
pub mod server;
pub mod workload;
