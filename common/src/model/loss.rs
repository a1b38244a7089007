//! The loss every network trains on: cross-entropy summed over a batch, with its gradient.

use candle_core::{DType, Result, Tensor, D};

use super::network::CLASSES;

/// The summed cross-entropy of `logits` `[n, 10]` against labels `y` `[n]`, and its gradient
/// with respect to the logits: softmax minus one-hot.
pub(super) fn summed_cross_entropy(logits: &Tensor, y: &Tensor) -> Result<(Tensor, Tensor)> {
    let classes = Tensor::arange(0u32, CLASSES as u32, logits.device())?.unsqueeze(0)?;
    let one_hot = y
        .unsqueeze(1)?
        .broadcast_eq(&classes)?
        .to_dtype(DType::F32)?;
    let log_p = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let loss_sum = (log_p.mul(&one_hot)?.sum_all()? * -1.0)?;
    let d_logits = (log_p.exp()? - &one_hot)?;
    Ok((loss_sum, d_logits))
}

/// candle's mean cross-entropy of `logits` against `y`, times the batch size: the summed loss
/// as autograd and evaluation compute it.
pub(super) fn summed_cross_entropy_of_mean(logits: &Tensor, y: &Tensor) -> Result<Tensor> {
    let n = y.dim(0)? as f64;
    candle_nn::loss::cross_entropy(logits, y)? * n
}
