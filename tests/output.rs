//! What the binaries print: for a person on a terminal (run under a real pseudo-terminal with
//! util-linux `script`), plain timestamped lines off one, one JSON object per line with
//! `--log-format json`, and only the final line with `-q`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lockstep_tests::{data_dir, lockstep, metrics, run_with_limit, stderr_of, train_command};

const LIMIT: Duration = Duration::from_secs(240);

/// A short job: one epoch of `mlp` on the first 6,000 training images.
fn short_job(cmd: &mut Command) -> &mut Command {
    cmd.args(["--epochs", "1", "--workers", "2"])
        .env("LOCKSTEP_TRAIN_SAMPLES", "6000")
        .env_remove("LOCKSTEP_LOG_FORMAT")
        .env_remove("NO_COLOR")
}

/// Runs `lockstep train` under a pseudo-terminal 120 columns wide and returns what the
/// terminal received (stdout and stderr together).
fn on_a_terminal(out: &Path, extra: &[&str], env: &[(&str, &str)]) -> String {
    let mut line = format!(
        "stty cols 120 rows 40; exec '{}' train --out '{}' --epochs 1 --workers 2",
        lockstep().display(),
        out.display()
    );
    for arg in extra {
        line.push_str(&format!(" '{arg}'"));
    }
    let mut cmd = Command::new("script");
    cmd.args(["-qec", &line, "/dev/null"])
        .env("LOCKSTEP_DATA_DIR", data_dir())
        .env("LOCKSTEP_TRAIN_SAMPLES", "6000")
        .env("TERM", "xterm-256color")
        .env_remove("LOCKSTEP_LOG_FORMAT")
        .env_remove("LOCKSTEP_TOKEN")
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let output = run_with_limit(&mut cmd, LIMIT);
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    assert!(
        output.status.success(),
        "lockstep train under a terminal failed:\n{text}{}",
        stderr_of(&output)
    );
    text
}

/// Escape sequences that set colours or text attributes (SGR: `ESC [ ... m`).
fn colour_sequences(text: &str) -> usize {
    let bytes = text.as_bytes();
    let mut count = 0;
    for (i, _) in text.match_indices("\x1b[") {
        let rest = &bytes[i + 2..];
        let end = rest
            .iter()
            .position(|b| !(b.is_ascii_digit() || *b == b';'));
        if end.is_some_and(|e| rest[e] == b'm') {
            count += 1;
        }
    }
    count
}

/// The lines a person reads: the progress bar's redraws (carriage returns, cursor and colour
/// sequences) taken out.
fn screen_lines(text: &str) -> Vec<String> {
    let mut plain = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
        .split('\n')
        // A line ends "\r\n" on a terminal; before that, the last "\r" starts what stays on screen.
        .map(|l| {
            let l = l.trim_end_matches('\r');
            l.rsplit('\r').next().unwrap_or("").trim_end().to_string()
        })
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn a_person_at_a_terminal_gets_a_header_aligned_epoch_lines_and_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let text = on_a_terminal(&run, &[], &[]);
    let lines = screen_lines(&text);
    let all = lines.join("\n");
    // The header: the job, its workers, the backend (local CPU workers default to tcp), the
    // device and the run directory.
    let job = lines.iter().find(|l| l.starts_with("job ")).expect(&all);
    assert!(job.contains("mlp") && job.contains("1 epoch"), "{job}");
    let workers = lines
        .iter()
        .find(|l| l.starts_with("workers "))
        .expect(&all);
    assert!(
        workers.contains("2 local")
            && workers.contains("backend tcp")
            && workers.contains("device cpu"),
        "{workers}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("run ") && l.ends_with(&run.display().to_string())),
        "{all}"
    );
    // The whole configuration is in the run directory, not on the screen (unless -v).
    assert!(!all.contains("# effective configuration"), "{all}");
    // One epoch line, without timestamp, level or module path, with the figures of metrics.jsonl.
    let epoch = lines
        .iter()
        .find(|l| l.starts_with("epoch 1/1  train loss"))
        .expect(&all);
    let m = &metrics(&run)[0];
    let acc = m["test_accuracy"].as_f64().unwrap() * 100.0;
    assert!(epoch.contains(&format!("test acc {acc:>6.2}%")), "{epoch}");
    for noise in ["INFO", "lockstep_coordinator", "::", "2026-", "Z "] {
        assert!(!epoch.contains(noise), "{noise:?} in {epoch:?}");
    }
    // The summary: a table of the epochs, the final line and what to do next.
    let table = lines
        .iter()
        .position(|l| l.trim_start().starts_with("epoch  train loss"))
        .expect(&all);
    assert!(lines[table + 1].trim_start().starts_with("1 "), "{all}");
    let done = lines
        .iter()
        .find(|l| l.starts_with("done in "))
        .expect(&all);
    assert!(
        done.contains(&format!(
            "test accuracy {acc:.2}% (best {acc:.2}%, epoch 1)"
        )),
        "{done}"
    );
    assert!(all.contains("next"), "{all}");
    assert!(all.contains("model.safetensors"), "{all}");
    // Nothing wraps at 120 columns: the progress bar's frames included (each frame is drawn
    // after a carriage return or a cursor movement, padded to the terminal's width).
    let widest = text
        .split(['\r', '\n'])
        .flat_map(|frame| frame.split("\x1b["))
        .map(|piece| piece.trim_start_matches(|c: char| c.is_ascii_digit() || c == ';'))
        .map(|piece| piece.chars().count().saturating_sub(1))
        .max()
        .unwrap_or(0);
    assert!(
        widest <= 120,
        "a line of {widest} columns on a 120-column terminal"
    );
    // Colour, since the terminal takes it and NO_COLOR is not set.
    assert!(
        colour_sequences(&text) > 0,
        "no colour on a colour terminal"
    );
    // Nothing went to the log files' format.
    assert!(!all.contains(" INFO "), "{all}");
}

