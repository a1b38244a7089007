//! TensorBoard's view of a run: an [`Observer`] that writes event files under
//! `RUN_DIR/tensorboard/`, for `tensorboard --logdir runs`.
//!
//! - At the start, the effective configuration as text (tag `config`, a TOML code block), at
//!   step 0.
//! - After every epoch, at step = the epoch number (from 1), the `metrics.jsonl` line as
//!   scalars: `epoch/train_loss`, `epoch/train_accuracy`, `epoch/test_loss`,
//!   `epoch/test_accuracy`, `epoch/samples_per_second`, `epoch/seconds` (training steps only),
//!   `epoch/eval_seconds`, `epoch/workers`, `epoch/membership_changes`, `epoch/bytes_per_step`.
//!   Accuracies are fractions, as in `metrics.jsonl`.
//! - Every `tensorboard_every_steps` global steps (0: never), at step = the global step (from
//!   1), the steps since the previous such write: `step/loss` (their mean training loss, over
//!   their samples), `step/samples_per_second`, `step/seconds` (mean wall time of a step), and
//!   for each worker rank that reported, `worker/<rank>/compute_seconds`,
//!   `worker/<rank>/wait_seconds` and `worker/<rank>/apply_seconds` (means per step; grpc
//!   workers report wait and apply one step late).
//!
//! Each process writes its own file, so a resumed run adds one to the folder. Its first step
//! also writes a `SessionLog.START` event at that global step: TensorBoard then drops what the
//! interrupted process had logged at that step or later (steps trained again), and the two
//! files read as one run. Epoch scalars sit below that step (an epoch's scalars are written
//! after its checkpoint, which the resume starts from or after), so they are kept.
//!
//! Writes are buffered and flushed at each epoch's end, at the end of the run, when dropped,
//! and at a step write when the buffer has held events for ten seconds. A folder or file that
//! cannot be written is logged once, naming it, and the run goes on without event files.

mod event_file;

use std::collections::BTreeMap;
use std::path::Path;

use lockstep_common::config::JobConfig;

use crate::observe::{Observer, StepRecord};
use crate::run_dir::{EpochMetrics, Summary};
use event_file::{event, scalar, text, EventFile, SessionLog, SESSION_START};

/// The run's TensorBoard event file.
pub struct TensorBoard {
    /// `None` once writing failed (and was logged).
    file: Option<EventFile>,
    /// Step scalars every this many global steps; 0: none.
    every: u64,
    /// The steps since the last step scalars.
    window: Window,
    /// Whether the restart marker was written (at the first step this process applies).
    started: bool,
}

impl TensorBoard {
    /// Opens a new event file in `run_dir/tensorboard` and writes `config` into it. Never
    /// fails: when the folder or file cannot be written, it says so once and does nothing.
    pub fn open(run_dir: &Path, config: &JobConfig) -> Self {
        let dir = run_dir.join("tensorboard");
        let mut sink = Self {
            file: None,
            every: u64::from(config.tensorboard_every_steps),
            window: Window::default(),
            started: false,
        };
        match EventFile::create(&dir) {
            Ok(file) => sink.file = Some(file),
            Err(e) => tracing::warn!(
                "cannot write TensorBoard's event files into {}: {e}; training goes on without them",
                dir.display()
            ),
        }
        let markdown = format!("```toml\n{}\n```", config.to_toml_string().trim_end());
        sink.write(event_with(0, vec![text("config", &markdown)]), true);
        sink
    }

    /// Where this process's events go, while they can be written.
    pub fn path(&self) -> Option<&Path> {
        self.file.as_ref().map(EventFile::path)
    }

    fn write(&mut self, event: event_file::Event, flush: bool) {
        let Some(file) = &mut self.file else {
            return;
        };
        let written = file
            .write(&event)
            .and_then(|()| if flush { file.flush() } else { Ok(()) });
        if let Err(e) = written {
            let path = file.path().to_path_buf();
            self.give_up(&path, &e);
        }
    }

    fn flush(&mut self) {
        let Some(file) = &mut self.file else {
            return;
        };
        if let Err(e) = file.flush() {
            let path = file.path().to_path_buf();
            self.give_up(&path, &e);
        }
    }

    /// Says once that the file at `path` failed with `error`; nothing is written after.
    fn give_up(&mut self, path: &Path, error: &std::io::Error) {
        self.file = None;
        tracing::warn!(
            "cannot write TensorBoard's event file {}: {error}; training goes on without it",
            path.display()
        );
    }
}

