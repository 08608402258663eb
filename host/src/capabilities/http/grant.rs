//! What an `http` grant allows: hosts (names or addresses, as written in
//! URLs), ports, a timeout and a response size limit.
//!
//! Parameters are a list of host entries, or a map with `hosts` and the
//! optional `timeout_ms`, `max_response_bytes` and `ca` (PEM files of CAs
//! trusted besides the system's, for hosts with a private CA). Several
//! rules granting `http` to one script add their hosts and CAs up and take
//! the largest limits.
//!
//! An entry allows both schemes when the script asks, but a redirect from
//! `https` down to plain `http` only to a host granted as `http://HOST`
//! (an entry `https://HOST` allows only `https`).

use std::time::Duration;

use serde_json::Value;

use rustls::pki_types::CertificateDer;

use super::client::Target;
use crate::pattern::Pattern;

/// Whole-exchange timeout unless the grant sets `timeout_ms`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest timeout a grant may set.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(300);
/// Response body limit unless the grant sets `max_response_bytes`: a
/// script's memory is 64 MiB by default and a Pi Zero's 512 MiB in all.
pub const DEFAULT_MAX_RESPONSE: u64 = 1 << 20;

#[derive(Clone, Debug)]
pub struct HttpGrant {
    hosts: Vec<HostRule>,
    pub timeout: Duration,
    pub max_response: u64,
    /// CAs trusted besides the system's (`ca`).
    ca: Vec<CertificateDer<'static>>,
    /// The TLS configuration for them, made at the first `https` request.
    tls: std::sync::OnceLock<std::sync::Arc<rustls::ClientConfig>>,
}

/// One entry: `host`, `host:port`, `[v6]:port`, `*.example.com`, each
/// optionally with `http://` or `https://` before it.
#[derive(Clone, Debug, PartialEq)]
struct HostRule {
    /// Lower case, IPv6 without brackets.
    host: Pattern,
    /// `None`: the scheme's default port only.
    port: Option<u16>,
    /// `Some(true)`: `https` only; `Some(false)`: `http` only, and a
    /// redirect down to it allowed; `None`: both, no downgrade.
    https: Option<bool>,
}

impl HttpGrant {
    /// One rule's parameters.
    pub fn parse(params: &Value) -> Result<Self, String> {
        let (hosts, timeout, max) = match params {
            Value::Array(hosts) => (hosts, None, None),
            Value::Object(m) => {
                let known = ["hosts", "timeout_ms", "max_response_bytes", "ca"];
                if let Some(k) = m.keys().find(|k| !known.contains(&k.as_str())) {
                    return Err(format!(
                        "unknown key `{k}` (expected hosts, timeout_ms, max_response_bytes, ca)"
                    ));
                }
                let Some(Value::Array(hosts)) = m.get("hosts") else {
                    return Err("expected `hosts: [...]`".into());
                };
                (hosts, m.get("timeout_ms"), m.get("max_response_bytes"))
            }
            other => {
                return Err(format!(
                    "expected a list of hosts or {{ hosts: [...], timeout_ms, \
                     max_response_bytes }}, got {other}"
                ));
            }
        };
        let hosts = hosts
            .iter()
            .map(|h| match h {
                Value::String(s) => HostRule::parse(s),
                other => Err(format!("expected a host name or address, got {other}")),
            })
            .collect::<Result<_, _>>()?;
        let timeout = match timeout {
            None => DEFAULT_TIMEOUT,
            Some(v) => match v.as_u64().map(Duration::from_millis) {
                Some(t) if !t.is_zero() && t <= MAX_TIMEOUT => t,
                _ => return Err(format!("timeout_ms: expected 1..=300000, got {v}")),
            },
        };
        let max_response = match max {
            None => DEFAULT_MAX_RESPONSE,
            Some(v) => v.as_u64().filter(|&n| n > 0).ok_or_else(|| {
                format!("max_response_bytes: expected a positive number, got {v}")
            })?,
        };
        let ca = match params.get("ca") {
            None => Vec::new(),
            Some(Value::String(path)) => read_ca(path)?,
            Some(Value::Array(paths)) => {
                let mut all = Vec::new();
                for p in paths {
                    let Value::String(p) = p else {
                        return Err(format!("ca: expected PEM file paths, got {p}"));
                    };
                    all.extend(read_ca(p)?);
                }
                all
            }
            Some(other) => return Err(format!("ca: expected a PEM file path, got {other}")),
        };
        Ok(HttpGrant {
            hosts,
            timeout,
            max_response,
            ca,
            tls: Default::default(),
        })
    }

    /// The TLS configuration for this grant's `https` requests.
    pub fn tls(&self) -> std::sync::Arc<rustls::ClientConfig> {
        let make = || super::client::tls_config(&self.ca);
        self.tls.get_or_init(make).clone()
    }

    /// Every rule's parameters for one script, added up; `None` if there
    /// are none.
    pub fn merge(params: Vec<&Value>) -> Result<Option<Self>, String> {
        let mut merged: Option<HttpGrant> = None;
        for p in params {
            let g = HttpGrant::parse(p)?;
            merged = Some(match merged {
                None => g,
                Some(mut m) => {
                    m.hosts.extend(g.hosts);
                    m.ca.extend(g.ca);
                    m.timeout = m.timeout.max(g.timeout);
                    m.max_response = m.max_response.max(g.max_response);
                    m
                }
            });
        }
        Ok(merged)
    }

    /// Whether the script may reach `t`; `downgrade`: `t` is plain `http`
    /// reached by a redirect from `https`.
    pub fn allows(&self, t: &Target, downgrade: bool) -> bool {
        self.hosts.iter().any(|r| {
            let scheme = match r.https {
                None => !downgrade,
                Some(https) => https == t.https,
            };
            scheme && r.port.unwrap_or(t.default_port()) == t.port && r.host.matches(&t.host)
        })
    }
}

