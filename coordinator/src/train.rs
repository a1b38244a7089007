//! `lockstep train`: resolve the configuration, load MNIST, open (or reopen) the run directory,
//! start the gRPC server, spawn local workers (or wait for external ones) and run the engine.
//!
//! A resumed run (`--resume RUN_DIR`) continues from the newest checkpoint it can read, with
//! the run's own configuration as the bottom layer; a setting that would change what is
//! computed is refused, naming it. Since the schedule is a pure function of the seed and the
//! epoch, and the arithmetic does not depend on the worker count, the resumed run ends with the
//! model an uninterrupted one would have.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lockstep_common::address::CoordinatorUrl;
use lockstep_common::auth::Token;
use lockstep_common::checkpoint::{Position, TrainingState};
use lockstep_common::config::{Backend, Deployment, JobConfig, Layers};
use lockstep_common::logging::{self, Format};
use lockstep_common::memory;
use lockstep_common::mnist::Mnist;
use lockstep_common::model::Network;
use lockstep_common::optim::Optimizer;
use lockstep_common::schedule;
use lockstep_common::shutdown::{self, Shutdown};
use lockstep_common::tls::ClientTlsFiles;
use tokio::sync::mpsc;

use crate::engine::{Engine, EpochAccount, Start};
use crate::launcher::{LocalWorkers, SpawnSpec};
use crate::membership::Membership;
use crate::monitor::board::{Board, Job};
use crate::monitor::metrics::Metrics;
use crate::monitor::Monitor;
use crate::observe::Observers;
use crate::run_dir::{default_run_path, EpochMetrics, RunDir, Summary};
use crate::service::{Event, Shared, StateStore};

/// How the workers come to the job.
pub enum Workers {
    /// Spawn `config.workers` local worker processes.
    Local,
    /// Wait for `config.workers` workers to connect; the token comes from the environment.
    External(Token),
}

/// A run directory being resumed.
pub struct Resume {
    run: RunDir,
    /// The configuration the run was started with.
    pub config: JobConfig,
    finished: bool,
}

impl Resume {
    /// Opens `dir` for resuming.
    pub fn open(dir: &Path) -> Result<Self> {
        let (run, text, finished) = RunDir::reopen(dir)?;
        let config = JobConfig::from_toml_str(&text).with_context(|| {
            format!(
                "the configuration saved in {}",
                dir.join("config.toml").display()
            )
        })?;
        Ok(Self {
            run,
            config,
            finished,
        })
    }

    /// The configuration to resume with: the run's, under the file, environment and flags
    /// given now. Refuses, naming each, settings that would change what is computed.
    pub fn configuration(&self, layers: &Layers, deployment: Deployment) -> Result<JobConfig> {
        let mut cfg = layers.resolve(deployment, Some(&self.config))?;
        let conflicts = self.config.resume_conflicts(&cfg);
        if !conflicts.is_empty() {
            bail!(
                "cannot resume {}: the configuration now differs from the run's where that changes what is computed:\n  \
                 {}\nleave these settings out (the run's own config.toml applies) or start a new run with another --out",
                self.run.path().display(),
                conflicts.join("\n  ")
            );
        }
        cfg.out = Some(self.run.path().to_path_buf());
        Ok(cfg)
    }
}

/// How a `lockstep train` ended.
pub enum Outcome {
    /// Trained; the summary.
    Trained(Summary),
    /// The resumed run had finished already; its directory.
    AlreadyFinished(PathBuf),
}

