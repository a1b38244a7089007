//! The compute thread: owns the model replica and the optimizer, and runs the step loop
//! (gRPC all-reduce): forward + backward on the local share of the batch, send the flat
//! gradient, wait for the coordinator's average, apply the optimizer step. Every few steps,
//! and after each epoch's last step, it reports a digest of its parameters and optimizer state
//! so the coordinator can catch a replica that silently diverged.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use candle_core::{DType, Tensor};
use lockstep_common::checkpoint::{Position, TrainingState};
use lockstep_common::codec;
use lockstep_common::config::JobConfig;
use lockstep_common::mnist::IMAGE_PIXELS;
use lockstep_common::model::{batch_tensors, BatchStats, Replica};
use lockstep_common::optim::{DeviceOptimizer, Optimizer};
use lockstep_common::schedule;
use lockstep_common::wire::pb;

use crate::stream::StepChannels;

/// Checks a batch message against what the protocol promises, before it reaches the model.
pub fn validate_batch(b: &pb::Batch) -> Result<()> {
    let n = b.count as usize;
    if b.pixels.len() != n * IMAGE_PIXELS || b.labels.len() != n {
        bail!(
            "malformed batch: {} images announced, {} pixel bytes and {} labels received",
            n,
            b.pixels.len(),
            b.labels.len()
        );
    }
    if let Some(l) = b.labels.iter().find(|&&l| l > 9) {
        bail!("malformed batch: label {l} is outside 0..=9");
    }
    if b.count > b.global_count {
        bail!(
            "malformed batch: local count {} exceeds global count {}",
            b.count,
            b.global_count
        );
    }
    Ok(())
}

/// Where a worker's step time goes, logged when the loop ends. (On a GPU the kernels run
/// asynchronously: there the figures say where the host waits, not where the device works.)
#[derive(Default)]
struct StepTimes {
    steps: u64,
    compute_s: f64,
    wait_s: f64,
    apply_s: f64,
}

impl StepTimes {
    fn log(&self) {
        if self.steps == 0 {
            return;
        }
        let per = |s: f64| s * 1000.0 / self.steps as f64;
        tracing::info!(
            "{} steps: {:.3} ms/step computing gradients, {:.3} ms/step waiting for the all-reduce, {:.3} ms/step applying it",
            self.steps,
            per(self.compute_s),
            per(self.wait_s),
            per(self.apply_s)
        );
    }
}

/// Runs the gRPC-mode step loop until the coordinator stops sending batches. Returns the
/// number of steps applied.
pub fn run_grpc(
    config: &JobConfig,
    replica: &mut Replica,
    mut params: Vec<f32>,
    mut optimizer: Optimizer,
    channels: StepChannels,
) -> Result<u64> {
    let len = params.len();
    let mut average = vec![0.0f32; len];
    let mut scratch = Vec::new();
    let mut times = StepTimes::default();
    while let Ok(batch) = channels.batches.recv() {
        validate_batch(&batch)?;
        let id = batch.id.unwrap_or_default();
        let started = Instant::now();
        let (gradient, stats) = if batch.count == 0 {
            (codec::encode_f32(&vec![0.0; len]), BatchStats::default())
        } else {
            let (x, y) = batch_tensors(
                &batch.pixels,
                &batch.labels,
                config.normalize,
                replica.device(),
                &mut scratch,
            )?;
            let (g, stats) = replica.gradient(&x, &y)?;
            (g.to_bytes()?, stats)
        };
        let compute_ms = started.elapsed().as_secs_f32() * 1000.0;
        let msg = pb::Gradient {
            id: Some(id),
            samples: stats.samples,
            loss_sum: stats.loss_sum,
            correct: stats.correct,
            data: Bytes::from(gradient),
            compute_ms,
        };
        if !channels.send(pb::worker_message::Kind::Gradient(msg)) {
            bail!(
                "the step stream closed while sending the gradient of epoch {} step {}",
                id.epoch + 1,
                id.step + 1
            );
        }
        let sent = Instant::now();
        times.compute_s += (sent - started).as_secs_f64();
        let reduced = channels.reduced.recv();
        let received = Instant::now();
        times.wait_s += (received - sent).as_secs_f64();
        let Ok(reduced) = reduced else {
            bail!(
                "the step stream ended while waiting for the average gradient of epoch {} step {}",
                id.epoch + 1,
                id.step + 1
            );
        };
        let rid = reduced.id.unwrap_or_default();
        if rid != id {
            bail!(
                "protocol error: expected the average of epoch {} step {}, got epoch {} step {}",
                id.epoch + 1,
                id.step + 1,
                rid.epoch + 1,
                rid.step + 1
            );
        }
        let average = codec::f32_view(&reduced.data, &mut average)
            .and_then(|avg| codec::check_finite(avg).map(|_| avg))
            .context("the average gradient from the coordinator")?;
        optimizer.set_epoch(id.epoch);
        optimizer.step(&mut params, average);
        replica.set_params(&params)?;
        times.apply_s += received.elapsed().as_secs_f64();
        times.steps += 1;
        if schedule::digest_due(id.step, config.cluster.digest_every, batch.last_of_epoch) {
            let msg = pb::Digest {
                id: Some(id),
                sha256: codec::state_digest(&params, optimizer.state()),
            };
            channels.send(pb::worker_message::Kind::Digest(msg));
        }
    }
    times.log();
    Ok(times.steps)
}

