//! Which saved model a `predict` or `eval` command means, and loading it. A run directory
//! stands for its `model.safetensors`, or for its newest checkpoint while the run has not
//! finished; a file is read as it is, a final model or any checkpoint. The network comes from
//! the file's own metadata (a checkpoint's configuration, a model's [`ModelInfo`]), else from the
//! `config.toml` of the run it sits in (a `model.safetensors` written before it named its
//! network), so no flag repeats what training already knew.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lockstep_common::checkpoint::{self, ModelInfo, Position, StoredModel};
use lockstep_common::config::{JobConfig, ModelConfig};
use lockstep_common::model::Network;

use crate::run_dir::RunDir;

/// A model read from disk, ready to evaluate.
pub struct SavedModel {
    /// The file its parameters came from.
    pub path: PathBuf,
    /// What the file is, for people: `the final model`, `the checkpoint after epoch 2`, ...
    pub what: String,
    /// The folder outputs go to by default: the run directory the file belongs to, else the
    /// file's own folder.
    pub home: PathBuf,
    /// The network.
    pub network: Network,
    /// Its configuration.
    pub model: ModelConfig,
    /// Whether inputs are standardised (the run's `normalize`).
    pub normalize: bool,
    /// The MNIST folder the run was configured with, if any.
    pub data_dir: Option<PathBuf>,
    /// The parameters, in the network's layout.
    pub params: Vec<f32>,
}

/// Where a model's network description came from.
struct Described {
    model: ModelConfig,
    normalize: bool,
    data_dir: Option<PathBuf>,
    /// For error messages: `its metadata`, `RUN/config.toml`.
    source: String,
}

impl SavedModel {
    /// Opens `path`: a run directory or a `.safetensors` model or checkpoint. Says on stderr
    /// which file a run directory stood for.
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).with_context(|| {
            format!(
                "{}: no such run directory or model file (pass a run directory such as \
                 runs/mlp-..., a model.safetensors, or a checkpoint file)",
                path.display()
            )
        })?;
        if meta.is_dir() {
            let (file, what) = Self::pick_in_run(path)?;
            tracing::info!("using {} ({what})", file.display());
            Self::read(&file, path.to_path_buf())
        } else {
            Self::read(path, home_of(path))
        }
    }

    /// The file a run directory stands for: its final model, else its newest checkpoint.
    fn pick_in_run(run: &Path) -> Result<(PathBuf, &'static str)> {
        let model = run.join("model.safetensors");
        if model.is_file() {
            return Ok((model, "the run's final model"));
        }
        match RunDir::checkpoints_in(run)?.into_iter().next() {
            Some((_, newest)) => Ok((
                newest,
                "the run has not finished: its newest checkpoint",
            )),
            None => bail!(
                "{} holds no model: no model.safetensors and no checkpoints/epoch-*.safetensors \
                 (is it a Lockstep run directory? A run writes its first checkpoint after its first \
                 epoch, or after checkpoint_every_steps steps)",
                run.display()
            ),
        }
    }

    /// Reads the model file `path`, whose outputs go to `home` by default.
    fn read(path: &Path, home: PathBuf) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let stored = checkpoint::stored_model(&bytes).with_context(|| {
            format!(
                "{} is not a Lockstep model or checkpoint file",
                path.display()
            )
        })?;
        let (described, what) = match stored {
            StoredModel::Checkpoint {
                config_toml,
                position,
            } => {
                let config = JobConfig::from_toml_str(&config_toml).with_context(|| {
                    format!("{}: the configuration in its metadata", path.display())
                })?;
                (
                    from_job(config, "its metadata".into()),
                    checkpoint_name(position),
                )
            }
            StoredModel::Model(ModelInfo { model, normalize }) => (
                Described {
                    model,
                    normalize,
                    data_dir: None,
                    source: "its metadata".into(),
                },
                "the final model".to_string(),
            ),
            StoredModel::Unknown => (
                described_by_run(path, &home)?,
                "the final model".to_string(),
            ),
        };
        let network = Network::new(&described.model);
        let params =
            checkpoint::params_from_bytes(network.layout(), &bytes).with_context(|| {
                format!(
                "{} does not hold the {} that {} describes (was it trained with another model?)",
                path.display(),
                described.model.describe(),
                described.source
            )
            })?;
        Ok(SavedModel {
            path: path.to_path_buf(),
            what,
            home,
            network,
            model: described.model,
            normalize: described.normalize,
            data_dir: described.data_dir,
            params,
        })
    }

    /// The file for titles: its path from its run directory's name
    /// (`mlp-20261202-154012/checkpoints/epoch-0002.safetensors`), else its name.
    pub fn label(&self) -> String {
        let run = self
            .home
            .canonicalize()
            .unwrap_or_else(|_| self.home.clone());
        let file = self
            .path
            .canonicalize()
            .unwrap_or_else(|_| self.path.clone());
        match (run.file_name(), file.strip_prefix(&run)) {
            (Some(name), Ok(inside)) => Path::new(name).join(inside).display().to_string(),
            _ => self
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| self.path.display().to_string()),
        }
    }

    /// A short name of the model file for output names: `model` for `model.safetensors`,
    /// `epoch-0002` for a checkpoint.
    pub fn stem(&self) -> String {
        self.path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    }

    /// The default path of an output named `name` (`confusion`, `predictions`): in
    /// [`SavedModel::home`], suffixed with the checkpoint's name unless this is the final model.
    pub fn output_path(&self, name: &str, extension: &str) -> PathBuf {
        let stem = self.stem();
        let file = if stem == "model" {
            format!("{name}.{extension}")
        } else {
            format!("{name}-{stem}.{extension}")
        };
        self.home.join(file)
    }
}

