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
    /// With the tcp backend, the address other workers reach this one at if it becomes rank 0
    /// (default: this host's address on the route to the coordinator).
    #[arg(long, env = "LOCKSTEP_ADVERTISE_ADDR", value_name = "IP")]
    advertise_addr: Option<std::net::IpAddr>,
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
    let result = runtime.block_on(train(args, token, device, intro));
    // When the job was aborted, the compute thread may still be blocked in an all-reduce whose
    // peer is gone (NCCL waits forever): do not wait for it, exit.
    runtime.shutdown_timeout(Duration::from_millis(500));
    result
}

async fn train(args: Args, token: Token, device: DeviceSpec, intro: Introduction) -> Result<()> {
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
        Backend::Nccl | Backend::Tcp => collective_compute(CollectiveStart {
            client: client.clone(),
            rank: reply.rank,
            world: reply.world_size,
            config_toml: reply.job_config_toml.clone(),
            advertise: match args.advertise_addr {
                Some(ip) => ip,
                None => route_to(&args.coordinator),
            },
            config,
            replica,
            state: lockstep_common::checkpoint::TrainingState {
                params: state.params,
                optimizer: optimizer.state().clone(),
                position: state.position,
            },
            channels,
        }),
    };
    tokio::pin!(compute);
    tokio::pin!(reader);
    let rank = reply.rank;
    tokio::select! {
        signal = shutdown_signal() => {
            leave(&client, rank, format!("received {signal}")).await;
            bail!("stopped by {signal}")
        }
        // The compute loop ends when batches stop coming (the stream ended) or on error.
        computed = &mut compute => {
            let steps = steps_or_leave(computed, &client, rank).await?;
            ended(reader.await.context("step stream task")?, steps)
        }
        outcome = &mut reader => match outcome.context("step stream task")? {
            // After Finished the compute thread ends by itself; ComputeStopped means it failed
            // while batches still came, and its error is the reason.
            outcome @ (Outcome::Finished | Outcome::ComputeStopped) => {
                let steps = steps_or_leave(compute.await, &client, rank).await?;
                ended(outcome, steps)
            }
            outcome => ended(outcome, 0),
        },
    }
}

/// Tells the coordinator why this worker goes, so its error names the reason; bounded, in
/// case the coordinator is what is gone.
async fn leave(client: &session::Client, rank: u32, reason: String) {
    let request = lockstep_common::wire::pb::LeaveRequest { rank, reason };
    let mut client = client.clone();
    let _ = tokio::time::timeout(Duration::from_secs(2), client.leave(request)).await;
}

/// The compute thread's step count, or its error, told to the coordinator first.
async fn steps_or_leave(
    computed: Result<Result<u64>, tokio::task::JoinError>,
    client: &session::Client,
    rank: u32,
) -> Result<u64> {
    match computed.context("compute thread")? {
        Ok(steps) => Ok(steps),
        Err(e) => {
            leave(client, rank, format!("{e:#}")).await;
            Err(e)
        }
    }
}

/// What the end of the step stream means, once the compute thread has stopped.
fn ended(outcome: Outcome, steps: u64) -> Result<()> {
    match outcome {
        Outcome::Finished => {
            tracing::info!("training finished after {steps} steps");
            Ok(())
        }
        Outcome::Aborted(reason) => bail!("the coordinator stopped the job: {reason}"),
        Outcome::Lost(why) => bail!("lost the coordinator: {why}"),
        Outcome::ComputeStopped => {
            bail!("the compute thread stopped after {steps} steps while batches still came")
        }
    }
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

/// This host's address on the route to the coordinator (what the other workers can most
/// likely reach); loopback when it cannot be found.
fn route_to(coordinator: &str) -> std::net::IpAddr {
    let loopback = std::net::IpAddr::from([127, 0, 0, 1]);
    let Some(host_port) = coordinator
        .split("://")
        .last()
        .map(|rest| rest.split('/').next().unwrap_or(rest))
    else {
        return loopback;
    };
    std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect(host_port).map(|()| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip())
        .ok()
        .filter(|ip| !ip.is_unspecified())
        .unwrap_or(loopback)
}

/// What the collective (NCCL, TCP) step loop starts from.
struct CollectiveStart {
    client: session::Client,
    rank: u32,
    world: u32,
    config_toml: String,
    /// Where this worker listens for the other ranks if it is rank 0 (TCP).
    advertise: std::net::IpAddr,
    config: JobConfig,
    replica: Replica,
    state: TrainingState,
    channels: StepChannels,
}

/// How long the ranks wait for each other while the collective is set up.
const COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Sets up the collective through the coordinator's rendezvous relay and runs the collective
/// step loop on the compute thread.
fn collective_compute(start: CollectiveStart) -> tokio::task::JoinHandle<Result<u64>> {
    use lockstep_common::optim::DeviceOptimizer;
    use lockstep_common::wire;
    use lockstep_worker::compute::{run_collective, Collective, CollectiveRun};

    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let CollectiveStart {
            mut client,
            rank,
            world,
            config_toml,
            advertise,
            config,
            mut replica,
            state,
            channels,
        } = start;
        let device = replica.device().clone();
        let len = state.params.len();
        let mut collective: Box<dyn Collective> = match config.backend {
            Backend::Tcp => Box::new(tcp_collective(
                &channels,
                rank,
                world,
                len,
                advertise,
                &device,
                Duration::from_secs(config.cluster.step_timeout_s as u64),
            )?),
            _ => nccl_collective(&channels, rank, world, &device)?,
        };
        tracing::info!(
            "{} collective ready: rank {rank} of {world}",
            config.backend
        );
        let params = candle_core::Tensor::from_slice(&state.params, len, &device)?;
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
            collective: collective.as_mut(),
            push_state: &mut push,
        })
    })
}

