//! Progress of long work: a bar per epoch with samples/s and loss for a person at a terminal,
//! `progress` events (every tenth of an epoch) in plain and JSON logs.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use lockstep_common::logging;

/// Progress display for one epoch.
pub struct EpochProgress {
    bar: Option<ProgressBar>,
    epoch: u64,
    epochs: u64,
    steps: u64,
    started: Instant,
    next_log: u64,
}

impl EpochProgress {
    /// Starts the display for epoch `epoch` (from 1) of `epochs`, with `steps` steps.
    pub fn start(epoch: u64, epochs: u64, steps: u64) -> Self {
        let bar = (logging::output().for_people() && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(steps);
            bar.set_style(
                ProgressStyle::with_template(
                    // The bar takes what the terminal has left, so the line never wraps.
                    "epoch {prefix} [{wide_bar}] {pos}/{len}  {msg}  eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(format!("{epoch}/{epochs}"));
            logging::hold_bar(Some(bar.clone()));
            bar
        });
        Self {
            bar,
            epoch,
            epochs,
            steps,
            started: Instant::now(),
            next_log: steps.div_ceil(10),
        }
    }

    /// Starts the display for an epoch resumed after `done` of its steps.
    pub fn resume(epoch: u64, epochs: u64, steps: u64, done: u64) -> Self {
        let mut p = Self::start(epoch, epochs, steps);
        while p.next_log <= done {
            p.next_log += steps.div_ceil(10);
        }
        if let Some(bar) = &p.bar {
            bar.set_position(done);
        }
        p
    }

    /// Records that `done` steps of the epoch are applied, with `samples` samples seen, the
    /// running mean loss, the workers taking part and the membership changes of the epoch.
    pub fn update(&mut self, done: u64, samples: u64, loss: f64, workers: usize, changes: u64) {
        let rate = samples as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        let membership = match changes {
            0 => format!("{workers} workers"),
            n => format!("{workers} workers ({n} membership changes)"),
        };
        match &self.bar {
            Some(bar) => {
                if done.is_multiple_of(16) || done == self.steps {
                    bar.set_position(done);
                    let mut msg = format!("{} samples/s  loss {loss:.4}", logging::rate(rate));
                    if changes > 0 {
                        msg.push_str(&format!("  {membership}"));
                    }
                    bar.set_message(msg);
                }
            }
            None => {
                if done >= self.next_log {
                    tracing::info!(
                        event = "progress",
                        epoch = self.epoch,
                        epochs = self.epochs,
                        step = done,
                        steps = self.steps,
                        samples_per_second = rate,
                        train_loss = loss,
                        workers,
                        membership_changes = changes,
                        "epoch {}/{} step {done}/{} {rate:.0} samples/s loss {loss:.4} {membership}",
                        self.epoch,
                        self.epochs,
                        self.steps
                    );
                    while self.next_log <= done {
                        self.next_log += self.steps.div_ceil(10);
                    }
                }
            }
        }
    }

    /// Ends the display.
    pub fn finish(self) {}
}

impl Drop for EpochProgress {
    /// Clears the bar however the epoch ends (an error included), so that later lines are not
    /// written around a bar that is gone.
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            logging::hold_bar(None);
            bar.finish_and_clear();
        }
    }
}
