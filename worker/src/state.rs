//! A worker's training state — parameters and optimizer state — and how one averaged gradient
//! updates it. CPU workers, whichever backend sums their gradients, keep the state on the host
//! and run the fused optimizer loop the coordinator runs ([`HostState`]), so every CPU replica,
//! the coordinator's included, stays bit-identical under SGD and Adam alike. GPU workers keep it
//! on the device and run the same update as tensor kernels ([`DeviceState`]).

use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use candle_core::{Device, Tensor};
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

/// The state on the host, updated by the fused optimizer loop. The parameters are one flat
/// tensor whose storage the replica's layers are views of, and the optimizer updates that
/// storage in place: no copy of the parameters and no rebuilt model per step (a 24 MB copy on
/// `mlp:2048,2048`).
pub struct HostState {
    params: Tensor,
    optimizer: Optimizer,
}

impl HostState {
    /// An empty state for `len` parameters, to be filled by [`ModelState::load`].
    pub fn new(config: OptimizerConfig, len: usize) -> Result<Self> {
        Ok(Self {
            params: Tensor::zeros(len, candle_core::DType::F32, &Device::Cpu)?,
            optimizer: Optimizer::new(config, len),
        })
    }

    fn len(&self) -> usize {
        self.params.elem_count()
    }

    /// Runs `update` on the parameters where they lie.
    fn update(&mut self, update: impl FnOnce(&mut Optimizer, &mut [f32])) -> Result<()> {
        let op = InPlace(std::cell::RefCell::new(Some(|params: &mut [f32]| {
            update(&mut self.optimizer, params)
        })));
        // Another device's storage fails here: the operation has only a CPU form.
        self.params.inplace_op1(&op)?;
        Ok(())
    }

    /// One optimizer step with a host average.
    fn step_host(&mut self, avg: &[f32]) -> Result<()> {
        anyhow::ensure!(
            avg.len() == self.len(),
            "the average gradient has {} values, the model {}",
            avg.len(),
            self.len()
        );
        self.update(|o, params| o.step(params, avg))
    }

    /// The parameters as host values.
    fn with_params<R>(&self, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
        Ok(codec::with_cpu_f32s(&self.params, f)?)
    }
}

/// A candle in-place operation running a closure over a flat CPU tensor's values once.
struct InPlace<F>(std::cell::RefCell<Option<F>>);

impl<F: FnOnce(&mut [f32])> candle_core::InplaceOp1 for InPlace<F> {
    fn name(&self) -> &'static str {
        "optimizer-step"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let candle_core::CpuStorage::F32(values) = storage else {
            candle_core::bail!("the parameters are not f32");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("the parameters are not contiguous");
        };
        if let Some(f) = self.0.borrow_mut().take() {
            f(&mut values[start..end]);
        }
        Ok(())
    }
}

impl ModelState for HostState {
    fn load(&mut self, state: &TrainingState, replica: &mut Replica) -> Result<()> {
        let len = self.len();
        self.optimizer = Optimizer::with_state(
            self.optimizer.config().clone(),
            len,
            state.optimizer.clone(),
        )?;
        anyhow::ensure!(
            state.params.len() == len,
            "the state has {} parameters, the model {len}",
            state.params.len()
        );
        // A fresh tensor: the replica's layers become views of it.
        self.params = Tensor::from_slice(&state.params, len, &Device::Cpu)?;
        replica.set_params_from_tensor(&self.params)?;
        Ok(())
    }

    fn apply(&mut self, epoch: u64, average: Averaged, replica: &mut Replica) -> Result<()> {
        self.optimizer.set_epoch(epoch);
        let len = self.len();
        match average {
            Averaged::Bytes(bytes) => {
                // Read in place: a message's bytes land at any alignment in the decoder's
                // buffer, and an aligned copy would cost a whole pass over the gradient.
                anyhow::ensure!(
                    bytes.len() == len * 4,
                    "the average gradient has {} bytes, the model {len} parameters",
                    bytes.len(),
                );
                codec::check_finite_le(&bytes).context("the average gradient")?;
                self.update(|o, params| o.step_le_bytes(params, &bytes))?;
            }
            // Host averages are finite already: the collective that made them refuses
            // anything else.
            Averaged::Host(avg) => self.step_host(&avg)?,
            Averaged::Shared(avg) => self.step_host(&avg)?,
            Averaged::Device(t) => {
                let avg = t.to_vec1::<f32>()?;
                self.step_host(&avg)?;
            }
        }
        // The replica's layers are views of the parameters, unless a caller gave it others.
        if !replica.shares_params(&self.params) {
            replica.set_params_from_tensor(&self.params)?;
        }
        Ok(())
    }

