//! virtio-vsock in userspace: the packet header ([`packet`]), the per-connection state machine
//! with credit-based flow control ([`connection`]), the hybrid `CONNECT <port>` handshake of host
//! clients ([`hybrid`]) and the connection table that routes packets ([`muxer`]). The device
//! (queues, the host Unix socket, listeners) builds on these.

pub mod connection;
pub mod hybrid;
pub mod muxer;
pub mod packet;
