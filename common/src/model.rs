//! The networks, written as plain functions of a parameter list so that the same code serves
//! a worker (parameters as candle `Var`s, with autograd) and the coordinator's evaluation
//! (parameters as plain tensors built from its flat buffer).
//!
//! Parameter names and shapes are PyTorch's (`fc1.weight` is `[out, in]`), so
//! `model.safetensors` loads into the equivalent `torch.nn.Module` with `load_state_dict`.

use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::codec::{layout_len, pack_layout, TensorSpec};
use crate::config::{Activation, ModelConfig, ModelKind};
use crate::mnist::IMAGE_PIXELS;

mod cnn;

/// Number of classes.
pub const CLASSES: usize = 10;

/// The number of parameters `config` describes, computed without building anything, so a
/// configuration can be checked before it is trusted; `None` when it does not even fit a
/// `u64`. The same count as [`Network::num_params`] (tested).
pub fn parameter_count(config: &ModelConfig) -> Option<u64> {
    match config.kind {
        ModelKind::Cnn => Some(Network::new(config).num_params() as u64),
        ModelKind::Mlp => {
            let sizes: Vec<u64> = std::iter::once(IMAGE_PIXELS)
                .chain(config.hidden.iter().copied())
                .chain(std::iter::once(CLASSES))
                .map(|s| s as u64)
                .collect();
            sizes.windows(2).try_fold(0u64, |total, w| {
                w[0].checked_mul(w[1])?
                    .checked_add(w[1])?
                    .checked_add(total)
            })
        }
    }
}

/// A network architecture and its parameter layout.
#[derive(Clone, Debug)]
pub struct Network {
    config: ModelConfig,
    layout: Vec<TensorSpec>,
}

impl Network {
    /// The network a configuration describes.
    pub fn new(config: &ModelConfig) -> Self {
        let shapes: Vec<(String, Vec<usize>)> = match config.kind {
            ModelKind::Mlp => {
                let mut sizes = vec![IMAGE_PIXELS];
                sizes.extend(&config.hidden);
                sizes.push(CLASSES);
                let single = sizes.len() == 2;
                sizes
                    .windows(2)
                    .enumerate()
                    .flat_map(|(i, w)| {
                        let name = if single {
                            "fc".to_string()
                        } else {
                            format!("fc{}", i + 1)
                        };
                        [
                            (format!("{name}.weight"), vec![w[1], w[0]]),
                            (format!("{name}.bias"), vec![w[1]]),
                        ]
                    })
                    .collect()
            }
            ModelKind::Cnn => vec![
                ("conv1.weight".into(), vec![32, 1, 3, 3]),
                ("conv1.bias".into(), vec![32]),
                ("conv2.weight".into(), vec![64, 32, 3, 3]),
                ("conv2.bias".into(), vec![64]),
                ("fc1.weight".into(), vec![128, 9216]),
                ("fc1.bias".into(), vec![128]),
                ("fc2.weight".into(), vec![10, 128]),
                ("fc2.bias".into(), vec![10]),
            ],
        };
        let borrowed: Vec<(&str, Vec<usize>)> = shapes
            .iter()
            .map(|(n, s)| (n.as_str(), s.clone()))
            .collect();
        Self {
            config: config.clone(),
            layout: pack_layout(&borrowed),
        }
    }

    /// Names, shapes and offsets of the parameters in the flat buffer.
    pub fn layout(&self) -> &[TensorSpec] {
        &self.layout
    }

    /// Total number of parameters.
    pub fn num_params(&self) -> usize {
        layout_len(&self.layout)
    }

    /// PyTorch's default initialisation (uniform in ±1/√fan_in for weights and biases of
    /// `Linear` and `Conv2d`), drawn from a generator seeded by `seed`.
    pub fn init_params(&self, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(0);
        let mut flat = vec![0.0f32; self.num_params()];
        let mut fan_in = 1;
        for spec in &self.layout {
            if spec.name.ends_with(".weight") {
                fan_in = spec.shape[1..].iter().product::<usize>();
            }
            let bound = 1.0 / (fan_in as f32).sqrt();
            for v in &mut flat[spec.range()] {
                *v = rng.random_range(-bound..bound);
            }
        }
        flat
    }

