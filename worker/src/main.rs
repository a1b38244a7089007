//! `lockstep-worker`: joins a coordinator and trains until the job ends.
//!
//! Exit status: 0 when the coordinator finished the job; 1 when the worker was refused, lost
//! the coordinator, or the job was aborted.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use lockstep_common::auth::Token;
use lockstep_common::checkpoint::TrainingState;
use lockstep_common::config::{self, Backend, JobConfig, Overrides};
use lockstep_common::model::Replica;
use lockstep_common::optim::Optimizer;
use lockstep_common::PROTOCOL_VERSION;
use lockstep_worker::device::DeviceSpec;
use lockstep_worker::session::{self, Introduction};
use lockstep_worker::stream::{self, Outcome, StepChannels};

#[derive(Parser)]
#[command(
    name = "lockstep-worker",
    version,
    about = "Synchronous data-parallel training on MNIST: a worker"
)]
struct Args {
    /// The coordinator's URL.
    #[arg(long, env = "LOCKSTEP_COORDINATOR", value_name = "URL")]
    coordinator: String,
    /// Compute device: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute threads (default: all cores; use 1 when several workers share a machine).
    #[arg(long)]
    threads: Option<u32>,
    /// File holding the job token (default: $LOCKSTEP_TOKEN).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// How long to keep trying to reach the coordinator, in seconds.
    #[arg(long, default_value_t = 60)]
    connect_timeout: u64,
    /// Only join a job that trains this preset's model (refused otherwise).
    #[arg(long)]
    preset: Option<String>,
    /// Only join a job that trains this model (`mlp:100,100:relu`, `cnn`, ...).
    #[arg(long, value_name = "SPEC")]
    model: Option<String>,
    /// Protocol version to announce; only for testing the coordinator's refusal.
    #[arg(long, hide = true)]
    protocol_version: Option<u32>,
}

fn main() -> ExitCode {
    lockstep_common::tune_allocator();
    let args = Args::parse();
    if let Some(t) = args.threads {
        // candle's CPU kernels read the thread count from here; set before any thread starts.
        std::env::set_var("RAYON_NUM_THREADS", t.max(1).to_string());
    }
    lockstep_common::init_logging();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let token = Token::from_file_or_env(args.token_file.as_deref())?.context(
        "no job token: set LOCKSTEP_TOKEN (or pass --token-file) to the token the coordinator was started with",
    )?;
    let device = DeviceSpec::parse(&args.device)?;
    if !device.supported() {
        device.open()?;
    }
    let model = if args.preset.is_some() || args.model.is_some() {
        let overrides = Overrides {
            preset: args.preset.clone(),
            model: args.model.clone(),
            ..Default::default()
        };
        let cfg = config::load_with_env(None, &overrides, &[])?;
        Some((cfg.model_fingerprint(), cfg.model.describe()))
    } else {
        None
    };
    let intro = Introduction {
        protocol_version: args.protocol_version.unwrap_or(PROTOCOL_VERSION),
        device: device.to_string(),
        cuda_available: matches!(device, DeviceSpec::Cuda(_)) && device.supported(),
        model,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let joined = session::join(
            &args.coordinator,
            &token,
            &intro,
            Duration::from_secs(args.connect_timeout),
        )
        .await?;
        let session::Joined {
            mut client,
            reply,
            config,
            network,
            state,
        } = joined;
        tracing::info!(
            "joined as rank {} of {} ({}): {} on {device}",
            reply.rank,
            reply.world_size,
            session::worker_id(),
            config.model.describe()
        );
        let optimizer = Optimizer::with_state(
            config.optimizer.clone(),
            network.num_params(),
            state.optimizer,
        )?;
        let dev = device.open()?;
        let mut replica = Replica::new(network, &state.params, dev)?;
        let (channels, reader) = stream::open(
            &mut client,
            reply.rank,
            reply.membership_epoch,
            Duration::from_millis(reply.heartbeat_interval_ms.max(50) as u64),
        )
        .await?;
        let compute = match config.backend {
            Backend::Grpc => {
                let params = state.params;
                tokio::task::spawn_blocking(move || {
                    lockstep_worker::compute::run_grpc(
                        &config,
                        &mut replica,
                        params,
                        optimizer,
                        channels,
                    )
                })
            }
            Backend::Nccl => nccl_compute(NcclStart {
                client: client.clone(),
                rank: reply.rank,
                world: reply.world_size,
                config_toml: reply.job_config_toml.clone(),
                config,
                replica,
                state: lockstep_common::checkpoint::TrainingState {
                    params: state.params,
                    optimizer: optimizer.state().clone(),
                    position: state.position,
                },
                channels,
            })?,
        };
        tokio::pin!(compute);
        tokio::pin!(reader);
        let rank = reply.rank;
        let mut leave_client = client.clone();
        tokio::select! {
            signal = shutdown_signal() => {
                // Tell the coordinator why this worker goes, so its error names the reason.
                let _ = leave_client
                    .leave(lockstep_common::wire::pb::LeaveRequest { rank, reason: format!("received {signal}") })
                    .await;
                bail!("stopped by {signal}")
            }
            computed = &mut compute => {
                // The compute loop ends when batches stop coming (the stream ended) or on error.
                let steps = computed.context("compute thread")??;
                match reader.await.context("step stream task")? {
                    Outcome::Finished => {
                        tracing::info!("training finished after {steps} steps");
                        Ok(())
                    }
                    Outcome::Aborted(reason) => bail!("the coordinator stopped the job: {reason}"),
                    Outcome::Lost(why) => bail!("lost the coordinator: {why}"),
                }
            }
            outcome = &mut reader => match outcome.context("step stream task")? {
                Outcome::Finished => {
                    let steps = compute.await.context("compute thread")??;
                    tracing::info!("training finished after {steps} steps");
                    Ok(())
                }
                Outcome::Aborted(reason) => bail!("the coordinator stopped the job: {reason}"),
                Outcome::Lost(why) => bail!("lost the coordinator: {why}"),
            },
        }
    })
}

