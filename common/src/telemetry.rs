//! Logs and metrics setup shared by every binary: `tracing` to stderr (text or JSON), a
//! Prometheus `/metrics` endpoint, and a tower layer counting gRPC requests per method.
use crate::kept_gauges;
use metrics_util::MetricKindMask;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global subscriber. `RUST_LOG` overrides the default `info` level.
pub fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,openraft=warn,sled=warn,h2=warn,tower=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: journald, `docker logs` and files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // A second init (tests, `lifeboat up`) is harmless: keep the first.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Serves Prometheus metrics on `listen` (path `/metrics`). A gauge nobody sets for
/// [`kept_gauges::IDLE`] leaves the output (see `kept_gauges`).
pub fn init_metrics(listen: SocketAddr) -> anyhow::Result<()> {
    install_metrics(listen, kept_gauges::IDLE, kept_gauges::REFRESH)
}

/// `init_metrics` with other timings (tests).
pub fn install_metrics(
    listen: SocketAddr,
    idle: Duration,
    refresh: Duration,
) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(listen)
        .idle_timeout(MetricKindMask::GAUGE, Some(idle))
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ])?
        .install()
        .map_err(|e| {
            let text = e.to_string();
            let hint = if text.contains("in use") {
                ": another process listens there. Is this component (or `lifeboat up`) \
                 already running? If not, choose a free address with --metrics-listen"
            } else {
                ""
            };
            anyhow::anyhow!("cannot serve metrics on {listen}: {text}{hint}")
        })?;
    metrics::describe_counter!(
        "lifeboat_grpc_requests_total",
        "gRPC requests received, by method"
    );
    metrics::describe_histogram!(
        "lifeboat_grpc_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time to answer a gRPC request, by method"
    );
    metrics::describe_gauge!(
        "lifeboat_build_info",
        "Always 1; the version label says which Lifeboat runs"
    );
    metrics::describe_gauge!(
        "lifeboat_cs_connected",
        "1 while this component's heartbeats reach a configuration server"
    );
    kept_gauges::set_labelled(
        "lifeboat_build_info",
        vec![("version", crate::facts::VERSION.to_string())],
        1.0,
    );
    kept_gauges::start_refreshing(refresh);
    Ok(())
}

/// Counts every gRPC request and times it, labelled by method path.
#[derive(Debug, Clone, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.uri().path().to_string();
        metrics::counter!("lifeboat_grpc_requests_total", "method" => method.clone()).increment(1);
        let started = Instant::now();
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await;
            metrics::histogram!("lifeboat_grpc_request_duration_seconds", "method" => method)
                .record(started.elapsed().as_secs_f64());
            result
        })
    }
}