    /// Logits `[n, 10]` for a batch of inputs `[n, 784]`; `params` in layout order.
    pub fn forward(&self, params: &[Tensor], x: &Tensor) -> candle_core::Result<Tensor> {
        let linear = |x: &Tensor, w: &Tensor, b: &Tensor| x.matmul(&w.t()?)?.broadcast_add(b);
        match self.config.kind {
            ModelKind::Mlp => {
                let layers = params.len() / 2;
                let mut h = x.clone();
                for i in 0..layers {
                    h = linear(&h, &params[2 * i], &params[2 * i + 1])?;
                    if i + 1 < layers {
                        h = self.activate(&h)?;
                    }
                }
                Ok(h)
            }
            ModelKind::Cnn => {
                let n = x.dim(0)?;
                let conv = |x: &Tensor, w: &Tensor, b: &Tensor| {
                    let channels = b.dim(0)?;
                    x.conv2d(w, 0, 1, 1, 1)?
                        .broadcast_add(&b.reshape((1, channels, 1, 1))?)?
                        .relu()
                };
                let h = x.reshape((n, 1, 28, 28))?;
                let h = conv(&h, &params[0], &params[1])?;
                let h = conv(&h, &params[2], &params[3])?;
                // A 2x2 max-pool as two max reductions: candle's `max_pool2d` backward scales
                // the gradient by the share of tied maxima (a quarter for a unique maximum),
                // a reduction's routes all of it to the maximum, as PyTorch's max-pool does.
                let (c, h_side, w_side) = (h.dim(1)?, h.dim(2)?, h.dim(3)?);
                let h = h
                    .reshape((n, c, h_side / 2, 2, w_side / 2, 2))?
                    .max(5)?
                    .max(3)?
                    .flatten_from(1)?;
                let h = linear(&h, &params[4], &params[5])?.relu()?;
                linear(&h, &params[6], &params[7])
            }
        }
    }

    /// Logits `[n, 10]` of a batch `[n, 784]` by the fastest pass the device has: the CNN's
    /// explicit im2col pass on a CPU (see [`cnn`]), [`Network::forward`] otherwise. What
    /// evaluation and prediction use; training's gradients have passes of their own.
    pub fn logits(&self, params: &[Tensor], x: &Tensor) -> candle_core::Result<Tensor> {
        if self.config.kind == ModelKind::Cnn && x.device().is_cpu() {
            cnn::logits(params, x)
        } else {
            self.forward(params, x)
        }
    }

    fn activate(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        match self.config.activation {
            Activation::Relu => h.relu(),
            Activation::Sigmoid => candle_nn::ops::sigmoid(h),
            Activation::Tanh => h.tanh(),
            Activation::Gelu => h.gelu(),
            Activation::LeakyRelu => candle_nn::ops::leaky_relu(h, self.config.leaky_slope),
        }
    }

    /// Builds plain tensors from a flat buffer, in layout order.
    pub fn tensors_from_flat(
        &self,
        flat: &[f32],
        device: &Device,
    ) -> candle_core::Result<Vec<Tensor>> {
        self.layout
            .iter()
            .map(|s| Tensor::from_slice(&flat[s.range()], s.shape.as_slice(), device))
            .collect()
    }
}

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

/// Builds the input and label tensors of a batch of `u8` pixels.
pub fn batch_tensors(
    pixels: &[u8],
    labels: &[u8],
    normalize: bool,
    device: &Device,
    scratch: &mut Vec<f32>,
) -> candle_core::Result<(Tensor, Tensor)> {
    let n = labels.len();
    crate::mnist::pixels_to_f32(pixels, normalize, scratch);
    let x = Tensor::from_slice(scratch.as_slice(), (n, IMAGE_PIXELS), device)?;
    let y: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
    let y = Tensor::from_vec(y, n, device)?;
    Ok((x, y))
}

