//! Spawns and supervises the local `lockstep-worker` processes of `lockstep train --workers N`
//! (like `torchrun --nproc-per-node`): logs each slot to `logs/worker-<i>.log` in the run
//! directory (appending, so restarts and resumed runs keep the history), tells the engine when
//! one exits, starts a new one in its slot while `--max-restarts` allows (the new process joins
//! the running job as a replacement), kills a worker the engine declared lost (it may be frozen),
//! and stops them all when the job ends. On Linux the workers die with the coordinator
//! (`PR_SET_PDEATHSIG`), so a coordinator killed with SIGKILL leaves no orphans behind.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use lockstep_common::address::CoordinatorUrl;
use lockstep_common::auth::{Token, TOKEN_ENV};
use lockstep_common::tls::ClientTlsFiles;
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::service::Event;

/// Name of the worker binary, looked up next to the running `lockstep` binary.
pub const WORKER_BIN: &str = "lockstep-worker";

/// Finds `lockstep-worker`: `$LOCKSTEP_WORKER_BIN`, else an executable beside this one, else
/// one on PATH.
pub fn worker_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("LOCKSTEP_WORKER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok();
    let beside = exe.as_deref().and_then(Path::parent);
    find_worker(beside, std::env::var_os("PATH").as_deref()).with_context(|| {
        format!(
            "cannot find the `{WORKER_BIN}` binary next to this `lockstep` binary or on PATH; build it \
             (cargo build --release) or set LOCKSTEP_WORKER_BIN to its path"
        )
    })
}

/// The executable `lockstep-worker` in the folder `beside`, else in the folders of `path` (a
/// PATH value); a file without the executable bit does not count.
fn find_worker(beside: Option<&Path>, path: Option<&OsStr>) -> Option<PathBuf> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let beside = beside.and_then(|dir| std::env::join_paths([dir]).ok());
    let found = [beside.as_deref(), path]
        .into_iter()
        .flatten()
        .find_map(|dirs| which::which_in(WORKER_BIN, Some(dirs), &cwd).ok());
    found
}

/// What each spawned worker is told.
#[derive(Clone)]
pub struct SpawnSpec {
    /// How many workers.
    pub count: usize,
    /// The coordinator's URL, e.g. `http://127.0.0.1:41234`.
    pub coordinator: CoordinatorUrl,
    /// The job token, passed through the environment (never on the command line).
    pub token: Token,
    /// Compute threads per worker.
    pub threads: u32,
    /// Device per slot (`cpu`, `cuda:N`).
    pub devices: Vec<String>,
    /// Log file per slot.
    pub logs: Vec<PathBuf>,
    /// How many times in all a worker may be started again.
    pub max_restarts: u32,
    /// With TLS: the CA the workers trust, and their client certificate for mutual TLS.
    pub tls: Option<ClientTlsFiles>,
}

enum Order {
    Lost(u32),
    Stop,
}

/// The engine's handle on the launcher.
#[derive(Clone)]
pub struct LauncherHandle {
    commands: mpsc::UnboundedSender<Order>,
    restarts_left: Arc<AtomicU32>,
}

impl LauncherHandle {
    /// The engine dropped the worker with process id `pid`: kill it if it is one of ours and
    /// still running (frozen, or removed for a fault of its own).
    pub fn declare_lost(&self, pid: u32) {
        let _ = self.commands.send(Order::Lost(pid));
    }

    /// Restarts still allowed.
    pub fn restarts_left(&self) -> u32 {
        self.restarts_left.load(Ordering::SeqCst)
    }
}

/// The supervised local workers.
pub struct LocalWorkers {
    handle: LauncherHandle,
    supervisor: JoinHandle<()>,
}

/// A process exit, from its wait task.
struct Exit {
    slot: usize,
    pid: u32,
    status: String,
}

