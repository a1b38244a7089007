//! Watching a run over HTTP, checked with parts the project did not write: `/metrics` scraped
//! during a real run and parsed by the `prometheus_client` Python package's strict OpenMetrics
//! parser, and the dashboard loaded in a real browser (Debian's `chromium`, headless) whose
//! rendered page must show the run's own figures.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lockstep_tests::*;

/// The Python package whose parser reads `/metrics`.
const PROMETHEUS_CLIENT: &str = "prometheus-client==0.21.1";

/// Scrapes `url` twice, half a second apart, parses each with the OpenMetrics parser (which
/// refuses anything malformed) and prints `[{family: {"type": t, "samples": [[name, labels,
/// value], ...]}}, ...]`.
const SCRAPE: &str = r#"
import json, sys, time, urllib.request
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for i in range(2):
    if i:
        time.sleep(0.5)
    with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
        assert r.headers["Content-Type"].startswith("application/openmetrics-text"), r.headers["Content-Type"]
        text = r.read().decode()
    families = {}
    for f in text_string_to_metric_families(text):
        families[f.name] = {"type": f.type, "samples": [[s.name, s.labels, s.value] for s in f.samples]}
    out.append(families)
print(json.dumps(out))
"#;

/// The headless browser: `$LOCKSTEP_BROWSER`, or `chromium` (Debian's package) on the PATH.
fn browser() -> PathBuf {
    if let Some(b) = std::env::var_os("LOCKSTEP_BROWSER") {
        return PathBuf::from(b);
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
        if let Some(path) = found {
            return PathBuf::from(path);
        }
    }
    panic!(
        "the dashboard is tested in a real browser: install Debian's chromium (`apt-get install chromium`), \
         or point LOCKSTEP_BROWSER at a Chromium binary"
    );
}

/// The page at `url` as the browser left it after running its scripts.
fn rendered(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = run_with_limit(
        Command::new(browser())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--virtual-time-budget=3000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("--dump-dom")
            .arg(url),
        Duration::from_secs(90),
    );
    let dom = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && dom.contains("</html>"),
        "the browser did not render {url}: {}",
        stderr_of(&out)
    );
    dom
}

/// The value of `attr` in the first element whose opening tag contains `marker`.
fn attr(dom: &str, marker: &str, attr: &str) -> String {
    let at = dom
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} missing from the page:\n{dom}"));
    let tag = &dom[dom[..at].rfind('<').unwrap()..];
    let tag = &tag[..tag.find('>').unwrap()];
    let key = format!("{attr}=\"");
    let start = tag
        .find(&key)
        .unwrap_or_else(|| panic!("no {attr} in {tag}"))
        + key.len();
    tag[start..start + tag[start..].find('"').unwrap()].to_string()
}

/// The text inside the element whose opening tag contains `marker`.
fn text_of(dom: &str, marker: &str) -> String {
    let at = dom
        .find(marker)
        .unwrap_or_else(|| panic!("{marker} missing from the page"));
    let rest = &dom[at..];
    let start = rest.find('>').unwrap() + 1;
    rest[start..start + rest[start..].find('<').unwrap()].to_string()
}

/// The address the job printed for its dashboard.
fn dashboard_url(job: &mut Running) -> String {
    let line = job.wait_for("dashboard http://", Duration::from_secs(60));
    let url = line
        .split_whitespace()
        .skip_while(|w| *w != "dashboard")
        .nth(1)
        .expect("a URL after `dashboard`")
        .to_string();
    assert!(url.starts_with("http://127.0.0.1:"), "{line}");
    url.trim_end_matches('/').to_string()
}

