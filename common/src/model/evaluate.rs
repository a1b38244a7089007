//! Test loss and accuracy of a flat parameter buffer over a whole dataset, in batches: what
//! training reports each epoch and what `lockstep eval` prints, computed the same way.

use candle_core::{Device, Tensor};

use super::batch::{batch_tensors, BatchStats};
use super::loss::summed_cross_entropy_of_mean;
use super::network::Network;
use crate::mnist::IMAGE_PIXELS;

/// Test images per forward pass of an evaluation. Training's per-epoch evaluation and `lockstep
/// eval` use the same, so they sum the loss in the same batches and print the same figures.
pub const EVAL_BATCH: usize = 2000;

/// Test loss and accuracy of flat parameters over a whole dataset, in batches.
pub fn evaluate(
    network: &Network,
    flat: &[f32],
    images: &[u8],
    labels: &[u8],
    normalize: bool,
    batch: usize,
    device: &Device,
) -> candle_core::Result<BatchStats> {
    evaluate_each(
        network,
        flat,
        images,
        labels,
        normalize,
        batch,
        device,
        |_| Ok(()),
    )
}

/// [`evaluate`], also handing each batch's logits `[n, 10]` to `on_logits`, in order: for
/// callers that want every image's prediction (a confusion matrix, a grid of digits) with the
/// very loss and accuracy the training run reported.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_each(
    network: &Network,
    flat: &[f32],
    images: &[u8],
    labels: &[u8],
    normalize: bool,
    batch: usize,
    device: &Device,
    mut on_logits: impl FnMut(&Tensor) -> candle_core::Result<()>,
) -> candle_core::Result<BatchStats> {
    let model = network.model_from_flat(flat, device)?;
    let mut total = BatchStats::default();
    let mut scratch = Vec::new();
    for start in (0..labels.len()).step_by(batch.max(1)) {
        let end = (start + batch).min(labels.len());
        let (x, y) = batch_tensors(
            &images[start * IMAGE_PIXELS..end * IMAGE_PIXELS],
            &labels[start..end],
            normalize,
            device,
            &mut scratch,
        )?;
        let logits = model.logits(&x)?;
        let loss_sum = summed_cross_entropy_of_mean(&logits, &y)?;
        let s = BatchStats::of(&logits, &y, &loss_sum)?;
        on_logits(&logits)?;
        total.loss_sum += s.loss_sum;
        total.correct += s.correct;
        total.samples += s.samples;
    }
    Ok(total)
}
