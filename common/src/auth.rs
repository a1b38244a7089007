//! The job token: every RPC carries `authorization: Bearer <token>`, and the coordinator
//! compares it in constant time so that a wrong token reveals nothing about the right one.
//! Secrets never reach a log, an error message or the run directory: a token's `Debug` form is
//! redacted, its header is marked sensitive (never logged by the HTTP/2 stack, never put in its
//! compression table), and a file holding a secret is refused when other users may read it
//! ([`read_secret_file`]).

use std::path::Path;

use anyhow::{bail, Context, Result};
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

/// Environment variable holding the job token.
pub const TOKEN_ENV: &str = "LOCKSTEP_TOKEN";

/// A job token; its `Debug` form never shows the secret.
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// Wraps a token, refusing an empty one (it would admit anybody).
    pub fn new(value: impl Into<String>) -> Result<Self> {
        let value: String = value.into();
        let value = value.trim().to_string();
        if value.is_empty() {
            bail!("the job token is empty: set {TOKEN_ENV} or pass --token-file with a non-empty secret");
        }
        if !value.bytes().all(|b| b.is_ascii_graphic()) {
            bail!("the job token must be printable ASCII without spaces");
        }
        Ok(Self(value))
    }

    /// A fresh random token for workers this process spawns itself.
    pub fn generate() -> Self {
        let bytes: [u8; 32] = rand::random();
        Self(hex::encode(bytes))
    }

    /// The token from `--token-file` if given (see [`read_secret_file`]), else from
    /// `LOCKSTEP_TOKEN`, else `None`.
    pub fn from_file_or_env(file: Option<&Path>) -> Result<Option<Self>> {
        if let Some(path) = file {
            let bytes = read_secret_file(path, "the token file")?;
            let text = String::from_utf8(bytes).map_err(|_| {
                anyhow::anyhow!("the token file {} is not UTF-8 text", path.display())
            })?;
            return Self::new(text)
                .with_context(|| format!("the token file {}", path.display()))
                .map(Some);
        }
        match std::env::var(TOKEN_ENV) {
            Ok(v) => Self::new(v).map(Some),
            Err(_) => Ok(None),
        }
    }

    /// The secret itself, to hand to spawned workers through their environment.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// True when `presented` is this token; constant time in the token's content.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let ours = self.0.as_bytes();
        // Length is not secret (tokens of one deployment share it), content is.
        ours.len() == presented.len() && bool::from(ours.ct_eq(presented))
    }

    /// A tonic interceptor for servers: refuses any request without this token.
    pub fn server_check(&self, request: Request<()>) -> Result<Request<()>, Status> {
        let header = request.metadata().get("authorization").ok_or_else(|| {
            Status::unauthenticated(
                "missing job token (authorization metadata); set LOCKSTEP_TOKEN to the job's token",
            )
        })?;
        let presented = header.as_bytes().strip_prefix(b"Bearer ").ok_or_else(|| {
            Status::unauthenticated("authorization metadata must be `Bearer <token>`")
        })?;
        if self.matches(presented) {
            Ok(request)
        } else {
            Err(Status::unauthenticated(
                "wrong job token: this worker's LOCKSTEP_TOKEN is not the coordinator's",
            ))
        }
    }

    /// A tonic interceptor for clients: attaches this token to every request.
    pub fn client_attach(&self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let mut value = MetadataValue::try_from(format!("Bearer {}", self.0))
            .map_err(|_| Status::internal("token is not valid metadata"))?;
        value.set_sensitive(true);
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

/// Largest secret file read (a token is tens of bytes, a private key a few kilobytes).
const MAX_SECRET_FILE_BYTES: u64 = 1 << 20;

/// Reads a file holding a secret (`what`, e.g. "the token file", "the TLS private key"),
/// refusing it, as ssh refuses a private key, when users other than its owner may read or
/// write it: a file must be `0600` or stricter, except that a file owned by root (when this
/// process is not root) may also be readable by its group (`0640`, `0440`: how Kubernetes mounts a Secret into a pod with an
/// `fsGroup`, and what PostgreSQL accepts for its key), never by others. The error says what to
/// run. Symbolic links are followed (the mode checked is the file's), and the file is checked
/// as opened, so it cannot be swapped between the check and the read.
pub fn read_secret_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let shown = path.display();
    let file = std::fs::File::open(path).with_context(|| format!("opening {what} {shown}"))?;
    let meta = file
        .metadata()
        .with_context(|| format!("reading the permissions of {what} {shown}"))?;
    if !meta.is_file() {
        bail!("{what} {shown} is not a regular file");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let mode = meta.mode() & 0o777;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let ours = meta.uid() == unsafe { libc::geteuid() };
        let allowed = if meta.uid() == 0 && !ours {
            0o740
        } else {
            0o700
        };
        if mode & !allowed != 0 {
            bail!(
                "{what} {shown} is accessible by other users (mode {mode:04o}); a secret must be readable by its \
                 owner only: run `chmod 600 {shown}`"
            );
        }
    }
    if meta.len() > MAX_SECRET_FILE_BYTES {
        bail!(
            "{what} {shown} is {} bytes long; a secret file of at most {MAX_SECRET_FILE_BYTES} bytes is expected",
            meta.len()
        );
    }
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {what} {shown}"))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn a_secret_file_readable_by_others_is_refused_saying_what_to_run() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o602] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            let err = read_secret_file(&path, "the token file")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("(mode {mode:04o})"))
                    && err.contains(&format!("chmod 600 {}", path.display()))
                    && !err.contains("s3cret"),
                "{err}"
            );
        }
        for mode in [0o600, 0o400] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(
                read_secret_file(&path, "the token file").unwrap(),
                b"s3cret\n"
            );
            let token = Token::from_file_or_env(Some(&path)).unwrap().unwrap();
            assert_eq!(token.expose(), "s3cret");
        }
        let err = read_secret_file(dir.path(), "the token file").unwrap_err();
        assert!(format!("{err:#}").contains("not a regular file"), "{err:#}");
    }

    #[test]
    fn the_token_header_is_marked_sensitive() {
        let t = Token::new("abc").unwrap();
        let req = t.client_attach(Request::new(())).unwrap();
        let value = req.metadata().get("authorization").unwrap();
        assert!(value.is_sensitive());
        assert!(!format!("{value:?}").contains("abc"), "{value:?}");
    }

    #[test]
    fn only_the_exact_token_matches() {
        let t = Token::new("s3cret").unwrap();
        assert!(t.matches(b"s3cret"));
        assert!(!t.matches(b"s3cres"));
        assert!(!t.matches(b"s3cret2"));
        assert!(!t.matches(b""));
        assert!(Token::new("  ").is_err());
    }

    #[test]
    fn server_check_accepts_what_client_attach_sends() {
        let t = Token::new("abc").unwrap();
        let req = t.client_attach(Request::new(())).unwrap();
        assert!(t.server_check(req).is_ok());
        let other = Token::new("abd")
            .unwrap()
            .client_attach(Request::new(()))
            .unwrap();
        assert_eq!(
            t.server_check(other).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert!(t.server_check(Request::new(())).is_err());
    }
}
