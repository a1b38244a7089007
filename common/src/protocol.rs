//! The project's own types for what crosses the wire, converted from the generated prost types
//! at the boundary (`TryFrom`) and back (`From`). A conversion checks everything that can be
//! checked without knowing the job's state: a step message without its step id is refused (it
//! never silently becomes step 0), every string, length and count from a peer is bounded (an
//! over-limit field is refused, naming the field and its limit), pixel, label and index buffers
//! must agree with the counts they come with, and text meant for people is made [`printable`]
//! before it can reach a log line or an error. What depends on the job (is this shard assigned
//! to this worker? does the gradient have the layout's length?) is the receiver's to check.

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use thiserror::Error;

use crate::mnist::IMAGE_PIXELS;
use crate::model::BatchStats;
use crate::wire::pb;

/// Most shards a global batch may be cut into.
pub const MAX_SHARDS: u32 = 1024;
/// Largest global batch the protocol carries.
pub const MAX_GLOBAL_BATCH: u32 = 1 << 20;
/// Longest rendezvous blob (an NCCL id is 128 bytes; a tcp one well under 200).
pub const MAX_RENDEZVOUS_BYTES: usize = 4096;
/// Longest free-text reason or message (`StepFailed`, `Leave`, `Abort`, `Finish`). Senders cut
/// their own text to it; receivers refuse longer.
pub const MAX_REASON_BYTES: usize = 2000;
/// Longest worker description (`host/pid N`) a worker may present at `Join`.
pub const MAX_WORKER_ID_BYTES: usize = 256;
/// Longest device name (`cpu`, `cuda:0`) a worker may present at `Join`.
pub const MAX_DEVICE_BYTES: usize = 64;
/// Longest model description a worker may present at `Join`.
pub const MAX_DESCRIPTION_BYTES: usize = 256;
/// Longest model fingerprint a worker may present at `Join` (ours are 16 hex digits).
pub const MAX_FINGERPRINT_BYTES: usize = 64;
/// Longest job configuration (TOML) a coordinator may send at `Join` (ours are about 1 KiB).
pub const MAX_CONFIG_BYTES: usize = 64 * 1024;
/// Most tensors in a parameter layout (an `mlp` of 64 hidden layers has 130).
pub const MAX_LAYOUT_TENSORS: usize = 256;
/// Longest tensor name in a layout (`fc12.weight`).
pub const MAX_TENSOR_NAME_BYTES: usize = 128;
/// Most dimensions of a tensor in a layout (a convolution's weight has 4).
pub const MAX_TENSOR_DIMS: usize = 4;
/// Longest backend name in a join reply.
pub const MAX_BACKEND_BYTES: usize = 16;
/// Longest heartbeat interval a coordinator may ask for.
pub const MAX_HEARTBEAT_INTERVAL_MS: u32 = 60_000;

/// Text from a peer, made safe to print: control characters and other non-printable ones (line
/// breaks, terminal escape sequences, bidirectional overrides, zero-width characters) are
/// escaped as Rust escapes them (`\n`, `\u{1b}`), and so is the backslash, so a peer can
/// neither forge a log line nor drive the reader's terminal. Printable text, non-ASCII
/// included, is kept as it is. Every peer string meant for people passes through here once, at
/// the boundary.
pub fn printable(text: &str) -> String {
    let plain = |c: char| c != '\\' && c.escape_debug().len() == 1 || c == '"' || c == '\'';
    if text.chars().all(plain) {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if plain(c) {
            out.push(c);
        } else {
            out.extend(c.escape_debug());
        }
    }
    out
}

/// Cuts free text to [`MAX_REASON_BYTES`] (at a character boundary, ending in `...`), so what
/// this side sends is never refused for its length.
pub fn cut_reason(mut text: String) -> String {
    if text.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES - 3;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// `text`, refused when longer than `limit` bytes, made [`printable`].
fn bounded(text: &str, field: &'static str, limit: usize) -> Result<String, ProtocolError> {
    if text.len() > limit {
        return Err(ProtocolError::TooLong {
            field,
            len: text.len(),
            limit,
        });
    }
    Ok(printable(text))
}

/// A message that does not follow the protocol.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// A required field is absent.
    #[error("{0} without its {1}")]
    Missing(&'static str, &'static str),
    /// A field is out of its bounds or inconsistent with another.
    #[error("malformed {0}: {1}")]
    Malformed(&'static str, String),
    /// The message kind is not one this side accepts here.
    #[error("unexpected message: {0}")]
    Unexpected(&'static str),
    /// A string is longer than the protocol allows.
    #[error("{field} is {len} bytes long; at most {limit} are accepted")]
    TooLong {
        /// The field, as the proto names it (`JoinRequest.worker_id`).
        field: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A message over the size limit ([`crate::MAX_MESSAGE_BYTES`]), as the transport says.
    #[error("a message over the 64 MiB limit: {0}")]
    Oversized(String),
    /// A repeated field has more entries than the protocol allows.
    #[error("{field} has {len} entries; at most {limit} are accepted")]
    TooMany {
        /// The field, as the proto names it (`JoinReply.layout`).
        field: &'static str,
        /// Its entries.
        len: usize,
        /// The limit.
        limit: usize,
    },
}

/// A position in the schedule: step `step` (from 0) of epoch `epoch` (from 0). Ordered by
/// epoch, then step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StepId {
    /// Epoch, from 0.
    pub epoch: u64,
    /// Step within the epoch, from 0.
    pub step: u64,
}

impl StepId {
    /// Step `step` of epoch `epoch`.
    pub fn new(epoch: u64, step: u64) -> Self {
        Self { epoch, step }
    }

    /// The step after this one, in an epoch of `steps` steps.
    pub fn next(self, steps: u64) -> Self {
        if self.step + 1 >= steps {
            Self::new(self.epoch + 1, 0)
        } else {
            Self::new(self.epoch, self.step + 1)
        }
    }
}

impl std::fmt::Display for StepId {
    /// Human form, counted from 1: `epoch 2 step 345`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "epoch {} step {}", self.epoch + 1, self.step + 1)
    }
}

/// A step message's stamp: the step, and the membership generation it was sent under.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Stamp {
    /// The step.
    pub id: StepId,
    /// Membership generation.
    pub membership: u64,
}

