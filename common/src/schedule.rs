//! The training schedule: which samples form each step's global batch, and which part of it
//! each rank computes. Pure functions of `(seed, epoch)`, so a resumed or re-run job sees
//! exactly the same batches.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The order in which epoch `epoch` visits the `n` training samples.
pub fn epoch_permutation(seed: u64, epoch: u64, n: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..n as u32).collect();
    // Distinct, well-mixed stream per (seed, epoch); stream 0 is used for initialisation.
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(epoch + 1);
    order.shuffle(&mut rng);
    order
}

/// Steps in an epoch of `n` samples with global batch `batch` (the last one may be short).
pub fn steps_per_epoch(n: usize, batch: usize) -> usize {
    n.div_ceil(batch)
}

/// The sample positions (into the epoch's permutation) of global step `step`.
pub fn step_range(n: usize, batch: usize, step: usize) -> std::ops::Range<usize> {
    let start = (step * batch).min(n);
    start..(start + batch).min(n)
}

/// Splits a global batch of `len` samples across `world` ranks as evenly as possible; the
/// first `len % world` ranks take one extra sample. Returns one range per rank, in rank order.
pub fn split(len: usize, world: usize) -> Vec<std::ops::Range<usize>> {
    let base = len / world;
    let extra = len % world;
    let mut start = 0;
    (0..world)
        .map(|r| {
            let n = base + usize::from(r < extra);
            let range = start..start + n;
            start += n;
            range
        })
        .collect()
}

/// The sample positions (into the step's global batch of `len`) of each of its `shards`
/// shards: the batch cut as evenly as possible, the first `len % shards` shards one longer.
/// Fixed by the configuration, never by the membership, so every run of a job computes the
/// same shard gradients.
pub fn shard_ranges(len: usize, shards: u32) -> Vec<std::ops::Range<usize>> {
    split(len, shards.max(1) as usize)
}

/// Which shards each of `members` workers computes (in rank order): contiguous, as even as
/// possible. Any assignment gives the same model; this one keeps a step's traffic balanced.
pub fn assign_shards(shards: &[u32], members: usize) -> Vec<Vec<u32>> {
    split(shards.len(), members.max(1))
        .into_iter()
        .map(|r| shards[r].to_vec())
        .collect()
}

/// Whether every replica reports a digest of its state after step `step`: every
/// `digest_every` steps and after the last step of each epoch. Coordinator and workers must
/// agree on this, so it lives in one place.
pub fn digest_due(step: u64, digest_every: u32, last_of_epoch: bool) -> bool {
    last_of_epoch || step.is_multiple_of(digest_every.max(1) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_pure_function_of_seed_and_epoch() {
        let a = epoch_permutation(7, 0, 1000);
        assert_eq!(a, epoch_permutation(7, 0, 1000));
        assert_ne!(a, epoch_permutation(7, 1, 1000));
        assert_ne!(a, epoch_permutation(8, 0, 1000));
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..1000).collect::<Vec<u32>>());
    }

    #[test]
    fn every_sample_is_in_exactly_one_step_and_rank() {
        let n = 1003;
        let batch = 64;
        let mut seen = vec![0u8; n];
        for s in 0..steps_per_epoch(n, batch) {
            let r = step_range(n, batch, s);
            for part in split(r.len(), 3) {
                for i in part {
                    seen[r.start + i] += 1;
                }
            }
        }
        assert!(seen.iter().all(|&c| c == 1));
        assert_eq!(split(5, 2), vec![0..3, 3..5]);
        assert_eq!(steps_per_epoch(60_000, 64), 938);
    }

    #[test]
    fn shards_are_fixed_and_assignments_cover_each_shard_once() {
        assert_eq!(
            shard_ranges(64, 6),
            vec![0..11, 11..22, 22..33, 33..44, 44..54, 54..64]
        );
        let all: Vec<u32> = (0..6).collect();
        assert_eq!(assign_shards(&all, 1), vec![all.clone()]);
        assert_eq!(assign_shards(&all, 2), vec![vec![0, 1, 2], vec![3, 4, 5]]);
        assert_eq!(assign_shards(&[1, 4], 3), vec![vec![1], vec![4], vec![]]);
    }
}