/// A device-side all-reduce among the ranks (NCCL between GPUs).
pub trait Collective {
    /// The element-wise sum of `flat` over all ranks, on the same device.
    fn all_reduce_sum(&mut self, flat: &Tensor) -> Result<Tensor>;
}

/// What the collective (NCCL) step loop works with.
pub struct CollectiveRun<'a> {
    /// The job configuration.
    pub config: &'a JobConfig,
    /// This worker's rank; rank 0 uploads its state after every epoch.
    pub rank: u32,
    /// The model replica on the device.
    pub replica: &'a mut Replica,
    /// Flat parameters on the device.
    pub params: Tensor,
    /// The optimizer, state on the device.
    pub optimizer: DeviceOptimizer,
    /// The step stream.
    pub channels: StepChannels,
    /// The all-reduce.
    pub collective: &'a mut dyn Collective,
    /// Uploads a state to the coordinator (rank 0, at epoch ends).
    pub push_state: &'a mut dyn FnMut(TrainingState) -> Result<()>,
}

/// Runs the NCCL-mode step loop: batches still come from the coordinator, gradients are summed
/// across ranks on the devices, and every rank applies the same optimizer step on its device.
/// The coordinator only hears each step's statistics, digests, and rank 0's state per epoch.
pub fn run_collective(run: CollectiveRun<'_>) -> Result<u64> {
    let CollectiveRun {
        config,
        rank,
        replica,
        mut params,
        mut optimizer,
        channels,
        collective,
        push_state,
    } = run;
    let len = params.elem_count();
    let device = replica.device().clone();
    let mut scratch = Vec::new();
    let mut times = StepTimes::default();
    // Loss and accuracy accumulate on the device and are read (a host synchronisation) only
    // every REPORT_EVERY steps and at epoch ends; the steps in between report zeros, and the
    // coordinator's epoch totals (sums) come out the same. The same read checks that the
    // parameters are still finite: no reducer looks at the summed gradients here, and a NaN
    // or infinity in them turns the parameters NaN on every rank alike, which the digests
    // cannot see.
    const REPORT_EVERY: u64 = 50;
    let mut pending = Tensor::zeros(2, DType::F32, &device)?;
    let mut pending_samples = 0u32;
    while let Ok(batch) = channels.batches.recv() {
        validate_batch(&batch)?;
        let id = batch.id.unwrap_or_default();
        let started = Instant::now();
        let flat = if batch.count == 0 {
            Tensor::zeros(len, DType::F32, &device)?
        } else {
            let (x, y) = batch_tensors(
                &batch.pixels,
                &batch.labels,
                config.normalize,
                &device,
                &mut scratch,
            )?;
            let (g, stats) = replica.gradient_lazy(&x, &y)?;
            pending = (pending + stats)?;
            pending_samples += batch.count;
            g.to_flat_tensor()?
        };
        let computed = Instant::now();
        times.compute_s += (computed - started).as_secs_f64();
        // The step is named here: a rank may run a step ahead of the one the coordinator is
        // collecting, so the coordinator's own "during step" can be one behind.
        let summed = collective.all_reduce_sum(&flat).with_context(|| {
            format!(
                "all-reducing the gradient of epoch {} step {}",
                id.epoch + 1,
                id.step + 1
            )
        })?;
        let reduced = Instant::now();
        times.wait_s += (reduced - computed).as_secs_f64();
        let average = summed.affine(1.0 / batch.global_count.max(1) as f64, 0.0)?;
        optimizer.set_epoch(id.epoch);
        params = optimizer.step(&params, &average)?;
        replica.set_params_from_tensor(&params)?;
        times.apply_s += reduced.elapsed().as_secs_f64();
        times.steps += 1;
        let stats = if batch.last_of_epoch || (id.step + 1).is_multiple_of(REPORT_EVERY) {
            let health = params.sum_all()?.reshape(1)?;
            let read = Tensor::cat(&[&pending, &health], 0)?.to_vec1::<f32>()?;
            if !read[2].is_finite() {
                bail!(
                    "the parameters hold a NaN or infinity after epoch {} step {}: training diverged (a \
                     learning rate too high?); the last checkpoint is from before",
                    id.epoch + 1,
                    id.step + 1
                );
            }
            let read = BatchStats::from_values(&read, pending_samples);
            pending = Tensor::zeros(2, DType::F32, &device)?;
            pending_samples = 0;
            read
        } else {
            BatchStats::default()
        };
        let done = pb::StepDone {
            id: Some(id),
            samples: stats.samples,
            loss_sum: stats.loss_sum,
            correct: stats.correct,
            compute_ms: started.elapsed().as_secs_f32() * 1000.0,
        };
        if !channels.send(pb::worker_message::Kind::StepDone(done)) {
            bail!(
                "the step stream closed after epoch {} step {}",
                id.epoch + 1,
                id.step + 1
            );
        }
        let digest_due =
            schedule::digest_due(id.step, config.cluster.digest_every, batch.last_of_epoch);
        let push_due = batch.last_of_epoch && rank == 0;
        if digest_due || push_due {
            let host_params = params.to_vec1::<f32>()?;
            let state = optimizer.state()?;
            if digest_due {
                let msg = pb::Digest {
                    id: Some(id),
                    sha256: codec::state_digest(&host_params, &state),
                };
                channels.send(pb::worker_message::Kind::Digest(msg));
            }
            if push_due {
                push_state(TrainingState {
                    params: host_params,
                    optimizer: state,
                    position: Position {
                        epoch: id.epoch + 1,
                        step: 0,
                    },
                })
                .with_context(|| format!("uploading the state after epoch {}", id.epoch + 1))?;
            }
        }
    }
    times.log();
    Ok(times.steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_batches_are_refused() {
        let good = pb::Batch {
            id: None,
            count: 1,
            global_count: 2,
            pixels: Bytes::from(vec![0u8; IMAGE_PIXELS]),
            labels: Bytes::from(vec![3u8]),
            last_of_epoch: false,
        };
        validate_batch(&good).unwrap();
        let mut short = good.clone();
        short.pixels = Bytes::from(vec![0u8; 10]);
        assert!(validate_batch(&short).is_err());
        let mut label = good.clone();
        label.labels = Bytes::from(vec![10u8]);
        assert!(validate_batch(&label).is_err());
        let mut count = good;
        count.global_count = 0;
        assert!(validate_batch(&count).is_err());
    }

    /// An all-reduce among one rank that hands back `f(gradient)`.
    struct OneRank(fn(&Tensor) -> candle_core::Result<Tensor>);

    impl Collective for OneRank {
        fn all_reduce_sum(&mut self, flat: &Tensor) -> Result<Tensor> {
            Ok((self.0)(flat)?)
        }
    }

    /// Runs the collective loop on the CPU over one batch (the epoch's last) with `collective`;
    /// returns its result and how many states were pushed.
    fn one_collective_step(collective: &mut OneRank) -> (Result<u64>, usize) {
        use lockstep_common::model::Network;
        let device = candle_core::Device::Cpu;
        let config = JobConfig::preset("softmax").unwrap();
        let network = Network::new(&config.model);
        let params = network.init_params(1);
        let n = params.len();
        let state = Optimizer::new(config.optimizer.clone(), n).state().clone();
        let mut replica = Replica::new(network, &params, device.clone()).unwrap();
        let (batch_tx, batches) = std::sync::mpsc::channel();
        let (_reduced_tx, reduced) = std::sync::mpsc::channel();
        let (_rendezvous_tx, rendezvous) = std::sync::mpsc::channel();
        let (out, _out_rx) = tokio::sync::mpsc::unbounded_channel();
        batch_tx
            .send(pb::Batch {
                id: Some(pb::StepId::new(0, 0, 0)),
                count: 2,
                global_count: 2,
                pixels: Bytes::from(vec![128u8; 2 * IMAGE_PIXELS]),
                labels: Bytes::from(vec![1u8, 7]),
                last_of_epoch: true,
            })
            .unwrap();
        drop(batch_tx);
        let mut pushed = 0;
        let mut push = |_: TrainingState| -> Result<()> {
            pushed += 1;
            Ok(())
        };
        let result = run_collective(CollectiveRun {
            config: &config,
            rank: 0,
            replica: &mut replica,
            params: Tensor::from_slice(&params, n, &device).unwrap(),
            optimizer: DeviceOptimizer::new(config.optimizer.clone(), &state, &device).unwrap(),
            channels: StepChannels {
                batches,
                reduced,
                rendezvous,
                out,
            },
            collective,
            push_state: &mut push,
        });
        (result, pushed)
    }

    #[test]
    fn the_collective_loop_steps_and_rank_0_uploads_its_state_at_the_epoch_end() {
        let (result, pushed) = one_collective_step(&mut OneRank(|g| Ok(g.clone())));
        assert_eq!(result.unwrap(), 1);
        assert_eq!(pushed, 1);
    }

    #[test]
    fn a_non_finite_summed_gradient_stops_the_collective_loop() {
        let (result, pushed) = one_collective_step(&mut OneRank(|g| g.affine(f64::NAN, 0.0)));
        let err = format!("{:#}", result.unwrap_err());
        assert!(
            err.contains("NaN or infinity after epoch 1 step 1"),
            "{err}"
        );
        assert_eq!(pushed, 0, "a diverged state must not be uploaded");
    }
}
