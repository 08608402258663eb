//! One HTTP/1.1 exchange on its own connection: resolve, connect, TLS for
//! `https`, send, read the response up to a limit. What may be reached is
//! decided by the caller (`super::grant`) before each exchange.

use std::sync::{Arc, OnceLock};

use rustls::pki_types::CertificateDer;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Method, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::bindings::covey::script::http::{HttpError, Response};

/// Where one exchange goes, read from an absolute URL.
pub struct Target {
    pub https: bool,
    /// Lower case, IPv6 without brackets, no trailing dot.
    pub host: String,
    pub port: u16,
    path_and_query: String,
}

impl Target {
    pub fn of(url: &Uri) -> Result<Self, HttpError> {
        let invalid = |why: &str| HttpError::InvalidRequest(format!("url {url}: {why}"));
        let https = match url.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            Some(_) => return Err(invalid("only http and https URLs")),
            None => return Err(invalid("expected an absolute http:// or https:// URL")),
        };
        let authority = url.authority().ok_or_else(|| invalid("no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid(
                "credentials in the URL (use an authorization header)",
            ));
        }
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if host.is_empty() {
            return Err(invalid("no host"));
        }
        let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path_and_query = url.path_and_query().map_or("/", |p| p.as_str()).to_string();
        Ok(Target {
            https,
            host,
            port,
            path_and_query,
        })
    }

    pub fn default_port(&self) -> u16 {
        if self.https { 443 } else { 80 }
    }

    /// `host:port` as written in a URL (brackets around IPv6).
    pub fn authority(&self) -> String {
        let host = match self.host.contains(':') {
            true => format!("[{}]", self.host),
            false => self.host.clone(),
        };
        format!("{host}:{}", self.port)
    }

    /// The grant entry that would allow this target.
    pub fn grant_entry(&self) -> String {
        match self.port == self.default_port() {
            true if !self.host.contains(':') => self.host.clone(),
            _ => self.authority(),
        }
    }
}

/// A request as it travels through redirects.
pub struct Exchange {
    method: Method,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
}

/// A response whose body was read in full.
pub struct Answer {
    pub status: u16,
    headers: hyper::HeaderMap,
    body: Bytes,
}

impl Exchange {
    pub fn new(
        method: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    ) -> Result<Self, HttpError> {
        let invalid = HttpError::InvalidRequest;
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|_| invalid(format!("method {method:?} is not an HTTP method")))?;
        let mut parsed = Vec::with_capacity(headers.len());
        for (name, value) in headers {
            let n = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid(format!("header name {name:?}")))?;
            let v = HeaderValue::from_str(&value)
                .map_err(|_| invalid(format!("header {name}: value {value:?}")))?;
            // The connection's framing and target are the host's to set.
            let framing = [
                header::HOST,
                header::CONTENT_LENGTH,
                header::TRANSFER_ENCODING,
                header::CONNECTION,
            ];
            if !framing.contains(&n) {
                parsed.push((n, v));
            }
        }
        Ok(Exchange {
            method,
            headers: parsed,
            body: Bytes::from(body),
        })
    }

    /// Adjust the request for a redirect from `from` to `to` with `status`:
    /// 303 (and 301/302 after a POST, as browsers do) becomes a GET
    /// without a body; credentials do not follow to another host.
    pub fn redirected(&mut self, status: u16, from: &Target, to: &Target) {
        let to_get = status == 303 || (matches!(status, 301 | 302) && self.method == Method::POST);
        if to_get && self.method != Method::HEAD {
            self.method = Method::GET;
            self.body = Bytes::new();
            self.headers
                .retain(|(n, _)| !n.as_str().starts_with("content-"));
        }
        if (&from.host, from.port, from.https) != (&to.host, to.port, to.https) {
            self.headers
                .retain(|(n, _)| n != header::AUTHORIZATION && n != header::COOKIE);
        }
    }

    /// One exchange with `t`, the response body read up to `max` bytes.
    pub async fn send(
        &self,
        t: &Target,
        tls: &Arc<rustls::ClientConfig>,
        max: u64,
    ) -> Result<Answer, HttpError> {
        let tcp = TcpStream::connect((t.host.as_str(), t.port))
            .await
            .map_err(|e| HttpError::Connect(format!("connecting to {}: {e}", t.authority())))?;
        let _ = tcp.set_nodelay(true);
        if t.https {
            let name = rustls::pki_types::ServerName::try_from(t.host.clone())
                .map_err(|e| HttpError::Connect(format!("{}: {e}", t.host)))?;
            let tls = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| HttpError::Connect(format!("TLS with {}: {e}", t.authority())))?;
            self.exchange(TokioIo::new(tls), t, max).await
        } else {
            self.exchange(TokioIo::new(tcp), t, max).await
        }
    }

    async fn exchange<IO>(&self, io: IO, t: &Target, max: u64) -> Result<Answer, HttpError>
    where
        IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let protocol = |e: hyper::Error| HttpError::Protocol(format!("{}: {e}", t.authority()));
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(protocol)?;
        // The connection is driven beside the request and dropped with it
        // (on a timeout too).
        let conn = AbortOnDrop(tokio::spawn(conn));
        let mut req = hyper::Request::builder()
            .method(self.method.clone())
            .uri(&t.path_and_query)
            .header(header::HOST, host_header(t));
        for (n, v) in &self.headers {
            req = req.header(n, v);
        }
        let req = req
            .body(Full::new(self.body.clone()))
            .map_err(|e| HttpError::InvalidRequest(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(protocol)?;
        let (parts, body) = resp.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max) {
            return Err(HttpError::ResponseTooLarge(max));
        }
        let body = Limited::new(body, max as usize)
            .collect()
            .await
            .map_err(
                |e| match e.downcast_ref::<http_body_util::LengthLimitError>() {
                    Some(_) => HttpError::ResponseTooLarge(max),
                    None => {
                        HttpError::Protocol(format!("{}: reading the body: {e}", t.authority()))
                    }
                },
            )?
            .to_bytes();
        drop(conn);
        Ok(Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }
}