/// Runs a whole training job (or the rest of a resumed one).
pub async fn run(
    mut config: JobConfig,
    workers: Workers,
    resume: Option<Resume>,
) -> Result<Outcome> {
    let started = Instant::now();
    if let Some(r) = &resume {
        if r.finished {
            return Ok(Outcome::AlreadyFinished(r.run.path().to_path_buf()));
        }
    }
    if config.backend == Backend::Nccl
        && !cfg!(feature = "cuda")
        && matches!(workers, Workers::Local)
    {
        bail!(
            "--backend nccl needs CUDA, but this lockstep was built without the `cuda` feature; rebuild with \
             `cargo build --release --features cuda` on a machine with the CUDA toolkit, or use --backend grpc"
        );
    }
    config.resolve();
    // TLS files are read before anything else, so that a missing or unsafe one fails at once.
    let tls = lockstep_common::tls::server_config(&config.tls)?;
    let local_tls = match (&tls, &workers) {
        (Some(_), Workers::Local) => Some(local_worker_tls(&config.tls)?),
        _ => None,
    };
    let serves_tls = tls.is_some();
    let scheme = if serves_tls { "https" } else { "http" };
    // Before anything large is allocated (MNIST, the parameters, the optimizer state).
    let parameters = lockstep_common::model::parameter_count(&config.model).unwrap_or(u64::MAX);
    memory::check(
        &memory::Need::coordinator(&config, parameters, crate::engine::STEPS_IN_FLIGHT),
        memory::available().as_ref(),
    )?;
    let run_path = config
        .out
        .clone()
        .unwrap_or_else(|| default_run_path(&config.preset));
    config.out = Some(run_path.clone());
    let config_toml = config.to_toml_string();
    let threads = worker_threads(&config);
    // Bound before anything is shown or loaded, so that a port in use stops the job at once.
    let metrics_listener = match config.metrics_addr.as_str() {
        "off" => None,
        addr => Some(crate::monitor::http::bind(addr).await?),
    };
    let watch_url = metrics_listener
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .map(|a| monitor_url(&a));
    show_configuration(
        &config,
        &config_toml,
        local_workers(&workers),
        threads,
        watch_url.as_deref(),
    );

    let data_started = Instant::now();
    let data = Arc::new(Mnist::load_or_download(config.data_dir.as_deref())?);
    tracing::info!(
        detail = true,
        "loaded MNIST ({} training, {} test images) in {:.2}s",
        data.train_len(),
        data.test_len(),
        data_started.elapsed().as_secs_f64()
    );
    let n_train = match config.train_samples as usize {
        0 => data.train_len(),
        n => n.min(data.train_len()),
    };

    let listener = crate::server::bind(&config.listen).await?;
    let local_addr = listener.local_addr()?;

    let network = Network::new(&config.model);
    let (run, start) = match resume {
        None => {
            let run = RunDir::create(&run_path, &config_toml)?;
            (run, initial_start(&config, &network))
        }
        Some(r) => {
            let start = resumed_start(&r.run, &config, &network, n_train)?;
            std::fs::write(r.run.path().join("config.toml"), &config_toml).with_context(|| {
                format!("writing {}", r.run.path().join("config.toml").display())
            })?;
            (r.run, start)
        }
    };
    let at = start.state.position;
    let done = at.epoch >= config.epochs as u64;

    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        config: config.clone(),
        config_toml: config_toml.clone(),
        layout: network.layout().to_vec(),
        steps_per_epoch: schedule::steps_per_epoch(n_train, config.batch_size as usize) as u64,
        states: Mutex::new(StateStore::default()),
        membership: Mutex::new(Membership::new(config.max_workers())),
        started: Instant::now(),
        events: events_tx.clone(),
    });

    let (token, local) = match workers {
        Workers::External(token) => (token, false),
        Workers::Local => (Token::generate(), true),
    };
    // The servers run until the job has ended and its workers have their last message.
    let shutdown = Shutdown::new();
    shutdown.spawn(crate::server::serve(
        listener,
        shared.clone(),
        token.clone(),
        tls,
        shutdown.token(),
    ));
    // A signal asks the engine to stop: it tells the workers and keeps what it has.
    let interrupts = events_tx.clone();
    shutdown.spawn_until_cancelled(async move {
        let _ = interrupts.send(Event::Interrupted(shutdown::signalled().await));
    });
    let spawned = if local && !done {
        let spec = SpawnSpec {
            count: config.workers as usize,
            // The listener's own address (loopback of its family when it listens on all), so
            // that `--listen '[::1]:0'` works as well as the default 127.0.0.1.
            coordinator: CoordinatorUrl::for_listener(local_addr, serves_tls)
                .with_context(|| format!("the local workers' URL for {local_addr}"))?,
            tls: local_tls,
            token: token.clone(),
            threads,
            devices: (0..config.workers)
                .map(|i| config.backend.local_device(i))
                .collect(),
            logs: (0..config.workers as usize)
                .map(|i| run.worker_log(i))
                .collect(),
            max_restarts: config.max_restarts,
        };
        tracing::info!(
            detail = true,
            "spawned {} local workers ({threads} compute thread(s) each, up to {} restarts), logs in {}",
            config.workers,
            config.max_restarts,
            run.path().join("logs").display()
        );
        Some(LocalWorkers::spawn(spec, events_tx.clone())?)
    } else if !local {
        tracing::info!(
            "listening on {local_addr}{}; waiting for {} workers (lockstep-worker --coordinator {scheme}://HOST:{} with LOCKSTEP_TOKEN{})",
            if scheme == "https" { " (TLS only)" } else { "" },
            config.workers,
            local_addr.port(),
            if scheme == "https" { " and --tls-ca" } else { "" }
        );
        None
    } else {
        None
    };
    drop(events_tx);

    let launcher = spawned.as_ref().map(LocalWorkers::handle);
    let monitor = match metrics_listener {
        Some(l) => Some(start_monitor(
            l,
            &config,
            &config_toml,
            &run,
            &shared,
            &shutdown,
        )?),
        None => None,
    };
    let observers = observers(&config, &run, monitor.as_ref())?;
    let mut engine = Engine::new(shared, events_rx, data, network, start, run, launcher)?;
    engine.observe(observers);
    // The engine is gone with its ends of the step streams: each stream closes after its
    // last message (Finish or Abort). Local workers exit once they have theirs.
    let result = engine.run().await;
    if let Some(w) = spawned {
        w.shutdown().await;
    }
    // The servers stop accepting and finish the streams still open (external workers get
    // their last message); a frozen peer never closes its connection, so this is bounded.
    if !shutdown
        .drain("the job ended", std::time::Duration::from_secs(1))
        .await
    {
        tracing::debug!("a connection was still open 1 s after the job ended; exiting anyway");
    }
    let summary = result?;
    let epochs = RunDir::metrics_of(&run_path).unwrap_or_default();
    report_done(
        &summary,
        &epochs,
        started.elapsed().as_secs_f64(),
        &run_path,
    );
    Ok(Outcome::Trained(summary))
}

