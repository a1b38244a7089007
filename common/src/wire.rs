//! The generated gRPC code for `proto/lockstep.proto`, plus the small conversions the rest of
//! the code uses so that it speaks in the project's own types.

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("lockstep.v1");
}

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::ProstCodec;

use crate::codec::TensorSpec;

/// Initial size of a stream's encode/decode buffer: a whole `mlp` gradient fits, so encoding
/// one does not grow (and copy) the buffer several times as tonic's 8 KiB default does.
const CODEC_BUFFER: usize = 1024 * 1024;

/// The protobuf codec of every Lockstep RPC: tonic's prost codec with larger buffers.
#[derive(Debug, Clone, Copy)]
pub struct WireCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for WireCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for WireCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(BufferSettings::new(CODEC_BUFFER, CODEC_BUFFER))
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::new(CODEC_BUFFER, CODEC_BUFFER))
    }
}

pub use pb::coordinator_client::CoordinatorClient;
pub use pb::coordinator_server::{Coordinator, CoordinatorServer};

/// Converts the layout into its wire form.
pub fn layout_to_wire(layout: &[TensorSpec]) -> Vec<pb::TensorSpec> {
    layout
        .iter()
        .map(|s| pb::TensorSpec {
            name: s.name.clone(),
            shape: s.shape.iter().map(|&d| d as u64).collect(),
            offset: s.offset as u64,
        })
        .collect()
}

/// Converts a layout received on the wire back into the project's type.
pub fn layout_from_wire(layout: &[pb::TensorSpec]) -> Vec<TensorSpec> {
    layout
        .iter()
        .map(|s| TensorSpec {
            name: s.name.clone(),
            shape: s.shape.iter().map(|&d| d as usize).collect(),
            offset: s.offset as usize,
        })
        .collect()
}

/// Splits a serialised state into the chunks that `FetchState`/`PushState` stream, each
/// tagged with the state's version and (uploads) the uploading member, 0 otherwise.
pub fn state_chunks(bytes: &[u8], state_version: u64, member: u64) -> Vec<pb::StateChunk> {
    let total = bytes.len() as u64;
    if bytes.is_empty() {
        return vec![pb::StateChunk {
            total_bytes: 0,
            offset: 0,
            data: bytes::Bytes::new(),
            state_version,
            member,
        }];
    }
    bytes
        .chunks(crate::STATE_CHUNK_BYTES)
        .enumerate()
        .map(|(i, c)| pb::StateChunk {
            total_bytes: total,
            offset: (i * crate::STATE_CHUNK_BYTES) as u64,
            data: bytes::Bytes::copy_from_slice(c),
            state_version,
            member,
        })
        .collect()
}

/// Reassembles streamed state chunks, refusing gaps, overlaps, totals over the limit, chunks of
/// other sizes than [`state_chunks`] makes (so a stream has at most one chunk per MiB), and
/// chunks of different versions or members. Nothing is allocated ahead of the data received.
pub struct StateAssembler {
    limit: u64,
    total: Option<u64>,
    version: Option<u64>,
    member: Option<u64>,
    buf: Vec<u8>,
}

impl Default for StateAssembler {
    fn default() -> Self {
        Self::with_limit(crate::MAX_STATE_BYTES)
    }
}

impl StateAssembler {
    /// An assembler that refuses states larger than `limit` bytes (what the receiver's model
    /// can take), and in any case larger than [`crate::MAX_STATE_BYTES`].
    pub fn with_limit(limit: u64) -> Self {
        Self {
            limit: limit.min(crate::MAX_STATE_BYTES),
            total: None,
            version: None,
            member: None,
            buf: Vec::new(),
        }
    }

    /// The member the chunks say they come from (uploads), once a chunk is in.
    pub fn member(&self) -> Option<u64> {
        self.member
    }

