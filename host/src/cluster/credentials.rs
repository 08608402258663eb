//! The cluster's trust: one secret token, from which every node derives the
//! same certificate authority, and with it a certificate for itself.
//!
//! Trust model (also in the README): whoever holds the token is a member.
//! `covey cluster init` makes a random 256-bit secret and prints it as a
//! token; each node is given the token once (`covey cluster join TOKEN`,
//! `--cluster-token`, `COVEY_CLUSTER_TOKEN` or the config file). From it a
//! node derives an Ed25519 CA key deterministically, issues itself a
//! certificate at every start, and accepts only peers whose certificate
//! chains to that CA (mutual TLS, TLS 1.3 over QUIC). The token never
//! crosses the network; the public `fingerprint` (announced over mDNS)
//! only lets nodes skip other clusters' announcements.
//!
//! Why a shared secret rather than a CA that signs join requests: setup is
//! one step per Pi with nothing to copy back, and any node can restart or be
//! re-imaged without a signing service. The cost: a stolen token lets a
//! stranger join, and revoking one node means a new token for all.
//!
//! Certificates are valid from 1975 to 4096: Raspberry Pis have no
//! real-time clock and may boot with a wrong date before NTP; a validity
//! window would make such a node unable to join. Node certificates are
//! ephemeral (a fresh key each start), so expiry would add nothing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ED25519,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::files;

/// ALPN protocol of Covey links; a peer speaking another version fails the
/// handshake with a clear "no application protocol" error.
pub const ALPN: &[u8] = b"covey/1";
/// The name in every node certificate (node names are checked in the
/// link's hello, see `link.rs`).
pub const SERVER_NAME: &str = "covey";
const TOKEN_PREFIX: &str = "covey1-";
/// File in the data directory holding the token (`covey cluster join`).
pub const TOKEN_FILE: &str = "cluster.token";

/// A cluster's secret, parsed from its token.
#[derive(Clone)]
pub struct ClusterToken {
    secret: [u8; 32],
}

impl std::fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterToken({})", self.fingerprint())
    }
}

impl ClusterToken {
    /// A new random cluster secret.
    pub fn generate() -> Self {
        ClusterToken {
            secret: crate::random::bytes(),
        }
    }

    pub fn parse(text: &str) -> Result<Self> {
        let text = text.trim();
        let hex = text.strip_prefix(TOKEN_PREFIX).with_context(|| {
            "not a Covey cluster token (it starts with `covey1-`; make one with `covey cluster init`)"
        })?;
        let secret = (files::unhex(hex).and_then(|b| <[u8; 32]>::try_from(b).ok()))
            .context("malformed cluster token: expected `covey1-` followed by 64 hex digits")?;
        Ok(ClusterToken { secret })
    }

    /// The token's text form.
    pub fn encode(&self) -> String {
        format!("{TOKEN_PREFIX}{}", files::hex(&self.secret))
    }

    /// Public identifier of the cluster (16 hex digits): announced over
    /// mDNS and sent in the hello; reveals nothing about the secret.
    pub fn fingerprint(&self) -> String {
        let k = blake3::derive_key("covey 2026 cluster fingerprint", &self.secret);
        files::hex(&k[..8])
    }

