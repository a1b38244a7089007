//! TLS on the wire: a job over TLS (and mutual TLS) computes the plaintext job's model, with
//! `grpc` and with `tcp` (whose links between workers are encrypted too); a TLS coordinator
//! refuses plaintext clients, clients that do not trust it or that it does not trust, and a
//! private key that others can read. Real binaries, certificates from `lockstep certs`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lockstep_tests::*;

/// `lockstep certs --out DIR/name`: the folder with ca.pem, server.pem/.key, client.pem/.key.
fn certs(dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    let o = run_with_limit(
        Command::new(lockstep()).args(["certs", "--out"]).arg(&out),
        Duration::from_secs(30),
    );
    assert!(o.status.success(), "lockstep certs: {}", stderr_of(&o));
    out
}

fn small(cmd: &mut Command) -> &mut Command {
    cmd.args(["--epochs", "1"])
        .env("LOCKSTEP_TRAIN_SAMPLES", "6400")
}

fn tls_args(c: &Path, mutual: bool) -> Vec<String> {
    let p = |f: &str| c.join(f).display().to_string();
    let mut args = vec![
        "--tls-cert".into(),
        p("server.pem"),
        "--tls-key".into(),
        p("server.key"),
        "--tls-ca".into(),
        p("ca.pem"),
    ];
    if mutual {
        args.extend([
            "--tls-client-ca".into(),
            p("ca.pem"),
            "--tls-worker-cert".into(),
            p("client.pem"),
            "--tls-worker-key".into(),
            p("client.key"),
        ]);
    }
    args
}

#[test]
fn a_job_over_tls_or_mutual_tls_computes_the_plaintext_model_with_grpc_and_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path(), "certs");
    for backend in ["grpc", "tcp"] {
        let plain = dir.path().join(format!("{backend}-plain"));
        run_ok(
            small(&mut train_command(&plain)).args(["--backend", backend]),
            Duration::from_secs(120),
            "plaintext",
        );
        for mutual in [false, true] {
            let run = dir.path().join(format!("{backend}-tls-{mutual}"));
            let log = run_ok(
                small(&mut train_command(&run))
                    .args(["--backend", backend])
                    .args(tls_args(&c, mutual)),
                Duration::from_secs(120),
                "TLS",
            );
            assert_eq!(
                sha256_file(&run.join("model.safetensors")),
                sha256_file(&plain.join("model.safetensors")),
                "{backend}, mutual {mutual}:\n{log}"
            );
            if backend == "tcp" {
                let worker_logs: String = (0..2)
                    .map(|i| {
                        std::fs::read_to_string(run.join(format!("logs/worker-{i}.log"))).unwrap()
                    })
                    .collect();
                assert!(
                    worker_logs.contains("listens for the other ranks on")
                        && worker_logs.contains("(TLS)"),
                    "the tcp links are not TLS:\n{worker_logs}"
                );
            }
            // The run directory holds the files' paths, never what is in them.
            let key = std::fs::read_to_string(c.join("server.key")).unwrap();
            let saved = std::fs::read_to_string(run.join("config.toml")).unwrap();
            assert!(
                saved.contains("server.key") && !saved.contains(key.trim()),
                "{saved}"
            );
        }
    }
}

