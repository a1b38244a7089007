//! The coordinator's gRPC service: admission (`Join`), state transfer (`FetchState`,
//! `PushState`), leaving (`Leave`) and the per-worker step stream (`Train`). It owns no training
//! logic: every request and stream event is converted into the project's checked types (a
//! message that does not follow the protocol becomes [`Event::Malformed`], never a panic) and
//! forwarded to the [`crate::engine`] as an [`Event`]. What only a member may do (stream, leave,
//! upload its state) is refused with an RPC error, and a warning naming the peer's address,
//! when the caller is not one; a step stream that does not say who it is within the heartbeat
//! timeout is refused too.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use lockstep_common::codec::TensorSpec;
use lockstep_common::config::{Backend, JobConfig};
use lockstep_common::protocol::{FromWorker, JoinRequest, Leave, ProtocolError};
use lockstep_common::wire::{self, pb};
use lockstep_common::PROTOCOL_VERSION;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::membership::{Joining, MemberId, Membership};

/// Outbound half of a worker's step stream.
pub type WorkerTx = mpsc::Sender<Result<pb::CoordinatorMessage, Status>>;

/// What the service tells the engine.
#[derive(Debug)]
pub enum Event {
    /// A member opened its step stream; the engine sends to it through `tx`.
    StreamOpened {
        /// The member.
        member: MemberId,
        /// Where to send its messages.
        tx: WorkerTx,
    },
    /// A message arrived on a member's stream.
    Message {
        /// The sender.
        member: MemberId,
        /// The message, checked at the boundary.
        msg: FromWorker,
    },
    /// A member sent something that does not follow the protocol.
    Malformed {
        /// The sender.
        member: MemberId,
        /// What was wrong.
        error: ProtocolError,
    },
    /// A member's stream ended before the job did.
    StreamClosed {
        /// The member.
        member: MemberId,
        /// Why, as far as the transport knows.
        reason: String,
    },
    /// A member left on purpose.
    Left {
        /// The member.
        member: MemberId,
        /// Its reason.
        reason: String,
    },
    /// A locally spawned worker process exited.
    ProcessExited {
        /// The launcher's slot (not necessarily its rank).
        index: usize,
        /// Its process id.
        pid: u32,
        /// Exit status and the tail of its log.
        detail: String,
    },
    /// The coordinator was asked to stop (Ctrl-C, SIGTERM).
    Interrupted(&'static str),
    /// A member uploaded its state (collective modes).
    StatePushed {
        /// The uploading member.
        member: MemberId,
        /// The version the coordinator asked for (0: after a step marked for upload).
        version: u64,
        /// The serialised state.
        bytes: Vec<u8>,
    },
}

/// Serialised training states that workers fetch, by version.
#[derive(Default)]
pub struct StateStore {
    versions: BTreeMap<u64, Arc<Vec<u8>>>,
    next: u64,
}

impl StateStore {
    /// How many recent versions are kept for workers that are still fetching.
    const KEEP: usize = 4;

    /// Stores a state; returns its version (never 0).
    pub fn put(&mut self, bytes: Vec<u8>) -> u64 {
        self.next += 1;
        self.versions.insert(self.next, Arc::new(bytes));
        while self.versions.len() > Self::KEEP {
            self.versions.pop_first();
        }
        self.next
    }

    /// A version, while it is kept.
    pub fn get(&self, version: u64) -> Option<Arc<Vec<u8>>> {
        self.versions.get(&version).cloned()
    }
}

/// State shared between the service and the engine.
pub struct Shared {
    /// The effective job configuration.
    pub config: JobConfig,
    /// The same, serialised (what workers receive).
    pub config_toml: String,
    /// The flat parameter layout.
    pub layout: Vec<TensorSpec>,
    /// Steps per epoch.
    pub steps_per_epoch: u64,
    /// States workers fetch.
    pub states: Mutex<StateStore>,
    /// Who is in the job.
    pub membership: Mutex<Membership>,
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

