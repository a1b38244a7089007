//! The `cnn` preset's forward and backward pass on the CPU, written out by hand.
//!
//! candle's generic autograd computes a convolution's gradients with `conv_transpose2d` and a
//! convolution whose "kernel" is the 24×24 output, both slow on a CPU, and it routes a max-pool
//! gradient scaled by a quarter (its `max_pool2d` backward multiplies by the share of tied
//! maxima instead of dividing). Here each convolution is an im2col followed by one matrix
//! product (candle's `matmul`, i.e. the gemm crate), activations stay channels-last so no
//! transpose is needed between layers, and the max-pool keeps the index of each window's first
//! maximum, which receives the whole gradient, as in PyTorch.
//!
//! Parameter layouts stay PyTorch's: conv2's columns are gathered in `(kh, kw, c)` order, so
//! its `[64, 32, 3, 3]` weight is permuted on the way in and its gradient on the way out, and
//! the pooled activations are written in NCHW order before `fc1`.
//!
//! Every loop runs in a fixed order on one thread, and gemm splits only the rows and columns
//! of a product among threads, never its sums, so the result does not depend on timing or on
//! the thread count.

use candle_core::{DType, Module, Result, Tensor};
use rayon::prelude::*;

use super::{Cnn, C1, C2, FLAT, S1, S2, SIDE, SP};
use crate::codec::with_cpu_f32s;
use crate::model::gradients::Gradients;
use crate::model::loss::summed_cross_entropy;

/// Length of one im2col row of conv2: a 3×3 window over all of conv1's channels.
const K2: usize = 9 * C1;
/// Marks a pooled value whose maximum was not positive: relu passes no gradient back to it.
const NO_GRADIENT: u32 = u32::MAX;
/// Most samples per pass: bounds the im2col buffers a gradient keeps for its backward pass
/// (about 0.7 MB a sample) when a shard is large, and is the batch of the fully connected
/// layers when a caller evaluates thousands of images at once.
const CHUNK: usize = 64;

/// What the backward pass needs from the forward pass.
struct Activations {
    /// conv1's im2col of the input, `[n * 26 * 26, 9]`.
    cols1: Vec<f32>,
    /// conv1's output after relu, `[n, 26, 26, 32]`.
    h1: Vec<f32>,
    /// conv2's im2col of `h1`, one `[24 * 24, 288]` per sample, columns in `(kh, kw, c)`
    /// order.
    cols2: Vec<Tensor>,
    /// For each pooled value (NCHW order), its index in conv2's `[n * 24 * 24, 64]` output,
    /// or [`NO_GRADIENT`].
    argmax: Vec<u32>,
    /// The pooled map after relu, `[n, 9216]` in NCHW order.
    pooled: Tensor,
    /// fc1's output after relu, `[n, 128]`.
    a1: Tensor,
    /// `[n, 10]`.
    logits: Tensor,
}

