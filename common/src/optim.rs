//! Optimizers over flat `f32` buffers, with explicit state.
//!
//! Every replica (each worker, and the coordinator) runs this exact code on the exact same
//! averaged gradient, so their parameters stay bit-identical without ever being re-sent. One
//! fused loop over the whole buffer costs tens of microseconds, where a per-tensor update
//! through a tensor library costs milliseconds. The update rules follow PyTorch's `SGD` and
//! `Adam` (non-fused), including where weight decay enters.

use anyhow::{bail, Result};

use crate::config::{OptimizerConfig, OptimizerKind};

/// The optimizer's state: everything needed to continue training exactly where it stopped.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerState {
    /// Number of steps taken.
    pub step: u64,
    /// Named state buffers, each as long as the parameters: `momentum` for SGD with
    /// momentum; `exp_avg` and `exp_avg_sq` for Adam.
    pub buffers: Vec<(String, Vec<f32>)>,
}

/// An optimizer bound to its configuration and state.
#[derive(Clone, Debug)]
pub struct Optimizer {
    config: OptimizerConfig,
    state: OptimizerState,
    lr: f64,
}

impl Optimizer {
    /// A fresh optimizer for `len` parameters.
    pub fn new(config: OptimizerConfig, len: usize) -> Self {
        let names: &[&str] = match config.kind {
            OptimizerKind::Sgd if config.momentum > 0.0 => &["momentum"],
            OptimizerKind::Sgd => &[],
            OptimizerKind::Adam => &["exp_avg", "exp_avg_sq"],
        };
        let buffers = names
            .iter()
            .map(|n| (n.to_string(), vec![0.0; len]))
            .collect();
        Self {
            lr: config.lr,
            config,
            state: OptimizerState { step: 0, buffers },
        }
    }

    /// Restores an optimizer from saved state, checking it fits the configuration.
    pub fn with_state(config: OptimizerConfig, len: usize, state: OptimizerState) -> Result<Self> {
        let fresh = Self::new(config, len);
        let want: Vec<&str> = fresh
            .state
            .buffers
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        let got: Vec<&str> = state.buffers.iter().map(|(n, _)| n.as_str()).collect();
        if want != got {
            bail!("optimizer state has buffers {got:?}, this optimizer needs {want:?}");
        }
        if let Some((name, b)) = state.buffers.iter().find(|(_, b)| b.len() != len) {
            bail!(
                "optimizer buffer {name} has {} values, the model has {len} parameters",
                b.len()
            );
        }
        Ok(Self {
            lr: fresh.lr,
            config: fresh.config,
            state,
        })
    }

    /// Sets the learning rate for epoch `epoch` (from 0): `lr · lr_decay^epoch`.
    pub fn set_epoch(&mut self, epoch: u64) {
        self.lr = scheduled_lr(&self.config, epoch);
    }

    /// The explicit state.
    pub fn state(&self) -> &OptimizerState {
        &self.state
    }

    /// The configuration.
    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// Applies one update to `params` from the averaged gradient `grad`.
    pub fn step(&mut self, params: &mut [f32], grad: &[f32]) {
        assert_eq!(
            params.len(),
            grad.len(),
            "gradient and parameters differ in length"
        );
        self.step_iter(params, grad.iter().copied());
    }

    /// Applies one update from a gradient given as little-endian `f32` bytes, read in place at
    /// any alignment (a gradient as it arrives in a message, where it lands wherever the
    /// decoder's buffer puts it). The same arithmetic as [`Optimizer::step`], the same bits.
    pub fn step_le_bytes(&mut self, params: &mut [f32], grad: &[u8]) {
        assert_eq!(
            params.len() * 4,
            grad.len(),
            "gradient and parameters differ in length"
        );
        // Read in place, vectorised: 38 µs for the mlp's 90K parameters on the development
        // machine, against 35 µs from aligned floats and 245 µs with per-byte indexing.
        self.step_iter(params, crate::codec::le_f32_iter(grad));
    }

