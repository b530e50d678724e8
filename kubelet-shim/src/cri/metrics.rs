//! Prometheus metrics on `[metrics] address` (off by default, as containerd's):
//! every RPC's duration by method and gRPC code, the sandboxes and containers by
//! state, the streaming server's connections and waiting URLs. Served as
//! OpenMetrics text at `/metrics` by a small blocking HTTP listener.
//!
//! RPCs are timed by a tower layer around the gRPC services ([`RpcMetricsLayer`]):
//! from the request to its response head, whose `grpc-status` (present when the
//! call failed) names the code.

use std::future::Future;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::pin::Pin;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::server::Server;
use super::store::{ContainerState, SandboxState};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: String,
}

fn rpc_histogram() -> Histogram {
    // 1 ms to about 65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// The metrics of one server.
pub struct Metrics {
    registry: Registry,
    rpc: Family<RpcLabels, Histogram, fn() -> Histogram>,
    sandboxes: Family<StateLabels, Gauge>,
    containers: Family<StateLabels, Gauge>,
    /// Set by the streaming server.
    pub streaming_connections: Gauge<i64, AtomicI64>,
    pub streaming_urls: Gauge<i64, AtomicI64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("atoll_cri");
        let rpc = Family::<RpcLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            rpc_histogram as fn() -> Histogram,
        );
        registry.register(
            "rpc_duration_seconds",
            "CRI calls by method and gRPC code, from request to answer",
            rpc.clone(),
        );
        let sandboxes = Family::<StateLabels, Gauge>::default();
        registry.register("sandboxes", "Pod sandboxes by state", sandboxes.clone());
        let containers = Family::<StateLabels, Gauge>::default();
        registry.register("containers", "Containers by state", containers.clone());
        let streaming_connections = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "streaming_connections",
            "Exec, attach and port-forward connections being served",
            streaming_connections.clone(),
        );
        let streaming_urls = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "streaming_urls",
            "Streaming URLs handed out and not used yet",
            streaming_urls.clone(),
        );
        let info = Family::<VersionLabels, Gauge>::default();
        info.get_or_create(&VersionLabels {
            version: env!("CARGO_PKG_VERSION").into(),
        })
        .set(1);
        registry.register("build_info", "atoll-cri's version", info);
        Self {
            registry,
            rpc,
            sandboxes,
            containers,
            streaming_connections,
            streaming_urls,
        }
    }

    /// One finished RPC (`path` is gRPC's `/package.Service/Method`).
    pub fn observe_rpc(&self, path: &str, code: &str, took: Duration) {
        let method = path.rsplit('/').next().unwrap_or(path);
        self.rpc
            .get_or_create(&RpcLabels {
                method: method.to_owned(),
                code: code.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// The text of a scrape, with the state gauges read from `server` now.
    pub fn render(&self, server: &Server) -> String {
        let (sandboxes, containers) = server.counts_by_state();
        for s in [
            SandboxState::Creating,
            SandboxState::Ready,
            SandboxState::NotReady,
        ] {
            let n = sandboxes.iter().filter(|x| **x == s).count();
            self.sandboxes
                .get_or_create(&StateLabels {
                    state: format!("{s:?}").to_lowercase(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        for s in [
            ContainerState::Created,
            ContainerState::Running,
            ContainerState::Exited,
        ] {
            let n = containers.iter().filter(|x| **x == s).count();
            self.containers
                .get_or_create(&StateLabels {
                    state: format!("{s:?}").to_lowercase(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Serves `/metrics` on `address` in the background; the bound address.
pub fn serve(address: &str, server: Arc<Server>) -> io::Result<SocketAddr> {
    let listener = TcpListener::bind(address)?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            // One scrape at a time is plenty; a slow scraper waits its turn.
            let busy = Mutex::new(());
            for conn in listener.incoming() {
                let Ok(conn) = conn else {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                };
                let _g = busy.lock().unwrap_or_else(|p| p.into_inner());
                let _ = answer(conn, &server);
            }
        })?;
    Ok(addr)
}

fn answer(conn: TcpStream, server: &Server) -> io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.set_write_timeout(Some(Duration::from_secs(5)))?;
    let head = match super::stream::server::read_head(&conn) {
        Ok(h) => h,
        Err(e) => return reply(&conn, "400 Bad Request", "text/plain", &e),
    };
    if head.path.split('?').next() != Some("/metrics") {
        return reply(
            &conn,
            "404 Not Found",
            "text/plain",
            "only /metrics is here",
        );
    }
    let body = server.metrics.render(server);
    reply(
        &conn,
        "200 OK",
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        &body,
    )
}

fn reply(mut conn: &TcpStream, status: &str, kind: &str, body: &str) -> io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    conn.flush()
}

/// Times every gRPC call of the services it wraps.
#[derive(Clone)]
pub struct RpcMetricsLayer {
    pub metrics: Arc<Metrics>,
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetrics {
            inner,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, R> tower::Service<http::Request<B>> for RpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_owned();
        let metrics = Arc::clone(&self.metrics);
        let t0 = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let r = fut.await;
            let code = match &r {
                Ok(resp) => resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or("OK", |c| code_name(c)),
                Err(_) => "Unavailable",
            };
            metrics.observe_rpc(&path, code, t0.elapsed());
            r
        })
    }
}

/// A gRPC status code's name.
fn code_name(c: i32) -> &'static str {
    match c {
        0 => "OK",
        1 => "Cancelled",
        2 => "Unknown",
        3 => "InvalidArgument",
        4 => "DeadlineExceeded",
        5 => "NotFound",
        6 => "AlreadyExists",
        7 => "PermissionDenied",
        8 => "ResourceExhausted",
        9 => "FailedPrecondition",
        10 => "Aborted",
        11 => "OutOfRange",
        12 => "Unimplemented",
        13 => "Internal",
        14 => "Unavailable",
        15 => "DataLoss",
        16 => "Unauthenticated",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpcs_are_counted_by_method_and_code_in_openmetrics_text() {
        let m = Metrics::new();
        m.observe_rpc(
            "/runtime.v1.RuntimeService/RunPodSandbox",
            "OK",
            Duration::from_millis(150),
        );
        m.observe_rpc(
            "/runtime.v1.RuntimeService/RunPodSandbox",
            "OK",
            Duration::from_millis(250),
        );
        m.observe_rpc(
            "/runtime.v1.ImageService/PullImage",
            code_name(5),
            Duration::from_millis(3),
        );
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
        assert!(
            out.contains(
                "atoll_cri_rpc_duration_seconds_count{method=\"RunPodSandbox\",code=\"OK\"} 2"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "atoll_cri_rpc_duration_seconds_sum{method=\"RunPodSandbox\",code=\"OK\"} 0.4"
            ),
            "{out}"
        );
        assert!(
            out.contains(
                "atoll_cri_rpc_duration_seconds_count{method=\"PullImage\",code=\"NotFound\"} 1"
            ),
            "{out}"
        );
        assert!(out.contains("atoll_cri_build_info{version="), "{out}");
        assert!(out.ends_with("# EOF\n"), "{out}");
    }
}
