//! Span export over OTLP/HTTP with protobuf: where to (the `[tracing]`
//! table and the standard `OTEL_*` environment variables, which win), and
//! the OpenTelemetry SDK's batch processor feeding the exporter from a
//! thread of its own, off the jobs' path. The exporter's HTTP client is a
//! small blocking one (ureq, rustls with ring).

use crate::config::{TracingConfig, check_otlp_protocol, check_otlp_url};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::time::Duration;

/// The service name spans carry when none is configured.
pub const DEFAULT_SERVICE_NAME: &str = "amqp-exec";
/// How long a request to the collector may take when
/// `OTEL_EXPORTER_OTLP_TIMEOUT` does not say (the OTLP default).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest collector response read.
const MAX_RESPONSE: u64 = 4 * 1024 * 1024;

/// Where and how spans are exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The full URL spans are posted to.
    pub url: String,
    pub service_name: String,
    pub timeout: Duration,
}

/// The export settings from `file` (the `[tracing]` table) and the
/// environment (`env` looks a variable up; empty counts as unset), the
/// environment first; `None` when nothing names an endpoint or export is
/// disabled. An error names the variable or key.
pub fn resolve(
    file: &TracingConfig,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Settings>, String> {
    let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    if let Some(v) = env("OTEL_SDK_DISABLED") {
        if v.trim().eq_ignore_ascii_case("true") {
            return Ok(None);
        }
        if !v.trim().eq_ignore_ascii_case("false") {
            return Err(format!(
                "OTEL_SDK_DISABLED: {v:?} is neither true nor false"
            ));
        }
    }
    if !file.enabled {
        return Ok(None);
    }
    for var in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(p) = env(var) {
            check_otlp_protocol(p.trim()).map_err(|m| format!("{var}: {m}"))?;
            break;
        }
    }
    let checked = |var: &str, url: String| {
        check_otlp_url(&url)
            .map(|()| url)
            .map_err(|m| format!("{var}: {m}"))
    };
    let url = if let Some(u) = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        checked("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", u)?
    } else if let Some(u) = env("OTEL_EXPORTER_OTLP_ENDPOINT") {
        traces_url(&checked("OTEL_EXPORTER_OTLP_ENDPOINT", u)?)
    } else if let Some(u) = &file.traces_endpoint {
        u.clone()
    } else if let Some(u) = &file.endpoint {
        traces_url(u)
    } else {
        return Ok(None);
    };
    let timeout = match env("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
        .map(|v| ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", v))
        .or_else(|| env("OTEL_EXPORTER_OTLP_TIMEOUT").map(|v| ("OTEL_EXPORTER_OTLP_TIMEOUT", v)))
    {
        Some((var, v)) => match v.trim().parse::<u64>() {
            Ok(ms) if ms > 0 => Duration::from_millis(ms),
            _ => {
                return Err(format!(
                    "{var}: {v:?} is not a number of milliseconds above 0"
                ));
            }
        },
        None => DEFAULT_TIMEOUT,
    };
    let service_name = env("OTEL_SERVICE_NAME")
        .or_else(|| file.service_name.clone())
        .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned());
    Ok(Some(Settings {
        url,
        service_name,
        timeout,
    }))
}

/// The traces URL under an OTLP/HTTP base URL.
fn traces_url(base: &str) -> String {
    if base.ends_with('/') {
        format!("{base}v1/traces")
    } else {
        format!("{base}/v1/traces")
    }
}

