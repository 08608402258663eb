//! Calls: request/reply to one handler, on this node or another.

use std::time::Duration;

use tokio::sync::oneshot;

use super::Message;
use super::{Delivery, Outcome, PeerStatus, Router, split_target};
use crate::bindings::CallError;

impl Router {
    /// Request/reply: on `target`, the first handler (by script path)
    /// other than `caller` answers, within `timeout`.
    pub async fn call(
        &self,
        caller: Option<&str>,
        target: &str,
        name: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let r = self
            .route_call(caller, target, name, payload, timeout)
            .await;
        self.stats.calls.count(Outcome::of_call(&r));
        r
    }

    async fn route_call(
        &self,
        caller: Option<&str>,
        target: &str,
        name: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        if target == "*" {
            return Err(CallError::InvalidTarget(
                "a call needs one node; use send-command for `*`".into(),
            ));
        }
        self.check_payload(&payload)
            .map_err(CallError::PayloadTooLarge)?;
        let msg = self.message(target, name, payload);
        let node = split_target(target).0;
        if node == &*self.node {
            return self.call_local(caller, msg, timeout).await;
        }
        match self.route(node) {
            Ok(remote) => remote.call(node, msg, timeout).await,
            Err(PeerStatus::Down) => Err(CallError::NodeDown(node.to_string())),
            Err(_) => Err(CallError::UnknownNode(node.to_string())),
        }
    }

    /// A call to a script of this node (from a local script, or from a
    /// peer when `caller` is none).
    pub async fn call_local(
        &self,
        caller: Option<&str>,
        msg: Message,
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        if let Some(answer) = self
            .system
            .get()
            .and_then(|s| s.answer(&msg.name, &msg.payload))
        {
            return Ok(answer.await);
        }
        if let Some(device) = self.local_device(&msg.to) {
            return match self.devices.get() {
                Some(d) => d.call(device, msg.clone(), timeout).await,
                None => Err(CallError::UnknownNode(msg.to.to_string())),
            };
        }
        let (tx, rx) = oneshot::channel();
        {
            let table = self.table.read().unwrap();
            let handlers = table.command_handlers(&msg);
            let handler = (handlers.iter())
                .filter(|sub| Some(&*sub.mailbox.script) != caller)
                .min_by(|a, b| a.mailbox.script.cmp(&b.mailbox.script));
            let Some(sub) = handler else {
                return Err(CallError::NoHandler(format!(
                    "no script on node `{}` handles `{}`",
                    self.node, msg.name
                )));
            };
            let d = Delivery::Command {
                msg,
                generation: sub.generation,
                reply: Some(tx),
            };
            if !self.offer(&sub.mailbox, d) {
                return Err(CallError::HandlerFailed(format!(
                    "mailbox of `{}` is full",
                    sub.mailbox.script
                )));
            }
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(CallError::HandlerFailed(
                "the handling script stopped before replying".into(),
            )),
            Err(_) => Err(CallError::Timeout),
        }
    }
}
