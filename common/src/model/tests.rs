//! Tests across the model's parts: every network's gradient, its explicit passes against
//! candle's autograd, and the CNN's against the derivative of its loss.

use candle_core::{Device, Module, Tensor};

use super::*;
use crate::config::{JobConfig, PRESETS};
use crate::mnist::IMAGE_PIXELS;

#[test]
fn every_preset_computes_a_gradient_of_the_right_size() {
    for p in PRESETS {
        let net = Network::new(&JobConfig::preset(p).unwrap().model);
        let flat = net.init_params(1);
        let replica = Replica::new(net.clone(), &flat, Device::Cpu).unwrap();
        let pixels: Vec<u8> = (0..3 * IMAGE_PIXELS).map(|i| (i % 251) as u8).collect();
        let (x, y) =
            batch_tensors(&pixels, &[1, 7, 3], true, &Device::Cpu, &mut Vec::new()).unwrap();
        let (g, st) = replica.gradient(&x, &y).unwrap();
        assert_eq!(g.to_vec().unwrap().len(), net.num_params(), "{p}");
        assert_eq!(
            g.to_bytes().unwrap(),
            crate::codec::le_bytes(&g.to_vec().unwrap()).into_owned()
        );
        assert_eq!(st.samples, 3);
        assert!(st.loss_sum > 0.0);
    }
}

#[test]
fn summed_gradients_of_two_halves_equal_the_whole() {
    for preset in ["mlp", "cnn"] {
        summed_gradients_of_two_halves_equal_the_whole_for(preset);
    }
}

fn summed_gradients_of_two_halves_equal_the_whole_for(preset: &str) {
    let net = Network::new(&JobConfig::preset(preset).unwrap().model);
    let flat = net.init_params(3);
    let r = Replica::new(net.clone(), &flat, Device::Cpu).unwrap();
    let pixels: Vec<u8> = (0..4 * IMAGE_PIXELS).map(|i| (i * 7 % 256) as u8).collect();
    let labels = [0u8, 5, 9, 2];
    let mut s = Vec::new();
    let (x, y) = batch_tensors(&pixels, &labels, true, &Device::Cpu, &mut s).unwrap();
    let whole = r.gradient(&x, &y).unwrap().0.to_vec().unwrap();
    let (x1, y1) = batch_tensors(
        &pixels[..2 * IMAGE_PIXELS],
        &labels[..2],
        true,
        &Device::Cpu,
        &mut s,
    )
    .unwrap();
    let (x2, y2) = batch_tensors(
        &pixels[2 * IMAGE_PIXELS..],
        &labels[2..],
        true,
        &Device::Cpu,
        &mut s,
    )
    .unwrap();
    let a = r.gradient(&x1, &y1).unwrap().0.to_vec().unwrap();
    let b = r.gradient(&x2, &y2).unwrap().0.to_vec().unwrap();
    for i in 0..whole.len() {
        assert!(
            (whole[i] - (a[i] + b[i])).abs() <= 1e-4 * (1.0 + whole[i].abs()),
            "{preset} index {i}"
        );
    }
}

#[test]
fn explicit_backward_matches_autograd() {
    for spec in [
        "mlp:30,20:relu",
        "mlp:30:sigmoid",
        "mlp:25:tanh",
        "mlp:40:leaky-relu=0.1",
        "linear",
    ] {
        let net = Network::new(&crate::config::ModelConfig::parse_spec(spec).unwrap());
        let flat = net.init_params(11);
        let r = Replica::new(net.clone(), &flat, Device::Cpu).unwrap();
        let pixels: Vec<u8> = (0..5 * IMAGE_PIXELS)
            .map(|i| (i * 13 % 256) as u8)
            .collect();
        let (x, y) = batch_tensors(
            &pixels,
            &[3, 1, 4, 1, 5],
            true,
            &Device::Cpu,
            &mut Vec::new(),
        )
        .unwrap();
        // On the CPU, the explicit pass of every activation but gelu: over gemm directly,
        // and as tensor operations (what other devices run).
        let Model::Mlp(mlp) = r.model() else {
            panic!("{spec} is fully connected")
        };
        assert!(
            super::mlp::cpu::gradient(mlp, &x, &y).unwrap().is_some(),
            "{spec}: the direct pass takes CPU tensors"
        );
        let (b, sb) = r.autograd_gradient(&x, &y).unwrap();
        let sb = BatchStats::from_tensor(&sb, 5).unwrap();
        let b = b.to_vec().unwrap();
        for (path, (a, sa)) in [
            ("direct", r.gradient_lazy(&x, &y).unwrap()),
            ("tensors", mlp.gradient_tensors(&x, &y).unwrap()),
        ] {
            let what = format!("{spec}, {path}");
            let sa = BatchStats::from_tensor(&sa, 5).unwrap();
            assert_elementwise_close(&a.to_vec().unwrap(), &b, 1e-4, &what);
            assert!(
                (sa.loss_sum - sb.loss_sum).abs() < 1e-4 * sb.loss_sum,
                "{what}"
            );
            assert_eq!(sa.correct, sb.correct, "{what}");
        }
    }
}

