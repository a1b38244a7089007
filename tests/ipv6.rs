//! IPv6: a coordinator listening on `[::1]` trains with its local workers over grpc, over tcp
//! (rank 0 then listens for the other ranks on IPv6 too) and over TLS, to the same model as on
//! 127.0.0.1; an external worker and `lockstep health` reach it at `http://[::1]:PORT`. Skipped,
//! saying so, on a machine without IPv6 loopback.

use std::process::Command;
use std::time::Duration;

use lockstep_tests::*;

/// A free port on IPv6 loopback, or `None` (with the reason printed) when there is none.
fn ipv6_loopback_port() -> Option<u16> {
    match std::net::TcpListener::bind("[::1]:0").and_then(|l| l.local_addr()) {
        Ok(addr) => Some(addr.port()),
        Err(e) => {
            eprintln!("SKIPPED: this machine has no IPv6 loopback (binding [::1]:0: {e})");
            None
        }
    }
}

/// A short job: one epoch of 640 samples on two local workers.
fn short(cmd: &mut Command) -> &mut Command {
    cmd.args(["--preset", "mlp", "--epochs", "1", "--batch-size", "64"])
        .args(["--workers", "2", "--seed", "7"])
        .env("LOCKSTEP_TRAIN_SAMPLES", "640")
}

/// The worker logs of a run, together.
#[test]
fn a_coordinator_on_ipv6_loopback_trains_over_grpc_tcp_and_tls_to_the_ipv4_model() {
    if ipv6_loopback_port().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("ipv4");
    run_ok(
        short(&mut train_command(&reference)),
        Duration::from_secs(120),
        "the IPv4 run",
    );
    let certs = dir.path().join("certs");
    let out = run_with_limit(
        Command::new(lockstep())
            .args(["certs", "--out"])
            .arg(&certs),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "lockstep certs: {}", stderr_of(&out));
    let cert = |f: &str| certs.join(f).display().to_string();
    let tls = [
        "--tls-cert".to_string(),
        cert("server.pem"),
        "--tls-key".into(),
        cert("server.key"),
        "--tls-ca".into(),
        cert("ca.pem"),
    ];
    for (name, backend, tls) in [
        ("grpc", "grpc", &[][..]),
        ("tcp", "tcp", &[][..]),
        ("grpc-tls", "grpc", &tls[..]),
    ] {
        let run = dir.path().join(name);
        let log = run_ok(
            short(&mut train_command(&run))
                .args(["--listen", "[::1]:0", "--backend", backend])
                .args(tls),
            Duration::from_secs(120),
            name,
        );
        // The coordinator names each worker's address as it joins: IPv6 loopback.
        assert_eq!(
            log.matches("at [::1]:").count(),
            2,
            "{name}: the workers did not join over IPv6:\n{log}"
        );
        if backend == "tcp" {
            let logs = worker_logs(&run).concat();
            assert!(
                logs.contains("listens for the other ranks on [::1]:"),
                "{name}: rank 0 does not listen on IPv6:\n{logs}"
            );
        }
        let m = metrics(&run);
        assert_eq!(
            (m[0]["samples_applied"].as_u64(), m[0]["workers"].as_u64()),
            (Some(640), Some(2))
        );
        assert_eq!(
            sha256_file(&run.join("model.safetensors")),
            sha256_file(&reference.join("model.safetensors")),
            "{name}: IPv6 changed the model"
        );
    }
}

#[test]
fn an_external_worker_and_the_health_probe_reach_a_coordinator_at_an_ipv6_url() {
    let Some(port) = ipv6_loopback_port() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let mut job = Running::start(
        train_command(&run)
            .args(["--preset", "mlp", "--epochs", "1", "--batch-size", "64"])
            .args(["--external-workers", "--workers", "1"])
            .args(["--listen", &format!("[::1]:{port}")])
            .env("LOCKSTEP_TRAIN_SAMPLES", "640")
            .env("LOCKSTEP_TOKEN", "ipv6-test-token"),
    );
    job.wait_for("waiting for", Duration::from_secs(60));
    let url = format!("http://[::1]:{port}");
    let health = run_with_limit(
        Command::new(lockstep()).args(["health", "--addr", &url]),
        Duration::from_secs(20),
    );
    assert!(health.status.success(), "{}", stderr_of(&health));
    let out = run_with_limit(
        Command::new(worker())
            .args(["--coordinator", &url, "--threads", "1"])
            .env("LOCKSTEP_TOKEN", "ipv6-test-token"),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "the worker: {}", stderr_of(&out));
    let (status, log) = job.finish(Duration::from_secs(60));
    assert!(status.success(), "{log}");
    assert!(log.contains("at [::1]:"), "{log}");
    assert_eq!(metrics(&run)[0]["samples_applied"], 640);

    // Without brackets an IPv6 address is no URL: the worker says how to write it.
    let out = run_with_limit(
        Command::new(worker())
            .args(["--coordinator", "http://::1:50051"])
            .env("LOCKSTEP_TOKEN", "ipv6-test-token"),
        Duration::from_secs(20),
    );
    assert_clean_failure(&out, &["http://[::1]:50051", "in brackets"]);
}
