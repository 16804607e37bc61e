//! Broker TLS: builds the rustls client configuration from `[broker.tls]`
//! (trusted CA, client certificate, server name, verification switch), opens
//! `amqps://` connections with it, and turns handshake failures into messages
//! that say what failed (unknown CA, name mismatch, expired certificate,
//! client certificate required) rather than "connection failed".
//!
//! Files are read and checked when the config is loaded, so a wrong path or a
//! file that holds no certificate is a config error naming the key.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    AlertDescription, CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore,
    SignatureScheme,
};
use std::path::PathBuf;
use std::sync::Arc;

/// `[broker.tls]` as written, with paths resolved against the config's folder.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// PEM file of the CA certificates to trust; the system's roots when unset.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain, for brokers that require one.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// The name to verify the broker's certificate against (and send as SNI),
    /// when it differs from the host in the URL.
    pub server_name: Option<String>,
    /// Accept any certificate. Only for tests; logged loudly.
    pub insecure_skip_verify: bool,
}

/// The TLS side of a broker connection, ready to use.
#[derive(Debug, Clone)]
pub struct Tls {
    pub settings: TlsSettings,
    pub client: Arc<ClientConfig>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the files named in `settings` and builds the client configuration.
/// Errors name the `[broker.tls]` key and the file.
pub fn build(settings: TlsSettings) -> Result<Tls, String> {
    let key_err = |key: &str, path: &PathBuf, what: String| {
        format!("[broker.tls] key `{key}`: {}: {what}", path.display())
    };
    let mut roots = RootCertStore::empty();
    match &settings.ca_file {
        Some(path) => {
            let certs = read_certs(path).map_err(|e| key_err("ca_file", path, e))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(key_err(
                    "ca_file",
                    path,
                    "no usable CA certificate in the file".into(),
                ));
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(native.certs);
        }
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("[broker.tls]: {e}"))?
        .with_root_certificates(roots);
    let mut client = match (&settings.cert_file, &settings.key_file) {
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert).map_err(|e| key_err("cert_file", cert, e))?;
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                key_err(
                    "key_file",
                    key,
                    format!("no usable private key in the file ({e})"),
                )
            })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| format!("[broker.tls] keys `cert_file` and `key_file`: {e}"))?
        }
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) => return Err("[broker.tls]: `cert_file` needs `key_file`".into()),
        (None, Some(_)) => return Err("[broker.tls]: `key_file` needs `cert_file`".into()),
    };
    if let Some(name) = &settings.server_name {
        ServerName::try_from(name.as_str())
            .map_err(|_| format!("[broker.tls] key `server_name`: {name:?} is not a host name"))?;
    }
    if settings.insecure_skip_verify {
        client
            .dangerous()
            .set_certificate_verifier(Arc::new(NoVerification(
                provider().signature_verification_algorithms,
            )));
    }
    Ok(Tls {
        settings,
        client: Arc::new(client),
    })
}

fn read_certs(path: &PathBuf) -> Result<Vec<CertificateDer<'static>>, String> {
    if let Err(e) = std::fs::metadata(path) {
        return Err(format!("cannot read the file: {e}"));
    }
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate in the file".into());
    }
    Ok(certs)
}

/// Opens a TLS connection to the broker for `uri` (an `amqps://` URL).
pub async fn connect(
    uri: lapin::uri::AMQPUri,
    tls: Tls,
    props: lapin::ConnectionProperties,
) -> lapin::Result<lapin::Connection> {
    if tls.settings.insecure_skip_verify {
        tracing::warn!(
            "TLS certificate verification is OFF ([broker.tls] insecure_skip_verify = true): \
             anyone on the network path can impersonate the broker and read or change messages"
        );
    }
    let runtime = lapin::runtime::default_runtime()?;
    let server_name = tls
        .settings
        .server_name
        .clone()
        .unwrap_or_else(|| uri.authority.host.clone());
    let connector = lapin::tcp::RustlsConnector::from(tls.client.clone());
    let name = server_name.clone();
    lapin::Connection::connector(
        uri,
        runtime,
        async move |uri, runtime| {
            let addrs: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((uri.authority.host.as_str(), uri.authority.port))
                    .await?
                    .collect();
            let tcp = lapin::tcp::AsyncTcpStream::connect(&runtime, addrs).await?;
            Ok(tcp.into_rustls(&connector, &name).await?)
        },
        props,
    )
    .await
    // Handshake errors, and (with TLS 1.3) the broker's verdict on our
    // certificate, which arrives after the handshake as an alert on the
    // first read, both end up here.
    .map_err(|e| match e.kind() {
        lapin::ErrorKind::IOError(io) => match describe(io, &server_name, &tls.settings) {
            Some(text) => std::io::Error::new(io.kind(), text).into(),
            None => e,
        },
        _ => e,
    })
}

/// Says what a failed handshake means for the operator, when `e` is a TLS error.
fn describe(e: &std::io::Error, server_name: &str, settings: &TlsSettings) -> Option<String> {
    let tls = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    let trusted = match &settings.ca_file {
        Some(p) => format!("the CA in ca_file {}", p.display()),
        None => "the system's CA certificates (set [broker.tls] ca_file)".to_owned(),
    };
    let text = match tls {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => format!(
                "TLS: the broker's certificate is signed by an unknown CA: it does not chain to {trusted}"
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!(
                    "TLS: the broker's certificate does not match the name {server_name:?} ({c:?}); \
                     connect by the name in the certificate or set [broker.tls] server_name"
                )
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                format!("TLS: the broker's certificate has expired ({c:?})")
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                format!("TLS: the broker's certificate is not valid yet ({c:?}); check the clock")
            }
            other => format!("TLS: the broker's certificate was rejected: {other:?}"),
        },
        rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired | AlertDescription::HandshakeFailure,
        ) if settings.cert_file.is_none() => format!(
            "TLS: the broker refused the handshake ({tls}); it probably requires a client \
             certificate: set [broker.tls] cert_file and key_file"
        ),
        rustls::Error::AlertReceived(
            AlertDescription::UnknownCA
            | AlertDescription::BadCertificate
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateExpired,
        ) => format!("TLS: the broker rejected our client certificate ({tls})"),
        rustls::Error::InvalidMessage(_) => format!(
            "TLS: the broker did not answer in TLS ({tls}); is this port an amqps:// listener?"
        ),
        other => format!("TLS handshake failed: {other}"),
    };
    Some(text)
}

/// Accepts any certificate, still checking handshake signatures. Used only
/// with `insecure_skip_verify = true`.
#[derive(Debug)]
struct NoVerification(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