/// An event at `step` holding `values`.
fn event_with(step: u64, values: Vec<event_file::Value>) -> event_file::Event {
    event_file::Event {
        summary: Some(event_file::Summary { value: values }),
        ..event(step)
    }
}

impl Observer for TensorBoard {
    fn step(&mut self, record: &StepRecord) {
        if !self.started {
            self.started = true;
            let start = event_file::Event {
                session_log: Some(SessionLog {
                    status: SESSION_START,
                }),
                ..event(record.global_step)
            };
            self.write(start, false);
        }
        if self.every == 0 {
            return;
        }
        self.window.add(record);
        if record.global_step.is_multiple_of(self.every) {
            let values = std::mem::take(&mut self.window).values();
            self.write(event_with(record.global_step, values), false);
        }
    }

    fn epoch(&mut self, m: &EpochMetrics) {
        let values = [
            ("epoch/train_loss", m.train_loss),
            ("epoch/train_accuracy", m.train_accuracy),
            ("epoch/test_loss", m.test_loss),
            ("epoch/test_accuracy", m.test_accuracy),
            ("epoch/samples_per_second", m.samples_per_second),
            ("epoch/seconds", m.epoch_seconds),
            ("epoch/eval_seconds", m.eval_seconds),
            ("epoch/workers", f64::from(m.workers)),
            ("epoch/membership_changes", m.membership_changes as f64),
            ("epoch/bytes_per_step", m.bytes_per_step),
        ];
        let values = values.iter().map(|(tag, v)| scalar(tag, *v)).collect();
        self.write(event_with(m.epoch, values), true);
    }

    fn finished(&mut self, _summary: &Summary) {
        self.flush();
    }
}

impl Drop for TensorBoard {
    fn drop(&mut self) {
        self.flush();
    }
}

/// The steps since the last step scalars.
#[derive(Default)]
struct Window {
    steps: u64,
    samples: u64,
    /// Σ loss × samples, for the mean over samples.
    loss_sum: f64,
    seconds: f64,
    ranks: BTreeMap<u32, RankTimes>,
}

/// One rank's reported times in the window.
#[derive(Default)]
struct RankTimes {
    steps: u64,
    compute: f64,
    wait: f64,
    apply: f64,
}

impl Window {
    fn add(&mut self, r: &StepRecord) {
        self.steps += 1;
        self.samples += r.samples;
        self.loss_sum += r.loss * r.samples as f64;
        self.seconds += r.seconds;
        for t in &r.timings {
            let times = self.ranks.entry(t.rank).or_default();
            times.steps += 1;
            times.compute += t.compute_seconds;
            times.wait += t.wait_seconds;
            times.apply += t.apply_seconds;
        }
    }

