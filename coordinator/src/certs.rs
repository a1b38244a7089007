//! `lockstep certs`: a certificate authority plus a server and a client certificate for a quick
//! start with TLS (and mutual TLS), so that no OpenSSL incantation stands between a user and
//! an encrypted job. For production, certificates come from the cluster's own CA (e.g.
//! cert-manager; see the README).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// Names the server certificate covers by default: loopback (local workers, `lockstep health`
/// in the container) and the coordinator's service names in compose and Kubernetes.
pub const DEFAULT_HOSTS: [&str; 7] = [
    "localhost",
    "127.0.0.1",
    "::1",
    "coordinator",
    "lockstep-coordinator",
    "lockstep-coordinator.lockstep.svc",
    "lockstep-coordinator.lockstep.svc.cluster.local",
];

/// The files `lockstep certs` writes, in order.
pub const FILES: [&str; 5] = [
    "ca.pem",
    "server.pem",
    "server.key",
    "client.pem",
    "client.key",
];

/// Writes a CA, a server certificate for `hosts` and a client certificate into `out`, valid
/// for `days` days. Refuses to overwrite any existing file. Returns the paths written.
pub fn generate(out: &Path, hosts: &[String], days: u32) -> Result<Vec<PathBuf>> {
    if hosts.is_empty() {
        bail!("--hosts needs at least one name or address for the server certificate");
    }
    if let Some(bad) = hosts.iter().find(|h| !valid_host(h)) {
        bail!("--hosts: `{bad}` is neither an IP address nor a DNS name");
    }
    if !(1..=3650).contains(&days) {
        bail!("--days must be between 1 and 3650, got {days}");
    }
    let paths: Vec<PathBuf> = FILES.iter().map(|f| out.join(f)).collect();
    if let Some(existing) = paths.iter().find(|p| p.exists()) {
        bail!(
            "{} exists already; `lockstep certs` does not overwrite certificates (choose another --out)",
            existing.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;

    let now = time_now();
    let until = now + std::time::Duration::from_secs(u64::from(days) * 86_400);
    let named = |cn: &str, sans: Vec<String>| -> Result<CertificateParams> {
        let mut p = CertificateParams::new(sans)
            .with_context(|| "a host name is not a valid DNS name or IP address")?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        dn.push(DnType::OrganizationName, "Lockstep");
        p.distinguished_name = dn;
        p.not_before = now.into();
        p.not_after = until.into();
        Ok(p)
    };

    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca_params = named("Lockstep CA", Vec::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = ca_params.self_signed(&ca_key).context("signing the CA")?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().context("generating the server key")?;
    let mut server = named("lockstep coordinator", hosts.to_vec())?;
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = server
        .signed_by(&server_key, &issuer)
        .context("signing the server certificate")?;

    let client_key = KeyPair::generate().context("generating the client key")?;
    let mut client = named("lockstep worker", Vec::new())?;
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = client
        .signed_by(&client_key, &issuer)
        .context("signing the client certificate")?;

    let contents = [
        (ca.pem(), false),
        (server.pem(), false),
        (server_key.serialize_pem(), true),
        (client.pem(), false),
        (client_key.serialize_pem(), true),
    ];
    for (path, (text, private)) in paths.iter().zip(contents) {
        write_new(path, text.as_bytes(), private)?;
    }
    Ok(paths)
}

/// An IP address, or a DNS name of letters, digits and hyphens between dots (a leading `*.`
/// for a wildcard).
fn valid_host(host: &str) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn time_now() -> std::time::SystemTime {
    // A minute of slack for clocks that disagree a little.
    std::time::SystemTime::now() - std::time::Duration::from_secs(60)
}

/// Creates `path` (never overwriting); a private key is readable by its owner only.
fn write_new(path: &Path, bytes: &[u8], private: bool) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certs_are_written_once_with_private_keys_for_the_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("tls");
        let hosts: Vec<String> = DEFAULT_HOSTS.iter().map(|h| h.to_string()).collect();
        let paths = generate(&out, &hosts, 30).unwrap();
        assert_eq!(paths.len(), 5);
        for p in &paths {
            let text = std::fs::read_to_string(p).unwrap();
            assert!(text.starts_with("-----BEGIN "), "{}", p.display());
        }
        lockstep_common::tls::read_private_key(&out.join("server.key"), "key").unwrap();
        lockstep_common::tls::read_certificates(&out.join("ca.pem"), "ca").unwrap();
        let e = generate(&out, &hosts, 30).unwrap_err().to_string();
        assert!(e.contains("does not overwrite"), "{e}");
        assert!(generate(&dir.path().join("x"), &[], 30).is_err());
        assert!(generate(&dir.path().join("y"), &["not a host!".into()], 30).is_err());
    }
}
