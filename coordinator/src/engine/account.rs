//! The account of the epoch in progress: its statistics, its membership changes, its traffic,
//! and how many times each training sample was applied. Mid-epoch checkpoints carry it, so a
//! resumed epoch reports the same metrics as an uninterrupted one; `metrics.jsonl` reports the
//! coverage (`samples_covered`, `samples_applied`), so a test can check that faults lost no
//! sample and counted none twice.

use std::time::Instant;

use anyhow::{Context, Result};
use lockstep_common::model::BatchStats;
use serde::{Deserialize, Serialize};

/// An epoch's account.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochAccount {
    /// Summed training loss of the samples whose statistics arrived.
    pub loss_sum: f64,
    /// Correctly classified training samples.
    pub correct: u64,
    /// Samples with statistics.
    pub samples: u64,
    /// Training seconds spent on the epoch before this account was (re)opened.
    pub seconds_before: f64,
    /// Workers joined or lost during the epoch.
    pub membership_changes: u64,
    /// Bytes on the wire (batches, gradients, averages).
    pub bytes: u64,
    /// Steps applied.
    pub steps: u64,
    /// How many times each training sample was applied.
    #[serde(skip)]
    pub coverage: Vec<u8>,
    #[serde(skip, default = "Instant::now")]
    opened: Instant,
}

impl EpochAccount {
    /// A fresh account for an epoch of `n` samples.
    pub fn new(n: usize) -> Self {
        Self {
            loss_sum: 0.0,
            correct: 0,
            samples: 0,
            seconds_before: 0.0,
            membership_changes: 0,
            bytes: 0,
            steps: 0,
            coverage: vec![0; n],
            opened: Instant::now(),
        }
    }

    /// Adds a step's statistics.
    pub fn add(&mut self, s: BatchStats) {
        self.loss_sum += s.loss_sum;
        self.correct += s.correct as u64;
        self.samples += s.samples as u64;
    }

    /// Counts the samples of the permutation positions `positions` as applied once more.
    pub fn cover(&mut self, perm: &[u32], positions: std::ops::Range<usize>) {
        for &i in &perm[positions] {
            let c = &mut self.coverage[i as usize];
            *c = c.saturating_add(1);
        }
    }

    /// Training seconds of the epoch so far.
    pub fn seconds(&self) -> f64 {
        self.seconds_before + self.opened.elapsed().as_secs_f64()
    }

    /// Distinct samples applied at least once.
    pub fn covered(&self) -> u64 {
        self.coverage.iter().filter(|&&c| c > 0).count() as u64
    }

    /// Sample applications in all.
    pub fn applied(&self) -> u64 {
        self.coverage.iter().map(|&c| c as u64).sum()
    }

    /// The account as checkpoint extras: JSON for the figures, the coverage as a tensor.
    pub fn to_extras(&self) -> lockstep_common::checkpoint::Extras {
        let mut saved = self.clone();
        saved.seconds_before = self.seconds();
        lockstep_common::checkpoint::Extras {
            progress: serde_json::to_string(&saved).ok(),
            coverage: Some(self.coverage.clone()),
        }
    }

    /// The account a checkpoint saved, reopened now for an epoch of `n` samples.
    pub fn from_extras(extras: &lockstep_common::checkpoint::Extras, n: usize) -> Result<Self> {
        let mut account: EpochAccount = match &extras.progress {
            Some(json) => serde_json::from_str(json).context("the checkpoint's epoch progress")?,
            None => return Ok(Self::new(n)),
        };
        account.coverage = extras.coverage.clone().unwrap_or_else(|| vec![0; n]);
        anyhow::ensure!(
            account.coverage.len() == n,
            "the checkpoint's coverage has {} samples, the training set {n}",
            account.coverage.len()
        );
        account.opened = Instant::now();
        Ok(account)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_counts_each_application_and_survives_a_checkpoint() {
        let perm = [3u32, 0, 2, 1];
        let mut a = EpochAccount::new(4);
        a.cover(&perm, 0..2);
        a.cover(&perm, 1..3);
        assert_eq!((a.covered(), a.applied()), (3, 4));
        a.add(BatchStats {
            loss_sum: 2.5,
            correct: 3,
            samples: 4,
        });
        let back = EpochAccount::from_extras(&a.to_extras(), 4).unwrap();
        assert_eq!(back.coverage, a.coverage);
        assert_eq!((back.loss_sum, back.samples), (2.5, 4));
        assert!(EpochAccount::from_extras(&a.to_extras(), 5).is_err());
    }
}
