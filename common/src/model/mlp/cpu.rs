//! The fully connected network's forward and backward pass on the CPU, over the gemm crate
//! directly. Through candle a step of `mlp` was about fifty tensor operations, each allocating
//! its result and dispatching on its own (a third of a worker's time beside the products);
//! here it is one product per layer and direction into buffers of this pass, with the bias,
//! the activation, the loss and their derivatives as plain loops.
//!
//! Activations are kept feature-major (`[features, n]`): so laid out, every product reads the
//! weight where it lies and the gemm crate packs nothing larger than a batch. The gradient
//! comes out as one flat buffer in layout order (weight `[out, in]`, bias, per layer).
//! Every loop runs in a fixed order and gemm splits only rows and columns among threads,
//! never its sums, so the result does not depend on timing or on the thread count.

use candle_core::{CpuStorage, Result, Storage, Tensor};
use gemm::{gemm, Parallelism};

use super::Mlp;
use crate::config::Activation;
use crate::model::gradients::Gradients;

/// The gradient of the summed cross-entropy of a batch `[n, inputs]` with labels `y` (u32),
/// in layout order, and the batch's `[loss_sum, correct]`. `None` when the parameters or the
/// batch are not contiguous f32 CPU tensors (the caller then takes candle's path).
pub fn gradient(mlp: &Mlp, x: &Tensor, y: &Tensor) -> Result<Option<(Gradients, Tensor)>> {
    let device = x.device().clone();
    let labels = y.to_vec1::<u32>()?;
    // (outputs, inputs) of each layer, from its weight's shape.
    let sizes = mlp
        .layers()
        .iter()
        .map(|l| l.weight().dims2())
        .collect::<Result<Vec<_>>>()?;
    let classes = sizes.last().map_or(0, |&(out, _)| out);
    if let Some(l) = labels.iter().find(|&&l| l as usize >= classes) {
        candle_core::bail!("label {l} is not one of the network's {classes} classes");
    }
    let mut tensors = vec![x];
    for layer in mlp.layers() {
        tensors.push(layer.weight());
        tensors.push(layer.bias());
    }
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(tensors.len());
    for ((storage, layout), t) in guards.iter().zip(&tensors) {
        let (Storage::Cpu(CpuStorage::F32(values)), Some((start, end))) =
            (&**storage, layout.contiguous_offsets())
        else {
            return Ok(None);
        };
        debug_assert_eq!(end - start, t.elem_count());
        slices.push(&values[start..end]);
    }
    let (x, params) = slices.split_first().expect("the batch");
    let (flat, stats) = pass(mlp, &sizes, params, x, &labels);
    drop(guards);
    let len = flat.len();
    Ok(Some((
        Gradients::from_parts(vec![Tensor::from_vec(flat, len, &device)?]),
        Tensor::from_vec(stats.to_vec(), 2, &device)?,
    )))
}

/// The pass over host values: `sizes` holds each layer's (outputs, inputs), `params` its
/// weight and bias in turn.
fn pass(
    mlp: &Mlp,
    sizes: &[(usize, usize)],
    params: &[&[f32]],
    x: &[f32],
    labels: &[u32],
) -> (Vec<f32>, [f32; 2]) {
    let (layers, n) = (sizes.len(), labels.len());
    let act = Act::of(mlp);
    let threads = threads();

    // Forward. `outs[l]` is layer l's output after its activation (the logits for the
    // last), feature-major.
    let mut outs: Vec<Vec<f32>> = Vec::with_capacity(layers);
    for (l, &(out, inputs)) in sizes.iter().enumerate() {
        let (w, b) = (params[2 * l], params[2 * l + 1]);
        let mut z = vec![0f32; out * n];
        // z[o][s] = sum_i h[s][i] w[o][i]: z as an [n, out] matrix stored column-major.
        product(
            &mut z,
            (1, n),
            input(l, x, &outs, inputs, n),
            View::new(w, inputs, out, 1, inputs),
            threads,
        );
        let last = l + 1 == layers;
        for (row, &bias) in z.chunks_exact_mut(n).zip(b) {
            if last {
                row.iter_mut().for_each(|v| *v += bias);
            } else {
                row.iter_mut().for_each(|v| *v = act.apply(*v + bias));
            }
        }
        outs.push(z);
    }

    // The loss and its gradient with respect to the logits: softmax minus one-hot.
    let logits = outs.last().expect("a layer");
    let classes = sizes.last().map_or(0, |&(out, _)| out);
    let mut dz = vec![0f32; classes * n];
    let (mut loss_sum, mut correct) = (0f32, 0f32);
    for (s, &label) in labels.iter().enumerate() {
        let z = |c: usize| logits[c * n + s];
        let (mut max, mut best) = (z(0), 0);
        for c in 1..classes {
            if z(c) > max {
                (max, best) = (z(c), c);
            }
        }
        let sum: f32 = (0..classes).map(|c| (z(c) - max).exp()).sum();
        let log_sum = sum.ln();
        for c in 0..classes {
            let log_p = z(c) - max - log_sum;
            dz[c * n + s] = log_p.exp() - if c == label as usize { 1.0 } else { 0.0 };
        }
        loss_sum -= z(label as usize) - max - log_sum;
        if best == label as usize {
            correct += 1.0;
        }
    }

    // Backward, into the flat gradient. The logits' gradient is feature-major; every earlier
    // layer's is sample-major (`[n, features]`), which lets gemm split the weight's rows
    // among its widest kernels for that product.
    // Where each layer's weight starts in the flat gradient; its bias follows it.
    let mut offsets = Vec::with_capacity(layers);
    let mut total = 0;
    for &(out, inputs) in sizes {
        offsets.push(total);
        total += out * inputs + out;
    }
    let mut grad = vec![0f32; total];
    let mut sample_major = false;
    for l in (0..layers).rev() {
        let (out, inputs) = sizes[l];
        let (d_w, d_b) =
            grad[offsets[l]..offsets[l] + out * inputs + out].split_at_mut(out * inputs);
        // Strides of dz as an [out, n] matrix: (row, column).
        let (dz_rs, dz_cs) = if sample_major { (1, out) } else { (n, 1) };
        // The bias: each output's gradient summed over the samples in order.
        if sample_major {
            for row in dz.chunks_exact(out) {
                for (g, &v) in d_b.iter_mut().zip(row) {
                    *g += v;
                }
            }
        } else {
            for (g, row) in d_b.iter_mut().zip(dz.chunks_exact(n)) {
                *g = row.iter().sum();
            }
        }
        // d_w[o][i] = sum_s dz[o][s] h[s][i].
        product(
            d_w,
            (inputs, 1),
            View::new(&dz, out, n, dz_rs, dz_cs),
            input(l, x, &outs, inputs, n),
            threads,
        );
        if l > 0 {
            // da[s][i] = sum_o dz[o][s] w[o][i], sample-major, then through the activation.
            let w = params[2 * l];
            let mut da = vec![0f32; n * inputs];
            product(
                &mut da,
                (inputs, 1),
                View::new(&dz, n, out, dz_cs, dz_rs),
                View::new(w, out, inputs, inputs, 1),
                threads,
            );
            let a = &outs[l - 1];
            for (s, row) in da.chunks_exact_mut(inputs).enumerate() {
                for (i, d) in row.iter_mut().enumerate() {
                    *d *= act.slope(a[i * n + s]);
                }
            }
            dz = da;
            sample_major = true;
        }
    }
    (grad, [loss_sum, correct])
}

