//! What goes wrong, and what the user sees: when a dead or frozen worker leaves fewer than
//! `cluster.min_workers`, the job ends within seconds with an error naming it (above that, the
//! job carries on: see `elastic.rs`); bad input is refused with a clear error and no panic.

use std::process::Stdio;
use std::time::{Duration, Instant};

use lockstep_tests::*;

fn start_training_then(
    signal_no: i32,
    extra_env: &[(&str, &str)],
    limit: Duration,
) -> (std::process::Output, Duration) {
    let (out, took, _, _) = signal_rank_during_training(1, signal_no, extra_env, &[], limit);
    (out, took)
}

/// Starts a 2-worker mlp job with `extra_args`, sends `signal_no` to the worker of rank
/// `rank` once training runs, and waits for the job to end. Returns its output, the time from
/// the signal to the end, the run directory and the other worker's log file.
fn signal_rank_during_training(
    rank: u32,
    signal_no: i32,
    extra_env: &[(&str, &str)],
    extra_args: &[&str],
    limit: Duration,
) -> (
    std::process::Output,
    Duration,
    tempfile::TempDir,
    std::path::PathBuf,
) {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut cmd = train_command(&run);
    cmd.args(["--preset", "mlp", "--epochs", "20", "--workers", "2"])
        .args(extra_args);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let logs: Vec<_> = (0..2)
        .map(|i| run.join(format!("logs/worker-{i}.log")))
        .collect();
    let texts: Vec<String> = logs
        .iter()
        .map(|l| wait_for_text(l, "joined as rank", Duration::from_secs(60)))
        .collect();
    let target = texts
        .iter()
        .position(|t| t.contains(&format!("joined as rank {rank} ")))
        .expect("a worker has the rank");
    let pid = worker_pid_from_log(&texts[target]);
    std::thread::sleep(Duration::from_millis(1500));
    signal(pid, signal_no);
    let signalled = Instant::now();
    let out = wait_with_limit(child, limit);
    let other = logs[1 - target].clone();
    (out, signalled.elapsed(), dir, other)
}

/// Every worker is needed: losing one ends the job.
const MIN_2: (&str, &str) = ("LOCKSTEP_CLUSTER__MIN_WORKERS", "2");

#[test]
fn below_min_workers_killing_a_worker_ends_the_job_within_seconds_naming_the_worker() {
    let (out, took) = start_training_then(libc::SIGKILL, &[MIN_2], Duration::from_secs(30));
    let err = assert_clean_failure(
        &out,
        &[
            "worker rank",
            "during epoch",
            "cluster.min_workers is 2",
            "training stopped",
            "--resume",
        ],
    );
    assert!(
        took < Duration::from_secs(10),
        "took {took:?} to notice the dead worker:\n{err}"
    );
}

#[test]
fn below_min_workers_a_frozen_worker_ends_the_job_after_the_heartbeat_timeout() {
    let (out, took) = start_training_then(
        libc::SIGSTOP,
        &[("LOCKSTEP_CLUSTER__HEARTBEAT_TIMEOUT_MS", "1500"), MIN_2],
        Duration::from_secs(30),
    );
    let err = assert_clean_failure(
        &out,
        &["sent nothing for", "heartbeat timeout", "worker rank"],
    );
    assert!(
        took < Duration::from_secs(10),
        "took {took:?} to notice the frozen worker:\n{err}"
    );
}

/// With the workers all-reducing among themselves (the NCCL layout, here over TCP), rank 0
/// sits in the all-reduce waiting for rank 1. When rank 1 dies, or freezes so that only the
/// coordinator's heartbeat timeout can tell, and the job needs both, it must still end within
/// seconds, and rank 0 must exit by itself (its log ends with its own error) rather than wait
/// for the kill.
#[test]
fn below_min_workers_a_dead_or_frozen_tcp_worker_ends_the_job_and_the_rank_waiting_exits() {
    let cases = [
        (libc::SIGKILL, "worker rank"),
        (libc::SIGSTOP, "heartbeat timeout"),
    ];
    for (sig, needle) in cases {
        let (out, took, _dir, survivor) = signal_rank_during_training(
            1,
            sig,
            &[("LOCKSTEP_CLUSTER__HEARTBEAT_TIMEOUT_MS", "1500"), MIN_2],
            &["--backend", "tcp"],
            Duration::from_secs(30),
        );
        let err = assert_clean_failure(&out, &[needle, "training stopped"]);
        assert!(
            took < Duration::from_secs(10),
            "signal {sig}: took {took:?} to end the job:\n{err}"
        );
        let log = std::fs::read_to_string(&survivor).unwrap();
        assert!(
            log.contains("joined as rank 0") && log.contains("error: "),
            "signal {sig}: rank 0 did not exit by itself:\n{log}"
        );
        assert!(!log.contains("panicked"), "{log}");
    }
}

