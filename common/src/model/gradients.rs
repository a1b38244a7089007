//! A replica's gradients of one batch: one flattened tensor per parameter, in layout order,
//! on the replica's device, until an all-reduce wants them as one tensor or as wire bytes.

use candle_core::{DType, Device, Result, Tensor};

use super::network::Network;
use crate::codec;

/// The gradients of every parameter, one flattened tensor each, in layout order.
pub struct Gradients {
    parts: Vec<Tensor>,
}

impl Gradients {
    /// Gradients already flattened and in layout order.
    pub(super) fn from_parts(parts: Vec<Tensor>) -> Self {
        Self { parts }
    }

    /// The gradients of an empty shard: zeros in `network`'s layout.
    pub fn zeros(network: &Network, device: &Device) -> Result<Self> {
        let parts = network
            .layout()
            .iter()
            .map(|s| Tensor::zeros(s.len(), DType::F32, device))
            .collect::<Result<_>>()?;
        Ok(Self { parts })
    }

    /// All of them as one flat tensor on their device (for device-side all-reduce).
    pub fn to_flat_tensor(&self) -> Result<Tensor> {
        Tensor::cat(&self.parts, 0)
    }

    /// All of them as little-endian `f32` bytes, copied once from the tensors.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let len: usize = self.parts.iter().map(|p| p.elem_count()).sum();
        let mut out = Vec::with_capacity(len * 4);
        for p in &self.parts {
            codec::encode_tensor_into(p, &mut out)?;
        }
        Ok(out)
    }

    /// All of them as little-endian `f32` bytes into `out`, which must hold exactly that many
    /// (e.g. a shared-memory slot): CPU tensors straight from their storage.
    pub fn write_le_into(&self, out: &mut [u8]) -> Result<()> {
        let len: usize = self.parts.iter().map(|p| p.elem_count()).sum();
        if out.len() != len * 4 {
            return Err(candle_core::Error::Msg(format!(
                "{} bytes for a gradient of {len} values",
                out.len()
            )));
        }
        let mut at = 0;
        for p in &self.parts {
            let bytes = p.elem_count() * 4;
            let dst = &mut out[at..at + bytes];
            let written = if p.device().is_cpu() {
                codec::with_cpu_f32s(p, |values| codec::write_le_f32s(values, dst))?
            } else {
                codec::write_le_f32s(&p.flatten_all()?.to_vec1::<f32>()?, dst)
            };
            written.map_err(candle_core::Error::wrap)?;
            at += bytes;
        }
        Ok(())
    }

    /// All of them as host `f32` values.
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        self.to_flat_tensor()?.to_vec1::<f32>()
    }
}
