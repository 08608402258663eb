//! `covey:script/http`: outgoing HTTP(S) requests to the hosts the operator
//! granted the script (`grants: { "sensors/*.lua": { http: [...] } }`).
//!
//! A small Covey interface rather than `wasi:http`: one blocking call
//! matches the callback model (like `call`), every hop of a redirect can be
//! checked against the grant, Lua maps it in a few lines, and the Pi build
//! does not carry wasmtime-wasi-http. The policy (what a grant allows) is
//! here; one exchange on the wire is [`client`].

mod client;
mod grant;

use std::time::Duration;

use hyper::Uri;
use wasmtime::component::{HasSelf, Linker};

use self::client::Exchange;
use self::grant::HttpGrant;
use super::{Capability, ScriptEnv, ScriptState};
use crate::bindings::covey::script::http::{self as wit, HttpError, Request, Response};
use crate::router::ScriptId;

/// Redirects followed before giving up (as curl's and Go's defaults, near).
const MAX_REDIRECTS: usize = 5;

pub struct HttpCtx {
    script: ScriptId,
    /// What the script may reach; `None`: no `http` grant at all.
    grant: Option<HttpGrant>,
}

impl Capability for HttpCtx {
    const GRANT: Option<&'static str> = Some("http");

    fn check_grant(params: &serde_json::Value) -> Result<(), String> {
        HttpGrant::parse(params).map(drop)
    }

    fn new(env: &ScriptEnv) -> Self {
        let params = env.services.grants.params(&env.script, "http");
        HttpCtx {
            script: env.script.clone(),
            // Checked when the config was read; a rule that fails here
            // anyway grants nothing.
            grant: HttpGrant::merge(params).ok().flatten(),
        }
    }

    fn link(
        linker: &mut Linker<ScriptState>,
        get: fn(&mut ScriptState) -> &mut Self,
    ) -> wasmtime::Result<()> {
        wit::add_to_linker::<ScriptState, HasSelf<Self>>(linker, get)
    }
}

impl wit::Host for HttpCtx {
    async fn fetch(&mut self, req: Request) -> Result<Response, HttpError> {
        let Some(grant) = &self.grant else {
            return Err(HttpError::NotGranted(format!(
                "script `{}` has no http grant; the node's config needs e.g. \
                 `grants: {{ \"{}\": {{ http: [\"HOST\"] }} }}`",
                self.script, self.script
            )));
        };
        let limit = match req.timeout_ms {
            0 => grant.timeout,
            ms => grant.timeout.min(Duration::from_millis(ms.into())),
        };
        let ms = limit.as_millis() as u32;
        tokio::time::timeout(limit, self.follow(grant, req))
            .await
            .unwrap_or(Err(HttpError::Timeout(ms)))
    }
}

impl HttpCtx {
    /// Send `req`, following redirects to granted targets.
    async fn follow(&self, grant: &HttpGrant, req: Request) -> Result<Response, HttpError> {
        let mut url: Uri = req
            .url
            .parse()
            .map_err(|e| HttpError::InvalidRequest(format!("url {:?}: {e}", req.url)))?;
        let mut ex = Exchange::new(req.method, req.headers, req.body)?;
        let tls = grant.tls();
        let mut from_https = false;
        for _ in 0..=MAX_REDIRECTS {
            let target = client::Target::of(&url)?;
            let downgrade = from_https && !target.https;
            if !grant.allows(&target, downgrade) {
                let (what, entry) = match downgrade {
                    true => (
                        "be redirected from https to",
                        format!("http://{}", target.grant_entry()),
                    ),
                    false => ("reach", target.grant_entry()),
                };
                return Err(HttpError::NotGranted(format!(
                    "script `{}` may not {what} {}: its http grant would need {entry:?}",
                    self.script,
                    target.authority(),
                )));
            }
            from_https = target.https;
            let answer = ex.send(&target, &tls, grant.max_response).await?;
            let Some(next) = answer.redirect(&url)? else {
                return Ok(answer.into_response(url.to_string()));
            };
            ex.redirected(answer.status, &target, &client::Target::of(&next)?);
            url = next;
        }
        Err(HttpError::Protocol(format!(
            "more than {MAX_REDIRECTS} redirects (last to {url})"
        )))
    }
}
