//! The sources the `config` crate layers: the `--config` file, the `LOCKSTEP_…` environment and
//! the command-line flags, the last one a serialised struct ([`Flags`]) rather than a list of
//! overrides, so that a flag is one field here and nothing else.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use serde::de::{self, Visitor};
use serde::{Deserialize, Serialize};

use super::job::{JobConfig, TlsConfig};
use super::model_spec::ModelConfig;
use super::names::{Backend, OptimizerKind};

/// Settings given on the command line: the top layer, over every other one. `lockstep train`
/// and `check-config` flatten it into their arguments; the field names are the configuration's
/// keys, so the struct serialises into a `config` source as it is.
#[derive(Clone, Debug, Default, Args, Serialize)]
pub struct Flags {
    /// Preset: softmax, mlp-sigmoid, mlp (default), mlp-leaky, cnn.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// Model: `cnn`, `linear`, or `mlp:H1,H2,...[:ACTIVATION]` (e.g. mlp:256,128:gelu).
    #[arg(long, value_name = "SPEC", value_parser = ModelConfig::parse_spec)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelConfig>,
    /// Passes over the training set.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epochs: Option<u32>,
    /// Global minibatch size, split across workers.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u32>,
    /// Seed for initialisation and shuffling.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Number of workers (local processes to spawn, or external ones to wait for).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<u32>,
    /// Address to listen on (default 127.0.0.1:0 for local workers, 0.0.0.0:50051 for external).
    #[arg(long, value_name = "HOST:PORT")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Folder with the MNIST IDX files; unset: download into ~/.cache/lockstep/mnist.
    #[arg(long, env = "LOCKSTEP_DATA_DIR", value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Run directory (default runs/<preset>-<date>-<time>).
    #[arg(long, value_name = "DIR", id = "out")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out: Option<PathBuf>,
    /// Gradient all-reduce (default: tcp for local workers, grpc for external ones).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<Backend>,
    /// Compute threads per local worker (default: cores / workers).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<u32>,
    /// Local workers: how many times in all a worker that died is started again (it rejoins
    /// the running job), as `torchrun --max-restarts` (default 0).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_restarts: Option<u32>,
    /// Serve Prometheus /metrics and the live dashboard / over HTTP on HOST:PORT (default
    /// 127.0.0.1:0, a free loopback port printed at start), or `off`.
    #[arg(long, value_name = "HOST:PORT|off")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
    #[command(flatten)]
    #[serde(skip_serializing_if = "OptimizerFlags::is_unset")]
    pub optimizer: OptimizerFlags,
    #[command(flatten)]
    #[serde(skip_serializing_if = "TlsConfig::is_unset")]
    pub tls: TlsConfig,
}

/// The flags of `[optimizer]`.
#[derive(Clone, Debug, Default, PartialEq, Args, Serialize)]
pub struct OptimizerFlags {
    /// Optimizer.
    #[arg(long = "optimizer", id = "optimizer", value_name = "OPTIMIZER")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<OptimizerKind>,
    /// Learning rate.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
}

impl OptimizerFlags {
    fn is_unset(&self) -> bool {
        *self == OptimizerFlags::default()
    }
}

impl Flags {
    /// The flags as a `config` source.
    pub(super) fn source(&self) -> Result<config::Config> {
        config::Config::try_from(self).context("reading the command-line flags")
    }
}

/// The `--config` file as a `config` source.
pub(super) fn file_source(path: &Path) -> Result<config::Config> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Toml))
        .build()
        .with_context(|| format!("parsing the config file {} as TOML", path.display()))
}

/// The `LOCKSTEP_…` variables of `env` that name a setting (`LOCKSTEP_EPOCHS`, nested keys with
/// `__`: `LOCKSTEP_OPTIMIZER__LR`) as a `config` source. Others that share the prefix
/// (`LOCKSTEP_TOKEN`, `LOCKSTEP_CACHE_DIR`, a deployment's own) are not settings and are left
/// out; within a section, an unknown key is refused like a file's. Also the names it took.
pub(super) fn environment_source(env: &[(String, String)]) -> (config::Environment, Vec<String>) {
    let settings = top_level_keys::<JobConfig>();
    let env_map: config::Map<String, String> = env
        .iter()
        .filter(|(name, _)| {
            name.strip_prefix("LOCKSTEP_").is_some_and(|key| {
                let top = key.split("__").next().unwrap_or_default();
                settings.contains(&top.to_lowercase().as_str())
            })
        })
        .cloned()
        .collect();
    let names = env_map.keys().cloned().collect();
    let source = config::Environment::with_prefix("LOCKSTEP")
        .prefix_separator("_")
        .separator("__")
        .try_parsing(true)
        .list_separator(",")
        .with_list_parse_key("model.hidden")
        .source(Some(env_map));
    (source, names)
}

/// The keys of a struct as serde reads them, asked of its `Deserialize` (which names its fields
/// to the deserializer), so that the list is never written out by hand.
fn top_level_keys<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    /// A deserializer that only records the field names it is asked for.
    struct FieldNames<'a>(&'a mut &'static [&'static str]);

    impl<'de> de::Deserializer<'de> for FieldNames<'_> {
        type Error = de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("only the field names were asked for"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    // The error is the point: the deserializer stops as soon as it has the names.
    let _ = T::deserialize(FieldNames(&mut fields));
    fields
}

#[cfg(test)]
mod tests {
    use config::Source;

    use super::*;

    #[test]
    fn the_settings_keys_come_from_the_struct() {
        let keys = top_level_keys::<JobConfig>();
        for key in [
            "preset", "epochs", "data_dir", "out", "tls", "cluster", "model",
        ] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
        assert!(!keys.contains(&"token"));
    }

    #[test]
    fn unset_flags_leave_no_key_in_their_layer() {
        let layer = Flags::default().source().unwrap();
        assert!(layer.collect().unwrap().is_empty());
        let flags = Flags {
            epochs: Some(3),
            optimizer: OptimizerFlags {
                lr: Some(0.5),
                ..Default::default()
            },
            ..Default::default()
        };
        let layer = flags.source().unwrap();
        assert_eq!(layer.get_int("epochs").unwrap(), 3);
        assert_eq!(layer.get_float("optimizer.lr").unwrap(), 0.5);
        assert!(layer.get_string("optimizer.kind").is_err());
        assert!(layer.get_string("tls.cert").is_err());
    }
}