/// The certificates in the PEM file at `path` (a grant's `ca`).
fn read_ca(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|e| format!("ca {path}: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("ca {path}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("ca {path}: no PEM certificate in it"));
    }
    Ok(certs)
}

impl HostRule {
    fn parse(entry: &str) -> Result<Self, String> {
        let bad = |why: &str| Err(format!("host {entry:?}: {why}"));
        let (https, entry) = match entry.split_once("://") {
            Some(("https", rest)) => (Some(true), rest),
            Some(("http", rest)) => (Some(false), rest),
            _ => (None, entry),
        };
        if entry.contains("://") || entry.contains('/') {
            return bad("expected a host (and port), not a URL");
        }
        let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
            let Some((host, rest)) = rest.split_once(']') else {
                return bad("missing `]`");
            };
            match rest {
                "" => (host, None),
                _ => match rest.strip_prefix(':') {
                    Some(p) => (host, Some(p)),
                    None => return bad("expected `:port` after `]`"),
                },
            }
        } else if entry.matches(':').count() == 1 {
            let (h, p) = entry.split_once(':').unwrap_or((entry, ""));
            (h, Some(p))
        } else {
            (entry, None)
        };
        let port = match port {
            None => None,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => Some(n),
                _ => return bad("the port must be 1..=65535"),
            },
        };
        let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_');
        let wild = host.strip_prefix("*.").unwrap_or(host);
        if host != "*" && (wild.is_empty() || !wild.chars().all(plain)) {
            return bad("expected a host name, an address, or `*.` and a domain");
        }
        Ok(HostRule {
            host: Pattern::new(&host.to_ascii_lowercase()),
            port,
            https,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn grant(v: Value) -> HttpGrant {
        HttpGrant::parse(&v).unwrap()
    }

    fn allows(g: &HttpGrant, url: &str) -> bool {
        g.allows(&Target::of(&url.parse().unwrap()).unwrap(), false)
    }

    #[test]
    fn schemes_and_redirects_down_to_plain_http() {
        let g = grant(json!([
            "both.example",
            "https://tls.example",
            "http://plain.example"
        ]));
        let down = |url: &str| g.allows(&Target::of(&url.parse().unwrap()).unwrap(), true);
        assert!(allows(&g, "http://both.example/") && allows(&g, "https://both.example/"));
        assert!(!down("http://both.example/"), "a downgrade needs http://");
        assert!(allows(&g, "https://tls.example/") && !allows(&g, "http://tls.example/"));
        assert!(allows(&g, "http://plain.example/") && down("http://plain.example/"));
        assert!(!allows(&g, "https://plain.example/"));
    }

    #[test]
    fn hosts_ports_and_subdomains() {
        let g = grant(json!([
            "api.example.com",
            "192.168.1.10:8080",
            "*.svc.example",
            "[::1]:9000"
        ]));
        assert!(allows(&g, "https://api.example.com/v1?x=1"));
        assert!(allows(&g, "http://API.example.com/"));
        assert!(allows(&g, "http://api.example.com:80/"));
        assert!(
            !allows(&g, "http://api.example.com:8080/"),
            "default port only"
        );
        assert!(!allows(&g, "https://example.com/"));
        assert!(!allows(&g, "https://api.example.com.evil.net/"));
        assert!(allows(&g, "http://192.168.1.10:8080/x"));
        assert!(!allows(&g, "http://192.168.1.10/x"));
        assert!(allows(&g, "https://a.svc.example/"));
        assert!(!allows(&g, "https://svc.example/"));
        assert!(allows(&g, "http://[::1]:9000/"));
        assert!(
            !allows(&g, "http://localhost:9000/"),
            "names are not addresses"
        );
    }

    #[test]
    fn merged_rules_add_hosts_and_take_the_larger_limits() {
        let a = json!({ "hosts": ["a.example"], "timeout_ms": 2000 });
        let b = json!({ "hosts": ["b.example"], "max_response_bytes": 10 });
        let g = HttpGrant::merge(vec![&a, &b]).unwrap().unwrap();
        assert!(allows(&g, "http://a.example/") && allows(&g, "http://b.example/"));
        assert_eq!(g.timeout, DEFAULT_TIMEOUT);
        assert_eq!(g.max_response, DEFAULT_MAX_RESPONSE);
        assert!(HttpGrant::merge(vec![]).unwrap().is_none());
    }

    #[test]
    fn malformed_grants_say_what_is_wrong() {
        let err = |v| HttpGrant::parse(&v).unwrap_err();
        assert!(err(json!("a.example")).contains("expected a list"));
        assert!(err(json!(["a.example:0"])).contains("port"));
        assert!(err(json!(["a.example:http"])).contains("port"));
        assert!(err(json!(["http://a.example/x"])).contains("not a URL"));
        assert!(err(json!(["ftp://a.example"])).contains("not a URL"));
        assert!(
            err(json!({ "hosts": ["a"], "ca": "/nonexistent.pem" }))
                .contains("ca /nonexistent.pem")
        );
        assert!(err(json!({ "hosts": ["a"], "ca": 3 })).contains("ca: expected"));
        assert!(err(json!(["a b"])).contains("host"));
        assert!(err(json!(["[::1"])).contains("]"));
        assert!(err(json!({ "hosts": ["a"], "timeout": 3 })).contains("unknown key `timeout`"));
        assert!(err(json!({ "hosts": ["a"], "timeout_ms": 0 })).contains("timeout_ms"));
        assert!(err(json!({ "hosts": ["a"], "max_response_bytes": -1 })).contains("max_response"));
    }
}