/// `[loss_sum, correct]` of a batch as a 2-element tensor on the batch's device (no host
/// synchronisation).
fn stats_tensor(
    logits: &Tensor,
    labels: &Tensor,
    loss_sum: &Tensor,
) -> candle_core::Result<Tensor> {
    let correct = logits
        .argmax(D::Minus1)?
        .eq(labels)?
        .to_dtype(DType::F32)?
        .sum_all()?;
    Tensor::stack(&[loss_sum.to_dtype(DType::F32)?, correct], 0)
}

impl BatchStats {
    /// Reads a `[loss_sum, correct]` tensor: one device-to-host copy.
    pub fn from_tensor(t: &Tensor, samples: u32) -> candle_core::Result<Self> {
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
}

fn stats(logits: &Tensor, labels: &Tensor, loss_sum: &Tensor) -> candle_core::Result<BatchStats> {
    BatchStats::from_tensor(
        &stats_tensor(logits, labels, loss_sum)?,
        labels.dim(0)? as u32,
    )
}

/// A gradient as one flattened tensor per parameter, in layout order.
pub struct Gradient {
    parts: Vec<Tensor>,
}

impl Gradient {
    /// The gradient of an empty shard: zeros in `network`'s layout.
    pub fn zeros(network: &Network, device: &Device) -> candle_core::Result<Self> {
        let parts = network
            .layout()
            .iter()
            .map(|s| Tensor::zeros(s.len(), DType::F32, device))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { parts })
    }

    /// The whole gradient as one flat tensor on its device (for device-side all-reduce).
    pub fn to_flat_tensor(&self) -> candle_core::Result<Tensor> {
        Tensor::cat(&self.parts, 0)
    }

    /// The whole gradient as little-endian `f32` bytes, copied once from the tensors.
    pub fn to_bytes(&self) -> candle_core::Result<Vec<u8>> {
        let len: usize = self.parts.iter().map(|p| p.elem_count()).sum();
        let mut out = Vec::with_capacity(len * 4);
        for p in &self.parts {
            crate::codec::encode_tensor_into(p, &mut out)?;
        }
        Ok(out)
    }

    /// The whole gradient as host `f32` values.
    pub fn to_vec(&self) -> candle_core::Result<Vec<f32>> {
        self.to_flat_tensor()?.to_vec1::<f32>()
    }
}

/// A worker's trainable copy of the network: parameters as tensors on a device.
pub struct Replica {
    network: Network,
    params: Vec<Tensor>,
    device: Device,
}

impl Replica {
    /// A replica with the given flat parameters on `device`.
    pub fn new(network: Network, flat: &[f32], device: Device) -> candle_core::Result<Self> {
        let mut r = Self {
            network,
            params: Vec::new(),
            device,
        };
        r.set_params(flat)?;
        Ok(r)
    }

    /// The device the replica computes on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The network.
    pub fn network(&self) -> &Network {
        &self.network
    }

    /// Replaces the parameters with a flat host buffer (one copy per tensor).
    pub fn set_params(&mut self, flat: &[f32]) -> candle_core::Result<()> {
        self.params = self.network.tensors_from_flat(flat, &self.device)?;
        Ok(())
    }

