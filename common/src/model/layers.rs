//! The two kinds of layer the networks are made of, as small named structs built over a
//! candle `VarBuilder` (the way candle's examples build theirs): the builder's prefix gives a
//! layer its PyTorch name (`fc1`), and the layer asks it for `weight` and `bias` in PyTorch's
//! shapes. A [`LayerSpec`] says the same without any tensor, for the parameter layout.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// A layer's name and size, from which its parameters' names and shapes follow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerSpec {
    /// A fully connected layer, `y = x Wᵀ + b`.
    Linear {
        /// PyTorch's name of the layer (`fc1`).
        name: String,
        /// Input features.
        inputs: usize,
        /// Output features.
        outputs: usize,
    },
    /// A square convolution with stride 1 and no padding.
    Conv2d {
        /// PyTorch's name of the layer (`conv1`).
        name: String,
        /// Input channels.
        in_channels: usize,
        /// Output channels.
        out_channels: usize,
        /// Side of the kernel.
        kernel: usize,
    },
}

impl LayerSpec {
    /// The layer's parameters in the order PyTorch lists them: `<name>.weight`, `<name>.bias`,
    /// with their shapes.
    pub fn tensors(&self) -> [(String, Vec<usize>); 2] {
        let (name, [weight, bias]) = match self {
            LayerSpec::Linear {
                name,
                inputs,
                outputs,
            } => (name, Linear::shapes(*inputs, *outputs)),
            LayerSpec::Conv2d {
                name,
                in_channels,
                out_channels,
                kernel,
            } => (name, Conv2d::shapes(*in_channels, *out_channels, *kernel)),
        };
        [
            (format!("{name}.weight"), weight),
            (format!("{name}.bias"), bias),
        ]
    }
}

/// A fully connected layer: weight `[outputs, inputs]`, bias `[outputs]`.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// The layer whose parameters `vb` holds under its prefix.
    pub fn new(vb: VarBuilder, inputs: usize, outputs: usize) -> Result<Self> {
        let [weight, bias] = Self::shapes(inputs, outputs);
        Ok(Self {
            weight: vb.get(weight, "weight")?,
            bias: vb.get(bias, "bias")?,
        })
    }

    /// PyTorch's shapes of the weight and the bias.
    fn shapes(inputs: usize, outputs: usize) -> [Vec<usize>; 2] {
        [vec![outputs, inputs], vec![outputs]]
    }

    /// The weight, `[outputs, inputs]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, `[outputs]`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
}

impl Module for Linear {
    /// `[n, inputs]` to `[n, outputs]`, computed as `(W xᵀ)ᵀ`: the gemm crate works out a
    /// row-major product as its transpose, and this way round the weight is read where it
    /// lies, where `x Wᵀ` first gathered all of it, value by value, into a packed copy (36% of
    /// a worker's time on `mlp:2048,2048`).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.weight.matmul(&x.t()?)?.t()?.broadcast_add(&self.bias)
    }
}

/// A square convolution with stride 1 and no padding: weight `[out, in, k, k]`, bias `[out]`.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
}

impl Conv2d {
    /// The layer whose parameters `vb` holds under its prefix.
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
    ) -> Result<Self> {
        let [weight, bias] = Self::shapes(in_channels, out_channels, kernel);
        Ok(Self {
            weight: vb.get(weight, "weight")?,
            bias: vb.get(bias, "bias")?,
        })
    }

    /// PyTorch's shapes of the weight and the bias.
    fn shapes(in_channels: usize, out_channels: usize, kernel: usize) -> [Vec<usize>; 2] {
        [
            vec![out_channels, in_channels, kernel, kernel],
            vec![out_channels],
        ]
    }

    /// The weight, `[out, in, k, k]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, `[out]`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }
}

impl Module for Conv2d {
    /// `[n, in, h, w]` to `[n, out, h - k + 1, w - k + 1]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let channels = self.bias.dim(0)?;
        x.conv2d(&self.weight, 0, 1, 1, 1)?
            .broadcast_add(&self.bias.reshape((1, channels, 1, 1))?)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device};

    use super::*;

    #[test]
    fn a_layer_takes_its_parameters_by_name_and_refuses_other_shapes() {
        let device = Device::Cpu;
        let tensors = HashMap::from([
            (
                "fc.weight".to_string(),
                Tensor::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &device).unwrap(),
            ),
            (
                "fc.bias".to_string(),
                Tensor::new(&[0.5f32, -0.5, 1.0], &device).unwrap(),
            ),
        ]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let fc = Linear::new(vb.pp("fc"), 2, 3).unwrap();
        let x = Tensor::new(&[[1f32, 1.0]], &device).unwrap();
        assert_eq!(
            fc.forward(&x).unwrap().to_vec2::<f32>().unwrap(),
            [[3.5, 6.5, 12.0]]
        );
        assert!(Linear::new(vb.pp("fc"), 3, 2).is_err(), "transposed shape");
        assert!(Linear::new(vb.pp("fc2"), 2, 3).is_err(), "missing name");
    }

    #[test]
    fn specs_name_the_parameters_as_pytorch_does() {
        let conv = LayerSpec::Conv2d {
            name: "conv1".into(),
            in_channels: 1,
            out_channels: 32,
            kernel: 3,
        };
        assert_eq!(
            conv.tensors(),
            [
                ("conv1.weight".to_string(), vec![32, 1, 3, 3]),
                ("conv1.bias".to_string(), vec![32]),
            ]
        );
        let fc = LayerSpec::Linear {
            name: "fc".into(),
            inputs: 784,
            outputs: 10,
        };
        assert_eq!(fc.tensors()[0], ("fc.weight".to_string(), vec![10, 784]));
    }
}
