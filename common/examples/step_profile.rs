//! Times the pieces of one worker step for the `mlp` preset (forward+backward, gradient
//! flattening, optimizer, parameter upload, codec), single-threaded.
use std::time::Instant;

use candle_core::Device;
use lockstep_common::codec;
use lockstep_common::config::JobConfig;
use lockstep_common::model::{batch_tensors, Network, Replica};
use lockstep_common::optim::Optimizer;

fn main() -> anyhow::Result<()> {
    lockstep_common::tune_allocator();
    let preset = std::env::args().nth(1).unwrap_or_else(|| "mlp".into());
    let n: usize = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(32);
    let cfg = JobConfig::preset(&preset)?;
    let net = Network::new(&cfg.model);
    let mut params = net.init_params(1);
    let mut replica = Replica::new(net.clone(), &params, Device::Cpu)?;
    let mut opt = Optimizer::new(cfg.optimizer.clone(), params.len());
    let pixels: Vec<u8> = (0..n * 784).map(|i| (i * 31 % 256) as u8).collect();
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    let mut scratch = Vec::new();
    let iters = 300;
    let mut t = [0f64; 6];
    for _ in 0..iters {
        let a = Instant::now();
        let (x, y) = batch_tensors(&pixels, &labels, true, &Device::Cpu, &mut scratch)?;
        let (g, _) = replica.gradient(&x, &y)?;
        let b = Instant::now();
        let gv = g.to_vec1::<f32>()?;
        let c = Instant::now();
        let bytes = codec::encode_f32(&gv);
        let mut avg = vec![0f32; gv.len()];
        codec::decode_f32_into(&bytes, &mut avg)?;
        let d = Instant::now();
        opt.step(&mut params, &avg);
        let e = Instant::now();
        replica.set_params(&params)?;
        let f = Instant::now();
        t[0] += (b - a).as_secs_f64();
        t[1] += (c - b).as_secs_f64();
        t[2] += (d - c).as_secs_f64();
        t[3] += (e - d).as_secs_f64();
        t[4] += (f - e).as_secs_f64();
    }
    let names = ["fwd+bwd+cat", "to_vec1", "encode+decode", "optimizer", "set_params"];
    for (i, name) in names.iter().enumerate() {
        println!("{name:>14}: {:8.1} us", t[i] / iters as f64 * 1e6);
    }
    Ok(())
}
