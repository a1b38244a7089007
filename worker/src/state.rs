//! A worker's training state — parameters and optimizer state — and how one averaged gradient
//! updates it. CPU workers, whichever backend sums their gradients, keep the state on the host
//! and run the fused optimizer loop the coordinator runs ([`HostState`]), so every CPU replica,
//! the coordinator's included, stays bit-identical under SGD and Adam alike. GPU workers keep it
//! on the device and run the same update as tensor kernels ([`DeviceState`]).

use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use candle_core::Tensor;
use lockstep_common::checkpoint::{Position, TrainingState};
use lockstep_common::codec;
use lockstep_common::config::OptimizerConfig;
use lockstep_common::model::Replica;
use lockstep_common::optim::{DeviceOptimizer, Optimizer};
use lockstep_common::protocol::StepId;

/// A step's averaged gradient, where the all-reduce left it.
pub enum Averaged {
    /// Little-endian f32 bytes (the grpc coordinator's message).
    Bytes(Bytes),
    /// Host values (tcp), all finite (the collective checks them, as the reducer that
    /// summed them did). Shared with the collective that made them, which reuses the buffer
    /// for the next step once the optimizer has let go of it.
    Host(Arc<Vec<f32>>),
    /// A flat tensor on the device (nccl).
    Device(Tensor),
    /// Host values read in place from the segment that `tcp` ranks on one host share, all
    /// finite (the ranks checked their parts).
    Shared(crate::allreduce::shm::SharedAverage),
}

/// Parameters and optimizer state of one replica.
pub trait ModelState: Send {
    /// Adopts `state` (a fetched one) and puts its parameters into `replica`.
    fn load(&mut self, state: &TrainingState, replica: &mut Replica) -> Result<()>;
    /// One optimizer step of epoch `epoch` (from 0) with the averaged gradient; `replica`
    /// gets the new parameters.
    fn apply(&mut self, epoch: u64, average: Averaged, replica: &mut Replica) -> Result<()>;
    /// A host copy of the state, to be continued from `next`.
    fn snapshot(&self, next: StepId) -> Result<TrainingState>;
    /// SHA-256 of parameters and optimizer state (equal on every replica).
    fn digest(&self) -> Result<String>;
    /// Whether every parameter is finite.
    fn params_finite(&self) -> Result<bool>;
}

/// The state on the host, updated by the fused optimizer loop.
pub struct HostState {
    params: Vec<f32>,
    optimizer: Optimizer,
}

impl HostState {
    /// An empty state for `len` parameters, to be filled by [`ModelState::load`].
    pub fn new(config: OptimizerConfig, len: usize) -> Self {
        Self {
            params: vec![0.0; len],
            optimizer: Optimizer::new(config, len),
        }
    }

    /// One optimizer step with a host average that is finite already: the collective that
    /// made it refuses anything else.
    fn step_host(&mut self, avg: &[f32]) -> Result<()> {
        anyhow::ensure!(
            avg.len() == self.params.len(),
            "the average gradient has {} values, the model {}",
            avg.len(),
            self.params.len()
        );
        self.optimizer.step(&mut self.params, avg);
        Ok(())
    }
}

impl ModelState for HostState {
    fn load(&mut self, state: &TrainingState, replica: &mut Replica) -> Result<()> {
        self.optimizer = Optimizer::with_state(
            self.optimizer.config().clone(),
            self.params.len(),
            state.optimizer.clone(),
        )?;
        self.params.clone_from(&state.params);
        replica.set_params(&self.params)?;
        Ok(())
    }

    fn apply(&mut self, epoch: u64, average: Averaged, replica: &mut Replica) -> Result<()> {
        self.optimizer.set_epoch(epoch);
        match average {
            Averaged::Bytes(bytes) => {
                // Read in place: a message's bytes land at any alignment in the decoder's
                // buffer, and an aligned copy would cost a whole pass over the gradient.
                anyhow::ensure!(
                    bytes.len() == self.params.len() * 4,
                    "the average gradient has {} bytes, the model {} parameters",
                    bytes.len(),
                    self.params.len()
                );
                codec::check_finite_le(&bytes).context("the average gradient")?;
                self.optimizer.step_le_bytes(&mut self.params, &bytes);
            }
            Averaged::Host(avg) => self.step_host(&avg)?,
            Averaged::Shared(avg) => self.step_host(&avg)?,
            Averaged::Device(t) => {
                let avg = t.to_vec1::<f32>()?;
                self.optimizer.step(&mut self.params, &avg);
            }
        }
        replica.set_params(&self.params)?;
        Ok(())
    }

    fn snapshot(&self, next: StepId) -> Result<TrainingState> {
        Ok(TrainingState {
            params: self.params.clone(),
            optimizer: self.optimizer.state().clone(),
            position: Position {
                epoch: next.epoch,
                step: next.step,
            },
        })
    }

    fn digest(&self) -> Result<String> {
        Ok(codec::state_digest(&self.params, self.optimizer.state()))
    }

    fn params_finite(&self) -> Result<bool> {
        Ok(codec::check_finite(&self.params).is_ok())
    }
}

/// The state on the replica's device, updated by the optimizer's tensor kernels.
pub struct DeviceState {
    config: OptimizerConfig,
    params: Tensor,
    optimizer: DeviceOptimizer,
}

impl DeviceState {
    /// An empty state for `len` parameters on `device`, to be filled by [`ModelState::load`].
    pub fn new(config: OptimizerConfig, len: usize, device: &candle_core::Device) -> Result<Self> {
        let empty = Optimizer::new(config.clone(), len);
        Ok(Self {
            params: Tensor::zeros(len, candle_core::DType::F32, device)?,
            optimizer: DeviceOptimizer::new(config.clone(), empty.state(), device)?,
            config,
        })
    }
}

impl ModelState for DeviceState {
    fn load(&mut self, state: &TrainingState, replica: &mut Replica) -> Result<()> {
        let device = replica.device().clone();
        self.params = Tensor::from_slice(&state.params, state.params.len(), &device)?;
        self.optimizer = DeviceOptimizer::new(self.config.clone(), &state.optimizer, &device)?;
        replica.set_params_from_tensor(&self.params)?;
        Ok(())
    }

    fn apply(&mut self, epoch: u64, average: Averaged, replica: &mut Replica) -> Result<()> {
        let device = replica.device().clone();
        let avg = match average {
            Averaged::Device(t) => t,
            Averaged::Host(v) => {
                Tensor::from_vec(Arc::unwrap_or_clone(v), self.params.elem_count(), &device)?
            }
            Averaged::Shared(v) => Tensor::from_slice(&v, self.params.elem_count(), &device)?,
            Averaged::Bytes(b) => codec::tensor_from_le(&b, self.params.elem_count(), &device)?,
        };
        self.optimizer.set_epoch(epoch);
        self.params = self.optimizer.step(&self.params, &avg)?;
        replica.set_params_from_tensor(&self.params)?;
        Ok(())
    }

    fn snapshot(&self, next: StepId) -> Result<TrainingState> {
        Ok(TrainingState {
            params: self.params.to_vec1::<f32>()?,
            optimizer: self.optimizer.state()?,
            position: Position {
                epoch: next.epoch,
                step: next.step,
            },
        })
    }

    fn digest(&self) -> Result<String> {
        Ok(codec::state_digest(
            &self.params.to_vec1::<f32>()?,
            &self.optimizer.state()?,
        ))
    }

    fn params_finite(&self) -> Result<bool> {
        Ok(self.params.sum_all()?.to_scalar::<f32>()?.is_finite())
    }
}