impl Stamp {
    /// Step `id` under membership `membership`.
    pub fn new(id: StepId, membership: u64) -> Self {
        Self { id, membership }
    }
}

impl From<Stamp> for pb::StepId {
    fn from(s: Stamp) -> Self {
        pb::StepId {
            epoch: s.id.epoch,
            step: s.id.step,
            membership_epoch: s.membership,
        }
    }
}

fn stamp(id: Option<pb::StepId>, what: &'static str) -> Result<Stamp, ProtocolError> {
    let id = id.ok_or(ProtocolError::Missing(what, "step id"))?;
    Ok(Stamp::new(
        StepId::new(id.epoch, id.step),
        id.membership_epoch,
    ))
}

/// The echo of a shard's sample indices (little-endian u32 bytes): the first 8 bytes of their
/// SHA-256.
pub fn indices_digest(indices: &[u8]) -> u64 {
    let h = Sha256::digest(indices);
    u64::from_le_bytes(h[..8].try_into().expect("8 bytes"))
}

fn check_sha256(text: &str, what: &'static str) -> Result<(), ProtocolError> {
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(ProtocolError::Malformed(
            what,
            "the digest is not 64 hex digits".into(),
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Admission and leaving (unary RPCs)

/// What a worker says about itself at `Join`, checked: every text bounded and [`printable`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JoinRequest {
    /// The protocol version it speaks.
    pub protocol_version: u32,
    /// How it names itself (`host/pid N`), for logs and errors.
    pub worker_id: String,
    /// Its compute device (`cpu`, `cuda:0`).
    pub device: String,
    /// The model it insists on, if any: (fingerprint, description).
    pub model: Option<(String, String)>,
    /// Built with CUDA and a device is visible.
    pub cuda_available: bool,
    /// Its process id.
    pub pid: u32,
}

impl TryFrom<pb::JoinRequest> for JoinRequest {
    type Error = ProtocolError;

    fn try_from(r: pb::JoinRequest) -> Result<Self, ProtocolError> {
        let worker_id = bounded(&r.worker_id, "JoinRequest.worker_id", MAX_WORKER_ID_BYTES)?;
        let device = bounded(&r.device, "JoinRequest.device", MAX_DEVICE_BYTES)?;
        let fingerprint = bounded(
            &r.model_fingerprint,
            "JoinRequest.model_fingerprint",
            MAX_FINGERPRINT_BYTES,
        )?;
        let description = bounded(
            &r.model_description,
            "JoinRequest.model_description",
            MAX_DESCRIPTION_BYTES,
        )?;
        Ok(JoinRequest {
            protocol_version: r.protocol_version,
            worker_id,
            device,
            model: (!fingerprint.is_empty()).then_some((fingerprint, description)),
            cuda_available: r.cuda_available,
            pid: r.pid,
        })
    }
}

/// A worker leaving on purpose, checked: its reason bounded and [`printable`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leave {
    /// The admission that leaves.
    pub member: u64,
    /// Why.
    pub reason: String,
}

impl TryFrom<pb::LeaveRequest> for Leave {
    type Error = ProtocolError;

    fn try_from(r: pb::LeaveRequest) -> Result<Self, ProtocolError> {
        Ok(Leave {
            member: r.member,
            reason: bounded(&r.reason, "LeaveRequest.reason", MAX_REASON_BYTES)?,
        })
    }
}

impl From<Leave> for pb::LeaveRequest {
    fn from(l: Leave) -> Self {
        pb::LeaveRequest {
            member: l.member,
            reason: cut_reason(l.reason),
        }
    }
}

/// Checks what a worker receives from `Join` before it uses any of it: the configuration's
/// length (its content is validated when parsed), the layout's size, the heartbeat interval
/// and the steps per epoch.
pub fn check_join_reply(r: &pb::JoinReply) -> Result<(), ProtocolError> {
    let bad = |why: String| ProtocolError::Malformed("JoinReply", why);
    if r.job_config_toml.len() > MAX_CONFIG_BYTES {
        return Err(ProtocolError::TooLong {
            field: "JoinReply.job_config_toml",
            len: r.job_config_toml.len(),
            limit: MAX_CONFIG_BYTES,
        });
    }
    if r.backend.len() > MAX_BACKEND_BYTES {
        return Err(ProtocolError::TooLong {
            field: "JoinReply.backend",
            len: r.backend.len(),
            limit: MAX_BACKEND_BYTES,
        });
    }
    if r.layout.len() > MAX_LAYOUT_TENSORS {
        return Err(ProtocolError::TooMany {
            field: "JoinReply.layout",
            len: r.layout.len(),
            limit: MAX_LAYOUT_TENSORS,
        });
    }
    for t in &r.layout {
        if t.name.len() > MAX_TENSOR_NAME_BYTES {
            return Err(ProtocolError::TooLong {
                field: "TensorSpec.name",
                len: t.name.len(),
                limit: MAX_TENSOR_NAME_BYTES,
            });
        }
        if t.shape.len() > MAX_TENSOR_DIMS {
            return Err(ProtocolError::TooMany {
                field: "TensorSpec.shape",
                len: t.shape.len(),
                limit: MAX_TENSOR_DIMS,
            });
        }
    }
    if r.rank >= MAX_SHARDS {
        return Err(bad(format!(
            "rank {} (at most {MAX_SHARDS} workers)",
            r.rank
        )));
    }
    if r.heartbeat_interval_ms == 0 || r.heartbeat_interval_ms > MAX_HEARTBEAT_INTERVAL_MS {
        return Err(bad(format!(
            "a heartbeat interval of {} ms (1 to {MAX_HEARTBEAT_INTERVAL_MS} accepted)",
            r.heartbeat_interval_ms
        )));
    }
    if r.steps_per_epoch == 0 || r.steps_per_epoch > u64::from(u32::MAX) {
        return Err(bad(format!("{} steps per epoch", r.steps_per_epoch)));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Worker → coordinator

/// grpc mode: one shard's gradient and statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardGradient {
    /// The step.
    pub id: Stamp,
    /// Which shard of the step.
    pub shard: u32,
    /// Loss, correct count and samples of the shard.
    pub stats: BatchStats,
    /// Little-endian f32 gradient of the shard's summed loss.
    pub data: Bytes,
    /// Time the worker spent computing it.
    pub compute_ms: f32,
    /// [`indices_digest`] of the shard's indices, as the worker received them.
    pub indices_digest: u64,
    /// The worker's previous step: time waiting for the average, and applying it.
    pub wait_ms: f32,
    /// See `wait_ms`.
    pub apply_ms: f32,
}

/// A shard a rank contributed to a collective step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardDone {
    /// Which shard.
    pub shard: u32,
    /// Its sample count.
    pub samples: u32,
    /// [`indices_digest`] of its indices.
    pub indices_digest: u64,
}

/// Collective modes: a step applied by a rank.
#[derive(Clone, Debug, PartialEq)]
pub struct StepDone {
    /// The step.
    pub id: Stamp,
    /// The shards this rank contributed.
    pub shards: Vec<ShardDone>,
    /// Statistics accumulated since the last report that carried any.
    pub stats: BatchStats,
    /// Time from receiving the work to applying the step.
    pub compute_ms: f32,
    /// Time this rank waited in the step's all-reduce.
    pub wait_ms: f32,
    /// Time this rank spent applying the step.
    pub apply_ms: f32,
}

/// What a worker sends on its step stream.
#[derive(Clone, Debug, PartialEq)]
pub enum FromWorker {
    /// The first message: which admission the stream belongs to.
    Hello {
        /// The `member` of the join reply.
        member: u64,
    },
    /// Alive (carries nothing the coordinator uses).
    Heartbeat,
    /// grpc mode: a shard gradient.
    Gradient(ShardGradient),
    /// The digest of the worker's state after a step.
    Digest {
        /// The step.
        id: Stamp,
        /// SHA-256, hex.
        sha256: String,
    },
    /// Collective rank 0's bootstrap for a membership.
    Rendezvous {
        /// The blob to relay.
        blob: Bytes,
        /// The membership it belongs to.
        membership: u64,
    },
    /// Collective modes: a step applied.
    StepDone(StepDone),
    /// Collective modes: the answer to Pause.
    Paused {
        /// The first step not applied, stamped with the paused membership.
        next: Stamp,
        /// Digest of the replica's state.
        sha256: String,
    },
    /// Collective modes: a step that could not be finished.
    StepFailed {
        /// The step.
        id: Stamp,
        /// Why.
        reason: String,
        /// Non-finite values: the model diverged.
        diverged: bool,
    },
}

impl FromWorker {
    /// A short name of the kind, for errors.
    pub fn kind(&self) -> &'static str {
        match self {
            FromWorker::Hello { .. } => "Hello",
            FromWorker::Heartbeat => "Heartbeat",
            FromWorker::Gradient(_) => "ShardGradient",
            FromWorker::Digest { .. } => "Digest",
            FromWorker::Rendezvous { .. } => "Rendezvous",
            FromWorker::StepDone(_) => "StepDone",
            FromWorker::Paused { .. } => "Paused",
            FromWorker::StepFailed { .. } => "StepFailed",
        }
    }
}

