//! Training end to end with the real binaries on loopback and the real MNIST files: accuracy,
//! the run directory, bit-for-bit reproducibility, and agreement between worker counts.

use std::time::Duration;

use lockstep_common::config::JobConfig;
use lockstep_common::model::Network;
use lockstep_tests::*;

#[test]
fn two_workers_train_one_epoch_of_mlp_to_95_percent_and_write_the_run_directory() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let err = run_ok(
        train_command(&run).args(["--preset", "mlp", "--epochs", "1", "--workers", "2"]),
        Duration::from_secs(180),
        "training",
    );
    assert!(
        err.contains("# effective configuration"),
        "the effective config is printed at start"
    );

    let m = metrics(&run);
    assert_eq!(m.len(), 1);
    let acc = m[0]["test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.95, "test accuracy {acc} after one epoch of mlp");
    for key in [
        "epoch",
        "train_loss",
        "test_loss",
        "epoch_seconds",
        "samples_per_second",
        "workers",
        "bytes_per_step",
    ] {
        assert!(m[0].get(key).is_some(), "metrics.jsonl lacks {key}");
    }
    assert_eq!(m[0]["workers"], 2);

    let s = summary(&run);
    assert_eq!(s["test_accuracy"].as_f64().unwrap(), acc);
    let cfg = JobConfig::from_toml_str(&std::fs::read_to_string(run.join("config.toml")).unwrap())
        .unwrap();
    assert_eq!(cfg.preset, "mlp");

    let model = tensors(&run.join("model.safetensors"));
    let names: Vec<&str> = model.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "fc1.bias",
            "fc1.weight",
            "fc2.bias",
            "fc2.weight",
            "fc3.bias",
            "fc3.weight"
        ]
    );
    assert_eq!(model[1].1, vec![100, 784], "PyTorch's [out, in] layout");
    assert!(run.join("checkpoints/epoch-0001.safetensors").exists());
    assert!(run.join("logs/worker-0.log").exists());
}

fn short_run(dir: &std::path::Path, name: &str, workers: &str, seed: &str) -> std::path::PathBuf {
    short_run_with(dir, name, &["--workers", workers, "--seed", seed])
}

/// One epoch of 640 samples (10 steps of 64) of mlp, with `args` added.
fn short_run_with(dir: &std::path::Path, name: &str, args: &[&str]) -> std::path::PathBuf {
    let run = dir.join(name);
    run_ok(
        train_command(&run)
            .args(["--preset", "mlp", "--epochs", "1", "--batch-size", "64"])
            .args(args)
            .env("LOCKSTEP_TRAIN_SAMPLES", "640"),
        Duration::from_secs(120),
        &format!("run {name}"),
    );
    run
}

/// The largest difference between two models' parameters, and how far `a` moved from the
/// initial parameters of `seed`.
fn max_diff_and_moved(a: &std::path::Path, b: &std::path::Path, seed: u64) -> (f32, f32) {
    let a = tensors(&a.join("model.safetensors"));
    let b = tensors(&b.join("model.safetensors"));
    let net = Network::new(&JobConfig::preset("mlp").unwrap().model);
    let init = net.init_params(seed);
    let mut max_diff = 0.0f32;
    let mut max_moved = 0.0f32;
    for ((name, _, a), (_, _, b)) in a.iter().zip(&b) {
        let spec = net.layout().iter().find(|s| &s.name == name).unwrap();
        for ((x, y), x0) in a.iter().zip(b).zip(&init[spec.range()]) {
            max_diff = max_diff.max((x - y).abs());
            max_moved = max_moved.max((x - x0).abs());
        }
    }
    (max_diff, max_moved)
}

#[test]
fn the_same_seed_twice_gives_a_bit_identical_model() {
    let dir = tempfile::tempdir().unwrap();
    let a = short_run(dir.path(), "a", "2", "7");
    let b = short_run(dir.path(), "b", "2", "7");
    let c = short_run(dir.path(), "c", "2", "8");
    let bytes = |r: &std::path::Path| std::fs::read(r.join("model.safetensors")).unwrap();
    assert!(
        bytes(&a) == bytes(&b),
        "same seed, different model.safetensors"
    );
    assert!(
        bytes(&a) != bytes(&c),
        "a different seed must give a different model"
    );
    assert_eq!(summary(&a)["params_sha256"], summary(&b)["params_sha256"]);
}

