//! virtio-vsock in userspace: the packet header ([`packet`]), the per-connection state machine
//! with credit-based flow control ([`connection`]), the hybrid `CONNECT <port>` handshake of host
//! clients ([`hybrid`]), the connection table that routes packets ([`muxer`]) and the device
//! model over the virtio queues ([`device`]). The host side (Unix sockets, listeners, the event
//! loop) builds on these.

pub mod connection;
pub mod device;
pub mod hybrid;
pub mod muxer;
pub mod packet;
