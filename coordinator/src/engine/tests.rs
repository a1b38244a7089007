//! The engine driven through the service→engine event channel, with the test playing the
//! workers: what a lost, misbehaving or joining worker does to a running job.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use lockstep_common::checkpoint::{Position, TrainingState};
use lockstep_common::codec;
use lockstep_common::config::{Backend, JobConfig};
use lockstep_common::mnist::{Mnist, IMAGE_PIXELS};
use lockstep_common::model::{BatchStats, Network};
use lockstep_common::optim::Optimizer;
use lockstep_common::protocol::{
    indices_digest, FromCoordinator, FromWorker, ShardDone, ShardGradient, Stamp, StepDone, StepId,
    Work,
};
use tokio::sync::mpsc;
use tonic::Status;

use super::{Engine, Start, Window};
use crate::error::{JobError, Stopped};
use crate::membership::{Joining, MemberId, Membership};
use crate::observe::{MemberEvent, Observer, Observers, StepRecord};
use crate::run_dir::{EpochMetrics, RunDir, Summary};
use crate::service::{Event, Shared, StateStore};

/// 32 training samples, batch 8: 4 steps an epoch.
const SAMPLES: usize = 32;

/// What the engine told its observers, one line each.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<String>>>);

impl Observer for Recorder {
    fn step(&mut self, r: &StepRecord) {
        let ranks: Vec<String> = r
            .timings
            .iter()
            .map(|t| {
                format!(
                    "{}:{:.1}/{:.1}/{:.1}",
                    t.rank,
                    t.compute_seconds * 1e3,
                    t.wait_seconds * 1e3,
                    t.apply_seconds * 1e3
                )
            })
            .collect();
        self.0.lock().unwrap().push(format!(
            "step {}.{} of {} samples {} workers {} [{}]",
            r.epoch,
            r.step,
            r.steps_per_epoch,
            r.samples,
            r.workers,
            ranks.join(" ")
        ));
    }
    fn epoch(&mut self, m: &EpochMetrics) {
        self.0.lock().unwrap().push(format!("epoch {}", m.epoch));
    }
    fn member(&mut self, e: &MemberEvent) {
        self.0.lock().unwrap().push(format!(
            "{} rank {} {} workers {}",
            e.kind.as_str(),
            e.rank,
            e.worker_id,
            e.workers
        ));
    }
    fn checkpoint(&mut self, path: &std::path::Path) {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        self.0.lock().unwrap().push(format!("checkpoint {name}"));
    }
    fn finished(&mut self, s: &Summary) {
        self.0
            .lock()
            .unwrap()
            .push(format!("finished {}", s.epochs));
    }
}

struct Job {
    events: mpsc::UnboundedSender<Event>,
    seen: Recorder,
    shared: Arc<Shared>,
    engine: tokio::task::JoinHandle<Result<Summary, Stopped>>,
    dir: tempfile::TempDir,
    params: usize,
}

struct Fake {
    member: MemberId,
    rx: mpsc::Receiver<Result<lockstep_common::wire::pb::CoordinatorMessage, Status>>,
}

fn job(backend: Backend, workers: u32, shards: u32, min: u32, max: u32) -> Job {
    let mut config = JobConfig::preset("softmax").unwrap();
    config.backend = backend;
    config.workers = workers;
    config.epochs = 1;
    config.batch_size = 8;
    config.checkpoint_every_steps = 0;
    config.cluster.shards = shards;
    config.cluster.min_workers = min;
    config.cluster.max_workers = max;
    config.cluster.heartbeat_timeout_ms = 60_000;
    config.resolve();
    config.validate().unwrap();
    let data = Arc::new(Mnist {
        train_images: (0..SAMPLES * IMAGE_PIXELS)
            .map(|i| (i % 251) as u8)
            .collect(),
        train_labels: (0..SAMPLES).map(|i| (i % 10) as u8).collect(),
        test_images: vec![7; 20 * IMAGE_PIXELS],
        test_labels: (0..20).map(|i| (i % 10) as u8).collect(),
    });
    let network = Network::new(&config.model);
    let params = network.init_params(config.seed);
    let n = params.len();
    let dir = tempfile::tempdir().unwrap();
    let toml = config.to_toml_string();
    let run = RunDir::create(&dir.path().join("run"), &toml).unwrap();
    let (events, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        config: config.clone(),
        config_toml: toml,
        layout: network.layout().to_vec(),
        steps_per_epoch: 4,
        states: std::sync::Mutex::new(StateStore::default()),
        membership: std::sync::Mutex::new(Membership::new(config.max_workers())),
        started: std::time::Instant::now(),
        events: events.clone(),
    });
    let start = Start {
        state: TrainingState {
            optimizer: Optimizer::new(config.optimizer.clone(), n).state().clone(),
            params,
            position: Position::default(),
        },
        account: None,
        checkpoint: None,
        last_metrics: None,
    };
    let mut engine = Engine::new(shared.clone(), rx, data, network, start, run, None).unwrap();
    let seen = Recorder::default();
    let mut observers = Observers::default();
    observers.add(seen.clone());
    engine.observe(observers);
    Job {
        events,
        seen,
        shared,
        engine: tokio::spawn(engine.run()),
        dir,
        params: n,
    }
}