    /// The window's scalars.
    fn values(self) -> Vec<event_file::Value> {
        let steps = self.steps.max(1) as f64;
        let mut values = vec![
            scalar("step/loss", self.loss_sum / self.samples.max(1) as f64),
            scalar(
                "step/samples_per_second",
                self.samples as f64 / self.seconds.max(1e-9),
            ),
            scalar("step/seconds", self.seconds / steps),
        ];
        for (rank, t) in self.ranks {
            let n = t.steps.max(1) as f64;
            values.push(scalar(
                &format!("worker/{rank}/compute_seconds"),
                t.compute / n,
            ));
            values.push(scalar(&format!("worker/{rank}/wait_seconds"), t.wait / n));
            values.push(scalar(&format!("worker/{rank}/apply_seconds"), t.apply / n));
        }
        values
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::WorkerTiming;
    use event_file::read_events;

    fn config(every: u32) -> JobConfig {
        JobConfig {
            tensorboard_every_steps: every,
            ..JobConfig::preset("softmax").unwrap()
        }
    }

    fn step(global_step: u64, loss: f64, samples: u64, seconds: f64) -> StepRecord {
        StepRecord {
            epoch: 1,
            step: global_step,
            steps_per_epoch: 100,
            global_step,
            samples,
            loss,
            seconds,
            timings: vec![WorkerTiming {
                rank: 1,
                compute_seconds: 0.5,
                wait_seconds: global_step as f64,
                apply_seconds: 0.0,
            }],
            ..StepRecord::default()
        }
    }

    /// The scalars of `e` by tag.
    fn scalars(e: &event_file::Event) -> BTreeMap<String, f32> {
        e.summary
            .iter()
            .flat_map(|s| &s.value)
            .filter_map(|v| Some((v.tag.clone(), v.simple_value?)))
            .collect()
    }

    #[test]
    fn the_configuration_epochs_and_windows_of_steps_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut tb = TensorBoard::open(dir.path(), &config(2));
        let path = tb.path().unwrap().to_path_buf();
        assert!(path.starts_with(dir.path().join("tensorboard")));
        tb.step(&step(5, 1.0, 10, 0.5));
        tb.step(&step(6, 4.0, 30, 1.5));
        tb.step(&step(7, 9.0, 10, 1.0));
        tb.epoch(&EpochMetrics {
            epoch: 1,
            test_accuracy: 0.875,
            workers: 2,
            ..EpochMetrics::default()
        });
        drop(tb);

        let events = read_events(&path);
        assert_eq!(events.len(), 5, "{events:#?}");
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        let config = &events[1].summary.as_ref().unwrap().value[0];
        assert_eq!((events[1].step, config.tag.as_str()), (0, "config"));
        let markdown = String::from_utf8(config.tensor.as_ref().unwrap().string_val[0].clone());
        let markdown = markdown.unwrap();
        assert!(markdown.starts_with("```toml\n"), "{markdown}");
        assert!(
            markdown.contains("tensorboard_every_steps = 2\n"),
            "{markdown}"
        );
        // The first step this process applies marks a (re)start there.
        assert_eq!(events[2].step, 5);
        assert_eq!(
            events[2].session_log.as_ref().unwrap().status,
            SESSION_START
        );
        // Steps 5 and 6: the loss is their mean over 40 samples, the rate 40 samples in 2 s.
        assert_eq!(events[3].step, 6);
        let s = scalars(&events[3]);
        assert_eq!(s["step/loss"], (10.0 + 120.0) / 40.0);
        assert_eq!(s["step/samples_per_second"], 20.0);
        assert_eq!(s["step/seconds"], 1.0);
        assert_eq!(s["worker/1/compute_seconds"], 0.5);
        assert_eq!(s["worker/1/wait_seconds"], 5.5);
        assert_eq!(s["worker/1/apply_seconds"], 0.0);
        // Step 7 waits for step 8; the epoch is at step = its number, zeros included.
        assert_eq!(events[4].step, 1);
        let e = scalars(&events[4]);
        assert_eq!(e.len(), 10);
        assert_eq!(e["epoch/test_accuracy"], 0.875);
        assert_eq!(e["epoch/workers"], 2.0);
        assert_eq!(e["epoch/membership_changes"], 0.0);
    }

    #[test]
    fn with_no_step_interval_only_epochs_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let mut tb = TensorBoard::open(dir.path(), &config(0));
        let path = tb.path().unwrap().to_path_buf();
        for s in 1..=4 {
            tb.step(&step(s, 1.0, 10, 0.5));
        }
        drop(tb);
        let tags: Vec<String> = read_events(&path)
            .iter()
            .flat_map(scalars)
            .map(|(tag, _)| tag)
            .collect();
        assert!(tags.is_empty(), "{tags:?}");
    }

    #[test]
    fn a_folder_that_cannot_be_created_is_reported_and_training_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tensorboard"), "a file, not a folder").unwrap();
        let mut tb = TensorBoard::open(dir.path(), &config(1));
        assert!(tb.path().is_none());
        tb.step(&step(1, 1.0, 10, 0.5));
        tb.epoch(&EpochMetrics::default());
        drop(tb);
    }

    #[test]
    fn a_file_that_stops_taking_writes_is_given_up_and_training_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut tb = TensorBoard::open(dir.path(), &config(1));
        let full = Path::new("/dev/full");
        let file = std::fs::OpenOptions::new().write(true).open(full).unwrap();
        tb.file = Some(EventFile::over(full, file));
        tb.step(&step(1, 1.0, 10, 0.5));
        assert!(tb.path().is_some(), "buffered, not yet written");
        tb.epoch(&EpochMetrics::default());
        assert!(tb.path().is_none(), "the failed flush gives the file up");
        tb.step(&step(2, 1.0, 10, 0.5));
        tb.epoch(&EpochMetrics::default());
        drop(tb);
    }
}
