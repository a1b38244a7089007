//! The tcp backend's connections between ranks, in plaintext or TLS.
//!
//! With TLS the links need no certificate authority and work whatever address rank 0 has: rank
//! 0 makes a fresh key and self-signed certificate for each membership and puts the
//! certificate's SHA-256 in its rendezvous, which reaches the other ranks through the
//! coordinator over the job's own TLS channel. The other ranks accept exactly that
//! certificate (pinned; the handshake's signature proves rank 0 holds its key), and prove
//! that they belong to the membership with the rendezvous secret, sent inside the encrypted
//! link.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, ServerConfig, ServerConnection,
    SignatureScheme, StreamOwned,
};
use sha2::{Digest, Sha256};

/// The name in rank 0's certificate (not checked: the certificate itself is pinned).
const RANK0_NAME: &str = "lockstep-rank0";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Rank 0's TLS identity for one membership.
pub struct HostTls {
    config: Arc<ServerConfig>,
    /// SHA-256 of its certificate: what the other ranks pin.
    pub fingerprint: [u8; 32],
}

impl HostTls {
    /// A fresh key and self-signed certificate.
    pub fn generate() -> Result<Self> {
        let key = rcgen::KeyPair::generate().context("generating rank 0's TLS key")?;
        let cert = rcgen::CertificateParams::new(vec![RANK0_NAME.to_string()])
            .and_then(|p| p.self_signed(&key))
            .context("making rank 0's TLS certificate")?;
        let der = cert.der().clone();
        let fingerprint = Sha256::digest(der.as_ref()).into();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(vec![der], key))
            .context("configuring rank 0's TLS")?;
        Ok(Self {
            config: Arc::new(config),
            fingerprint,
        })
    }

    /// Rank 0's end of an accepted connection (the handshake happens on first use).
    pub fn accept(&self, stream: TcpStream) -> Result<Link> {
        let conn = ServerConnection::new(self.config.clone()).context("a TLS server session")?;
        Ok(Link::Server(Box::new(StreamOwned::new(conn, stream))))
    }
}

/// Whether the first byte a peer sent opens a TLS handshake record (0x16); waits at most the
/// socket's read timeout. Without this, rustls would wait for a whole "record" of whatever
/// length a plaintext peer's first bytes happen to spell.
pub fn starts_tls(stream: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(stream.peek(&mut first), Ok(1) if first[0] == 0x16)
}

/// Another rank's end of its connection to rank 0, which must present the certificate whose
/// SHA-256 is `fingerprint`.
pub fn connect_pinned(stream: TcpStream, fingerprint: [u8; 32]) -> Result<Link> {
    let provider = provider();
    let verifier = Pinned {
        fingerprint,
        provider: provider.clone(),
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("configuring TLS to rank 0")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    let name = ServerName::try_from(RANK0_NAME).map_err(|e| anyhow!("{e}"))?;
    let conn = ClientConnection::new(Arc::new(config), name).context("a TLS client session")?;
    Ok(Link::Client(Box::new(StreamOwned::new(conn, stream))))
}

/// Accepts the one certificate whose SHA-256 was announced, and checks the handshake's
/// signatures with it as any verifier does.
#[derive(Debug)]
struct Pinned {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if got == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "rank 0's certificate has SHA-256 {}, the rendezvous announced {}",
                hex::encode(got),
                hex::encode(self.fingerprint)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// One connection between two ranks.
pub enum Link {
    /// Plaintext (a job without TLS).
    Plain(TcpStream),
    /// Rank 0's end, TLS.
    Server(Box<StreamOwned<ServerConnection, TcpStream>>),
    /// Another rank's end, TLS.
    Client(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Link {
    /// The socket underneath (timeouts, shutdown).
    pub fn socket(&self) -> &TcpStream {
        match self {
            Link::Plain(s) => s,
            Link::Server(s) => s.get_ref(),
            Link::Client(s) => s.get_ref(),
        }
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Link::Plain(s) => s.read(buf),
            Link::Server(s) => s.read(buf),
            Link::Client(s) => s.read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Link::Plain(s) => s.write(buf),
            Link::Server(s) => s.write(buf),
            Link::Client(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Link::Plain(s) => s.flush(),
            Link::Server(s) => s.flush(),
            Link::Client(s) => s.flush(),
        }
    }
}
