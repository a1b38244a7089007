//! Adversarial peers. A fake worker, built on the project's own generated gRPC client, joins a
//! real `lockstep train --external-workers` (a known token) next to a real `lockstep-worker`,
//! and breaks the protocol in one way per test. What the README promises, and these tests hold:
//! the coordinator never panics; a member whose message does not follow the protocol or does not
//! fit the job is dropped, named in the log, and the job carries on with the real worker to exit
//! 0 with every sample applied once; a message of a finished step or of an earlier membership is
//! dropped without harm; what only a member may do is refused to anybody else with an RPC error;
//! a peer's text reaches the log bounded and escaped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lockstep_common::auth::Token;
use lockstep_common::checkpoint::{Position, TrainingState};
use lockstep_common::codec::{self, TensorSpec};
use lockstep_common::config::JobConfig;
use lockstep_common::optim::Optimizer;
use lockstep_common::protocol::indices_digest;
use lockstep_common::wire::{self, pb, CoordinatorClient};
use lockstep_common::{MAX_MESSAGE_BYTES, PROTOCOL_VERSION};
use lockstep_tests::*;
use pb::coordinator_message::Kind as FromCoordinator;
use pb::worker_message::Kind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;

const TOKEN: &str = "adversarial-probe-token";
/// 640 training samples in batches of 64: ten steps.
const SAMPLES: u64 = 640;

// ---------------------------------------------------------------------------------------------
// The job: a real coordinator and real workers

struct Job {
    coordinator: Running,
    workers: Vec<Child>,
    url: String,
    run: PathBuf,
    dir: tempfile::TempDir,
}