impl TryFrom<pb::WorkerMessage> for FromWorker {
    type Error = ProtocolError;

    fn try_from(msg: pb::WorkerMessage) -> Result<Self, ProtocolError> {
        use pb::worker_message::Kind;
        Ok(match msg.kind {
            None => return Err(ProtocolError::Missing("worker message", "kind")),
            Some(Kind::Hello(h)) => FromWorker::Hello { member: h.member },
            Some(Kind::Heartbeat(_)) => FromWorker::Heartbeat,
            Some(Kind::Gradient(g)) => {
                let id = stamp(g.id, "ShardGradient")?;
                if g.shard >= MAX_SHARDS || g.samples > MAX_GLOBAL_BATCH || g.correct > g.samples {
                    return Err(ProtocolError::Malformed(
                        "ShardGradient",
                        format!(
                            "shard {}, {} samples, {} correct",
                            g.shard, g.samples, g.correct
                        ),
                    ));
                }
                FromWorker::Gradient(ShardGradient {
                    id,
                    shard: g.shard,
                    stats: BatchStats {
                        loss_sum: g.loss_sum,
                        correct: g.correct,
                        samples: g.samples,
                    },
                    data: g.data,
                    compute_ms: g.compute_ms,
                    indices_digest: g.indices_digest,
                    wait_ms: g.wait_ms,
                    apply_ms: g.apply_ms,
                })
            }
            Some(Kind::Digest(d)) => {
                let id = stamp(d.id, "Digest")?;
                check_sha256(&d.sha256, "Digest")?;
                FromWorker::Digest {
                    id,
                    sha256: d.sha256,
                }
            }
            Some(Kind::Rendezvous(r)) => {
                if r.id.is_empty() || r.id.len() > MAX_RENDEZVOUS_BYTES {
                    return Err(ProtocolError::Malformed(
                        "Rendezvous",
                        format!("{} bytes", r.id.len()),
                    ));
                }
                FromWorker::Rendezvous {
                    blob: r.id,
                    membership: r.membership_epoch,
                }
            }
            Some(Kind::StepDone(d)) => {
                let id = stamp(d.id, "StepDone")?;
                if d.shards.len() > MAX_SHARDS as usize {
                    return Err(ProtocolError::TooMany {
                        field: "StepDone.shards",
                        len: d.shards.len(),
                        limit: MAX_SHARDS as usize,
                    });
                }
                let mut seen = std::collections::BTreeSet::new();
                let mut shards = Vec::with_capacity(d.shards.len());
                for s in d.shards {
                    if s.shard >= MAX_SHARDS
                        || s.samples > MAX_GLOBAL_BATCH
                        || !seen.insert(s.shard)
                    {
                        return Err(ProtocolError::Malformed(
                            "StepDone",
                            format!(
                                "shard {} ({} samples) out of bounds or repeated",
                                s.shard, s.samples
                            ),
                        ));
                    }
                    shards.push(ShardDone {
                        shard: s.shard,
                        samples: s.samples,
                        indices_digest: s.indices_digest,
                    });
                }
                if d.samples > MAX_GLOBAL_BATCH.saturating_mul(64) || d.correct > d.samples {
                    return Err(ProtocolError::Malformed(
                        "StepDone",
                        format!("{} samples, {} correct", d.samples, d.correct),
                    ));
                }
                FromWorker::StepDone(StepDone {
                    id,
                    shards,
                    stats: BatchStats {
                        loss_sum: d.loss_sum,
                        correct: d.correct,
                        samples: d.samples,
                    },
                    compute_ms: d.compute_ms,
                    wait_ms: d.wait_ms,
                    apply_ms: d.apply_ms,
                })
            }
            Some(Kind::Paused(p)) => {
                let next = stamp(p.next, "Paused")?;
                check_sha256(&p.sha256, "Paused")?;
                FromWorker::Paused {
                    next,
                    sha256: p.sha256,
                }
            }
            Some(Kind::StepFailed(f)) => FromWorker::StepFailed {
                id: stamp(f.id, "StepFailed")?,
                reason: bounded(&f.reason, "StepFailed.reason", MAX_REASON_BYTES)?,
                diverged: f.diverged,
            },
        })
    }
}

