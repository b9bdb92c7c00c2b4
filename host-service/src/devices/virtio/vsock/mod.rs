//! virtio-vsock in userspace: the packet header ([`packet`]), the per-connection state machine
//! with credit-based flow control ([`connection`]), the hybrid `CONNECT <port>` handshake of host
//! clients ([`hybrid`]), the connection table that routes packets ([`muxer`]) and the device
//! model over the virtio queues ([`device`]), and its host side over Unix sockets with the event
//! thread ([`unix`]).

pub mod connection;
pub mod device;
pub mod hybrid;
pub mod muxer;
pub mod packet;
pub mod unix;
