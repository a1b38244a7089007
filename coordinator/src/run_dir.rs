//! The run directory: `config.toml` (the effective configuration), `metrics.jsonl` (one line
//! per epoch), `checkpoints/` (`epoch-NNNN.safetensors` after each epoch, and the newest
//! `epoch-NNNN-step-SSSSSS.safetensors` within one), `model.safetensors` (PyTorch names, the
//! network in its metadata) and `summary.json`, plus `logs/` for the workers this coordinator
//! spawned and `tensorboard/` for TensorBoard's event files ([`crate::tensorboard`]). A run
//! directory can be reopened to resume the run from its newest checkpoint ([`RunDir::reopen`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lockstep_common::checkpoint::{
    params_to_bytes, write_atomic, Extras, ModelInfo, TrainingState,
};
use lockstep_common::codec::TensorSpec;
use lockstep_common::logging;
use lockstep_common::protocol::StepId;
use serde::{Deserialize, Serialize};

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// Epoch number, from 1.
    pub epoch: u64,
    /// Mean training loss over the epoch's samples (as the parameters were when each was seen).
    pub train_loss: f64,
    /// Training accuracy over the same samples.
    pub train_accuracy: f64,
    /// Mean cross-entropy over the 10,000 test images.
    pub test_loss: f64,
    /// Fraction of the test images classified correctly.
    pub test_accuracy: f64,
    /// Wall time of the epoch's training steps.
    pub epoch_seconds: f64,
    /// Training samples per second over the epoch.
    pub samples_per_second: f64,
    /// Wall time of the evaluation.
    pub eval_seconds: f64,
    /// Workers taking part at the epoch's end.
    pub workers: u32,
    /// Workers that joined or were lost during the epoch.
    #[serde(default)]
    pub membership_changes: u64,
    /// Distinct training samples applied in the epoch (all of them, in every epoch).
    #[serde(default)]
    pub samples_covered: u64,
    /// Sample applications in the epoch (each sample once: equal to `samples_covered`).
    #[serde(default)]
    pub samples_applied: u64,
    /// Bytes on the wire per step (batches, gradients up, reduced gradients down).
    pub bytes_per_step: f64,
}

impl EpochMetrics {
    /// The epoch's line for people, aligned from one epoch to the next:
    /// `epoch 1/3  train loss 0.2769  test loss 0.1389  test acc 95.66%  1.2 s  49.5K samples/s`.
    pub fn line(&self, epochs: u64) -> String {
        let width = epochs.to_string().len();
        let mut line = format!(
            "epoch {:>width$}/{epochs}  train loss {:.4}  test loss {:.4}  test acc {:>6.2}%  {:>7}  {:>6} samples/s",
            self.epoch,
            self.train_loss,
            self.test_loss,
            self.test_accuracy * 100.0,
            logging::duration(self.epoch_seconds),
            logging::rate(self.samples_per_second),
        );
        if self.membership_changes > 0 {
            line.push_str(&format!(
                "  {} worker(s), {} membership change(s)",
                self.workers, self.membership_changes
            ));
        }
        line
    }
}

/// `summary.json`, written when training ends.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// The preset.
    pub preset: String,
    /// The network, one line.
    pub model: String,
    /// Parameter count.
    pub parameters: usize,
    /// Epochs trained.
    pub epochs: u64,
    /// Final test accuracy.
    pub test_accuracy: f64,
    /// Final test loss.
    pub test_loss: f64,
    /// Final training loss.
    pub train_loss: f64,
    /// Training samples per second over all epochs (training time only).
    pub samples_per_second: f64,
    /// Total training time, evaluation excluded.
    pub train_seconds: f64,
    /// Whole job time, from start to the last file.
    pub total_seconds: f64,
    /// Workers at the end.
    pub workers: u32,
    /// Workers that joined or were lost, in the whole run (this process).
    pub membership_changes: u64,
    /// Backend.
    pub backend: String,
    /// Seed.
    pub seed: u64,
    /// SHA-256 of the final parameters (equal across runs with the same seed).
    pub params_sha256: String,
}

