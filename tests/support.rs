//! Helpers for the integration tests: find the release binaries, run `lockstep train` as a
//! real process on loopback with the real MNIST files, and read what it wrote.
//!
//! The binaries come from `cargo build --release` (the README's test command builds them
//! first); the dataset from `../shared/data/mnist` beside the repository, or
//! `$LOCKSTEP_TEST_DATA`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The folder holding the release binaries.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/release/deps/<test> -> target/release
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    for name in ["lockstep", "lockstep-worker"] {
        assert!(
            dir.join(name).exists(),
            "{} is missing: build the binaries first with `cargo build --release` (the README's test command does)",
            dir.join(name).display()
        );
    }
    dir
}

/// Path of the `lockstep` binary.
pub fn lockstep() -> PathBuf {
    bin_dir().join("lockstep")
}

/// Path of the `lockstep-worker` binary.
pub fn worker() -> PathBuf {
    bin_dir().join("lockstep-worker")
}

/// The real MNIST files.
pub fn data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("LOCKSTEP_TEST_DATA") {
        return PathBuf::from(d);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/mnist");
    assert!(
        dir.join("train-images-idx3-ubyte.gz").exists(),
        "MNIST not found at {} (set LOCKSTEP_TEST_DATA to a folder with the four files)",
        dir.display()
    );
    dir
}

/// A `lockstep train` command with the test data (through `LOCKSTEP_DATA_DIR`, so a test can
/// still pass `--data-dir`) and a given run directory.
pub fn train_command(out: &Path) -> Command {
    let mut cmd = Command::new(lockstep());
    cmd.arg("train")
        .env("LOCKSTEP_DATA_DIR", data_dir())
        .arg("--out")
        .arg(out)
        .env_remove("LOCKSTEP_TOKEN")
        // No dashboard unless a test asks: external jobs would all default to port 9090.
        .env("LOCKSTEP_METRICS_ADDR", "off")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    cmd
}

/// `lockstep train --resume RUN` with the test data.
pub fn resume_command(run: &Path) -> Command {
    let mut cmd = Command::new(lockstep());
    cmd.arg("train")
        .arg("--resume")
        .arg(run)
        .env("LOCKSTEP_DATA_DIR", data_dir())
        .env_remove("LOCKSTEP_TOKEN")
        // No dashboard unless a test asks: external jobs would all default to port 9090.
        .env("LOCKSTEP_METRICS_ADDR", "off")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    cmd
}

/// Runs a command to completion, failing the test if it takes longer than `limit`.
pub fn run_with_limit(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_with_limit(child, limit)
}

/// Runs a command to completion within `limit`, failing the test with its standard error
/// unless it succeeds; returns the standard error (the log) for further checks.
pub fn run_ok(cmd: &mut Command, limit: Duration, what: &str) -> String {
    let out = run_with_limit(cmd, limit);
    let err = stderr_of(&out);
    assert!(out.status.success(), "{what} failed:\n{err}");
    err
}

/// Waits for a spawned child (with piped output), killing it and failing after `limit`.
pub fn wait_with_limit(mut child: Child, limit: Duration) -> Output {
    let started = Instant::now();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(o) = stdout.as_mut() {
            let _ = o.read_to_end(&mut s);
        }
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(e) = stderr.as_mut() {
            let _ = e.read_to_end(&mut s);
        }
        s
    });
    let status: ExitStatus = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let err = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).to_string();
            panic!("command did not finish within {limit:?} (hang?); stderr:\n{err}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

/// Standard error as text.
pub fn stderr_of(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// The lines of `metrics.jsonl`.
pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).expect("metrics line is JSON"))
        .collect()
}

/// `summary.json`.
pub fn summary(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).expect("summary.json"))
        .expect("JSON")
}

/// The tensors of a safetensors file as (name, shape, values).
pub fn tensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).expect("safetensors file");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let t = st.tensor(&n).expect("tensor");
            let values = lockstep_common::codec::le_f32s(t.data()).expect("f32 data");
            (n, t.shape().to_vec(), values)
        })
        .collect()
}