    /// Replaces the parameters with a flat tensor already on the device.
    pub fn set_params_from_tensor(&mut self, flat: &Tensor) -> candle_core::Result<()> {
        // Views into the flat tensor, no copies.
        self.params = self
            .network
            .layout()
            .iter()
            .map(|s| {
                flat.narrow(0, s.offset, s.len())?
                    .reshape(s.shape.as_slice())
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(())
    }

    /// Forward and backward on one batch: the gradient of the *summed* loss, flattened in
    /// layout order into one tensor on the device, plus the batch statistics.
    ///
    /// Fully connected networks with relu, leaky-relu, sigmoid or tanh use an explicit
    /// backward pass (candle's generic autograd also computes the gradient of the input
    /// batch, a third large matmul nobody needs, and allocates a zero tensor per node), and
    /// so does the convolutional network on the CPU (im2col and one matmul per convolution,
    /// see [`cnn`]); the others use autograd. Both give the same gradient up to rounding (see
    /// tests).
    pub fn gradient(&self, x: &Tensor, y: &Tensor) -> candle_core::Result<(Gradient, BatchStats)> {
        let (g, st) = self.gradient_lazy(x, y)?;
        Ok((g, BatchStats::from_tensor(&st, y.dim(0)? as u32)?))
    }

    /// Like [`Replica::gradient`], with the statistics left on the device as
    /// `[loss_sum, correct]`, so a GPU step needs no host synchronisation.
    pub fn gradient_lazy(&self, x: &Tensor, y: &Tensor) -> candle_core::Result<(Gradient, Tensor)> {
        let c = &self.network.config;
        match c.kind {
            ModelKind::Mlp if c.activation != Activation::Gelu => self.mlp_gradient(x, y),
            ModelKind::Cnn if self.device.is_cpu() => self.cnn_gradient(x, y),
            _ => self.autograd_gradient(x, y),
        }
    }

    /// Explicit backward pass of the convolutional network on the CPU (see [`cnn`]).
    fn cnn_gradient(&self, x: &Tensor, y: &Tensor) -> candle_core::Result<(Gradient, Tensor)> {
        let (parts, logits, loss_sum) = cnn::gradient(&self.params, x, y)?;
        let st = stats_tensor(&logits, y, &loss_sum)?;
        Ok((Gradient { parts }, st))
    }

    fn autograd_gradient(&self, x: &Tensor, y: &Tensor) -> candle_core::Result<(Gradient, Tensor)> {
        let vars = self
            .params
            .iter()
            .map(Var::from_tensor)
            .collect::<candle_core::Result<Vec<_>>>()?;
        let params: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let logits = self.network.forward(&params, x)?;
        let n = y.dim(0)? as f64;
        let loss_sum = (candle_nn::loss::cross_entropy(&logits, y)? * n)?;
        let grads = loss_sum.backward()?;
        let mut parts = Vec::with_capacity(vars.len());
        for (var, spec) in vars.iter().zip(self.network.layout()) {
            match grads.get(var.as_tensor()) {
                Some(g) => parts.push(g.flatten_all()?),
                None => parts.push(Tensor::zeros(spec.len(), DType::F32, &self.device)?),
            }
        }
        let st = stats_tensor(&logits, y, &loss_sum)?;
        Ok((Gradient { parts }, st))
    }

    /// Explicit backward pass of a fully connected network.
    fn mlp_gradient(&self, x: &Tensor, y: &Tensor) -> candle_core::Result<(Gradient, Tensor)> {
        let params = &self.params;
        let layers = params.len() / 2;
        // Forward, keeping each layer's input.
        let mut inputs = Vec::with_capacity(layers);
        let mut h = x.clone();
        for l in 0..layers {
            let z = h
                .matmul(&params[2 * l].t()?)?
                .broadcast_add(&params[2 * l + 1])?;
            inputs.push(h);
            h = if l + 1 < layers {
                self.network.activate(&z)?
            } else {
                z
            };
        }
        let logits = h;
        let (loss_sum, mut dz) = summed_cross_entropy(&logits, y)?;
        let mut parts: Vec<Tensor> = Vec::with_capacity(2 * layers);
        for l in (0..layers).rev() {
            let input = &inputs[l];
            parts.push(dz.sum(0)?);
            parts.push(dz.t()?.matmul(input)?.flatten_all()?);
            if l > 0 {
                let da = dz.matmul(&params[2 * l])?;
                dz = (da * self.activation_slope(input)?)?;
            }
        }
        parts.reverse();
        // Parts were pushed bias-then-weight per layer, so after reversing they are in
        // layout order (weight, bias, weight, bias, ...).
        let st = stats_tensor(&logits, y, &loss_sum)?;
        Ok((Gradient { parts }, st))
    }

    /// The derivative of the activation, expressed through its output `a`.
    fn activation_slope(&self, a: &Tensor) -> candle_core::Result<Tensor> {
        let c = &self.network.config;
        match c.activation {
            Activation::Relu => a.gt(0f32)?.to_dtype(DType::F32),
            Activation::LeakyRelu => a
                .gt(0f32)?
                .to_dtype(DType::F32)?
                .affine(1.0 - c.leaky_slope, c.leaky_slope),
            Activation::Sigmoid => a.mul(&a.affine(-1.0, 1.0)?),
            Activation::Tanh => a.sqr()?.affine(-1.0, 1.0),
            Activation::Gelu => Err(candle_core::Error::Msg(
                "gelu has no explicit backward".into(),
            )),
        }
    }
}

/// The summed cross-entropy of `logits` `[n, 10]` against labels `y` `[n]`, and its gradient
/// with respect to the logits: softmax minus one-hot.
fn summed_cross_entropy(logits: &Tensor, y: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
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
    let params = network.tensors_from_flat(flat, device)?;
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
        let logits = network.logits(&params, &x)?;
        let loss_sum = (candle_nn::loss::cross_entropy(&logits, &y)? * (end - start) as f64)?;
        let s = stats(&logits, &y, &loss_sum)?;
        on_logits(&logits)?;
        total.loss_sum += s.loss_sum;
        total.correct += s.correct;
        total.samples += s.samples;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{JobConfig, PRESETS};

    #[test]
    fn the_parameter_count_is_the_layouts_and_does_not_overflow() {
        for p in PRESETS {
            let model = JobConfig::preset(p).unwrap().model;
            assert_eq!(
                parameter_count(&model),
                Some(Network::new(&model).num_params() as u64),
                "{p}"
            );
        }
        let mut huge = JobConfig::preset("mlp").unwrap().model;
        huge.hidden = vec![100_000_000];
        assert_eq!(parameter_count(&huge), Some(79_500_000_010));
        huge.hidden = vec![usize::MAX, usize::MAX];
        assert_eq!(parameter_count(&huge), None);
    }

    #[test]
    fn layouts_have_pytorch_names_and_shapes() {
        let mlp = Network::new(&JobConfig::preset("mlp").unwrap().model);
        let names: Vec<&str> = mlp.layout().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "fc1.weight",
                "fc1.bias",
                "fc2.weight",
                "fc2.bias",
                "fc3.weight",
                "fc3.bias"
            ]
        );
        assert_eq!(mlp.layout()[0].shape, vec![100, 784]);
        assert_eq!(
            mlp.num_params(),
            784 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
        );
        let soft = Network::new(&JobConfig::preset("softmax").unwrap().model);
        assert_eq!(soft.layout()[0].name, "fc.weight");
        let cnn = Network::new(&JobConfig::preset("cnn").unwrap().model);
        assert_eq!(cnn.num_params(), 1_199_882);
    }