    /// Read the token saved by `covey cluster join` in `data_dir`, if any.
    pub fn load(data_dir: &Path) -> Result<Option<Self>> {
        let path = token_path(data_dir);
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text)
                .map(Some)
                .with_context(|| format!("in {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Save the token in `data_dir`, readable by this user only.
    pub fn save(&self, data_dir: &Path) -> Result<PathBuf> {
        files::create_private_dir(data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let path = token_path(data_dir);
        let text = format!("{}\n", self.encode());
        files::write_atomic(&path, text.as_bytes(), files::Mode::Private)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}

pub fn token_path(data_dir: &Path) -> PathBuf {
    data_dir.join(TOKEN_FILE)
}

/// Which AEAD a node prefers for its links.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CipherPreference {
    /// AES-GCM first: the CPU has AES instructions.
    Aes,
    /// ChaCha20-Poly1305 first: no AES instructions (every Raspberry Pi
    /// before the Pi 5), where ChaCha20 is several times faster.
    ChaCha,
}

impl CipherPreference {
    pub fn detect() -> Self {
        if cpu_has_aes() {
            CipherPreference::Aes
        } else {
            CipherPreference::ChaCha
        }
    }
}

fn cpu_has_aes() -> bool {
    #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "x86", target_arch = "aarch64")))]
    {
        false
    }
}

/// This node's TLS identity and the configurations built from it.
pub struct NodeCredentials {
    pub fingerprint: String,
    pub client: Arc<ClientConfig>,
    pub server: Arc<ServerConfig>,
}

impl NodeCredentials {
    /// Derive the cluster CA from `token` and issue a certificate for
    /// `node` signed by it.
    pub fn issue(token: &ClusterToken, node: &str, cipher: CipherPreference) -> Result<Self> {
        let (ca_params, ca_key) = cluster_ca(token)?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let node_key = KeyPair::generate_for(&PKCS_ED25519)?;
        let mut params = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, node);
        params.not_before = rcgen::date_time_ymd(1975, 1, 1);
        params.not_after = rcgen::date_time_ymd(4096, 1, 1);
        let node_cert = params.signed_by(&node_key, &issuer)?;

        let chain = vec![node_cert.der().clone(), ca_cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(node_key.serialize_der()));
        let mut roots = RootCertStore::empty();
        roots.add(ca_cert.der().clone())?;
        let (client, server) = tls_configs(roots, chain, key, cipher)?;
        Ok(NodeCredentials {
            fingerprint: token.fingerprint(),
            client,
            server,
        })
    }
}

/// The cluster CA: an Ed25519 key derived from the secret and a fixed
/// subject, so every node computes the same trust anchor.
fn cluster_ca(token: &ClusterToken) -> Result<(CertificateParams, KeyPair)> {
    let seed = blake3::derive_key("covey 2026 cluster CA ed25519 seed", &token.secret);
    // PKCS#8 v1 wrapping of an Ed25519 seed (RFC 8410): a fixed 16-byte
    // header followed by the 32-byte seed.
    let mut pkcs8 = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    pkcs8.extend_from_slice(&seed);
    let der = PrivatePkcs8KeyDer::from(pkcs8);
    let key = KeyPair::from_pkcs8_der_and_sign_algo(&der, &PKCS_ED25519)
        .context("deriving the cluster CA key")?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("Covey cluster {}", token.fingerprint()),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = rcgen::date_time_ymd(1975, 1, 1);
    params.not_after = rcgen::date_time_ymd(4096, 1, 1);
    Ok((params, key))
}

/// ring's provider with the AEAD order of `cipher`.
pub fn provider(cipher: CipherPreference) -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    let chacha_first = cipher == CipherPreference::ChaCha;
    p.cipher_suites.sort_by_key(|s| {
        let is_chacha = s.suite() == rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256;
        is_chacha != chacha_first
    });
    Arc::new(p)
}

/// Client and server TLS configurations: TLS 1.3 only, mutual
/// authentication against `roots`, Covey's ALPN.
pub fn tls_configs(
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cipher: CipherPreference,
) -> Result<(Arc<ClientConfig>, Arc<ServerConfig>)> {
    let provider = provider(cipher);
    let roots = Arc::new(roots);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .context("building the peer certificate verifier")?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    // A server without AES instructions picks ChaCha20 even when the
    // client (with AES) lists AES first; otherwise the client's order
    // wins, so a Pi dialling a laptop gets ChaCha20 too.
    server.ignore_client_order = cipher == CipherPreference::ChaCha;
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    Ok((Arc::new(client), Arc::new(server)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::{ClientConnection, ServerConnection};

    #[test]
    fn tokens_round_trip_and_reject_garbage() {
        let t = ClusterToken::generate();
        let back = ClusterToken::parse(&format!("  {}\n", t.encode())).unwrap();
        assert_eq!(back.secret, t.secret);
        assert_eq!(back.fingerprint(), t.fingerprint());
        assert_ne!(ClusterToken::generate().fingerprint(), t.fingerprint());
        assert!(ClusterToken::parse("hello").is_err());
        assert!(ClusterToken::parse("covey1-abc").is_err());
        let dir = tempfile::tempdir().unwrap();
        assert!(ClusterToken::load(dir.path()).unwrap().is_none());
        t.save(dir.path()).unwrap();
        let loaded = ClusterToken::load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded.secret, t.secret);
    }

    /// Run a TLS handshake in memory; the negotiated suite, or the error.
    fn handshake(
        client: &NodeCredentials,
        server: &NodeCredentials,
    ) -> Result<rustls::CipherSuite, rustls::Error> {
        let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).unwrap();
        let mut c = ClientConnection::new(client.client.clone(), name)?;
        let mut s = ServerConnection::new(server.server.clone())?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            c.write_tls(&mut buf).unwrap();
            s.read_tls(&mut &buf[..]).unwrap();
            s.process_new_packets()?;
            let mut buf = Vec::new();
            s.write_tls(&mut buf).unwrap();
            c.read_tls(&mut &buf[..]).unwrap();
            c.process_new_packets()?;
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(c.negotiated_cipher_suite().unwrap().suite());
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn members_authenticate_each_other_and_strangers_fail() {
        let token = ClusterToken::generate();
        let a = NodeCredentials::issue(&token, "a", CipherPreference::Aes).unwrap();
        let b = NodeCredentials::issue(&token, "b", CipherPreference::Aes).unwrap();
        assert_eq!(
            handshake(&a, &b).unwrap(),
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        );
        let stranger =
            NodeCredentials::issue(&ClusterToken::generate(), "s", CipherPreference::Aes).unwrap();
        assert!(handshake(&stranger, &a).is_err(), "stranger as client");
        assert!(handshake(&a, &stranger).is_err(), "stranger as server");
    }

    #[test]
    fn a_node_without_aes_gets_chacha20_in_both_roles() {
        let token = ClusterToken::generate();
        let pi = NodeCredentials::issue(&token, "pi", CipherPreference::ChaCha).unwrap();
        let laptop = NodeCredentials::issue(&token, "laptop", CipherPreference::Aes).unwrap();
        let chacha = rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256;
        assert_eq!(handshake(&pi, &laptop).unwrap(), chacha);
        assert_eq!(handshake(&laptop, &pi).unwrap(), chacha);
    }
}
