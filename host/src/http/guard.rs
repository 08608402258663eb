//! What a browser can be made to send, refused (threat model:
//! `docs/security.md`).
//!
//! A web page on the operator's machine can reach a loopback API two ways
//! the same-origin policy does not stop:
//! - **DNS rebinding**: the page's own name (`attacker.example`) is made to
//!   resolve to 127.0.0.1, so its scripts read and write the API as "same
//!   origin". The request's `Host` then names the attacker: every request
//!   whose `Host` is not a name this server answers to is refused (421).
//! - **Cross-site requests**: a page elsewhere posts to the API (`fetch` in
//!   `no-cors` mode, a form). The browser sends `Origin` and
//!   `Sec-Fetch-Site`: a state change from another origin is refused (403),
//!   and so is a read that is not a top-level navigation (a `<script>` or
//!   `fetch` of `/v1/kv/...` from elsewhere). No CORS headers are ever sent.
//!
//! Clients that are not browsers (curl, programs) send neither `Origin`
//! nor `Sec-Fetch-*` and are not affected; the dashboard is same-origin.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Result, bail};
use axum::http::{HeaderMap, Method, StatusCode, header};

/// A name the API answers to besides its own addresses, from `http_hosts`
/// (`covey.lan` matches any port, `covey.lan:8080` only that one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostName {
    name: String,
    port: Option<u16>,
}

impl HostName {
    /// A configured name: a DNS name or IP address, optionally `:PORT`; no
    /// scheme, path or wildcard.
    pub fn parse(text: &str) -> Result<HostName> {
        let lower = text.trim().to_ascii_lowercase();
        let Some((name, port)) = split_host(&lower) else {
            bail!("http_hosts: `{text}` is not HOST or HOST:PORT (e.g. covey.lan, covey.lan:8080)");
        };
        let ip = name.trim_start_matches('[').trim_end_matches(']');
        let dns = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.';
        if ip.parse::<IpAddr>().is_err() && (name.is_empty() || !name.chars().all(dns)) {
            bail!("http_hosts: `{text}` is not a host name (letters, digits, `-` and `.`)");
        }
        Ok(HostName {
            name: name.to_string(),
            port,
        })
    }
}

/// `name[:port]` of a `Host` header (lowercase), `[v6]` kept bracketed;
/// `None` when the port is not a number.
fn split_host(host: &str) -> Option<(&str, Option<u16>)> {
    let (name, port) = match host.rfind(':') {
        // `[::1]` alone: the colon is inside the brackets.
        Some(i) if !host[i..].contains(']') => (&host[..i], Some(host[i + 1..].parse().ok()?)),
        _ => (host, None),
    };
    (!name.is_empty()).then_some((name, port))
}

/// Why a request was refused.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
}

/// The checks, and how often each refused.
pub struct Guard {
    bound: SocketAddr,
    /// This machine's name (and `NAME.local`), answered to when the API
    /// listens beyond loopback.
    machine: Option<String>,
    extra: Vec<HostName>,
    pub refused_host: AtomicU64,
    pub refused_origin: AtomicU64,
}

impl Guard {
    pub fn new(bound: SocketAddr, extra: Vec<HostName>) -> Guard {
        let machine = (!bound.ip().is_loopback())
            .then(|| {
                gethostname::gethostname()
                    .to_string_lossy()
                    .to_ascii_lowercase()
            })
            .filter(|m| !m.is_empty());
        Guard {
            bound,
            machine,
            extra,
            refused_host: AtomicU64::new(0),
            refused_origin: AtomicU64::new(0),
        }
    }