impl Job {
    fn join(&self, pid: u32) -> Fake {
        let member = self
            .shared
            .members()
            .admit(
                Joining {
                    worker_id: format!("test/pid {pid}"),
                    device: "cpu".into(),
                    peer: "127.0.0.1:1".into(),
                    pid,
                },
                self.shared.now_ms(),
            )
            .unwrap();
        self.shared.members().open_stream(member.id).unwrap();
        let (tx, rx) = mpsc::channel(256);
        self.events
            .send(Event::StreamOpened {
                member: member.id,
                tx,
            })
            .unwrap();
        Fake {
            member: member.id,
            rx,
        }
    }

    fn send(&self, fake: &Fake, msg: FromWorker) {
        self.events
            .send(Event::Message {
                member: fake.member,
                msg,
            })
            .unwrap();
    }

    fn close(&self, fake: &Fake) {
        self.events
            .send(Event::StreamClosed {
                member: fake.member,
                reason: "the worker closed its stream".into(),
            })
            .unwrap();
    }

    /// A shard gradient of zeros for `work`'s shard at position `i`.
    fn gradient(&self, work: &Work, i: usize) -> FromWorker {
        let s = &work.shards[i];
        FromWorker::Gradient(ShardGradient {
            id: work.id,
            shard: s.index,
            stats: BatchStats {
                loss_sum: 1.0,
                correct: 0,
                samples: s.count(),
            },
            data: Bytes::from(vec![0u8; self.params * 4]),
            compute_ms: 0.1,
            indices_digest: indices_digest(&s.indices),
            wait_ms: 0.2,
            apply_ms: 0.3,
        })
    }

    fn step_done(work: &Work) -> FromWorker {
        FromWorker::StepDone(StepDone {
            id: work.id,
            shards: work
                .shards
                .iter()
                .map(|s| ShardDone {
                    shard: s.index,
                    samples: s.count(),
                    indices_digest: indices_digest(&s.indices),
                })
                .collect(),
            stats: BatchStats::default(),
            compute_ms: 0.1,
            wait_ms: 0.2,
            apply_ms: 0.3,
        })
    }

    /// The digest every replica holds: the fakes send zero gradients, and SGD (the softmax
    /// preset) does not move the parameters on a zero gradient.
    fn digest(&self) -> String {
        let network = Network::new(&self.shared.config.model);
        let optimizer = Optimizer::new(self.shared.config.optimizer.clone(), self.params);
        codec::state_digest(
            &network.init_params(self.shared.config.seed),
            optimizer.state(),
        )
    }

    /// What the observers were told so far.
    fn seen(&self) -> Vec<String> {
        self.seen.0.lock().unwrap().clone()
    }

    async fn result(self) -> (Result<Summary, Stopped>, tempfile::TempDir) {
        let r = tokio::time::timeout(Duration::from_secs(20), self.engine)
            .await
            .expect("the job ends")
            .unwrap();
        (r, self.dir)
    }
}

impl Fake {
    async fn recv(&mut self) -> FromCoordinator {
        let msg = tokio::time::timeout(Duration::from_secs(10), self.rx.recv())
            .await
            .expect("a message within 10 s")
            .expect("the stream is open")
            .unwrap();
        FromCoordinator::try_from(msg).unwrap()
    }