    fn step_iter(&mut self, params: &mut [f32], grad: impl Iterator<Item = f32>) {
        self.state.step += 1;
        let c = &self.config;
        let wd = c.weight_decay as f32;
        match c.kind {
            OptimizerKind::Sgd => {
                let lr = self.lr as f32;
                if let Some((_, buf)) = self.state.buffers.first_mut() {
                    let mu = c.momentum as f32;
                    let first = self.state.step == 1;
                    for ((p, g0), b) in params.iter_mut().zip(grad).zip(buf.iter_mut()) {
                        let g = if wd != 0.0 { g0 + wd * *p } else { g0 };
                        *b = if first { g } else { mu * *b + g };
                        let d = if c.nesterov { g + mu * *b } else { *b };
                        *p -= lr * d;
                    }
                } else {
                    for (p, g0) in params.iter_mut().zip(grad) {
                        let g = if wd != 0.0 { g0 + wd * *p } else { g0 };
                        *p -= lr * g;
                    }
                }
            }
            OptimizerKind::Adam => {
                let t = self.state.step as i32;
                let h = AdamStep {
                    b1: c.beta1 as f32,
                    b2: c.beta2 as f32,
                    step_size: (self.lr / (1.0 - c.beta1.powi(t))) as f32,
                    bias2_sqrt: (1.0 - c.beta2.powi(t)).sqrt() as f32,
                    eps: c.eps as f32,
                    wd,
                };
                let (m_buf, rest) = self.state.buffers.split_at_mut(1);
                if wd != 0.0 {
                    h.apply::<true>(params, grad, &mut m_buf[0].1, &mut rest[0].1);
                } else {
                    h.apply::<false>(params, grad, &mut m_buf[0].1, &mut rest[0].1);
                }
            }
        }
    }
}

/// The learning rate of epoch `epoch` (from 0) under the per-epoch decay.
pub fn scheduled_lr(config: &OptimizerConfig, epoch: u64) -> f64 {
    config.lr * config.lr_decay.powi(epoch.min(i32::MAX as u64) as i32)
}

/// The same optimizer over flat tensors that stay on a device (GPU workers): the update is a
/// handful of element-wise kernels over the whole buffer instead of a round trip to the host.
/// Ranks running it on the same device type stay bit-identical; its results agree with
/// [`Optimizer`] to rounding.
pub struct DeviceOptimizer {
    config: OptimizerConfig,
    lr: f64,
    step: u64,
    buffers: Vec<(String, candle_core::Tensor)>,
}

impl DeviceOptimizer {
    /// Moves an optimizer's state onto `device`.
    pub fn new(
        config: OptimizerConfig,
        state: &OptimizerState,
        device: &candle_core::Device,
    ) -> candle_core::Result<Self> {
        let buffers = state
            .buffers
            .iter()
            .map(|(n, b)| {
                Ok((
                    n.clone(),
                    candle_core::Tensor::from_slice(b, b.len(), device)?,
                ))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            lr: config.lr,
            config,
            step: state.step,
            buffers,
        })
    }

    /// Sets the learning rate for epoch `epoch` (from 0): `lr · lr_decay^epoch`.
    pub fn set_epoch(&mut self, epoch: u64) {
        self.lr = scheduled_lr(&self.config, epoch);
    }

    /// Copies the state back to the host (for checkpoints and digests).
    pub fn state(&self) -> candle_core::Result<OptimizerState> {
        Ok(OptimizerState {
            step: self.step,
            buffers: self
                .buffers
                .iter()
                .map(|(n, t)| Ok((n.clone(), t.to_vec1::<f32>()?)))
                .collect::<candle_core::Result<_>>()?,
        })
    }

    /// One update: returns the new flat parameters.
    pub fn step(
        &mut self,
        params: &candle_core::Tensor,
        grad: &candle_core::Tensor,
    ) -> candle_core::Result<candle_core::Tensor> {
        self.step += 1;
        let c = &self.config;
        let g = if c.weight_decay != 0.0 {
            (grad + params.affine(c.weight_decay, 0.0)?)?
        } else {
            grad.clone()
        };
        match c.kind {
            OptimizerKind::Sgd => {
                let d = if let Some((_, buf)) = self.buffers.first_mut() {
                    *buf = if self.step == 1 {
                        g.clone()
                    } else {
                        (buf.affine(c.momentum, 0.0)? + &g)?
                    };
                    if c.nesterov {
                        (&g + buf.affine(c.momentum, 0.0)?)?
                    } else {
                        buf.clone()
                    }
                } else {
                    g
                };
                params - d.affine(self.lr, 0.0)?
            }
            OptimizerKind::Adam => {
                let t = self.step as i32;
                let step_size = self.lr / (1.0 - c.beta1.powi(t));
                let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
                let m =
                    (self.buffers[0].1.affine(c.beta1, 0.0)? + g.affine(1.0 - c.beta1, 0.0)?)?;
                let v = (self.buffers[1].1.affine(c.beta2, 0.0)?
                    + g.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
                let denom = v.sqrt()?.affine(1.0 / bias2_sqrt, c.eps)?;
                let update = (m.affine(step_size, 0.0)? / denom)?;
                self.buffers[0].1 = m;
                self.buffers[1].1 = v;
                params - update
            }
        }
    }
}

/// The scalars of one Adam step, precomputed once per step.
struct AdamStep {
    b1: f32,
    b2: f32,
    step_size: f32,
    bias2_sqrt: f32,
    eps: f32,
    wd: f32,
}

impl AdamStep {
    /// One fused pass over the buffers. Uses AVX when the processor has it: the same IEEE
    /// operations (no fused multiply-add) in wider registers, so the result is bit-identical to
    /// the portable loop and replicas on different machines still agree.
    fn apply<const DECAY: bool>(
        &self,
        params: &mut [f32],
        grad: impl Iterator<Item = f32>,
        m: &mut [f32],
        v: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx") {
            // SAFETY: the processor supports AVX (checked just above).
            unsafe { self.apply_avx::<DECAY>(params, grad, m, v) };
            return;
        }
        self.apply_portable::<DECAY>(params, grad, m, v);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx")]
    unsafe fn apply_avx<const DECAY: bool>(
        &self,
        params: &mut [f32],
        grad: impl Iterator<Item = f32>,
        m: &mut [f32],
        v: &mut [f32],
    ) {
        self.apply_portable::<DECAY>(params, grad, m, v);
    }

