//! `covey:script/node`: this node's name and the cluster membership view.

use std::sync::Arc;

use wasmtime::component::{HasSelf, Linker};

use super::{Capability, ScriptEnv, ScriptState};
use crate::bindings::covey::script::node::{self as wit, NodeInfo};
use crate::clock::now_ms;
use crate::services::Services;

pub struct NodeCtx {
    services: Arc<Services>,
}

impl Capability for NodeCtx {
    fn new(env: &ScriptEnv) -> Self {
        NodeCtx {
            services: env.services.clone(),
        }
    }

    fn link(
        linker: &mut Linker<ScriptState>,
        get: fn(&mut ScriptState) -> &mut Self,
    ) -> wasmtime::Result<()> {
        wit::add_to_linker::<ScriptState, HasSelf<Self>>(linker, get)
    }
}

impl wit::Host for NodeCtx {
    async fn name(&mut self) -> String {
        self.services.router.node_name().to_string()
    }

    async fn nodes(&mut self) -> Vec<NodeInfo> {
        let router = &self.services.router;
        let mut nodes = vec![NodeInfo {
            name: router.node_name().to_string(),
            up: true,
            since_ms: self.services.started_ms,
        }];
        if let Some(remote) = router.remote() {
            nodes.extend(remote.members());
        }
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        nodes
    }

    async fn now_ms(&mut self) -> u64 {
        now_ms()
    }
}