/// Logits `[n, 10]` of a batch `[n, 784]` on the CPU, computed in chunks of samples that run in
/// parallel on rayon's threads (an evaluation of 10,000 images: 4.6 s to 2.4 s on 2 cores); each
/// chunk's figures are its own, so the result does not depend on the threads either.
pub fn logits(cnn: &Cnn, x: &Tensor) -> Result<Tensor> {
    let n = x.dim(0)?;
    let w = Weights::of(cnn)?;
    let starts: Vec<usize> = (0..n.max(1)).step_by(CHUNK).collect();
    let chunks = starts
        .par_iter()
        .map(|&start| {
            let len = CHUNK.min(n - start);
            Ok(forward(cnn, &w, &x.narrow(0, start, len)?, false)?.logits)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&chunks, 0)
}

/// The gradient of the summed cross-entropy of a batch `[n, 784]` with labels `y`, in layout
/// order, with the logits and the summed loss. Batches larger than [`CHUNK`] are computed
/// chunk by chunk and the gradients added in chunk order.
pub fn gradient(cnn: &Cnn, x: &Tensor, y: &Tensor) -> Result<(Gradients, Tensor, Tensor)> {
    let n = x.dim(0)?;
    let w = Weights::of(cnn)?;
    let mut total: Option<(Vec<Tensor>, Vec<Tensor>, Tensor)> = None;
    for start in (0..n.max(1)).step_by(CHUNK) {
        let len = CHUNK.min(n - start);
        let (parts, logits, loss_sum) = chunk_gradient(
            cnn,
            &w,
            &x.narrow(0, start, len)?,
            &y.narrow(0, start, len)?,
        )?;
        total = Some(match total {
            None => (parts, vec![logits], loss_sum),
            Some((sum, mut all_logits, loss)) => {
                let sum = sum
                    .iter()
                    .zip(&parts)
                    .map(|(a, b)| a + b)
                    .collect::<Result<Vec<_>>>()?;
                all_logits.push(logits);
                (sum, all_logits, (loss + loss_sum)?)
            }
        });
    }
    let (parts, logits, loss_sum) = total.expect("at least one chunk");
    Ok((
        Gradients::from_parts(parts),
        Tensor::cat(&logits, 0)?,
        loss_sum,
    ))
}

/// The convolutions' parameters in the forms the passes use.
struct Weights {
    /// conv1's weight as `[9, 32]`.
    w1t: Tensor,
    b1: Vec<f32>,
    /// conv2's weight as `[64, 288]` in `(kh, kw, c)` column order (see
    /// [`conv2_weight_khwc`]), and transposed, `[288, 64]`.
    w2: Tensor,
    w2t: Tensor,
    b2: Vec<f32>,
}

impl Weights {
    fn of(cnn: &Cnn) -> Result<Self> {
        let w2 = conv2_weight_khwc(cnn.conv2.weight())?.contiguous()?;
        Ok(Self {
            w1t: cnn.conv1.weight().reshape((C1, 9))?.t()?.contiguous()?,
            b1: cnn.conv1.bias().to_vec1::<f32>()?,
            w2t: w2.t()?.contiguous()?,
            w2,
            b2: cnn.conv2.bias().to_vec1::<f32>()?,
        })
    }
}

/// [`gradient`] of at most [`CHUNK`] samples.
fn chunk_gradient(
    cnn: &Cnn,
    w: &Weights,
    x: &Tensor,
    y: &Tensor,
) -> Result<(Vec<Tensor>, Tensor, Tensor)> {
    let n = x.dim(0)?;
    let device = x.device();
    let act = forward(cnn, w, x, true)?;
    let (loss_sum, d_logits) = summed_cross_entropy(&act.logits, y)?;

    // fc2 and fc1, as in a fully connected network.
    let d_fc2_w = d_logits.t()?.matmul(&act.a1)?;
    let d_fc2_b = d_logits.sum(0)?;
    let d_a1 = d_logits.matmul(cnn.fc2.weight())?;
    let d_z3 = (d_a1 * act.a1.gt(0f32)?.to_dtype(DType::F32)?)?;
    let d_fc1_w = d_z3.t()?.matmul(&act.pooled)?;
    let d_fc1_b = d_z3.sum(0)?;
    let d_pooled = d_z3.matmul(cnn.fc1.weight())?;

    // Max-pool and relu: each pooled gradient goes to its window's maximum, if positive.
    let mut d_z2 = vec![0f32; n * S2 * S2 * C2];
    with_cpu_f32s(&d_pooled, |d_pooled| {
        for (&at, &g) in act.argmax.iter().zip(d_pooled) {
            if at != NO_GRADIENT {
                d_z2[at as usize] = g;
            }
        }
    })?;
    let d_conv2_b = column_sums(&d_z2, C2);

    // conv2 one sample at a time, so that its columns' gradient `[576, 288]` stays in cache
    // for the col2im into conv1's output: the weight's gradient sums the samples in order.
    let mut d_h1 = vec![0f32; n * S1 * S1 * C1];
    let mut d_w2: Option<Tensor> = None;
    for ((d_z2, cols2), d_h1) in d_z2
        .chunks_exact(S2 * S2 * C2)
        .zip(&act.cols2)
        .zip(d_h1.chunks_exact_mut(S1 * S1 * C1))
    {
        let d_z2 = Tensor::from_slice(d_z2, (S2 * S2, C2), device)?;
        let g = d_z2.t()?.matmul(cols2)?;
        d_w2 = Some(match d_w2 {
            None => g,
            Some(sum) => (sum + g)?,
        });
        let d_cols2 = d_z2.matmul(&w.w2)?;
        with_cpu_f32s(&d_cols2, |d_cols2| col2im(d_cols2, 1, d_h1))?;
    }
    let d_w2 = d_w2.expect("at least one sample");
    let d_conv2_w = with_cpu_f32s(&d_w2, conv2_weight_from_khwc)?;

    // relu of conv1.
    for (d, &h) in d_h1.iter_mut().zip(&act.h1) {
        if h <= 0.0 {
            *d = 0.0;
        }
    }
    let d_conv1_b = column_sums(&d_h1, C1);
    let d_z1 = Tensor::from_vec(d_h1, (n * S1 * S1, C1), device)?;
    let cols1 = Tensor::from_vec(act.cols1, (n * S1 * S1, 9), device)?;
    let d_conv1_w = d_z1.t()?.matmul(&cols1)?;

    let parts = vec![
        d_conv1_w.flatten_all()?,
        Tensor::from_vec(d_conv1_b, C1, device)?,
        Tensor::from_vec(d_conv2_w, C2 * K2, device)?,
        Tensor::from_vec(d_conv2_b, C2, device)?,
        d_fc1_w.flatten_all()?,
        d_fc1_b,
        d_fc2_w.flatten_all()?,
        d_fc2_b,
    ];
    Ok((parts, act.logits, loss_sum))
}

/// The forward pass of a batch `[n, 784]`, keeping what the backward pass needs when `keep`
/// (else only the logits are meant to be read). The convolutions run one sample at a time, so
/// that a sample's im2col (0.7 MB) is still in cache when its matrix product reads it; the
/// fully connected layers take the whole batch at once.
fn forward(cnn: &Cnn, w: &Weights, x: &Tensor, keep: bool) -> Result<Activations> {
    let n = x.dim(0)?;
    let device = x.device();
    let mut pooled = vec![0f32; n * FLAT];
    let mut argmax = vec![NO_GRADIENT; if keep { n * FLAT } else { 0 }];
    let mut all_cols1 = Vec::with_capacity(if keep { n * S1 * S1 * 9 } else { 0 });
    let mut all_h1 = Vec::with_capacity(if keep { n * S1 * S1 * C1 } else { 0 });
    let mut all_cols2 = Vec::with_capacity(if keep { n } else { 0 });
    with_cpu_f32s(x, |x| -> Result<()> {
        for (s, image) in x.chunks_exact(SIDE * SIDE).take(n).enumerate() {
            // conv1: [676, 9] @ [9, 32], then bias and relu, channels last.
            let cols1 = im2col1(image, 1);
            if keep {
                all_cols1.extend_from_slice(&cols1);
            }
            let z1 = Tensor::from_vec(cols1, (S1 * S1, 9), device)?.matmul(&w.w1t)?;
            let h1 = with_cpu_f32s(&z1, |z1| bias_relu(z1, &w.b1))?;
            // conv2: [576, 288] @ [288, 64]; bias, relu and the 2x2 max-pool in one pass.
            let cols2 = Tensor::from_vec(im2col2(&h1, 1), (S2 * S2, K2), device)?;
            let z2 = cols2.matmul(&w.w2t)?;
            let out = s * FLAT..(s + 1) * FLAT;
            let sample_argmax = if keep {
                Some(&mut argmax[out.clone()])
            } else {
                None
            };
            with_cpu_f32s(&z2, |z2| {
                bias_relu_max_pool(
                    z2,
                    &w.b2,
                    &mut pooled[out],
                    sample_argmax,
                    (s * S2 * S2 * C2) as u32,
                )
            })?;
            if keep {
                all_h1.extend_from_slice(&h1);
                all_cols2.push(cols2);
            }
        }
        Ok(())
    })??;
    let pooled = Tensor::from_vec(pooled, (n, FLAT), device)?;
    let a1 = cnn.fc1.forward(&pooled)?.relu()?;
    let logits = cnn.fc2.forward(&a1)?;
    Ok(Activations {
        cols1: all_cols1,
        h1: all_h1,
        cols2: all_cols2,
        argmax,
        pooled,
        a1,
        logits,
    })
}

/// conv2's weight `[64, 32, 3, 3]` as `[64, 288]` with columns in `(kh, kw, c)` order, the
/// order of [`im2col2`]'s columns.
fn conv2_weight_khwc(w: &Tensor) -> Result<Tensor> {
    w.permute((0, 2, 3, 1))?.reshape((C2, K2))
}

/// The inverse of [`conv2_weight_khwc`] for a gradient `[64, 288]`: PyTorch's
/// `[64, 32, 3, 3]` order, flattened.
fn conv2_weight_from_khwc(g: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; C2 * K2];
    for o in 0..C2 {
        for k in 0..9 {
            for c in 0..C1 {
                out[o * K2 + c * 9 + k] = g[o * K2 + k * C1 + c];
            }
        }
    }
    out
}

