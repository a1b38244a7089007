//! Progress of long work: a bar per epoch with samples/s and loss on a terminal, plain log
//! lines (every tenth of an epoch) when stderr is not a terminal.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

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
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(steps);
            bar.set_style(
                ProgressStyle::with_template(
                    "epoch {prefix} [{bar:30}] {pos}/{len} steps {elapsed_precise} {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(format!("{epoch}/{epochs}"));
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

    /// Records that `done` steps of the epoch are applied, with `samples` samples seen and
    /// the running mean loss.
    pub fn update(&mut self, done: u64, samples: u64, loss: f64) {
        let rate = samples as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        match &self.bar {
            Some(bar) => {
                if done.is_multiple_of(16) || done == self.steps {
                    bar.set_position(done);
                    bar.set_message(format!("{rate:.0} samples/s loss {loss:.4}"));
                }
            }
            None => {
                if done >= self.next_log {
                    tracing::info!(
                        "epoch {}/{} step {done}/{} {rate:.0} samples/s loss {loss:.4}",
                        self.epoch,
                        self.epochs,
                        self.steps
                    );
                    self.next_log += self.steps.div_ceil(10);
                }
            }
        }
    }

    /// Ends the display.
    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}