    #[test]
    fn every_preset_computes_a_gradient_of_the_right_size() {
        for p in PRESETS {
            let net = Network::new(&JobConfig::preset(p).unwrap().model);
            let flat = net.init_params(1);
            let replica = Replica::new(net.clone(), &flat, Device::Cpu).unwrap();
            let pixels: Vec<u8> = (0..3 * IMAGE_PIXELS).map(|i| (i % 251) as u8).collect();
            let (x, y) =
                batch_tensors(&pixels, &[1, 7, 3], true, &Device::Cpu, &mut Vec::new()).unwrap();
            let (g, st) = replica.gradient(&x, &y).unwrap();
            assert_eq!(g.to_vec().unwrap().len(), net.num_params(), "{p}");
            assert_eq!(
                g.to_bytes().unwrap(),
                crate::codec::le_bytes(&g.to_vec().unwrap()).into_owned()
            );
            assert_eq!(st.samples, 3);
            assert!(st.loss_sum > 0.0);
        }
    }

    #[test]
    fn summed_gradients_of_two_halves_equal_the_whole() {
        for preset in ["mlp", "cnn"] {
            summed_gradients_of_two_halves_equal_the_whole_for(preset);
        }
    }

    fn summed_gradients_of_two_halves_equal_the_whole_for(preset: &str) {
        let net = Network::new(&JobConfig::preset(preset).unwrap().model);
        let flat = net.init_params(3);
        let r = Replica::new(net.clone(), &flat, Device::Cpu).unwrap();
        let pixels: Vec<u8> = (0..4 * IMAGE_PIXELS).map(|i| (i * 7 % 256) as u8).collect();
        let labels = [0u8, 5, 9, 2];
        let mut s = Vec::new();
        let (x, y) = batch_tensors(&pixels, &labels, true, &Device::Cpu, &mut s).unwrap();
        let whole = r.gradient(&x, &y).unwrap().0.to_vec().unwrap();
        let (x1, y1) = batch_tensors(
            &pixels[..2 * IMAGE_PIXELS],
            &labels[..2],
            true,
            &Device::Cpu,
            &mut s,
        )
        .unwrap();
        let (x2, y2) = batch_tensors(
            &pixels[2 * IMAGE_PIXELS..],
            &labels[2..],
            true,
            &Device::Cpu,
            &mut s,
        )
        .unwrap();
        let a = r.gradient(&x1, &y1).unwrap().0.to_vec().unwrap();
        let b = r.gradient(&x2, &y2).unwrap().0.to_vec().unwrap();
        for i in 0..whole.len() {
            assert!(
                (whole[i] - (a[i] + b[i])).abs() <= 1e-4 * (1.0 + whole[i].abs()),
                "{preset} index {i}"
            );
        }
    }

