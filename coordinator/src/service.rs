//! The coordinator's gRPC service: admission (`Join`), state transfer (`FetchState`,
//! `PushState`) and the per-worker step stream (`Train`). It owns no training logic: every
//! stream event is forwarded to the [`crate::engine`] as an [`Event`].

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::Stream;
use lockstep_common::codec::TensorSpec;
use lockstep_common::config::{Backend, JobConfig};
use lockstep_common::wire::{self, pb};
use lockstep_common::PROTOCOL_VERSION;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

/// Outbound half of a worker's step stream.
pub type WorkerTx = mpsc::Sender<Result<pb::CoordinatorMessage, Status>>;

/// What the service tells the engine.
#[derive(Debug)]
pub enum Event {
    /// Rank `rank` opened its step stream; the engine sends to it through `tx`.
    StreamOpened {
        /// The worker's rank.
        rank: u32,
        /// Where to send its messages.
        tx: WorkerTx,
    },
    /// A message arrived on a worker's stream.
    Message {
        /// The sender's rank.
        rank: u32,
        /// The message.
        msg: pb::WorkerMessage,
    },
    /// A worker's stream ended before the job did.
    StreamClosed {
        /// The worker's rank.
        rank: u32,
        /// Why, as far as the transport knows.
        reason: String,
    },
    /// A locally spawned worker process exited.
    ProcessExited {
        /// Index of the spawned worker (not necessarily its rank).
        index: usize,
        /// Its process id.
        pid: u32,
        /// Exit status and the tail of its log.
        detail: String,
    },
    /// The coordinator was asked to stop (Ctrl-C, SIGTERM).
    Interrupted(&'static str),
    /// Rank 0 uploaded its state (NCCL mode).
    StatePushed {
        /// The serialised state.
        bytes: Vec<u8>,
    },
}

/// A worker admitted by `Join`.
#[derive(Clone, Debug)]
pub struct Member {
    /// The worker's self-description (host/pid).
    pub worker_id: String,
    /// Its compute device.
    pub device: String,
    /// Peer address.
    pub peer: String,
    /// Process id the worker reported.
    pub pid: u32,
    /// Set once its step stream is open.
    pub streaming: bool,
    /// Milliseconds since the coordinator started when it was last heard from.
    pub last_seen_ms: Arc<AtomicU64>,
}

/// State shared between the service and the engine.
pub struct Shared {
    /// The effective job configuration.
    pub config: JobConfig,
    /// The same, serialised (what workers receive).
    pub config_toml: String,
    /// The flat parameter layout.
    pub layout: Vec<TensorSpec>,
    /// The serialised state a joining worker fetches.
    pub state_bytes: Mutex<Arc<Vec<u8>>>,
    /// Admitted workers, indexed by rank.
    pub members: Mutex<Vec<Member>>,
    /// Membership generation; every step message carries it.
    pub membership_epoch: u64,
    /// Start of the coordinator's clock for `last_seen_ms`.
    pub started: Instant,
    /// The engine's event queue.
    pub events: mpsc::UnboundedSender<Event>,
}

impl Shared {
    /// Milliseconds since start, the unit of `last_seen_ms`.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The rank of the admitted worker with process id `pid`, if any (local workers).
    pub fn rank_of_pid(&self, pid: u32) -> Option<u32> {
        let members = self.members.lock().expect("members lock");
        members.iter().position(|m| m.pid == pid).map(|r| r as u32)
    }

