//! Spawns the local `lockstep-worker` processes of `lockstep train --workers N` (like
//! `torchrun --nproc-per-node`), logs each to `logs/worker-<i>.log` in the run directory, tells
//! the engine when one exits early, and stops them all when the job ends.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lockstep_common::auth::{Token, TOKEN_ENV};
use tokio::process::Command;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::service::Event;

/// Name of the worker binary, looked up next to the running `lockstep` binary.
pub const WORKER_BIN: &str = "lockstep-worker";

/// Finds `lockstep-worker`: `$LOCKSTEP_WORKER_BIN`, else beside this executable, else on PATH.
pub fn worker_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("LOCKSTEP_WORKER_BIN") {
        return Ok(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        let sibling = exe.with_file_name(WORKER_BIN);
        if sibling.exists() {
            return Ok(sibling);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(WORKER_BIN);
            if candidate.exists() {
                return Ok(candidate);
            }
        }
    }
    bail!(
        "cannot find the `{WORKER_BIN}` binary next to this `lockstep` binary or on PATH; build it \
         (cargo build --release) or set LOCKSTEP_WORKER_BIN to its path"
    )
}

/// The spawned workers.
pub struct LocalWorkers {
    stop: watch::Sender<bool>,
    monitors: Vec<JoinHandle<()>>,
}

/// What each spawned worker is told.
pub struct SpawnSpec<'a> {
    /// How many workers.
    pub count: usize,
    /// The coordinator's URL, e.g. `http://127.0.0.1:41234`.
    pub coordinator: String,
    /// The job token, passed through the environment (never on the command line).
    pub token: &'a Token,
    /// Compute threads per worker.
    pub threads: u32,
    /// Device per worker index (`cpu`, `cuda:N`).
    pub devices: Vec<String>,
    /// Log file per worker index.
    pub logs: Vec<PathBuf>,
}

impl LocalWorkers {
    /// Spawns the workers; each one's early exit becomes an [`Event::ProcessExited`].
    pub fn spawn(spec: SpawnSpec<'_>, events: mpsc::UnboundedSender<Event>) -> Result<Self> {
        let bin = worker_binary()?;
        let (stop, stop_rx) = watch::channel(false);
        let mut monitors = Vec::new();
        for index in 0..spec.count {
            let log_path = spec.logs[index].clone();
            let log = std::fs::File::create(&log_path)
                .with_context(|| format!("creating {}", log_path.display()))?;
            let mut child = Command::new(&bin)
                .arg("--coordinator")
                .arg(&spec.coordinator)
                .arg("--threads")
                .arg(spec.threads.to_string())
                .arg("--device")
                .arg(&spec.devices[index])
                .env(TOKEN_ENV, spec.token.expose())
                .env(
                    "RUST_LOG",
                    std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
                )
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            let pid = child.id().unwrap_or(0);
            let events = events.clone();
            let mut stop_rx = stop_rx.clone();
            monitors.push(tokio::spawn(async move {
                tokio::select! {
                    status = child.wait() => {
                        let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                        if !*stop_rx.borrow() {
                            let detail = format!("{status}; last lines of {}:\n{}", log_path.display(), tail(&log_path, 6));
                            let _ = events.send(Event::ProcessExited { index, pid, detail });
                        }
                    }
                    _ = async { while !*stop_rx.borrow() { if stop_rx.changed().await.is_err() { break; } } } => {
                        // Workers exit by themselves after `Finish` or `Abort`; give them a moment.
                        if tokio::time::timeout(Duration::from_secs(2), child.wait()).await.is_err() {
                            let _ = child.kill().await;
                        }
                    }
                }
            }));
        }
        Ok(Self { stop, monitors })
    }

    /// Stops the workers (they have normally exited already) and waits for them.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for m in self.monitors {
            let _ = m.await;
        }
    }
}

/// The last `n` lines of a log file, indented, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}