impl From<FromWorker> for pb::WorkerMessage {
    fn from(msg: FromWorker) -> Self {
        use pb::worker_message::Kind;
        let kind = match msg {
            FromWorker::Hello { member } => Kind::Hello(pb::Hello { member }),
            FromWorker::Heartbeat => Kind::Heartbeat(pb::Heartbeat {}),
            FromWorker::Gradient(g) => Kind::Gradient(pb::ShardGradient {
                id: Some(g.id.into()),
                shard: g.shard,
                samples: g.stats.samples,
                loss_sum: g.stats.loss_sum,
                correct: g.stats.correct,
                data: g.data,
                compute_ms: g.compute_ms,
                indices_digest: g.indices_digest,
                wait_ms: g.wait_ms,
                apply_ms: g.apply_ms,
            }),
            FromWorker::Digest { id, sha256 } => Kind::Digest(pb::Digest {
                id: Some(id.into()),
                sha256,
            }),
            FromWorker::Rendezvous { blob, membership } => Kind::Rendezvous(pb::Rendezvous {
                id: blob,
                membership_epoch: membership,
            }),
            FromWorker::StepDone(d) => Kind::StepDone(pb::StepDone {
                id: Some(d.id.into()),
                shards: d
                    .shards
                    .iter()
                    .map(|s| pb::ShardDone {
                        shard: s.shard,
                        samples: s.samples,
                        indices_digest: s.indices_digest,
                    })
                    .collect(),
                samples: d.stats.samples,
                loss_sum: d.stats.loss_sum,
                correct: d.stats.correct,
                compute_ms: d.compute_ms,
                wait_ms: d.wait_ms,
                apply_ms: d.apply_ms,
            }),
            FromWorker::Paused { next, sha256 } => Kind::Paused(pb::Paused {
                next: Some(next.into()),
                sha256,
            }),
            FromWorker::StepFailed {
                id,
                reason,
                diverged,
            } => Kind::StepFailed(pb::StepFailed {
                id: Some(id.into()),
                reason: cut_reason(reason),
                diverged,
            }),
        };
        pb::WorkerMessage { kind: Some(kind) }
    }
}