impl LocalWorkers {
    /// Spawns the workers; each exit becomes an [`Event::ProcessExited`].
    pub fn spawn(spec: SpawnSpec, events: mpsc::UnboundedSender<Event>) -> Result<Self> {
        let bin = worker_binary()?;
        let (commands, mut command_rx) = mpsc::unbounded_channel();
        let (exit_tx, mut exits) = mpsc::unbounded_channel::<Exit>();
        let restarts_left = Arc::new(AtomicU32::new(spec.max_restarts));
        let mut running: BTreeMap<u32, usize> = BTreeMap::new();
        for slot in 0..spec.count {
            let pid = start(&bin, &spec, slot, exit_tx.clone())?;
            running.insert(pid, slot);
        }
        let left = restarts_left.clone();
        let supervisor = tokio::spawn(async move {
            let mut stopping = false;
            loop {
                tokio::select! {
                    command = command_rx.recv(), if !stopping => match command {
                        Some(Order::Lost(pid)) => {
                            if running.contains_key(&pid) {
                                kill(pid);
                            }
                        }
                        Some(Order::Stop) | None => stopping = true,
                    },
                    exit = exits.recv() => {
                        let Some(Exit { slot, pid, status }) = exit else { break };
                        running.remove(&pid);
                        if stopping {
                            if running.is_empty() {
                                break;
                            }
                            continue;
                        }
                        let log = &spec.logs[slot];
                        let detail = format!("{status}; last lines of {}:\n{}", log.display(), tail(log, 6));
                        let _ = events.send(Event::ProcessExited { index: slot, pid, detail });
                        let claimed = left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
                        if claimed.is_ok() {
                            let used = spec.max_restarts - left.load(Ordering::SeqCst);
                            match start(&bin, &spec, slot, exit_tx.clone()) {
                                Ok(pid) => {
                                    tracing::info!(
                                        "started local worker {slot} again (pid {pid}; restart {used} of {})",
                                        spec.max_restarts
                                    );
                                    running.insert(pid, slot);
                                }
                                Err(e) => tracing::error!("could not start local worker {slot} again: {e:#}"),
                            }
                        }
                    }
                    // Workers exit by themselves after Finish or Abort; then kill what is left.
                    _ = tokio::time::sleep(Duration::from_secs(2)), if stopping => {
                        for &pid in running.keys() {
                            kill(pid);
                        }
                    }
                }
                if stopping && running.is_empty() {
                    break;
                }
            }
        });
        Ok(Self {
            handle: LauncherHandle {
                commands,
                restarts_left,
            },
            supervisor,
        })
    }

    /// The engine's handle.
    pub fn handle(&self) -> LauncherHandle {
        self.handle.clone()
    }

    /// Stops the workers (they have normally exited already) and waits for them.
    pub async fn shutdown(self) {
        let _ = self.handle.commands.send(Order::Stop);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.supervisor).await;
    }
}

/// Starts slot `slot`'s worker; its exit is sent to `exits`. Returns its pid.
fn start(
    bin: &Path,
    spec: &SpawnSpec,
    slot: usize,
    exits: mpsc::UnboundedSender<Exit>,
) -> Result<u32> {
    let log_path = &spec.logs[slot];
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let mut command = Command::new(bin);
    command
        .arg("--coordinator")
        .arg(spec.coordinator.to_string())
        .arg("--threads")
        .arg(spec.threads.to_string())
        .arg("--device")
        .arg(&spec.devices[slot])
        // A local worker has nothing to rejoin: it dies with its coordinator.
        .arg("--rejoin-timeout")
        .arg("0")
        .env(TOKEN_ENV, spec.token.expose())
        // The coordinator's own TLS settings are not the workers' (tls.cert is its server
        // certificate); they get theirs as flags.
        .env_remove("LOCKSTEP_TLS__CERT")
        .env_remove("LOCKSTEP_TLS__KEY")
        .env_remove("LOCKSTEP_TLS__CA")
        // A local worker's log is a file for people debugging the job: plain, detailed lines,
        // whatever the coordinator's own output is.
        .env(lockstep_common::logging::FORMAT_ENV, "plain")
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    if let Some(tls) = &spec.tls {
        for (flag, path) in [
            ("--tls-ca", &tls.ca),
            ("--tls-cert", &tls.cert),
            ("--tls-key", &tls.key),
        ] {
            if let Some(path) = path {
                command.arg(flag).arg(path);
            }
        }
    }
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id() as libc::pid_t;
        // SAFETY: between fork and exec only async-signal-safe calls (prctl, getppid) are made.
        unsafe {
            command.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                // The coordinator may have died before prctl took effect.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id().unwrap_or(0);
    tokio::spawn(async move {
        let status = child
            .wait()
            .await
            .map(|s| s.to_string())
            .unwrap_or_else(|e| e.to_string());
        let _ = exits.send(Exit { slot, pid, status });
    });
    Ok(pid)
}

fn kill(pid: u32) {
    // SAFETY: kill(2) with a pid this launcher started and has not seen exit.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn the_worker_binary_is_an_executable_beside_this_one_or_on_path() {
        use std::os::unix::fs::PermissionsExt;
        let make = |dir: &Path, mode: u32| {
            std::fs::create_dir_all(dir).unwrap();
            let bin = dir.join(WORKER_BIN);
            std::fs::write(&bin, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(mode)).unwrap();
            bin
        };
        let root = tempfile::tempdir().unwrap();
        let beside = root.path().join("bin");
        let (first, second) = (root.path().join("a"), root.path().join("b"));
        // Not executable: passed over, beside this binary and on PATH alike.
        make(&beside, 0o644);
        make(&first, 0o644);
        let on_path = make(&second, 0o755);
        let path = std::env::join_paths([&first, &second]).unwrap();
        assert_eq!(find_worker(Some(&beside), Some(&path)), Some(on_path));
        let here = make(&beside, 0o755);
        assert_eq!(find_worker(Some(&beside), Some(&path)), Some(here));
        assert_eq!(
            find_worker(None, Some(&std::env::join_paths([&first]).unwrap())),
            None
        );
        assert_eq!(find_worker(None, None), None);
    }
}
