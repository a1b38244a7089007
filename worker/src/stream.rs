//! The network side of the step loop: opens the bidirectional `Train` stream, forwards
//! batches and reduced gradients to the compute thread, sends what the compute thread
//! produces, and keeps a heartbeat going so the coordinator can tell a slow step from a dead
//! worker.

use std::sync::mpsc as std_mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use lockstep_common::wire::pb;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::session::Client;

/// How the step stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The coordinator finished the job.
    Finished,
    /// The coordinator stopped the job, with its reason.
    Aborted(String),
    /// The connection to the coordinator broke.
    Lost(String),
}

/// The compute thread's ends of the step stream.
pub struct StepChannels {
    /// Batches, in step order.
    pub batches: std_mpsc::Receiver<pb::Batch>,
    /// Reduced gradients, in step order.
    pub reduced: std_mpsc::Receiver<pb::Reduced>,
    /// NCCL unique ids relayed by the coordinator (NCCL mode, ranks other than 0).
    pub nccl_ids: std_mpsc::Receiver<pb::NcclId>,
    /// Messages to the coordinator.
    pub out: mpsc::UnboundedSender<pb::WorkerMessage>,
}

impl StepChannels {
    /// Queues a message for the coordinator; false once the stream is gone.
    pub fn send(&self, kind: pb::worker_message::Kind) -> bool {
        self.out
            .send(pb::WorkerMessage { kind: Some(kind) })
            .is_ok()
    }
}

/// Opens the step stream for `rank`; the returned task ends with the stream's [`Outcome`].
pub async fn open(
    client: &mut Client,
    rank: u32,
    membership_epoch: u64,
    heartbeat: Duration,
) -> Result<(StepChannels, JoinHandle<Outcome>)> {
    let (out_tx, out_rx) = mpsc::unbounded_channel::<pb::WorkerMessage>();
    out_tx
        .send(pb::WorkerMessage {
            kind: Some(pb::worker_message::Kind::Hello(pb::Hello {
                rank,
                membership_epoch,
            })),
        })
        .expect("receiver alive");
    let response = client
        .train(UnboundedReceiverStream::new(out_rx))
        .await
        .context("opening the step stream")?;
    let mut inbound = response.into_inner();

    let beat = out_tx.clone();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(heartbeat);
        loop {
            ticker.tick().await;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            let msg = pb::WorkerMessage {
                kind: Some(pb::worker_message::Kind::Heartbeat(pb::Heartbeat {
                    sent_unix_ms: now,
                })),
            };
            if beat.send(msg).is_err() {
                break;
            }
        }
    });

    let (batch_tx, batch_rx) = std_mpsc::channel();
    let (reduced_tx, reduced_rx) = std_mpsc::channel();
    let (nccl_tx, nccl_rx) = std_mpsc::channel();
    let reader = tokio::spawn(async move {
        use pb::coordinator_message::Kind;
        loop {
            match inbound.message().await {
                Ok(Some(msg)) => {
                    let delivered = match msg.kind {
                        Some(Kind::Batch(b)) => batch_tx.send(b).is_ok(),
                        Some(Kind::Reduced(r)) => reduced_tx.send(r).is_ok(),
                        Some(Kind::NcclId(id)) => nccl_tx.send(id).is_ok(),
                        Some(Kind::Finish(_)) => return Outcome::Finished,
                        Some(Kind::Abort(a)) => return Outcome::Aborted(a.reason),
                        Some(other) => {
                            tracing::debug!("ignoring {other:?}");
                            true
                        }
                        None => true,
                    };
                    if !delivered {
                        return Outcome::Lost("the compute thread stopped".into());
                    }
                }
                Ok(None) => return Outcome::Lost("the coordinator closed the step stream".into()),
                Err(status) => {
                    return Outcome::Lost(format!("step stream broke: {}", status.message()))
                }
            }
        }
    });
    Ok((
        StepChannels {
            batches: batch_rx,
            reduced: reduced_rx,
            nccl_ids: nccl_rx,
            out: out_tx,
        },
        reader,
    ))
}