    fn snapshot(&self, next: StepId) -> Result<TrainingState> {
        Ok(TrainingState {
            params: self.with_params(<[f32]>::to_vec)?,
            optimizer: self.optimizer.state().clone(),
            position: Position {
                epoch: next.epoch,
                step: next.step,
            },
        })
    }

    fn digest(&self) -> Result<String> {
        self.with_params(|p| codec::state_digest(p, self.optimizer.state()))
    }

    fn params_finite(&self) -> Result<bool> {
        self.with_params(|p| codec::check_finite(p).is_ok())
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

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_common::config::JobConfig;
    use lockstep_common::model::Network;

    fn setup() -> (Network, OptimizerConfig, TrainingState, Tensor) {
        let config = JobConfig::preset("mlp").unwrap();
        let network = Network::new(&config.model);
        let len = network.num_params();
        let state = TrainingState {
            params: network.init_params(5),
            optimizer: Optimizer::new(config.optimizer.clone(), len)
                .state()
                .clone(),
            position: Position { epoch: 0, step: 0 },
        };
        let x = Tensor::from_vec(
            (0..3 * 784).map(|i| (i % 17) as f32 / 17.0).collect(),
            (3, 784),
            &Device::Cpu,
        )
        .unwrap();
        (network, config.optimizer, state, x)
    }

    fn average(len: usize, step: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 31 + step * 7) % 101) as f32 / 1000.0 - 0.05)
            .collect()
    }

    fn logits(model: &lockstep_common::model::Model, x: &Tensor) -> Vec<f32> {
        model
            .logits(x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn steps_update_the_replica_in_place_with_the_plain_optimizers_bits() {
        let (network, config, state, x) = setup();
        let len = network.num_params();
        let mut host = HostState::new(config.clone(), len).unwrap();
        // The replica starts with parameters of its own, then takes the state's.
        let mut replica = Replica::new(network.clone(), &vec![0.0; len], Device::Cpu).unwrap();
        host.load(&state, &mut replica).unwrap();
        assert!(replica.shares_params(&host.params));
        let mut reference = Optimizer::with_state(config, len, state.optimizer.clone()).unwrap();
        let mut params = state.params.clone();
        for step in 0..3 {
            let avg = average(len, step);
            reference.step(&mut params, &avg);
            host.apply(0, Averaged::Host(Arc::new(avg)), &mut replica)
                .unwrap();
        }
        let after = host.snapshot(StepId { epoch: 0, step: 3 }).unwrap();
        assert_eq!(after.params, params, "the plain optimizer's bits");
        assert_eq!(&after.optimizer, reference.state());
        // The replica computes with the updated parameters, without being handed them.
        let expected = network.model_from_flat(&params, &Device::Cpu).unwrap();
        assert_eq!(logits(replica.model(), &x), logits(&expected, &x));
        assert_eq!(
            host.digest().unwrap(),
            codec::state_digest(&params, reference.state())
        );
    }

    #[test]
    fn a_replica_given_other_parameters_is_pointed_back_at_the_state() {
        let (network, config, state, x) = setup();
        let len = network.num_params();
        let mut host = HostState::new(config, len).unwrap();
        let mut replica = Replica::new(network.clone(), &state.params, Device::Cpu).unwrap();
        host.load(&state, &mut replica).unwrap();
        replica.set_params(&vec![0.0; len]).unwrap();
        assert!(!replica.shares_params(&host.params));
        host.apply(0, Averaged::Host(Arc::new(average(len, 0))), &mut replica)
            .unwrap();
        assert!(replica.shares_params(&host.params));
        let now = host.snapshot(StepId { epoch: 0, step: 1 }).unwrap().params;
        let expected = network.model_from_flat(&now, &Device::Cpu).unwrap();
        assert_eq!(logits(replica.model(), &x), logits(&expected, &x));
    }

    #[test]
    fn an_average_of_the_wrong_length_is_refused() {
        let (network, config, state, _) = setup();
        let len = network.num_params();
        let mut host = HostState::new(config, len).unwrap();
        let mut replica = Replica::new(network, &state.params, Device::Cpu).unwrap();
        host.load(&state, &mut replica).unwrap();
        let e = host
            .apply(
                0,
                Averaged::Host(Arc::new(vec![0.0; len - 1])),
                &mut replica,
            )
            .unwrap_err();
        assert!(e.to_string().contains("values, the model"), "{e}");
        assert_eq!(
            host.snapshot(StepId { epoch: 0, step: 0 }).unwrap().params,
            state.params
        );
    }
}
