//! The configuration's named choices (backend, activation, model family, optimizer), each name
//! spelled once: on the variant, which serde (TOML, environment) and clap (flags, `--help`)
//! both read in kebab-case.

use std::fmt;

use anyhow::{anyhow, Result};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

/// How gradients are all-reduced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// CPU, through the coordinator: workers send gradients to it, and it averages them in
    /// rank order. Needs no direct connection between workers.
    Grpc,
    /// CUDA GPUs: workers all-reduce among themselves through NCCL.
    Nccl,
    /// CPU, among the workers over TCP (rank 0 sums in rank order); the coordinator is off the
    /// gradient path, as with NCCL.
    Tcp,
}

impl Backend {
    /// True when the workers all-reduce among themselves (NCCL, TCP) rather than through the
    /// coordinator: the coordinator then relays rank 0's rendezvous, hears only step
    /// statistics, and takes rank 0's state at epoch ends.
    pub fn is_collective(self) -> bool {
        matches!(self, Backend::Nccl | Backend::Tcp)
    }

    /// The device a local worker of this backend uses, by index.
    pub fn local_device(self, index: u32) -> String {
        match self {
            Backend::Grpc | Backend::Tcp => "cpu".to_string(),
            Backend::Nccl => format!("cuda:{index}"),
        }
    }
}

/// Non-linearity between hidden layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Activation {
    /// max(0, x)
    Relu,
    /// 1 / (1 + e^-x)
    Sigmoid,
    /// tanh(x)
    Tanh,
    /// x for x > 0, slope·x otherwise (`model.leaky_slope`).
    #[value(alias = "leaky_relu", alias = "leakyrelu")]
    LeakyRelu,
    /// Gaussian error linear unit (tanh approximation).
    Gelu,
}

/// Which network family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// Fully connected: 784 → hidden… → 10 (no hidden layers: softmax regression).
    Mlp,
    /// conv32-conv64-maxpool-fc128-fc10, as in PyTorch's MNIST example (without dropout).
    Cnn,
}

/// The optimizer algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// Stochastic gradient descent, optionally with momentum.
    Sgd,
    /// Adam (Kingma & Ba), PyTorch's defaults.
    Adam,
}

/// A choice's name, as the configuration and the command line spell it.
fn name_of<T: ValueEnum>(value: &T) -> String {
    value
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

macro_rules! display_by_name {
    ($($name:ty),*) => {
        $(impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&name_of(self))
            }
        })*
    };
}

display_by_name!(Backend, Activation, ModelKind, OptimizerKind);

/// The names of all choices of `T`, for a message: `relu, sigmoid, tanh, leaky-relu or gelu`.
pub fn choices<T: ValueEnum>() -> String {
    let names: Vec<String> = T::value_variants().iter().map(name_of).collect();
    match names.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// Parses one of `T`'s names (or an alias); an unknown one is refused naming the choices, as
/// in "unknown activation `swish`: use relu, sigmoid, tanh, leaky-relu or gelu".
pub fn parse_choice<T: ValueEnum>(what: &str, input: &str) -> Result<T> {
    T::from_str(input, false)
        .map_err(|_| anyhow!("unknown {what} `{input}`: use {}", choices::<T>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_choice_is_named_alike_by_serde_clap_and_display() {
        for backend in Backend::value_variants() {
            let name = backend.to_string();
            assert_eq!(serde_json::to_value(backend).unwrap(), name.as_str());
            assert_eq!(parse_choice::<Backend>("backend", &name).unwrap(), *backend);
        }
        assert_eq!(Activation::LeakyRelu.to_string(), "leaky-relu");
        assert_eq!(
            serde_json::to_value(Activation::LeakyRelu).unwrap(),
            "leaky-relu"
        );
        assert_eq!(
            parse_choice::<Activation>("activation", "leaky_relu").unwrap(),
            Activation::LeakyRelu
        );
        assert_eq!(OptimizerKind::Adam.to_string(), "adam");
    }

    #[test]
    fn an_unknown_name_is_refused_naming_the_choices() {
        let err = parse_choice::<Activation>("activation", "swish").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown activation `swish`: use relu, sigmoid, tanh, leaky-relu or gelu"
        );
        assert_eq!(choices::<Backend>(), "grpc, nccl or tcp");
    }
}
