//! The network a configuration describes: its layers, the parameter layout they give (names,
//! shapes and offsets in the flat buffer, the same on the wire, in checkpoints and in the
//! optimizer's state), PyTorch's initialisation, and the [`Model`] of named layers built over
//! a flat buffer.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::cnn::{self, Cnn};
use super::layers::LayerSpec;
use super::mlp::{self, Mlp};
use crate::codec::{layout_len, pack_layout, TensorSpec};
use crate::config::{ModelConfig, ModelKind};

/// Number of classes.
pub const CLASSES: usize = 10;

/// The number of parameters `config` describes, computed without building anything, so a
/// configuration can be checked before it is trusted; `None` when it does not even fit a
/// `u64`. The same count as [`Network::num_params`] (tested).
pub fn parameter_count(config: &ModelConfig) -> Option<u64> {
    match config.kind {
        ModelKind::Cnn => Some(Network::new(config).num_params() as u64),
        ModelKind::Mlp => {
            let sizes: Vec<u64> = mlp::sizes(config).iter().map(|&s| s as u64).collect();
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
    layers: Vec<LayerSpec>,
    layout: Vec<TensorSpec>,
}

impl Network {
    /// The network a configuration describes.
    pub fn new(config: &ModelConfig) -> Self {
        let layers = match config.kind {
            ModelKind::Mlp => mlp::layers(config),
            ModelKind::Cnn => cnn::layers(),
        };
        let shapes: Vec<(String, Vec<usize>)> =
            layers.iter().flat_map(LayerSpec::tensors).collect();
        let borrowed: Vec<(&str, Vec<usize>)> = shapes
            .iter()
            .map(|(n, s)| (n.as_str(), s.clone()))
            .collect();
        Self {
            config: config.clone(),
            layers,
            layout: pack_layout(&borrowed),
        }
    }

    /// The configuration the network was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.config
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

    /// The parameters of a flat host buffer as tensors on `device` under their names (one
    /// copy per tensor).
    pub fn tensors_from_flat(
        &self,
        flat: &[f32],
        device: &Device,
    ) -> candle_core::Result<HashMap<String, Tensor>> {
        self.layout
            .iter()
            .map(|s| {
                let t = Tensor::from_slice(&flat[s.range()], s.shape.as_slice(), device)?;
                Ok((s.name.clone(), t))
            })
            .collect()
    }

    /// The parameters of a flat tensor under their names, as views into it (no copies).
    pub fn tensors_from_tensor(
        &self,
        flat: &Tensor,
    ) -> candle_core::Result<HashMap<String, Tensor>> {
        self.layout
            .iter()
            .map(|s| {
                let t = flat
                    .narrow(0, s.offset, s.len())?
                    .reshape(s.shape.as_slice())?;
                Ok((s.name.clone(), t))
            })
            .collect()
    }

    /// The model whose parameters `vb` holds under their PyTorch names.
    pub fn model(&self, vb: VarBuilder) -> candle_core::Result<Model> {
        Ok(match self.config.kind {
            ModelKind::Mlp => Model::Mlp(Mlp::new(vb, &self.layers, &self.config)?),
            ModelKind::Cnn => Model::Cnn(Cnn::new(vb)?),
        })
    }

    /// The model of a flat host buffer's parameters, on `device`.
    pub fn model_from_flat(&self, flat: &[f32], device: &Device) -> candle_core::Result<Model> {
        let tensors = self.tensors_from_flat(flat, device)?;
        self.model(VarBuilder::from_tensors(tensors, DType::F32, device))
    }
}

/// A network with its parameters: a struct of named layers per architecture.
#[derive(Clone, Debug)]
pub enum Model {
    /// A fully connected network.
    Mlp(Mlp),
    /// The convolutional network.
    Cnn(Cnn),
}

impl Module for Model {
    /// Logits `[n, 10]` for a batch of inputs `[n, 784]`, by candle's operations (so autograd
    /// can differentiate it, on any device).
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Model::Mlp(m) => m.forward(x),
            Model::Cnn(c) => c.forward(x),
        }
    }
}

impl Model {
    /// Logits `[n, 10]` of a batch `[n, 784]` by the fastest pass the device has: the CNN's
    /// explicit im2col pass on a CPU (see [`cnn::cpu`]), [`Module::forward`] otherwise. What
    /// evaluation and prediction use; training's gradients have passes of their own.
    pub fn logits(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Model::Cnn(c) if x.device().is_cpu() => cnn::cpu::logits(c, x),
            _ => self.forward(x),
        }
    }
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
        let layout: Vec<(&str, &[usize], usize)> = cnn
            .layout()
            .iter()
            .map(|s| (s.name.as_str(), s.shape.as_slice(), s.offset))
            .collect();
        assert_eq!(
            layout,
            [
                ("conv1.weight", &[32, 1, 3, 3][..], 0),
                ("conv1.bias", &[32][..], 288),
                ("conv2.weight", &[64, 32, 3, 3][..], 320),
                ("conv2.bias", &[64][..], 18_752),
                ("fc1.weight", &[128, 9216][..], 18_816),
                ("fc1.bias", &[128][..], 1_198_464),
                ("fc2.weight", &[10, 128][..], 1_198_592),
                ("fc2.bias", &[10][..], 1_199_872),
            ]
        );
        assert_eq!(cnn.num_params(), 1_199_882);
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

    #[test]
    fn a_model_is_built_from_the_buffer_by_name() {
        let net = Network::new(&JobConfig::preset("mlp").unwrap().model);
        let flat = net.init_params(2);
        let Model::Mlp(mlp) = net.model_from_flat(&flat, &Device::Cpu).unwrap() else {
            panic!("the mlp preset builds an Mlp");
        };
        let fc3_bias = &net.layout()[5];
        assert_eq!(fc3_bias.name, "fc3.bias");
        assert_eq!(
            mlp.layers()[2].bias().to_vec1::<f32>().unwrap(),
            &flat[fc3_bias.range()]
        );
        let from_tensor = net
            .tensors_from_tensor(&Tensor::new(flat.as_slice(), &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(
            from_tensor["fc2.weight"].to_vec2::<f32>().unwrap(),
            net.tensors_from_flat(&flat, &Device::Cpu).unwrap()["fc2.weight"]
                .to_vec2::<f32>()
                .unwrap()
        );
    }
}
