//! The control endpoint of `ditto-vmm` (one process per VM): the `ditto.vmm.v1.VmmControl`
//! gRPC service on a Unix socket, so the orchestration daemon and the CLIs can ask a VMM for
//! its status, pause, resume and shut it down, and reach a guest vsock port through the socket.
//!
//! - [`handle`]: the [`VmmHandle`] trait the VMM implements, with plain Rust types
//!   ([`VmStatus`], [`VmState`], [`StateChange`]) and its error enum [`VmmError`].
//! - [`server`]: [`serve`] (or [`ControlSocket::bind`] then [`ControlSocket::serve`]) binds the
//!   socket, serves a handle until a shutdown future fires, and removes the socket file.
//!   `ConnectVsock` tunnels copy between the gRPC streams and the Unix stream the handle
//!   returns, with bounded buffering.
//! - [`client`]: [`VmmClient`], typed methods over the socket; [`VmmClient::connect_vsock`]
//!   returns a [`VsockStream`] (tokio `AsyncRead + AsyncWrite`).
//!
//! `Checkpoint` writes the VM to a checkpoint file ([`CheckpointSpec`] → [`CheckpointResult`]);
//! the status of a VMM started from one says so ([`RestoreInfo`]).
//!
//! Refusals travel as gRPC status codes: a pause of a VM that is not running, a resume of a VM
//! that is not paused and a tunnel on a VM without vsock are `FAILED_PRECONDITION`; a guest
//! port nobody accepts on is `UNAVAILABLE`; a bad first tunnel message is `INVALID_ARGUMENT`.

pub mod client;
mod convert;
pub mod handle;
pub mod server;
#[cfg(test)]
mod tests;

pub use client::{ClientError, VmmClient, VsockStream};
pub use convert::InvalidReply;
pub use handle::{
    AfterCheckpoint, CheckpointResult, CheckpointSpec, DriveInfo, RestoreInfo, StateChange,
    VmState, VmStatus, VmmError, VmmHandle, VsockInfo,
};
pub use server::{ControlSocket, ServeError, serve};
