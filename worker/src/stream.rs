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
    /// The compute thread stopped taking what the coordinator sent (its result says why).
    ComputeStopped,
}

/// The compute thread's ends of the step stream.
pub struct StepChannels {
    /// Batches, in step order.
    pub batches: std_mpsc::Receiver<pb::Batch>,
    /// Reduced gradients, in step order.
    pub reduced: std_mpsc::Receiver<pb::Reduced>,
    /// Rank 0's rendezvous, relayed by the coordinator (collective modes, ranks other than 0).
    pub rendezvous: std_mpsc::Receiver<pb::Rendezvous>,
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

    /// The collective bootstrap: rank 0 sends `own` (its rendezvous) to the coordinator, and
    /// gets it back; every other rank waits up to `timeout` for rank 0's, relayed.
    pub fn rendezvous(
        &self,
        rank: u32,
        own: Option<Vec<u8>>,
        timeout: Duration,
    ) -> anyhow::Result<Vec<u8>> {
        if rank == 0 {
            let own = own.context("rank 0 must bring its rendezvous")?;
            let kind = pb::worker_message::Kind::Rendezvous(pb::Rendezvous {
                id: own.clone().into(),
            });
            anyhow::ensure!(
                self.send(kind),
                "the step stream closed before the collective started"
            );
            return Ok(own);
        }
        match self.rendezvous.recv_timeout(timeout) {
            Ok(r) => Ok(r.id.to_vec()),
            Err(std_mpsc::RecvTimeoutError::Timeout) => anyhow::bail!(
                "rank 0's rendezvous did not arrive within {}s",
                timeout.as_secs()
            ),
            Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                anyhow::bail!("the step stream closed before rank 0's rendezvous arrived")
            }
        }
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
    let (rendezvous_tx, rendezvous_rx) = std_mpsc::channel();
    let reader = tokio::spawn(async move {
        use pb::coordinator_message::Kind;
        loop {
            match inbound.message().await {
                Ok(Some(msg)) => {
                    let delivered = match msg.kind {
                        Some(Kind::Batch(b)) => batch_tx.send(b).is_ok(),
                        Some(Kind::Reduced(r)) => reduced_tx.send(r).is_ok(),
                        Some(Kind::Rendezvous(r)) => rendezvous_tx.send(r).is_ok(),
                        Some(Kind::Finish(_)) => return Outcome::Finished,
                        Some(Kind::Abort(a)) => return Outcome::Aborted(a.reason),
                        Some(other) => {
                            tracing::debug!("ignoring {other:?}");
                            true
                        }
                        None => true,
                    };
                    if !delivered {
                        return Outcome::ComputeStopped;
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
            rendezvous: rendezvous_rx,
            out: out_tx,
        },
        reader,
    ))
}
