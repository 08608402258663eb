//! `covey:script/lua-source`: hands the built-in Lua guest the text of the
//! `.lua` script it runs, and the modules it `require`s from `lib/`.
//! Components other than the Lua guest do not import it.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use wasmtime::component::{HasSelf, Linker};

use super::{ScriptEnv, ScriptState};
use crate::bindings::lua::covey::script::lua_source as wit;

pub struct LuaCtx {
    script: Arc<str>,
    args: Vec<String>,
    source: Option<Arc<str>>,
    lib_dir: Option<PathBuf>,
}

impl LuaCtx {
    pub fn new(env: &ScriptEnv) -> Self {
        LuaCtx {
            script: env.script.clone(),
            args: env
                .services
                .console
                .as_ref()
                .map(|c| c.args.clone())
                .unwrap_or_default(),
            source: env.lua.as_ref().map(|l| l.source.clone()),
            lib_dir: env.lua.as_ref().map(|l| l.lib_dir.clone()),
        }
    }
}

/// What a `.lua` instance needs besides the shared environment.
#[derive(Clone)]
pub struct LuaScript {
    pub source: Arc<str>,
    /// `lib/` of the scripts directory, where `require` looks.
    pub lib_dir: PathBuf,
}

pub fn add_to_linker(linker: &mut Linker<ScriptState>) -> wasmtime::Result<()> {
    wit::add_to_linker::<ScriptState, HasSelf<LuaCtx>>(linker, |s| &mut s.lua)
}

/// `lib/<a>/<b>.lua` for module `a.b`; None for names that would leave
/// `lib/` (`..`, absolute paths, empty parts).
fn module_path(lib: &Path, name: &str) -> Option<PathBuf> {
    let rel = PathBuf::from(format!("{}.lua", name.replace('.', "/")));
    let plain = rel.components().all(|c| matches!(c, Component::Normal(_)));
    (plain && !name.is_empty()).then(|| lib.join(rel))
}

impl wit::Host for LuaCtx {
    async fn script(&mut self) -> (String, String) {
        let text = self.source.as_deref().unwrap_or_default().to_string();
        (self.script.to_string(), text)
    }

    async fn args(&mut self) -> Vec<String> {
        self.args.clone()
    }

    async fn module(&mut self, name: String) -> Option<String> {
        let path = module_path(self.lib_dir.as_ref()?, &name)?;
        tokio::fs::read_to_string(path).await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::module_path;
    use std::path::Path;

    #[test]
    fn module_names_stay_inside_lib() {
        let lib = Path::new("/s/lib");
        assert_eq!(
            module_path(lib, "util").unwrap(),
            Path::new("/s/lib/util.lua")
        );
        assert_eq!(
            module_path(lib, "a.b").unwrap(),
            Path::new("/s/lib/a/b.lua")
        );
        assert!(module_path(lib, "../secret").is_none());
        assert!(module_path(lib, "/etc/passwd").is_none());
        assert!(module_path(lib, "").is_none());
    }
}
