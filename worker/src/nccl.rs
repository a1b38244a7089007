//! The NCCL all-reduce of GPU workers (`--backend nccl`, built with the `cuda` feature).
//!
//! Bootstrap goes through the coordinator: rank 0 creates the NCCL unique id and sends it on
//! its step stream; the coordinator relays it to the other ranks with their rank assignment;
//! every rank then creates its communicator, with a time limit, because `ncclCommInitRank`
//! blocks until all ranks have called it.

use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::cuda::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda::CudaStorage;
use candle_core::op::BackpropOp;
use candle_core::{Device, Storage, Tensor};

use crate::compute::Collective;

/// Length of an NCCL unique id in bytes.
pub const ID_BYTES: usize = 128;

/// A fresh NCCL unique id, as bytes to send through the coordinator (rank 0 only).
pub fn new_id() -> Result<Vec<u8>> {
    let id = Id::new().map_err(|e| anyhow!("creating the NCCL unique id: {e:?}"))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

/// The NCCL communicator of one rank.
pub struct Nccl {
    comm: Comm,
    device: Device,
}

// SAFETY: the communicator is created on, and only ever used from, the worker's single
// compute thread; it is moved there once and never shared.
unsafe impl Send for Nccl {}

impl Nccl {
    /// Creates this rank's communicator from the relayed id; fails after `timeout` instead of
    /// blocking forever when another rank never joins.
    pub fn connect(
        device: &Device,
        id: &[u8],
        rank: usize,
        world: usize,
        timeout: Duration,
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
        let comm = match rx.recv_timeout(timeout) {
            Ok(Ok(SendComm(c))) => c,
            Ok(Err(e)) => bail!(
                "creating the NCCL communicator for rank {rank} of {world} failed: {e:?}; run with NCCL_DEBUG=INFO for \
                 details (and NCCL_SOCKET_IFNAME=<interface> if the hosts have several networks)"
            ),
            Err(_) => bail!(
                "creating the NCCL communicator for rank {rank} of {world} did not finish within {}s: another rank \
                 did not join, or the ranks cannot reach each other (NCCL_DEBUG=INFO, NCCL_SOCKET_IFNAME)",
                timeout.as_secs()
            ),
        };
        Ok(Self {
            comm,
            device: device.clone(),
        })
    }
}

struct SendComm(Comm);
// SAFETY: handed from the creating thread to the compute thread exactly once.
unsafe impl Send for SendComm {}

impl Collective for Nccl {
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
            self.comm
                .all_reduce(&src, &mut out, &ReduceOp::Sum)
                .map_err(|e| anyhow!("NCCL all-reduce failed: {e:?}"))
                .context("all-reducing the gradient")?;
        }
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, cuda));
        Ok(Tensor::from_storage(storage, n, BackpropOp::none(), false))
    }
}
