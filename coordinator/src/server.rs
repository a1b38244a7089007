//! Binds the coordinator's listener and serves the Lockstep service (token-checked on every
//! RPC, and with mutual TLS certificate-checked) and the standard `grpc.health.v1` service
//! (open, so orchestrators can probe it), in plaintext or, when configured, TLS only.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use lockstep_common::address::CoordinatorUrl;
use lockstep_common::auth::Token;
use lockstep_common::shutdown::CancellationToken;
use lockstep_common::tls::ClientTlsFiles;
use lockstep_common::wire::CoordinatorServer;
use lockstep_common::MAX_MESSAGE_BYTES;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::ServerTlsConfig;

use crate::service::{CoordinatorService, Shared};

/// HTTP/2 flow-control windows: a gradient is hundreds of kilobytes to megabytes, and the
/// 64 KiB default window would make every step wait on window updates.
pub const STREAM_WINDOW: u32 = 16 * 1024 * 1024;
/// HTTP/2 frame size: a gradient crosses in a few frames instead of a few dozen 16 KiB ones.
pub const FRAME_SIZE: u32 = 1024 * 1024;
/// Connection-level window (all streams of one connection).
pub const CONNECTION_WINDOW: u32 = 64 * 1024 * 1024;

/// Binds `listen`, explaining the usual failures (port in use, bad address).
pub async fn bind(listen: &str) -> Result<TcpListener> {
    let addr: SocketAddr = tokio::net::lookup_host(listen)
        .await
        .with_context(|| format!("resolving the listen address `{listen}` (expected HOST:PORT)"))?
        .next()
        .with_context(|| format!("the listen address `{listen}` resolves to nothing"))?;
    TcpListener::bind(addr).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            "the port is already in use by another process: stop it, or pick another port with --listen HOST:PORT"
        } else {
            "check --listen (HOST:PORT on an address of this machine)"
        };
        anyhow::anyhow!("cannot listen on {addr}: {e}; {hint}")
    })
}

/// Serves until `shutdown` is cancelled, then finishes the streams still open; with `tls`, only TLS connections are accepted, and
/// with `require_client_cert` every Lockstep RPC needs a verified client certificate.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    token: Token,
    tls: Option<ServerTlsConfig>,
    shutdown: CancellationToken,
) -> Result<()> {
    let require_client_cert = shared.config.tls.client_ca.is_some();
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let service = CoordinatorServer::new(CoordinatorService::new(shared))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    health_reporter
        .set_serving::<CoordinatorServer<CoordinatorService>>()
        .await;
    let checked = InterceptedService::new(service, move |req: tonic::Request<()>| {
        if require_client_cert {
            lockstep_common::tls::require_client_cert(&req)?;
        }
        token.server_check(req)
    });
    // Nagle's algorithm with delayed ACKs would add tens of milliseconds to every step; the
    // builder's tcp_nodelay only applies to listeners tonic binds itself, so set it here.
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(std::time::Duration::from_secs(10)));
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .context("setting up TLS on the coordinator's port")?;
    }
    builder
        .max_frame_size(FRAME_SIZE)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .add_service(health_service)
        .add_service(checked)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
        .context("serving gRPC")
}

/// Asks a coordinator's `grpc.health.v1` service whether it is serving (`lockstep health`);
/// `https://` (or `grpcs://`) addresses need `tls` (at least the CA).
pub async fn probe_health(addr: &str, tls: &ClientTlsFiles) -> Result<bool> {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let url = CoordinatorUrl::parse(addr)?;
    let channel = lockstep_common::tls::endpoint(&url, tls.load()?)?
        .connect_timeout(std::time::Duration::from_secs(3))
        .timeout(std::time::Duration::from_secs(3))
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .with_context(|| format!("health check of {addr}"))?;
    Ok(reply.into_inner().status
        == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
}
