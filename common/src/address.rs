//! The coordinator's URL, parsed once (with `http::Uri`) into what the rest of the code asks
//! of it: whether it wants TLS, the host (an IPv6 address keeps its brackets, as in
//! `http://[::1]:50051`), the port, the form tonic connects to, and the socket addresses it
//! resolves to. Workers, `lockstep health`, the tcp backend's choice of address and the
//! coordinator's URL for its local workers all read a [`CoordinatorUrl`], so no code splits a
//! URL by hand.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::str::FromStr;

use http::Uri;

/// A coordinator URL that was refused, and why.
#[derive(Debug, thiserror::Error)]
#[error(
    "`{url}` is not a coordinator URL such as http://127.0.0.1:50051, https://coordinator:50051 or \
     http://[::1]:50051: {why}"
)]
pub struct UrlError {
    url: String,
    why: String,
}

/// A parsed coordinator URL: `http://` or `grpc://` for plaintext, `https://` or `grpcs://` for
/// TLS (any case), a host (name, IPv4 address, or IPv6 address in brackets) and an optional
/// port (80 for plaintext, 443 for TLS when left out, as tonic would), nothing else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CoordinatorUrl {
    /// As the user wrote it, for messages.
    given: String,
    /// The same with the scheme tonic knows (`http` or `https`).
    uri: Uri,
    tls: bool,
}

impl CoordinatorUrl {
    /// Parses and checks a coordinator URL.
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let refuse = |why: &str| UrlError {
            url: url.to_string(),
            why: why.to_string(),
        };
        let uri: Uri = url.parse().map_err(|e| {
            if url.matches(':').count() > 2 && !url.contains('[') {
                refuse("an IPv6 address goes in brackets, as in http://[::1]:50051")
            } else {
                refuse(&format!("{e}"))
            }
        })?;
        let tls = match uri.scheme_str().map(str::to_ascii_lowercase).as_deref() {
            Some("http" | "grpc") => false,
            Some("https" | "grpcs") => true,
            Some(other) => {
                return Err(refuse(&format!(
                    "unknown scheme `{other}` (use http:// for plaintext, https:// or grpcs:// for TLS)"
                )))
            }
            None => return Err(refuse("it has no scheme (http:// for plaintext, https:// for TLS)")),
        };
        let Some(authority) = uri.authority() else {
            return Err(refuse("it has no host"));
        };
        if authority.host().is_empty() || authority.host() == "[]" {
            return Err(refuse("it has no host"));
        }
        if authority.as_str().contains('@') {
            return Err(refuse(
                "it holds a user name or password (the job token goes in LOCKSTEP_TOKEN or --token-file)",
            ));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(refuse("a coordinator URL has no path or query"));
        }
        // What follows the host: nothing, or `:` and a port (`http::Uri` lets `:` alone and
        // ports past 65535 through).
        let after_host = &authority.as_str()[authority.host().len()..];
        if let Some(port) = after_host.strip_prefix(':') {
            if port.parse::<u16>().is_err() {
                return Err(refuse(&format!(
                    "the port `{port}` is not a number from 0 to 65535"
                )));
            }
        }
        let normal = format!("{}://{authority}", if tls { "https" } else { "http" });
        let uri = normal.parse().map_err(|e| refuse(&format!("{e}")))?;
        Ok(Self {
            given: url.to_string(),
            uri,
            tls,
        })
    }

    /// The URL a process on this machine reaches a listener bound to `addr` at: that address,
    /// or loopback of its family when it listens on all of them (`0.0.0.0`, `[::]`); an error
    /// rather than a panic should `http::Uri` ever refuse how a socket address prints.
    pub fn for_listener(addr: SocketAddr, tls: bool) -> Result<Self, UrlError> {
        let reach = match addr {
            SocketAddr::V4(a) if a.ip().is_unspecified() => {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), a.port())
            }
            SocketAddr::V6(a) if a.ip().is_unspecified() => {
                SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), a.port())
            }
            own => own,
        };
        let scheme = if tls { "https" } else { "http" };
        let url = format!("{scheme}://{reach}");
        Self::parse(&url)
    }

    /// Whether the URL asks for TLS (`https://`, `grpcs://`).
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// The host as the URL writes it: a name, an IPv4 address, or an IPv6 address in brackets.
    pub fn host(&self) -> &str {
        self.uri.host().unwrap_or_default()
    }

    /// The port: the URL's, or the scheme's default (80 plaintext, 443 TLS).
    pub fn port(&self) -> u16 {
        self.uri
            .port_u16()
            .unwrap_or(if self.tls { 443 } else { 80 })
    }

    /// The host as an IP address, when it is one (an IPv6 address without its brackets).
    pub fn ip(&self) -> Option<IpAddr> {
        self.bare_host().parse().ok()
    }

    /// The socket addresses the host and port resolve to (a name, or an IPv6 address with a
    /// zone, through the system resolver).
    pub fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        match self.ip() {
            Some(ip) => Ok(vec![SocketAddr::new(ip, self.port())]),
            None => Ok((self.bare_host(), self.port()).to_socket_addrs()?.collect()),
        }
    }

    /// The host without the brackets of an IPv6 address.
    fn bare_host(&self) -> &str {
        let host = self.host();
        host.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
    }

    /// The URL in the form tonic connects to: `http://` or `https://`, the host and the port
    /// as written.
    pub fn uri(&self) -> &Uri {
        &self.uri
    }
}