    async fn work(&mut self) -> Work {
        loop {
            match self.recv().await {
                FromCoordinator::Work(w) => return w,
                FromCoordinator::Reduced { .. } | FromCoordinator::Configure(_) => {}
                other => panic!("expected work, got {other:?}"),
            }
        }
    }
}

/// Answers a piece of grpc work: its gradients, and the final digest after the epoch's last.
fn answer(job: &Job, fake: &Fake, w: &Work) {
    for i in 0..w.shards.len() {
        job.send(fake, job.gradient(w, i));
    }
    if w.last_of_epoch {
        job.send(
            fake,
            FromWorker::Digest {
                id: w.id,
                sha256: job.digest(),
            },
        );
    }
}

/// Plays a grpc worker to the end of the job: answers every piece of work.
async fn serve_grpc(job: &Job, fake: &mut Fake) -> String {
    loop {
        match fake.recv().await {
            FromCoordinator::Work(w) => answer(job, fake, &w),
            FromCoordinator::Finish(m) => return m,
            FromCoordinator::Abort(reason) => return reason,
            _ => {}
        }
    }
}

fn metrics(dir: &tempfile::TempDir) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.path().join("run/metrics.jsonl")).unwrap();
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

#[tokio::test]
async fn a_lost_workers_undelivered_shards_go_to_the_survivor_in_the_same_step() {
    let job = job(Backend::Grpc, 2, 4, 1, 2);
    let (mut a, mut b) = (job.join(1), job.join(2));
    assert!(matches!(a.recv().await, FromCoordinator::Configure(c) if c.state_version.is_some()));
    let w0 = a.work().await;
    let v0 = b.work().await;
    assert_eq!(w0.id.id, StepId::new(0, 0));
    assert_eq!(
        w0.shards.iter().map(|s| s.index).collect::<Vec<_>>(),
        [0, 1]
    );
    assert_eq!(
        v0.shards.iter().map(|s| s.index).collect::<Vec<_>>(),
        [2, 3]
    );
    job.send(&a, job.gradient(&w0, 0));
    job.send(&a, job.gradient(&w0, 1));
    job.send(&b, job.gradient(&v0, 0));
    job.close(&b);
    // Steps 1 and 2 were out too; the survivor gets b's shard 3 of step 0 (shard 2 is in and
    // kept), then b's shards of steps 1 and 2.
    let mut works = vec![a.work().await, a.work().await];
    for _ in 0..3 {
        works.push(a.work().await);
    }
    let resent: Vec<(u64, Vec<u32>)> = works[2..]
        .iter()
        .map(|w| (w.id.id.step, w.shards.iter().map(|s| s.index).collect()))
        .collect();
    assert_eq!(resent, [(0, vec![3]), (1, vec![2, 3]), (2, vec![2, 3])]);
    answer(&job, &a, &works[2]);
    let reduced = loop {
        if let FromCoordinator::Reduced { id, data } = a.recv().await {
            break (id, data);
        }
    };
    assert_eq!(reduced.0.id, StepId::new(0, 0));
    assert_eq!(reduced.1.len(), job.params * 4);
    // The survivor finishes the job alone.
    for w in [&works[0], &works[1], &works[3], &works[4]] {
        answer(&job, &a, w);
    }
    assert_eq!(serve_grpc(&job, &mut a).await, "training finished");
    let seen = job.seen();
    let (result, dir) = job.result().await;
    let summary = result.unwrap();
    assert_eq!(summary.membership_changes, 1);
    // The observers saw it all, in order: the worker's timings come by rank, the lost worker's
    // shard of step 0 (in before it left) no longer counts as its own.
    assert_eq!(
        seen,
        [
            "joined rank 0 test/pid 1 workers 2",
            "joined rank 1 test/pid 2 workers 2",
            "lost rank 1 test/pid 2 workers 1",
            "step 1.1 of 4 samples 8 workers 1 [0:0.1/0.2/0.3]",
            "step 1.2 of 4 samples 8 workers 1 [0:0.1/0.2/0.3]",
            "step 1.3 of 4 samples 8 workers 1 [0:0.1/0.2/0.3]",
            "step 1.4 of 4 samples 8 workers 1 [0:0.1/0.2/0.3]",
            "checkpoint epoch-0001.safetensors",
            "epoch 1",
            "finished 1",
        ]
    );
    let m = metrics(&dir);
    assert_eq!(
        (m["samples_covered"].as_u64(), m["samples_applied"].as_u64()),
        (Some(32), Some(32))
    );
    assert_eq!(m["workers"], 1);
}