/// conv1's im2col: for each output pixel `(b, i, j)` its 3×3 input window, `[n * 676, 9]`.
fn im2col1(x: &[f32], n: usize) -> Vec<f32> {
    let mut cols = Vec::with_capacity(n * S1 * S1 * 9);
    for image in x.chunks_exact(SIDE * SIDE).take(n) {
        for i in 0..S1 {
            for j in 0..S1 {
                for kh in 0..3 {
                    let row = (i + kh) * SIDE + j;
                    cols.extend_from_slice(&image[row..row + 3]);
                }
            }
        }
    }
    cols
}

/// conv2's im2col over channels-last `h1`: for each output pixel, the window's three rows of
/// `3 * 32` contiguous values, `[n * 576, 288]` in `(kh, kw, c)` order.
fn im2col2(h1: &[f32], n: usize) -> Vec<f32> {
    const RUN: usize = 3 * C1;
    let mut cols = Vec::with_capacity(n * S2 * S2 * K2);
    for image in h1.chunks_exact(S1 * S1 * C1).take(n) {
        for i in 0..S2 {
            for j in 0..S2 {
                for kh in 0..3 {
                    let at = ((i + kh) * S1 + j) * C1;
                    cols.extend_from_slice(&image[at..at + RUN]);
                }
            }
        }
    }
    cols
}