/// Who watches the run as it goes ([`crate::observe`]).
fn observers(
    config: &JobConfig,
    run: &RunDir,
    monitor: Option<&Arc<Monitor>>,
) -> Result<Observers> {
    let mut observers = Observers::default();
    if let Some(m) = monitor {
        observers.add(crate::monitor::Watch(m.clone()));
    }
    observers.add(crate::tensorboard::TensorBoard::open(run.path(), config));
    Ok(observers)
}

/// Serves `/metrics` and the dashboard on `listener` until `stop` turns true, and says where.
fn start_monitor(
    listener: tokio::net::TcpListener,
    config: &JobConfig,
    config_toml: &str,
    run: &RunDir,
    shared: &Shared,
    shutdown: &Shutdown,
) -> Result<Arc<Monitor>> {
    let addr = listener.local_addr()?;
    let optimizer = describe_optimizer(config);
    let job = Job {
        preset: config.preset.clone(),
        model: config.model.describe(),
        backend: config.backend.to_string(),
        optimizer,
        batch_size: config.batch_size,
        epochs: config.epochs as u64,
        steps_per_epoch: shared.steps_per_epoch,
    };
    let parameters = lockstep_common::codec::layout_len(&shared.layout) as u64;
    let metrics = Metrics::new(&job.preset, &job.model, &job.backend, parameters);
    let epochs = RunDir::metrics_of(run.path()).unwrap_or_default();
    let board = Board::new(
        job,
        run.path().display().to_string(),
        config_toml.to_string(),
        epochs,
    );
    let monitor = Monitor::new(metrics, board);
    shutdown.spawn(crate::monitor::http::serve(
        listener,
        monitor.clone(),
        shutdown.token().cancelled_owned(),
    ));
    let shown = monitor_url(&addr);
    // A person at a terminal saw it in the header.
    tracing::info!(
        event = "monitor",
        detail = true,
        addr = %addr,
        "dashboard {shown}/  metrics {shown}/metrics"
    );
    Ok(monitor)
}