    #[test]
    fn explicit_backward_matches_autograd() {
        for spec in [
            "mlp:30,20:relu",
            "mlp:30:sigmoid",
            "mlp:25:tanh",
            "mlp:40:leaky-relu=0.1",
            "linear",
        ] {
            let net = Network::new(&crate::config::ModelConfig::parse_spec(spec).unwrap());
            let flat = net.init_params(11);
            let r = Replica::new(net.clone(), &flat, Device::Cpu).unwrap();
            let pixels: Vec<u8> = (0..5 * IMAGE_PIXELS)
                .map(|i| (i * 13 % 256) as u8)
                .collect();
            let (x, y) = batch_tensors(
                &pixels,
                &[3, 1, 4, 1, 5],
                true,
                &Device::Cpu,
                &mut Vec::new(),
            )
            .unwrap();
            let (a, sa) = r.mlp_gradient(&x, &y).unwrap();
            let (b, sb) = r.autograd_gradient(&x, &y).unwrap();
            let (sa, sb) = (
                BatchStats::from_tensor(&sa, 5).unwrap(),
                BatchStats::from_tensor(&sb, 5).unwrap(),
            );
            let (a, b) = (a.to_vec().unwrap(), b.to_vec().unwrap());
            assert_elementwise_close(&a, &b, 1e-4, spec);
            assert!(
                (sa.loss_sum - sb.loss_sum).abs() < 1e-4 * sb.loss_sum,
                "{spec}"
            );
            assert_eq!(sa.correct, sb.correct);
        }
    }

    /// Asserts `a` equals `b` element by element up to `tolerance`, relative to each value.
    fn assert_elementwise_close(a: &[f32], b: &[f32], tolerance: f32, what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for i in 0..a.len() {
            assert!(
                (a[i] - b[i]).abs() <= tolerance * (1.0 + b[i].abs()),
                "{what} index {i}: {} vs {}",
                a[i],
                b[i]
            );
        }
    }

    /// A batch of `n` deterministic, image-like samples of the `cnn` preset's network.
    fn cnn_batch(n: usize) -> (Network, Vec<f32>, Tensor, Tensor) {
        let net = Network::new(&JobConfig::preset("cnn").unwrap().model);
        let flat = net.init_params(11);
        let pixels: Vec<u8> = (0..n * IMAGE_PIXELS)
            .map(|i| if i % 5 < 2 { 0 } else { (i * 13 % 256) as u8 })
            .collect();
        let labels: Vec<u8> = (0..n).map(|i| (i * 7 % 10) as u8).collect();
        let (x, y) = batch_tensors(&pixels, &labels, true, &Device::Cpu, &mut Vec::new()).unwrap();
        (net, flat, x, y)
    }

