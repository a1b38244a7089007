//! Secrets: the job token never reaches a log line, an error message or the run directory (the
//! most verbose logging included), and a token file that other users may read is refused by
//! both binaries, saying what to run.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use lockstep_tests::*;

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files(&path));
        } else {
            found.push(path);
        }
    }
    found
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Fails the test if `token` is in any file under `run` or in any of `outputs`.
fn assert_nowhere(token: &str, run: &Path, outputs: &[(&str, &[u8])]) {
    let written = files(run);
    for name in [
        "config.toml",
        "summary.json",
        "metrics.jsonl",
        "model.safetensors",
    ] {
        assert!(
            written.iter().any(|p| p.ends_with(name)),
            "the run directory lacks {name}: {written:?}"
        );
    }
    for path in &written {
        let bytes = std::fs::read(path).unwrap();
        assert!(
            !contains(&bytes, token),
            "the token is in {}",
            path.display()
        );
    }
    for (what, bytes) in outputs {
        assert!(!contains(bytes, token), "the token is in the {what}");
    }
}

/// Starts `cmd` with its standard output and error going to files in `dir` (a pipe that nobody
/// reads yet would fill up with trace output and stall the job).
fn spawn_into_files(cmd: &mut Command, dir: &Path) -> std::process::Child {
    cmd.stdout(std::fs::File::create(dir.join("stdout")).unwrap())
        .stderr(std::fs::File::create(dir.join("stderr")).unwrap())
        .spawn()
        .unwrap()
}

/// Waits for a child started by [`spawn_into_files`]; fails the test unless it succeeds within
/// `limit`. Returns its standard output and error.
fn finish_from_files(
    mut child: std::process::Child,
    dir: &Path,
    limit: Duration,
) -> (Vec<u8>, Vec<u8>) {
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("the job did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (
        std::fs::read(dir.join("stdout")).unwrap(),
        std::fs::read(dir.join("stderr")).unwrap(),
    );
    assert!(status.success(), "{}", String::from_utf8_lossy(&err));
    (out, err)
}

fn unique_token() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("secret-{}-{nanos}", std::process::id())
}

#[test]
fn the_job_token_never_reaches_the_run_directory_or_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let token = unique_token();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let coordinator = spawn_into_files(
        train_command(&run)
            .args(["--external-workers", "--workers", "1", "--epochs", "1"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("LOCKSTEP_TOKEN", &token)
            .env("LOCKSTEP_TRAIN_SAMPLES", "640")
            .env("RUST_LOG", "trace"),
        dir.path(),
    );
    let worker = |args: &[&str], token: Option<&str>| {
        let mut cmd = Command::new(worker());
        cmd.args([
            "--coordinator",
            &url,
            "--threads",
            "1",
            "--connect-timeout",
            "30",
        ])
        .args(args)
        .env_remove("LOCKSTEP_TOKEN")
        .env("RUST_LOG", "trace");
        if let Some(t) = token {
            cmd.env("LOCKSTEP_TOKEN", t);
        }
        run_with_limit(&mut cmd, Duration::from_secs(60))
    };
    let refused = worker(&[], Some("not-the-token"));
    assert!(
        !refused.status.success() && stderr_of(&refused).contains("wrong job token"),
        "{}",
        stderr_of(&refused)
    );
    let good = worker(&["--token-file", token_file.to_str().unwrap()], None);
    assert!(good.status.success(), "{}", stderr_of(&good));
    let (out, err) = finish_from_files(coordinator, dir.path(), Duration::from_secs(60));
    assert_nowhere(
        &token,
        &run,
        &[
            ("coordinator's output", &out),
            ("coordinator's log", &err),
            ("refused worker's log", &refused.stderr),
            ("worker's log", &good.stderr),
            ("worker's output", &good.stdout),
        ],
    );
}

/// The token `lockstep train` generates for its local workers reaches them through their
/// environment only: not their command line, not their logs in the run directory.
#[test]
fn the_generated_token_of_local_workers_never_reaches_the_run_directory() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let child = spawn_into_files(
        train_command(&run)
            .args(["--workers", "1", "--epochs", "1"])
            .env("LOCKSTEP_TRAIN_SAMPLES", "12800")
            .env("RUST_LOG", "trace"),
        dir.path(),
    );
    let started = Instant::now();
    let token = loop {
        let environ = children(child.id())
            .into_iter()
            .find_map(|pid| std::fs::read(format!("/proc/{pid}/environ")).ok())
            .unwrap_or_default();
        let found = environ
            .split(|&b| b == 0)
            .find_map(|v| v.strip_prefix(b"LOCKSTEP_TOKEN="))
            .map(|t| String::from_utf8_lossy(t).into_owned());
        if let Some(token) = found {
            break token;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no local worker with a token appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        token.len() >= 32,
        "a generated token of {} characters",
        token.len()
    );
    let cmdlines: Vec<Vec<u8>> = children(child.id())
        .into_iter()
        .filter_map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
        .collect();
    let (out, err) = finish_from_files(child, dir.path(), Duration::from_secs(120));
    let mut outputs: Vec<(&str, &[u8])> =
        vec![("coordinator's output", &out), ("coordinator's log", &err)];
    outputs.extend(
        cmdlines
            .iter()
            .map(|c| ("worker's command line", c.as_slice())),
    );
    assert_nowhere(&token, &run, &outputs);
}

#[test]
fn a_token_file_others_may_read_is_refused_by_both_binaries_saying_what_to_run() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "s3cret-in-a-file\n").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let path = file.to_str().unwrap();
    let coordinator = run_with_limit(
        train_command(&dir.path().join("run"))
            .args(["--external-workers", "--token-file", path])
            .args(["--listen", "127.0.0.1:0"]),
        Duration::from_secs(30),
    );
    let worker = |file: &str| {
        run_with_limit(
            Command::new(worker())
                .args([
                    "--coordinator",
                    "http://127.0.0.1:9",
                    "--connect-timeout",
                    "1",
                ])
                .args(["--token-file", file])
                .env_remove("LOCKSTEP_TOKEN"),
            Duration::from_secs(30),
        )
    };
    let refused = worker(path);
    for (who, out) in [
        ("lockstep train", &coordinator),
        ("lockstep-worker", &refused),
    ] {
        let err = stderr_of(out);
        assert_eq!(out.status.code(), Some(1), "{who}:\n{err}");
        assert!(
            err.contains(&format!(
                "the token file {path} is accessible by other users (mode 0644)"
            )) && err.contains(&format!("run `chmod 600 {path}`")),
            "{who}:\n{err}"
        );
        assert!(!err.contains("s3cret"), "{who} shows the secret:\n{err}");
    }
    // Readable by its owner only, the same file is taken: the worker goes on to connect.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let accepted = worker(path);
    let err = stderr_of(&accepted);
    assert!(
        err.contains("could not reach the coordinator") && !err.contains("token file"),
        "{err}"
    );
}