/// A worker that is alive (its heartbeats come) but makes no progress must not hold the job
/// forever: here a CNN step over a large batch takes far longer than a 1 s step timeout.
#[test]
fn a_step_that_outlasts_the_step_timeout_ends_the_job_naming_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = run_with_limit(
        train_command(&dir.path().join("run"))
            .args(["--preset", "cnn", "--batch-size", "8192", "--workers", "1"])
            .env("LOCKSTEP_CLUSTER__STEP_TIMEOUT_S", "1"),
        Duration::from_secs(60),
    );
    let err = assert_clean_failure(
        &out,
        &[
            "worker rank 0",
            "stalled: no report for 1s (cluster.step_timeout_s)",
            "epoch 1 step 1/",
        ],
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}:\n{err}",
        started.elapsed()
    );
}

/// A diverging job (SGD with an absurd learning rate) must stop at the first non-finite
/// gradient, whichever side sums it, and the coordinator's error must say why.
#[test]
fn a_diverging_job_stops_at_the_first_non_finite_gradient_saying_so() {
    for backend in ["grpc", "tcp"] {
        let dir = tempfile::tempdir().unwrap();
        let out = run_with_limit(
            train_command(&dir.path().join("run"))
                .args(["--preset", "mlp", "--workers", "2", "--lr", "1e30"])
                .args(["--backend", backend])
                .env("LOCKSTEP_OPTIMIZER__KIND", "sgd"),
            Duration::from_secs(60),
        );
        let err = assert_clean_failure(&out, &["non-finite value", "training stopped"]);
        // With grpc the coordinator is at the failing step; with tcp a rank may be a step
        // ahead of the coordinator, and the workers' reasons name their step.
        let step = match backend {
            "grpc" => "during epoch 1 step 2/",
            _ => "the gradient of epoch 1 step 2:",
        };
        assert!(
            err.contains(step),
            "{backend}: the second step's gradient is the first non-finite one:\n{err}"
        );
    }
}

#[test]
fn a_truncated_or_corrupt_dataset_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    for f in std::fs::read_dir(data_dir()).unwrap() {
        let f = f.unwrap().path();
        if f.extension().is_some_and(|e| e == "gz") {
            std::fs::copy(&f, data.join(f.file_name().unwrap())).unwrap();
        }
    }
    let images = data.join("train-images-idx3-ubyte.gz");
    let bytes = std::fs::read(&images).unwrap();
    std::fs::write(&images, &bytes[..bytes.len() / 2]).unwrap();
    let run = dir.path().join("run");
    let out = run_with_limit(
        train_command(&run).arg("--data-dir").arg(&data),
        Duration::from_secs(60),
    );
    assert_clean_failure(
        &out,
        &["train-images-idx3-ubyte.gz", "corrupt or truncated"],
    );

    // Structurally valid but altered content: caught by the checksum.
    let labels = data.join("t10k-labels-idx1-ubyte");
    let mut raw = lockstep_common::mnist::maybe_gunzip(
        std::fs::read(data.join("t10k-labels-idx1-ubyte.gz")).unwrap(),
        lockstep_common::mnist::FILES[3].idx_len(),
    )
    .unwrap();
    raw[100] = (raw[100] + 1) % 10;
    std::fs::remove_file(data.join("t10k-labels-idx1-ubyte.gz")).unwrap();
    std::fs::write(&labels, raw).unwrap();
    std::fs::write(&images, &bytes).unwrap();
    let out = run_with_limit(
        train_command(&dir.path().join("run2"))
            .arg("--data-dir")
            .arg(&data),
        Duration::from_secs(60),
    );
    assert_clean_failure(
        &out,
        &["t10k-labels-idx1-ubyte", "differ from the published MNIST"],
    );

    let out = run_with_limit(
        train_command(&dir.path().join("run3"))
            .arg("--data-dir")
            .arg(dir.path().join("nowhere")),
        Duration::from_secs(60),
    );
    assert_clean_failure(&out, &["not found", "--data-dir"]);
}