// ---------------------------------------------------------------------------------------------
// Coordinator → worker

/// One shard of a step's global batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Shard {
    /// Which shard of the step.
    pub index: u32,
    /// `count` images of 28×28 u8 pixels.
    pub pixels: Bytes,
    /// `count` labels in 0..=9.
    pub labels: Bytes,
    /// `count` training-set indices, little-endian u32.
    pub indices: Bytes,
}

impl Shard {
    /// Number of samples.
    pub fn count(&self) -> u32 {
        self.labels.len() as u32
    }
}

/// The shards of a step a worker computes.
#[derive(Clone, Debug, PartialEq)]
pub struct Work {
    /// The step.
    pub id: Stamp,
    /// Samples in the whole global batch (the divisor of the average).
    pub global_count: u32,
    /// Shards the global batch is cut into.
    pub shard_count: u32,
    /// This worker's shards, in shard order.
    pub shards: Vec<Shard>,
    /// The epoch's last step: report a digest after it.
    pub last_of_epoch: bool,
    /// Collective modes: upload the state after applying this step.
    pub push_state: bool,
}

/// Membership settings for a worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Configure {
    /// Membership generation.
    pub membership: u64,
    /// This worker's rank in the collective (0..world, in rank order).
    pub rank: u32,
    /// Members.
    pub world: u32,
    /// A state to fetch and adopt first, if any.
    pub state_version: Option<u64>,
}

/// What the coordinator sends on a step stream.
#[derive(Clone, Debug, PartialEq)]
pub enum FromCoordinator {
    /// Shards to compute.
    Work(Work),
    /// grpc mode: the averaged gradient of a step.
    Reduced {
        /// The step.
        id: Stamp,
        /// Little-endian f32 average.
        data: Bytes,
    },
    /// The job is done.
    Finish(String),
    /// The job stopped, or this worker was removed from it.
    Abort(String),
    /// The collective's bootstrap, relayed.
    Rendezvous {
        /// Rank 0's blob.
        blob: Bytes,
        /// Its membership.
        membership: u64,
    },
    /// Collective modes: upload the current state with this version.
    PushState {
        /// The version to tag the upload with.
        version: u64,
    },
    /// Collective modes: stop stepping and answer with Paused.
    Pause {
        /// The membership about to end.
        membership: u64,
    },
    /// The membership from now on.
    Configure(Configure),
}

fn check_shard(s: &pb::Shard, shard_count: u32) -> Result<(), String> {
    let n = s.count as usize;
    if s.index >= shard_count {
        return Err(format!("shard {} of {shard_count}", s.index));
    }
    if s.pixels.len() != n * IMAGE_PIXELS || s.labels.len() != n || s.indices.len() != 4 * n {
        return Err(format!(
            "shard {}: {n} samples announced, {} pixel bytes, {} labels and {} index bytes received",
            s.index,
            s.pixels.len(),
            s.labels.len(),
            s.indices.len()
        ));
    }
    if let Some(l) = s.labels.iter().find(|&&l| l > 9) {
        return Err(format!("shard {}: label {l} is outside 0..=9", s.index));
    }
    Ok(())
}

