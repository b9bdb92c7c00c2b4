//! ditto's contracts, generated at build time from the `.proto` files next to this crate.
//!
//! - [`agent::v1`]: the service the guest agent serves on virtio-vsock; the host is the client.
//! - [`vmm::v1`]: the control service of one VMM process, served on a Unix socket; the
//!   orchestration daemon and the CLIs are the clients.
//! - [`host::v1`]: the orchestration service `dittod` serves; orchestrators and `dittoctl` are
//!   the clients.
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

/// The VMM's control service (`ditto.vmm.v1`).
pub mod vmm {
    /// Version 1 of the VMM control contract.
    pub mod v1 {
        tonic::include_proto!("ditto.vmm.v1");
    }
}

/// The host's orchestration service (`ditto.host.v1`).
pub mod host {
    /// Version 1 of the orchestration contract.
    pub mod v1 {
        tonic::include_proto!("ditto.host.v1");
    }
}

/// Encoded `FileDescriptorSet` of every ditto contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ditto_descriptor");
