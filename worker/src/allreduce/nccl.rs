//! The NCCL all-reduce of GPU workers (`--backend nccl`, built with the `cuda` feature).
//!
//! Every membership gets a communicator of its own: its rank 0 creates an NCCL unique id and
//! sends it on its step stream; the coordinator relays it to the membership's other ranks; every
//! rank then creates its communicator, with a time limit, because `ncclCommInitRank` blocks
//! until all ranks have called it. When the coordinator pauses the membership (a rank was lost),
//! the communicator is aborted (`ncclCommAbort`, which cudarc runs when a communicator is
//! dropped), so a rank waiting on a dead peer is released, and the survivors form a new one.
//!
//! A rank's own shards are summed on the device in shard order before the all-reduce; NCCL then
//! sums across ranks in its own order, so with NCCL the model depends on the membership (see the
//! README). What has really run on a GPU is listed there too.

use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::cuda::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda::CudaStorage;
use candle_core::op::BackpropOp;
use candle_core::{Device, Storage, Tensor};

use super::{AllReduce, Bootstrap, Former, ShardResult, StepWork};
use crate::abort::{AbortSignal, Interrupted};
use crate::state::Averaged;

/// Length of an NCCL unique id in bytes.
pub const ID_BYTES: usize = 128;

/// A fresh NCCL unique id, as bytes to send through the coordinator (rank 0 only).
pub fn new_id() -> Result<Vec<u8>> {
    let id = Id::new().map_err(|e| anyhow!("creating the NCCL unique id: {e:?}"))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

struct SendComm(Comm);
// SAFETY: the communicator is used by one thread at a time: the compute thread, under the
// mutex, or the abort hook, which takes it out of the mutex to drop (abort) it.
unsafe impl Send for SendComm {}

/// The NCCL communicator of one rank in one membership.
pub struct Nccl {
    comm: Arc<Mutex<Option<SendComm>>>,
    device: Device,
}

impl Nccl {
    /// Creates this rank's communicator from the relayed id; fails after `timeout` instead of
    /// blocking forever when another rank never joins.
    pub fn connect(
        device: &Device,
        id: &[u8],
        rank: usize,
        world: usize,
        timeout: Duration,
        abort: &AbortSignal,
    ) -> Result<Self> {
        if id.len() != ID_BYTES {
            bail!(
                "the relayed NCCL id has {} bytes, expected {ID_BYTES}",
                id.len()
            );
        }
        let mut internal = [0 as std::ffi::c_char; ID_BYTES];
        for (dst, &src) in internal.iter_mut().zip(id) {
            *dst = src as std::ffi::c_char;
        }
        let stream = device.as_cuda_device()?.cuda_stream();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let comm = Comm::from_rank(stream, rank, world, Id::uninit(internal));
            let _ = tx.send(comm.map(SendComm));
        });
        let deadline = std::time::Instant::now() + timeout;
        let comm = loop {
            abort.check()?;
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(c)) => break c,
                Ok(Err(e)) => bail!(
                    "creating the NCCL communicator for rank {rank} of {world} failed: {e:?}; run with NCCL_DEBUG=INFO \
                     for details (and NCCL_SOCKET_IFNAME=<interface> if the hosts have several networks)"
                ),
                Err(mpsc::RecvTimeoutError::Timeout) if std::time::Instant::now() < deadline => {}
                Err(_) => bail!(
                    "creating the NCCL communicator for rank {rank} of {world} did not finish within {}s: another \
                     rank did not join, or the ranks cannot reach each other (NCCL_DEBUG=INFO, NCCL_SOCKET_IFNAME)",
                    timeout.as_secs()
                ),
            }
        };
        let comm = Arc::new(Mutex::new(Some(comm)));
        let hook = comm.clone();
        abort.on_trip(move || {
            // Dropping the communicator aborts it, releasing kernels that wait on a dead peer.
            // When the compute thread is inside an NCCL call, abort as soon as it returns.
            let hook = hook.clone();
            std::thread::spawn(move || {
                let taken = hook.lock().map(|mut c| c.take());
                drop(taken);
            });
        });
        Ok(Self {
            comm,
            device: device.clone(),
        })
    }

    /// The element-wise sum of `flat` over all ranks, on the same device.
    fn all_reduce_sum(&mut self, flat: &Tensor) -> Result<Tensor> {
        let flat = flat.contiguous()?;
        let n = flat.elem_count();
        let cuda = self.device.as_cuda_device()?.clone();
        let mut out = cuda
            .cuda_stream()
            .alloc_zeros::<f32>(n)
            .map_err(|e| anyhow!("allocating the all-reduce buffer: {e:?}"))?;
        {
            let (storage, layout) = flat.storage_and_layout();
            let Storage::Cuda(cs) = &*storage else {
                bail!("the gradient is not on a CUDA device");
            };
            let src = cs.as_cuda_slice::<f32>()?;
            let start = layout.start_offset();
            let src = src.slice(start..start + n);
            let guard = self
                .comm
                .lock()
                .map_err(|_| anyhow!("the NCCL communicator lock"))?;
            let Some(comm) = guard.as_ref() else {
                return Err(Interrupted).context("the NCCL communicator was aborted");
            };
            comm.0
                .all_reduce(&src, &mut out, &ReduceOp::Sum)
                .map_err(|e| anyhow!("NCCL all-reduce failed: {e:?}"))
                .context("all-reducing the gradient")?;
        }
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, cuda));
        Ok(Tensor::from_storage(storage, n, BackpropOp::none(), false))
    }
}