    /// Whether to answer this request; a refusal is counted.
    pub fn check(&self, method: &Method, headers: &HeaderMap) -> Result<(), Refusal> {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_ascii_lowercase);
        let host = match host {
            Some(h) if self.answers_to(&h) => h,
            other => {
                self.refused_host.fetch_add(1, Ordering::Relaxed);
                return Err(self.host_refusal(other.as_deref()));
            }
        };
        let refusal = cross_origin(method, headers, &host);
        if refusal.is_some() {
            self.refused_origin.fetch_add(1, Ordering::Relaxed);
        }
        refusal.map_or(Ok(()), Err)
    }

    /// Whether `host` (lowercase `Host` header) is one of this server's
    /// names: an address it listens on, `localhost`, this machine's name
    /// when it listens beyond loopback, or a configured name.
    fn answers_to(&self, host: &str) -> bool {
        let Some((name, port)) = split_host(host) else {
            return false;
        };
        if self
            .extra
            .iter()
            .any(|e| e.name == name && (e.port.is_none() || e.port == Some(port.unwrap_or(80))))
        {
            return true;
        }
        if port.unwrap_or(80) != self.bound.port() {
            return false;
        }
        let bound = self.bound.ip();
        let literal = name.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = literal.parse::<IpAddr>() {
            // A page whose address is an IP literal cannot be rebound: its
            // origin is that address.
            return ip == bound
                || bound.is_unspecified()
                || (bound.is_loopback() && ip.is_loopback());
        }
        let machine = self.machine.as_deref();
        name == "localhost"
            || machine == Some(name)
            || machine.is_some_and(|m| name.strip_suffix(".local") == Some(m))
    }

    fn host_refusal(&self, host: Option<&str>) -> Refusal {
        let port = self.bound.port();
        let given = host.map_or("no Host header".into(), |h| format!("Host `{h}`"));
        Refusal {
            status: StatusCode::MISDIRECTED_REQUEST,
            kind: "host_not_allowed",
            message: format!(
                "{given} is not a name this API answers to (localhost:{port}, its address \
                 {}; add others with `http_hosts`): refused so that a web page whose name \
                 resolves here cannot use it",
                self.bound
            ),
        }
    }
}

/// A request from a page of another origin that is not a plain navigation
/// to a page of data: `host` is the request's accepted `Host`.
fn cross_origin(method: &Method, headers: &HeaderMap, host: &str) -> Option<Refusal> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let changes = !matches!(*method, Method::GET | Method::HEAD);
    if let Some(origin) = headers.get(header::ORIGIN) {
        let own = origin.to_str().ok().is_some_and(|o| {
            let o = o.to_ascii_lowercase();
            let rest = o.strip_prefix("http://").or(o.strip_prefix("https://"));
            rest == Some(host)
        });
        if !own {
            let origin = String::from_utf8_lossy(origin.as_bytes()).into_owned();
            return Some(origin_refusal(format!("Origin `{origin}`")));
        }
    }
    // Browsers say where a request comes from even when they leave out
    // `Origin` (GETs): `same-origin`, `none` (typed or bookmarked), or
    // another site's. Only navigations may come from elsewhere, and only
    // to read.
    let site = text("sec-fetch-site");
    let elsewhere = site.is_some_and(|s| s != "same-origin" && s != "none");
    let navigation = text("sec-fetch-mode") == Some("navigate");
    if elsewhere && (changes || !navigation) {
        let site = site.unwrap_or_default();
        return Some(origin_refusal(format!("a `{site}` request")));
    }
    None
}

