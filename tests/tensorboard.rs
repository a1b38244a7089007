//! TensorBoard event files, read back by TensorBoard's own `EventAccumulator` (from PyPI, in
//! the test venv) after real runs: every epoch's scalars equal `metrics.jsonl`, step scalars sit
//! at multiples of `tensorboard_every_steps`, the configuration is there as text, and an
//! interrupted and resumed run reads as one run.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lockstep_tests::*;
use serde_json::Value;

/// The TensorBoard release these tests read with.
const TENSORBOARD: &str = "tensorboard==2.21.0";

/// Prints, as JSON, what TensorBoard reads from the folder `argv[1]` as one run (`run`) and
/// from each event file in it alone (`each`, in name order): scalars as `[step, value]` and
/// text as `[step, markdown]`, by tag, everything kept (no sampling).
const READER: &str = r#"
import json, os, sys
from tensorboard.backend.event_processing import event_accumulator as ea

def load(path):
    acc = ea.EventAccumulator(path, size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()
    return {
        "scalars": {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags[ea.SCALARS]},
        "text": {
            t: [[e.step, e.tensor_proto.string_val[0].decode()] for e in acc.Tensors(t)]
            for t in tags[ea.TENSORS]
        },
    }

folder = sys.argv[1]
files = sorted(f for f in os.listdir(folder) if "tfevents" in f)
print(json.dumps({
    "files": files,
    "run": load(folder),
    "each": [load(os.path.join(folder, f)) for f in files],
}))
"#;

/// What TensorBoard reads from `run`'s `tensorboard/` folder (see [`READER`]).
fn read_with_tensorboard(run: &Path) -> Value {
    let python = python_with(&[TENSORBOARD]);
    let out = Command::new(python)
        .args(["-c", READER])
        .arg(run.join("tensorboard"))
        .output()
        .expect("running the TensorBoard reader");
    assert!(
        out.status.success(),
        "the TensorBoard reader failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the reader prints JSON")
}

/// The steps of `tag`'s scalars in `view` (`run` or one of `each`).
fn steps(view: &Value, tag: &str) -> Vec<u64> {
    view["scalars"][tag]
        .as_array()
        .unwrap_or_else(|| panic!("no scalars tagged {tag}"))
        .iter()
        .map(|p| p[0].as_u64().unwrap())
        .collect()
}

/// `[(step, value)]` of `tag`'s scalars in `view` (TensorBoard's values are f32).
fn points(view: &Value, tag: &str) -> Vec<(u64, f32)> {
    view["scalars"][tag]
        .as_array()
        .unwrap_or_else(|| panic!("no scalars tagged {tag}"))
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap() as f32))
        .collect()
}

/// Each epoch tag and the `metrics.jsonl` key it holds.
const EPOCH_TAGS: [(&str, &str); 10] = [
    ("epoch/train_loss", "train_loss"),
    ("epoch/train_accuracy", "train_accuracy"),
    ("epoch/test_loss", "test_loss"),
    ("epoch/test_accuracy", "test_accuracy"),
    ("epoch/samples_per_second", "samples_per_second"),
    ("epoch/seconds", "epoch_seconds"),
    ("epoch/eval_seconds", "eval_seconds"),
    ("epoch/workers", "workers"),
    ("epoch/membership_changes", "membership_changes"),
    ("epoch/bytes_per_step", "bytes_per_step"),
];

/// Asserts that TensorBoard's `run` view holds each epoch of `metrics.jsonl` once, at step =
/// the epoch, equal to it to f32 precision.
fn assert_epochs_match_metrics(view: &Value, run: &Path) {
    let lines = metrics(run);
    assert!(!lines.is_empty());
    for (tag, key) in EPOCH_TAGS {
        let expected: Vec<(u64, f32)> = lines
            .iter()
            .map(|m| {
                let v = m[key].as_f64().unwrap_or_else(|| panic!("{key} in {m}"));
                (m["epoch"].as_u64().unwrap(), v as f32)
            })
            .collect();
        assert_eq!(points(view, tag), expected, "{tag} against metrics.jsonl");
    }
}

