//! The job token: every RPC carries `authorization: Bearer <token>`, and the coordinator
//! compares it in constant time so that a wrong token reveals nothing about the right one.

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

    /// The token from `--token-file` if given, else from `LOCKSTEP_TOKEN`, else `None`.
    pub fn from_file_or_env(file: Option<&Path>) -> Result<Option<Self>> {
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the token file {}", path.display()))?;
            return Self::new(text)
                .with_context(|| format!("token file {}", path.display()))
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
        let value = MetadataValue::try_from(format!("Bearer {}", self.0))
            .map_err(|_| Status::internal("token is not valid metadata"))?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