/// What a checkpoint at `position` is, for people.
fn checkpoint_name(position: Position) -> String {
    if position.step == 0 {
        format!("the checkpoint after epoch {}", position.epoch)
    } else {
        format!(
            "the checkpoint at epoch {}, step {}",
            position.epoch + 1,
            position.step
        )
    }
}

fn from_job(config: JobConfig, source: String) -> Described {
    Described {
        model: config.model,
        normalize: config.normalize,
        data_dir: config.data_dir,
        source,
    }
}

/// The network of a file that does not name it: from the `config.toml` of its run.
fn described_by_run(path: &Path, home: &Path) -> Result<Described> {
    let config_path = home.join("config.toml");
    let text = std::fs::read_to_string(&config_path).with_context(|| {
        format!(
            "{} does not say which network it holds (no Lockstep metadata), and there is no \
             readable {} to tell",
            path.display(),
            config_path.display()
        )
    })?;
    let config = JobConfig::from_toml_str(&text)
        .with_context(|| format!("reading {}", config_path.display()))?;
    Ok(from_job(config, config_path.display().to_string()))
}

/// The run directory a model file belongs to (`RUN` for `RUN/model.safetensors` and
/// `RUN/checkpoints/epoch-0001.safetensors`), else its folder.
fn home_of(path: &Path) -> PathBuf {
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match folder.parent() {
        Some(run)
            if folder.file_name().is_some_and(|n| n == "checkpoints")
                && run.join("config.toml").is_file() =>
        {
            run.to_path_buf()
        }
        _ => folder.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_belongs_to_its_run_and_a_loose_file_to_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        std::fs::create_dir_all(run.join("checkpoints")).unwrap();
        std::fs::write(run.join("config.toml"), "").unwrap();
        assert_eq!(
            home_of(&run.join("checkpoints/epoch-0001.safetensors")),
            run
        );
        assert_eq!(home_of(&run.join("model.safetensors")), run);
        assert_eq!(home_of(Path::new("model.safetensors")), Path::new("."));
        let loose = dir.path().join("checkpoints/epoch-0001.safetensors");
        assert_eq!(home_of(&loose), dir.path().join("checkpoints"));
    }

    #[test]
    fn checkpoints_are_named_by_where_they_were_taken() {
        assert_eq!(
            checkpoint_name(Position { epoch: 2, step: 0 }),
            "the checkpoint after epoch 2"
        );
        assert_eq!(
            checkpoint_name(Position {
                epoch: 2,
                step: 500
            }),
            "the checkpoint at epoch 3, step 500"
        );
    }
}
