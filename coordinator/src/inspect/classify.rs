//! What a saved model makes of images: each image's predicted digit and the probabilities of
//! all ten, through common's [`Network`](lockstep_common::model::Network) and
//! [`evaluate_each`], so that a test-set evaluation here gives the very loss and accuracy the
//! training run reported for the same parameters.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor, D};
use lockstep_common::mnist::IMAGE_PIXELS;
use lockstep_common::model::{evaluate_each, BatchStats, CLASSES, EVAL_BATCH};

use super::source::SavedModel;

/// One image's classification.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    /// The digit with the largest logit (the one training counts as the prediction).
    pub digit: u8,
    /// Softmax probabilities of the ten digits.
    pub probabilities: [f32; CLASSES],
}

impl Prediction {
    /// The probability of the predicted digit.
    pub fn confidence(&self) -> f32 {
        self.probabilities[self.digit as usize]
    }

    /// The `k` most probable digits, most probable first.
    pub fn top(&self, k: usize) -> Vec<(u8, f32)> {
        let mut ranked: Vec<(u8, f32)> = (0..CLASSES as u8)
            .map(|d| (d, self.probabilities[d as usize]))
            .collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        ranked.truncate(k);
        ranked
    }
}

/// Evaluates `model` on labelled images: the loss and accuracy as training's evaluation
/// computes them (same batches, same sums), and every image's prediction in order.
pub fn evaluate(
    model: &SavedModel,
    images: &[u8],
    labels: &[u8],
) -> Result<(BatchStats, Vec<Prediction>)> {
    let mut predictions = Vec::with_capacity(labels.len());
    let stats = evaluate_each(
        &model.network,
        &model.params,
        images,
        labels,
        model.normalize,
        EVAL_BATCH,
        &Device::Cpu,
        |logits| {
            predictions.extend(predictions_of(logits)?);
            Ok(())
        },
    )
    .with_context(|| format!("evaluating {}", model.path.display()))?;
    Ok((stats, predictions))
}

/// Classifies unlabelled images (`n × 784` pixels, MNIST's format).
pub fn classify(model: &SavedModel, images: &[u8]) -> Result<Vec<Prediction>> {
    let run = || -> candle_core::Result<Vec<Prediction>> {
        let net = model.network.model_from_flat(&model.params, &Device::Cpu)?;
        let mut scratch = Vec::new();
        let mut out = Vec::with_capacity(images.len() / IMAGE_PIXELS);
        for chunk in images.chunks(EVAL_BATCH * IMAGE_PIXELS) {
            lockstep_common::mnist::pixels_to_f32(chunk, model.normalize, &mut scratch);
            let x = Tensor::from_slice(
                scratch.as_slice(),
                (chunk.len() / IMAGE_PIXELS, IMAGE_PIXELS),
                &Device::Cpu,
            )?;
            out.extend(predictions_of(&net.logits(&x)?)?);
        }
        Ok(out)
    };
    run().with_context(|| format!("classifying with {}", model.path.display()))
}

/// The predictions of a batch's logits `[n, 10]`: the arg-max digit (as training's accuracy
/// counts it) and the softmax probabilities.
fn predictions_of(logits: &Tensor) -> candle_core::Result<Vec<Prediction>> {
    let digits = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
    let probabilities = candle_nn::ops::softmax_last_dim(logits)?.to_vec2::<f32>()?;
    Ok(digits
        .into_iter()
        .zip(probabilities)
        .map(|(digit, p)| {
            let mut probabilities = [0.0; CLASSES];
            probabilities.copy_from_slice(&p[..CLASSES]);
            Prediction {
                digit: digit as u8,
                probabilities,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predictions_are_the_arg_max_with_probabilities_that_sum_to_one() {
        let logits = Tensor::new(
            &[
                [0f32, 1., 5., 0., 0., 0., 0., 0., 0., 2.],
                [3f32, 0., 0., 0., 0., 0., 0., 0., 0., 0.],
            ],
            &Device::Cpu,
        )
        .unwrap();
        let p = predictions_of(&logits).unwrap();
        assert_eq!((p[0].digit, p[1].digit), (2, 0));
        for q in &p {
            assert!((q.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
        let top = p[0].top(2);
        assert_eq!((top[0].0, top[1].0), (2, 9));
        let softmax = 5f32.exp() / (5f32.exp() + 2f32.exp() + 1f32.exp() + 7.0);
        assert!((p[0].confidence() - softmax).abs() < 1e-6);
    }
}