impl AllReduce for Nccl {
    fn submit(&mut self, step: &StepWork, shards: Vec<ShardResult>) -> Result<Option<Averaged>> {
        let mut local: Option<Tensor> = None;
        for s in &shards {
            let flat = s.gradient.to_flat_tensor()?;
            local = Some(match local {
                None => flat,
                Some(sum) => (sum + flat)?,
            });
        }
        let Some(local) = local else {
            bail!("no shard gradients to all-reduce");
        };
        let summed = self.all_reduce_sum(&local)?;
        let average = summed.affine(1.0 / step.global_count.max(1) as f64, 0.0)?;
        Ok(Some(Averaged::Device(average)))
    }
}

/// Forms NCCL communicators on `device`.
pub struct NcclFormer {
    /// This worker's GPU.
    pub device: Device,
    /// Gradient length in elements (an idle rank all-reduces zeros of it).
    pub len: usize,
}

impl Former for NcclFormer {
    fn form(
        &mut self,
        membership: u64,
        rank: u32,
        world: u32,
        boot: &Bootstrap<'_>,
    ) -> Result<Box<dyn AllReduce>> {
        let id = if rank == 0 {
            let id = new_id()?;
            boot.publish(membership, id.clone())?;
            id
        } else {
            boot.await_relay(membership)?.to_vec()
        };
        let comm = Nccl::connect(
            &self.device,
            &id,
            rank as usize,
            world as usize,
            boot.timeout,
            boot.abort,
        )?;
        Ok(Box::new(IdleAware {
            comm,
            len: self.len,
        }))
    }
}

/// An NCCL rank that may have no shards in a step: it still takes part in the all-reduce,
/// with zeros of the gradient's length.
struct IdleAware {
    comm: Nccl,
    len: usize,
}

impl AllReduce for IdleAware {
    fn submit(&mut self, step: &StepWork, shards: Vec<ShardResult>) -> Result<Option<Averaged>> {
        if shards.is_empty() {
            let zeros = Tensor::zeros(self.len, candle_core::DType::F32, &self.comm.device)?;
            let summed = self.comm.all_reduce_sum(&zeros)?;
            let average = summed.affine(1.0 / step.global_count.max(1) as f64, 0.0)?;
            return Ok(Some(Averaged::Device(average)));
        }
        self.comm.submit(step, shards)
    }
}