/// Asserts `a` equals `b` element by element up to `tolerance`, relative to each value.
fn assert_elementwise_close(a: &[f32], b: &[f32], tolerance: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for i in 0..a.len() {
        assert!(
            (a[i] - b[i]).abs() <= tolerance * (1.0 + b[i].abs()),
            "{what} index {i}: {} vs {}",
            a[i],
            b[i]
        );
    }
}

/// A batch of `n` deterministic, image-like samples of the `cnn` preset's network.
fn cnn_batch(n: usize) -> (Network, Vec<f32>, Tensor, Tensor) {
    let net = Network::new(&JobConfig::preset("cnn").unwrap().model);
    let flat = net.init_params(11);
    let pixels: Vec<u8> = (0..n * IMAGE_PIXELS)
        .map(|i| if i % 5 < 2 { 0 } else { (i * 13 % 256) as u8 })
        .collect();
    let labels: Vec<u8> = (0..n).map(|i| (i * 7 % 10) as u8).collect();
    let (x, y) = batch_tensors(&pixels, &labels, true, &Device::Cpu, &mut Vec::new()).unwrap();
    (net, flat, x, y)
}

/// Asserts `a` equals `b` up to float rounding, relative to each tensor's largest value.
fn assert_close_per_tensor(net: &Network, a: &[f32], b: &[f32], tolerance: f32) {
    assert_eq!(a.len(), b.len());
    for spec in net.layout() {
        let (a, b) = (&a[spec.range()], &b[spec.range()]);
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{}: zero gradient", spec.name);
        for i in 0..a.len() {
            assert!(
                (a[i] - b[i]).abs() <= tolerance * scale,
                "{} index {i}: {} vs {} (largest {scale})",
                spec.name,
                a[i],
                b[i]
            );
        }
    }
}

#[test]
fn explicit_cnn_backward_matches_autograd() {
    // 70 samples: one chunk of 64 and one of 6.
    let (net, flat, x, y) = cnn_batch(70);
    let r = Replica::new(net.clone(), &flat, Device::Cpu).unwrap();
    // On the CPU, the explicit pass.
    let (a, sa) = r.gradient_lazy(&x, &y).unwrap();
    let (b, sb) = r.autograd_gradient(&x, &y).unwrap();
    let (sa, sb) = (
        BatchStats::from_tensor(&sa, 70).unwrap(),
        BatchStats::from_tensor(&sb, 70).unwrap(),
    );
    assert_close_per_tensor(&net, &a.to_vec().unwrap(), &b.to_vec().unwrap(), 1e-5);
    assert!((sa.loss_sum - sb.loss_sum).abs() < 1e-5 * sb.loss_sum);
    assert_eq!(sa.correct, sb.correct);
}

#[test]
fn explicit_cnn_forward_matches_the_network() {
    let (net, flat, x, _) = cnn_batch(70);
    let model = net.model_from_flat(&flat, &Device::Cpu).unwrap();
    // On the CPU, `logits` is the explicit pass.
    let a = model.logits(&x).unwrap().flatten_all().unwrap();
    let b = model.forward(&x).unwrap().flatten_all().unwrap();
    let (a, b) = (a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
    assert_eq!(a.len(), 70 * CLASSES);
    assert_elementwise_close(&a, &b, 1e-5, "cnn logits");
}

/// The gradient is the loss's derivative (a finite difference along the convolutions'
/// gradient), not merely autograd's: candle's own `max_pool2d` backward is a quarter of it.
#[test]
fn the_cnn_gradient_is_the_derivative_of_the_loss() {
    let (net, flat, x, y) = cnn_batch(4);
    let loss = |flat: &[f32]| {
        let model = net.model_from_flat(flat, &Device::Cpu).unwrap();
        let logits = model.forward(&x).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &y).unwrap();
        4.0 * loss.to_scalar::<f32>().unwrap() as f64
    };
    let r = Replica::new(net.clone(), &flat, Device::Cpu).unwrap();
    for gradient in [
        r.gradient_lazy(&x, &y).unwrap().0,
        r.autograd_gradient(&x, &y).unwrap().0,
    ] {
        let g = gradient.to_vec().unwrap();
        // Along the conv layers' gradient only (conv1 and conv2, weights and biases).
        let convs = 0..net.layout()[4].offset;
        let norm = g[convs.clone()]
            .iter()
            .map(|v| (*v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let eps = 1e-2;
        let moved = |sign: f64| {
            let mut f = flat.clone();
            for i in convs.clone() {
                f[i] += (sign * eps * g[i] as f64 / norm) as f32;
            }
            loss(&f)
        };
        let slope = (moved(1.0) - moved(-1.0)) / (2.0 * eps);
        assert!(
            (slope - norm).abs() < 0.05 * norm,
            "finite difference {slope}, gradient norm {norm}"
        );
    }
}
