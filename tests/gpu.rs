//! GPU tests: CUDA compute and the NCCL backend, end to end with the real binaries. They need
//! binaries built with `--features cuda` and at least one NVIDIA GPU, so they run only when
//! the tests are built with `LOCKSTEP_CUDA_TESTS=1` (see `build.rs`); otherwise `cargo test`
//! lists them as ignored. A test binary built without it runs them with `--include-ignored`.

use std::time::Duration;

use lockstep_tests::*;

fn train_on_gpu(preset: &str, epochs: &str) -> (std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join(preset);
    run_ok(
        train_command(&run).args([
            "--preset",
            preset,
            "--epochs",
            epochs,
            "--backend",
            "nccl",
            "--workers",
            "1",
        ]),
        Duration::from_secs(300),
        &format!("GPU training of {preset}"),
    );
    for m in metrics(&run) {
        println!("{preset} {m}");
    }
    println!("{preset} summary {}", summary(&run));
    (run, dir)
}

#[test]
#[cfg_attr(
    not(cuda_tests),
    ignore = "needs an NVIDIA GPU and a cuda build: LOCKSTEP_CUDA_TESTS=1"
)]
fn mlp_trains_on_a_gpu_with_the_nccl_backend() {
    let (run, _dir) = train_on_gpu("mlp", "3");
    let m = metrics(&run);
    let last = m.last().unwrap()["test_accuracy"].as_f64().unwrap();
    assert!(
        last >= 0.97,
        "mlp on GPU: test accuracy {last} after 3 epochs"
    );
}

#[test]
#[cfg_attr(
    not(cuda_tests),
    ignore = "needs an NVIDIA GPU and a cuda build: LOCKSTEP_CUDA_TESTS=1"
)]
fn cnn_reaches_99_percent_on_a_gpu() {
    let (run, _dir) = train_on_gpu("cnn", "3");
    let best = metrics(&run)
        .iter()
        .map(|m| m["test_accuracy"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(best >= 0.99, "cnn on GPU: best test accuracy {best}");
}

#[test]
#[cfg_attr(
    not(cuda_tests),
    ignore = "needs an NVIDIA GPU and a cuda build: LOCKSTEP_CUDA_TESTS=1"
)]
fn the_same_seed_twice_gives_the_same_gpu_model() {
    let run = |name: &str, dir: &std::path::Path| {
        let r = dir.join(name);
        run_ok(
            train_command(&r)
                .args([
                    "--preset",
                    "mlp",
                    "--epochs",
                    "1",
                    "--backend",
                    "nccl",
                    "--workers",
                    "1",
                ])
                .env("LOCKSTEP_TRAIN_SAMPLES", "6400"),
            Duration::from_secs(120),
            name,
        );
        std::fs::read(r.join("model.safetensors")).unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    assert!(
        run("a", dir.path()) == run("b", dir.path()),
        "two GPU runs with one seed differ"
    );
}
