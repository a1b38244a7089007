//! The job configuration, layered with the `config` crate: built-in defaults (from the preset)
//! < TOML file (`--config`) < environment (`LOCKSTEP_…`, nested keys with `__`) < command-line
//! flags. The effective configuration is what the coordinator prints, saves in the run
//! directory and sends to every worker at join time.
//!
//! Precedence is resolved once, in [`Layers`]: the file, environment and flags are merged, the
//! preset is read from that merge, and its defaults go under it. Adding a setting is a field
//! (with its doc) in [`JobConfig`] or a section, its default in [`JobConfig::preset`], and,
//! should it be a flag too, a field in [`Flags`].

mod job;
mod layers;
mod model_spec;
mod names;
mod presets;
mod validate;

use std::path::Path;

use anyhow::{anyhow, Context, Result};

pub use job::{ClusterConfig, JobConfig, OptimizerConfig, TlsConfig};
pub use layers::{Flags, OptimizerFlags};
pub use model_spec::ModelConfig;
pub use names::{choices, parse_choice, Activation, Backend, ModelKind, OptimizerKind};
pub use presets::{Deployment, PRESETS};

/// The layers a user gives (file, environment, flags), merged in their order of precedence.
pub struct Layers {
    given: config::Config,
    /// Where the given settings came from, for errors: "the config file F, LOCKSTEP_X and the
    /// command line".
    origin: String,
}

impl Layers {
    /// The file, the process environment and the flags.
    pub fn new(file: Option<&Path>, flags: &Flags) -> Result<Self> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::with_env(file, flags, &env)
    }

    /// The file, an explicit environment (for tests) and the flags.
    pub fn with_env(file: Option<&Path>, flags: &Flags, env: &[(String, String)]) -> Result<Self> {
        let mut builder = config::Config::builder();
        let mut origin = Vec::new();
        if let Some(path) = file {
            builder = builder.add_source(layers::file_source(path)?);
            origin.push(format!("the config file {}", path.display()));
        }
        let (environment, names) = layers::environment_source(env);
        origin.extend(names);
        origin.push("the command line".to_string());
        let origin = match origin.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
            None => String::new(),
        };
        let given = builder
            .add_source(environment)
            .add_source(flags.source()?)
            .build()
            .map_err(|e| invalid(&origin, e))?;
        Ok(Layers { given, origin })
    }

    /// Whether any layer sets `key` (a dotted path such as `cluster.shards`), rather than it
    /// coming from the defaults.
    pub fn sets(&self, key: &str) -> bool {
        self.given.get::<config::Value>(key).is_ok()
    }

    /// The configuration: the layers over the defaults of the preset they name, for workers
    /// deployed as `deployment` says. For a resumed run, `run` is that run's configuration: the
    /// defaults when the preset is its own (so its backend stays unless a layer names one), and
    /// the preset when none is given; the caller compares the result with it
    /// ([`JobConfig::resume_conflicts`]).
    pub fn resolve(&self, deployment: Deployment, run: Option<&JobConfig>) -> Result<JobConfig> {
        let preset = match self.given.get_string("preset") {
            Ok(preset) => preset,
            Err(config::ConfigError::NotFound(_)) => {
                run.map_or_else(|| "mlp".to_string(), |r| r.preset.clone())
            }
            Err(e) => return Err(invalid(&self.origin, e)),
        };
        let defaults = match run {
            Some(r) if r.preset == preset => deployment.defaults_from_run(r),
            _ => JobConfig::defaults(&preset, deployment)?,
        };
        let cfg: JobConfig = config::Config::builder()
            .add_source(
                config::Config::try_from(&defaults).context("building default configuration")?,
            )
            .add_source(self.given.clone())
            .build()
            .context("merging configuration layers")?
            .try_deserialize()
            .map_err(|e| invalid(&self.origin, e))?;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// An error in the configuration given by `origin` (see [`Layers`]), saying where it came from.
fn invalid(origin: &str, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("invalid configuration (from {origin}): {e}")
}

/// Resolves a new job's configuration for local workers from all layers with an explicit
/// environment.
pub fn load_with_env(
    file: Option<&Path>,
    flags: &Flags,
    env: &[(String, String)],
) -> Result<JobConfig> {
    Layers::with_env(file, flags, env)?.resolve(Deployment::Local, None)
}

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;