/// How to reach the monitor on `addr`.
fn monitor_url(addr: &std::net::SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!("http://<this host>:{}", addr.port())
    } else {
        format!("http://{addr}")
    }
}

/// Whether the job spawns its workers.
fn local_workers(workers: &Workers) -> bool {
    matches!(workers, Workers::Local)
}

/// Compute threads per local worker: `threads`, or the cores shared among the workers.
fn worker_threads(config: &JobConfig) -> u32 {
    if config.threads > 0 {
        return config.threads;
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1) as u32;
    (cores / config.workers.max(1)).max(1)
}

/// The job as it starts: for a person, a short header (the whole configuration with `-v`); in
/// plain logs the effective configuration as TOML, as it is saved in the run directory; in
/// JSON one `config` event holding it.
fn show_configuration(
    config: &JobConfig,
    config_toml: &str,
    local: bool,
    threads: u32,
    watch: Option<&str>,
) {
    let out = logging::output();
    match out.format {
        _ if out.quiet => {}
        Format::Human => {
            let mut text = header(config, local, threads, &out);
            if let Some(url) = watch {
                text.push_str(&format!(
                    "\n{} {url}/ (dashboard), {url}/metrics (Prometheus)",
                    logging::paint(&out, "1", &format!("{:<8}", "watch"))
                ));
            }
            if out.verbose > 0 {
                text.push_str(&format!("\n# effective configuration\n{config_toml}"));
            }
            text.push('\n');
            logging::write_stderr(text.as_bytes());
        }
        Format::Plain => {
            logging::write_stderr(format!("# effective configuration\n{config_toml}\n").as_bytes())
        }
        Format::Json => tracing::info!(
            event = "config",
            config = config_toml,
            "effective configuration"
        ),
    }
}

/// The header a person sees: the job, its workers, the backend, the device and the run
/// directory.
fn header(config: &JobConfig, local: bool, threads: u32, out: &logging::Output) -> String {
    let label = |l: &str| logging::paint(out, "1", &format!("{l:<8}"));
    let optimizer = describe_optimizer(config);
    let workers = if local {
        format!(
            "{} local ({threads} thread{} each)",
            config.workers,
            if threads == 1 { "" } else { "s" }
        )
    } else {
        format!("{} external, on {}", config.workers, config.listen)
    };
    let device = match config.backend {
        Backend::Nccl => "cuda",
        Backend::Grpc | Backend::Tcp => "cpu",
    };
    let run = config
        .out
        .as_deref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    format!(
        "{} {} (preset {}), {optimizer}, batch {}, {} epoch{}\n{} {workers}, backend {}, device {device}\n{} {run}",
        label("job"),
        config.model.describe(),
        config.preset,
        config.batch_size,
        config.epochs,
        if config.epochs == 1 { "" } else { "s" },
        label("workers"),
        config.backend,
        label("run"),
    )
}

/// The optimizer in a few words: `adam lr 0.001`.
fn describe_optimizer(config: &JobConfig) -> String {
    format!("{} lr {}", config.optimizer.kind, config.optimizer.lr)
}

