//! Device models. Each device keeps its state in plain serialisable structs; the live parts
//! (files, queues, interrupt event fds) are rebuilt from them.

pub mod bus;
pub mod legacy;
pub mod virtio;