/// Layer `l`'s input as an `[n, inputs]` view: the batch (sample-major), or the layer
/// before's output (feature-major).
fn input<'a>(l: usize, x: &'a [f32], outs: &'a [Vec<f32>], inputs: usize, n: usize) -> View<'a> {
    match l {
        0 => View::new(x, n, inputs, inputs, 1),
        _ => View::new(&outs[l - 1], n, inputs, 1, n),
    }
}

/// A matrix over a slice: `rows × cols`, element `(r, c)` at `r * rs + c * cs`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        assert!(
            fits(data.len(), rows, cols, rs, cs),
            "a {rows} × {cols} view with strides ({rs}, {cs}) over {} values",
            data.len()
        );
        Self {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }
}

/// Whether every element of a `rows × cols` matrix with strides `(rs, cs)` lies in `len`
/// values.
fn fits(len: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < len
}

/// `dst = a · b`, with `dst` an `a.rows × b.cols` matrix of strides `(rs, cs)`.
fn product(dst: &mut [f32], (rs, cs): (usize, usize), a: View, b: View, threads: Parallelism) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert_eq!(k, b.rows, "the inner dimensions of a product");
    assert!(fits(dst.len(), m, n, rs, cs), "the product's destination");
    // SAFETY: every element of the three matrices lies in its slice (checked above and in
    // `View::new`), and `dst` is borrowed mutably apart from both operands.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            cs as isize,
            rs as isize,
            false,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            threads,
        );
    }
}

/// The hidden layers' activation, by its output.
#[derive(Clone, Copy)]
enum Act {
    Relu,
    Leaky(f32),
    Sigmoid,
    Tanh,
}

impl Act {
    fn of(mlp: &Mlp) -> Self {
        match mlp.activation {
            Activation::Relu => Act::Relu,
            Activation::LeakyRelu => Act::Leaky(mlp.leaky_slope as f32),
            Activation::Sigmoid => Act::Sigmoid,
            Activation::Tanh => Act::Tanh,
            Activation::Gelu => unreachable!("gelu takes autograd"),
        }
    }

    #[inline]
    fn apply(self, z: f32) -> f32 {
        match self {
            Act::Relu => z.max(0.0),
            Act::Leaky(slope) => {
                if z > 0.0 {
                    z
                } else {
                    z * slope
                }
            }
            Act::Sigmoid => 1.0 / (1.0 + (-z).exp()),
            Act::Tanh => z.tanh(),
        }
    }

    /// The derivative, expressed through the output `a`.
    #[inline]
    fn slope(self, a: f32) -> f32 {
        match self {
            Act::Relu => {
                if a > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Act::Leaky(slope) => {
                if a > 0.0 {
                    1.0
                } else {
                    slope
                }
            }
            Act::Sigmoid => a * (1.0 - a),
            Act::Tanh => 1.0 - a * a,
        }
    }
}

/// The thread count candle's own products use.
fn threads() -> Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use crate::config::JobConfig;
    use crate::model::{Model, Network};

    #[test]
    fn a_label_outside_the_classes_is_an_error_not_a_panic() {
        let net = Network::new(&JobConfig::preset("mlp").unwrap().model);
        let Model::Mlp(mlp) = net
            .model_from_flat(&net.init_params(1), &Device::Cpu)
            .unwrap()
        else {
            panic!("mlp is fully connected")
        };
        let x = Tensor::zeros((2, 784), DType::F32, &Device::Cpu).unwrap();
        let y = Tensor::new(&[3u32, 10], &Device::Cpu).unwrap();
        let e = super::gradient(&mlp, &x, &y).err().expect("refused");
        assert!(e.to_string().contains("label 10"), "{e}");
    }
}