/// A free loopback port (bound and released; good enough for tests on one machine).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Sends `signal` to `pid`.
pub fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) with a pid we started and a standard signal number.
    let rc = unsafe { libc::kill(pid as i32, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
}

/// Waits until `path` contains `needle`, up to `limit`; returns the file's text.
pub fn wait_for_text(path: &Path, needle: &str, limit: Duration) -> String {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            started.elapsed() < limit,
            "`{needle}` did not appear in {} within {limit:?}:\n{text}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pid a worker logged in its `joined as rank` line (`host/pid N`).
pub fn worker_pid_from_log(log: &str) -> u32 {
    let after = log.split("pid ").nth(1).expect("worker log names its pid");
    after
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|d| d.parse().ok())
        .expect("pid number")
}

/// The process ids of `pid`'s children (Linux: from `/proc`).
pub fn children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // pid (comm) state ppid ...: the command name may hold spaces, so read after the ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            found.push(child);
        }
    }
    found.sort();
    found
}

/// Whether process `pid` still runs (a zombie does not count).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_string())
        })
        .is_some_and(|rest| !rest.starts_with('Z'))
}

/// A `lockstep train` running in the background whose standard error is read line by line as
/// it comes.
pub struct Running {
    /// The coordinator process.
    pub child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every line read so far.
    pub log: Vec<String>,
}

impl Running {
    /// Starts `cmd` with its standard error piped.
    pub fn start(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn lockstep train");
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// Reads lines until one contains `needle` (returns it), failing the test after `limit`
    /// or when the process ends first.
    pub fn wait_for(&mut self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "`{needle}` did not appear within {limit:?}; the log so far:\n{}",
                    self.log.join("\n")
                ),
            }
        }
    }

    /// Waits for the process to end within `limit`; returns its status and whole log.
    pub fn finish(mut self, limit: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                // Everything it wrote, not only the lines a wait_for read.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(500)) {
                    self.log.push(line);
                }
                panic!(
                    "the job did not end within {limit:?}:\n{}",
                    self.log.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(500)) {
            self.log.push(line);
        }
        (status, self.log.join("\n"))
    }
}

/// A small deterministic generator for tests that pick "random" moments from a seed.
pub struct Lcg(pub u64);

impl Lcg {
    /// The next value in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

/// The SHA-256 of a file, hex.
/// The worker logs of a run directory (`logs/worker-*.log`), in file-name order.
pub fn worker_logs(run: &Path) -> Vec<String> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(run.join("logs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("worker-") && n.ends_with(".log"))
        })
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect()
}

pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A Python interpreter with `packages` (pip requirement strings, e.g. `"tensorboard==2.20.0"`)
/// installed, for checking what the project writes with readers it did not write: a virtual
/// environment at `$LOCKSTEP_TEST_VENV` (default `~/.cache/lockstep-test/venv`), created with
/// `python3 -m venv` and filled from PyPI on first use, then reused. Tests that call this at
/// the same time wait for each other on a lock file beside it.
pub fn python_with(packages: &[&str]) -> PathBuf {
    let venv = std::env::var_os("LOCKSTEP_TEST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is set");
            Path::new(&home).join(".cache/lockstep-test/venv")
        });
    std::fs::create_dir_all(venv.parent().expect("venv parent"))
        .expect("creating the venv's folder");
    let lock = std::fs::File::create(venv.with_extension("lock")).expect("the venv's lock file");
    lock.lock().expect("locking the venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        let out = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .output()
            .expect(
                "python3 is needed for this test (to read the files with their own Python readers)",
            );
        assert!(
            out.status.success(),
            "python3 -m venv {}: {}",
            venv.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let record = venv.join("lockstep-installed.txt");
    let installed = std::fs::read_to_string(&record).unwrap_or_default();
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !installed.lines().any(|l| l == *p))
        .collect();
    if !missing.is_empty() {
        let out = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(&missing)
            .output()
            .expect("running pip");
        assert!(
            out.status.success(),
            "pip install {} (PyPI must be reachable): {}",
            missing.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut all = installed;
        for p in missing {
            all.push_str(p);
            all.push('\n');
        }
        std::fs::write(&record, all).expect("recording the installed packages");
    }
    python
}

/// Asserts that a command failed cleanly: a non-zero exit, no panic, and an error that holds
/// every one of `needles`. Returns the standard error.
pub fn assert_clean_failure(out: &Output, needles: &[&str]) -> String {
    let err = stderr_of(out);
    assert!(
        !out.status.success(),
        "expected failure, got success:\n{err}"
    );
    assert!(
        !err.contains("panicked"),
        "a panic instead of an error:\n{err}"
    );
    for n in needles {
        assert!(err.contains(n), "error lacks `{n}`:\n{err}");
    }
    err
}