impl fmt::Display for CoordinatorUrl {
    /// The URL as the user wrote it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.given)
    }
}

impl FromStr for CoordinatorUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(url: &str) -> (bool, String, u16, String) {
        let u = CoordinatorUrl::parse(url).unwrap_or_else(|e| panic!("{e}"));
        (u.tls(), u.host().to_string(), u.port(), u.uri().to_string())
    }

    #[test]
    fn the_four_schemes_say_whether_a_url_wants_tls_and_become_http_or_https() {
        assert_eq!(
            parts("http://127.0.0.1:50051"),
            (
                false,
                "127.0.0.1".into(),
                50051,
                "http://127.0.0.1:50051/".into()
            )
        );
        assert_eq!(
            parts("grpc://coordinator:7"),
            (
                false,
                "coordinator".into(),
                7,
                "http://coordinator:7/".into()
            )
        );
        assert_eq!(
            parts("HTTPS://c:1"),
            (true, "c".into(), 1, "https://c:1/".into())
        );
        assert_eq!(
            parts("grpcs://c:1/"),
            (true, "c".into(), 1, "https://c:1/".into())
        );
    }

    #[test]
    fn an_ipv6_host_keeps_its_brackets_and_resolves_to_its_address() {
        let u = CoordinatorUrl::parse("http://[::1]:50051").unwrap();
        assert_eq!((u.host(), u.port()), ("[::1]", 50051));
        assert_eq!(u.ip(), Some(IpAddr::V6(Ipv6Addr::LOCALHOST)));
        assert_eq!(
            u.resolve().unwrap(),
            ["[::1]:50051".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(u.uri().to_string(), "http://[::1]:50051/");
        assert_eq!(u.to_string(), "http://[::1]:50051");
        let u = CoordinatorUrl::parse("grpcs://[2001:db8::7]:443").unwrap();
        assert_eq!((u.tls(), u.host()), (true, "[2001:db8::7]"));
    }

    #[test]
    fn a_missing_port_is_the_schemes_default_and_a_name_is_not_an_ip() {
        let u = CoordinatorUrl::parse("http://coordinator").unwrap();
        assert_eq!((u.port(), u.ip()), (80, None));
        assert_eq!(CoordinatorUrl::parse("https://c").unwrap().port(), 443);
    }

    #[test]
    fn what_is_not_a_coordinator_url_is_refused_saying_why() {
        for (url, why) in [
            ("ftp://x:1", "unknown scheme `ftp`"),
            ("coordinator:50051", "no scheme"),
            ("127.0.0.1:50051", "no scheme"),
            ("http://::1:50051", "in brackets"),
            ("http://:50051", "no host"),
            ("http://c:1/lockstep", "no path"),
            ("http://c:1?x=1", "no path or query"),
            ("http://me:secret@c:1", "user name or password"),
            ("http://c:", "the port `` is not a number"),
            ("http://c:99999", "the port `99999` is not a number"),
            ("", "not a coordinator URL"),
        ] {
            let e = CoordinatorUrl::parse(url)
                .err()
                .unwrap_or_else(|| panic!("`{url}` was accepted"))
                .to_string();
            assert!(
                e.contains(why) && e.contains("http://[::1]:50051"),
                "{url}: {e}"
            );
        }
    }

    #[test]
    fn a_listener_on_all_addresses_is_reached_on_loopback_of_its_family() {
        let url =
            |addr: &str, tls| CoordinatorUrl::for_listener(addr.parse().unwrap(), tls).unwrap();
        assert_eq!(
            url("0.0.0.0:4000", false).to_string(),
            "http://127.0.0.1:4000"
        );
        assert_eq!(url("[::]:4000", true).to_string(), "https://[::1]:4000");
        assert_eq!(url("[::1]:4000", false).to_string(), "http://[::1]:4000");
        assert_eq!(
            url("10.1.2.3:4000", false).to_string(),
            "http://10.1.2.3:4000"
        );
        assert!(url("[::]:1", true).tls());
        // A link-local address keeps its zone (the interface's index).
        let zoned = std::net::SocketAddrV6::new("fe80::1".parse().unwrap(), 4000, 0, 2);
        let url = CoordinatorUrl::for_listener(zoned.into(), false).unwrap();
        assert_eq!(url.to_string(), "http://[fe80::1%2]:4000");
    }
}