impl TryFrom<pb::Work> for Work {
    type Error = ProtocolError;

    fn try_from(w: pb::Work) -> Result<Self, ProtocolError> {
        let id = stamp(w.id, "Work")?;
        let bad = |why: String| ProtocolError::Malformed("Work", why);
        if w.shard_count == 0 || w.shard_count > MAX_SHARDS {
            return Err(bad(format!("{} shards", w.shard_count)));
        }
        if w.global_count > MAX_GLOBAL_BATCH {
            return Err(bad(format!("global batch of {}", w.global_count)));
        }
        let mut total = 0u64;
        let mut last: Option<u32> = None;
        for s in &w.shards {
            check_shard(s, w.shard_count).map_err(bad)?;
            if last.is_some_and(|l| s.index <= l) {
                return Err(bad("shards out of order or repeated".into()));
            }
            last = Some(s.index);
            total += s.count as u64;
        }
        if total > w.global_count as u64 {
            return Err(bad(format!(
                "the shards hold {total} samples, more than the global batch of {}",
                w.global_count
            )));
        }
        Ok(Work {
            id,
            global_count: w.global_count,
            shard_count: w.shard_count,
            shards: w
                .shards
                .into_iter()
                .map(|s| Shard {
                    index: s.index,
                    pixels: s.pixels,
                    labels: s.labels,
                    indices: s.indices,
                })
                .collect(),
            last_of_epoch: w.last_of_epoch,
            push_state: w.push_state,
        })
    }
}

impl TryFrom<pb::CoordinatorMessage> for FromCoordinator {
    type Error = ProtocolError;

    fn try_from(msg: pb::CoordinatorMessage) -> Result<Self, ProtocolError> {
        use pb::coordinator_message::Kind;
        Ok(match msg.kind {
            None => return Err(ProtocolError::Missing("coordinator message", "kind")),
            Some(Kind::Work(w)) => FromCoordinator::Work(w.try_into()?),
            Some(Kind::Reduced(r)) => FromCoordinator::Reduced {
                id: stamp(r.id, "Reduced")?,
                data: r.data,
            },
            Some(Kind::Finish(f)) => {
                FromCoordinator::Finish(bounded(&f.message, "Finish.message", MAX_REASON_BYTES)?)
            }
            Some(Kind::Abort(a)) => {
                FromCoordinator::Abort(bounded(&a.reason, "Abort.reason", MAX_REASON_BYTES)?)
            }
            Some(Kind::Rendezvous(r)) => {
                if r.id.is_empty() || r.id.len() > MAX_RENDEZVOUS_BYTES {
                    return Err(ProtocolError::Malformed(
                        "Rendezvous",
                        format!("{} bytes", r.id.len()),
                    ));
                }
                FromCoordinator::Rendezvous {
                    blob: r.id,
                    membership: r.membership_epoch,
                }
            }
            Some(Kind::PushState(p)) => FromCoordinator::PushState {
                version: p.state_version,
            },
            Some(Kind::Pause(p)) => FromCoordinator::Pause {
                membership: p.membership_epoch,
            },
            Some(Kind::Configure(c)) => {
                if c.world == 0 || c.rank >= c.world || c.world > MAX_SHARDS {
                    return Err(ProtocolError::Malformed(
                        "Configure",
                        format!("rank {} of {}", c.rank, c.world),
                    ));
                }
                FromCoordinator::Configure(Configure {
                    membership: c.membership_epoch,
                    rank: c.rank,
                    world: c.world,
                    state_version: (c.state_version != 0).then_some(c.state_version),
                })
            }
        })
    }
}