/// A worker joining `port` with `args`; its standard error, and how long it took to give up.
fn worker_attempt(port: u16, url_scheme: &str, args: &[String]) -> (String, Duration) {
    let started = Instant::now();
    let out = run_with_limit(
        Command::new(worker())
            .arg("--coordinator")
            .arg(format!("{url_scheme}://127.0.0.1:{port}"))
            .args(["--connect-timeout", "20", "--rejoin-timeout", "0"])
            .args(args)
            .env("LOCKSTEP_TOKEN", "tls-test-token"),
        Duration::from_secs(60),
    );
    let err = stderr_of(&out);
    assert!(!out.status.success(), "the worker was admitted:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    (err, started.elapsed())
}

#[test]
fn a_tls_coordinator_refuses_plaintext_untrusted_and_unknown_clients_then_trains_a_good_one() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path(), "certs");
    let other = certs(dir.path(), "other");
    let p = |d: &Path, f: &str| d.join(f).display().to_string();

    // A private key that others can read is refused before anything starts.
    let open_key = dir.path().join("open.key");
    std::fs::copy(c.join("server.key"), &open_key).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&open_key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let out = run_with_limit(
            small(&mut train_command(&dir.path().join("open")))
                .args(["--tls-cert", &p(&c, "server.pem"), "--tls-key"])
                .arg(&open_key)
                .args(["--tls-ca", &p(&c, "ca.pem")]),
            Duration::from_secs(30),
        );
        let err = stderr_of(&out);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("chmod 600") && err.contains("0644"), "{err}");
    }

    let port = free_port();
    let run = dir.path().join("run");
    let mut job = Running::start(
        small(&mut train_command(&run))
            .args(["--external-workers", "--workers", "1"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--tls-cert", &p(&c, "server.pem")])
            .args(["--tls-key", &p(&c, "server.key")])
            .args(["--tls-client-ca", &p(&c, "ca.pem")])
            .env("LOCKSTEP_TOKEN", "tls-test-token"),
    );
    job.wait_for("(TLS only)", Duration::from_secs(60));

    // The health service answers over TLS, without a client certificate; not in plaintext.
    let health = |args: &[String]| {
        run_with_limit(
            Command::new(lockstep()).arg("health").args(args),
            Duration::from_secs(20),
        )
    };
    let ok = health(&[
        "--addr".into(),
        format!("https://127.0.0.1:{port}"),
        "--tls-ca".into(),
        p(&c, "ca.pem"),
    ]);
    assert!(ok.status.success(), "{}", stderr_of(&ok));
    let plain = health(&["--addr".into(), format!("http://127.0.0.1:{port}")]);
    assert!(!plain.status.success());

    let client = [
        "--tls-cert".to_string(),
        p(&c, "client.pem"),
        "--tls-key".into(),
        p(&c, "client.key"),
    ];
    // Plaintext.
    let (err, _) = worker_attempt(port, "http", &[]);
    assert!(err.contains("refuses plaintext"), "{err}");
    // A worker that does not trust the coordinator's CA gives up at once, saying why.
    let mut args = vec!["--tls-ca".to_string(), p(&other, "ca.pem")];
    args.extend(client.clone());
    let (err, took) = worker_attempt(port, "https", &args);
    assert!(
        err.contains("TLS handshake with the coordinator failed"),
        "{err}"
    );
    assert!(took < Duration::from_secs(15), "retried for {took:?}");
    // No client certificate, and one from another CA.
    let (err, _) = worker_attempt(port, "https", &["--tls-ca".into(), p(&c, "ca.pem")]);
    assert!(err.contains("requires a client certificate"), "{err}");
    let mut args = vec!["--tls-ca".to_string(), p(&c, "ca.pem")];
    args.extend([
        "--tls-cert".into(),
        p(&other, "client.pem"),
        "--tls-key".into(),
        p(&other, "client.key"),
    ]);
    let (err, _) = worker_attempt(port, "https", &args);
    assert!(err.contains("did not sign"), "{err}");
    // The URL and the files must agree.
    let (err, took) = worker_attempt(port, "http", &["--tls-ca".into(), p(&c, "ca.pem")]);
    assert!(err.contains("use https://"), "{err}");
    assert!(took < Duration::from_secs(5));

    // None of them took the job's place: a good worker trains it (grpcs:// means TLS too).
    let mut good = Command::new(worker());
    good.arg("--coordinator")
        .arg(format!("grpcs://127.0.0.1:{port}"))
        .args(["--tls-ca", &p(&c, "ca.pem")])
        .args(client)
        .env("LOCKSTEP_TOKEN", "tls-test-token");
    let out = run_with_limit(&mut good, Duration::from_secs(120));
    assert!(out.status.success(), "{}", stderr_of(&out));
    let (status, log) = job.finish(Duration::from_secs(60));
    assert!(status.success(), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(metrics(&run).len(), 1);
}
