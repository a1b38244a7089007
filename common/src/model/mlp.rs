//! The fully connected network: a stack of [`Linear`] layers with an activation between them,
//! and its backward pass written out by hand (candle's generic autograd also computes the
//! gradient of the input batch, a third large matmul nobody needs, and allocates a zero tensor
//! per node).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::batch::stats_tensor;
use super::gradients::Gradients;
use super::layers::{LayerSpec, Linear};
use super::loss::summed_cross_entropy;
use super::network::CLASSES;
use crate::config::{Activation, ModelConfig};
use crate::mnist::IMAGE_PIXELS;

pub mod cpu;

/// The layer widths `config` describes, input and output included.
pub(super) fn sizes(config: &ModelConfig) -> Vec<usize> {
    std::iter::once(IMAGE_PIXELS)
        .chain(config.hidden.iter().copied())
        .chain(std::iter::once(CLASSES))
        .collect()
}

/// The layers `config` describes: `fc` alone for a single layer, else `fc1`, `fc2`, ...
pub(super) fn layers(config: &ModelConfig) -> Vec<LayerSpec> {
    let sizes = sizes(config);
    let single = sizes.len() == 2;
    sizes
        .windows(2)
        .enumerate()
        .map(|(i, w)| LayerSpec::Linear {
            name: if single {
                "fc".to_string()
            } else {
                format!("fc{}", i + 1)
            },
            inputs: w[0],
            outputs: w[1],
        })
        .collect()
}

/// A fully connected network with its parameters.
#[derive(Clone, Debug)]
pub struct Mlp {
    layers: Vec<Linear>,
    activation: Activation,
    leaky_slope: f64,
}

impl Mlp {
    /// The network of `layers` (all linear) whose parameters `vb` holds, with `config`'s
    /// activation.
    pub fn new(vb: VarBuilder, layers: &[LayerSpec], config: &ModelConfig) -> Result<Self> {
        let layers = layers
            .iter()
            .map(|spec| match spec {
                LayerSpec::Linear {
                    name,
                    inputs,
                    outputs,
                } => Linear::new(vb.pp(name), *inputs, *outputs),
                LayerSpec::Conv2d { name, .. } => Err(candle_core::Error::Msg(format!(
                    "a fully connected network has no convolution `{name}`"
                ))),
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            activation: config.activation,
            leaky_slope: config.leaky_slope,
        })
    }

    /// The layers, input first.
    pub fn layers(&self) -> &[Linear] {
        &self.layers
    }

    /// Whether [`Mlp::gradient`] can differentiate the activation (all but gelu).
    pub fn has_explicit_backward(&self) -> bool {
        self.activation != Activation::Gelu
    }

    /// The gradient of the summed loss of a batch `[n, 784]` with labels `y`, in layout order,
    /// and the batch's `[loss_sum, correct]` left on its device: on the CPU by [`cpu`]'s pass,
    /// elsewhere by [`Mlp::gradient_tensors`].
    pub fn gradient(&self, x: &Tensor, y: &Tensor) -> Result<(Gradients, Tensor)> {
        if x.device().is_cpu() {
            if let Some(done) = cpu::gradient(self, x, y)? {
                return Ok(done);
            }
        }
        self.gradient_tensors(x, y)
    }

    /// [`Mlp::gradient`] as tensor operations on the batch's device.
    pub fn gradient_tensors(&self, x: &Tensor, y: &Tensor) -> Result<(Gradients, Tensor)> {
        let count = self.layers.len();
        // Forward, keeping each layer's input.
        let mut inputs = Vec::with_capacity(count);
        let mut h = x.clone();
        for (l, layer) in self.layers.iter().enumerate() {
            let z = layer.forward(&h)?;
            inputs.push(h);
            h = if l + 1 < count { self.activate(&z)? } else { z };
        }
        let logits = h;
        let (loss_sum, mut dz) = summed_cross_entropy(&logits, y)?;
        let mut parts: Vec<Tensor> = Vec::with_capacity(2 * count);
        for (l, layer) in self.layers.iter().enumerate().rev() {
            let input = &inputs[l];
            parts.push(dz.sum(0)?);
            parts.push(dz.t()?.matmul(input)?.flatten_all()?);
            if l > 0 {
                let da = dz.matmul(layer.weight())?;
                dz = (da * self.activation_slope(input)?)?;
            }
        }
        parts.reverse();
        // Parts were pushed bias-then-weight per layer, so after reversing they are in
        // layout order (weight, bias, weight, bias, ...).
        let st = stats_tensor(&logits, y, &loss_sum)?;
        Ok((Gradients::from_parts(parts), st))
    }

    fn activate(&self, h: &Tensor) -> Result<Tensor> {
        match self.activation {
            Activation::Relu => h.relu(),
            Activation::Sigmoid => candle_nn::ops::sigmoid(h),
            Activation::Tanh => h.tanh(),
            Activation::Gelu => h.gelu(),
            Activation::LeakyRelu => candle_nn::ops::leaky_relu(h, self.leaky_slope),
        }
    }

    /// The derivative of the activation, expressed through its output `a`.
    fn activation_slope(&self, a: &Tensor) -> Result<Tensor> {
        match self.activation {
            Activation::Relu => a.gt(0f32)?.to_dtype(DType::F32),
            Activation::LeakyRelu => a
                .gt(0f32)?
                .to_dtype(DType::F32)?
                .affine(1.0 - self.leaky_slope, self.leaky_slope),
            Activation::Sigmoid => a.mul(&a.affine(-1.0, 1.0)?),
            Activation::Tanh => a.sqr()?.affine(-1.0, 1.0),
            Activation::Gelu => Err(candle_core::Error::Msg(
                "gelu has no explicit backward".into(),
            )),
        }
    }
}

impl Module for Mlp {
    /// Logits `[n, 10]` of a batch `[n, 784]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h)?;
            if i + 1 < self.layers.len() {
                h = self.activate(&h)?;
            }
        }
        Ok(h)
    }
}
