//! The network to train, and its compact command-line form (`--model mlp:256,128:gelu`).

use anyhow::{anyhow, Result};
use serde::{Deserialize, Serialize};

use super::names::{choices, parse_choice, Activation, ModelKind};

/// The network to train.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Network family.
    pub kind: ModelKind,
    /// Hidden layer widths of an `mlp` (empty: a single linear layer).
    #[serde(default)]
    pub hidden: Vec<usize>,
    /// Non-linearity after each hidden layer of an `mlp`.
    pub activation: Activation,
    /// Negative slope of `leaky-relu`.
    pub leaky_slope: f64,
}

impl ModelConfig {
    /// Parses the compact `--model` form: `cnn`, `linear`, or `mlp:H1,H2,…[:ACTIVATION]`
    /// (e.g. `mlp:256,128:gelu`, `mlp:64:leaky-relu=0.2`). The error says why and what the
    /// forms are; clap, which calls this for `--model`, names the flag and the value.
    pub fn parse_spec(spec: &str) -> Result<Self> {
        let bad = |why: String| {
            anyhow!(
                "{why}. Use `cnn`, `linear`, or `mlp:H1,H2,...[:ACTIVATION]` \
                 such as `mlp:256,128:relu` (activations: {}; leaky-relu takes =SLOPE)",
                choices::<Activation>()
            )
        };
        let mut parts = spec.trim().split(':');
        let kind = parts.next().unwrap_or_default();
        let mut model = ModelConfig {
            kind: ModelKind::Mlp,
            hidden: Vec::new(),
            activation: Activation::Relu,
            leaky_slope: 0.01,
        };
        match kind {
            "cnn" => {
                model.kind = ModelKind::Cnn;
                if parts.next().is_some() {
                    return Err(bad("`cnn` takes no further settings".into()));
                }
                return Ok(model);
            }
            "linear" | "softmax" => {
                if parts.next().is_some() {
                    return Err(bad("`linear` takes no further settings".into()));
                }
                return Ok(model);
            }
            "mlp" => {}
            other => return Err(bad(format!("unknown model family `{other}`"))),
        }
        if let Some(hidden) = parts.next() {
            for h in hidden.split(',').filter(|h| !h.trim().is_empty()) {
                let width: usize = h
                    .trim()
                    .parse()
                    .map_err(|_| bad(format!("hidden width `{h}` is not a whole number")))?;
                model.hidden.push(width);
            }
        }
        if let Some(act) = parts.next() {
            let (name, slope) = match act.split_once('=') {
                Some((n, s)) => (n, Some(s)),
                None => (act, None),
            };
            model.activation = parse_choice("activation", name).map_err(|e| bad(e.to_string()))?;
            if let Some(s) = slope {
                model.leaky_slope = s
                    .parse()
                    .map_err(|_| bad(format!("slope `{s}` is not a number")))?;
            }
        }
        if parts.next().is_some() {
            return Err(bad("too many `:`-separated parts".into()));
        }
        Ok(model)
    }

    /// A one-line human description, e.g. `mlp 784-100-100-10 relu`.
    pub fn describe(&self) -> String {
        match self.kind {
            ModelKind::Cnn => "cnn conv32-conv64-maxpool-fc128-fc10 relu".to_string(),
            ModelKind::Mlp => {
                let mut sizes = vec![784];
                sizes.extend(&self.hidden);
                sizes.push(10);
                let sizes: Vec<String> = sizes.iter().map(|s| s.to_string()).collect();
                if self.hidden.is_empty() {
                    format!("linear {}", sizes.join("-"))
                } else {
                    let act = match self.activation {
                        Activation::LeakyRelu => format!("leaky-relu({})", self.leaky_slope),
                        a => a.to_string(),
                    };
                    format!("mlp {} {act}", sizes.join("-"))
                }
            }
        }
    }
}