#[tokio::test]
async fn a_step_done_on_a_grpc_job_drops_the_worker_and_the_job_carries_on() {
    let job = job(Backend::Grpc, 2, 2, 1, 2);
    let (mut a, mut b) = (job.join(1), job.join(2));
    let v0 = b.work().await;
    job.send(&b, Job::step_done(&v0));
    let reason = serve_grpc(&job, &mut b).await;
    assert!(
        reason.contains("removed from the job") && reason.contains("StepDone"),
        "{reason}"
    );
    assert_eq!(serve_grpc(&job, &mut a).await, "training finished");
    let (result, _dir) = job.result().await;
    result.unwrap();
}

#[tokio::test]
async fn a_gradient_of_the_wrong_size_drops_the_worker_naming_the_fault() {
    let job = job(Backend::Grpc, 2, 2, 1, 2);
    let (mut a, mut b) = (job.join(1), job.join(2));
    let v0 = b.work().await;
    let FromWorker::Gradient(mut g) = job.gradient(&v0, 0) else {
        unreachable!()
    };
    g.data = Bytes::from(vec![0u8; 12]);
    job.send(&b, FromWorker::Gradient(g));
    let reason = serve_grpc(&job, &mut b).await;
    assert!(
        reason.contains("malformed gradient") && reason.contains("12 bytes"),
        "{reason}"
    );
    assert_eq!(serve_grpc(&job, &mut a).await, "training finished");
    job.result().await.0.unwrap();
}

#[tokio::test]
async fn below_min_workers_the_job_stops_naming_every_lost_worker() {
    let job = job(Backend::Grpc, 2, 2, 2, 2);
    let (mut a, b) = (job.join(1), job.join(2));
    let _ = a.work().await;
    job.close(&b);
    let reason = serve_grpc(&job, &mut a).await;
    assert!(reason.contains("worker rank 1 (test/pid 2"), "{reason}");
    let (result, _dir) = job.result().await;
    let stopped = result.unwrap_err();
    assert!(matches!(
        stopped.error,
        JobError::TooFewWorkers {
            left: 1,
            min: 2,
            ..
        }
    ));
    let text = stopped.to_string();
    assert!(
        text.contains("failed (the worker closed its stream) during epoch 1 step 1/4"),
        "{text}"
    );
    assert!(
        text.contains("cluster.min_workers is 2") && text.contains("training stopped"),
        "{text}"
    );
}

#[tokio::test]
async fn a_grpc_replacement_enters_with_the_current_state_and_the_averages_still_out() {
    let job = job(Backend::Grpc, 1, 2, 1, 2);
    let mut a = job.join(1);
    let w0 = a.work().await;
    assert_eq!(w0.shards.len(), 2, "alone, it computes both shards");
    let mut c = job.join(3);
    let FromCoordinator::Configure(conf) = c.recv().await else {
        panic!("Configure first")
    };
    let version = conf.state_version.expect("a state to fetch");
    let bytes = job.shared.states.lock().unwrap().get(version).unwrap();
    let (state, _) = TrainingState::from_bytes(&job.shared.layout, &bytes).unwrap();
    assert_eq!(
        state.position,
        Position { epoch: 0, step: 0 },
        "no step was finished yet"
    );
    // a finishes step 0; c receives its average (it was out when c joined).
    answer(&job, &a, &w0);
    let first = loop {
        match c.recv().await {
            FromCoordinator::Reduced { id, .. } => break id.id,
            FromCoordinator::Work(w) => panic!("work for {} before the average of step 1", w.id.id),
            _ => {}
        }
    };
    assert_eq!(first, StepId::new(0, 0));
    let job_ref = &job;
    let (ra, rc) = tokio::join!(serve_grpc(job_ref, &mut a), serve_grpc(job_ref, &mut c));
    assert_eq!(
        (ra.as_str(), rc.as_str()),
        ("training finished", "training finished")
    );
    let (result, dir) = job.result().await;
    assert_eq!(result.unwrap().workers, 2);
    assert_eq!(metrics(&dir)["samples_applied"], 32);
}