/// The end of a job: for a person, a table of the epochs and what to do next; for everyone
/// (even `-q`), the final line.
fn report_done(summary: &Summary, epochs: &[EpochMetrics], wall_seconds: f64, run_path: &Path) {
    let out = logging::output();
    let best = epochs
        .iter()
        .max_by(|a, b| a.test_accuracy.total_cmp(&b.test_accuracy));
    let best_accuracy = best.map_or(summary.test_accuracy, |m| m.test_accuracy);
    let best_epoch = best.map_or(summary.epochs, |m| m.epoch);
    if out.for_people() && !epochs.is_empty() {
        logging::write_stderr(epoch_table(epochs, &out).as_bytes());
    }
    tracing::info!(
        target: logging::SUMMARY,
        event = "done",
        epochs = summary.epochs,
        test_accuracy = summary.test_accuracy,
        best_test_accuracy = best_accuracy,
        best_epoch,
        test_loss = summary.test_loss,
        samples_per_second = summary.samples_per_second,
        wall_seconds,
        run_dir = %run_path.display(),
        "done in {}: test accuracy {:.2}% (best {:.2}%, epoch {best_epoch}), {} samples/s; run directory {}",
        logging::duration(wall_seconds),
        summary.test_accuracy * 100.0,
        best_accuracy * 100.0,
        logging::rate(summary.samples_per_second),
        run_path.display()
    );
    if out.for_people() {
        let d = run_path.display();
        let next = format!(
            "{}\n  {d}/model.safetensors   the model, with PyTorch's parameter names (README: Presets)\n  \
             {d}/metrics.jsonl       the epochs, one JSON object each\n  \
             {d}/logs/               the workers' logs\n",
            logging::paint(&out, "1", "next"),
        );
        logging::write_stderr(next.as_bytes());
    }
}

/// The epochs as a table for people.
fn epoch_table(epochs: &[EpochMetrics], out: &logging::Output) -> String {
    let mut table = format!(
        "\n{}\n",
        logging::paint(
            out,
            "1",
            &format!(
                "{:>5}  {:>10}  {:>9}  {:>8}  {:>8}  {:>9}  {:>7}",
                "epoch", "train loss", "test loss", "test acc", "time", "samples/s", "workers"
            )
        )
    );
    for m in epochs {
        table.push_str(&format!(
            "{:>5}  {:>10.4}  {:>9.4}  {:>7.2}%  {:>8}  {:>9}  {:>7}\n",
            m.epoch,
            m.train_loss,
            m.test_loss,
            m.test_accuracy * 100.0,
            logging::duration(m.epoch_seconds),
            logging::rate(m.samples_per_second),
            m.workers,
        ));
    }
    table.push('\n');
    table
}

/// What local workers of a TLS coordinator trust and present.
fn local_worker_tls(tls: &lockstep_common::config::TlsConfig) -> Result<ClientTlsFiles> {
    let Some(ca) = &tls.ca else {
        bail!(
            "with TLS, local workers must verify the coordinator: set tls.ca (--tls-ca) to the CA that signed \
             tls.cert (`lockstep certs` writes it as ca.pem), and make sure the certificate names the listen \
             address (127.0.0.1 by default)"
        );
    };
    if tls.client_ca.is_some() && tls.worker_cert.is_none() {
        bail!(
            "with mutual TLS (tls.client_ca), local workers need a client certificate: set tls.worker_cert and \
             tls.worker_key (--tls-worker-cert, --tls-worker-key; `lockstep certs` writes client.pem and client.key)"
        );
    }
    let files = ClientTlsFiles {
        ca: Some(ca.clone()),
        cert: tls.worker_cert.clone(),
        key: tls.worker_key.clone(),
        server_name: None,
    };
    // Check them here, where the error reaches the user, not in a worker's log.
    files.load()?;
    Ok(files)
}

/// A new run starts from the seed's initial parameters.
fn initial_start(config: &JobConfig, network: &Network) -> Start {
    let params = network.init_params(config.seed);
    let optimizer = Optimizer::new(config.optimizer.clone(), params.len());
    Start {
        state: TrainingState {
            params,
            optimizer: optimizer.state().clone(),
            position: Position::default(),
        },
        account: None,
        checkpoint: None,
        last_metrics: None,
    }
}