#[test]
fn bad_settings_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_with_limit(
        train_command(&dir.path().join("a")).args(["--preset", "resnet"]),
        Duration::from_secs(30),
    );
    assert_clean_failure(&out, &["unknown preset `resnet`", "mlp-leaky"]);

    let out = run_with_limit(
        train_command(&dir.path().join("b")).args(["--batch-size", "2", "--workers", "3"]),
        Duration::from_secs(30),
    );
    assert_clean_failure(&out, &["batch size 2 is smaller than the worker count 3"]);

    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let out = run_with_limit(
        train_command(&dir.path().join("c"))
            .args([
                "--external-workers",
                "--listen",
                &format!("127.0.0.1:{port}"),
            ])
            .env("LOCKSTEP_TOKEN", "t0ken"),
        Duration::from_secs(30),
    );
    assert_clean_failure(&out, &["cannot listen on", "already in use"]);

    let out = run_with_limit(
        train_command(&dir.path().join("d")).args(["--external-workers"]),
        Duration::from_secs(30),
    );
    assert_clean_failure(&out, &["LOCKSTEP_TOKEN"]);

    // A CPU build refuses NCCL up front (GPU builds are exercised by LOCKSTEP_CUDA_TESTS=1).
    if std::env::var_os("LOCKSTEP_CUDA_TESTS").is_none() {
        let out = run_with_limit(
            train_command(&dir.path().join("e")).args(["--backend", "nccl"]),
            Duration::from_secs(30),
        );
        assert_clean_failure(&out, &["without the `cuda` feature"]);
    }
}

#[test]
fn workers_of_another_version_model_or_token_are_refused_and_a_good_one_trains() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let coordinator = train_command(&run)
        .args([
            "--external-workers",
            "--workers",
            "1",
            "--epochs",
            "1",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env("LOCKSTEP_TOKEN", "right-token")
        .env("LOCKSTEP_TRAIN_SAMPLES", "640")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let worker = |args: &[&str], token: &str| {
        let mut cmd = std::process::Command::new(worker());
        cmd.args(["--coordinator", &url, "--connect-timeout", "20"])
            .args(args)
            .env("LOCKSTEP_TOKEN", token);
        run_with_limit(&mut cmd, Duration::from_secs(60))
    };
    let out = worker(&["--protocol-version", "99"], "right-token");
    let ours = format!("version {}", lockstep_common::PROTOCOL_VERSION);
    assert_clean_failure(&out, &["protocol version mismatch", "version 99", &ours]);
    let out = worker(&["--preset", "cnn"], "right-token");
    assert_clean_failure(&out, &["model configuration mismatch", "cnn"]);
    let out = worker(&[], "wrong-token");
    assert_clean_failure(&out, &["wrong job token"]);

    let out = worker(&["--threads", "1"], "right-token");
    assert!(
        out.status.success(),
        "the good worker failed:\n{}",
        stderr_of(&out)
    );
    let out = wait_with_limit(coordinator, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "coordinator failed:\n{}",
        stderr_of(&out)
    );
    assert_eq!(metrics(&run).len(), 1);
}

/// The probe that found it: `--model mlp:100000000` (79.5 billion parameters) aborted with
/// `memory allocation of 318000000040 bytes failed` and a core dump. Sizes are checked when the
/// configuration is, in both binaries, before anything is allocated.
#[test]
fn a_model_too_large_for_the_job_is_refused_before_anything_is_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let huge = ["--model", "mlp:100000000"];
    let needles = [
        "`mlp 784-100000000-10 relu` has 79500000010 parameters",
        "954000000120 bytes (888.5 GiB), more than the 1073610752 bytes",
        "a state transfer carries",
    ];
    let out = run_with_limit(
        train_command(&dir.path().join("a")).args(huge),
        Duration::from_secs(30),
    );
    let err = assert_clean_failure(&out, &needles);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("memory allocation"), "{err}");
    let out = run_with_limit(
        std::process::Command::new(worker())
            .args(["--coordinator", "http://127.0.0.1:9"])
            .args(huge)
            .env("LOCKSTEP_TOKEN", "t"),
        Duration::from_secs(30),
    );
    assert_clean_failure(&out, &needles);

    let out = run_with_limit(
        train_command(&dir.path().join("b")).args(["--model", "mlp:30000", "--backend", "grpc"]),
        Duration::from_secs(30),
    );
    assert_clean_failure(
        &out,
        &[
            "has 23850010 parameters: its gradient is 95400040 bytes",
            "a gRPC message carries; use --backend tcp",
        ],
    );

    let check = |env: (&str, &str), needle: &str| {
        let out = run_with_limit(
            std::process::Command::new(lockstep())
                .arg("check-config")
                .env(env.0, env.1),
            Duration::from_secs(30),
        );
        assert_clean_failure(&out, &[needle]);
    };
    check(
        ("LOCKSTEP_EPOCHS", "1000000"),
        "epochs is 1000000; at most 100000 is supported",
    );
    check(
        ("LOCKSTEP_CLUSTER__STEP_TIMEOUT_S", "1000000"),
        "cluster.step_timeout_s is 1000000; at most 86400 is supported",
    );
    check(
        ("LOCKSTEP_MODEL__HIDDEN", &["8"; 65].join(",")),
        "the number of hidden layers (model.hidden) is 65; at most 64",
    );
    check(
        ("LOCKSTEP_CLUSTER__MAX_WORKERS", "5000"),
        "cluster.max_workers is 5000; at most 1024",
    );
}

