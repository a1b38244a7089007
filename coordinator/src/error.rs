//! Why a worker was lost, and why a job stopped, as types: the engine decides what to do from
//! the kind (carry on, regroup, stop), never from the text of a message; the text is for people,
//! and says what happened, to whom, where, and what to do.

use std::fmt;
use std::path::PathBuf;

use lockstep_common::protocol::StepId;

/// Why the job lost a worker.
#[derive(Clone, Debug, PartialEq)]
pub enum Cause {
    /// Its step stream ended or broke (process killed, connection lost).
    StreamClosed(String),
    /// Nothing arrived from it for longer than the heartbeat timeout (frozen, partitioned).
    Silent {
        /// How long it was silent, in milliseconds.
        silent_ms: u64,
        /// `cluster.heartbeat_timeout_ms`.
        limit_ms: u64,
    },
    /// Its heartbeats came, but its part of a step did not within `cluster.step_timeout_s`.
    Stalled {
        /// `cluster.step_timeout_s`.
        limit_s: u64,
    },
    /// A local worker process exited (status and the tail of its log).
    Exited(String),
    /// It left on purpose, with its reason (a signal, a local error).
    Left(String),
    /// It sent something that breaks the protocol or does not fit the job.
    Malformed(String),
    /// Its parameter digest differs from the reference: its replica diverged.
    Diverged {
        /// The step after which the digests were compared.
        at: StepId,
        /// Its digest.
        theirs: String,
        /// The reference digest.
        reference: String,
    },
    /// It did not answer a pause of its membership in time.
    Unresponsive(String),
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::StreamClosed(reason) => write!(f, "failed ({reason})"),
            Cause::Silent {
                silent_ms,
                limit_ms,
            } => write!(
                f,
                "sent nothing for {:.1}s (heartbeat timeout {:.1}s)",
                *silent_ms as f64 / 1000.0,
                *limit_ms as f64 / 1000.0
            ),
            Cause::Stalled { limit_s } => write!(
                f,
                "stalled: no report for {limit_s}s (cluster.step_timeout_s), although its heartbeats still come"
            ),
            Cause::Exited(detail) => write!(f, "exited ({detail})"),
            Cause::Left(reason) => write!(f, "left ({reason})"),
            Cause::Malformed(what) => write!(f, "was dropped: {what}"),
            Cause::Diverged {
                at,
                theirs,
                reference,
            } => write!(
                f,
                "diverged: after {at} its parameters/optimizer state digest is {theirs}, the reference is \
                 {reference}; replicas must be bit-identical"
            ),
            Cause::Unresponsive(what) => write!(f, "did not answer {what} in time"),
        }
    }
}

/// A worker the job lost.
#[derive(Clone, Debug, PartialEq)]
pub struct Lost {
    /// Who: `worker rank 1 (host/pid 42 at 127.0.0.1:5555)`.
    pub who: String,
    /// Why.
    pub cause: Cause,
    /// The step the job was at.
    pub at: Option<Here>,
}

impl fmt::Display for Lost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.who, self.cause)?;
        if let Some(here) = self.at {
            write!(f, " during {here}")?;
        }
        Ok(())
    }
}

/// A position of the job for people: `epoch 2 step 345/938`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Here {
    /// The step.
    pub id: StepId,
    /// Steps in its epoch.
    pub steps: u64,
}

impl fmt::Display for Here {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "epoch {} step {}/{}",
            self.id.epoch + 1,
            self.id.step + 1,
            self.steps
        )
    }
}

/// Why a job stopped.
#[derive(Debug)]
pub enum JobError {
    /// Fewer workers than `cluster.min_workers` are left; every lost worker is named.
    TooFewWorkers {
        /// Every worker the job lost, in order.
        lost: Vec<Lost>,
        /// Workers left.
        left: usize,
        /// `cluster.min_workers`.
        min: u32,
    },
    /// The model diverged (a non-finite gradient or parameters); no membership change helps.
    Diverged {
        /// What was seen, and from whom.
        reason: String,
        /// Where.
        at: Here,
    },
    /// Ctrl-C or SIGTERM.
    Interrupted(&'static str),
    /// The job could not get going (workers did not come, a collective could not be formed).
    Startup(String),
    /// Anything else (I/O, a checkpoint that could not be written).
    Other(anyhow::Error),
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobError::TooFewWorkers { lost, left, min } => {
                let names: Vec<String> = lost.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "{} ({left} worker(s) left, cluster.min_workers is {min})",
                    names.join("; ")
                )
            }
            JobError::Diverged { reason, at } => {
                write!(f, "the model diverged during {at}: {reason}")
            }
            JobError::Interrupted(signal) => write!(f, "interrupted by {signal}"),
            JobError::Startup(why) => f.write_str(why),
            JobError::Other(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for JobError {}

impl From<anyhow::Error> for JobError {
    fn from(e: anyhow::Error) -> Self {
        JobError::Other(e)
    }
}

/// A stopped job: the error, and what is left of the run.
#[derive(Debug)]
pub struct Stopped {
    /// Why.
    pub error: JobError,
    /// The newest checkpoint on disk, if any.
    pub checkpoint: Option<PathBuf>,
    /// The run directory.
    pub run: PathBuf,
}

impl fmt::Display for Stopped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}; training stopped, ", self.error)?;
        match &self.checkpoint {
            Some(p) => write!(f, "the last checkpoint, {}, is intact", p.display())?,
            None => f.write_str("no checkpoint was written yet")?,
        }
        if !matches!(self.error, JobError::Diverged { .. }) {
            write!(
                f,
                "; continue with `lockstep train --resume {}`",
                self.run.display()
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for Stopped {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_names_every_lost_worker_the_step_and_the_checkpoint() {
        let at = Some(Here {
            id: StepId::new(1, 344),
            steps: 938,
        });
        let stop = Stopped {
            error: JobError::TooFewWorkers {
                lost: vec![
                    Lost {
                        who: "worker rank 1 (h/pid 7 at 127.0.0.1:9)".into(),
                        cause: Cause::StreamClosed("the worker closed its stream".into()),
                        at,
                    },
                    Lost {
                        who: "worker rank 0 (h/pid 6 at 127.0.0.1:8)".into(),
                        cause: Cause::Silent {
                            silent_ms: 5200,
                            limit_ms: 5000,
                        },
                        at,
                    },
                ],
                left: 0,
                min: 1,
            },
            checkpoint: Some("runs/x/checkpoints/epoch-0001.safetensors".into()),
            run: "runs/x".into(),
        };
        assert_eq!(
            stop.to_string(),
            "worker rank 1 (h/pid 7 at 127.0.0.1:9) failed (the worker closed its stream) during epoch 2 step \
             345/938; worker rank 0 (h/pid 6 at 127.0.0.1:8) sent nothing for 5.2s (heartbeat timeout 5.0s) \
             during epoch 2 step 345/938 (0 worker(s) left, cluster.min_workers is 1); training stopped, the \
             last checkpoint, runs/x/checkpoints/epoch-0001.safetensors, is intact; continue with `lockstep \
             train --resume runs/x`"
        );
    }
}
