//! `probe`: exposes every host API as a command, so integration tests can
//! drive and observe the capabilities through real WIT calls. Requests and
//! replies are text; fields are separated by `|`.

use covey_guest::{Event, LimitExceeded, Message, Script, config, events, kv, node, timers};

struct Probe {
    every_left: std::collections::HashMap<u64, u32>,
}

/// A new id as text, or why there is none.
fn id(r: Result<u64, LimitExceeded>) -> String {
    match r {
        Ok(id) => id.to_string(),
        Err(e) => format!("err:{} {}", e.what, e.limit),
    }
}

fn field(parts: &[&str], i: usize) -> String {
    parts.get(i).copied().unwrap_or("").to_string()
}

impl Script for Probe {
    fn init() -> Result<Self, String> {
        events::handle("*", "probe.*")?;
        println!("probe started on {}", node::name());
        Ok(Probe {
            every_left: Default::default(),
        })
    }

    fn on_command(&mut self, msg: Message) -> Option<Vec<u8>> {
        let text = msg.text().into_owned();
        let p: Vec<&str> = text.split('|').collect();
        let reply = match msg.name.as_str() {
            "probe.set" => format!("{:?}", kv::set(&field(&p, 0), field(&p, 1).as_bytes())),
            "probe.get" => kv::get_string(&field(&p, 0)).unwrap_or_else(|| "<none>".into()),
            "probe.delete" => format!("{:?}", kv::delete(&field(&p, 0))),
            "probe.keys" => kv::keys(&field(&p, 0)).join(","),
            "probe.incr" => format!(
                "{:?}",
                kv::incr(&field(&p, 0), field(&p, 1).parse().unwrap_or(1))
            ),
            "probe.config" => config::get(&field(&p, 0)).unwrap_or_else(|| "<none>".into()),
            "probe.node" => format!("{}|{}", node::name(), node::nodes().len()),
            "probe.call" => {
                let timeout = field(&p, 2).parse().unwrap_or(1000);
                match events::call(
                    &field(&p, 0),
                    &field(&p, 1),
                    field(&p, 3).as_bytes(),
                    timeout,
                ) {
                    Ok(r) => format!("ok:{}", String::from_utf8_lossy(&r)),
                    Err(e) => format!("err:{e:?}"),
                }
            }
            "probe.emit" => format!("{:?}", events::emit(&field(&p, 0), field(&p, 1).as_bytes())),
            "probe.send" => format!(
                "{:?}",
                events::send_command(&field(&p, 0), &field(&p, 1), field(&p, 2).as_bytes())
            ),
            "probe.subscribe" => id(events::subscribe(&field(&p, 0), &field(&p, 1))),
            "probe.unsubscribe" => {
                events::unsubscribe(field(&p, 0).parse().unwrap_or(0)).to_string()
            }
            "probe.after" => id(timers::after(field(&p, 0).parse().unwrap_or(10))),
            "probe.every" => match timers::every(field(&p, 0).parse().unwrap_or(10)) {
                Ok(id) => {
                    self.every_left
                        .insert(id, field(&p, 1).parse().unwrap_or(3));
                    id.to_string()
                }
                Err(e) => format!("err:{} {}", e.what, e.limit),
            },
            "probe.cancel" => timers::cancel(field(&p, 0).parse().unwrap_or(0)).to_string(),
            "probe.watch" => id(kv::watch(&field(&p, 0))),
            "probe.unwatch" => kv::unwatch(field(&p, 0).parse().unwrap_or(0)).to_string(),
            "probe.print" => {
                println!("{}", field(&p, 0));
                "printed".into()
            }
            "probe.silent" => return None,
            _ => format!("unknown probe command {}", msg.name),
        };
        Some(reply.into_bytes())
    }

    fn on_event(&mut self, msg: Event<'_>) {
        let _ = kv::incr(&format!("probe-events/{}", msg.name), 1);
        let _ = kv::set_string(
            &format!("probe-events-last/{}", msg.name),
            &format!("{}|{}", msg.from, msg.text()),
        );
    }

    fn on_timer(&mut self, id: u64) -> bool {
        let _ = kv::incr(&format!("probe-timer/{id}"), 1);
        match self.every_left.get_mut(&id) {
            Some(left) => {
                *left -= 1;
                *left > 0
            }
            None => false,
        }
    }

    fn on_kv_change(&mut self, key: String, value: Option<Vec<u8>>) {
        let _ = kv::incr(&format!("probe-seen/{key}"), 1);
        let last = value
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or("<deleted>".into());
        let _ = kv::set_string(&format!("probe-last/{key}"), &last);
    }
}

covey_guest::export_script!(Probe);
