//! `atoll-cri`: the Kubernetes CRI v1 server. kubelet (or any CRI client) talks
//! gRPC to it on a Unix socket; every pod sandbox becomes a microVM cloned from the
//! warm pool, every container a few calls to that VM's agent.
//!
//! - `config`: `/etc/atoll/atoll-cri.toml`;
//! - `server`: the operations, blocking, over `store`'s durable records;
//! - `runtime` and `images`: the gRPC services, mapping CRI types;
//! - `logs`: container output in the CRI log format;
//! - `cni`: pod networks through the node's CNI plugins;
//! - `events`: container events for GetContainerEvents;
//! - `metrics`: Prometheus metrics (RPC durations, sandboxes and containers);
//! - `stream`: the streaming server of Exec, Attach and PortForward;
//! - `client`: a connection to a CRI socket (atoll-crictl, the tests).
//!
//! The API types come from the `k8s-cri` crate (CRI v1, generated at build time).

pub mod client;
pub mod cni;
pub mod config;
pub mod events;
pub mod images;
pub mod logs;
pub mod metrics;
pub mod runtime;
pub mod server;
pub mod store;
pub mod stream;

use std::path::Path;
use std::sync::Arc;

use k8s_cri::v1::image_service_server::ImageServiceServer;
use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;

/// Why serving could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "{0} is in use by a running server (another atoll-cri?); stop it or choose another socket"
    )]
    InUse(std::path::PathBuf),
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the streaming server cannot listen on {address}: {source}; set [streaming] address")]
    Streaming {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the metrics endpoint cannot listen on {address}: {source}; set [metrics] address")]
    Metrics {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Binds `socket` (replacing a stale one, refusing one a live server answers on).
pub fn bind(socket: &Path) -> Result<tokio::net::UnixListener, ServeError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let bind_err = |source| ServeError::Bind {
        path: socket.to_owned(),
        source,
    };
    if let Ok(m) = std::fs::symlink_metadata(socket) {
        if !m.file_type().is_socket() {
            return Err(bind_err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is there",
            )));
        }
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Err(ServeError::InUse(socket.to_owned()));
        }
        std::fs::remove_file(socket).map_err(bind_err)?;
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    let l = tokio::net::UnixListener::bind(socket).map_err(bind_err)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660)).map_err(bind_err)?;
    Ok(l)
}

/// Serves the RuntimeService and the ImageService on `listener` until `shutdown`,
/// with the streaming server on `cfg.streaming.address`.
pub async fn serve(
    server: Arc<server::Server>,
    listener: tokio::net::UnixListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ServeError> {
    let address = server.cfg.streaming.address.clone();
    let streaming = stream::server::Streaming::start(&address, Arc::clone(&server))
        .map_err(|source| ServeError::Streaming { address, source })?;
    tracing::info!("streaming server on http://{}", streaming.address());
    let metrics_address = server.cfg.metrics.address.clone();
    if !metrics_address.is_empty() {
        let at = metrics::serve(&metrics_address, Arc::clone(&server)).map_err(|source| {
            ServeError::Metrics {
                address: metrics_address,
                source,
            }
        })?;
        tracing::info!("metrics on http://{at}/metrics");
    }
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .layer(metrics::RpcMetricsLayer {
            metrics: Arc::clone(&server.metrics),
        })
        .add_service(RuntimeServiceServer::new(runtime::Runtime {
            server: Arc::clone(&server),
            streaming,
        }))
        .add_service(ImageServiceServer::new(images::Images { server }))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