/// Plays a collective worker of membership `membership` holding a state of digest `sha256`:
/// the rendezvous when rank 0 of a new membership,
/// a StepDone for every piece of work (and its digest after the epoch's last step), and the
/// state upload when asked (through `uploads`).
async fn serve_collective(
    job: &Job,
    fake: &mut Fake,
    (mut membership, sha256): (u64, String),
    at: Arc<Mutex<StepId>>,
    uploads: mpsc::UnboundedSender<(u64, StepId)>,
) -> String {
    loop {
        match fake.recv().await {
            FromCoordinator::Configure(c) => {
                membership = c.membership;
                if c.rank == 0 {
                    job.send(
                        fake,
                        FromWorker::Rendezvous {
                            blob: Bytes::from_static(b"tcp2 x"),
                            membership,
                        },
                    );
                }
            }
            FromCoordinator::Work(w) if w.id.membership == membership => {
                *at.lock().unwrap() = w.id.id.next(4);
                job.send(fake, Job::step_done(&w));
                if w.last_of_epoch {
                    let sha256 = sha256.clone();
                    job.send(fake, FromWorker::Digest { id: w.id, sha256 });
                }
            }
            FromCoordinator::Pause { .. } => panic!("no second regroup is expected"),
            FromCoordinator::PushState { version } => {
                let _ = uploads.send((version, *at.lock().unwrap()));
            }
            FromCoordinator::Finish(m) | FromCoordinator::Abort(m) => return m,
            _ => {}
        }
    }
}

#[tokio::test]
async fn a_collective_regroups_around_the_newest_state_when_a_worker_is_lost() {
    let job = job(Backend::Tcp, 2, 2, 1, 2);
    let (mut a, mut b) = (job.join(1), job.join(2));
    // The first regroup configures both with the starting state; rank 0 brings the rendezvous,
    // which the other rank receives.
    let FromCoordinator::Configure(ca) = a.recv().await else {
        panic!("Configure")
    };
    let FromCoordinator::Configure(cb) = b.recv().await else {
        panic!("Configure")
    };
    assert_eq!((ca.rank, cb.rank, ca.world), (0, 1, 2));
    assert!(ca.state_version.is_some() && cb.state_version.is_some());
    job.send(
        &a,
        FromWorker::Rendezvous {
            blob: Bytes::from_static(b"tcp2 rank-0"),
            membership: ca.membership,
        },
    );
    let FromCoordinator::Rendezvous { blob, .. } = b.recv().await else {
        panic!("relayed")
    };
    assert_eq!(&blob[..], b"tcp2 rank-0");
    // Step 1 is done by both; then b is lost mid step 2, after a applied it alone (its
    // StepDone never comes from b).
    let (w0, v0) = (a.work().await, b.work().await);
    job.send(&a, Job::step_done(&w0));
    job.send(&b, Job::step_done(&v0));
    let w1 = a.work().await;
    job.send(&a, Job::step_done(&w1));
    job.close(&b);
    // The regroup pauses a, which answers that it applied step 2; a uploads its state.
    let pause = loop {
        match a.recv().await {
            FromCoordinator::Work(_) => {}
            other => break other,
        }
    };
    let FromCoordinator::Pause { membership: round } = pause else {
        panic!("a Pause, got {pause:?}")
    };
    let network = Network::new(&job.shared.config.model);
    let optimizer = Optimizer::new(job.shared.config.optimizer.clone(), job.params);
    let state = TrainingState {
        params: network.init_params(99),
        optimizer: optimizer.state().clone(),
        position: Position { epoch: 0, step: 2 },
    };
    job.send(
        &a,
        FromWorker::Paused {
            next: Stamp::new(StepId::new(0, 2), round),
            sha256: codec::state_digest(&state.params, &state.optimizer),
        },
    );
    let FromCoordinator::PushState { version } = a.recv().await else {
        panic!("PushState")
    };
    job.events
        .send(Event::StatePushed {
            member: a.member,
            version,
            bytes: state.to_bytes(&job.shared.layout, "").unwrap(),
        })
        .unwrap();
    // a is configured alone, without a state to fetch (it holds the newest), and brings the new
    // membership's rendezvous; work resumes at step 3 under the new membership.
    let FromCoordinator::Configure(c) = a.recv().await else {
        panic!("Configure")
    };
    assert_eq!((c.rank, c.world, c.state_version), (0, 1, None));
    assert!(c.membership > ca.membership);
    job.send(
        &a,
        FromWorker::Rendezvous {
            blob: Bytes::from_static(b"tcp2 alone"),
            membership: c.membership,
        },
    );
    let w2 = a.work().await;
    assert_eq!(
        (w2.id.id, w2.id.membership),
        (StepId::new(0, 2), c.membership)
    );
    assert_eq!(w2.shards.len(), 2, "the lone survivor computes both shards");
    // The rest of the job, with the state uploads after the epoch played by the test.
    let at = Arc::new(Mutex::new(StepId::new(0, 2)));
    let (uploads, mut asked) = mpsc::unbounded_channel::<(u64, StepId)>();
    job.send(&a, Job::step_done(&w2));
    *at.lock().unwrap() = StepId::new(0, 3);
    let layout = job.shared.layout.clone();
    let events = job.events.clone();
    let uploader_member = a.member;
    let (state_digest_params, state_digest_optimizer) =
        (state.params.clone(), state.optimizer.clone());
    let uploader = tokio::spawn(async move {
        while let Some((version, at)) = asked.recv().await {
            let mut s = state.clone();
            s.position = Position {
                epoch: at.epoch,
                step: at.step,
            };
            let _ = events.send(Event::StatePushed {
                member: uploader_member,
                version,
                bytes: s.to_bytes(&layout, "").unwrap(),
            });
        }
    });
    // After the last step, a (rank 0) uploads because its work was marked; the test plays it.
    let job_ref = &job;
    let sha256 = codec::state_digest(&state_digest_params, &state_digest_optimizer);
    let served = serve_collective(
        job_ref,
        &mut a,
        (c.membership, sha256),
        at.clone(),
        uploads.clone(),
    );
    let upload_after_epoch = async {
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if *at.lock().unwrap() == StepId::new(1, 0) {
                let _ = uploads.send((0, StepId::new(1, 0)));
                return;
            }
        }
    };
    let (reason, ()) = tokio::join!(served, upload_after_epoch);
    assert_eq!(reason, "training finished");
    uploader.abort();
    let (result, dir) = job.result().await;
    let summary = result.unwrap();
    assert_eq!(summary.membership_changes, 1);
    let m = metrics(&dir);
    assert_eq!(
        (m["samples_covered"].as_u64(), m["samples_applied"].as_u64()),
        (Some(32), Some(32))
    );
}