/// Waits until the run has written `n` epochs.
fn wait_for_epochs(run: &Path, n: usize) {
    let started = Instant::now();
    while std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .count()
        < n
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "{n} epochs not written"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One sample's value: `family`'s sample named `name` whose labels include `labels`.
fn sample(scrape: &serde_json::Value, family: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let f = &scrape[family];
    f["samples"]
        .as_array()
        .unwrap_or_else(|| panic!("no family {family}"))
        .iter()
        .find(|s| s[0] == name && labels.iter().all(|(k, v)| s[1][*k] == *v))
        .and_then(|s| s[2].as_f64())
        .unwrap_or_else(|| panic!("no sample {name} {labels:?} in {f}"))
}

#[test]
fn a_running_job_serves_metrics_a_real_parser_reads_and_a_dashboard_a_real_browser_draws() {
    let python = python_with(&[PROMETHEUS_CLIENT]);
    let browser_path = browser();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("watched");
    // Long enough to be watched (it is stopped once checked): 94 steps an epoch.
    let mut job = Running::start(
        train_command(&run)
            .args(["--epochs", "200", "--workers", "2"])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .env("LOCKSTEP_TRAIN_SAMPLES", "6000"),
    );
    let url = dashboard_url(&mut job);
    wait_for_epochs(&run, 2);

    // Prometheus: strict OpenMetrics parsing, the conventions' names and types, per-rank series.
    let out = run_with_limit(
        Command::new(&python)
            .args(["-c", SCRAPE])
            .arg(format!("{url}/metrics")),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "scraping: {}", stderr_of(&out));
    let scrapes: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let (first, second) = (&scrapes[0], &scrapes[1]);
    for (family, kind) in [
        ("lockstep_steps", "counter"),
        ("lockstep_samples", "counter"),
        ("lockstep_wire_bytes", "counter"),
        ("lockstep_allreduce_bytes", "counter"),
        ("lockstep_step_seconds", "histogram"),
        ("lockstep_worker_compute_seconds", "histogram"),
        ("lockstep_worker_allreduce_wait_seconds", "histogram"),
        ("lockstep_worker_apply_seconds", "histogram"),
        ("lockstep_workers", "gauge"),
        ("lockstep_membership_changes", "counter"),
        ("lockstep_epoch", "gauge"),
        ("lockstep_train_loss", "gauge"),
        ("lockstep_test_loss", "gauge"),
        ("lockstep_test_accuracy", "gauge"),
        ("lockstep_checkpoints", "counter"),
        ("lockstep_last_checkpoint_age_seconds", "gauge"),
    ] {
        assert_eq!(first[family]["type"], kind, "{family}: {first}");
    }
    let steps = |s| sample(s, "lockstep_steps", "lockstep_steps_total", &[]);
    assert!(steps(first) >= 188.0, "{first}");
    assert!(
        steps(second) > steps(first),
        "a running job's step counter grows"
    );
    // 94 steps of 64 samples an epoch, the last of 48 (two counters read while they move).
    let samples = sample(first, "lockstep_samples", "lockstep_samples_total", &[]);
    assert!(
        samples > 0.0 && samples <= steps(first) * 64.0 + 64.0,
        "{samples}"
    );
    for rank in ["0", "1"] {
        let count = sample(
            first,
            "lockstep_worker_compute_seconds",
            "lockstep_worker_compute_seconds_count",
            &[("rank", rank)],
        );
        assert!(count > 0.0, "rank {rank} has compute times");
    }
    assert_eq!(
        sample(first, "lockstep_workers", "lockstep_workers", &[]),
        2.0
    );
    assert_eq!(
        sample(
            first,
            "lockstep_membership_changes",
            "lockstep_membership_changes_total",
            &[("kind", "joined")]
        ),
        2.0
    );
    assert!(
        sample(
            first,
            "lockstep_checkpoints",
            "lockstep_checkpoints_total",
            &[]
        ) >= 2.0
    );
    // The accuracy it reports is an epoch's accuracy from metrics.jsonl.
    let accuracy = sample(
        second,
        "lockstep_test_accuracy",
        "lockstep_test_accuracy",
        &[],
    );
    let epochs = metrics(&run);
    assert!(
        epochs
            .iter()
            .any(|m| m["test_accuracy"].as_f64() == Some(accuracy)),
        "{accuracy} is no epoch's accuracy in {epochs:?}"
    );

    // The dashboard, as a real browser draws it.
    let dom = rendered(&format!("{url}/"));
    let shown_epoch: usize = attr(&dom, "id=\"accuracy\"", "data-epoch").parse().unwrap();
    let shown: f64 = attr(&dom, "id=\"accuracy\"", "data-value").parse().unwrap();
    let epochs = metrics(&run);
    assert!(shown_epoch >= 2, "{dom}");
    let expected = epochs[shown_epoch - 1]["test_accuracy"].as_f64().unwrap();
    assert_eq!(shown, expected, "the page's accuracy is metrics.jsonl's");
    assert_eq!(
        text_of(&dom, "id=\"accuracy\""),
        format!("{:.2}%", expected * 100.0)
    );
    let loss_points: usize = attr(&dom, "id=\"chart-loss\"", "data-points")
        .parse()
        .unwrap();
    assert_eq!(
        loss_points,
        2 * shown_epoch,
        "train and test loss per epoch"
    );
    assert!(dom.matches("class=\"point\"").count() >= 4 * shown_epoch);
    for chart in ["chart-epoch-loss", "chart-throughput"] {
        let n: usize = attr(&dom, &format!("id=\"{chart}\""), "data-points")
            .parse()
            .unwrap();
        assert!(n > 0, "{chart} has points");
    }
    assert_eq!(
        dom.matches("<tr data-rank=").count(),
        2,
        "one row per worker"
    );
    assert!(dom.contains("<tr data-rank=\"0\"") && dom.contains("<tr data-rank=\"1\""));
    assert_eq!(dom.matches("<li data-kind=\"joined\"").count(), 2, "{dom}");
    assert_eq!(text_of(&dom, "id=\"run-dir\""), run.display().to_string());
    assert!(
        dom.contains("preset = \"mlp\""),
        "the configuration is shown"
    );

    // A screenshot, looked at when the page changes (`LOCKSTEP_SCREENSHOT=FILE`).
    if let Some(file) = std::env::var_os("LOCKSTEP_SCREENSHOT") {
        let profile = tempfile::tempdir().unwrap();
        run_with_limit(
            Command::new(&browser_path)
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--hide-scrollbars",
                ])
                .args(["--window-size=1280,1350", "--virtual-time-budget=3000"])
                .arg(format!("--user-data-dir={}", profile.path().display()))
                .arg(format!("--screenshot={}", Path::new(&file).display()))
                .arg(format!("{url}/")),
            Duration::from_secs(90),
        );
    }

    // Read-only: no other method or path.
    let post = run_with_limit(
        Command::new(&python).args([
            "-c",
            "import sys, urllib.request, urllib.error\n\
             for method, path in [('POST', '/metrics'), ('GET', '/admin')]:\n\
             \x20   try:\n\
             \x20       urllib.request.urlopen(urllib.request.Request(sys.argv[1] + path, method=method, data=b'' if method == 'POST' else None))\n\
             \x20       print('accepted', method, path)\n\
             \x20   except urllib.error.HTTPError as e:\n\
             \x20       print(e.code)\n",
            &url,
        ]),
        Duration::from_secs(30),
    );
    assert_eq!(
        String::from_utf8_lossy(&post.stdout)
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["405", "404"],
        "{}",
        stderr_of(&post)
    );

    signal(job.child.id(), libc::SIGTERM);
    let (status, log) = job.finish(Duration::from_secs(60));
    assert!(!status.success(), "stopped by SIGTERM: {log}");
}

#[test]
fn a_metrics_port_in_use_is_refused_by_name_before_anything_starts() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("refused");
    let out = run_with_limit(
        train_command(&run).args(["--metrics-addr", &addr, "--epochs", "1"]),
        Duration::from_secs(60),
    );
    let err = stderr_of(&out);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&addr) && err.contains("in use") && err.contains("--metrics-addr"),
        "{err}"
    );
    assert!(
        !run.exists(),
        "no run directory for a job that did not start"
    );
}

#[test]
fn with_metrics_off_nothing_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("quiet");
    let log = run_ok(
        train_command(&run)
            .args(["--metrics-addr", "off", "--epochs", "1"])
            .env("LOCKSTEP_TRAIN_SAMPLES", "2000"),
        Duration::from_secs(120),
        "training with --metrics-addr off",
    );
    assert!(!log.contains("dashboard http://"), "{log}");
    assert!(log.contains("metrics_addr = \"off\""), "{log}");
}
