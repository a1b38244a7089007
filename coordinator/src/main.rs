//! `lockstep`: the coordinator's command line.
//!
//! - `lockstep train`: train a model (spawning local workers by default).
//! - `lockstep check-config`: resolve and print the effective configuration, or fail.
//! - `lockstep health`: probe a coordinator's `grpc.health.v1` service.
//! - `lockstep certs`: make a CA and certificates for a quick start with TLS.
//! - `lockstep plot`, `predict`, `eval`: learning curves, predictions and test evaluations of
//!   what a run wrote.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use lockstep_common::config::{self, Deployment, Flags, Layers};
use lockstep_common::logging::{self, LogArgs};
use lockstep_common::tls::ClientTlsFiles;
use lockstep_coordinator::certs;
use lockstep_coordinator::inspect::{eval, plot, predict};
use lockstep_coordinator::train::{self, Workers};

#[derive(Parser)]
#[command(
    name = "lockstep",
    version,
    about = "Synchronous data-parallel training on MNIST: the coordinator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: LogArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model: spawns --workers local worker processes (default 2), or waits for
    /// external ones with --external-workers.
    Train(TrainArgs),
    /// Resolve the layered configuration exactly as `train` would and print it as TOML.
    CheckConfig(ConfigArgs),
    /// Ask a coordinator whether it is serving (exit 0) or not (exit 1), via grpc.health.v1.
    Health {
        /// The coordinator's address (https:// or grpcs:// for TLS, with --tls-ca).
        #[arg(long, default_value = "http://127.0.0.1:50051")]
        addr: String,
        #[command(flatten)]
        tls: ClientTlsArgs,
    },
    /// Write a CA, a server certificate and a client certificate (PEM) for a quick start with
    /// TLS: ca.pem, server.pem, server.key, client.pem, client.key.
    Certs {
        /// Folder to write them into (created; existing files are never overwritten).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Names and addresses the server certificate is valid for, comma-separated (default:
        /// localhost, 127.0.0.1, ::1 and the coordinator's compose and Kubernetes service names).
        #[arg(long, value_delimiter = ',', value_name = "HOST,...")]
        hosts: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Draw learning curves (loss and accuracy against the epoch) of one or more runs, overlaid,
    /// as learning-curves.png and .svg.
    Plot(plot::PlotArgs),
    /// Predict test digits (a grid PNG with each prediction and the true digit, mistakes in red),
    /// or your own pictures of digits with --image.
    Predict(predict::PredictArgs),
    /// Measure a saved model or any checkpoint on the test set: loss, accuracy and the confusion
    /// matrix (a table, and a heatmap PNG).
    Eval(eval::EvalArgs),
}

/// What a TLS client trusts and presents (`lockstep health`).
#[derive(Args)]
struct ClientTlsArgs {
    /// The CA that signed the coordinator's certificate.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Client certificate, for a coordinator with mutual TLS.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// Its private key.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The name to check the coordinator's certificate against (default: the address's host).
    #[arg(long, value_name = "NAME")]
    tls_server_name: Option<String>,
}

#[derive(Args)]
struct ConfigArgs {
    /// TOML configuration file (layered over the preset's defaults).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    flags: Flags,
    /// Do not spawn workers: wait for --workers external ones to connect (containers, clusters).
    #[arg(long)]
    external_workers: bool,
}

impl ConfigArgs {
    fn layers(&self) -> Result<Layers> {
        Layers::new(self.config.as_deref(), &self.flags)
    }

    fn deployment(&self) -> Deployment {
        if self.external_workers {
            Deployment::External
        } else {
            Deployment::Local
        }
    }
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// File holding the job token for external workers (default: $LOCKSTEP_TOKEN).
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Continue the run in RUN_DIR from its newest checkpoint; its config.toml is the default
    /// configuration, and settings that would change what is computed are refused.
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["auto_resume", "out"])]
    resume: Option<PathBuf>,
    /// Resume the run in --out if it holds one, else start it there (for deployments whose
    /// coordinator is restarted after a failure).
    #[arg(long, requires = "out")]
    auto_resume: bool,
}

