//! A batch on its way in (pixels and labels as tensors) and its figures on the way out (the
//! summed loss and the correct count of one forward pass).

use candle_core::{DType, Device, Result, Tensor, D};

use crate::mnist::IMAGE_PIXELS;

/// Summed loss and correct count of one forward pass.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BatchStats {
    /// Sum over samples of the cross-entropy loss.
    pub loss_sum: f64,
    /// Samples whose arg-max logit is the label.
    pub correct: u32,
    /// Samples in the batch.
    pub samples: u32,
}

impl BatchStats {
    /// Reads a `[loss_sum, correct]` tensor: one device-to-host copy.
    pub fn from_tensor(t: &Tensor, samples: u32) -> Result<Self> {
        Ok(Self::from_values(&t.to_vec1::<f32>()?, samples))
    }

    /// The statistics from `[loss_sum, correct, ...]` read back from a device.
    pub fn from_values(values: &[f32], samples: u32) -> Self {
        BatchStats {
            loss_sum: values[0] as f64,
            correct: values[1] as u32,
            samples,
        }
    }

    /// The statistics of `logits` against `labels`, whose summed loss is `loss_sum`.
    pub(super) fn of(logits: &Tensor, labels: &Tensor, loss_sum: &Tensor) -> Result<Self> {
        Self::from_tensor(
            &stats_tensor(logits, labels, loss_sum)?,
            labels.dim(0)? as u32,
        )
    }
}

/// Builds the input and label tensors of a batch of `u8` pixels.
pub fn batch_tensors(
    pixels: &[u8],
    labels: &[u8],
    normalize: bool,
    device: &Device,
    scratch: &mut Vec<f32>,
) -> Result<(Tensor, Tensor)> {
    let n = labels.len();
    crate::mnist::pixels_to_f32(pixels, normalize, scratch);
    let x = Tensor::from_slice(scratch.as_slice(), (n, IMAGE_PIXELS), device)?;
    let y: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
    let y = Tensor::from_vec(y, n, device)?;
    Ok((x, y))
}

/// `[loss_sum, correct]` of a batch as a 2-element tensor on the batch's device (no host
/// synchronisation).
pub(super) fn stats_tensor(logits: &Tensor, labels: &Tensor, loss_sum: &Tensor) -> Result<Tensor> {
    let correct = logits
        .argmax(D::Minus1)?
        .eq(labels)?
        .to_dtype(DType::F32)?
        .sum_all()?;
    Tensor::stack(&[loss_sum.to_dtype(DType::F32)?, correct], 0)
}