    /// Zipped iterators (no bounds checks) and the weight-decay branch hoisted out, so the
    /// compiler vectorises the loop.
    #[inline(always)]
    fn apply_portable<const DECAY: bool>(
        &self,
        params: &mut [f32],
        grad: impl Iterator<Item = f32>,
        m: &mut [f32],
        v: &mut [f32],
    ) {
        let (b1, b2, one_b1, one_b2) = (self.b1, self.b2, 1.0 - self.b1, 1.0 - self.b2);
        for (((p, g0), m), v) in params
            .iter_mut()
            .zip(grad)
            .zip(m.iter_mut())
            .zip(v.iter_mut())
        {
            let g = if DECAY { g0 + self.wd * *p } else { g0 };
            *m = b1 * *m + one_b1 * g;
            *v = b2 * *v + one_b2 * g * g;
            let denom = v.sqrt() / self.bias2_sqrt + self.eps;
            *p -= self.step_size * *m / denom;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::JobConfig;

    fn cfg(kind: OptimizerKind, lr: f64) -> OptimizerConfig {
        OptimizerConfig {
            kind,
            lr,
            ..JobConfig::preset("mlp").unwrap().optimizer
        }
    }

    #[test]
    fn plain_sgd_matches_hand_computation() {
        let mut o = Optimizer::new(cfg(OptimizerKind::Sgd, 0.1), 2);
        let mut p = [1.0f32, -2.0];
        o.step(&mut p, &[0.5, -1.0]);
        assert_eq!(p, [1.0 - 0.05, -2.0 + 0.1]);
        assert!(o.state().buffers.is_empty());
    }

    #[test]
    fn sgd_with_momentum_and_weight_decay_matches_hand_computation() {
        let mut c = cfg(OptimizerKind::Sgd, 0.1);
        c.momentum = 0.9;
        c.weight_decay = 0.01;
        let mut o = Optimizer::new(c, 1);
        let mut p = [1.0f32];
        // step 1: g = 0.5 + 0.01*1 = 0.51; buf = 0.51; p = 1 - 0.051 = 0.949
        o.step(&mut p, &[0.5]);
        assert!((p[0] - 0.949).abs() < 1e-7);
        // step 2: g = 0.5 + 0.00949 = 0.50949; buf = 0.9*0.51 + 0.50949 = 0.96849
        // p = 0.949 - 0.096849 = 0.852151
        o.step(&mut p, &[0.5]);
        assert!((p[0] - 0.852151).abs() < 1e-6, "{}", p[0]);
        assert_eq!(o.state().step, 2);
    }

    #[test]
    fn adam_matches_hand_computation() {
        let mut o = Optimizer::new(cfg(OptimizerKind::Adam, 0.001), 2);
        let mut p = [1.0f32, 0.0];
        // Step 1: m = 0.1g, v = 0.001g², m̂ = g, v̂ = g², update = lr·g/(|g|+eps) ≈ lr·sign(g).
        o.step(&mut p, &[2.0, -0.5]);
        assert!((p[0] - 0.999).abs() < 1e-7, "{}", p[0]);
        assert!((p[1] - 0.001).abs() < 1e-7, "{}", p[1]);
        // Step 2 with g = 1 for p0: m = 0.9·0.2 + 0.1·1 = 0.28; v = 0.999·0.004 + 0.001·1 = 0.004996
        // m̂ = 0.28/0.19 = 1.4736842; v̂ = 0.004996/0.001999 = 2.4992496; update = 0.001·1.4736842/1.5809...
        o.step(&mut p, &[1.0, 0.0]);
        let m_hat = 0.28f64 / (1.0 - 0.81);
        let v_hat = 0.004996f64 / (1.0 - 0.998001);
        let expected = 0.999 - 0.001 * m_hat / (v_hat.sqrt() + 1e-8);
        assert!(
            (p[0] as f64 - expected).abs() < 1e-6,
            "{} vs {expected}",
            p[0]
        );
        let names: Vec<&str> = o.state().buffers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["exp_avg", "exp_avg_sq"]);
    }

    #[test]
    fn the_wide_and_portable_adam_loops_agree_bit_for_bit() {
        let n = 1003;
        let grad: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3)
            .collect();
        let h = AdamStep {
            b1: 0.9,
            b2: 0.999,
            step_size: 1e-3 / 0.1,
            bias2_sqrt: 0.001f32.sqrt(),
            eps: 1e-8,
            wd: 0.01,
        };
        let mut a = (vec![0.5f32; n], vec![0.1f32; n], vec![0.2f32; n]);
        let mut b = a.clone();
        h.apply::<true>(&mut a.0, grad.iter().copied(), &mut a.1, &mut a.2);
        h.apply_portable::<true>(&mut b.0, grad.iter().copied(), &mut b.1, &mut b.2);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.0), bits(&b.0));
        assert_eq!(bits(&a.2), bits(&b.2));
    }

    #[test]
    fn the_device_optimizer_agrees_with_the_flat_one() {
        use candle_core::{Device, Tensor};
        for (kind, momentum, wd) in [
            (OptimizerKind::Adam, 0.0, 0.01),
            (OptimizerKind::Sgd, 0.9, 0.0),
            (OptimizerKind::Sgd, 0.0, 0.1),
        ] {
            let mut c = cfg(kind, 0.01);
            c.momentum = momentum;
            c.weight_decay = wd;
            let n = 257;
            let mut flat = Optimizer::new(c.clone(), n);
            let mut dev = DeviceOptimizer::new(c, flat.state(), &Device::Cpu).unwrap();
            let mut p: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut pt = Tensor::from_slice(&p, n, &Device::Cpu).unwrap();
            for step in 0..5 {
                let g: Vec<f32> = (0..n)
                    .map(|i| ((i + step * 13) as f32 * 0.11).cos())
                    .collect();
                flat.step(&mut p, &g);
                pt = dev
                    .step(&pt, &Tensor::from_slice(&g, n, &Device::Cpu).unwrap())
                    .unwrap();
            }
            let pd = pt.to_vec1::<f32>().unwrap();
            for i in 0..n {
                assert!(
                    (p[i] - pd[i]).abs() < 1e-5,
                    "{kind:?} index {i}: {} vs {}",
                    p[i],
                    pd[i]
                );
            }
            let (a, b) = (flat.state(), dev.state().unwrap());
            assert_eq!(a.step, b.step);
            assert_eq!(a.buffers.len(), b.buffers.len());
        }
    }

    #[test]
    fn a_gradient_read_in_place_from_unaligned_bytes_gives_the_same_bits() {
        for kind in [OptimizerKind::Adam, OptimizerKind::Sgd] {
            let mut c = cfg(kind, 0.01);
            c.momentum = 0.9;
            let n = 1001;
            let grad: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3)
                .collect();
            let mut bytes = vec![0u8; 1];
            crate::codec::put_le_f32s(&grad, &mut bytes);
            let (mut a, mut b) = (Optimizer::new(c.clone(), n), Optimizer::new(c, n));
            let (mut pa, mut pb) = (vec![0.5f32; n], vec![0.5f32; n]);
            for _ in 0..3 {
                a.step(&mut pa, &grad);
                b.step_le_bytes(&mut pb, &bytes[1..]);
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&pa), bits(&pb), "{kind:?}");
            assert_eq!(a.state(), b.state());
        }
    }

    #[test]
    fn the_learning_rate_decays_per_epoch() {
        let mut c = cfg(OptimizerKind::Sgd, 0.5);
        c.lr_decay = 0.5;
        let mut o = Optimizer::new(c, 1);
        o.set_epoch(2);
        let mut p = [1.0f32];
        o.step(&mut p, &[1.0]);
        assert_eq!(p, [1.0 - 0.125]);
    }

    #[test]
    fn restored_state_continues_identically() {
        let c = cfg(OptimizerKind::Adam, 0.01);
        let mut a = Optimizer::new(c.clone(), 3);
        let mut pa = [0.1f32, 0.2, 0.3];
        a.step(&mut pa, &[1.0, -1.0, 0.5]);
        let mut b = Optimizer::with_state(c.clone(), 3, a.state().clone()).unwrap();
        let mut pb = pa;
        a.step(&mut pa, &[0.3, 0.3, 0.3]);
        b.step(&mut pb, &[0.3, 0.3, 0.3]);
        assert_eq!(pa, pb);
        assert!(Optimizer::with_state(c, 4, a.state().clone()).is_err());
    }
}
