//! The `cnn` preset's convolutional network: two 3×3 convolutions with relu, a 2×2 max-pool,
//! and two fully connected layers, as named layers built over a `VarBuilder`. Its forward pass
//! here is candle's operations, for autograd and other devices; [`cpu`] holds the forward and
//! backward passes written out by hand for the CPU.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::layers::{Conv2d, LayerSpec, Linear};
use super::network::CLASSES;

pub mod cpu;

/// Side of an input image.
const SIDE: usize = 28;
/// Side of the convolutions' kernels.
const KERNEL: usize = 3;
/// Channels and side of conv1's output.
const C1: usize = 32;
const S1: usize = SIDE - KERNEL + 1;
/// Channels and side of conv2's output.
const C2: usize = 64;
const S2: usize = S1 - KERNEL + 1;
/// Side of the pooled map.
const SP: usize = S2 / 2;
/// Features entering fc1.
const FLAT: usize = C2 * SP * SP;
/// Features between fc1 and fc2.
const HIDDEN: usize = 128;

/// The network's layers, in PyTorch's order and names.
pub(super) fn layers() -> Vec<LayerSpec> {
    let conv = |name: &str, in_channels, out_channels| LayerSpec::Conv2d {
        name: name.into(),
        in_channels,
        out_channels,
        kernel: KERNEL,
    };
    let linear = |name: &str, inputs, outputs| LayerSpec::Linear {
        name: name.into(),
        inputs,
        outputs,
    };
    vec![
        conv("conv1", 1, C1),
        conv("conv2", C1, C2),
        linear("fc1", FLAT, HIDDEN),
        linear("fc2", HIDDEN, CLASSES),
    ]
}

/// The convolutional network with its parameters.
#[derive(Clone, Debug)]
pub struct Cnn {
    conv1: Conv2d,
    conv2: Conv2d,
    fc1: Linear,
    fc2: Linear,
}

impl Cnn {
    /// The network whose parameters `vb` holds under the names of [`layers`].
    pub fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv1: Conv2d::new(vb.pp("conv1"), 1, C1, KERNEL)?,
            conv2: Conv2d::new(vb.pp("conv2"), C1, C2, KERNEL)?,
            fc1: Linear::new(vb.pp("fc1"), FLAT, HIDDEN)?,
            fc2: Linear::new(vb.pp("fc2"), HIDDEN, CLASSES)?,
        })
    }
}

impl Module for Cnn {
    /// Logits `[n, 10]` of a batch `[n, 784]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.dim(0)?;
        let h = x.reshape((n, 1, SIDE, SIDE))?;
        let h = self.conv1.forward(&h)?.relu()?;
        let h = self.conv2.forward(&h)?.relu()?;
        // A 2x2 max-pool as two max reductions: candle's `max_pool2d` backward scales the
        // gradient by the share of tied maxima (a quarter for a unique maximum), a
        // reduction's routes all of it to the maximum, as PyTorch's max-pool does.
        let (c, h_side, w_side) = (h.dim(1)?, h.dim(2)?, h.dim(3)?);
        let h = h
            .reshape((n, c, h_side / 2, 2, w_side / 2, 2))?
            .max(5)?
            .max(3)?
            .flatten_from(1)?;
        let h = self.fc1.forward(&h)?.relu()?;
        self.fc2.forward(&h)
    }
}