/// A resumed run starts from its newest readable checkpoint, or from the beginning when it has
/// none (the seed gives the same initial state).
fn resumed_start(
    run: &RunDir,
    config: &JobConfig,
    network: &Network,
    n_train: usize,
) -> Result<Start> {
    let opened = Instant::now();
    let steps = schedule::steps_per_epoch(n_train, config.batch_size as usize) as u64;
    for (_, path) in run.checkpoints()? {
        let loaded = std::fs::read(&path)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| TrainingState::from_bytes_with(network.layout(), &bytes))
            .and_then(|found| {
                // A checkpoint is taken after a step of an epoch, or at an epoch's end (step 0 of
                // the next): a step beyond the epoch would train a schedule that does not exist.
                let at = found.0.position;
                anyhow::ensure!(
                    at.step < steps,
                    "its position, step {} of epoch {}, lies beyond the {steps} steps of an epoch",
                    at.step,
                    at.epoch.saturating_add(1)
                );
                Ok(found)
            });
        let (state, _, extras) = match loaded {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!("skipping the checkpoint {}: {e:#}", path.display());
                continue;
            }
        };
        let account = if state.position.step > 0 {
            Some(EpochAccount::from_extras(&extras, n_train)?)
        } else {
            None
        };
        let last_metrics = run.keep_metrics_until(state.position.epoch)?;
        tracing::info!(
            "resuming {} from {} (epoch {} step {}), read in {:.2}s",
            run.path().display(),
            path.display(),
            state.position.epoch + 1,
            state.position.step,
            opened.elapsed().as_secs_f64()
        );
        return Ok(Start {
            state,
            account,
            checkpoint: Some(path),
            last_metrics,
        });
    }
    tracing::info!(
        "{} has no checkpoint yet: training it again from the beginning (same seed, same model)",
        run.path().display()
    );
    run.keep_metrics_until(0)?;
    Ok(initial_start(config, network))
}

/// Number of CUDA devices visible to this process (`CUDA_VISIBLE_DEVICES` applies).
#[cfg(feature = "cuda")]
pub fn visible_gpus() -> Result<usize> {
    candle_core::cuda::cudarc::driver::CudaContext::device_count()
        .map(|n| n as usize)
        .map_err(|e| {
            anyhow::anyhow!("cannot query CUDA devices ({e:?}); is the NVIDIA driver installed?")
        })
}

/// Without the `cuda` feature, NCCL training is refused before anything starts.
#[cfg(not(feature = "cuda"))]
pub fn visible_gpus() -> Result<usize> {
    bail!(
        "--backend nccl needs CUDA, but this lockstep was built without the `cuda` feature; rebuild with \
         `cargo build --release --features cuda` on a machine with the CUDA toolkit, or use --backend grpc"
    )
}

/// Reads the token for external workers, refusing to run without one.
pub fn external_token(token_file: Option<&std::path::Path>) -> Result<Token> {
    Token::from_file_or_env(token_file)?.context(
        "--external-workers needs the job token that workers will present: set LOCKSTEP_TOKEN or pass \
         --token-file FILE (for example, generate one with `openssl rand -hex 32`)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockstep_common::checkpoint::Extras;

    #[test]
    fn a_checkpoint_whose_step_lies_beyond_the_epoch_is_skipped_on_resume() {
        let dir = tempfile::tempdir().unwrap();
        let config = JobConfig::preset("softmax").unwrap();
        let run = RunDir::create(dir.path(), &config.to_toml_string()).unwrap();
        let network = Network::new(&config.model);
        let mut start = initial_start(&config, &network);
        // 1,000 samples in batches of 100: 10 steps an epoch.
        let n_train = 1000;
        // The newer checkpoint lies (saved first: a newer one would prune it).
        start.state.position = Position {
            epoch: 1,
            step: 999_999,
        };
        run.save_checkpoint(&start.state, network.layout(), "", &Extras::default())
            .unwrap();
        start.state.position = Position { epoch: 1, step: 3 };
        run.save_checkpoint(&start.state, network.layout(), "", &Extras::default())
            .unwrap();
        assert_eq!(run.checkpoints().unwrap().len(), 2);
        let resumed = resumed_start(&run, &config, &network, n_train).unwrap();
        assert_eq!(resumed.state.position, Position { epoch: 1, step: 3 });
        let checkpoint = resumed.checkpoint.unwrap();
        assert!(
            checkpoint.ends_with("epoch-0002-step-000003.safetensors"),
            "{}",
            checkpoint.display()
        );
    }
}
