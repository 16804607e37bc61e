//! `amqps://` connections: a TLS-terminating proxy started by the test sits in
//! front of the local broker, with a CA, server and client certificates made
//! for the test. amqp-exec consumes through it; certificate problems (unknown
//! CA, name mismatch, expired, missing client certificate) are reported as
//! such.

mod common;

use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_amqp-exec");

/// A CA that issues certificates for the test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Ca {
            issuer: CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// (certificate PEM, key PEM) for `names`; `expired` dates it in the past.
    fn issue(&self, names: &[&str], expired: bool) -> (String, String) {
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(
            DnType::CommonName,
            names.first().copied().unwrap_or("client"),
        );
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A TLS listener on 127.0.0.1 that forwards each connection to the broker.
struct Proxy {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn proxy(cert_pem: &str, key_pem: &str, client_ca: Option<&Ca>) -> Proxy {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            roots.add(ca.issuer.der().clone()).unwrap();
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let config = builder.with_single_cert(certs, key).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let uri: lapin::uri::AMQPUri = amqp_url().parse().unwrap();
    let upstream = format!("{}:{}", uri.authority.host, uri.authority.port);
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut broker) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
            });
        }
    });
    Proxy { port, task }
}

/// The broker URL through the proxy, with `host` as the host name.
fn tls_url(host: &str, port: u16) -> String {
    let uri: lapin::uri::AMQPUri = amqp_url().parse().unwrap();
    let user = &uri.authority.userinfo;
    format!(
        "amqps://{}:{}@{host}:{port}/%2f",
        user.username, user.password
    )
}

fn config(queue: &str, tls: &str) -> String {
    format!(
        "[broker.tls]\n{tls}\n[[queue]]\nname = \"{queue}\"\ncommand = [\"{}\"]\nconcurrency = 2\n",
        repo("workers/testing/record.sh")
    )
}

/// `amqp-exec check` with `url`; returns (success, stdout + stderr).
async fn check(work: &Workdir, config: &str, url: &str) -> (bool, String) {
    let cfg = work.write("check.toml", config);
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || {
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&cfg)
            .arg("check")
            .env("AMQP_URL", url)
            .stdin(Stdio::null())
            .output()
            .expect("run amqp-exec");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    })
    .await
    .unwrap()
}

fn write(work: &Workdir, name: &str, text: &str) -> PathBuf {
    work.write(name, text)
}