/// The configuration texts TensorBoard shows, as `(step, markdown)`.
fn config_texts(view: &Value) -> Vec<(u64, String)> {
    view["text"]["config"]
        .as_array()
        .expect("a `config` text")
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn a_run_logs_its_configuration_epochs_and_steps_for_tensorboard() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // 6,000 samples in batches of 100: 60 steps an epoch, 120 in all; a step interval that
    // does not divide the epoch, so that windows straddle its end.
    run_ok(
        train_command(&run)
            .args(["--preset", "softmax", "--epochs", "2", "--workers", "2"])
            .env("LOCKSTEP_TRAIN_SAMPLES", "6000")
            .env("LOCKSTEP_TENSORBOARD_EVERY_STEPS", "7"),
        Duration::from_secs(120),
        "training",
    );
    let tb = read_with_tensorboard(&run);
    assert_eq!(tb["files"].as_array().unwrap().len(), 1, "{}", tb["files"]);
    let view = &tb["run"];
    assert_epochs_match_metrics(view, &run);

    let every_7: Vec<u64> = (7..=120).step_by(7).collect();
    for tag in [
        "step/loss",
        "step/samples_per_second",
        "step/seconds",
        "worker/0/compute_seconds",
        "worker/0/wait_seconds",
        "worker/0/apply_seconds",
        "worker/1/compute_seconds",
    ] {
        assert_eq!(steps(view, tag), every_7, "{tag}");
        assert!(
            points(view, tag)
                .iter()
                .all(|(_, v)| v.is_finite() && *v >= 0.0),
            "{tag}: {}",
            view["scalars"][tag]
        );
    }
    let loss = points(view, "step/loss");
    assert!(
        loss[0].1 > 1.0 && loss.last().unwrap().1 < 0.7 * loss[0].1,
        "the loss falls as training goes: {loss:?}"
    );
    assert!(points(view, "step/samples_per_second")
        .iter()
        .all(|(_, v)| *v > 0.0));

    let config = config_texts(view);
    assert_eq!(config.len(), 1, "{config:?}");
    let (step, markdown) = &config[0];
    assert_eq!(*step, 0);
    assert!(markdown.starts_with("```toml\n"), "{markdown}");
    assert!(markdown.contains("preset = \"softmax\""), "{markdown}");
    assert!(
        markdown.contains("tensorboard_every_steps = 7"),
        "{markdown}"
    );
    assert!(markdown.contains("train_samples = 6000"), "{markdown}");
}

#[test]
fn an_interrupted_and_resumed_run_reads_as_one_run_in_tensorboard() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    // 32,000 samples in batches of 64: 500 steps an epoch (about a second here), interrupted
    // 50 steps into the second. Checkpoints only at epoch ends, so the resume starts again at
    // global step 501, and the interrupted process will have logged steps past it.
    let mut job = Running::start(
        train_command(&run)
            .args(["--preset", "mlp", "--epochs", "2", "--workers", "2"])
            .env("LOCKSTEP_TRAIN_SAMPLES", "32000")
            .env("LOCKSTEP_CHECKPOINT_EVERY_STEPS", "0")
            .env("LOCKSTEP_TENSORBOARD_EVERY_STEPS", "5"),
    );
    job.wait_for("epoch 2/2 step 50/500", Duration::from_secs(120));
    signal(job.child.id(), libc::SIGTERM);
    let (status, log) = job.finish(Duration::from_secs(30));
    assert!(!status.success(), "{log}");
    assert!(!run.join("summary.json").exists(), "{log}");
    run_ok(
        &mut resume_command(&run),
        Duration::from_secs(120),
        "resume",
    );

    let tb = read_with_tensorboard(&run);
    let files = tb["files"].as_array().unwrap();
    assert_eq!(files.len(), 2, "one event file per process: {files:?}");
    let (first, second) = (&tb["each"][0], &tb["each"][1]);
    // The interrupted process flushed what it had logged, past the resume point.
    let first_steps = steps(first, "step/loss");
    assert!(
        first_steps.iter().any(|&s| s >= 550),
        "the interrupted process's file ends at {first_steps:?}"
    );
    assert_eq!(
        steps(second, "step/loss"),
        (505..=1000).step_by(5).collect::<Vec<u64>>(),
        "the resumed process logs from global step 501 on"
    );
    // TensorBoard drops the steps the resumed process trained again: every step once.
    let view = &tb["run"];
    assert_eq!(
        steps(view, "step/loss"),
        (5..=1000).step_by(5).collect::<Vec<u64>>()
    );
    // Epoch 1 from the first file, epoch 2 from the second, each at its number.
    assert_eq!(steps(first, "epoch/test_loss"), [1]);
    assert_eq!(steps(second, "epoch/test_loss"), [2]);
    assert_epochs_match_metrics(view, &run);
    // Each process's configuration.
    let config = config_texts(view);
    assert_eq!(
        config.iter().map(|(step, _)| *step).collect::<Vec<_>>(),
        [0, 0]
    );
}

#[test]
fn a_tensorboard_folder_that_cannot_be_written_is_reported_once_and_training_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("tensorboard"), "a file where the folder would be").unwrap();
    let log = run_ok(
        train_command(&run)
            .args(["--preset", "softmax", "--epochs", "1", "--workers", "1"])
            .env("LOCKSTEP_TRAIN_SAMPLES", "1000")
            .env("LOCKSTEP_TENSORBOARD_EVERY_STEPS", "1"),
        Duration::from_secs(120),
        "training",
    );
    assert_eq!(
        log.matches("cannot write TensorBoard's event file").count(),
        1,
        "{log}"
    );
    assert!(
        log.contains(&run.join("tensorboard").display().to_string()),
        "the warning names the folder:\n{log}"
    );
    assert_eq!(metrics(&run).len(), 1);
    assert!(run.join("summary.json").exists());
}