impl Job {
    /// `lockstep train --external-workers --workers WORKERS --epochs 1` on `SAMPLES` samples
    /// (unless `env` says otherwise), with `real` real workers joined, the first as rank 0.
    fn start(backend: &str, workers: u32, real: usize, env: &[(&str, &str)]) -> Job {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let port = free_port();
        let mut cmd = train_command(&run);
        cmd.args(["--external-workers", "--epochs", "1", "--backend", backend])
            .args(["--workers", &workers.to_string()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            // With external workers the dashboard defaults to 0.0.0.0:9090, which the jobs
            // of these tests, run in parallel, cannot all have.
            .args(["--metrics-addr", "off"])
            .env("LOCKSTEP_TOKEN", TOKEN)
            .env("LOCKSTEP_TRAIN_SAMPLES", SAMPLES.to_string());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut coordinator = Running::start(&mut cmd);
        coordinator.wait_for("waiting for", Duration::from_secs(60));
        let url = format!("http://127.0.0.1:{port}");
        let mut job = Job {
            coordinator,
            workers: Vec::new(),
            url,
            run,
            dir,
        };
        for i in 0..real {
            let log = job.dir.path().join(format!("worker-{i}.log"));
            job.workers.push(real_worker(&job.url, &log));
            job.coordinator
                .wait_for(&format!("joined as rank {i}"), Duration::from_secs(60));
        }
        job
    }

    /// Waits for the job to end and checks what every probe expects of it: no panic, exit 0,
    /// every one of `samples` samples applied once, the real workers finished too. Returns the
    /// coordinator's log.
    fn finish_ok(self, samples: u64) -> String {
        let Job {
            coordinator,
            mut workers,
            run,
            dir,
            ..
        } = self;
        let (status, log) = coordinator.finish(Duration::from_secs(120));
        assert!(
            !log.contains("panicked") && status.code() != Some(101),
            "the coordinator panicked:\n{log}"
        );
        assert!(
            status.success(),
            "the job did not finish ({status}):\n{log}"
        );
        for (i, worker) in workers.iter_mut().enumerate() {
            let worker_log = std::fs::read_to_string(dir.path().join(format!("worker-{i}.log")))
                .unwrap_or_default();
            let status = wait_child(worker, Duration::from_secs(30));
            assert!(
                status.is_some_and(|s| s.success()),
                "real worker {i} did not finish ({status:?}):\n{worker_log}"
            );
        }
        let last = metrics(&run).pop().expect("an epoch's metrics");
        assert_eq!(
            (
                last["samples_applied"].as_u64(),
                last["samples_covered"].as_u64()
            ),
            (Some(samples), Some(samples)),
            "samples lost or counted twice:\n{log}"
        );
        log
    }
}

fn real_worker(url: &str, log: &Path) -> Child {
    Command::new(worker())
        .args(["--coordinator", url, "--threads", "1"])
        .args(["--connect-timeout", "30", "--rejoin-timeout", "0"])
        .env("LOCKSTEP_TOKEN", TOKEN)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("spawn lockstep-worker")
}

/// The child's status once it exits within `limit`; killed and `None` otherwise.
fn wait_child(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("wait") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// The coordinator's log line that names `worker_id`, containing `what`.
fn line_naming<'a>(log: &'a str, worker_id: &str, what: &str) -> &'a str {
    log.lines()
        .find(|l| l.contains(&format!("({worker_id} at 127.0.0.1:")) && l.contains(what))
        .unwrap_or_else(|| panic!("no log line names {worker_id} with `{what}`:\n{log}"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// The fake worker

#[derive(Clone)]
struct Attach(Token);

impl tonic::service::Interceptor for Attach {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        self.0.client_attach(request)
    }
}

type Client = CoordinatorClient<InterceptedService<Channel, Attach>>;

/// A client with the job's token that sends messages of any size (the coordinator must refuse
/// them, not the fake's own client).
async fn client(url: &str, token: &str) -> Client {
    let channel = Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .expect("the coordinator is reachable");
    CoordinatorClient::with_interceptor(channel, Attach(Token::new(token).unwrap()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(usize::MAX)
}

fn join_request(worker_id: &str) -> pb::JoinRequest {
    pb::JoinRequest {
        protocol_version: PROTOCOL_VERSION,
        worker_id: worker_id.to_string(),
        device: "cpu".into(),
        pid: std::process::id(),
        ..Default::default()
    }
}

fn message(kind: Kind) -> pb::WorkerMessage {
    pb::WorkerMessage { kind: Some(kind) }
}

/// A member of the job that does whatever the test says, with heartbeats kept going.
struct Fake {
    client: Client,
    reply: pb::JoinReply,
    out: mpsc::UnboundedSender<pb::WorkerMessage>,
    inbound: tonic::Streaming<pb::CoordinatorMessage>,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Fake {
    /// Joins as `worker_id` and opens its step stream with Hello.
    async fn join(url: &str, worker_id: &str) -> Fake {
        let mut client = client(url, TOKEN).await;
        let reply = client
            .join(join_request(worker_id))
            .await
            .expect("the fake is admitted")
            .into_inner();
        let (out, rx) = mpsc::unbounded_channel();
        out.send(message(Kind::Hello(pb::Hello {
            member: reply.member,
        })))
        .unwrap();
        let inbound = client
            .train(UnboundedReceiverStream::new(rx))
            .await
            .expect("the fake's step stream opens")
            .into_inner();
        let beat = out.clone();
        let heartbeat = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let beat_msg = message(Kind::Heartbeat(pb::Heartbeat {}));
                if beat.send(beat_msg).is_err() {
                    break;
                }
            }
        });
        Fake {
            client,
            reply,
            out,
            inbound,
            heartbeat,
        }
    }

    fn member(&self) -> u64 {
        self.reply.member
    }

    fn layout(&self) -> Vec<TensorSpec> {
        wire::layout_from_wire(&self.reply.layout)
    }

    fn params(&self) -> usize {
        codec::layout_len(&self.layout())
    }

    fn send(&self, kind: Kind) {
        let _ = self.out.send(message(kind));
    }

    /// The next message from the coordinator; `None` once the stream ended.
    async fn next(&mut self, limit: Duration) -> Option<FromCoordinator> {
        match tokio::time::timeout(limit, self.inbound.message()).await {
            Ok(Ok(Some(m))) => m.kind,
            Ok(_) => None,
            Err(_) => panic!("the coordinator sent nothing for {limit:?}"),
        }
    }

    /// The next work, past configuration, averages and rendezvous.
    async fn work(&mut self) -> pb::Work {
        loop {
            match self.next(Duration::from_secs(30)).await {
                Some(FromCoordinator::Work(w)) => return w,
                Some(FromCoordinator::Abort(a)) => panic!("removed before any work: {}", a.reason),
                None => panic!("the step stream ended before any work"),
                Some(_) => {}
            }
        }
    }

    /// Waits for the average of step `step` (from 0), proof that the step was applied.
    async fn reduced(&mut self, step: u64) {
        loop {
            match self.next(Duration::from_secs(30)).await {
                Some(FromCoordinator::Reduced(r)) if r.id.is_some_and(|id| id.step == step) => {
                    return
                }
                Some(FromCoordinator::Abort(a)) => panic!("the fake was removed: {}", a.reason),
                None => panic!("the step stream ended"),
                Some(_) => {}
            }
        }
    }

    /// Checks that the coordinator does not remove the fake for `limit`.
    async fn stays_for(&mut self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while let Ok(msg) = tokio::time::timeout_at(deadline, self.inbound.message()).await {
            match msg.ok().flatten().and_then(|m| m.kind) {
                Some(FromCoordinator::Abort(a)) => panic!("the fake was removed: {}", a.reason),
                None => panic!("the step stream ended"),
                Some(_) => {}
            }
        }
    }

    /// The reason the coordinator gives when it removes the fake.
    async fn removal(&mut self) -> String {
        loop {
            match self.next(Duration::from_secs(30)).await {
                Some(FromCoordinator::Abort(a)) => return a.reason,
                Some(FromCoordinator::Finish(f)) => {
                    panic!("the job finished without removing the fake: {}", f.message)
                }
                None => panic!("the step stream ended without an Abort"),
                Some(_) => {}
            }
        }
    }

    /// Leaves on purpose, as a real worker does on a signal.
    async fn leave(mut self, reason: &str) {
        let request = pb::LeaveRequest {
            member: self.member(),
            reason: reason.into(),
        };
        self.client
            .leave(request)
            .await
            .expect("a member may leave");
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

/// A `StepDone` for `work`'s first shard (the fake's own), stamped `id`.
fn step_done(work: &pb::Work, id: Option<pb::StepId>) -> Kind {
    let shard = &work.shards[0];
    Kind::StepDone(pb::StepDone {
        id,
        shards: vec![pb::ShardDone {
            shard: shard.index,
            samples: shard.count,
            indices_digest: indices_digest(&shard.indices),
        }],
        samples: shard.count,
        loss_sum: 1.0,
        correct: 0,
        compute_ms: 1.0,
        wait_ms: 0.0,
        apply_ms: 0.0,
    })
}

/// The fake's gradient of `work`'s first shard (the fake's own), with `data` as its values.
fn gradient(work: &pb::Work, data: Bytes) -> Kind {
    let shard = &work.shards[0];
    Kind::Gradient(pb::ShardGradient {
        id: work.id,
        shard: shard.index,
        samples: shard.count,
        loss_sum: 1.0,
        correct: 0,
        data,
        compute_ms: 1.0,
        indices_digest: indices_digest(&shard.indices),
        wait_ms: 0.0,
        apply_ms: 0.0,
    })
}

fn zeros(params: usize) -> Bytes {
    Bytes::from(vec![0u8; params * 4])
}

// ---------------------------------------------------------------------------------------------
// A member that breaks the protocol is dropped, named, and the job carries on

/// A grpc job of two: the real worker (rank 0) and a fake (rank 1, `probe/NAME`) that answers
/// its first work with `misbehave`'s messages. The fake must be removed for `cause`, the log
/// must name it with the cause, and the job must finish with the real worker alone.
fn a_member_that_sends(
    name: &str,
    cause: &str,
    misbehave: impl FnOnce(&pb::Work, usize) -> Vec<Kind>,
) {
    let job = Job::start("grpc", 2, 1, &[]);
    let worker_id = format!("probe/{name}");
    let reason = runtime().block_on(async {
        let mut fake = Fake::join(&job.url, &worker_id).await;
        let work = fake.work().await;
        for kind in misbehave(&work, fake.params()) {
            fake.send(kind);
        }
        fake.removal().await
    });
    assert!(
        reason.starts_with("removed from the job: ") && reason.contains(cause),
        "the fake was removed for another reason: {reason}"
    );
    let log = job.finish_ok(SAMPLES);
    let line = line_naming(&log, &worker_id, "carrying on with 1 worker(s)");
    assert!(line.contains(cause), "{line}");
    eprintln!("{line}");
}

#[test]
fn a_step_done_on_a_grpc_job_drops_the_sender_and_the_job_carries_on() {
    a_member_that_sends(
        "step-done",
        "was dropped: it sent a StepDone, which the grpc backend does not use",
        |work, _| vec![step_done(work, work.id)],
    );
}

#[test]
fn a_gradient_without_its_step_id_drops_the_sender_and_is_not_taken_for_step_0() {
    a_member_that_sends(
        "no-step-id",
        "breaks the protocol (ShardGradient without its step id)",
        |work, params| {
            let Kind::Gradient(mut g) = gradient(work, zeros(params)) else {
                unreachable!()
            };
            g.id = None;
            vec![Kind::Gradient(g)]
        },
    );
}

#[test]
fn a_gradient_for_a_step_never_sent_drops_the_sender_and_the_job_carries_on() {
    a_member_that_sends(
        "future-step",
        "it reported epoch 1 step 9, whose work was never sent",
        |work, params| {
            let Kind::Gradient(mut g) = gradient(work, zeros(params)) else {
                unreachable!()
            };
            g.id = g.id.map(|id| pb::StepId { step: 8, ..id });
            vec![Kind::Gradient(g)]
        },
    );
}

#[test]
fn a_gradient_of_the_wrong_length_drops_the_sender_naming_both_sizes() {
    a_member_that_sends(
        "wrong-length",
        "malformed gradient: shard 1 of epoch 1 step 1 has 12 bytes, the model 358440",
        |work, _| vec![gradient(work, Bytes::from(vec![0u8; 12]))],
    );
}

#[test]
fn a_nan_gradient_from_one_worker_drops_it_and_the_others_recompute_its_shard() {
    a_member_that_sends(
        "nan",
        "it sent shard 1 of epoch 1 step 1 with a non-finite value",
        |work, params| {
            let nan = Bytes::from(f32::NAN.to_le_bytes().repeat(params));
            vec![gradient(work, nan)]
        },
    );
}

#[test]
fn a_message_over_the_64_mib_limit_drops_the_sender_and_the_job_carries_on() {
    a_member_that_sends(
        "oversized",
        "breaks the protocol (a message over the 64 MiB limit: ",
        |work, _| {
            vec![gradient(
                work,
                Bytes::from(vec![0u8; MAX_MESSAGE_BYTES + 1]),
            )]
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Late, repeated and stale messages are dropped; their sender stays

#[test]
fn past_and_duplicate_gradients_are_dropped_and_their_sender_stays_in_the_job() {
    let job = Job::start("grpc", 2, 1, &[]);
    let worker_id = "probe/past-and-duplicate";
    runtime().block_on(async {
        let mut fake = Fake::join(&job.url, worker_id).await;
        let zero = zeros(fake.params());
        let (first, second) = (fake.work().await, fake.work().await);
        // Step 1, twice: the copy is dropped; the step is applied with the first.
        fake.send(gradient(&first, zero.clone()));
        fake.send(gradient(&first, zero.clone()));
        fake.reduced(0).await;
        // Step 1 again, now finished: dropped too.
        fake.send(gradient(&first, zero.clone()));
        // Still a member whose gradients count: step 2 waits for it and is applied.
        fake.send(gradient(&second, zero));
        fake.reduced(1).await;
        fake.leave("probe finished").await;
    });
    let log = job.finish_ok(SAMPLES);
    line_naming(&log, worker_id, "left (probe finished)");
    assert!(
        !log.contains(&format!("({worker_id} at 127.0.0.1:")) || !log.contains("was dropped"),
        "the fake was dropped for a late or repeated message:\n{log}"
    );
}

#[test]
fn a_report_of_an_earlier_membership_is_dropped_and_its_sender_stays_in_the_job() {
    let job = Job::start(
        "tcp",
        2,
        1,
        &[("RUST_LOG", "info,lockstep_coordinator::engine=debug")],
    );
    let worker_id = "probe/stale-membership";
    let stale = runtime().block_on(async {
        let mut fake = Fake::join(&job.url, worker_id).await;
        let work = fake.work().await;
        let id = work.id.expect("work has its step id");
        let stale = id.membership_epoch - 1;
        let stamp = pb::StepId {
            membership_epoch: stale,
            ..id
        };
        fake.send(step_done(&work, Some(stamp)));
        fake.stays_for(Duration::from_secs(1)).await;
        fake.leave("probe finished").await;
        stale
    });
    let log = job.finish_ok(SAMPLES);
    line_naming(
        &log,
        worker_id,
        &format!("dropping a report for epoch 1 step 1 of membership {stale} from worker rank 1"),
    );
    line_naming(&log, worker_id, "left (probe finished)");
}

// ---------------------------------------------------------------------------------------------
// What only a member may do is refused to everybody else

async fn open_stream(client: &mut Client, member: u64) -> Result<(), tonic::Status> {
    let hello = message(Kind::Hello(pb::Hello { member }));
    client
        .train(tokio_stream::iter(vec![hello]))
        .await
        .map(|_| ())
}

fn assert_refused(result: Result<impl std::fmt::Debug, tonic::Status>, code: Code, text: &str) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(text), "{status:?}");
}

#[test]
fn a_leave_a_state_upload_or_a_step_stream_from_a_non_member_is_refused_with_an_rpc_error() {
    let mut job = Job::start("tcp", 2, 1, &[]);
    // One runtime for both halves: the fake's connection lives on it.
    let rt = runtime();
    let member = rt.block_on(async {
        // The fake is the job's second member; the job waits for it while the probes run.
        let member = Fake::join(&job.url, "probe/member").await;
        let mut stranger = client(&job.url, TOKEN).await;
        let spoofed = 999_999;
        let leave = pb::LeaveRequest {
            member: spoofed,
            reason: "spoofed".into(),
        };
        assert_refused(
            stranger.leave(leave).await,
            Code::FailedPrecondition,
            "member 999999 is not in the job",
        );
        let chunks = wire::state_chunks(&[1, 2, 3], 0, spoofed);
        assert_refused(
            stranger.push_state(tokio_stream::iter(chunks)).await,
            Code::FailedPrecondition,
            "member 999999 is not in the job",
        );
        let chunks = wire::state_chunks(&[1, 2, 3], 0, 0);
        assert_refused(
            stranger.push_state(tokio_stream::iter(chunks)).await,
            Code::FailedPrecondition,
            "member 0 is not in the job",
        );
        assert_refused(
            open_stream(&mut stranger, spoofed).await,
            Code::FailedPrecondition,
            "member 999999 is not in the job",
        );
        assert_refused(
            open_stream(&mut stranger, member.member()).await,
            Code::FailedPrecondition,
            "rank 1 already has a step stream",
        );
        assert_refused(
            stranger.join(join_request("probe/one-too-many")).await,
            Code::ResourceExhausted,
            "already has its 2 workers",
        );
        let mut wrong = client(&job.url, "not-the-token").await;
        assert_refused(
            wrong.join(join_request("probe/wrong-token")).await,
            Code::Unauthenticated,
            "wrong job token",
        );
        member
    });
    // The fake leaves a running job, which carries on with the real worker. (Leaving before
    // the training starts would make the job wait for a second worker instead.)
    job.coordinator
        .wait_for("all 2 workers connected", Duration::from_secs(60));
    rt.block_on(member.leave("probe finished"));
    let log = job.finish_ok(SAMPLES);
    for refusal in [
        "refused a Leave from 127.0.0.1:",
        "refused a state upload from 127.0.0.1:",
        "refused a step stream from 127.0.0.1:",
        "refused worker probe/one-too-many at 127.0.0.1:",
    ] {
        assert!(log.contains(refusal), "`{refusal}` missing:\n{log}");
    }
}

#[test]
fn a_state_upload_to_a_grpc_job_is_refused_even_from_a_member() {
    let job = Job::start("grpc", 2, 1, &[]);
    runtime().block_on(async {
        let mut member = Fake::join(&job.url, "probe/uploader").await;
        let _ = member.work().await;
        // A state that parses for this model, placed at the epoch's end: adopted, it would
        // replace the coordinator's replica, its evaluation and model.safetensors.
        let config = JobConfig::from_toml_str(&member.reply.job_config_toml).unwrap();
        let n = member.params();
        let state = TrainingState {
            params: vec![0.5; n],
            optimizer: Optimizer::new(config.optimizer.clone(), n).state().clone(),
            position: Position { epoch: 1, step: 0 },
        };
        let bytes = state.to_bytes(&member.layout(), "").unwrap();
        let chunks = wire::state_chunks(&bytes, 0, member.member());
        assert_refused(
            member.client.push_state(tokio_stream::iter(chunks)).await,
            Code::FailedPrecondition,
            "the grpc backend takes no state uploads",
        );
        member.leave("probe finished").await;
    });
    let log = job.finish_ok(SAMPLES);
    assert!(
        log.contains("refused a state upload from 127.0.0.1:"),
        "{log}"
    );
}

// ---------------------------------------------------------------------------------------------
// A peer's text is bounded and escaped

#[test]
fn a_one_megabyte_worker_id_is_refused_at_join_naming_the_field_and_the_limit() {
    let job = Job::start("grpc", 2, 1, &[]);
    runtime().block_on(async {
        let mut c = client(&job.url, TOKEN).await;
        let status = c
            .join(join_request(&"w".repeat(1 << 20)))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(
            status.message(),
            "join refused: JoinRequest.worker_id is 1048576 bytes long; at most 256 are accepted"
        );
        // The job's second worker, so the job goes on. It leaves once training has started:
        // a worker that leaves before that is only dropped from the wait for the workers.
        let mut second = Fake::join(&job.url, "probe/second").await;
        let _ = second.work().await;
        second.leave("probe finished").await;
    });
    let log = job.finish_ok(SAMPLES);
    assert!(
        log.contains("refused a join from 127.0.0.1:")
            && log.contains("JoinRequest.worker_id is 1048576 bytes long"),
        "{log}"
    );
    assert!(
        log.lines().all(|l| l.len() < 2000),
        "a log line repeats the id"
    );
}

#[test]
fn control_characters_in_a_worker_id_are_escaped_in_the_log() {
    let job = Job::start("grpc", 2, 1, &[]);
    let forged = "2031-01-01T00:00:00.000000Z ERROR lockstep: forged";
    let worker_id = format!("probe/evil\n{forged}\x1b[2J\u{202e}");
    runtime().block_on(async {
        let mut fake = Fake::join(&job.url, &worker_id).await;
        let _ = fake.work().await;
        fake.send(Kind::Digest(pb::Digest {
            id: None,
            sha256: String::new(),
        }));
        fake.removal().await
    });
    let log = job.finish_ok(SAMPLES);
    let escaped = format!("probe/evil\\n{forged}\\u{{1b}}[2J\\u{{202e}}");
    assert!(
        log.contains(&format!("worker {escaped} (cpu) at 127.0.0.1:")),
        "the join is not logged with the escaped id:\n{log}"
    );
    eprintln!("{}", line_naming(&log, &escaped, "was dropped"));
    assert!(
        !log.lines().any(|l| l.starts_with(forged)) && !log.contains('\x1b'),
        "the worker id forged a log line or reached the terminal:\n{log}"
    );
}

// ---------------------------------------------------------------------------------------------
// A flood of streams that never say who they are

#[test]
fn a_flood_of_idle_step_streams_is_refused_while_real_workers_train() {
    // The job must outlast the heartbeat timeout, or its end closes the idle streams before
    // they are refused: 3,750 steps of 16 samples take seconds, each a round trip through the
    // coordinator, however fast the machine computes.
    let samples = 60_000;
    let job = Job::start(
        "grpc",
        2,
        2,
        &[
            ("LOCKSTEP_TRAIN_SAMPLES", &samples.to_string()),
            ("LOCKSTEP_BATCH_SIZE", "16"),
            ("LOCKSTEP_CLUSTER__HEARTBEAT_TIMEOUT_MS", "1500"),
        ],
    );
    let mut job = job;
    job.coordinator
        .wait_for("all 2 workers connected", Duration::from_secs(60));
    let refusals = runtime().block_on(async {
        let mut streams = Vec::new();
        for _ in 0..4 {
            let c = client(&job.url, TOKEN).await;
            for _ in 0..50 {
                let mut c = c.clone();
                streams.push(tokio::spawn(async move {
                    c.train(tokio_stream::pending::<pb::WorkerMessage>())
                        .await
                        .map(|_| ())
                }));
            }
        }
        let mut refusals = Vec::new();
        for s in streams {
            let result = tokio::time::timeout(Duration::from_secs(30), s)
                .await
                .expect("an idle stream is refused within 30 s")
                .unwrap();
            refusals.push(result.expect_err("an idle stream is refused"));
        }
        refusals
    });
    assert_eq!(refusals.len(), 200);
    for status in &refusals {
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert!(
            status
                .message()
                .contains("must start with Hello within 1.5s"),
            "{status:?}"
        );
    }
    let log = job.finish_ok(samples);
    assert!(log.contains("no Hello within 1.5s"), "{log}");
}