    /// The membership, locked.
    pub fn members(&self) -> std::sync::MutexGuard<'_, Membership> {
        self.membership.lock().expect("membership lock")
    }

    /// How errors name a member.
    pub fn describe(&self, member: MemberId) -> String {
        self.members().describe(member)
    }

    /// Largest state upload accepted: the model's parameters and optimizer state, with room
    /// for the header and the configuration the serialised form holds.
    pub fn state_limit(&self) -> u64 {
        let parameters = lockstep_common::codec::layout_len(&self.layout) as u64;
        let buffers = lockstep_common::optim::Optimizer::new(self.config.optimizer.clone(), 0)
            .state()
            .buffers
            .len() as u64;
        parameters * 4 * (1 + buffers) + self.config_toml.len() as u64 + 64 * 1024
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

/// The peer's address, for logs.
fn peer_of<T>(request: &Request<T>) -> String {
    request
        .remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "unknown address".into())
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl wire::Coordinator for CoordinatorService {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinReply>, Status> {
        let peer = peer_of(&request);
        let s = &self.shared;
        let req = JoinRequest::try_from(request.into_inner()).map_err(|e| {
            tracing::warn!("refused a join from {peer}: {e}");
            Status::invalid_argument(format!("join refused: {e}"))
        })?;
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
        if let Some((fingerprint, description)) = req.model.as_ref().filter(|m| m.0 != ours) {
            tracing::warn!(
                "refused worker {} at {peer}: model {description}",
                req.worker_id
            );
            return Err(Status::failed_precondition(format!(
                "model configuration mismatch: the worker was started for `{description}` (fingerprint {fingerprint}), \
                 the job trains `{}` (fingerprint {ours}); start the worker without a model setting, or with the job's",
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
        let joining = Joining {
            worker_id: req.worker_id.clone(),
            device: req.device.clone(),
            peer: peer.clone(),
            pid: req.pid,
        };
        let now = s.now_ms();
        let member = s.members().admit(joining, now).map_err(|why| {
            tracing::warn!("refused worker {} at {peer}: {why}", req.worker_id);
            Status::resource_exhausted(why)
        })?;
        tracing::info!(
            event = "joined",
            rank = member.rank,
            worker_id = %req.worker_id,
            device = %req.device,
            peer = %peer,
            "worker {} ({}) at {peer} joined as rank {}",
            req.worker_id,
            req.device,
            member.rank
        );
        Ok(Response::new(pb::JoinReply {
            rank: member.rank,
            member: member.id,
            job_config_toml: s.config_toml.clone(),
            layout: wire::layout_to_wire(&s.layout),
            heartbeat_interval_ms: s.config.cluster.heartbeat_interval_ms,
            backend: s.config.backend.to_string(),
            steps_per_epoch: s.steps_per_epoch,
        }))
    }

    type FetchStateStream = BoxStream<pb::StateChunk>;

    async fn fetch_state(
        &self,
        request: Request<pb::StateRequest>,
    ) -> Result<Response<Self::FetchStateStream>, Status> {
        let version = request.into_inner().state_version;
        let bytes = self
            .shared
            .states
            .lock()
            .expect("state lock")
            .get(version)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "state version {version} is not (or no longer) kept; join again"
                ))
            })?;
        let chunks = wire::state_chunks(&bytes, version, 0);
        Ok(Response::new(Box::pin(tokio_stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }

    type TrainStream = BoxStream<pb::CoordinatorMessage>;

    async fn train(
        &self,
        request: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::TrainStream>, Status> {
        let peer = peer_of(&request);
        let mut inbound = request.into_inner();
        // A stream that says nothing holds a task and a connection slot: like a member that
        // goes silent, it gets the heartbeat timeout to say who it is.
        let limit = Duration::from_millis(self.shared.config.cluster.heartbeat_timeout_ms as u64);
        let first = match tokio::time::timeout(limit, inbound.message()).await {
            Ok(first) => first?,
            Err(_) => {
                tracing::warn!(
                    "refused a step stream from {peer}: no Hello within {:.1}s",
                    limit.as_secs_f64()
                );
                return Err(Status::deadline_exceeded(format!(
                    "the step stream must start with Hello within {:.1}s (cluster.heartbeat_timeout_ms)",
                    limit.as_secs_f64()
                )));
            }
        };
        let first = first
            .ok_or_else(|| Status::invalid_argument("the step stream must start with Hello"))?;
        let Ok(FromWorker::Hello { member }) = FromWorker::try_from(first) else {
            tracing::warn!("refused a step stream from {peer}: it did not start with Hello");
            return Err(Status::invalid_argument(
                "the step stream must start with Hello",
            ));
        };
        let s = self.shared.clone();
        let last_seen = s
            .members()
            .open_stream(member)
            .map_err(|why| {
                tracing::warn!("refused a step stream from {peer}: {why}");
                Status::failed_precondition(why)
            })?
            .last_seen_ms;
        let (tx, rx) = mpsc::channel(64);
        let _ = s.events.send(Event::StreamOpened { member, tx });
        tokio::spawn(async move {
            let reason = loop {
                match inbound.next().await {
                    Some(Ok(msg)) => {
                        last_seen.store(s.now_ms(), Ordering::Relaxed);
                        let event = match FromWorker::try_from(msg) {
                            Ok(FromWorker::Heartbeat) => continue,
                            Ok(msg) => Event::Message { member, msg },
                            Err(error) => Event::Malformed { member, error },
                        };
                        if s.events.send(event).is_err() {
                            return;
                        }
                    }
                    // A message over the size limit is the sender's fault, not the network's.
                    Some(Err(status))
                        if matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted) =>
                    {
                        let error = ProtocolError::Oversized(status.message().to_string());
                        let _ = s.events.send(Event::Malformed { member, error });
                        break format!("stream error: {}", status.message());
                    }
                    Some(Err(status)) => break format!("stream error: {}", status.message()),
                    None => break "the worker closed its stream".to_string(),
                }
            };
            let _ = s.events.send(Event::StreamClosed { member, reason });
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn push_state(
        &self,
        request: Request<Streaming<pb::StateChunk>>,
    ) -> Result<Response<pb::PushStateReply>, Status> {
        let peer = peer_of(&request);
        let refuse = |why: String| {
            tracing::warn!("refused a state upload from {peer}: {why}");
            Status::failed_precondition(why)
        };
        let s = &self.shared;
        if !s.config.backend.is_collective() {
            return Err(refuse(format!(
                "the {} backend takes no state uploads: the coordinator computes its own replica",
                s.config.backend
            )));
        }
        let mut inbound = request.into_inner();
        let mut asm = wire::StateAssembler::with_limit(s.state_limit());
        // Who uploads is known from the first chunk: a non-member is refused before its state
        // is received.
        while let Some(chunk) = inbound.message().await? {
            let first = asm.member().is_none();
            let member = chunk.member;
            asm.push(chunk).map_err(Status::invalid_argument)?;
            if first {
                s.members().check_streaming(member).map_err(&refuse)?;
            }
        }
        let member = asm.member().unwrap_or(0);
        s.members().check_streaming(member).map_err(&refuse)?;
        let (bytes, version) = asm.finish().map_err(Status::invalid_argument)?;
        let _ = s.events.send(Event::StatePushed {
            member,
            version,
            bytes,
        });
        Ok(Response::new(pb::PushStateReply {}))
    }

    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveReply>, Status> {
        let peer = peer_of(&request);
        let refuse = |why: String, status: fn(String) -> Status| {
            tracing::warn!("refused a Leave from {peer}: {why}");
            status(why)
        };
        let leave = Leave::try_from(request.into_inner())
            .map_err(|e| refuse(e.to_string(), Status::invalid_argument))?;
        self.shared
            .members()
            .check(leave.member)
            .map_err(|why| refuse(why, Status::failed_precondition))?;
        let _ = self.shared.events.send(Event::Left {
            member: leave.member,
            reason: leave.reason,
        });
        Ok(Response::new(pb::LeaveReply {}))
    }
}