/// The adjoint of [`im2col2`]: adds each column gradient back to the conv1 output it was
/// copied from, in a fixed order.
fn col2im(d_cols: &[f32], n: usize, d_h1: &mut [f32]) {
    const RUN: usize = 3 * C1;
    let images = d_h1.chunks_exact_mut(S1 * S1 * C1).take(n);
    for (image, d_cols) in images.zip(d_cols.chunks_exact(S2 * S2 * K2)) {
        for (p, row) in d_cols.chunks_exact(K2).enumerate() {
            let (i, j) = (p / S2, p % S2);
            for (kh, run) in row.chunks_exact(RUN).enumerate() {
                let at = ((i + kh) * S1 + j) * C1;
                for (d, &g) in image[at..at + RUN].iter_mut().zip(run) {
                    *d += g;
                }
            }
        }
    }
}

/// `relu(z + b)` over rows of `b.len()` channels.
fn bias_relu(z: &[f32], b: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(z.len());
    for row in z.chunks_exact(b.len()) {
        out.extend(row.iter().zip(b).map(|(&z, &b)| (z + b).max(0.0)));
    }
    out
}

/// `relu(z + b)` of one sample's conv2 output `[24, 24, 64]` pooled over 2×2 windows into
/// `pooled` (`[9216]`, NCHW order) and, when given, for each pooled value the index of the
/// window's first maximum in the batch's conv2 output (`base` plus its index in `z`), or
/// [`NO_GRADIENT`] when that maximum is not positive. The channel loop has no branch, so it
/// runs as vector code.
fn bias_relu_max_pool(
    z: &[f32],
    b: &[f32],
    pooled: &mut [f32],
    mut argmax: Option<&mut [u32]>,
    base: u32,
) {
    let b: &[f32; C2] = b.try_into().expect("one bias per channel");
    let mut best = [0f32; C2];
    let mut which = [0u32; C2];
    for i in 0..SP {
        for j in 0..SP {
            let at = |di: usize, dj: usize| ((2 * i + di) * S2 + 2 * j + dj) * C2;
            let window = [at(0, 0), at(0, 1), at(1, 0), at(1, 1)];
            let row = |w: usize| -> &[f32; C2] {
                z[window[w]..window[w] + C2].try_into().expect("a row")
            };
            let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
            for c in 0..C2 {
                let mut m = r0[c] + b[c];
                let mut k = 0u32;
                let v = r1[c] + b[c];
                if v > m {
                    m = v;
                    k = 1;
                }
                let v = r2[c] + b[c];
                if v > m {
                    m = v;
                    k = 2;
                }
                let v = r3[c] + b[c];
                if v > m {
                    m = v;
                    k = 3;
                }
                best[c] = m;
                which[c] = k;
            }
            for c in 0..C2 {
                let out = (c * SP + i) * SP + j;
                let positive = best[c] > 0.0;
                pooled[out] = if positive { best[c] } else { 0.0 };
                if let Some(argmax) = argmax.as_deref_mut() {
                    argmax[out] = if positive {
                        base + (window[which[c] as usize] + c) as u32
                    } else {
                        NO_GRADIENT
                    };
                }
            }
        }
    }
}

