//! A worker's whole life: join the coordinator (retrying while it starts), train in a session
//! until the job ends, and when the coordinator is lost mid-job (it crashed, or its pod moved),
//! join again — as a new member, taking the resumed job's state — for a bounded time.
//!
//! Exit: `Ok` when the coordinator finished the job; an error when the worker was refused,
//! removed, stopped by a signal, the job was aborted, or the coordinator stayed away.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use lockstep_common::address::CoordinatorUrl;
use lockstep_common::auth::Token;
use lockstep_common::checkpoint::TrainingState;
use lockstep_common::codec::TensorSpec;
use lockstep_common::config::Backend;
use lockstep_common::memory;
use lockstep_common::protocol::Leave;
use lockstep_common::shutdown::Shutdown;
use lockstep_common::wire::pb;
use tonic::transport::ClientTlsConfig;

use crate::abort::AbortSignal;
use crate::allreduce::tcp::TcpFormer;
use crate::allreduce::Former;
use crate::device::DeviceSpec;
use crate::session::{self, Client, Introduction, Joined};
use crate::state::{DeviceState, HostState, ModelState};
use crate::step_loop::{self, Setup, StateService};
use crate::stream::{self, Outcome};

/// How a worker runs.
pub struct Options {
    /// The coordinator's URL.
    pub coordinator: CoordinatorUrl,
    /// The job token.
    pub token: Token,
    /// The compute device.
    pub device: DeviceSpec,
    /// How this worker introduces itself.
    pub intro: Introduction,
    /// How long to keep trying to reach the coordinator at start.
    pub connect_timeout: Duration,
    /// How long to keep trying to rejoin after losing the coordinator mid-job (0: exit).
    pub rejoin_timeout: Duration,
    /// With the tcp backend, the address the other workers reach this one at as rank 0.
    pub advertise: Option<IpAddr>,
    /// TLS to the coordinator (the URL is https://); the tcp backend's links use TLS too.
    pub tls: Option<ClientTlsConfig>,
}

/// How one session (one admission) ended.
enum Ended {
    Finished(u64),
    Lost(String),
}

/// Joins and trains until the job ends or `shutdown` is cancelled (a signal: see
/// [`Shutdown::cancel_on_signals`]); see the module documentation.
pub async fn run(options: Options, shutdown: Shutdown) -> Result<()> {
    let mut patience = options.connect_timeout;
    let mut sessions = 0u32;
    loop {
        let doing = if sessions > 0 {
            "rejoining after losing the coordinator"
        } else {
            "joining the job"
        };
        let joined = tokio::select! {
            joined = session::join(
                &options.coordinator,
                &options.token,
                options.tls.as_ref(),
                &options.intro,
                patience,
                sessions > 0,
            ) => joined.context(doing)?,
            reason = shutdown.cancelled() => bail!("stopped by {reason} while {doing}"),
        };
        sessions += 1;
        match train(&options, joined, &shutdown).await? {
            Ended::Finished(steps) => {
                tracing::info!(
                    event = "finished",
                    steps,
                    "training finished after {steps} steps"
                );
                return Ok(());
            }
            Ended::Lost(why) if !options.rejoin_timeout.is_zero() => {
                tracing::warn!(
                    "lost the coordinator ({why}); trying to rejoin for up to {}s",
                    options.rejoin_timeout.as_secs()
                );
                patience = options.rejoin_timeout;
            }
            Ended::Lost(why) => bail!("lost the coordinator: {why}"),
        }
    }
}

