//! The serial transport: one device per port, frames COBS-delimited with
//! a CRC ([`crate::serial_codec`]). A port that fails (a USB adapter
//! unplugged, a board resetting) is reopened with backoff for as long as
//! the node runs.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_serial::SerialPortBuilderExt;

use crate::serial_codec::{Decoder, Unframed, encode};
use crate::{Bridge, Peer, Transmit};

/// A `DEVICE@BAUD` entry of `bridge_serial`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SerialPort {
    pub path: String,
    pub baud: u32,
}

pub const DEFAULT_BAUD: u32 = 115_200;

impl std::str::FromStr for SerialPort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, baud) = match s.rsplit_once('@') {
            Some((p, b)) => (
                p,
                b.parse()
                    .map_err(|_| format!("bad baud rate in {s:?} (want DEVICE@BAUD)"))?,
            ),
            None => (s, DEFAULT_BAUD),
        };
        if path.is_empty() {
            return Err(format!("no device path in {s:?} (want DEVICE@BAUD)"));
        }
        Ok(SerialPort {
            path: path.to_string(),
            baud,
        })
    }
}

struct SerialTx(mpsc::Sender<Vec<u8>>);

impl Transmit for SerialTx {
    fn send(&self, frame: &[u8]) {
        let _ = self.0.try_send(encode(frame));
    }
}

/// Serve one port until aborted.
pub fn serve(bridge: Bridge, port: SerialPort) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            match run(&bridge, &port).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    tracing::warn!(port = %port.path, "serial port: {e}; retrying in {backoff:?}")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    })
}

async fn run(bridge: &Bridge, port: &SerialPort) -> std::io::Result<()> {
    let stream = tokio_serial::new(&port.path, port.baud)
        .timeout(Duration::from_secs(1))
        .open_native_async()?;
    tracing::info!(port = %port.path, baud = port.baud, "device bridge on serial port");
    let (mut read, mut write) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(256);
    // Aborted when this function's future is dropped (the port fails or
    // the node stops), so the port is closed and can be opened again.
    let writer = AbortOnDrop(tokio::spawn(async move {
        while let Some(bytes) = rx.recv().await {
            if write.write_all(&bytes).await.is_err() {
                break;
            }
        }
    }));
    let peer = Peer {
        transport: "serial",
        address: port.path.as_str().into(),
        tx: Arc::new(SerialTx(tx)),
    };
    let mut decoder = Decoder::new(bridge.config().max_frame as usize);
    let mut buf = vec![0u8; 4096];
    let result = loop {
        match read.read(&mut buf).await {
            Ok(0) => break Err(std::io::Error::other("port closed")),
            Ok(n) => decoder.push(&buf[..n], |item| match item {
                Unframed::Frame(f) => bridge.receive(&peer, &f),
                Unframed::Garbage(r) => bridge.line_noise(r),
            }),
            Err(e) => break Err(e),
        }
    };
    drop(writer);
    result
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
