//! A worker's trainable copy of the network: its parameters as tensors on a device, the
//! [`Model`] built over them, and the gradient of a batch by the fastest pass it has.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::VarBuilder;

use super::batch::{stats_tensor, BatchStats};
use super::cnn;
use super::gradients::Gradients;
use super::loss::summed_cross_entropy_of_mean;
use super::network::{Model, Network};

/// A worker's trainable copy of the network: parameters as tensors on a device.
pub struct Replica {
    network: Network,
    /// The parameters under their names, what [`Replica::model`] was built over.
    params: HashMap<String, Tensor>,
    /// The flat tensor the parameters are views of, when [`Replica::set_params_from_tensor`]
    /// gave them.
    flat: Option<candle_core::TensorId>,
    model: Model,
    device: Device,
}

impl Replica {
    /// A replica with the given flat parameters on `device`.
    pub fn new(network: Network, flat: &[f32], device: Device) -> candle_core::Result<Self> {
        let params = network.tensors_from_flat(flat, &device)?;
        let model = network.model(VarBuilder::from_tensors(
            params.clone(),
            DType::F32,
            &device,
        ))?;
        Ok(Self {
            network,
            params,
            flat: None,
            model,
            device,
        })
    }

    /// The device the replica computes on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The network.
    pub fn network(&self) -> &Network {
        &self.network
    }

    /// The model over the current parameters.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Replaces the parameters with a flat host buffer (one copy per tensor).
    pub fn set_params(&mut self, flat: &[f32]) -> candle_core::Result<()> {
        let params = self.network.tensors_from_flat(flat, &self.device)?;
        self.flat = None;
        self.set_named(params)
    }

    /// Replaces the parameters with a flat tensor already on the device (views into it, no
    /// copies).
    pub fn set_params_from_tensor(&mut self, flat: &Tensor) -> candle_core::Result<()> {
        let params = self.network.tensors_from_tensor(flat)?;
        self.flat = Some(flat.id());
        self.set_named(params)
    }

    /// Whether the parameters are views of `flat` (given to [`Replica::set_params_from_tensor`]),
    /// so that updating its values in place updates them.
    pub fn shares_params(&self, flat: &Tensor) -> bool {
        self.flat == Some(flat.id())
    }

    fn set_named(&mut self, params: HashMap<String, Tensor>) -> candle_core::Result<()> {
        let vb = VarBuilder::from_tensors(params.clone(), DType::F32, &self.device);
        self.model = self.network.model(vb)?;
        self.params = params;
        Ok(())
    }

    /// Forward and backward on one batch: the gradient of the *summed* loss, in layout order,
    /// plus the batch statistics.
    ///
    /// Fully connected networks with relu, leaky-relu, sigmoid or tanh use an explicit
    /// backward pass (see [`Mlp`](super::Mlp)), and so does the convolutional network on the
    /// CPU (im2col and one matmul per convolution, see [`cnn::cpu`]); the others use autograd.
    /// Both give the same gradient up to rounding (see tests).
    pub fn gradient(&self, x: &Tensor, y: &Tensor) -> candle_core::Result<(Gradients, BatchStats)> {
        let (g, st) = self.gradient_lazy(x, y)?;
        Ok((g, BatchStats::from_tensor(&st, y.dim(0)? as u32)?))
    }

    /// Like [`Replica::gradient`], with the statistics left on the device as
    /// `[loss_sum, correct]`, so a GPU step needs no host synchronisation.
    pub fn gradient_lazy(
        &self,
        x: &Tensor,
        y: &Tensor,
    ) -> candle_core::Result<(Gradients, Tensor)> {
        match &self.model {
            Model::Mlp(mlp) if mlp.has_explicit_backward() => mlp.gradient(x, y),
            Model::Cnn(c) if self.device.is_cpu() => {
                let (gradients, logits, loss_sum) = cnn::cpu::gradient(c, x, y)?;
                Ok((gradients, stats_tensor(&logits, y, &loss_sum)?))
            }
            _ => self.autograd_gradient(x, y),
        }
    }

    /// The gradient by candle's autograd: the model rebuilt over `Var`s of the parameters.
    pub(super) fn autograd_gradient(
        &self,
        x: &Tensor,
        y: &Tensor,
    ) -> candle_core::Result<(Gradients, Tensor)> {
        let vars = self
            .params
            .iter()
            .map(|(name, t)| Ok((name.clone(), Var::from_tensor(t)?.into_inner())))
            .collect::<candle_core::Result<HashMap<_, _>>>()?;
        let vb = VarBuilder::from_tensors(vars.clone(), DType::F32, &self.device);
        let logits = self.network.model(vb)?.forward(x)?;
        let loss_sum = summed_cross_entropy_of_mean(&logits, y)?;
        let grads = loss_sum.backward()?;
        let parts = self
            .network
            .layout()
            .iter()
            .map(|spec| match grads.get(&vars[&spec.name]) {
                Some(g) => g.flatten_all(),
                None => Tensor::zeros(spec.len(), DType::F32, &self.device),
            })
            .collect::<candle_core::Result<_>>()?;
        let st = stats_tensor(&logits, y, &loss_sum)?;
        Ok((Gradients::from_parts(parts), st))
    }
}
