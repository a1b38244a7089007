//! `lockstep-worker`: joins a coordinator and trains until the job ends.
//!
//! Exit status: 0 when the coordinator finished the job; 1 when the worker was refused, removed
//! from the job, stopped by a signal, the job was aborted, or the coordinator stayed away longer
//! than `--rejoin-timeout`. Everything but the command line lives in the library
//! ([`lockstep_worker::run`]).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use lockstep_common::address::CoordinatorUrl;
use lockstep_common::auth::Token;
use lockstep_common::config::{self, Flags, ModelConfig};
use lockstep_common::logging::{self, LogArgs};
use lockstep_common::shutdown::Shutdown;
use lockstep_common::tls::ClientTlsFiles;
use lockstep_common::PROTOCOL_VERSION;
use lockstep_worker::device::DeviceSpec;
use lockstep_worker::run::Options;
use lockstep_worker::session::Introduction;

#[derive(Parser)]
#[command(
    name = "lockstep-worker",
    version,
    about = "Synchronous data-parallel training on MNIST: a worker"
)]
struct Args {
    /// The coordinator's URL: http:// (or grpc://) for plaintext, https:// (or grpcs://) for
    /// TLS; an IPv6 address goes in brackets (http://[::1]:50051).
    #[arg(long, env = "LOCKSTEP_COORDINATOR", value_name = "URL")]
    coordinator: CoordinatorUrl,
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
    /// After losing the coordinator mid-job (it crashed or moved and resumes), how long to keep
    /// trying to rejoin it, in seconds; 0 exits at once.
    #[arg(long, env = "LOCKSTEP_REJOIN_TIMEOUT", default_value_t = 60)]
    rejoin_timeout: u64,
    /// Only join a job that trains this preset's model (refused otherwise).
    #[arg(long)]
    preset: Option<String>,
    /// Only join a job that trains this model (`mlp:100,100:relu`, `cnn`, ...).
    #[arg(long, value_name = "SPEC", value_parser = ModelConfig::parse_spec)]
    model: Option<ModelConfig>,
    /// With the tcp backend, the address other workers reach this one at if it becomes rank 0
    /// (default: this host's address on the route to the coordinator).
    #[arg(long, env = "LOCKSTEP_ADVERTISE_ADDR", value_name = "IP")]
    advertise_addr: Option<std::net::IpAddr>,
    /// TLS: the CA that signed the coordinator's certificate; needs an https:// (or grpcs://)
    /// --coordinator URL. With TLS the tcp backend's links between workers are encrypted too.
    #[arg(long, env = "LOCKSTEP_TLS__CA", value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Mutual TLS: this worker's certificate, signed by the coordinator's tls.client_ca.
    #[arg(long, env = "LOCKSTEP_TLS__CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// Mutual TLS: its private key, readable by its owner only.
    #[arg(long, env = "LOCKSTEP_TLS__KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The name to check the coordinator's certificate against (default: the URL's host).
    #[arg(long, env = "LOCKSTEP_TLS__SERVER_NAME", value_name = "NAME")]
    tls_server_name: Option<String>,
    /// Protocol version to announce; only for testing the coordinator's refusal.
    #[arg(long, hide = true)]
    protocol_version: Option<u32>,
    #[command(flatten)]
    log: LogArgs,
}

fn main() -> ExitCode {
    lockstep_common::tune_allocator();
    let args = Args::parse();
    if let Some(t) = args.threads {
        // candle's CPU kernels read the thread count from here; set before any thread starts.
        std::env::set_var("RAYON_NUM_THREADS", t.max(1).to_string());
    }
    lockstep_common::settle_thread_count();
    let out = logging::init(&args.log);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            logging::report_error(&out, &e);
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let token = Token::from_file_or_env(args.token_file.as_deref())?.context(
        "no job token: set LOCKSTEP_TOKEN (or pass --token-file) to the token the coordinator was started with",
    )?;
    let tls = ClientTlsFiles {
        ca: args.tls_ca.clone(),
        cert: args.tls_cert.clone(),
        key: args.tls_key.clone(),
        server_name: args.tls_server_name.clone(),
    }
    .load()?;
    // A URL that disagrees with the TLS files is refused here, not after a minute of retries.
    lockstep_common::tls::endpoint(&args.coordinator, tls.clone())?;
    let device = DeviceSpec::parse(&args.device)?;
    if !device.supported() {
        device.open()?;
    }
    let model = if args.preset.is_some() || args.model.is_some() {
        let flags = Flags {
            preset: args.preset.clone(),
            model: args.model.clone(),
            ..Default::default()
        };
        let cfg = config::load_with_env(None, &flags, &[])?;
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
    let options = Options {
        coordinator: args.coordinator,
        token,
        device,
        intro,
        connect_timeout: Duration::from_secs(args.connect_timeout),
        rejoin_timeout: Duration::from_secs(args.rejoin_timeout),
        advertise: args.advertise_addr,
        tls,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        // Ctrl-C and SIGTERM stop the worker wherever it is: joining, training or rejoining.
        let shutdown = Shutdown::new();
        shutdown.cancel_on_signals();
        lockstep_worker::run::run(options, shutdown).await
    });
    // When the job was aborted, the compute thread may still be blocked in an all-reduce whose
    // peer is gone (NCCL waits forever): do not wait for it, exit.
    runtime.shutdown_timeout(Duration::from_millis(500));
    result
}
