//! The standard library completed for a sandbox whose boundary is wasm:
//! Lua's own `require` over files read through the host, `loadfile` and
//! `dofile` likewise, `io` reduced to the standard streams, `print` as
//! Lua's, and everything that would reach outside the instance (files,
//! processes, the environment, native modules) refused with a clear error.

use mlua::{Function, IntoLuaMulti, Lua, MultiValue, Table, Value, Variadic};

use crate::covey::script::lua_source;

const SANDBOX: &str = "not available in the Covey sandbox";

/// `dofile(path)` over the host-backed `loadfile`.
const DOFILE: &str = r#"
local loadfile = ...
return function(path)
  if path == nil then
    error("dofile: not available in the Covey sandbox (without a file name it reads stdin)", 2)
  end
  local f, err = loadfile(path)
  if not f then error(err, 0) end
  return f()
end
"#;

/// Complete and fence the standard library (after `json` is a global).
pub(crate) fn install(lua: &Lua) -> mlua::Result<()> {
    lua.globals().set("print", lua.create_function(print)?)?;
    install_package(lua)?;
    sandbox(lua)
}

/// `require` is Lua's own (`package.loaded`, `preload`, `searchers`,
/// `path`), with the file searcher replaced by one that reads through the
/// host; `json` and esc's `http` are preloaded modules.
fn install_package(lua: &Lua) -> mlua::Result<()> {
    let g = lua.globals();
    let package: Table = g.get("package")?;
    package.set("path", lua_source::search_path())?;
    package.set("cpath", "")?;
    let loaded: Table = package.get("loaded")?;
    loaded.set("json", g.get::<Value>("json")?)?;
    loaded.set("http", crate::http::module(lua)?)?;
    let searchers: Table = package.get("searchers")?;
    let preload: Function = searchers.get(1)?;
    let ours = lua.create_table()?;
    ours.push(preload)?;
    ours.push(lua.create_function(search_host)?)?;
    package.set("searchers", ours)?;
    g.set(
        "loadfile",
        lua.create_function(|lua, args| loadfile(lua, "loadfile", args))?,
    )?;
    // In Lua, so that its errors are plain strings as Lua's own are.
    let dofile: Function = lua
        .load(DOFILE)
        .set_name("=dofile")
        .call(g.get::<Function>("loadfile")?)?;
    g.set("dofile", dofile)?;
    Ok(())
}

/// The searcher: `package.path`'s templates, each file asked of the host.
fn search_host(lua: &Lua, name: String) -> mlua::Result<MultiValue> {
    let package: Table = lua.globals().get("package")?;
    let path: String = package.get("path")?;
    let file = name.replace('.', "/");
    let mut tried = Vec::new();
    for template in path.split(';').filter(|t| !t.is_empty()) {
        let candidate = template.replace('?', &file);
        let Some(bytes) = lua_source::read(&candidate) else {
            tried.push(format!("no file '{candidate}'"));
            continue;
        };
        let chunk_name = format!("@{}", candidate.trim_start_matches("./"));
        let f = lua
            .load(bytes)
            .set_name(chunk_name)
            .into_function()
            .map_err(|e| {
                mlua::Error::runtime(format!(
                    "error loading module '{name}' from file '{candidate}':\n\t{e}"
                ))
            })?;
        return (f, candidate).into_lua_multi(lua);
    }
    tried.join("\n\t").into_lua_multi(lua)
}

/// `loadfile(path [, mode [, env]])` through the host: the function, or
/// `nil, why`. Without a path Lua would read stdin, which scripts lack.
fn loadfile(
    lua: &Lua,
    what: &str,
    (path, mode, env): (Option<String>, Option<String>, Option<Table>),
) -> mlua::Result<(Value, Option<String>)> {
    let Some(path) = path else {
        let why = format!("{what}: {SANDBOX} (without a file name it reads stdin)");
        return Ok((Value::Nil, Some(why)));
    };
    let Some(bytes) = lua_source::read(&path) else {
        return Ok((Value::Nil, Some(format!("cannot open {path}"))));
    };
    let mut chunk = lua
        .load(bytes)
        .set_name(format!("@{}", path.trim_start_matches("./")));
    match mode.as_deref() {
        None | Some("bt") => {}
        Some("t") => chunk = chunk.set_mode(mlua::chunk::ChunkMode::Text),
        Some("b") => chunk = chunk.set_mode(mlua::chunk::ChunkMode::Binary),
        Some(other) => return Err(mlua::Error::runtime(format!("invalid mode '{other}'"))),
    }
    if let Some(env) = env {
        chunk = chunk.set_environment(env);
    }
    match chunk.into_function() {
        Ok(f) => Ok((Value::Function(f), None)),
        Err(e) => Ok((Value::Nil, Some(e.to_string()))),
    }
}

