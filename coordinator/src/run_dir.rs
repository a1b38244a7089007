//! The run directory: `config.toml` (the effective configuration), `metrics.jsonl` (one line
//! per epoch), `checkpoints/epoch-NNNN.safetensors`, `model.safetensors` (PyTorch names) and
//! `summary.json`, plus `logs/` for the workers this coordinator spawned.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use lockstep_common::checkpoint::{params_to_bytes, write_atomic, TrainingState};
use lockstep_common::codec::TensorSpec;
use serde::Serialize;

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Serialize)]
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
    /// Workers that took part.
    pub workers: u32,
    /// Bytes on the wire per step (batches, gradients up, reduced gradients down).
    pub bytes_per_step: f64,
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
    /// Workers.
    pub workers: u32,
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

    /// The checkpoint file of a finished epoch (numbered from 1).
    pub fn checkpoint_path(&self, epoch: u64) -> PathBuf {
        self.root
            .join("checkpoints")
            .join(format!("epoch-{epoch:04}.safetensors"))
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
        Ok(())
    }

    /// Saves the checkpoint of a finished epoch.
    pub fn save_checkpoint(
        &self,
        epoch: u64,
        state: &TrainingState,
        layout: &[TensorSpec],
        config_toml: &str,
    ) -> Result<PathBuf> {
        let path = self.checkpoint_path(epoch);
        state.save(&path, layout, config_toml)?;
        Ok(path)
    }

    /// Writes the final model (PyTorch names) and the summary.
    pub fn finish(&self, layout: &[TensorSpec], params: &[f32], summary: &Summary) -> Result<()> {
        write_atomic(
            &self.root.join("model.safetensors"),
            &params_to_bytes(layout, params)?,
        )?;
        write_atomic(
            &self.root.join("summary.json"),
            serde_json::to_string_pretty(summary)?.as_bytes(),
        )?;
        Ok(())
    }
}

/// The default run directory: `runs/<preset>-<UTC date>-<time>`.
pub fn default_run_path(preset: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let t = secs % 86_400;
    PathBuf::from("runs").join(format!(
        "{preset}-{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        t / 3600,
        t / 60 % 60,
        t % 60
    ))
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_convert() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_780), (2026, 11, 23));
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