/// The tcp backend: rank 0 listens and sends its address through the coordinator; the other
/// ranks connect to it.
fn tcp_collective(
    channels: &StepChannels,
    rank: u32,
    world: u32,
    len: usize,
    advertise: std::net::IpAddr,
    device: &candle_core::Device,
    step_timeout: Duration,
) -> Result<lockstep_worker::tcp::TcpCollective> {
    use lockstep_worker::tcp::{Host, Rendezvous, TcpCollective};
    let mut collective = if rank == 0 {
        let host = Host::bind(advertise)?;
        tracing::info!(
            "rank 0 listens for the other ranks on {}",
            host.rendezvous().addr
        );
        channels.rendezvous(0, Some(host.rendezvous().to_bytes()), COLLECTIVE_TIMEOUT)?;
        host.accept(world, len, device, COLLECTIVE_TIMEOUT)?
    } else {
        let relayed = channels.rendezvous(rank, None, COLLECTIVE_TIMEOUT)?;
        let rendezvous = Rendezvous::parse(&relayed)?;
        TcpCollective::connect(&rendezvous, rank, world, len, device, COLLECTIVE_TIMEOUT)?
    };
    collective.set_step_timeout(step_timeout)?;
    Ok(collective)
}

/// The nccl backend: rank 0 creates the NCCL unique id, the coordinator relays it, and every
/// rank creates its communicator (with a time limit).
#[cfg(feature = "cuda")]
fn nccl_collective(
    channels: &StepChannels,
    rank: u32,
    world: u32,
    device: &candle_core::Device,
) -> Result<Box<dyn lockstep_worker::compute::Collective>> {
    use lockstep_worker::nccl::{self, Nccl};
    let own = if rank == 0 {
        Some(nccl::new_id()?)
    } else {
        None
    };
    let id = channels.rendezvous(rank, own, COLLECTIVE_TIMEOUT)?;
    let comm = Nccl::connect(
        device,
        &id,
        rank as usize,
        world as usize,
        COLLECTIVE_TIMEOUT,
    )?;
    Ok(Box::new(comm))
}

/// Without the `cuda` feature there is no NCCL: refuse clearly.
#[cfg(not(feature = "cuda"))]
fn nccl_collective(
    _channels: &StepChannels,
    _rank: u32,
    _world: u32,
    _device: &candle_core::Device,
) -> Result<Box<dyn lockstep_worker::compute::Collective>> {
    bail!(
        "the job uses the nccl backend, but this lockstep-worker was built without the `cuda` feature; \
         rebuild with `cargo build --release --features cuda`"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_0_advertises_its_address_on_the_route_to_the_coordinator() {
        let loopback = std::net::IpAddr::from([127, 0, 0, 1]);
        assert_eq!(route_to("http://127.0.0.1:50051"), loopback);
        assert_eq!(route_to("http://127.0.0.1:50051/"), loopback);
        // Unresolvable: fall back to loopback rather than fail.
        assert_eq!(route_to("http://no-such-host.invalid:1"), loopback);
        assert_eq!(route_to("not a url"), loopback);
    }
}