fn origin_refusal(what: String) -> Refusal {
    Refusal {
        status: StatusCode::FORBIDDEN,
        kind: "cross_origin",
        message: format!(
            "{what} from a page of another origin is refused: only this API's own pages \
             (the dashboard) and clients that are not browsers may use it"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    fn check(
        g: &Guard,
        method: Method,
        pairs: &[(&'static str, &str)],
    ) -> Result<(), &'static str> {
        g.check(&method, &headers(pairs)).map_err(|r| r.kind)
    }

    fn loopback() -> Guard {
        Guard::new("127.0.0.1:7467".parse().unwrap(), vec![])
    }

    #[test]
    fn hosts_a_loopback_api_answers_to() {
        let g = loopback();
        for host in [
            "127.0.0.1:7467",
            "localhost:7467",
            "[::1]:7467",
            "LOCALHOST:7467",
        ] {
            assert_eq!(check(&g, Method::PUT, &[("host", host)]), Ok(()), "{host}");
        }
        for host in [
            "attacker.example:7467",
            "localhost:80",
            "localhost",
            "127.0.0.1",
            "localhost.:7467",
            "10.0.0.5:7467",
            "127.0.0.1:x",
            "",
        ] {
            assert_eq!(
                check(&g, Method::GET, &[("host", host)]),
                Err("host_not_allowed"),
                "{host}"
            );
        }
        assert_eq!(check(&g, Method::GET, &[]), Err("host_not_allowed"));
        assert_eq!(g.refused_host.load(Ordering::Relaxed), 9);
    }

    #[test]
    fn configured_names_with_and_without_port() {
        let extra = vec![
            HostName::parse("Covey.lan").unwrap(),
            HostName::parse("pi.lan:8080").unwrap(),
        ];
        let g = Guard::new("127.0.0.1:7467".parse().unwrap(), extra);
        for host in ["covey.lan", "covey.lan:443", "pi.lan:8080"] {
            assert_eq!(check(&g, Method::GET, &[("host", host)]), Ok(()), "{host}");
        }
        assert!(check(&g, Method::GET, &[("host", "pi.lan")]).is_err());
        for bad in [
            "http://covey.lan",
            "covey.lan/x",
            "*.lan",
            "a b",
            "x:99999",
            "",
        ] {
            assert!(HostName::parse(bad).is_err(), "{bad}");
        }
        assert!(HostName::parse("[fd00::1]:8080").is_ok());
    }

    #[test]
    fn a_wildcard_bind_answers_to_any_address_and_the_machine_name() {
        let g = Guard::new("0.0.0.0:7467".parse().unwrap(), vec![]);
        let me = gethostname::gethostname()
            .to_string_lossy()
            .to_ascii_lowercase();
        let local = format!("{me}.local:7467");
        let named = format!("{me}:7467");
        for host in ["192.168.1.20:7467", "127.0.0.1:7467", &named, &local] {
            assert_eq!(check(&g, Method::GET, &[("host", host)]), Ok(()), "{host}");
        }
        assert!(check(&g, Method::GET, &[("host", "evil.example:7467")]).is_err());
    }

    #[test]
    fn cross_origin_changes_and_subresource_reads_are_refused() {
        let g = loopback();
        let host = ("host", "127.0.0.1:7467");
        let evil = ("origin", "http://127.0.0.2:8000");
        // The hostile page's no-cors POST, and a form's.
        assert_eq!(check(&g, Method::POST, &[host, evil]), Err("cross_origin"));
        let null = ("origin", "null");
        assert_eq!(check(&g, Method::POST, &[host, null]), Err("cross_origin"));
        // Another port of the same name is another origin.
        let port = ("origin", "http://localhost:8000");
        let lhost = ("host", "localhost:7467");
        assert_eq!(
            check(&g, Method::DELETE, &[lhost, port]),
            Err("cross_origin")
        );
        // A POST whose browser left out Origin still says where it is from.
        let site = ("sec-fetch-site", "cross-site");
        assert_eq!(check(&g, Method::POST, &[host, site]), Err("cross_origin"));
        let same_site = ("sec-fetch-site", "same-site");
        assert_eq!(
            check(&g, Method::PUT, &[host, same_site]),
            Err("cross_origin")
        );
        // `<script src=/v1/kv/...>` from elsewhere.
        let mode = ("sec-fetch-mode", "no-cors");
        assert_eq!(
            check(&g, Method::GET, &[host, site, mode]),
            Err("cross_origin")
        );
        // A link to the dashboard from elsewhere opens it.
        let nav = ("sec-fetch-mode", "navigate");
        assert_eq!(check(&g, Method::GET, &[host, site, nav]), Ok(()));
        assert_eq!(g.refused_origin.load(Ordering::Relaxed), 6);
    }

    #[test]
    fn own_origin_and_plain_clients_are_served() {
        let g = loopback();
        let host = ("host", "127.0.0.1:7467");
        let own = ("origin", "http://127.0.0.1:7467");
        let same = ("sec-fetch-site", "same-origin");
        assert_eq!(check(&g, Method::POST, &[host, own, same]), Ok(()));
        assert_eq!(check(&g, Method::PUT, &[host]), Ok(()));
        let typed = ("sec-fetch-site", "none");
        assert_eq!(check(&g, Method::GET, &[host, typed]), Ok(()));
        // Behind a TLS-terminating proxy that keeps Host.
        let g = Guard::new(
            "127.0.0.1:7467".parse().unwrap(),
            vec![HostName::parse("covey.lan").unwrap()],
        );
        let host = ("host", "covey.lan");
        let own = ("origin", "https://covey.lan");
        assert_eq!(check(&g, Method::POST, &[host, own]), Ok(()));
    }
}
