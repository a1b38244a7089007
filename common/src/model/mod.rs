//! The networks, as small structs of named layers built over a candle `VarBuilder`, so that the
//! same code serves a worker (parameters as candle tensors it trains, with explicit backward
//! passes or autograd) and the coordinator's evaluation (parameters as plain tensors built
//! from its flat buffer).
//!
//! Parameter names and shapes are PyTorch's (`fc1.weight` is `[out, in]`), so
//! `model.safetensors` loads into the equivalent `torch.nn.Module` with `load_state_dict`.
//! One file per concept: the [`Network`] a configuration describes and its parameter layout
//! (`network`), the layers (`layers`), the fully connected network with its explicit backward
//! pass (`mlp`), the convolutional network and its CPU kernels (`cnn`), the loss (`loss`), a
//! batch and its figures (`batch`), the [`Gradients`] of a batch (`gradients`), a worker's
//! trainable [`Replica`] (`replica`) and a whole test set's evaluation (`evaluate`).

mod batch;
mod cnn;
mod evaluate;
mod gradients;
mod layers;
mod loss;
mod mlp;
mod network;
mod replica;

pub use batch::{batch_tensors, BatchStats};
pub use cnn::Cnn;
pub use evaluate::{evaluate, evaluate_each, EVAL_BATCH};
pub use gradients::Gradients;
pub use layers::{Conv2d, LayerSpec, Linear};
pub use mlp::Mlp;
pub use network::{parameter_count, Model, Network, CLASSES};
pub use replica::Replica;

#[cfg(test)]
mod tests;