/// Resolves on Ctrl-C or SIGTERM (what `docker stop` and Kubernetes send).
async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return "Ctrl-C",
                _ = term.recv() => return "SIGTERM",
            }
        }
    }
    let _ = tokio::signal::ctrl_c().await;
    "Ctrl-C"
}

/// What the NCCL step loop starts from.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct NcclStart {
    client: session::Client,
    rank: u32,
    world: u32,
    config_toml: String,
    config: JobConfig,
    replica: Replica,
    state: TrainingState,
    channels: StepChannels,
}

/// Bootstraps NCCL through the coordinator and runs the collective step loop on the compute
/// thread.
#[cfg(feature = "cuda")]
fn nccl_compute(start: NcclStart) -> Result<tokio::task::JoinHandle<Result<u64>>> {
    use lockstep_common::optim::DeviceOptimizer;
    use lockstep_common::wire::{self, pb};
    use lockstep_worker::compute::{run_collective, CollectiveRun};
    use lockstep_worker::nccl::{self, Nccl};

    const NCCL_TIMEOUT: Duration = Duration::from_secs(60);
    let handle = tokio::runtime::Handle::current();
    Ok(tokio::task::spawn_blocking(move || {
        let NcclStart {
            mut client,
            rank,
            world,
            config_toml,
            config,
            mut replica,
            state,
            channels,
        } = start;
        let id = if rank == 0 {
            let id = nccl::new_id()?;
            let kind = pb::worker_message::Kind::NcclId(pb::NcclId {
                id: id.clone().into(),
            });
            if !channels.send(kind) {
                bail!("the step stream closed before NCCL started");
            }
            id
        } else {
            channels
                .nccl_ids
                .recv_timeout(NCCL_TIMEOUT)
                .map_err(|_| {
                    anyhow::anyhow!(
                        "rank 0's NCCL id did not arrive within {}s",
                        NCCL_TIMEOUT.as_secs()
                    )
                })?
                .id
                .to_vec()
        };
        let device = replica.device().clone();
        let mut collective =
            Nccl::connect(&device, &id, rank as usize, world as usize, NCCL_TIMEOUT)?;
        tracing::info!("NCCL communicator ready: rank {rank} of {world}");
        let n = state.params.len();
        let params = candle_core::Tensor::from_slice(&state.params, n, &device)?;
        let optimizer = DeviceOptimizer::new(config.optimizer.clone(), &state.optimizer, &device)?;
        let layout = replica.network().layout().to_vec();
        let mut push = |st: TrainingState| -> Result<()> {
            let bytes = st.to_bytes(&layout, &config_toml)?;
            let chunks = wire::state_chunks(&bytes, st.position.epoch, st.position.step);
            handle.block_on(client.push_state(tokio_stream::iter(chunks)))?;
            Ok(())
        };
        run_collective(CollectiveRun {
            config: &config,
            rank,
            replica: &mut replica,
            params,
            optimizer,
            channels,
            collective: &mut collective,
            push_state: &mut push,
        })
    }))
}

/// Without the `cuda` feature there is no NCCL: refuse clearly.
#[cfg(not(feature = "cuda"))]
fn nccl_compute(_start: NcclStart) -> Result<tokio::task::JoinHandle<Result<u64>>> {
    bail!(
        "the job uses the nccl backend, but this lockstep-worker was built without the `cuda` feature; \
         rebuild with `cargo build --release --features cuda`"
    )
}
