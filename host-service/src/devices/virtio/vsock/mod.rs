//! virtio-vsock in userspace: the packet header ([`packet`]), the per-connection state machine
//! with credit-based flow control ([`connection`]) and the hybrid `CONNECT <port>` handshake of
//! host clients ([`hybrid`]). The device (queues, the host Unix socket, listeners) builds on
//! these.

pub mod connection;
pub mod hybrid;
pub mod packet;
