//! Faults cost nothing: workers killed, frozen or replaced, and a coordinator killed and
//! resumed, end with the model a run without faults computes, bit for bit, and every epoch
//! applies each training sample exactly once. Real binaries, real MNIST, real signals.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lockstep_tests::*;

/// Two epochs of the default `mlp` with two local workers and `args`, without faults: the
/// reference model's SHA-256.
fn fault_free(dir: &Path, name: &str, args: &[&str]) -> String {
    let run = dir.join(name);
    run_ok(
        train_command(&run)
            .args(["--epochs", "2", "--workers", "2"])
            .args(args),
        Duration::from_secs(180),
        name,
    );
    sha256_file(&run.join("model.safetensors"))
}

/// Every epoch of `run` applied each of the 60,000 training samples exactly once.
fn assert_every_sample_once(run: &Path, log: &str) {
    let m = metrics(run);
    assert_eq!(m.len(), 2, "{log}");
    for epoch in &m {
        assert_eq!(
            epoch["samples_covered"], 60_000,
            "epoch {}: {log}",
            epoch["epoch"]
        );
        assert_eq!(
            epoch["samples_applied"], 60_000,
            "epoch {}: {log}",
            epoch["epoch"]
        );
    }
}

/// `kill -9` of a local worker three times at steps picked from a seed, with `--max-restarts`
/// so that each time the count goes down and back up: the job finishes with the fault-free
/// model, and no sample is lost or counted twice.
fn chaos(backend: &str, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let expected = fault_free(dir.path(), "reference", &["--backend", backend]);
    let run = dir.path().join("chaos");
    let mut job = Running::start(
        train_command(&run)
            .args(["--epochs", "2", "--workers", "2", "--max-restarts", "3"])
            .args(["--backend", backend]),
    );
    // The plain log reports the first nine tenths of each epoch; kill after three of these 18
    // reports, picked from the seed, two tenths apart at least (so each replacement has joined
    // before the next report), the last before the final epoch's end.
    let mut rng = Lcg(seed);
    let mut points: Vec<u64> = Vec::new();
    while points.len() < 3 {
        let p = rng.below(16);
        if points.iter().all(|q| q.abs_diff(p) >= 2) {
            points.push(p);
        }
    }
    points.sort();
    let steps = 938u64;
    let mut kills = Vec::new();
    for (i, p) in points.iter().enumerate() {
        let (epoch, tenth) = (1 + p / 9, 1 + p % 9);
        let step = steps.div_ceil(10) * tenth;
        job.wait_for(
            &format!("epoch {epoch}/2 step {step}/"),
            Duration::from_secs(120),
        );
        let workers = children(job.child.id());
        assert!(!workers.is_empty(), "no worker to kill");
        let victim = workers[rng.below(workers.len() as u64) as usize];
        signal(victim, libc::SIGKILL);
        kills.push(format!("pid {victim} after epoch {epoch} step {step}"));
        if i + 1 < points.len() {
            job.wait_for("joined during", Duration::from_secs(60));
        }
    }
    let (status, log) = job.finish(Duration::from_secs(180));
    let context = format!("{backend}, seed {seed}, kills: {}\n{log}", kills.join(", "));
    assert!(status.success(), "{context}");
    assert!(!log.contains("panicked"), "{context}");
    assert_eq!(
        log.matches("carrying on with 1 worker(s)").count(),
        3,
        "{context}"
    );
    assert_eq!(log.matches("joined during").count(), 3, "{context}");
    let changes: u64 = metrics(&run)
        .iter()
        .map(|m| m["membership_changes"].as_u64().unwrap())
        .sum();
    assert_eq!(changes, 6, "three losses and three joins: {context}");
    assert_every_sample_once(&run, &context);
    assert_eq!(
        sha256_file(&run.join("model.safetensors")),
        expected,
        "the model differs from the fault-free run's: {context}"
    );
}

#[test]
fn grpc_three_kills_at_random_steps_change_no_bit_and_lose_no_sample() {
    chaos("grpc", 0x5eed_0001);
}

#[test]
fn tcp_three_kills_at_random_steps_change_no_bit_and_lose_no_sample() {
    chaos("tcp", 0x5eed_0002);
}

/// One epoch of 6,400 samples cut into 6 shards per step, with `args`.
fn six_shards(dir: &Path, name: &str, args: &[&str], env: &[(&str, &str)]) -> PathBuf {
    let run = dir.join(name);
    run_ok(
        train_command(&run)
            .args(["--epochs", "1"])
            .args(args)
            .env("LOCKSTEP_CLUSTER__SHARDS", "6")
            .env("LOCKSTEP_TRAIN_SAMPLES", "6400")
            .envs(env.iter().copied()),
        Duration::from_secs(120),
        name,
    );
    run
}

