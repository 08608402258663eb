//! Why a link carries everything on one long-lived stream per direction:
//! raw QUIC on loopback, N 64-byte frames sent three ways.
//!
//! - one stream, writes batched from a queue, each batch either handed to
//!   quinn as its frames' own buffers or first copied into one buffer
//!   (what `PeerLink` does: quinn puts each buffer of a stream in a STREAM
//!   frame of its own, with its own header and acknowledgement
//!   bookkeeping);
//! - one unidirectional stream per message;
//! - one datagram per message (unreliable: losses are counted).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use covey::cluster::credentials::{CipherPreference, ClusterToken, NodeCredentials, SERVER_NAME};

fn endpoints() -> (
    quinn::Endpoint,
    quinn::Endpoint,
    quinn::ClientConfig,
    SocketAddr,
) {
    let token = ClusterToken::generate();
    let server_creds = NodeCredentials::issue(&token, "s", CipherPreference::detect()).unwrap();
    let client_creds = NodeCredentials::issue(&token, "c", CipherPreference::detect()).unwrap();
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_uni_streams(100_000u32.into())
        .datagram_receive_buffer_size(Some(64 << 20));
    let transport = Arc::new(transport);
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(server_creds.server.clone()).unwrap(),
    ));
    server.transport_config(transport.clone());
    let mut client = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client_creds.client.clone()).unwrap(),
    ));
    client.transport_config(transport);
    let s = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = s.local_addr().unwrap();
    let c = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    (s, c, client, addr)
}

async fn connect() -> (
    quinn::Connection,
    quinn::Connection,
    quinn::Endpoint,
    quinn::Endpoint,
) {
    let (s, c, cfg, addr) = endpoints();
    let accepting = {
        let s = s.clone();
        tokio::spawn(async move { s.accept().await.unwrap().await.unwrap() })
    };
    let client = c
        .connect_with(cfg, addr, SERVER_NAME)
        .unwrap()
        .await
        .unwrap();
    let server = accepting.await.unwrap();
    (client, server, s, c)
}

fn frame() -> Bytes {
    let mut v = 60u32.to_le_bytes().to_vec();
    v.extend_from_slice(&[7u8; 60]);
    Bytes::from(v)
}

pub async fn bench(n: u64) {
    println!("-- link write strategy: {n} frames of 64 bytes, raw QUIC on loopback --");
    let rate = |what: &str, got: u64, d: Duration| {
        println!(
            "{what}: {:.0} frames/s delivered, {} lost",
            got as f64 / d.as_secs_f64(),
            n - got
        )
    };

    let f = frame();
    for coalesce in [false, true] {
        let (got, took) = one_stream(n, &f, coalesce).await;
        let what = if coalesce {
            "one stream, each batch copied into one buffer (what `PeerLink` does)"
        } else {
            "one stream, each batch written as its frames' buffers"
        };
        rate(what, got, took);
    }

    // A stream per message.
    let (client, server, _s, _c) = connect().await;
    let count = Arc::new(AtomicU64::new(0));
    let reader = {
        let count = count.clone();
        tokio::spawn(async move {
            while let Ok(mut recv) = server.accept_uni().await {
                let count = count.clone();
                tokio::spawn(async move {
                    if recv.read_to_end(1024).await.is_ok() {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        })
    };
    let started = Instant::now();
    for _ in 0..n {
        let mut s = client.open_uni().await.unwrap();
        s.write_all(&f).await.unwrap();
        let _ = s.finish();
    }
    while count.load(Ordering::Relaxed) < n && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    rate(
        "one stream per message",
        count.load(Ordering::Relaxed),
        started.elapsed(),
    );
    reader.abort();

    // Datagrams.
    let (client, server, _s, _c) = connect().await;
    let count = Arc::new(AtomicU64::new(0));
    let last = Arc::new(std::sync::Mutex::new(Instant::now()));
    let reader = {
        let (count, last) = (count.clone(), last.clone());
        tokio::spawn(async move {
            while server.read_datagram().await.is_ok() {
                count.fetch_add(1, Ordering::Relaxed);
                *last.lock().unwrap() = Instant::now();
            }
        })
    };
    let started = Instant::now();
    for i in 0..n {
        let _ = client.send_datagram(f.clone());
        if i % 256 == 0 {
            tokio::task::yield_now().await;
        }
    }
    // Done when nothing arrived for 200 ms.
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if last.lock().unwrap().elapsed() > Duration::from_millis(200) {
            break;
        }
    }
    let end = *last.lock().unwrap();
    rate(
        "one datagram per message",
        count.load(Ordering::Relaxed),
        end - started,
    );
    reader.abort();
}

/// `n` copies of `f` through one stream, batched from a queue; with
/// `coalesce`, each batch is copied into one buffer before quinn sees it.
/// Returns the frames delivered and the time taken.
async fn one_stream(n: u64, f: &Bytes, coalesce: bool) -> (u64, Duration) {
    let (client, server, _s, _c) = connect().await;
    let len = f.len() as u64;
    let reader = tokio::spawn(async move {
        let mut recv = server.accept_uni().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let mut bytes = 0u64;
        while bytes < n * len {
            let k = recv.read(&mut buf).await.unwrap().unwrap_or(0);
            bytes += k as u64;
        }
        bytes / len
    });
    let started = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(16 * 1024);
    let writer = tokio::spawn(async move {
        let mut send = client.open_uni().await.unwrap();
        let mut batch = Vec::new();
        while let Some(f) = rx.recv().await {
            batch.push(f);
            while batch.len() < 4096 {
                match rx.try_recv() {
                    Ok(f) => batch.push(f),
                    Err(_) => break,
                }
            }
            if coalesce {
                send.write_all(&batch.concat()).await.unwrap();
            } else {
                send.write_all_chunks(&mut batch).await.unwrap();
            }
            batch.clear();
        }
        let _ = send.finish();
        client
    });
    for _ in 0..n {
        tx.send(f.clone()).await.unwrap();
    }
    drop(tx);
    let got = reader.await.unwrap();
    let took = started.elapsed();
    drop(writer.await);
    (got, took)
}