impl Answer {
    /// Where a redirect points, resolved against `base`; `None` if this is
    /// not a redirect (a 3xx without `location` is returned as it is).
    pub fn redirect(&self, base: &Uri) -> Result<Option<Uri>, HttpError> {
        if !matches!(self.status, 301 | 302 | 303 | 307 | 308) {
            return Ok(None);
        }
        let Some(loc) = self.headers.get(header::LOCATION) else {
            return Ok(None);
        };
        let loc = loc
            .to_str()
            .map_err(|_| HttpError::Protocol("redirect location is not text".into()))?;
        resolve(base, loc)
            .map(Some)
            .ok_or_else(|| HttpError::Protocol(format!("redirect to an invalid location {loc:?}")))
    }

    pub fn into_response(self, url: String) -> Response {
        let headers = self
            .headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into(),
                )
            })
            .collect();
        Response {
            status: self.status,
            headers,
            body: self.body.into(),
            url,
        }
    }
}

/// `location` relative to `base` (absolute, `//host/...`, `/path` or a
/// path relative to the base's directory).
fn resolve(base: &Uri, location: &str) -> Option<Uri> {
    let scheme = base.scheme_str()?;
    let authority = base.authority()?.as_str();
    let text = if location.contains("://") {
        location.to_string()
    } else if let Some(rest) = location.strip_prefix("//") {
        format!("{scheme}://{rest}")
    } else if location.starts_with('/') {
        format!("{scheme}://{authority}{location}")
    } else {
        let path = base.path();
        let dir = &path[..path.rfind('/').map_or(0, |i| i + 1)];
        let dir = if dir.is_empty() { "/" } else { dir };
        format!("{scheme}://{authority}{dir}{location}")
    };
    text.parse().ok()
}

fn host_header(t: &Target) -> String {
    match t.port == t.default_port() {
        true if !t.host.contains(':') => t.host.clone(),
        true => format!("[{}]", t.host),
        false => t.authority(),
    }
}

/// The system's trusted roots, loaded once.
fn system_roots() -> &'static rustls::RootCertStore {
    static ROOTS: OnceLock<rustls::RootCertStore> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!("http capability: reading the system's certificates: {e}");
        }
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            tracing::warn!("http capability: no trusted roots found; https requests will fail");
        }
        roots
    })
}

/// Client TLS trusting the system's roots and `extra` (a grant's `ca`);
/// the one without extras is made once.
pub fn tls_config(extra: &[CertificateDer<'static>]) -> Arc<rustls::ClientConfig> {
    static PLAIN: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    let make = || {
        let mut roots = system_roots().clone();
        let (_, ignored) = roots.add_parsable_certificates(extra.iter().cloned());
        if ignored > 0 {
            tracing::warn!("http capability: {ignored} grant CA certificates could not be used");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    };
    match extra.is_empty() {
        true => PLAIN.get_or_init(make).clone(),
        false => make(),
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_locations_resolve_like_a_browser() {
        let base: Uri = "http://a.example:8080/dir/page?q=1".parse().unwrap();
        let r = |l| resolve(&base, l).unwrap().to_string();
        assert_eq!(r("https://b.example/x"), "https://b.example/x");
        assert_eq!(r("//c.example/y"), "http://c.example/y");
        assert_eq!(r("/z?k=v"), "http://a.example:8080/z?k=v");
        assert_eq!(r("other"), "http://a.example:8080/dir/other");
    }

    #[test]
    fn targets_read_from_urls() {
        let t = |u: &str| Target::of(&u.parse().unwrap());
        let a = t("https://API.Example.com./v1?x=1").unwrap();
        assert_eq!(
            (a.host.as_str(), a.port, a.https),
            ("api.example.com", 443, true)
        );
        assert_eq!(a.path_and_query, "/v1?x=1");
        assert_eq!(a.grant_entry(), "api.example.com");
        let b = t("http://[::1]:9000").unwrap();
        assert_eq!((b.host.as_str(), b.port), ("::1", 9000));
        assert_eq!(b.grant_entry(), "[::1]:9000");
        assert_eq!(b.path_and_query, "/");
        for bad in ["ftp://a.example/", "/relative", "http://user:pw@a.example/"] {
            assert!(matches!(t(bad), Err(HttpError::InvalidRequest(_))), "{bad}");
        }
    }
}
