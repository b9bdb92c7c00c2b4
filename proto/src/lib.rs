//! ditto's contracts, generated at build time from the `.proto` files next to this crate.
//!
//! - [`agent::v1`]: the service the guest agent serves on virtio-vsock; the host is the client.
//!
//! The encoded file descriptor set of every service is in [`FILE_DESCRIPTOR_SET`], for gRPC
//! server reflection.

#![allow(missing_docs)] // generated code documents what the .proto files document

/// The guest agent's service (`ditto.agent.v1`).
pub mod agent {
    /// Version 1 of the agent contract.
    pub mod v1 {
        tonic::include_proto!("ditto.agent.v1");
    }
}

/// Encoded `FileDescriptorSet` of every ditto contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ditto_descriptor");