#[tokio::test]
async fn a_non_finite_gradient_from_one_worker_drops_it_and_the_others_recompute_its_shards() {
    let job = job(Backend::Grpc, 2, 2, 1, 2);
    let (mut a, mut b) = (job.join(1), job.join(2));
    let v0 = b.work().await;
    let FromWorker::Gradient(mut g) = job.gradient(&v0, 0) else {
        unreachable!()
    };
    g.data = Bytes::from(f32::NAN.to_le_bytes().repeat(job.params));
    job.send(&b, FromWorker::Gradient(g));
    let reason = serve_grpc(&job, &mut b).await;
    assert!(
        reason.contains("non-finite value") && reason.contains("recompute its shards"),
        "{reason}"
    );
    // a computes b's shard of step 1 again (and its later ones), and finishes the job.
    assert_eq!(serve_grpc(&job, &mut a).await, "training finished");
    let (result, dir) = job.result().await;
    result.unwrap();
    assert_eq!(metrics(&dir)["samples_applied"].as_u64(), Some(32));
}

#[tokio::test]
async fn non_finite_gradients_from_two_workers_of_a_step_stop_the_job_as_diverged() {
    let job = job(Backend::Grpc, 3, 3, 1, 3);
    let (mut a, mut b, mut c) = (job.join(1), job.join(2), job.join(3));
    let nan = |fake: &Fake, w: &Work| {
        let FromWorker::Gradient(mut g) = job.gradient(w, 0) else {
            unreachable!()
        };
        g.data = Bytes::from(f32::INFINITY.to_le_bytes().repeat(job.params));
        job.send(fake, FromWorker::Gradient(g));
    };
    let (w0, v0) = (a.work().await, b.work().await);
    nan(&a, &w0);
    nan(&b, &v0);
    let _ = serve_grpc(&job, &mut c).await;
    let (result, _dir) = job.result().await;
    let stopped = result.unwrap_err();
    assert!(
        matches!(stopped.error, JobError::Diverged { .. }),
        "{stopped}"
    );
    let text = stopped.to_string();
    assert!(
        text.contains("worker rank 1 (test/pid 2") && text.contains("as another worker did"),
        "{text}"
    );
}