/// One session: opens the step stream and runs the step loop on the compute thread.
async fn train(options: &Options, joined: Joined, shutdown: &Shutdown) -> Result<Ended> {
    let Joined {
        mut client,
        reply,
        config,
        network,
    } = joined;
    tracing::info!(
        event = "joined",
        rank = reply.rank,
        worker_id = %session::worker_id(),
        device = %options.device,
        backend = %config.backend,
        "joined as rank {} ({}): {} on {}, {} backend",
        reply.rank,
        session::worker_id(),
        config.model.describe(),
        options.device,
        config.backend
    );
    let member = reply.member;
    // Before the state and the device's buffers are allocated; the coordinator hears why.
    let need = memory::Need::worker(&config, network.num_params() as u64);
    if let Err(e) = memory::check(&need, memory::available().as_ref()) {
        leave(&client, member, format!("{e:#}")).await;
        return Err(e);
    }
    let device = options.device.open()?;
    let len = network.num_params();
    let abort = AbortSignal::default();
    let (channels, reader) = stream::open(
        &mut client,
        member,
        Duration::from_millis(reply.heartbeat_interval_ms.max(50) as u64),
        abort.clone(),
    )
    .await?;
    let state: Box<dyn ModelState> = match config.backend {
        Backend::Nccl => Box::new(DeviceState::new(config.optimizer.clone(), len, &device)?),
        Backend::Grpc | Backend::Tcp => Box::new(HostState::new(config.optimizer.clone(), len)?),
    };
    let step_timeout = Duration::from_secs(config.cluster.step_timeout_s as u64);
    let former: Option<Box<dyn Former>> = match config.backend {
        Backend::Grpc => None,
        Backend::Tcp => Some(Box::new(TcpFormer {
            advertise: options
                .advertise
                .unwrap_or_else(|| route_to(&options.coordinator)),
            len,
            step_timeout,
            tls: options.tls.is_some(),
            shards: config.shards(),
            shared_memory: config.cluster.shared_memory,
        })),
        Backend::Nccl => Some(nccl_former(&device, len)?),
    };
    let states = CoordinatorStates {
        member,
        client: client.clone(),
        runtime: tokio::runtime::Handle::current(),
        layout: network.layout().to_vec(),
        config_toml: reply.job_config_toml.clone(),
    };
    let setup = Setup {
        config,
        network,
        steps_per_epoch: reply.steps_per_epoch,
        device,
        state,
        channels,
        abort,
        states: Box::new(states),
        former,
    };
    let compute = tokio::task::spawn_blocking(move || step_loop::run(setup));
    tokio::pin!(compute);
    tokio::pin!(reader);
    tokio::select! {
        reason = shutdown.cancelled() => {
            leave(&client, member, format!("received {reason}")).await;
            bail!("stopped by {reason}")
        }
        // The compute loop ends when the stream ends, or on an error of its own.
        computed = &mut compute => {
            let steps = steps_or_leave(computed, &client, member).await?;
            ended(reader.await.context("step stream task")?, steps)
        }
        outcome = &mut reader => {
            let outcome = outcome.context("step stream task")?;
            // The compute thread sees its inbox close (and any wait on a peer is aborted).
            let steps = match tokio::time::timeout(Duration::from_secs(5), &mut compute).await {
                Ok(computed) => steps_or_leave(computed, &client, member).await?,
                Err(_) => 0,
            };
            ended(outcome, steps)
        }
    }
}

/// What the end of the step stream means, once the compute thread has stopped.
fn ended(outcome: Outcome, steps: u64) -> Result<Ended> {
    match outcome {
        Outcome::Finished => Ok(Ended::Finished(steps)),
        Outcome::Aborted(reason) => bail!("the coordinator stopped: {reason}"),
        Outcome::Lost(why) => Ok(Ended::Lost(why)),
        Outcome::Malformed(why) => bail!("the coordinator sent a malformed message: {why}"),
        Outcome::ComputeStopped => {
            bail!("the compute thread stopped after {steps} steps while work still came")
        }
    }
}

/// Tells the coordinator why this worker goes, so its log names the reason; bounded, in case
/// the coordinator is what is gone.
async fn leave(client: &Client, member: u64, reason: String) {
    let request = pb::LeaveRequest::from(Leave { member, reason });
    let mut client = client.clone();
    let _ = tokio::time::timeout(Duration::from_secs(2), client.leave(request)).await;
}

/// The compute thread's step count, or its error, told to the coordinator first.
async fn steps_or_leave(
    computed: Result<Result<u64>, tokio::task::JoinError>,
    client: &Client,
    member: u64,
) -> Result<u64> {
    match computed.context("compute thread")? {
        Ok(steps) => Ok(steps),
        Err(e) => {
            leave(client, member, format!("{e:#}")).await;
            Err(e)
        }
    }
}

/// The coordinator's `FetchState`/`PushState`, called from the compute thread.
struct CoordinatorStates {
    member: u64,
    client: Client,
    runtime: tokio::runtime::Handle,
    layout: Vec<TensorSpec>,
    config_toml: String,
}