#[test]
fn one_and_two_workers_with_the_same_global_batch_agree_within_1e_5_after_ten_steps() {
    let dir = tempfile::tempdir().unwrap();
    let one = short_run(dir.path(), "one", "1", "3");
    let two = short_run(dir.path(), "two", "2", "3");
    let (max_diff, max_moved) = max_diff_and_moved(&one, &two, 3);
    // Only the order of floating-point additions differs between the two (each worker sums
    // its share, the coordinator adds the shares), so the parameters agree to rounding.
    assert!(
        max_diff <= 1e-5,
        "1 and 2 workers differ by up to {max_diff}"
    );
    assert!(
        max_moved > 1e-3,
        "training must have moved the parameters (moved {max_moved})"
    );
}

/// The collective path (what NCCL workers run) with several ranks, on CPU: rank 0's
/// rendezvous relayed to two other ranks, the all-reduce among the workers, the device-side
/// optimizer, the cross-rank digest check and rank 0's state upload at the epoch end.
#[test]
fn three_tcp_workers_train_one_epoch_of_mlp_to_95_percent() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    run_ok(
        train_command(&run).args([
            "--preset",
            "mlp",
            "--epochs",
            "1",
            "--workers",
            "3",
            "--backend",
            "tcp",
        ]),
        Duration::from_secs(180),
        "training",
    );
    let m = metrics(&run);
    let acc = m[0]["test_accuracy"].as_f64().unwrap();
    assert!(acc >= 0.95, "test accuracy {acc} after one epoch of mlp");
    assert_eq!(m[0]["workers"], 3);
    let s = summary(&run);
    assert_eq!(s["backend"], "tcp");
    for i in 0..3 {
        let log = std::fs::read_to_string(run.join(format!("logs/worker-{i}.log"))).unwrap();
        assert!(log.contains("tcp collective ready"), "worker {i}:\n{log}");
        assert!(
            log.contains("training finished after 938 steps"),
            "worker {i}:\n{log}"
        );
    }
    // The model the coordinator wrote is rank 0's upload: it must be a trained model whose
    // evaluation is what metrics.jsonl says (the coordinator evaluated that very state).
    assert_eq!(s["test_accuracy"].as_f64().unwrap(), acc);
}

#[test]
fn the_tcp_backend_is_reproducible_and_with_sgd_bit_identical_to_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let tcp = ["--workers", "2", "--seed", "5", "--backend", "tcp"];
    let a = short_run_with(dir.path(), "a", &tcp);
    let b = short_run_with(dir.path(), "b", &tcp);
    let bytes = |r: &std::path::Path| std::fs::read(r.join("model.safetensors")).unwrap();
    assert!(bytes(&a) == bytes(&b), "same seed, different tcp models");

    // Both backends sum the ranks' gradients in rank order and divide by the global batch;
    // with plain SGD the update is the same arithmetic too, so the models are equal bit for
    // bit. (Adam's tensor kernels and the coordinator's fused loop round differently, and
    // Adam magnifies rounding in near-zero gradients, so Adam runs drift apart by ~lr.)
    let sgd = |name: &str, backend: &str| {
        let run = dir.path().join(name);
        run_ok(
            train_command(&run)
                .args([
                    "--preset",
                    "mlp",
                    "--epochs",
                    "1",
                    "--workers",
                    "2",
                    "--seed",
                    "5",
                ])
                .args(["--backend", backend])
                .env("LOCKSTEP_TRAIN_SAMPLES", "640")
                .env("LOCKSTEP_OPTIMIZER__KIND", "sgd")
                .env("LOCKSTEP_OPTIMIZER__LR", "0.1"),
            Duration::from_secs(120),
            name,
        );
        run
    };
    let (t, g) = (sgd("sgd-tcp", "tcp"), sgd("sgd-grpc", "grpc"));
    let (max_diff, max_moved) = max_diff_and_moved(&t, &g, 5);
    assert_eq!(max_diff, 0.0, "tcp and grpc differ by up to {max_diff}");
    assert!(
        max_moved > 1e-3,
        "training must have moved the parameters (moved {max_moved})"
    );
    assert!(
        bytes(&t) == bytes(&g),
        "tcp and grpc wrote different model files"
    );
}