    /// A description of rank `rank` for error messages: `rank 1 (host:pid at 127.0.0.1:5555)`.
    pub fn describe(&self, rank: u32) -> String {
        let members = self.members.lock().expect("members lock");
        match members.get(rank as usize) {
            Some(m) => format!("worker rank {rank} ({} at {})", m.worker_id, m.peer),
            None => format!("worker rank {rank}"),
        }
    }
}

/// The tonic service implementation.
pub struct CoordinatorService {
    shared: Arc<Shared>,
}

impl CoordinatorService {
    /// A service over the shared state.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl wire::Coordinator for CoordinatorService {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinReply>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "unknown address".into());
        let req = request.into_inner();
        let s = &self.shared;
        if req.protocol_version != PROTOCOL_VERSION {
            tracing::warn!(
                "refused worker {} at {peer}: protocol version {}",
                req.worker_id,
                req.protocol_version
            );
            return Err(Status::failed_precondition(format!(
                "protocol version mismatch: this worker speaks version {}, the coordinator speaks version {}; \
                 run the same Lockstep release on both sides",
                req.protocol_version, PROTOCOL_VERSION
            )));
        }
        let ours = s.config.model_fingerprint();
        if !req.model_fingerprint.is_empty() && req.model_fingerprint != ours {
            tracing::warn!(
                "refused worker {} at {peer}: model {}",
                req.worker_id,
                req.model_description
            );
            return Err(Status::failed_precondition(format!(
                "model configuration mismatch: the worker was started for `{}` (fingerprint {}), the job trains `{}` \
                 (fingerprint {ours}); start the worker without a model setting, or with the job's",
                req.model_description,
                req.model_fingerprint,
                s.config.model.describe()
            )));
        }
        if s.config.backend == Backend::Nccl && !req.cuda_available {
            return Err(Status::failed_precondition(format!(
                "the job uses the nccl backend but worker {} has no CUDA device (device {}, or a build without the \
                 `cuda` feature)",
                req.worker_id, req.device
            )));
        }
        let mut members = s.members.lock().expect("members lock");
        if members.len() >= s.config.workers as usize {
            return Err(Status::resource_exhausted(format!(
                "the job already has its {} workers; this one ({}) is not needed",
                s.config.workers, req.worker_id
            )));
        }
        let rank = members.len() as u32;
        members.push(Member {
            worker_id: req.worker_id.clone(),
            device: req.device.clone(),
            peer: peer.clone(),
            pid: req.pid,
            streaming: false,
            last_seen_ms: Arc::new(AtomicU64::new(s.now_ms())),
        });
        tracing::info!(
            "worker {} ({}) at {peer} joined as rank {rank}",
            req.worker_id,
            req.device
        );
        Ok(Response::new(pb::JoinReply {
            rank,
            world_size: s.config.workers,
            membership_epoch: s.membership_epoch,
            job_config_toml: s.config_toml.clone(),
            layout: wire::layout_to_wire(&s.layout),
            state_version: 0,
            heartbeat_interval_ms: s.config.cluster.heartbeat_interval_ms,
            backend: s.config.backend.to_string(),
        }))
    }

    type FetchStateStream = BoxStream<pb::StateChunk>;

    async fn fetch_state(
        &self,
        _request: Request<pb::StateRequest>,
    ) -> Result<Response<Self::FetchStateStream>, Status> {
        let bytes = self.shared.state_bytes.lock().expect("state lock").clone();
        let chunks = wire::state_chunks(&bytes, 0, 0);
        Ok(Response::new(Box::pin(tokio_stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    type TrainStream = BoxStream<pb::CoordinatorMessage>;

    async fn train(
        &self,
        request: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::TrainStream>, Status> {
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the step stream must start with Hello"))?;
        let Some(pb::worker_message::Kind::Hello(hello)) = first.kind else {
            return Err(Status::invalid_argument(
                "the step stream must start with Hello",
            ));
        };
        let s = self.shared.clone();
        if hello.membership_epoch != s.membership_epoch {
            return Err(Status::failed_precondition(format!(
                "stale membership epoch {} (current {}): join again",
                hello.membership_epoch, s.membership_epoch
            )));
        }
        let last_seen = {
            let mut members = s.members.lock().expect("members lock");
            let Some(m) = members.get_mut(hello.rank as usize) else {
                return Err(Status::failed_precondition(format!(
                    "rank {} has not joined",
                    hello.rank
                )));
            };
            if m.streaming {
                return Err(Status::already_exists(format!(
                    "rank {} already has a step stream",
                    hello.rank
                )));
            }
            m.streaming = true;
            m.last_seen_ms.clone()
        };
        let rank = hello.rank;
        let (tx, rx) = mpsc::channel(64);
        let _ = s.events.send(Event::StreamOpened { rank, tx });
        tokio::spawn(async move {
            let reason = loop {
                match inbound.next().await {
                    Some(Ok(msg)) => {
                        last_seen.store(s.now_ms(), Ordering::Relaxed);
                        if matches!(msg.kind, Some(pb::worker_message::Kind::Heartbeat(_))) {
                            continue;
                        }
                        if s.events.send(Event::Message { rank, msg }).is_err() {
                            return;
                        }
                    }
                    Some(Err(status)) => break format!("stream error: {}", status.message()),
                    None => break "the worker closed its stream".to_string(),
                }
            };
            let _ = s.events.send(Event::StreamClosed { rank, reason });
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn push_state(
        &self,
        request: Request<Streaming<pb::StateChunk>>,
    ) -> Result<Response<pb::PushStateReply>, Status> {
        let mut inbound = request.into_inner();
        let mut asm = wire::StateAssembler::default();
        while let Some(chunk) = inbound.message().await? {
            asm.push(chunk).map_err(Status::invalid_argument)?;
        }
        let bytes = asm.finish().map_err(Status::invalid_argument)?;
        let _ = self.shared.events.send(Event::StatePushed { bytes });
        Ok(Response::new(pb::PushStateReply {}))
    }

    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveReply>, Status> {
        let req = request.into_inner();
        let _ = self.shared.events.send(Event::StreamClosed {
            rank: req.rank,
            reason: format!("the worker left: {}", req.reason),
        });
        Ok(Response::new(pb::LeaveReply {}))
    }
}