/// `io`: the standard streams (WASI's stdout and stderr: the terminal
/// under `covey exec`, log lines on a node) written as Lua writes them;
/// files, processes and reading raise a clear error.
fn io_table<F>(lua: &Lua, refuse: &F) -> mlua::Result<Table>
where
    F: Fn(String) -> mlua::Result<Function>,
{
    let io = lua.create_table()?;
    for f in [
        "open", "popen", "read", "lines", "input", "tmpfile", "close",
    ] {
        io.set(f, refuse(format!("io.{f}"))?)?;
    }
    let stdout = std_file(lua, false, refuse)?;
    let stderr = std_file(lua, true, refuse)?;
    let out = stdout.clone();
    io.set(
        "write",
        lua.create_function(move |lua, args: Variadic<Value>| {
            write_std(lua, false, &args)?;
            Ok(out.clone())
        })?,
    )?;
    let out = stdout.clone();
    io.set(
        "output",
        lua.create_function(move |_, file: Option<Value>| match file {
            None => Ok(out.clone()),
            Some(_) => Err(mlua::Error::runtime(format!("io.output(file): {SANDBOX}"))),
        })?,
    )?;
    let (a, b) = (stdout.clone(), stderr.clone());
    io.set(
        "type",
        lua.create_function(move |_, v: Value| {
            Ok(match v {
                Value::Table(t) if t == a || t == b => Some("file"),
                _ => None,
            })
        })?,
    )?;
    io.set("stdout", stdout)?;
    io.set("stderr", stderr)?;
    Ok(io)
}

/// `io.stdout` or `io.stderr`: `write`, `flush`, `setvbuf`, and `close`
/// answering as Lua does for a standard file.
fn std_file<F>(lua: &Lua, stderr: bool, refuse: &F) -> mlua::Result<Table>
where
    F: Fn(String) -> mlua::Result<Function>,
{
    let file = lua.create_table()?;
    file.set(
        "write",
        lua.create_function(move |lua, (this, args): (Table, Variadic<Value>)| {
            write_std(lua, stderr, &args)?;
            Ok(this)
        })?,
    )?;
    file.set("flush", lua.create_function(|_, _: MultiValue| Ok(true))?)?;
    file.set("setvbuf", lua.create_function(|_, _: MultiValue| Ok(true))?)?;
    file.set(
        "close",
        lua.create_function(|_, _: MultiValue| Ok((Value::Nil, "cannot close standard file")))?,
    )?;
    for f in ["read", "lines", "seek"] {
        file.set(f, refuse(format!("file:{f}"))?)?;
    }
    let meta = lua.create_table()?;
    let name = if stderr {
        "file (stderr)"
    } else {
        "file (stdout)"
    };
    meta.set("__name", "FILE*")?;
    meta.set(
        "__tostring",
        lua.create_function(move |_, _: Value| Ok(name))?,
    )?;
    file.set_metatable(Some(meta))?;
    Ok(file)
}

/// Lua's `print`: `tostring` of each argument, tab-separated, a newline;
/// bytes as they are (the terminal under `covey exec`, a log line on a
/// node).
fn print(lua: &Lua, args: Variadic<Value>) -> mlua::Result<()> {
    let tostring: Function = lua.globals().get("tostring")?;
    let mut line = Vec::new();
    for (i, v) in args.into_iter().enumerate() {
        if i > 0 {
            line.push(Value::String(lua.create_string("\t")?));
        }
        line.push(Value::String(tostring.call::<mlua::LuaString>(v)?));
    }
    line.push(Value::String(lua.create_string("\n")?));
    write_std(lua, false, &Variadic::from_iter(line))
}

/// Lua's `io.write`: strings and numbers, nothing between them.
fn write_std(lua: &Lua, stderr: bool, args: &Variadic<Value>) -> mlua::Result<()> {
    use std::io::Write;
    let mut bytes = Vec::new();
    for (i, v) in args.iter().enumerate() {
        match v {
            Value::String(s) => bytes.extend_from_slice(&s.as_bytes()),
            Value::Integer(_) | Value::Number(_) => {
                let s = lua.coerce_string(v.clone())?.expect("numbers coerce");
                bytes.extend_from_slice(&s.as_bytes());
            }
            other => {
                return Err(mlua::Error::runtime(format!(
                    "bad argument #{} to 'write' (string expected, got {})",
                    i + 1,
                    other.type_name()
                )));
            }
        }
    }
    let written = if stderr {
        let mut e = std::io::stderr();
        e.write_all(&bytes).and_then(|()| e.flush())
    } else {
        let mut o = std::io::stdout();
        o.write_all(&bytes).and_then(|()| o.flush())
    };
    written.map_err(|e| mlua::Error::runtime(format!("io.write: {e}")))
}

/// Everything that would reach outside the sandbox raises a clear error.
fn sandbox(lua: &Lua) -> mlua::Result<()> {
    let g = lua.globals();
    let refuse = |what: String| {
        lua.create_function(move |_, _: MultiValue| -> mlua::Result<()> {
            Err(mlua::Error::runtime(format!("{what}: {SANDBOX}")))
        })
    };
    let os: Table = g.get("os")?;
    // WASI has no process CPU clock (C's clock() is unsupported there):
    // os.clock() is monotonic time since the instance started, which is
    // what scripts use it for (timing their own work).
    let started = std::time::Instant::now();
    os.set(
        "clock",
        lua.create_function(move |_, ()| Ok(started.elapsed().as_secs_f64()))?,
    )?;
    // A script's environment is empty: every variable is unset, which
    // `os.getenv("HOME") or default` (common in libraries) handles.
    os.set(
        "getenv",
        lua.create_function(|_, _name: mlua::LuaString| Ok(mlua::Value::Nil))?,
    )?;
    for f in ["execute", "exit", "remove", "rename", "tmpname"] {
        os.set(f, refuse(format!("os.{f}"))?)?;
    }
    g.set("io", io_table(lua, &refuse)?)?;
    let package: Table = g.get("package")?;
    package.set("loadlib", refuse("package.loadlib".into())?)?;
    Ok(())
}
