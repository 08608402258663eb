//! `covey device add|list|remove`: through the running node's control
//! socket, or, when no node runs on the data directory, on the registry
//! file directly (holding the same lock a node would).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use super::registry::{DeviceEntry, DeviceRegistry};
use crate::config::DataArg;
use crate::control::ControlSocket;
use crate::docstore::DocStore;

pub const REGISTRY_FILE: &str = "devices.automerge";

#[derive(Subcommand, Debug)]
pub enum DeviceCommand {
    /// Register a microcontroller: makes its 256-bit key and prints it,
    /// once. The registry is replicated: every node accepts the device.
    Add {
        name: String,
        #[command(flatten)]
        data: DataArg,
        /// Print JSON (`{"name", "key"}`)
        #[arg(long)]
        json: bool,
        /// Also take the device's frames in clear (tagged, not sealed):
        /// for firmware built with a library that cannot seal
        #[arg(long)]
        no_seal: bool,
    },
    /// List registered devices (never their keys).
    List {
        #[command(flatten)]
        data: DataArg,
        #[arg(long)]
        json: bool,
    },
    /// Remove a device: refused on every node once the removal syncs.
    Remove {
        name: String,
        #[command(flatten)]
        data: DataArg,
    },
}

/// A control-socket request's answer (the node side): applied, and on
/// disk before the answer goes (a key is shown once: it must not outlive
/// a crash unsaved).
pub async fn answer(registry: &Arc<DeviceRegistry>, verb: &str, name: &str) -> Result<Value> {
    let answer = apply(registry, verb, name)?;
    registry.store().durable().await?;
    Ok(answer)
}

fn apply(registry: &DeviceRegistry, verb: &str, name: &str) -> Result<Value> {
    Ok(match verb {
        "add" | "add-unsealed" => {
            let key = registry.add_with(name, verb == "add")?;
            json!({ "name": name, "key": crate::files::hex(&key) })
        }
        "remove" => json!({ "name": name, "removed": registry.remove(name)? }),
        "list" => serde_json::to_value(registry.list())?,
        other => bail!("unknown device request {other:?}"),
    })
}

/// Run a `covey device` command.
pub fn run(cmd: DeviceCommand) -> Result<()> {
    let (verb, name, data, as_json) = match &cmd {
        DeviceCommand::Add {
            name,
            data,
            json,
            no_seal,
        } => match no_seal {
            false => ("add", name.as_str(), data, *json),
            true => ("add-unsealed", name.as_str(), data, *json),
        },
        DeviceCommand::List { data, json } => ("list", "", data, *json),
        DeviceCommand::Remove { name, data } => ("remove", name.as_str(), data, false),
    };
    let dir = data.dir();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let answer = rt.block_on(ask(&dir, verb, name))?;
    if let Some(e) = answer.get("error").and_then(Value::as_str) {
        bail!("{e}");
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    match verb {
        "add" | "add-unsealed" => print_key(name, answer["key"].as_str().unwrap_or_default()),
        "remove" if answer["removed"] == json!(true) => println!("Device `{name}` removed."),
        "remove" => bail!("no device `{name}`"),
        _ => {
            let list: Vec<DeviceEntry> = serde_json::from_value(answer)?;
            if list.is_empty() {
                println!("No devices (`covey device add NAME` registers one).");
            }
            for d in list {
                let mode = match d.sealed {
                    true => "sealed",
                    false => "sealed or tagged in clear",
                };
                println!("{:<24} added on {:<20} {mode}", d.name, d.added_on);
            }
        }
    }
    Ok(())
}

/// Through the running node, or on the file when none runs.
async fn ask(dir: &Path, verb: &str, name: &str) -> Result<Value> {
    crate::files::create_private_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    match ControlSocket::bind(dir) {
        // No node runs here: hold its lock while working on the file.
        Ok(_lock) => {
            let store = Arc::new(DocStore::open(
                Some(dir.join(REGISTRY_FILE)),
                "device registry",
            )?);
            let node = gethostname::gethostname().to_string_lossy().into_owned();
            let registry = DeviceRegistry::open(store.clone(), &node);
            let answer = apply(&registry, verb, name)?;
            store.flush()?;
            Ok(answer)
        }
        Err(_) => {
            let text = crate::control::request(dir, &format!("device {verb} {name}")).await?;
            serde_json::from_str(&text).with_context(|| format!("unexpected answer: {text}"))
        }
    }
}

fn print_key(name: &str, key: &str) {
    println!("Device `{name}` added. Its key, shown only now (keep it secret):");
    println!();
    println!("    {key}");
    println!();
    println!("In the firmware (covey_device.h):");
    println!("    #define COVEY_DEVICE_KEY \"{key}\"");
    println!("    covey_key_from_hex(key, COVEY_DEVICE_KEY);");
    println!("With the simulator:");
    println!("    COVEY_DEVICE_KEY={key} covey-device --udp NODE:7468 --name {name} serve");
}