#[test]
fn one_two_and_three_workers_with_the_same_shards_give_the_same_bits_with_grpc_and_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let one = six_shards(
        dir.path(),
        "grpc-1",
        &["--workers", "1", "--backend", "grpc"],
        &[],
    );
    let expected = sha256_file(&one.join("model.safetensors"));
    // tcp's local workers share memory unless told not to; then they use their sockets.
    let sockets = [("LOCKSTEP_CLUSTER__SHARED_MEMORY", "false")];
    for (name, backend, workers, env) in [
        ("grpc-2", "grpc", "2", &[][..]),
        ("grpc-3", "grpc", "3", &[]),
        ("tcp-shm-2", "tcp", "2", &[]),
        ("tcp-shm-3", "tcp", "3", &[]),
        ("tcp-sockets-2", "tcp", "2", &sockets),
        ("tcp-sockets-3", "tcp", "3", &sockets),
    ] {
        let run = six_shards(
            dir.path(),
            name,
            &["--workers", workers, "--backend", backend],
            env,
        );
        assert_eq!(
            sha256_file(&run.join("model.safetensors")),
            expected,
            "{name} differs from one grpc worker"
        );
        if backend == "tcp" {
            let rank0 = worker_logs(&run)
                .into_iter()
                .find(|l| l.contains("listens for the other ranks"))
                .expect("a rank 0 log");
            let (shares, says) = (
                rank0.contains(&format!("the {workers} ranks share memory")),
                rank0.contains(
                    "the ranks all-reduce over their links: cluster.shared_memory is false",
                ),
            );
            assert_eq!(
                (shares, says),
                (env.is_empty(), !env.is_empty()),
                "{name}:\n{rank0}"
            );
        }
    }
    // The shards really are the arithmetic: another shard count is another model.
    let run = dir.path().join("grpc-1-shards-3");
    run_ok(
        train_command(&run)
            .args(["--epochs", "1", "--workers", "1", "--backend", "grpc"])
            .env("LOCKSTEP_CLUSTER__SHARDS", "3")
            .env("LOCKSTEP_TRAIN_SAMPLES", "6400"),
        Duration::from_secs(120),
        "3 shards",
    );
    assert_ne!(sha256_file(&run.join("model.safetensors")), expected);
}

#[test]
fn a_coordinator_killed_mid_epoch_resumes_to_the_same_bits() {
    let dir = tempfile::tempdir().unwrap();
    // grpc, which is no longer the local default: the resume below names no backend and must
    // keep the run's.
    let every = ["--max-restarts", "0", "--backend", "grpc"];
    let expected = fault_free(dir.path(), "reference", &every);
    let run = dir.path().join("killed");
    let mut job = Running::start(
        train_command(&run)
            .args(["--epochs", "2", "--workers", "2"])
            .args(every)
            .env("LOCKSTEP_CHECKPOINT_EVERY_STEPS", "100"),
    );
    job.wait_for("epoch 2/2 step 564/", Duration::from_secs(120));
    let workers = children(job.child.id());
    signal(job.child.id(), libc::SIGKILL);
    let (status, log) = job.finish(Duration::from_secs(10));
    assert!(!status.success(), "{log}");
    // Its local workers die with it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while workers.iter().any(|&w| alive(w)) {
        assert!(
            Instant::now() < deadline,
            "workers {workers:?} outlived their coordinator"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!run.join("summary.json").exists());

    // A resume that would change the arithmetic is refused, naming each difference.
    let out = run_with_limit(
        resume_command(&run).args(["--seed", "7", "--lr", "0.5"]),
        Duration::from_secs(60),
    );
    let err = stderr_of(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("seed: the run has 42, now 7"), "{err}");
    assert!(
        err.contains("optimizer.lr: the run has 0.001, now 0.5"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    // The resume, with another worker count (the arithmetic does not depend on it).
    let log = run_ok(
        resume_command(&run).args(["--workers", "1"]),
        Duration::from_secs(180),
        "resume",
    );
    assert!(
        log.contains("resuming") && log.contains("epoch 2 step 5"),
        "{log}"
    );
    let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(saved.contains("backend = \"grpc\""), "{saved}");
    assert!(log.contains("backend = \"grpc\""), "{log}");
    assert_every_sample_once(&run, &log);
    let epochs: Vec<u64> = metrics(&run)
        .iter()
        .map(|m| m["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, [1, 2], "metrics are appended, not duplicated");
    assert_eq!(
        sha256_file(&run.join("model.safetensors")),
        expected,
        "the resumed model differs from the uninterrupted run's:\n{log}"
    );
    // Resuming a finished run does nothing, and says so.
    let log = run_ok(
        &mut resume_command(&run),
        Duration::from_secs(60),
        "resume a finished run",
    );
    assert!(log.contains("has finished already"), "{log}");
}

#[test]
fn a_frozen_worker_is_dropped_after_the_heartbeat_timeout_and_the_job_carries_on() {
    for backend in ["grpc", "tcp"] {
        let dir = tempfile::tempdir().unwrap();
        let env = [("LOCKSTEP_CLUSTER__HEARTBEAT_TIMEOUT_MS", "1500")];
        let expected = fault_free(dir.path(), "reference", &["--backend", backend]);
        let run = dir.path().join("frozen");
        let mut cmd = train_command(&run);
        cmd.args(["--epochs", "2", "--workers", "2", "--backend", backend]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut job = Running::start(&mut cmd);
        job.wait_for("epoch 1/2 step 470/", Duration::from_secs(120));
        let frozen = children(job.child.id())[1];
        signal(frozen, libc::SIGSTOP);
        let stopped = Instant::now();
        let line = job.wait_for("carrying on with 1 worker(s)", Duration::from_secs(30));
        let noticed = stopped.elapsed();
        let (status, log) = job.finish(Duration::from_secs(180));
        assert!(status.success(), "{backend}:\n{log}");
        assert!(line.contains("sent nothing for"), "{backend}: {line}");
        assert!(
            noticed >= Duration::from_millis(1500) && noticed < Duration::from_secs(15),
            "{backend}: dropped after {noticed:?}"
        );
        assert!(
            !alive(frozen),
            "{backend}: the frozen worker was not killed"
        );
        assert_every_sample_once(&run, &log);
        assert_eq!(
            metrics(&run)[1]["workers"],
            1,
            "{backend}: no restarts were allowed"
        );
        assert_eq!(
            sha256_file(&run.join("model.safetensors")),
            expected,
            "{backend}:\n{log}"
        );
    }
}
