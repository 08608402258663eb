//! `covey:script/lua-source`: hands the built-in Lua guest the source of
//! the `.lua` script it runs, and the files it `require`s, `dofile`s or
//! `loadfile`s from the directory it may read. Components other than the
//! Lua guest do not import it.

use std::path::PathBuf;
use std::sync::Arc;

use wasmtime::component::{HasSelf, Linker};

use super::{Capability, ScriptEnv, ScriptState};
use crate::bindings::lua::covey::script::lua_source as wit;
use crate::scriptdir::{ScriptDir, ScriptPath};

/// The largest file `read` hands over (a Lua state has 40 MiB in all).
const MAX_READ: u64 = 16 << 20;

/// `package.path` for a node's scripts: modules from `lib/`.
pub const SCRIPTS_PATH: &str = "lib/?.lua;lib/?/init.lua";
/// `package.path` under `covey exec`: beside the file first, as `lua
/// FILE.lua` run from the file's directory would, then `lib/`.
pub const EXEC_PATH: &str = "./?.lua;./?/init.lua;lib/?.lua;lib/?/init.lua";

pub struct LuaCtx {
    script: Arc<str>,
    args: Vec<String>,
    lua: Option<LuaScript>,
}

/// What a `.lua` instance needs besides the shared environment.
#[derive(Clone)]
pub struct LuaScript {
    pub source: Arc<[u8]>,
    /// The directory `read` serves: the scripts directory, or the file's
    /// own under `covey exec`.
    pub root: PathBuf,
    /// The default `package.path` ([`SCRIPTS_PATH`] or [`EXEC_PATH`]).
    pub search_path: &'static str,
}

impl Capability for LuaCtx {
    fn new(env: &ScriptEnv) -> Self {
        LuaCtx {
            script: env.script.clone(),
            args: env
                .services
                .console
                .as_ref()
                .map(|c| c.args.clone())
                .unwrap_or_default(),
            lua: env.lua.clone(),
        }
    }

    fn link(
        linker: &mut Linker<ScriptState>,
        get: fn(&mut ScriptState) -> &mut Self,
    ) -> wasmtime::Result<()> {
        wit::add_to_linker::<ScriptState, HasSelf<Self>>(linker, get)
    }
}

/// `path` as the guest asked for it (`./` prefixes allowed), if it names a
/// file inside the root by the scripts directory's rule.
fn confined(path: &str) -> Option<ScriptPath> {
    let mut p = path;
    while let Some(rest) = p.strip_prefix("./") {
        p = rest;
    }
    ScriptPath::parse(p).ok()
}

impl wit::Host for LuaCtx {
    async fn script(&mut self) -> (String, Vec<u8>) {
        let source = self.lua.as_ref().map(|l| l.source.to_vec());
        (self.script.to_string(), source.unwrap_or_default())
    }

    async fn args(&mut self) -> Vec<String> {
        self.args.clone()
    }

    async fn search_path(&mut self) -> String {
        let path = self.lua.as_ref().map(|l| l.search_path);
        path.unwrap_or(SCRIPTS_PATH).to_string()
    }

    async fn read(&mut self, path: String) -> Option<Vec<u8>> {
        let root = self.lua.as_ref()?.root.clone();
        let path = confined(&path)?;
        tokio::task::spawn_blocking(move || {
            let dir = ScriptDir::new(&root);
            (dir.stat(&path).ok()?.size <= MAX_READ)
                .then(|| dir.read(&path))
                .flatten()
        })
        .await
        .ok()
        .flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::confined;

    #[test]
    fn reads_stay_inside_the_root() {
        assert_eq!(confined("lib/util.lua").unwrap().as_str(), "lib/util.lua");
        assert_eq!(confined("./a/init.lua").unwrap().as_str(), "a/init.lua");
        assert_eq!(confined("././x.lua").unwrap().as_str(), "x.lua");
        for bad in [
            "../secret.lua",
            "/etc/passwd",
            "",
            "lib/../../x",
            ".hidden.lua",
            "a//b",
        ] {
            assert!(confined(bad).is_none(), "{bad}");
        }
    }
}