/// Publishes `n` messages on the plain port, runs amqp-exec through the TLS
/// proxy until all are processed, and stops it.
async fn consume_through(work: &Workdir, broker: &Broker, q: &str, config: &str, url: &str) {
    let n = 20;
    for i in 0..n {
        broker.publish_id(q, &format!("m{i}"), b"over tls").await;
    }
    let mut sup = Supervisor::start_with_env(work, config, &[], &[("AMQP_URL", url)]);
    work.wait_ledger(n, Duration::from_secs(30)).await;
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    sup.wait_success(Duration::from_secs(20)).await;
    assert_eq!(broker.count(q).await, Some(0));
    let runs = runs_by_id(&work.ledger());
    assert_eq!(runs.len(), n, "each message once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumes_through_tls_with_a_private_ca() {
    let mut broker = Broker::connect().await;
    let q = unique("tls");
    broker.declare(&q).await;
    let work = Workdir::new();
    let ca = Ca::new("amqp-exec test CA");
    let (cert, key) = ca.issue(&["localhost"], false);
    let p = proxy(&cert, &key, None).await;
    write(&work, "ca.pem", &ca.pem());
    // A relative path is taken from the config file's folder.
    let config = config(&q, "ca_file = \"ca.pem\"");
    consume_through(&work, &broker, &q, &config, &tls_url("localhost", p.port)).await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_problems_are_named() {
    let work = Workdir::new();
    let ca = Ca::new("amqp-exec test CA");
    let other = Ca::new("some other CA");
    write(&work, "ca.pem", &ca.pem());
    write(&work, "other.pem", &other.pem());
    let (cert, key) = ca.issue(&["localhost"], false);
    let good = proxy(&cert, &key, None).await;
    let (cert, key) = ca.issue(&["localhost"], true);
    let expired = proxy(&cert, &key, None).await;
    let q = unique("tls-check");
    let ca_file = format!("ca_file = \"{}\"", work.file("ca.pem").display());

    let (ok, out) = check(
        &work,
        &config(&q, &ca_file),
        &tls_url("localhost", good.port),
    )
    .await;
    assert!(ok, "{out}");
    assert!(out.contains("broker: connected"), "{out}");

    // Wrong CA.
    let wrong = format!("ca_file = \"{}\"", work.file("other.pem").display());
    let (ok, out) = check(&work, &config(&q, &wrong), &tls_url("localhost", good.port)).await;
    assert!(!ok, "{out}");
    assert!(out.contains("unknown CA"), "{out}");
    assert!(out.contains("other.pem"), "names the CA file: {out}");

    // Name mismatch: the certificate names localhost only.
    let (ok, out) = check(
        &work,
        &config(&q, &ca_file),
        &tls_url("127.0.0.1", good.port),
    )
    .await;
    assert!(!ok, "{out}");
    assert!(out.contains("does not match the name"), "{out}");
    assert!(out.contains("server_name"), "{out}");
    // ... which server_name fixes.
    let named = format!("{ca_file}\nserver_name = \"localhost\"");
    let (ok, out) = check(&work, &config(&q, &named), &tls_url("127.0.0.1", good.port)).await;
    assert!(ok, "{out}");

    // Expired.
    let (ok, out) = check(
        &work,
        &config(&q, &ca_file),
        &tls_url("localhost", expired.port),
    )
    .await;
    assert!(!ok, "{out}");
    assert!(out.contains("expired"), "{out}");

    // Verification off: connects, with a warning.
    let insecure = format!("{wrong}\ninsecure_skip_verify = true");
    let (ok, out) = check(
        &work,
        &config(&q, &insecure),
        &tls_url("localhost", good.port),
    )
    .await;
    assert!(ok, "{out}");
    assert!(out.contains("verification is OFF"), "{out}");

    // A plain port is not a TLS listener.
    let plain: lapin::uri::AMQPUri = amqp_url().parse().unwrap();
    let (ok, out) = check(
        &work,
        &config(&q, &ca_file),
        &tls_url("localhost", plain.authority.port),
    )
    .await;
    assert!(!ok, "{out}");
    assert!(out.contains("TLS"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificate_required_by_the_broker() {
    let mut broker = Broker::connect().await;
    let q = unique("tls-client");
    broker.declare(&q).await;
    let work = Workdir::new();
    let ca = Ca::new("amqp-exec test CA");
    let (cert, key) = ca.issue(&["localhost"], false);
    let p = proxy(&cert, &key, Some(&ca)).await;
    let (client_cert, client_key) = ca.issue(&["amqp-exec-client"], false);
    write(&work, "ca.pem", &ca.pem());
    write(&work, "client.pem", &client_cert);
    write(&work, "client.key", &client_key);
    let url = tls_url("localhost", p.port);

    // Without a client certificate the broker refuses the connection.
    let (ok, out) = check(&work, &config(&q, "ca_file = \"ca.pem\""), &url).await;
    assert!(!ok, "{out}");
    assert!(out.contains("client certificate"), "{out}");

    let config = config(
        &q,
        "ca_file = \"ca.pem\"\ncert_file = \"client.pem\"\nkey_file = \"client.key\"",
    );
    consume_through(&work, &broker, &q, &config, &url).await;
    broker.cleanup().await;
}

#[test]
fn tls_config_mistakes_name_the_key_and_file() {
    let work = Workdir::new();
    let cfg = |tls: &str| {
        let path = work.write("bad.toml", &config("q", tls));
        let out = Command::new(BIN)
            .arg("--config")
            .arg(&path)
            .arg("check")
            .env("AMQP_URL", "amqps://guest:guest@localhost:1/%2f")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(78), "config error exit status");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = cfg("ca_file = \"missing.pem\"");
    assert!(
        e.contains("bad.toml") && e.contains("`ca_file`") && e.contains("missing.pem"),
        "{e}"
    );
    work.write("empty.pem", "not a certificate\n");
    let e = cfg("ca_file = \"empty.pem\"");
    assert!(
        e.contains("`ca_file`") && e.contains("no PEM certificate"),
        "{e}"
    );
    let e = cfg("cert_file = \"empty.pem\"");
    assert!(e.contains("`key_file`"), "{e}");
    let e = cfg("ca_fle = \"x\"");
    assert!(e.contains("ca_fle"), "{e}");
    let e = cfg("server_name = \"not a name!\"");
    assert!(e.contains("`server_name`"), "{e}");
}
