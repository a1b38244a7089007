//! Connecting to the coordinator (retrying while it starts), joining the job, and moving
//! training states to and from it.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use backon::{ExponentialBuilder, Retryable};
use lockstep_common::address::CoordinatorUrl;
use lockstep_common::auth::Token;
use lockstep_common::checkpoint::TrainingState;
use lockstep_common::codec::TensorSpec;
use lockstep_common::config::JobConfig;
use lockstep_common::model::Network;
use lockstep_common::protocol::{check_join_reply, printable};
use lockstep_common::wire::{self, pb, CoordinatorClient};
use lockstep_common::MAX_MESSAGE_BYTES;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig};

/// Attaches the job token to every request.
#[derive(Clone)]
pub struct Attach(Token);

impl tonic::service::Interceptor for Attach {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        self.0.client_attach(request)
    }
}

/// The client type: every request carries the job token.
pub type Client = CoordinatorClient<InterceptedService<Channel, Attach>>;

/// What joining tells the worker.
pub struct Joined {
    /// The client, for further calls.
    pub client: Client,
    /// The join reply.
    pub reply: pb::JoinReply,
    /// The job configuration.
    pub config: JobConfig,
    /// The network, whose layout matches the coordinator's.
    pub network: Network,
}

/// How this worker introduces itself.
pub struct Introduction {
    /// Protocol version to announce (the real one, except in tests of the refusal).
    pub protocol_version: u32,
    /// Device name.
    pub device: String,
    /// Whether a CUDA device is usable.
    pub cuda_available: bool,
    /// The model this worker insists on, if any: (fingerprint, description).
    pub model: Option<(String, String)>,
}

/// How this worker names itself to the coordinator: `host/pid N`.
pub fn worker_id() -> String {
    let host = gethostname::gethostname();
    let host = match host.to_string_lossy() {
        name if name.is_empty() => "host".into(),
        name => name,
    };
    format!("{host}/pid {}", std::process::id())
}

async fn connect(
    url: &CoordinatorUrl,
    token: &Token,
    tls: Option<&ClientTlsConfig>,
) -> Result<Client> {
    let endpoint = lockstep_common::tls::endpoint(url, tls.cloned())?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .max_frame_size(1024 * 1024)
        .initial_stream_window_size(16 * 1024 * 1024)
        .initial_connection_window_size(64 * 1024 * 1024);
    let channel = endpoint.connect().await?;
    let attach = Attach(token.clone());
    Ok(CoordinatorClient::with_interceptor(channel, attach)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Why an attempt to join failed.
enum Failure {
    /// The coordinator is not reachable (yet: containers start in any order); worth retrying.
    Unreachable(anyhow::Error),
    /// Refused, or the two ends disagree on TLS: retrying cannot help.
    Final(anyhow::Error),
}

/// The waits between attempts to join: from 100 ms, doubling, at most 2 s apart.
fn join_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_factor(2.0)
        .with_max_delay(Duration::from_secs(2))
        .without_max_times()
}

/// Connects and joins, retrying while the coordinator is not reachable yet (containers start
/// in any order) until `patience` has passed; a refusal is final. `rejoining`: this worker was
/// in the job through the same URL and TLS settings, so a connection that breaks is the
/// coordinator going or coming back, not two ends that disagree on TLS, and is retried.
pub async fn join(
    url: &CoordinatorUrl,
    token: &Token,
    tls: Option<&ClientTlsConfig>,
    intro: &Introduction,
    patience: Duration,
    rejoining: bool,
) -> Result<Joined> {
    let deadline = Instant::now() + patience;
    // Plaintext to a coordinator that serves TLS looks like an unreachable one, or a broken
    // connection: say so.
    let plaintext = !url.tls();
    let (client, reply) = (|| join_once(url, token, tls, intro, rejoining))
        .retry(join_backoff())
        .sleep(tokio::time::sleep)
        .when(|failure| matches!(failure, Failure::Unreachable(_)))
        // Give up rather than wait past the deadline.
        .adjust(|_, wait| wait.filter(|w| Instant::now() + *w <= deadline))
        .notify(|failure, _| {
            if let Failure::Unreachable(e) = failure {
                tracing::info!("coordinator at {url} not reachable yet ({e}); retrying");
            }
        })
        .await
        .map_err(|failure| match failure {
            Failure::Final(e) => e,
            Failure::Unreachable(e) => anyhow!(
                "could not reach the coordinator at {url} within {}s ({e}); check --coordinator and that \
                 `lockstep train` is running{}",
                patience.as_secs(),
                if plaintext {
                    " (a coordinator that serves TLS refuses plaintext: then connect with https:// and --tls-ca)"
                } else {
                    ""
                }
            ),
        })?;
    check_join_reply(&reply).context("the coordinator's join reply")?;
    let config = JobConfig::from_toml_str(&reply.job_config_toml)
        .context("the job configuration from the coordinator")?;
    let network = Network::new(&config.model);
    let theirs: Vec<TensorSpec> = wire::layout_from_wire(&reply.layout);
    if theirs != network.layout() {
        bail!(
            "the coordinator's parameter layout differs from the one this worker builds for `{}`; \
             run the same Lockstep release on both sides",
            config.model.describe()
        );
    }
    Ok(Joined {
        client,
        reply,
        config,
        network,
    })
}

/// One attempt to connect and join.
async fn join_once(
    url: &CoordinatorUrl,
    token: &Token,
    tls: Option<&ClientTlsConfig>,
    intro: &Introduction,
    rejoining: bool,
) -> Result<(Client, pb::JoinReply), Failure> {
    // A certificate the other side refuses, or that this side cannot verify, does not get
    // better by retrying.
    let mut client = connect(url, token, tls).await.map_err(|e| {
        if is_tls_failure(&e) {
            Failure::Final(e.context(
                "the TLS handshake with the coordinator failed: is --tls-ca the CA that signed its \
                 certificate, and does the certificate name the host in --coordinator (or \
                 --tls-server-name)?",
            ))
        } else {
            Failure::Unreachable(anyhow!("{e:#}"))
        }
    })?;
    let request = pb::JoinRequest {
        protocol_version: intro.protocol_version,
        worker_id: worker_id(),
        device: intro.device.clone(),
        model_fingerprint: intro
            .model
            .as_ref()
            .map(|m| m.0.clone())
            .unwrap_or_default(),
        model_description: intro
            .model
            .as_ref()
            .map(|m| m.1.clone())
            .unwrap_or_default(),
        cuda_available: intro.cuda_available,
        pid: std::process::id(),
    };
    match client.join(request).await {
        Ok(reply) => Ok((client, reply.into_inner())),
        Err(status) if status.code() == tonic::Code::Unavailable => Err(Failure::Unreachable(
            anyhow!("{}", printable(status.message())),
        )),
        Err(status) if std::error::Error::source(&status).is_some() => {
            let cause = std::error::Error::source(&status)
                .map(|s| s.to_string())
                .unwrap_or_default();
            if rejoining {
                // A coordinator that is dying, or starting again, resets connections.
                return Err(Failure::Unreachable(anyhow!(
                    "the connection broke while joining ({cause})"
                )));
            }
            // The connection itself broke: the two ends do not speak the same transport.
            let hint = if url.tls() {
                "a coordinator with mutual TLS refuses a client certificate its tls.client_ca did not sign \
                 (--tls-cert, --tls-key)"
            } else {
                "a coordinator that serves TLS refuses plaintext: connect with https:// and --tls-ca"
            };
            Err(Failure::Final(anyhow!(
                "the connection to the coordinator at {url} broke while joining ({cause}); {hint}"
            )))
        }
        Err(status) => Err(Failure::Final(anyhow!(
            "the coordinator refused this worker: {}",
            printable(status.message())
        ))),
    }
}

/// Whether a connection failed in the TLS handshake (a certificate refused by either side).
fn is_tls_failure(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        let mut source: Option<&dyn std::error::Error> = Some(cause);
        while let Some(s) = source {
            // io::Error leaves its inner error out of the source chain: look inside it.
            let inner = s
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref());
            if s.is::<rustls::Error>() || inner.is_some_and(|i| i.is::<rustls::Error>()) {
                return true;
            }
            source = s.source();
        }
        false
    })
}

