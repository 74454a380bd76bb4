//! Lifeboat's wire protocol, package `lifeboat.v1`: the generated prost messages and tonic
//! clients and servers, the codec they use, and the sender and receiver of change-batch
//! streams (`batch_stream`, `batch_intake`). Domain code converts these at the edge; nothing
//! here knows the domain.

pub mod batch_intake;
pub mod batch_stream;
pub mod codec;
#[cfg(test)]
mod test_batches;

/// Package `lifeboat.v1`.
pub mod v1 {
    tonic::include_proto!("lifeboat.v1");
}

/// Encoded `FileDescriptorSet` of every Lifeboat proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/lifeboat_descriptor.bin"));

/// Largest gRPC message a Lifeboat service accepts or sends (data batches are big).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
