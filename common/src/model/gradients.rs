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

    /// All of them as host `f32` values.
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        self.to_flat_tensor()?.to_vec1::<f32>()
    }
}
