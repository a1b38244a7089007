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
/// tagged with the state's version.
pub fn state_chunks(bytes: &[u8], state_version: u64) -> Vec<pb::StateChunk> {
    let total = bytes.len() as u64;
    if bytes.is_empty() {
        return vec![pb::StateChunk {
            total_bytes: 0,
            offset: 0,
            data: bytes::Bytes::new(),
            state_version,
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
        })
        .collect()
}

/// Reassembles streamed state chunks, refusing gaps, overlaps, oversized totals and chunks of
/// different versions.
#[derive(Default)]
pub struct StateAssembler {
    total: Option<u64>,
    version: Option<u64>,
    buf: Vec<u8>,
}

impl StateAssembler {
    /// Adds the next chunk; chunks must arrive in order.
    pub fn push(&mut self, chunk: pb::StateChunk) -> Result<(), String> {
        let total = *self.total.get_or_insert(chunk.total_bytes);
        let version = *self.version.get_or_insert(chunk.state_version);
        if chunk.state_version != version {
            return Err(format!(
                "state chunk of version {}, earlier chunks were version {version}",
                chunk.state_version
            ));
        }
        if chunk.total_bytes != total {
            return Err(format!(
                "state chunk says total {} bytes, earlier chunks said {total}",
                chunk.total_bytes
            ));
        }
        if total > crate::MAX_STATE_BYTES {
            return Err(format!(
                "state of {total} bytes is larger than any model Lockstep builds"
            ));
        }
        if chunk.offset != self.buf.len() as u64 {
            return Err(format!(
                "state chunk at offset {} but {} bytes received so far",
                chunk.offset,
                self.buf.len()
            ));
        }
        if self.buf.len() as u64 + chunk.data.len() as u64 > total {
            return Err(format!("state chunks exceed the announced {total} bytes"));
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
        let chunks = state_chunks(&bytes, 7);
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
}

#[cfg(test)]
mod props;