fn main() -> ExitCode {
    lockstep_common::tune_allocator();
    lockstep_common::settle_thread_count();
    let cli = Cli::parse();
    let out = logging::init(&cli.log);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            logging::report_error(&out, &e);
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cli.command {
        Command::Train(args) => {
            let resume_dir = match (&args.resume, args.auto_resume, &args.config.flags.out) {
                (Some(dir), _, _) => Some(dir.clone()),
                (None, true, Some(out)) if out.join("config.toml").exists() => Some(out.clone()),
                _ => None,
            };
            let (layers, deployment) = (args.config.layers()?, args.config.deployment());
            let (mut config, resume) = match resume_dir {
                Some(dir) => {
                    let resume = train::Resume::open(&dir)?;
                    (resume.configuration(&layers, deployment)?, Some(resume))
                }
                None => (layers.resolve(deployment, None)?, None),
            };
            if config.backend == config::Backend::Nccl && !args.config.external_workers {
                let gpus = lockstep_coordinator::train::visible_gpus()?;
                if resume.is_none() && !layers.sets("workers") {
                    config.workers = gpus.max(1) as u32;
                }
                if (gpus as u32) < config.workers {
                    anyhow::bail!(
                        "--backend nccl with {} local workers needs {} GPUs, but {gpus} are visible \
                         (CUDA_VISIBLE_DEVICES={}); lower --workers, or use --backend grpc on CPU",
                        config.workers,
                        config.workers,
                        std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into())
                    );
                }
            }
            let workers = if args.config.external_workers {
                Workers::External(train::external_token(args.token_file.as_deref())?)
            } else {
                Workers::Local
            };
            match runtime.block_on(train::run(config, workers, resume))? {
                train::Outcome::Trained(_) => {}
                train::Outcome::AlreadyFinished(dir) => eprintln!(
                    "the run in {} has finished already (see its summary.json); nothing to resume",
                    dir.display()
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig(args) => {
            let config = args.layers()?.resolve(args.deployment(), None)?;
            print!("{}", config.to_toml_string());
            Ok(ExitCode::SUCCESS)
        }
        Command::Health { addr, tls } => {
            let files = ClientTlsFiles {
                ca: tls.tls_ca,
                cert: tls.tls_cert,
                key: tls.tls_key,
                server_name: tls.tls_server_name,
            };
            let serving =
                runtime.block_on(lockstep_coordinator::server::probe_health(&addr, &files))?;
            println!("{}", if serving { "SERVING" } else { "NOT_SERVING" });
            Ok(if serving {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Certs { out, hosts, days } => {
            let hosts = if hosts.is_empty() {
                certs::DEFAULT_HOSTS.iter().map(|h| h.to_string()).collect()
            } else {
                hosts
            };
            let written = certs::generate(&out, &hosts, days)?;
            for path in &written {
                println!("{}", path.display());
            }
            let d = out.display();
            eprintln!(
                "server certificate for {}\n\
                 coordinator: lockstep train --tls-cert {d}/server.pem --tls-key {d}/server.key [--tls-client-ca {d}/ca.pem]\n\
                 \x20            (local workers: add --tls-ca {d}/ca.pem [--tls-worker-cert {d}/client.pem --tls-worker-key {d}/client.key])\n\
                 worker:      lockstep-worker --coordinator https://HOST:50051 --tls-ca {d}/ca.pem [--tls-cert {d}/client.pem --tls-key {d}/client.key]",
                hosts.join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Plot(args) => plot::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Predict(args) => predict::run(&args).map(|()| ExitCode::SUCCESS),
        Command::Eval(args) => eval::run(&args).map(|()| ExitCode::SUCCESS),
    }
}