impl From<FromCoordinator> for pb::CoordinatorMessage {
    fn from(msg: FromCoordinator) -> Self {
        use pb::coordinator_message::Kind;
        let kind = match msg {
            FromCoordinator::Work(w) => Kind::Work(pb::Work {
                id: Some(w.id.into()),
                global_count: w.global_count,
                shard_count: w.shard_count,
                shards: w
                    .shards
                    .into_iter()
                    .map(|s| pb::Shard {
                        index: s.index,
                        count: s.count(),
                        pixels: s.pixels,
                        labels: s.labels,
                        indices: s.indices,
                    })
                    .collect(),
                last_of_epoch: w.last_of_epoch,
                push_state: w.push_state,
            }),
            FromCoordinator::Reduced { id, data } => Kind::Reduced(pb::Reduced {
                id: Some(id.into()),
                data,
            }),
            FromCoordinator::Finish(message) => Kind::Finish(pb::Finish {
                message: cut_reason(message),
            }),
            FromCoordinator::Abort(reason) => Kind::Abort(pb::Abort {
                reason: cut_reason(reason),
            }),
            FromCoordinator::Rendezvous { blob, membership } => Kind::Rendezvous(pb::Rendezvous {
                id: blob,
                membership_epoch: membership,
            }),
            FromCoordinator::PushState { version } => Kind::PushState(pb::StateRequest {
                state_version: version,
            }),
            FromCoordinator::Pause { membership } => Kind::Pause(pb::Pause {
                membership_epoch: membership,
            }),
            FromCoordinator::Configure(c) => Kind::Configure(pb::Configure {
                membership_epoch: c.membership,
                rank: c.rank,
                world: c.world,
                state_version: c.state_version.unwrap_or(0),
            }),
        };
        pb::CoordinatorMessage { kind: Some(kind) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(index: u32, count: usize) -> Shard {
        Shard {
            index,
            pixels: Bytes::from(vec![0u8; count * IMAGE_PIXELS]),
            labels: Bytes::from(vec![3u8; count]),
            indices: Bytes::from(vec![0u8; 4 * count]),
        }
    }

    fn work(shards: Vec<Shard>) -> pb::CoordinatorMessage {
        FromCoordinator::Work(Work {
            id: Stamp::new(StepId::new(0, 4), 2),
            global_count: 4,
            shard_count: 2,
            shards,
            last_of_epoch: false,
            push_state: false,
        })
        .into()
    }

    #[test]
    fn messages_round_trip() {
        let msg = work(vec![shard(0, 2), shard(1, 2)]);
        let back = FromCoordinator::try_from(msg.clone()).unwrap();
        assert_eq!(pb::CoordinatorMessage::from(back), msg);
        let done = FromWorker::StepDone(StepDone {
            id: Stamp::new(StepId::new(1, 2), 3),
            shards: vec![ShardDone {
                shard: 1,
                samples: 5,
                indices_digest: 9,
            }],
            stats: BatchStats {
                loss_sum: 1.5,
                correct: 4,
                samples: 5,
            },
            compute_ms: 0.5,
            wait_ms: 0.25,
            apply_ms: 0.125,
        });
        assert_eq!(
            FromWorker::try_from(pb::WorkerMessage::from(done.clone())).unwrap(),
            done
        );
    }

    #[test]
    fn a_step_message_without_its_step_id_is_refused_not_taken_as_step_0() {
        let msg = pb::WorkerMessage {
            kind: Some(pb::worker_message::Kind::Gradient(
                pb::ShardGradient::default(),
            )),
        };
        assert_eq!(
            FromWorker::try_from(msg).unwrap_err(),
            ProtocolError::Missing("ShardGradient", "step id")
        );
        let msg = pb::WorkerMessage {
            kind: Some(pb::worker_message::Kind::StepDone(pb::StepDone::default())),
        };
        assert!(FromWorker::try_from(msg).is_err());
        assert!(FromWorker::try_from(pb::WorkerMessage { kind: None }).is_err());
    }

    #[test]
    fn malformed_work_is_refused_with_the_reason() {
        let mut short = shard(0, 2);
        short.pixels = Bytes::from(vec![0u8; 10]);
        let err = FromCoordinator::try_from(work(vec![short])).unwrap_err();
        assert!(err.to_string().contains("10 pixel bytes"), "{err}");

        let mut label = shard(0, 2);
        label.labels = Bytes::from(vec![1u8, 10]);
        let err = FromCoordinator::try_from(work(vec![label])).unwrap_err();
        assert!(err.to_string().contains("label 10"), "{err}");

        let err = FromCoordinator::try_from(work(vec![shard(1, 1), shard(0, 1)])).unwrap_err();
        assert!(err.to_string().contains("out of order"), "{err}");

        let err = FromCoordinator::try_from(work(vec![shard(2, 1)])).unwrap_err();
        assert!(err.to_string().contains("shard 2 of 2"), "{err}");

        let err = FromCoordinator::try_from(work(vec![shard(0, 3), shard(1, 2)])).unwrap_err();
        assert!(
            err.to_string().contains("more than the global batch"),
            "{err}"
        );
    }

    #[test]
    fn peer_fields_are_bounded() {
        let digest = pb::WorkerMessage {
            kind: Some(pb::worker_message::Kind::Digest(pb::Digest {
                id: Some(pb::StepId::default()),
                sha256: "x".repeat(1_000_000),
            })),
        };
        assert!(FromWorker::try_from(digest).is_err());
        let rendezvous = pb::WorkerMessage {
            kind: Some(pb::worker_message::Kind::Rendezvous(pb::Rendezvous {
                id: Bytes::from(vec![1u8; MAX_RENDEZVOUS_BYTES + 1]),
                membership_epoch: 1,
            })),
        };
        assert!(FromWorker::try_from(rendezvous).is_err());
        let failed = pb::WorkerMessage {
            kind: Some(pb::worker_message::Kind::StepFailed(pb::StepFailed {
                id: Some(pb::StepId::default()),
                reason: "é".repeat(10_000),
                diverged: false,
            })),
        };
        assert_eq!(
            FromWorker::try_from(failed).unwrap_err().to_string(),
            "StepFailed.reason is 20000 bytes long; at most 2000 are accepted"
        );
        // What this side sends is cut to the limit, so the other side takes it.
        let long = FromWorker::StepFailed {
            id: Stamp::default(),
            reason: "é".repeat(10_000),
            diverged: false,
        };
        let FromWorker::StepFailed { reason, .. } =
            FromWorker::try_from(pb::WorkerMessage::from(long)).unwrap()
        else {
            panic!("a StepFailed");
        };
        assert!(reason.len() <= MAX_REASON_BYTES && reason.ends_with("..."));
        let abort = FromCoordinator::Abort("x".repeat(5000));
        let FromCoordinator::Abort(reason) =
            FromCoordinator::try_from(pb::CoordinatorMessage::from(abort)).unwrap()
        else {
            panic!("an Abort");
        };
        assert_eq!(reason.len(), MAX_REASON_BYTES);
        let done = pb::WorkerMessage {
            kind: Some(pb::worker_message::Kind::StepDone(pb::StepDone {
                id: Some(pb::StepId::default()),
                shards: vec![pb::ShardDone::default(); 2000],
                ..Default::default()
            })),
        };
        assert_eq!(
            FromWorker::try_from(done).unwrap_err().to_string(),
            "StepDone.shards has 2000 entries; at most 1024 are accepted"
        );
        let configure = pb::CoordinatorMessage {
            kind: Some(pb::coordinator_message::Kind::Configure(pb::Configure {
                membership_epoch: 1,
                rank: 2,
                world: 2,
                state_version: 0,
            })),
        };
        assert!(FromCoordinator::try_from(configure).is_err());
    }

    #[test]
    fn join_requests_are_bounded_field_by_field_and_made_printable() {
        let join = |worker_id: &str, device: &str| pb::JoinRequest {
            protocol_version: 3,
            worker_id: worker_id.into(),
            device: device.into(),
            ..Default::default()
        };
        let err = JoinRequest::try_from(join(&"x".repeat(1_000_000), "cpu")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "JoinRequest.worker_id is 1000000 bytes long; at most 256 are accepted"
        );
        let err = JoinRequest::try_from(join("h/pid 1", &"d".repeat(65))).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("JoinRequest.device is 65 bytes"),
            "{err}"
        );
        let forged = "h/pid 1\n2031-01-01T00:00:00Z ERROR forged\x1b[2J\u{202e}";
        let ok = JoinRequest::try_from(join(forged, "cpu")).unwrap();
        assert_eq!(
            ok.worker_id,
            "h/pid 1\\n2031-01-01T00:00:00Z ERROR forged\\u{1b}[2J\\u{202e}"
        );
        assert_eq!(ok.model, None, "no fingerprint: the coordinator's model");
        let leave = pb::LeaveRequest {
            member: 3,
            reason: "bye\r\n".into(),
        };
        assert_eq!(Leave::try_from(leave).unwrap().reason, "bye\\r\\n");
    }

    #[test]
    fn printable_text_is_kept_and_the_rest_escaped() {
        assert_eq!(
            printable("host-1/pid 42 é 日本 \"q\" 'a'"),
            "host-1/pid 42 é 日本 \"q\" 'a'"
        );
        assert_eq!(
            printable("a\tb\\c\u{0}\u{7f}\u{200b}"),
            "a\\tb\\\\c\\0\\u{7f}\\u{200b}"
        );
        assert_eq!(printable(""), "");
    }

    #[test]
    fn a_join_reply_is_checked_before_the_worker_uses_it() {
        let reply = pb::JoinReply {
            rank: 0,
            member: 1,
            job_config_toml: String::new(),
            layout: vec![],
            heartbeat_interval_ms: 500,
            backend: "grpc".into(),
            steps_per_epoch: 938,
        };
        check_join_reply(&reply).unwrap();
        let bad = |f: &dyn Fn(&mut pb::JoinReply)| {
            let mut r = reply.clone();
            f(&mut r);
            check_join_reply(&r).unwrap_err().to_string()
        };
        assert!(
            bad(&|r| r.job_config_toml = "#".repeat(MAX_CONFIG_BYTES + 1))
                .starts_with("JoinReply.job_config_toml is 65537 bytes long")
        );
        assert!(bad(&|r| r.layout = vec![pb::TensorSpec::default(); 300])
            .starts_with("JoinReply.layout has 300 entries"));
        assert!(bad(&|r| r.heartbeat_interval_ms = 0).contains("heartbeat interval of 0 ms"));
        assert!(bad(&|r| r.steps_per_epoch = 0).contains("0 steps per epoch"));
        assert!(bad(&|r| r.layout = vec![pb::TensorSpec {
            name: "n".repeat(200),
            shape: vec![],
            offset: 0
        }])
        .starts_with("TensorSpec.name is 200 bytes"));
    }

    #[test]
    fn step_ids_order_by_epoch_then_step() {
        assert!(StepId::new(0, 937) < StepId::new(1, 0));
        assert_eq!(StepId::new(0, 937).next(938), StepId::new(1, 0));
        assert_eq!(StepId::new(0, 3).next(938), StepId::new(0, 4));
        assert_eq!(StepId::new(1, 0).to_string(), "epoch 2 step 1");
    }
}

#[cfg(test)]
mod props;