    /// Asserts `a` equals `b` up to float rounding, relative to each tensor's largest value.
    fn assert_close_per_tensor(net: &Network, a: &[f32], b: &[f32], tolerance: f32) {
        assert_eq!(a.len(), b.len());
        for spec in net.layout() {
            let (a, b) = (&a[spec.range()], &b[spec.range()]);
            let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(scale > 0.0, "{}: zero gradient", spec.name);
            for i in 0..a.len() {
                assert!(
                    (a[i] - b[i]).abs() <= tolerance * scale,
                    "{} index {i}: {} vs {} (largest {scale})",
                    spec.name,
                    a[i],
                    b[i]
                );
            }
        }
    }

    #[test]
    fn explicit_cnn_backward_matches_autograd() {
        // 70 samples: one chunk of 64 and one of 6.
        let (net, flat, x, y) = cnn_batch(70);
        let r = Replica::new(net.clone(), &flat, Device::Cpu).unwrap();
        let (a, sa) = r.cnn_gradient(&x, &y).unwrap();
        let (b, sb) = r.autograd_gradient(&x, &y).unwrap();
        let (sa, sb) = (
            BatchStats::from_tensor(&sa, 70).unwrap(),
            BatchStats::from_tensor(&sb, 70).unwrap(),
        );
        assert_close_per_tensor(&net, &a.to_vec().unwrap(), &b.to_vec().unwrap(), 1e-5);
        assert!((sa.loss_sum - sb.loss_sum).abs() < 1e-5 * sb.loss_sum);
        assert_eq!(sa.correct, sb.correct);
    }

    #[test]
    fn explicit_cnn_forward_matches_the_network() {
        let (net, flat, x, _) = cnn_batch(70);
        let params = net.tensors_from_flat(&flat, &Device::Cpu).unwrap();
        let a = cnn::logits(&params, &x).unwrap().flatten_all().unwrap();
        let b = net.forward(&params, &x).unwrap().flatten_all().unwrap();
        let (a, b) = (a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        assert_eq!(a.len(), 70 * CLASSES);
        assert_elementwise_close(&a, &b, 1e-5, "cnn logits");
    }

    /// The gradient is the loss's derivative (a finite difference along the convolutions'
    /// gradient), not merely autograd's: candle's own `max_pool2d` backward is a quarter of it.
    #[test]
    fn the_cnn_gradient_is_the_derivative_of_the_loss() {
        let (net, flat, x, y) = cnn_batch(4);
        let loss = |flat: &[f32]| {
            let params = net.tensors_from_flat(flat, &Device::Cpu).unwrap();
            let logits = net.forward(&params, &x).unwrap();
            let loss = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
            4.0 * loss.to_scalar::<f32>().unwrap() as f64
        };
        let r = Replica::new(net.clone(), &flat, Device::Cpu).unwrap();
        for gradient in [
            r.cnn_gradient(&x, &y).unwrap().0,
            r.autograd_gradient(&x, &y).unwrap().0,
        ] {
            let g = gradient.to_vec().unwrap();
            // Along the conv layers' gradient only (conv1 and conv2, weights and biases).
            let convs = 0..net.layout()[4].offset;
            let norm = g[convs.clone()]
                .iter()
                .map(|v| (*v as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let eps = 1e-2;
            let moved = |sign: f64| {
                let mut f = flat.clone();
                for i in convs.clone() {
                    f[i] += (sign * eps * g[i] as f64 / norm) as f32;
                }
                loss(&f)
            };
            let slope = (moved(1.0) - moved(-1.0)) / (2.0 * eps);
            assert!(
                (slope - norm).abs() < 0.05 * norm,
                "finite difference {slope}, gradient norm {norm}"
            );
        }
    }

    #[test]
    fn initialisation_is_seeded_and_bounded() {
        let net = Network::new(&JobConfig::preset("mlp").unwrap().model);
        let a = net.init_params(5);
        assert_eq!(a, net.init_params(5));
        assert_ne!(a, net.init_params(6));
        let bound = 1.0 / (784f32).sqrt();
        assert!(a[..784 * 100].iter().all(|v| v.abs() <= bound));
    }
}
