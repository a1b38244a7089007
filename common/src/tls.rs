//! TLS on the coordinator's port (rustls with ring, through tonic): loading certificates and
//! keys with errors that name the file and the fix, the server's and the clients' settings,
//! and the one place where a coordinator URL ([`CoordinatorUrl`]) becomes an endpoint
//! (`https://` and `grpcs://` mean TLS, `http://` plaintext, and a URL that disagrees with the
//! TLS settings is refused rather than silently downgraded).
//!
//! Mutual TLS is enforced per service: the server asks every client for a certificate and
//! verifies any it is given against `--tls-client-ca`, but lets a client without one finish the
//! handshake, so that the open `grpc.health.v1` service stays reachable by probes; every
//! Lockstep RPC then refuses a peer that presented no certificate ([`require_client_cert`]).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::address::CoordinatorUrl;
use crate::config::TlsConfig;

/// Reads a PEM file that must hold at least one certificate.
pub fn read_certificates(path: &Path, what: &str) -> Result<Vec<u8>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))?;
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        cert.with_context(|| format!("{what} {} is not valid PEM", path.display()))?;
        count += 1;
    }
    if count == 0 {
        bail!(
            "{what} {} holds no `BEGIN CERTIFICATE` block (is it the key, or DER instead of PEM?)",
            path.display()
        );
    }
    Ok(pem)
}

/// Reads a PEM private key, refusing one that other users can read (as ssh does; see
/// [`crate::auth::read_secret_file`]).
pub fn read_private_key(path: &Path, what: &str) -> Result<Vec<u8>> {
    let pem = crate::auth::read_secret_file(path, what)?;
    PrivateKeyDer::from_pem_slice(&pem).with_context(|| {
        format!(
            "{what} {} holds no PEM private key (`BEGIN PRIVATE KEY`, `BEGIN EC PRIVATE KEY` or `BEGIN RSA PRIVATE KEY`)",
            path.display()
        )
    })?;
    Ok(pem)
}

/// The coordinator's TLS settings, or `None` when it serves plaintext.
pub fn server_config(tls: &TlsConfig) -> Result<Option<ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&tls.cert, &tls.key) else {
        return Ok(None);
    };
    let identity = Identity::from_pem(
        read_certificates(cert, "the TLS certificate (tls.cert)")?,
        read_private_key(key, "the TLS private key (tls.key)")?,
    );
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &tls.client_ca {
        config = config
            .client_ca_root(Certificate::from_pem(read_certificates(
                ca,
                "the client CA (tls.client_ca)",
            )?))
            .client_auth_optional(true);
    }
    Ok(Some(config))
}

/// For an interceptor of a mutual-TLS server: refuses a request whose peer presented no
/// client certificate (certificates that were presented have been verified already).
#[allow(clippy::result_large_err)]
pub fn require_client_cert(request: &tonic::Request<()>) -> Result<(), tonic::Status> {
    match request.peer_certs() {
        Some(certs) if !certs.is_empty() => Ok(()),
        _ => Err(tonic::Status::unauthenticated(
            "this coordinator requires a client certificate (mutual TLS): start the worker with --tls-cert and \
             --tls-key, signed by the coordinator's tls.client_ca",
        )),
    }
}

/// What a client (a worker, `lockstep health`) trusts and presents.
#[derive(Clone, Debug, Default)]
pub struct ClientTlsFiles {
    /// The CA that signed the coordinator's certificate.
    pub ca: Option<PathBuf>,
    /// This client's certificate, for mutual TLS.
    pub cert: Option<PathBuf>,
    /// Its private key.
    pub key: Option<PathBuf>,
    /// The name to verify the coordinator's certificate against, when it is not the URL's host.
    pub server_name: Option<String>,
}

impl ClientTlsFiles {
    /// The client settings, or `None` when no TLS file is given.
    pub fn load(&self) -> Result<Option<ClientTlsConfig>> {
        let Some(ca) = &self.ca else {
            if self.cert.is_some() || self.key.is_some() || self.server_name.is_some() {
                bail!("--tls-cert, --tls-key and --tls-server-name need --tls-ca (the CA that signed the coordinator's certificate)");
            }
            return Ok(None);
        };
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(
            read_certificates(ca, "the TLS CA (--tls-ca)")?,
        ));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(
                    read_certificates(cert, "the client certificate (--tls-cert)")?,
                    read_private_key(key, "the client key (--tls-key)")?,
                ))
            }
            (None, None) => {}
            _ => bail!("--tls-cert and --tls-key go together (the client certificate and its key)"),
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        Ok(Some(config))
    }
}

/// The endpoint for a coordinator URL; `tls` must be given exactly when the URL asks for TLS.
pub fn endpoint(url: &CoordinatorUrl, tls: Option<ClientTlsConfig>) -> Result<Endpoint> {
    let endpoint = Endpoint::from(url.uri().clone());
    match (url.tls(), tls) {
        (true, Some(config)) => endpoint
            .tls_config(config)
            .with_context(|| format!("setting up TLS for {url}")),
        (false, None) => Ok(endpoint),
        (true, None) => bail!(
            "`{url}` asks for TLS: give --tls-ca with the CA that signed the coordinator's certificate"
        ),
        (false, Some(_)) => bail!(
            "TLS files are given but `{url}` is plaintext: use https:// (or grpcs://) to connect with TLS"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_that_disagrees_with_the_tls_files_is_refused() {
        let url = |u: &str| CoordinatorUrl::parse(u).unwrap();
        let e = endpoint(&url("https://c:1"), None).unwrap_err().to_string();
        assert!(e.contains("--tls-ca"), "{e}");
        let e = endpoint(&url("http://c:1"), Some(ClientTlsConfig::new()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("https://"), "{e}");
        let e = endpoint(&url("grpc://[::1]:1"), Some(ClientTlsConfig::new()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`grpc://[::1]:1` is plaintext"), "{e}");
        assert_eq!(
            endpoint(&url("grpcs://[::1]:7"), Some(ClientTlsConfig::new()))
                .unwrap()
                .uri()
                .to_string(),
            "https://[::1]:7/"
        );
    }

    #[test]
    fn a_key_others_can_read_is_refused_and_a_certificate_must_be_pem() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k.pem");
        std::fs::write(&key, "not a key\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
            let e = read_private_key(&key, "the key").unwrap_err().to_string();
            assert!(e.contains("chmod 600") && e.contains("0644"), "{e}");
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
            let e = format!("{:#}", read_private_key(&key, "the key").unwrap_err());
            assert!(e.contains("holds no PEM private key"), "{e}");
        }
        let e = read_certificates(&key, "the certificate")
            .unwrap_err()
            .to_string();
        assert!(e.contains("BEGIN CERTIFICATE"), "{e}");
    }
}