/// Fetches the training state the coordinator announced as `version`.
pub async fn fetch_state(
    client: &mut Client,
    version: u64,
    layout: &[TensorSpec],
) -> Result<TrainingState> {
    let mut chunks = client
        .fetch_state(pb::StateRequest {
            state_version: version,
        })
        .await
        .with_context(|| format!("fetching state version {version}"))?
        .into_inner();
    let mut asm = wire::StateAssembler::default();
    while let Some(chunk) = chunks
        .message()
        .await
        .with_context(|| format!("receiving state version {version}"))?
    {
        asm.push(chunk)
            .map_err(|e| anyhow!("state version {version}: {e}"))?;
    }
    let (bytes, _) = asm
        .finish()
        .map_err(|e| anyhow!("state version {version}: {e}"))?;
    let (state, _) = TrainingState::from_bytes(layout, &bytes)
        .with_context(|| format!("parsing state version {version}"))?;
    Ok(state)
}

/// Uploads admission `member`'s state, tagged with `version` (0: the state after a step the
/// coordinator marked for upload).
pub async fn push_state(
    client: &mut Client,
    member: u64,
    version: u64,
    bytes: &[u8],
) -> Result<()> {
    let chunks = wire::state_chunks(bytes, version, member);
    client
        .push_state(tokio_stream::iter(chunks))
        .await
        .context("uploading the state")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use backon::BackoffBuilder;

    use super::*;

    #[test]
    fn joins_are_retried_from_100_ms_apart_doubling_up_to_2_s() {
        let waits: Vec<u128> = join_backoff()
            .build()
            .take(8)
            .map(|w| w.as_millis())
            .collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 2000, 2000, 2000]);
    }

    #[tokio::test]
    async fn an_unreachable_coordinator_is_retried_until_the_patience_is_spent_then_named() {
        // Nothing listens on a port just released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let url = CoordinatorUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        let intro = Introduction {
            protocol_version: lockstep_common::PROTOCOL_VERSION,
            device: "cpu".into(),
            cuda_available: false,
            model: None,
        };
        let started = Instant::now();
        let Err(e) = join(
            &url,
            &Token::new("t").unwrap(),
            None,
            &intro,
            Duration::from_secs(1),
            false,
        )
        .await
        else {
            panic!("joined nothing");
        };
        let took = started.elapsed();
        let e = e.to_string();
        assert!(
            e.contains(&format!(
                "could not reach the coordinator at {url} within 1s"
            )) && e.contains("refuses plaintext"),
            "{e}"
        );
        // Attempts at 0, 0.1, 0.3 and 0.7 s; the next wait would end past the deadline.
        assert!(
            took >= Duration::from_millis(700) && took < Duration::from_secs(2),
            "{took:?}"
        );
    }
}
