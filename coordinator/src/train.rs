//! `lockstep train`: resolve the configuration, load MNIST, open the run directory, start the
//! gRPC server, spawn local workers (or wait for external ones) and run the engine.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use lockstep_common::auth::Token;
use lockstep_common::checkpoint::{Position, TrainingState};
use lockstep_common::config::{Backend, JobConfig};
use lockstep_common::mnist::Mnist;
use lockstep_common::model::Network;
use lockstep_common::optim::Optimizer;
use tokio::sync::{mpsc, watch};

use crate::engine::Engine;
use crate::launcher::{LocalWorkers, SpawnSpec};
use crate::run_dir::{default_run_path, RunDir, Summary};
use crate::service::{Event, Shared};

/// How the workers come to the job.
pub enum Workers {
    /// Spawn this many local worker processes.
    Local,
    /// Wait for `config.workers` workers to connect; the token comes from the environment.
    External(Token),
}

/// Default listen address for external workers (containers, clusters).
pub const EXTERNAL_LISTEN: &str = "0.0.0.0:50051";

/// Runs a whole training job and returns its summary.
pub async fn run(mut config: JobConfig, workers: Workers) -> Result<Summary> {
    let started = Instant::now();
    if config.backend == Backend::Nccl
        && !cfg!(feature = "cuda")
        && matches!(workers, Workers::Local)
    {
        bail!(
            "--backend nccl needs CUDA, but this lockstep was built without the `cuda` feature; rebuild with \
             `cargo build --release --features cuda` on a machine with the CUDA toolkit, or use --backend grpc"
        );
    }
    if matches!(workers, Workers::External(_)) && config.listen == "127.0.0.1:0" {
        config.listen = EXTERNAL_LISTEN.to_string();
    }
    let run_path = config
        .out
        .clone()
        .unwrap_or_else(|| default_run_path(&config.preset));
    config.out = Some(run_path.clone());
    let config_toml = config.to_toml_string();
    eprintln!("# effective configuration\n{config_toml}");

    let data_started = Instant::now();
    let data = Arc::new(Mnist::load_or_download(config.data_dir.as_deref())?);
    tracing::info!(
        "loaded MNIST ({} training, {} test images) in {:.2}s",
        data.train_len(),
        data.test_len(),
        data_started.elapsed().as_secs_f64()
    );

    let listener = crate::server::bind(&config.listen).await?;
    let local_addr = listener.local_addr()?;
    let run = RunDir::create(&run_path, &config_toml)?;

    let network = Network::new(&config.model);
    let params = network.init_params(config.seed);
    let optimizer = Optimizer::new(config.optimizer.clone(), params.len());
    let initial = TrainingState {
        params,
        optimizer: optimizer.state().clone(),
        position: Position::default(),
    };
    let state_bytes = initial.to_bytes(network.layout(), &config_toml)?;

    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        config: config.clone(),
        config_toml: config_toml.clone(),
        layout: network.layout().to_vec(),
        state_bytes: Mutex::new(Arc::new(state_bytes)),
        members: Mutex::new(Vec::new()),
        membership_epoch: 1,
        started: Instant::now(),
        events: events_tx.clone(),
    });

    let (token, local) = match workers {
        Workers::External(token) => (token, false),
        Workers::Local => (Token::generate(), true),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = tokio::spawn(crate::server::serve(
        listener,
        shared.clone(),
        token.clone(),
        stop_rx,
    ));

    let signals = tokio::spawn(forward_signals(events_tx.clone()));
    let spawned = if local {
        let threads = if config.threads > 0 {
            config.threads
        } else {
            let cores = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1) as u32;
            (cores / config.workers).max(1)
        };
        let devices = (0..config.workers)
            .map(|i| config.backend.local_device(i))
            .collect();
        let spec = SpawnSpec {
            count: config.workers as usize,
            coordinator: format!("http://127.0.0.1:{}", local_addr.port()),
            token: &token,
            threads,
            devices,
            logs: (0..config.workers as usize)
                .map(|i| run.worker_log(i))
                .collect(),
        };
        tracing::info!(
            "spawned {} local workers ({threads} compute thread(s) each), logs in {}",
            config.workers,
            run.path().join("logs").display()
        );
        Some(LocalWorkers::spawn(spec, events_tx.clone())?)
    } else {
        tracing::info!(
            "listening on {local_addr}; waiting for {} workers (lockstep-worker --coordinator http://HOST:{} with LOCKSTEP_TOKEN)",
            config.workers,
            local_addr.port()
        );
        None
    };
    drop(events_tx);

    let engine = Engine::new(shared, events_rx, data, network, initial, run)?;
    let result = engine.run().await;
    signals.abort();
    // Let the final Finish/Abort messages reach the workers before the server goes away.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    if let Some(w) = spawned {
        w.shutdown().await;
    }
    let _ = stop_tx.send(true);
    // A frozen peer never closes its connection; do not let it hold the exit for long.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), server).await;
    let summary = result?;
    tracing::info!(
        "done in {:.1}s: test accuracy {:.2}%, {:.0} samples/s; run directory {}",
        started.elapsed().as_secs_f64(),
        summary.test_accuracy * 100.0,
        summary.samples_per_second,
        run_path.display()
    );
    Ok(summary)
}

async fn forward_signals(events: mpsc::UnboundedSender<Event>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut term) = signal(SignalKind::terminate()) else {
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { let _ = events.send(Event::Interrupted("Ctrl-C")); }
            _ = term.recv() => { let _ = events.send(Event::Interrupted("SIGTERM")); }
        }
    }
    #[cfg(not(unix))]
    {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = events.send(Event::Interrupted("Ctrl-C"));
        }
    }
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
