//! The network side of the step loop: opens the bidirectional `Train` stream, converts what the
//! coordinator sends into the project's types (a malformed message ends the session with a
//! clear error), hands work and control messages to the compute thread in order, sends what the
//! compute thread produces, and keeps a heartbeat going so the coordinator can tell a slow step
//! from a dead worker. A `Pause`, the job's end or a broken connection trips the
//! [`AbortSignal`], so a compute thread blocked on a vanished peer is released.

use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use lockstep_common::protocol::{printable, FromCoordinator, FromWorker};
use lockstep_common::wire::pb;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::abort::AbortSignal;
use crate::session::Client;

/// How the step stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The coordinator finished the job.
    Finished,
    /// The coordinator stopped the job, or removed this worker from it, with its reason.
    Aborted(String),
    /// The connection to the coordinator broke.
    Lost(String),
    /// The coordinator sent something that does not follow the protocol.
    Malformed(String),
    /// The compute thread stopped taking what the coordinator sent (its result says why).
    ComputeStopped,
}

/// Messages to the coordinator, from any thread.
#[derive(Clone)]
pub struct Outbox(mpsc::UnboundedSender<pb::WorkerMessage>);

impl Outbox {
    /// Queues a message; false once the stream is gone.
    pub fn send(&self, msg: FromWorker) -> bool {
        self.0.send(msg.into()).is_ok()
    }

    /// An outbox whose messages land in the returned receiver (for tests).
    pub fn capture() -> (Self, mpsc::UnboundedReceiver<pb::WorkerMessage>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Self(tx), rx)
    }
}

/// The compute thread's ends of the step stream.
pub struct StepChannels {
    /// Work and control messages, in the order the coordinator sent them.
    pub inbox: std_mpsc::Receiver<FromCoordinator>,
    /// Rendezvous relayed by the coordinator, with their memberships.
    pub relayed: std_mpsc::Receiver<(Bytes, u64)>,
    /// Messages to the coordinator.
    pub out: Outbox,
}

/// Opens the step stream of admission `member`; the returned task ends with the stream's
/// [`Outcome`].
pub async fn open(
    client: &mut Client,
    member: u64,
    heartbeat: Duration,
    abort: AbortSignal,
) -> Result<(StepChannels, JoinHandle<Outcome>)> {
    let (out_tx, out_rx) = mpsc::unbounded_channel::<pb::WorkerMessage>();
    let out = Outbox(out_tx);
    out.send(FromWorker::Hello { member });
    let response = client
        .train(UnboundedReceiverStream::new(out_rx))
        .await
        .context("opening the step stream")?;
    let mut inbound = response.into_inner();

    let beat = out.clone();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(heartbeat);
        loop {
            ticker.tick().await;
            if !beat.send(FromWorker::Heartbeat) {
                break;
            }
        }
    });

    let (inbox_tx, inbox) = std_mpsc::channel();
    let (relay_tx, relayed) = std_mpsc::channel();
    let reader = tokio::spawn(async move {
        let outcome = loop {
            let msg = match inbound.message().await {
                Ok(Some(msg)) => msg,
                Ok(None) => break Outcome::Lost("the coordinator closed the step stream".into()),
                Err(status) => {
                    break Outcome::Lost(format!(
                        "step stream broke: {}",
                        printable(status.message())
                    ))
                }
            };
            let msg = match FromCoordinator::try_from(msg) {
                Ok(msg) => msg,
                Err(e) => break Outcome::Malformed(e.to_string()),
            };
            let delivered = match msg {
                FromCoordinator::Finish(_) => break Outcome::Finished,
                FromCoordinator::Abort(reason) => break Outcome::Aborted(reason),
                FromCoordinator::Rendezvous { blob, membership } => {
                    relay_tx.send((blob, membership)).is_ok()
                }
                pause @ FromCoordinator::Pause { .. } => {
                    abort.trip();
                    inbox_tx.send(pause).is_ok()
                }
                other => inbox_tx.send(other).is_ok(),
            };
            if !delivered {
                break Outcome::ComputeStopped;
            }
        };
        // Whatever ended the stream, the compute thread must not wait on a peer any longer.
        abort.trip();
        outcome
    });
    Ok((
        StepChannels {
            inbox,
            relayed,
            out,
        },
        reader,
    ))
}