    /// Adds the next chunk; chunks must arrive in order.
    pub fn push(&mut self, chunk: pb::StateChunk) -> Result<(), String> {
        let total = *self.total.get_or_insert(chunk.total_bytes);
        let version = *self.version.get_or_insert(chunk.state_version);
        let member = *self.member.get_or_insert(chunk.member);
        if chunk.state_version != version {
            return Err(format!(
                "state chunk of version {}, earlier chunks were version {version}",
                chunk.state_version
            ));
        }
        if chunk.member != member {
            return Err(format!(
                "state chunk from member {}, earlier chunks from member {member}",
                chunk.member
            ));
        }
        if chunk.total_bytes != total {
            return Err(format!(
                "state chunk says total {} bytes, earlier chunks said {total}",
                chunk.total_bytes
            ));
        }
        if total > self.limit {
            return Err(format!(
                "a state of {total} bytes is announced; at most {} are accepted (the training state of this \
                 job's model)",
                self.limit
            ));
        }
        if chunk.offset != self.buf.len() as u64 {
            return Err(format!(
                "state chunk at offset {} but {} bytes received so far",
                chunk.offset,
                self.buf.len()
            ));
        }
        let end = self.buf.len() as u64 + chunk.data.len() as u64;
        if end > total {
            return Err(format!("state chunks exceed the announced {total} bytes"));
        }
        let full = chunk.data.len() == crate::STATE_CHUNK_BYTES;
        if !full && (end != total || (chunk.data.is_empty() && total > 0)) {
            return Err(format!(
                "a state chunk of {} bytes at offset {}: every chunk but the last holds {} bytes",
                chunk.data.len(),
                chunk.offset,
                crate::STATE_CHUNK_BYTES
            ));
        }
        self.buf.extend_from_slice(&chunk.data);
        Ok(())
    }

    /// The whole state and its version, once every announced byte is in.
    pub fn finish(self) -> Result<(Vec<u8>, u64), String> {
        let total = self.total.unwrap_or(0);
        if self.buf.len() as u64 != total {
            return Err(format!(
                "state stream ended after {} of {total} bytes",
                self.buf.len()
            ));
        }
        Ok((self.buf, self.version.unwrap_or(0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_chunks_reassemble_and_gaps_are_refused() {
        let bytes: Vec<u8> = (0..(crate::STATE_CHUNK_BYTES * 2 + 17))
            .map(|i| i as u8)
            .collect();
        let chunks = state_chunks(&bytes, 7, 3);
        assert_eq!(chunks.len(), 3);
        let mut asm = StateAssembler::default();
        for c in chunks.clone() {
            asm.push(c).unwrap();
        }
        assert_eq!(asm.finish().unwrap(), (bytes, 7));

        let mut asm = StateAssembler::default();
        asm.push(chunks[0].clone()).unwrap();
        assert!(asm.push(chunks[2].clone()).is_err());

        let mut asm = StateAssembler::default();
        asm.push(chunks[0].clone()).unwrap();
        assert!(asm.finish().is_err());
    }

    #[test]
    fn state_streams_are_bounded_in_size_and_in_chunk_count() {
        let bytes = vec![7u8; crate::STATE_CHUNK_BYTES + 10];
        let chunks = state_chunks(&bytes, 1, 3);

        let mut asm = StateAssembler::with_limit(bytes.len() as u64 - 1);
        let err = asm.push(chunks[0].clone()).unwrap_err();
        assert!(err.contains("at most"), "{err}");

        // Tiny chunks would make a stream of a million messages for a megabyte.
        let mut asm = StateAssembler::default();
        let mut tiny = chunks[0].clone();
        tiny.data = tiny.data.slice(..10);
        let err = asm.push(tiny).unwrap_err();
        assert!(err.contains("every chunk but the last"), "{err}");

        let mut asm = StateAssembler::default();
        asm.push(chunks[0].clone()).unwrap();
        let mut empty = chunks[1].clone();
        empty.data = bytes::Bytes::new();
        assert!(asm.push(empty).is_err(), "an empty chunk before the end");

        let mut asm = StateAssembler::default();
        asm.push(chunks[0].clone()).unwrap();
        let mut other = chunks[1].clone();
        other.member = 4;
        let err = asm.push(other).unwrap_err();
        assert!(err.contains("member 4"), "{err}");
        assert_eq!(asm.member(), Some(3));
    }
}

#[cfg(test)]
mod props;