#[test]
fn no_color_takes_the_colour_out_of_the_terminal_output() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let text = on_a_terminal(&run, &[], &[("NO_COLOR", "1")]);
    assert_eq!(colour_sequences(&text), 0, "{text:?}");
    assert!(screen_lines(&text)
        .iter()
        .any(|l| l.starts_with("done in ")));
}

#[test]
fn quiet_prints_the_final_line_alone() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // On a terminal: no header, no bar, no epoch lines, no table.
    let text = on_a_terminal(&run, &["-q"], &[]);
    let lines = screen_lines(&text);
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].starts_with("done in "), "{lines:?}");
    // Off a terminal too, where it is a log line.
    let run = dir.path().join("piped");
    let out = run_with_limit(short_job(&mut train_command(&run)).arg("-q"), LIMIT);
    let err = stderr_of(&out);
    assert!(out.status.success(), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("done in "), "{err}");
}

#[test]
fn off_a_terminal_the_lines_are_timestamped_and_the_configuration_is_printed() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let out = run_with_limit(short_job(&mut train_command(&run)), LIMIT);
    let err = stderr_of(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("# effective configuration"), "{err}");
    assert!(err.contains("loaded MNIST"), "{err}");
    let epoch = err
        .lines()
        .find(|l| l.contains("epoch 1/1  train loss"))
        .expect(&err);
    // 2026-12-02T15:32:49.123456Z  INFO lockstep_coordinator::engine: epoch 1/1 ...
    assert!(
        epoch.as_bytes()[4] == b'-' && epoch.contains("Z "),
        "{epoch}"
    );
    assert!(epoch.contains(" INFO lockstep_coordinator"), "{epoch}");
    assert_eq!(colour_sequences(&err), 0, "{err}");
    assert!(
        err.lines().last().unwrap_or("").contains("done in "),
        "{err}"
    );
}

#[test]
fn json_logs_are_one_object_per_line_with_the_figures_of_metrics_jsonl() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // Through the environment, as the container deployments set it.
    let out = run_with_limit(
        train_command(&run)
            .args(["--epochs", "2", "--workers", "2"])
            .env("LOCKSTEP_TRAIN_SAMPLES", "6000")
            .env("LOCKSTEP_LOG_FORMAT", "json"),
        LIMIT,
    );
    let err = stderr_of(&out);
    assert!(out.status.success(), "{err}");
    let events: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let of = |kind: &str| -> Vec<&serde_json::Value> {
        events.iter().filter(|e| e["event"] == kind).collect()
    };
    for e in &events {
        assert!(
            e["timestamp"].is_string() && e["level"].is_string() && e["message"].is_string(),
            "{e}"
        );
    }
    let config = of("config");
    assert_eq!(config.len(), 1);
    assert!(config[0]["config"].as_str().unwrap().contains("epochs = 2"));
    let epochs = of("epoch");
    let written = metrics(&run);
    assert_eq!(epochs.len(), 2, "{err}");
    assert_eq!(written.len(), 2);
    for (e, m) in epochs.iter().zip(&written) {
        for field in [
            "epoch",
            "train_loss",
            "train_accuracy",
            "test_loss",
            "test_accuracy",
            "epoch_seconds",
            "samples_per_second",
            "workers",
        ] {
            assert_eq!(e[field], m[field], "{field}: {e} against {m}");
        }
    }
    assert!(!of("progress").is_empty(), "{err}");
    let joined = of("joined");
    let mut ranks: Vec<u64> = joined.iter().map(|e| e["rank"].as_u64().unwrap()).collect();
    ranks.sort();
    assert_eq!(ranks, [0, 1], "{err}");
    let done = of("done");
    assert_eq!(done.len(), 1);
    assert_eq!(done[0]["test_accuracy"], written[1]["test_accuracy"]);
    assert_eq!(done[0]["run_dir"], run.display().to_string());
}

#[test]
fn a_worker_logs_json_too_and_ends_with_its_error_as_an_object() {
    let out = run_with_limit(
        Command::new(lockstep_tests::worker())
            .args([
                "--coordinator",
                "http://127.0.0.1:9",
                "--connect-timeout",
                "1",
            ])
            .args(["--log-format", "json"])
            .env("LOCKSTEP_TOKEN", "t")
            .env_remove("RUST_LOG"),
        Duration::from_secs(60),
    );
    let err = stderr_of(&out);
    assert!(!out.status.success());
    let last: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let end = last.last().expect("some output");
    assert_eq!(end["level"], "ERROR");
    assert_eq!(end["event"], "failed");
    // The error keeps its wording.
    assert!(
        end["message"].as_str().unwrap().contains("127.0.0.1:9"),
        "{end}"
    );
}

#[test]
fn a_bad_log_format_is_refused_naming_the_choices() {
    let out = run_with_limit(
        Command::new(lockstep()).args(["check-config", "--log-format", "xml"]),
        Duration::from_secs(30),
    );
    let err = stderr_of(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("xml") && err.contains("json") && err.contains("plain"),
        "{err}"
    );
}
