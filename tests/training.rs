//! Training end to end with the real binaries on loopback and the real MNIST files: accuracy,
//! the run directory and bit-for-bit reproducibility. (Agreement between worker counts and
//! backends, bit for bit, is in `elastic.rs`.)

use std::time::Duration;

use lockstep_common::config::JobConfig;
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
        "membership_changes",
        "samples_covered",
        "samples_applied",
        "bytes_per_step",
    ] {
        assert!(m[0].get(key).is_some(), "metrics.jsonl lacks {key}");
    }
    assert_eq!(m[0]["workers"], 2);
    assert_eq!(m[0]["membership_changes"], 0);
    assert_eq!(m[0]["samples_covered"], 60_000);
    assert_eq!(m[0]["samples_applied"], 60_000);

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
    let run = dir.join(name);
    run_ok(
        train_command(&run)
            .args(["--preset", "mlp", "--epochs", "1", "--batch-size", "64"])
            .args(["--workers", workers, "--seed", seed])
            .env("LOCKSTEP_TRAIN_SAMPLES", "640"),
        Duration::from_secs(120),
        &format!("run {name}"),
    );
    run
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