fn memory_available() -> u64 {
    lockstep_common::memory::available().map_or(u64::MAX, |a| a.bytes)
}

/// 15.9 million parameters (a 64 MB gradient) in 1024 shards with grpc: the coordinator would
/// hold three steps' 1024 shard gradients, about 195 GB, and is refused before it loads MNIST.
#[test]
fn a_coordinator_that_cannot_fit_in_memory_is_refused_naming_parameters_and_bytes() {
    if memory_available() > 200 << 30 {
        eprintln!("skipped: this machine has more than 200 GiB available");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = run_with_limit(
        train_command(&dir.path().join("run"))
            .args([
                "--model",
                "mlp:20000",
                "--batch-size",
                "1024",
                "--workers",
                "1",
                // grpc: the coordinator holds the shard gradients.
                "--backend",
                "grpc",
            ])
            .env("LOCKSTEP_CLUSTER__SHARDS", "1024"),
        Duration::from_secs(30),
    );
    let err = assert_clean_failure(
        &out,
        &[
            "the coordinator does not fit in memory: `mlp 784-20000-10 relu` has 15900010 parameters",
            "shard gradients of the steps in flight 195379322880 bytes",
            "are available (",
            "fewer cluster.shards",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("loaded MNIST"), "checked too late:\n{err}");
}

/// With tcp every worker may become rank 0, which sums every shard's gradient: 1024 shards of a
/// 318 MB gradient do not fit a worker, which says so and leaves; the coordinator names it.
#[test]
fn a_worker_that_cannot_fit_in_memory_leaves_saying_why() {
    if memory_available() > 340 << 30 {
        eprintln!("skipped: this machine has more than 340 GiB available");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = run_with_limit(
        train_command(&dir.path().join("run"))
            .args([
                "--model",
                "mlp:100000",
                "--batch-size",
                "1024",
                "--workers",
                "1",
            ])
            .args(["--backend", "tcp"])
            .env("LOCKSTEP_CLUSTER__SHARDS", "1024"),
        Duration::from_secs(120),
    );
    assert_clean_failure(
        &out,
        &[
            "disconnected before training started",
            "the worker does not fit in memory: `mlp 784-100000-10 relu` has 79500010 parameters",
            "the shard gradients rank 0 sums 325632040960 bytes",
        ],
    );
}

/// A worker stops on SIGTERM wherever it is. Here it waits to rejoin a coordinator that was
/// killed; before, the handler of its first session had taken SIGTERM from the process and
/// nothing listened for it any more, so the worker sat out its whole rejoin timeout.
#[test]
fn sigterm_stops_a_worker_waiting_to_rejoin_its_lost_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut job = Running::start(
        train_command(&dir.path().join("run"))
            .args(["--external-workers", "--workers", "1", "--epochs", "50"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("LOCKSTEP_TOKEN", "sigterm-token"),
    );
    job.wait_for("waiting for", Duration::from_secs(60));
    let mut worker = Running::start(
        std::process::Command::new(worker())
            .args(["--coordinator", &url, "--threads", "1"])
            .args(["--rejoin-timeout", "300"])
            .env("LOCKSTEP_TOKEN", "sigterm-token")
            .env("RUST_LOG", "info"),
    );
    worker.wait_for("joined as rank 0", Duration::from_secs(60));
    job.wait_for("epoch 1/50 step", Duration::from_secs(60));
    signal(job.child.id(), libc::SIGKILL);
    let _ = job.finish(Duration::from_secs(10));
    // Hold the coordinator's port with a listener that never answers, so that no other test's
    // process takes it meanwhile: the worker's join attempts wait on it, or are refused.
    let deadline = Instant::now() + Duration::from_secs(5);
    let silent = loop {
        match std::net::TcpListener::bind(("127.0.0.1", port)) {
            Ok(l) => break l,
            Err(e) => {
                assert!(Instant::now() < deadline, "rebinding port {port}: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let held = std::thread::spawn(move || silent.incoming().take(8).collect::<Vec<_>>());
    worker.wait_for("trying to rejoin", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    let sent = Instant::now();
    signal(worker.child.id(), libc::SIGTERM);
    let (status, log) = worker.finish(Duration::from_secs(20));
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "the worker took {:?} to stop:\n{log}",
        sent.elapsed()
    );
    assert!(!status.success(), "{log}");
    assert_eq!(
        status.code(),
        Some(1),
        "an error exit, not death by signal:\n{log}"
    );
    assert!(
        log.contains("stopped by SIGTERM while rejoining after losing the coordinator"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    drop(held);
}