/// Sums of the columns of a row-major matrix with `width` columns, row by row in order.
fn column_sums(m: &[f32], width: usize) -> Vec<f32> {
    let mut sums = vec![0f32; width];
    for row in m.chunks_exact(width) {
        for (s, &v) in sums.iter_mut().zip(row) {
            *s += v;
        }
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[test]
    fn col2im_is_the_adjoint_of_im2col() {
        // <im2col(h), c> = <h, col2im(c)> for any h and c: the backward pass of the gather.
        let n = 2;
        let h = values(n * S1 * S1 * C1, 1);
        let c = values(n * S2 * S2 * K2, 2);
        let mut back = vec![0f32; h.len()];
        col2im(&c, n, &mut back);
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let (lhs, rhs): (f64, f64) = (dot(&im2col2(&h, n), &c), dot(&h, &back));
        assert!(
            (lhs - rhs).abs() < 1e-6 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
    }

    #[test]
    fn conv2_weights_round_trip_through_the_column_order() {
        let w = values(C2 * K2, 3);
        let t = Tensor::from_vec(w.clone(), (C2, C1, 3, 3), &candle_core::Device::Cpu).unwrap();
        let khwc = conv2_weight_khwc(&t).unwrap().flatten_all().unwrap();
        assert_eq!(conv2_weight_from_khwc(&khwc.to_vec1::<f32>().unwrap()), w);
    }

    #[test]
    fn the_pool_routes_to_the_first_positive_maximum() {
        let n = 1;
        let mut z = vec![-1f32; n * S2 * S2 * C2];
        let at = |i: usize, j: usize, c: usize| (i * S2 + j) * C2 + c;
        // Channel 0, window (0, 0): a tie between (0, 1) and (1, 0); the first wins.
        z[at(0, 1, 0)] = 2.0;
        z[at(1, 0, 0)] = 2.0;
        // Channel 1, window (0, 0): every value ties at the bias, 0 after relu.
        for (i, j) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            z[at(i, j, 1)] = 0.0;
        }
        let b = vec![0f32; C2];
        let mut pooled = vec![-1f32; FLAT];
        let mut argmax = vec![0u32; FLAT];
        bias_relu_max_pool(&z, &b, &mut pooled, Some(&mut argmax), 0);
        assert_eq!((pooled[0], argmax[0]), (2.0, at(0, 1, 0) as u32));
        let channel1 = SP * SP;
        assert_eq!((pooled[channel1], argmax[channel1]), (0.0, NO_GRADIENT));
        assert!(argmax[1..channel1].iter().all(|&a| a == NO_GRADIENT));
        // Every pooled value is written (relu: none negative).
        assert!(pooled.iter().all(|&v| v >= 0.0));
        // A later sample's indices count from its place in the batch.
        bias_relu_max_pool(&z, &b, &mut pooled, Some(&mut argmax), 1000);
        assert_eq!(argmax[0], 1000 + at(0, 1, 0) as u32);
    }
}
