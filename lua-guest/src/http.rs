//! `require("http")`: esc's HTTP module (the gluahttp API) over the host's
//! `http` capability, which only reaches hosts the operator granted.
//!
//! `http.get|post|put|patch|delete|head(url [, options])` and
//! `http.request(method, url [, options])` return a response table
//! `{status_code, headers, body, body_size, url}`, or `nil, error` when no
//! response came (not granted, timeout, too large, connection failed).
//! Options: `query` (string or table), `headers` (table), `body` (string),
//! `form` (string or table: an urlencoded body), `timeout` (seconds, or a
//! Go duration such as `"500ms"`, `"5s"`), `auth = {user=, pass=}`.

use mlua::{IntoLuaMulti, Lua, MultiValue, Table, Value};

use crate::covey::script::http::{self as wit, HttpError};

/// The module table.
pub(crate) fn module(lua: &Lua) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    for (name, method) in [
        ("get", "GET"),
        ("post", "POST"),
        ("put", "PUT"),
        ("patch", "PATCH"),
        ("delete", "DELETE"),
        ("head", "HEAD"),
    ] {
        t.set(
            name,
            lua.create_function(move |lua, (url, opts): (String, Option<Table>)| {
                request(lua, method.to_string(), url, opts)
            })?,
        )?;
    }
    t.set(
        "request",
        lua.create_function(
            |lua, (method, url, opts): (String, String, Option<Table>)| {
                request(lua, method.to_ascii_uppercase(), url, opts)
            },
        )?,
    )?;
    Ok(t)
}

fn request(
    lua: &Lua,
    method: String,
    url: String,
    opts: Option<Table>,
) -> mlua::Result<MultiValue> {
    let req = build(lua, method, url, opts)?;
    match wit::fetch(&req) {
        Ok(resp) => response_table(lua, resp)?.into_lua_multi(lua),
        Err(e) => (Value::Nil, describe(&e)).into_lua_multi(lua),
    }
}

/// The request from gluahttp-style options; bad option types raise.
fn build(
    lua: &Lua,
    method: String,
    mut url: String,
    opts: Option<Table>,
) -> mlua::Result<wit::Request> {
    let mut req = wit::Request {
        method,
        url: String::new(),
        headers: Vec::new(),
        body: Vec::new(),
        timeout_ms: 0,
    };
    let Some(opts) = opts else {
        req.url = url;
        return Ok(req);
    };
    match opts.get::<Value>("query")? {
        Value::Nil => {}
        q => {
            let q = encode_form(lua, q, "query")?;
            if !q.is_empty() {
                url.push(if url.contains('?') { '&' } else { '?' });
                url.push_str(&q);
            }
        }
    }
    req.url = url;
    if let Some(headers) = opts.get::<Option<Table>>("headers")? {
        for pair in headers.pairs::<String, String>() {
            req.headers.push(pair?);
        }
    }
    if let Some(auth) = opts.get::<Option<Table>>("auth")? {
        let user: String = auth.get("user")?;
        let pass: String = auth.get::<Option<String>>("pass")?.unwrap_or_default();
        let token = base64(format!("{user}:{pass}").as_bytes());
        req.headers
            .push(("authorization".into(), format!("Basic {token}")));
    }
    match opts.get::<Value>("form")? {
        Value::Nil => {}
        form => {
            req.body = encode_form(lua, form, "form")?.into_bytes();
            let has_type = req
                .headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("content-type"));
            if !has_type {
                req.headers.push((
                    "content-type".into(),
                    "application/x-www-form-urlencoded".into(),
                ));
            }
        }
    }
    if let Some(body) = opts.get::<Option<mlua::LuaString>>("body")? {
        req.body = body.as_bytes().to_vec();
    }
    req.timeout_ms = match opts.get::<Value>("timeout")? {
        Value::Nil => 0,
        Value::Integer(s) => seconds_ms(s as f64)?,
        Value::Number(s) => seconds_ms(s)?,
        Value::String(s) => duration_ms(&s.to_str()?)?,
        other => return Err(bad("timeout", other.type_name())),
    };
    Ok(req)
}

fn bad(option: &str, got: &str) -> mlua::Error {
    mlua::Error::runtime(format!("http: option `{option}`: unexpected {got}"))
}

/// A query or form: a string as it is, a table as `k=v&...` (keys sorted,
/// both percent-encoded).
fn encode_form(lua: &Lua, v: Value, option: &str) -> mlua::Result<String> {
    let t = match v {
        Value::String(s) => return Ok(s.to_str()?.to_string()),
        Value::Table(t) => t,
        other => return Err(bad(option, other.type_name())),
    };
    let mut pairs = Vec::new();
    for pair in t.pairs::<Value, Value>() {
        let (k, v) = pair?;
        let text = |v: Value| -> mlua::Result<String> {
            Ok(lua
                .coerce_string(v)?
                .map(|s| s.to_string_lossy())
                .unwrap_or_default())
        };
        pairs.push((text(k)?, text(v)?));
    }
    pairs.sort();
    let encoded: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{}={}", percent(k), percent(v)))
        .collect();
    Ok(encoded.join("&"))
}

fn percent(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn seconds_ms(s: f64) -> mlua::Result<u32> {
    if s.is_nan() || s <= 0.0 {
        return Err(mlua::Error::runtime(
            "http: option `timeout` must be positive",
        ));
    }
    Ok((s * 1000.0).ceil().min(u32::MAX as f64) as u32)
}

/// Go's `time.ParseDuration` subset scripts use: `1.5s`, `500ms`, `2m`, `1h`.
fn duration_ms(text: &str) -> mlua::Result<u32> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let scale = match unit {
        "ms" => 0.001,
        "s" | "" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => f64::NAN,
    };
    match num.parse::<f64>() {
        Ok(n) if scale.is_finite() => seconds_ms(n * scale),
        _ => Err(mlua::Error::runtime(format!(
            "http: option `timeout`: {text:?} is not a duration (e.g. \"5s\", \"500ms\")"
        ))),
    }
}

/// `{status_code, headers, body, body_size, url}`; `headers` looks names
/// up case-insensitively (`headers["Content-Type"]`), repeated headers
/// joined with `, `.
fn response_table(lua: &Lua, resp: wit::Response) -> mlua::Result<Table> {
    let headers = lua.create_table()?;
    for (name, value) in resp.headers {
        let joined = match headers.raw_get::<Option<String>>(name.as_str())? {
            Some(prev) => format!("{prev}, {value}"),
            None => value,
        };
        headers.raw_set(name, joined)?;
    }
    let meta = lua.create_table()?;
    meta.set(
        "__index",
        lua.create_function(|_, (t, k): (Table, String)| {
            t.raw_get::<Value>(k.to_ascii_lowercase())
        })?,
    )?;
    headers.set_metatable(Some(meta))?;
    let t = lua.create_table()?;
    t.set("status_code", resp.status)?;
    t.set("headers", headers)?;
    t.set("body_size", resp.body.len())?;
    t.set("body", lua.create_string(&resp.body)?)?;
    t.set("url", resp.url)?;
    Ok(t)
}

fn describe(e: &HttpError) -> String {
    match e {
        HttpError::NotGranted(why) => format!("not granted: {why}"),
        HttpError::InvalidRequest(why) => format!("invalid request: {why}"),
        HttpError::Timeout(ms) => format!("timeout: no complete response within {ms} ms"),
        HttpError::ResponseTooLarge(max) => format!("response too large: over {max} bytes"),
        HttpError::Connect(why) => format!("connect: {why}"),
        HttpError::Protocol(why) => format!("protocol: {why}"),
    }
}