/// Starts the SDK: a tracer provider whose batch processor exports to
/// `settings.url`.
pub fn provider(settings: &Settings) -> Result<SdkTracerProvider, String> {
    let tls = ureq::tls::TlsConfig::builder()
        .root_certs(native_roots())
        .build();
    let agent = ureq::Agent::config_builder()
        .timeout_global(Some(settings.timeout))
        .http_status_as_error(false)
        .max_redirects(0)
        .tls_config(tls)
        .build()
        .new_agent();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(Client(agent))
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(settings.url.clone())
        .with_timeout(settings.timeout)
        .build()
        .map_err(|e| format!("cannot set up span export to {}: {e}", settings.url))?;
    let resource = Resource::builder()
        .with_service_name(settings.service_name.clone())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// The system's CAs for an `https://` collector, else the WebPKI roots.
fn native_roots() -> ureq::tls::RootCerts {
    let native = rustls_native_certs::load_native_certs();
    if native.certs.is_empty() {
        return ureq::tls::RootCerts::WebPki;
    }
    let certs: Vec<_> = native
        .certs
        .into_iter()
        .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
        .collect();
    ureq::tls::RootCerts::new_with_certs(&certs)
}

/// The exporter's HTTP client. The batch processor calls it from its own
/// thread, where blocking is fine.
#[derive(Debug)]
struct Client(ureq::Agent);

#[async_trait::async_trait]
impl HttpClient for Client {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let request = Request::from_parts(parts, body.to_vec());
        let mut response = self.0.run(request)?;
        let status = response.status();
        let body = response
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE)
            .read_to_vec()?;
        Ok(Response::builder().status(status).body(Bytes::from(body))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(vars: &[(&str, &str)], file: &TracingConfig) -> Result<Option<Settings>, String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        resolve(file, |k| map.get(k).cloned())
    }

    #[test]
    fn nothing_configured_exports_nothing() {
        assert_eq!(with(&[], &TracingConfig::default()), Ok(None));
        assert_eq!(
            with(&[("OTEL_SERVICE_NAME", "x")], &TracingConfig::default()),
            Ok(None)
        );
    }

    #[test]
    fn environment_wins_over_the_file() {
        let file = TracingConfig {
            endpoint: Some("http://file:4318".into()),
            service_name: Some("from-file".into()),
            ..TracingConfig::default()
        };
        let s = with(&[], &file).unwrap().unwrap();
        assert_eq!(s.url, "http://file:4318/v1/traces");
        assert_eq!(s.service_name, "from-file");
        assert_eq!(s.timeout, DEFAULT_TIMEOUT);
        let s = with(
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://env:4318/base/"),
                ("OTEL_SERVICE_NAME", "from-env"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ],
            &file,
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.url, "https://env:4318/base/v1/traces");
        assert_eq!(s.service_name, "from-env");
        assert_eq!(s.timeout, Duration::from_millis(2500));
        // The traces endpoint is used as it is, and wins.
        let s = with(
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:1/x"),
            ],
            &file,
        )
        .unwrap()
        .unwrap();
        assert_eq!(s.url, "http://t:1/x");
        let only_traces = TracingConfig {
            traces_endpoint: Some("http://c/traces".into()),
            ..file.clone()
        };
        assert_eq!(
            with(&[], &only_traces).unwrap().unwrap().url,
            "http://c/traces"
        );
    }

    #[test]
    fn disabled_by_either_side() {
        let file = TracingConfig {
            endpoint: Some("http://file:4318".into()),
            ..TracingConfig::default()
        };
        assert_eq!(with(&[("OTEL_SDK_DISABLED", "TRUE")], &file), Ok(None));
        assert!(
            with(&[("OTEL_SDK_DISABLED", "false")], &file)
                .unwrap()
                .is_some()
        );
        let off = TracingConfig {
            enabled: false,
            ..file
        };
        assert_eq!(
            with(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://e")], &off),
            Ok(None)
        );
    }

    #[test]
    fn errors_name_the_variable() {
        let file = TracingConfig::default();
        for (var, value) in [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "localhost:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "ftp://x"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "10s"),
            ("OTEL_SDK_DISABLED", "maybe"),
        ] {
            let e = with(
                &[
                    (var, value),
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://ok:4318"),
                ]
                .into_iter()
                .rev()
                .collect::<Vec<_>>(),
                &file,
            );
            // The later pair wins in the map: `var` is the one looked up.
            let e = e.unwrap_err();
            assert!(e.starts_with(var), "{e}");
        }
    }
}
