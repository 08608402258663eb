//! TLS to an MQTT broker: rustls with ring (the host's provider), the
//! system's roots or a private CA, and an optional client certificate.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// PEM files for TLS to the broker (`mqtt_ca`, `mqtt_cert`, `mqtt_key`).
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// Trust this CA (one or more certificates) instead of the system's.
    pub ca: Option<PathBuf>,
    /// This node's certificate chain and key, if the broker wants one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

fn read(path: &PathBuf, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

fn certificates(path: &PathBuf, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path, what)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// The client configuration `files` describe; errors name the file.
pub fn client_config(files: &TlsFiles) -> Result<rustls::ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    match &files.ca {
        Some(ca) => {
            for cert in certificates(ca, "mqtt_ca")? {
                roots
                    .add(cert)
                    .map_err(|e| format!("mqtt_ca {}: {e}", ca.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(
                    "mqtts://: this system has no CA certificates (install ca-certificates, \
                     or name the broker's CA with mqtt_ca)"
                        .into(),
                );
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots);
    match (&files.cert, &files.key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let chain = certificates(cert, "mqtt_cert")?;
            let pem = read(key, "mqtt_key")?;
            let key_der = PrivateKeyDer::from_pem_slice(&pem)
                .map_err(|e| format!("mqtt_key {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| format!("mqtt_cert/mqtt_key: {e}"))
        }
        _ => Err("mqtt_cert and mqtt_key go together".into()),
    }
}