#[tokio::test]
async fn a_state_upload_nobody_asked_for_is_ignored() {
    let job = job(Backend::Tcp, 2, 2, 1, 2);
    let (mut a, mut b) = (job.join(1), job.join(2));
    let network = Network::new(&job.shared.config.model);
    let optimizer = Optimizer::new(job.shared.config.optimizer.clone(), job.params);
    let honest = TrainingState {
        params: network.init_params(job.shared.config.seed),
        optimizer: optimizer.state().clone(),
        position: Position { epoch: 1, step: 0 },
    };
    let mut poisoned = honest.clone();
    poisoned.params.iter_mut().for_each(|p| *p = 0.25);
    let layout = job.shared.layout.clone();
    // b (rank 1) uploads a state for the end of the epoch; only rank 0 is asked for it.
    job.events
        .send(Event::StatePushed {
            member: b.member,
            version: 0,
            bytes: poisoned.to_bytes(&layout, "").unwrap(),
        })
        .unwrap();
    let sha256 = codec::state_digest(&honest.params, &honest.optimizer);
    let (at_a, at_b) = (
        Arc::new(Mutex::new(StepId::default())),
        Arc::new(Mutex::new(StepId::default())),
    );
    let (uploads, _asked) = mpsc::unbounded_channel();
    let rank_0 = a.member;
    let upload_after_epoch = async {
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if *at_a.lock().unwrap() == StepId::new(1, 0) {
                job.events
                    .send(Event::StatePushed {
                        member: rank_0,
                        version: 0,
                        bytes: honest.to_bytes(&layout, "").unwrap(),
                    })
                    .unwrap();
                return;
            }
        }
    };
    let (ra, rb, ()) = tokio::join!(
        serve_collective(
            &job,
            &mut a,
            (0, sha256.clone()),
            at_a.clone(),
            uploads.clone()
        ),
        serve_collective(&job, &mut b, (0, sha256.clone()), at_b, uploads.clone()),
        upload_after_epoch
    );
    assert_eq!(
        (ra.as_str(), rb.as_str()),
        ("training finished", "training finished")
    );
    let summary = job.result().await.0.unwrap();
    assert_eq!(summary.params_sha256, codec::digest(&[&honest.params]));
}

#[test]
fn collective_work_goes_out_in_bursts_within_the_window_and_the_epoch() {
    let w = Window {
        depth: 16,
        burst: 8,
    };
    let at = |step| StepId::new(0, step);
    let end = StepId::new(3, 0);
    // Nothing out: the whole window at once, steps 0..=16.
    assert_eq!(w.steps_to_send(at(0), at(0), end, 100, true), 17);
    // Steps 0..=16 out, step 0 finished: one free slot, held back.
    assert_eq!(w.steps_to_send(at(17), at(1), end, 100, false), 0);
    assert_eq!(w.steps_to_send(at(17), at(7), end, 100, false), 0);
    // Eight free: a burst.
    assert_eq!(w.steps_to_send(at(17), at(8), end, 100, false), 8);
    // The rest of the epoch fits in what is free: sent even if less than a burst.
    assert_eq!(w.steps_to_send(at(97), at(85), end, 100, false), 3);
    // Never past the epoch or the job's end.
    assert_eq!(
        w.steps_to_send(StepId::new(1, 0), at(99), end, 100, false),
        0
    );
    assert_eq!(
        w.steps_to_send(StepId::new(2, 98), StepId::new(2, 90), end, 100, false),
        2
    );
    // grpc's window: one step at a time, two ahead.
    let grpc = Window { depth: 2, burst: 1 };
    assert_eq!(grpc.steps_to_send(at(3), at(1), end, 100, false), 1);
    assert_eq!(grpc.steps_to_send(at(4), at(1), end, 100, false), 0);
}