impl StateService for CoordinatorStates {
    fn fetch(&mut self, version: u64) -> Result<TrainingState> {
        let client = &mut self.client;
        self.runtime
            .block_on(session::fetch_state(client, version, &self.layout))
    }

    fn push(&mut self, version: u64, state: &TrainingState) -> Result<()> {
        let bytes = state.to_bytes(&self.layout, &self.config_toml)?;
        let client = &mut self.client;
        self.runtime
            .block_on(session::push_state(client, self.member, version, &bytes))
    }
}

/// This host's address on the route to the coordinator (what the other workers can most
/// likely reach), of the coordinator's address family; loopback of that family when it cannot
/// be found (of IPv4 when the coordinator's name does not resolve).
fn route_to(coordinator: &CoordinatorUrl) -> IpAddr {
    let Some(target) = coordinator
        .resolve()
        .ok()
        .and_then(|a| a.into_iter().next())
    else {
        return IpAddr::V4(Ipv4Addr::LOCALHOST);
    };
    let (any, loopback) = match target {
        SocketAddr::V4(_) => (
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
        ),
        SocketAddr::V6(_) => (
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ),
    };
    // Connecting a UDP socket sends nothing: it only asks the kernel for the route.
    std::net::UdpSocket::bind((any, 0))
        .and_then(|s| s.connect(target).map(|()| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip())
        .ok()
        .filter(|ip| !ip.is_unspecified())
        .unwrap_or(loopback)
}

/// The nccl backend's collectives.
#[cfg(feature = "cuda")]
fn nccl_former(device: &candle_core::Device, len: usize) -> Result<Box<dyn Former>> {
    Ok(Box::new(crate::allreduce::nccl::NcclFormer {
        device: device.clone(),
        len,
    }))
}

/// Without the `cuda` feature there is no NCCL: refuse clearly.
#[cfg(not(feature = "cuda"))]
fn nccl_former(_device: &candle_core::Device, _len: usize) -> Result<Box<dyn Former>> {
    bail!(
        "the job uses the nccl backend, but this lockstep-worker was built without the `cuda` feature; \
         rebuild with `cargo build --release --features cuda`"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_0_advertises_its_address_on_the_route_to_the_coordinator_in_its_family() {
        let route = |url: &str| route_to(&CoordinatorUrl::parse(url).unwrap());
        let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert_eq!(route("http://127.0.0.1:50051"), v4);
        assert_eq!(route("grpc://127.0.0.1:50051/"), v4);
        // IPv6 loopback if the machine has it; else the fallback is still IPv6 loopback.
        assert_eq!(route("http://[::1]:50051"), v6);
        // Unresolvable: fall back to loopback rather than fail.
        assert_eq!(route("http://no-such-host.invalid:1"), v4);
    }

    /// Options for a coordinator at `url` that the worker keeps trying to join for a minute.
    fn patient_options(url: &str) -> Options {
        Options {
            coordinator: CoordinatorUrl::parse(url).unwrap(),
            token: Token::generate(),
            device: DeviceSpec::parse("cpu").unwrap(),
            intro: Introduction {
                protocol_version: lockstep_common::PROTOCOL_VERSION,
                device: "cpu".into(),
                cuda_available: false,
                model: None,
            },
            connect_timeout: Duration::from_secs(60),
            rejoin_timeout: Duration::from_secs(60),
            advertise: None,
            tls: None,
        }
    }

    #[tokio::test]
    async fn a_shutdown_stops_a_worker_still_waiting_to_join() {
        // Nothing listens there: the worker would retry for a minute.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let shutdown = Shutdown::new();
        let worker = tokio::spawn(run(
            patient_options(&format!("http://127.0.0.1:{port}")),
            shutdown.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!worker.is_finished(), "it gave up joining on its own");
        let asked = std::time::Instant::now();
        shutdown.cancel("SIGTERM");
        let error = tokio::time::timeout(Duration::from_secs(5), worker)
            .await
            .expect("the worker stops promptly")
            .unwrap()
            .unwrap_err();
        assert!(asked.elapsed() < Duration::from_secs(2));
        assert_eq!(
            format!("{error:#}"),
            "stopped by SIGTERM while joining the job"
        );
    }
}