/// An open run directory.
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// Creates the run directory, refusing one that already holds a run (nothing is
    /// overwritten), and saves the effective configuration.
    pub fn create(root: &Path, config_toml: &str) -> Result<Self> {
        if root.join("metrics.jsonl").exists() || root.join("summary.json").exists() {
            bail!(
                "the run directory {} already holds a run; pass another --out, or delete it first",
                root.display()
            );
        }
        std::fs::create_dir_all(root.join("checkpoints"))
            .and_then(|_| std::fs::create_dir_all(root.join("logs")))
            .with_context(|| format!("creating the run directory {}", root.display()))?;
        std::fs::write(root.join("config.toml"), config_toml)
            .with_context(|| format!("writing {}", root.join("config.toml").display()))?;
        std::fs::write(root.join("metrics.jsonl"), "")
            .with_context(|| format!("writing {}", root.join("metrics.jsonl").display()))?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Where spawned worker `index` logs.
    pub fn worker_log(&self, index: usize) -> PathBuf {
        self.root.join("logs").join(format!("worker-{index}.log"))
    }

    /// The checkpoint file of the state at `at` (the first step not applied):
    /// `epoch-NNNN` after epoch NNNN (from 1), `epoch-NNNN-step-SSSSSS` after SSSSSS steps of
    /// epoch NNNN.
    pub fn checkpoint_path(&self, at: StepId) -> PathBuf {
        let name = if at.step == 0 {
            format!("epoch-{:04}.safetensors", at.epoch)
        } else {
            format!("epoch-{:04}-step-{:06}.safetensors", at.epoch + 1, at.step)
        };
        self.root.join("checkpoints").join(name)
    }

    /// Appends one epoch's metrics.
    pub fn append_metrics(&self, m: &EpochMetrics) -> Result<()> {
        let path = self.root.join("metrics.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "{}", serde_json::to_string(m)?)
            .with_context(|| format!("writing {}", path.display()))?;
        f.sync_data()
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Saves a checkpoint of `state` (with `extras` within an epoch) and removes the mid-epoch
    /// checkpoints it supersedes; epoch checkpoints are kept.
    pub fn save_checkpoint(
        &self,
        state: &TrainingState,
        layout: &[TensorSpec],
        config_toml: &str,
        extras: &Extras,
    ) -> Result<PathBuf> {
        let at = StepId::new(state.position.epoch, state.position.step);
        let path = self.checkpoint_path(at);
        write_atomic(&path, &state.to_bytes_with(layout, config_toml, extras)?)?;
        for (older, file) in self.checkpoints()? {
            if older < at && older.step != 0 {
                let _ = std::fs::remove_file(file);
            }
        }
        Ok(path)
    }

    /// The checkpoints on disk with the positions their names give, newest first.
    pub fn checkpoints(&self) -> Result<Vec<(StepId, PathBuf)>> {
        Self::checkpoints_in(&self.root)
    }

    /// The checkpoints in the run directory `root`, newest first, without opening it as a run
    /// (for reading a run, finished or not, as `lockstep eval` does).
    pub fn checkpoints_in(root: &Path) -> Result<Vec<(StepId, PathBuf)>> {
        let dir = root.join("checkpoints");
        let mut found = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        for entry in entries {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if let Some(at) = parse_checkpoint_name(name) {
                found.push((at, path));
            }
        }
        found.sort_by_key(|f| std::cmp::Reverse(f.0));
        Ok(found)
    }

    /// Reopens a run directory to resume it: its saved configuration, and whether it finished.
    /// Fails clearly when the folder holds no run.
    pub fn reopen(root: &Path) -> Result<(Self, String, bool)> {
        let config_path = root.join("config.toml");
        let config = std::fs::read_to_string(&config_path).with_context(|| {
            format!(
                "{} holds no Lockstep run to resume (no readable config.toml); start one with `lockstep train \
                 --out {}`",
                root.display(),
                root.display()
            )
        })?;
        std::fs::create_dir_all(root.join("checkpoints"))
            .and_then(|_| std::fs::create_dir_all(root.join("logs")))
            .with_context(|| format!("reopening the run directory {}", root.display()))?;
        if !root.join("metrics.jsonl").exists() {
            std::fs::write(root.join("metrics.jsonl"), "")
                .with_context(|| format!("writing {}", root.join("metrics.jsonl").display()))?;
        }
        let finished = root.join("summary.json").exists();
        Ok((
            Self {
                root: root.to_path_buf(),
            },
            config,
            finished,
        ))
    }

    /// Keeps the metrics of epochs `1..=epochs` only (a resumed run trains the later ones
    /// again), dropping a torn last line. Returns the last kept epoch's metrics.
    pub fn keep_metrics_until(&self, epochs: u64) -> Result<Option<EpochMetrics>> {
        let path = self.root.join("metrics.jsonl");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut kept = Vec::new();
        let mut last = None;
        for line in text.lines() {
            let Ok(m) = serde_json::from_str::<EpochMetrics>(line) else {
                continue;
            };
            if m.epoch <= epochs
                && last
                    .as_ref()
                    .is_none_or(|l: &EpochMetrics| m.epoch > l.epoch)
            {
                kept.push(line);
                last = Some(m);
            }
        }
        let mut out = kept.join("\n");
        if !out.is_empty() {
            out.push('\n');
        }
        write_atomic(&path, out.as_bytes())?;
        Ok(last)
    }

    /// The metrics of every epoch so far in the run directory `root`, in order (a line that
    /// does not parse is skipped).
    pub fn metrics_of(root: &Path) -> Result<Vec<EpochMetrics>> {
        let path = root.join("metrics.jsonl");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(text
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect())
    }

    /// Writes the final model (PyTorch names, and the network it is in its metadata) and the
    /// summary.
    pub fn finish(
        &self,
        layout: &[TensorSpec],
        params: &[f32],
        info: &ModelInfo,
        summary: &Summary,
    ) -> Result<()> {
        write_atomic(
            &self.root.join("model.safetensors"),
            &params_to_bytes(layout, params, info)?,
        )?;
        write_atomic(
            &self.root.join("summary.json"),
            serde_json::to_string_pretty(summary)?.as_bytes(),
        )?;
        Ok(())
    }
}

/// The position a checkpoint's file name gives (see [`RunDir::checkpoint_path`]).
fn parse_checkpoint_name(name: &str) -> Option<StepId> {
    let stem = name.strip_suffix(".safetensors")?.strip_prefix("epoch-")?;
    match stem.split_once("-step-") {
        None => Some(StepId::new(stem.parse().ok()?, 0)),
        Some((epoch, step)) => {
            let epoch: u64 = epoch.parse().ok()?;
            Some(StepId::new(epoch.checked_sub(1)?, step.parse().ok()?))
        }
    }
}

/// The default run directory: `runs/<preset>-<date>-<time>` in local time, to the second
/// (`runs/mlp-20261123-084200`). Two runs started in the same second get the same name, and
/// the second is refused by [`RunDir::create`] rather than mixed into the first.
pub fn default_run_path(preset: &str) -> PathBuf {
    run_path_at(
        preset,
        &jiff::Timestamp::now().to_zoned_datetime(local_time_zone()),
    )
}

/// The system's time zone (`TZ`, else `/etc/localtime`), or UTC where none is set, as in
/// many containers.
fn local_time_zone() -> jiff::tz::TimeZone {
    jiff::tz::TimeZone::try_system().unwrap_or(jiff::tz::TimeZone::UTC)
}

/// The default run directory of a run started at `when`.
fn run_path_at(preset: &str, when: &jiff::ZonedDateTime) -> PathBuf {
    PathBuf::from("runs").join(format!("{preset}-{}", when.strftime("%Y%m%d-%H%M%S")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_run_directory_is_named_by_the_local_date_and_time_to_the_second() {
        use jiff::tz::{offset, TimeZone};
        let instant: jiff::Timestamp = "2026-11-23T08:42:00.750Z".parse().unwrap();
        let at = |tz: TimeZone| run_path_at("mlp", &instant.to_zoned_datetime(tz));
        assert_eq!(at(TimeZone::UTC), Path::new("runs/mlp-20261123-084200"));
        // The same instant east and west of Greenwich: the wall clock there, across a date line.
        assert_eq!(
            at(TimeZone::fixed(offset(2))),
            Path::new("runs/mlp-20261123-104200")
        );
        assert_eq!(
            at(TimeZone::fixed(offset(-9))),
            Path::new("runs/mlp-20261122-234200")
        );
        let epoch = jiff::Timestamp::UNIX_EPOCH.to_zoned_datetime(TimeZone::UTC);
        assert_eq!(
            run_path_at("cnn", &epoch),
            Path::new("runs/cnn-19700101-000000")
        );
    }

    #[test]
    fn the_default_run_directory_is_one_of_this_second() {
        let before = jiff::Timestamp::now().to_zoned_datetime(local_time_zone());
        let path = default_run_path("softmax");
        let after = jiff::Timestamp::now().to_zoned_datetime(local_time_zone());
        assert!(
            [
                run_path_at("softmax", &before),
                run_path_at("softmax", &after)
            ]
            .contains(&path),
            "{}",
            path.display()
        );
    }

    #[test]
    fn checkpoint_names_give_their_position_and_old_mid_epoch_ones_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(dir.path(), "").unwrap();
        assert_eq!(
            run.checkpoint_path(StepId::new(1, 500))
                .file_name()
                .unwrap(),
            "epoch-0002-step-000500.safetensors"
        );
        for name in [
            "epoch-0001.safetensors",
            "epoch-0002-step-000500.safetensors",
            "epoch-0001.tmp",
        ] {
            std::fs::write(dir.path().join("checkpoints").join(name), "").unwrap();
        }
        let found: Vec<StepId> = run
            .checkpoints()
            .unwrap()
            .into_iter()
            .map(|(at, _)| at)
            .collect();
        assert_eq!(found, [StepId::new(1, 500), StepId::new(1, 0)]);
        let layout = lockstep_common::codec::pack_layout(&[("fc.bias", vec![1])]);
        let state = TrainingState {
            params: vec![0.0],
            optimizer: lockstep_common::optim::OptimizerState {
                step: 0,
                buffers: vec![],
            },
            position: lockstep_common::checkpoint::Position {
                epoch: 1,
                step: 600,
            },
        };
        run.save_checkpoint(&state, &layout, "", &Extras::default())
            .unwrap();
        let found: Vec<StepId> = run
            .checkpoints()
            .unwrap()
            .into_iter()
            .map(|(at, _)| at)
            .collect();
        assert_eq!(found, [StepId::new(1, 600), StepId::new(1, 0)]);
    }

    #[test]
    fn resuming_keeps_the_metrics_of_finished_epochs_once() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(dir.path(), "seed = 1\n").unwrap();
        let m = |epoch| EpochMetrics {
            epoch,
            train_loss: 1.0,
            train_accuracy: 0.5,
            test_loss: 1.0,
            test_accuracy: 0.5,
            epoch_seconds: 1.0,
            samples_per_second: 1.0,
            eval_seconds: 1.0,
            workers: 2,
            membership_changes: 0,
            samples_covered: 10,
            samples_applied: 10,
            bytes_per_step: 1.0,
        };
        for e in [1, 2, 3] {
            run.append_metrics(&m(e)).unwrap();
        }
        let path = dir.path().join("metrics.jsonl");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"epoch\": 4, \"torn");
        std::fs::write(&path, text).unwrap();
        let (run, config, finished) = RunDir::reopen(dir.path()).unwrap();
        assert_eq!((config.as_str(), finished), ("seed = 1\n", false));
        assert_eq!(run.keep_metrics_until(2).unwrap().unwrap().epoch, 2);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
        let err = RunDir::reopen(&dir.path().join("nothing"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("holds no Lockstep run to resume"), "{err}");
    }

    #[test]
    fn an_existing_run_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(dir.path(), "seed = 1\n").unwrap();
        assert!(run.path().join("config.toml").exists());
        let err = RunDir::create(dir.path(), "seed = 1\n")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("already holds a run"), "{err}");
    }
}

#[cfg(test)]
mod props;
