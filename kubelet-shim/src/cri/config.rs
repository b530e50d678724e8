//! `/etc/atoll/atoll-cri.toml`: where atoll-cri listens, keeps its state and finds
//! the guest artefacts, how big a sandbox VM is, and how registries are reached.
//! Every key is optional; an unknown key is an error (a typo must not silently fall
//! back to a default).
//!
//! ```toml
//! socket = "/run/atoll/atoll-cri.sock"
//! state_dir = "/var/lib/atoll/cri"
//! run_dir = "/run/atoll/cri"
//! runtime_handlers = ["atoll"]
//!
//! [sandbox]
//! vcpus = 1
//! memory_mib = 256
//! overhead_mib = 64
//! guest_timeout_secs = 75
//!
//! [registry.mirrors]
//! "registry.k8s.io" = ["http://127.0.0.1:5000"]
//!
//! [cni]
//! conf_dir = "/etc/cni/net.d"
//! bin_dirs = ["/opt/cni/bin", "/usr/lib/cni"]
//!
//! [streaming]
//! address = "127.0.0.1:0"
//!
//! [metrics]
//! address = ""   # off; "127.0.0.1:1338" serves /metrics there
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the config is read from when `--config` does not say otherwise.
pub const DEFAULT_CONFIG: &str = "/etc/atoll/atoll-cri.toml";
/// The RuntimeClass handler atoll-cri serves by default.
pub const DEFAULT_HANDLER: &str = "atoll";
/// Largest config file read.
const MAX_CONFIG: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_CONFIG} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The CRI socket kubelet's `--container-runtime-endpoint` points at.
    pub socket: PathBuf,
    /// Durable state: one JSON record per sandbox and container.
    pub state_dir: PathBuf,
    /// Pod directories (sockets, the VMM's console); tmpfs is right.
    pub run_dir: PathBuf,
    /// The image store (default: `$ATOLL_STORE` or atoll's store).
    pub image_store: Option<PathBuf>,
    /// The guest kernel, initramfs and VMM (default: as `atoll run` finds them).
    pub kernel: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    pub vmm: Option<PathBuf>,
    /// RuntimeClass handlers served; `""` (no RuntimeClass) is always served.
    pub runtime_handlers: Vec<String>,
    pub sandbox: SandboxConfig,
    pub registry: RegistryConfig,
    /// Seconds a sandbox VM may take to answer after it was started.
    pub agent_timeout_secs: u64,
    /// Pod networks.
    pub cni: CniConfig,
    /// The server Exec, Attach and PortForward URLs lead to.
    pub streaming: StreamingConfig,
    /// Prometheus metrics.
    pub metrics: MetricsConfig,
}

/// Where Prometheus scrapes `/metrics` (containerd's `[metrics] address`).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port`; empty (the default) serves no metrics.
    pub address: String,
}

/// The streaming server (containerd's `stream_server_address` and `_port`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamingConfig {
    /// `host:port` it listens on; port 0 lets the kernel choose. Only kubelet
    /// (on this node) needs to reach it: the default is the loopback.
    pub address: String,
}

impl Default for StreamingConfig {
    fn default() -> Self {
        Self {
            address: "127.0.0.1:0".into(),
        }
    }
}

/// Where the CNI network list and plugins are (containerd's `conf_dir` and
/// `bin_dir`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CniConfig {
    /// The network list: the first `*.conflist`, `*.conf` or `*.json` here.
    pub conf_dir: PathBuf,
    /// Where the plugins are, searched in order.
    pub bin_dirs: Vec<PathBuf>,
}

impl Default for CniConfig {
    fn default() -> Self {
        Self {
            conf_dir: PathBuf::from("/etc/cni/net.d"),
            // Where upstream installs them, then Debian's containernetworking-plugins.
            bin_dirs: vec![PathBuf::from("/opt/cni/bin"), PathBuf::from("/usr/lib/cni")],
        }
    }
}

/// The size of sandbox VMs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// vCPUs of a sandbox without CPU limits (and the least any gets).
    pub vcpus: u8,
    /// The most vCPUs a sandbox gets, whatever its limits say.
    pub max_vcpus: u8,
    /// Guest memory of a sandbox without a memory limit (and the least any gets).
    pub memory_mib: u64,
    /// Added to the pod's memory limit: the guest kernel, PID 1 and the agent.
    pub overhead_mib: u64,
    /// The most guest memory a sandbox gets.
    pub max_memory_mib: u64,
    /// VMMs started ahead of sandboxes (`atoll-vmm --standby`: jailed, KVM open,
    /// waiting for a snapshot), so a sandbox's start is only the restore; 0 turns
    /// the pool off.
    pub standby_vmms: usize,
    /// Seconds of silence after which a ready sandbox's guest is declared dead
    /// (its agent missed three liveness checks in a row: `pod::liveness`): its VM
    /// is killed, the sandbox turns NotReady and its containers Exited. 0: off.
    pub guest_timeout_secs: u64,
}

/// How images are pulled, as containerd's `registry.mirrors` and CRI-O's
/// `registries.conf` let users say it.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Registry host (`docker.io`, `registry.k8s.io`, `127.0.0.1:5000`) → endpoints
    /// tried in order (`http://127.0.0.1:5000`); the image keeps its name.
    pub mirrors: BTreeMap<String, Vec<String>>,
    /// Registry hosts spoken to over plain HTTP when reached directly.
    pub plain_http: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("/run/atoll/atoll-cri.sock"),
            state_dir: PathBuf::from("/var/lib/atoll/cri"),
            run_dir: PathBuf::from("/run/atoll/cri"),
            image_store: None,
            kernel: None,
            initramfs: None,
            vmm: None,
            runtime_handlers: vec![DEFAULT_HANDLER.to_owned()],
            sandbox: SandboxConfig::default(),
            registry: RegistryConfig::default(),
            agent_timeout_secs: 60,
            cni: CniConfig::default(),
            streaming: StreamingConfig::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            vcpus: 1,
            max_vcpus: 4,
            memory_mib: 256,
            overhead_mib: 64,
            max_memory_mib: 16 << 10,
            standby_vmms: 2,
            guest_timeout_secs: 75,
        }
    }
}

impl Config {
    /// Parses `text` (read from `path`, for messages) and checks it.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let c: Config = toml::from_str(text).map_err(|e| {
            // One line: where, then what (toml's own rendering spans several).
            let what = e.message().trim_end().replace('\n', " ");
            let message = match e.span() {
                Some(s) => {
                    let start = s.start.min(text.len());
                    let n = text[..start].matches('\n').count();
                    let src: String = text
                        .lines()
                        .nth(n)
                        .unwrap_or("")
                        .trim()
                        .chars()
                        .take(80)
                        .collect();
                    format!("line {}: {what} (in `{src}`)", n + 1)
                }
                None => what,
            };
            ConfigError::Parse {
                path: path.to_owned(),
                message,
            }
        })?;
        c.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })?;
        Ok(c)
    }

    /// Reads `path`; a missing file at the default place means the defaults.
    pub fn load(path: &Path, explicit: bool) -> Result<Self, ConfigError> {
        let read_err = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Self::default())
            }
            Err(e) => return Err(read_err(e)),
        };
        if meta.len() > MAX_CONFIG {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read_err)?;
        Self::parse(path, &text)
    }

    fn validate(&self) -> Result<(), String> {
        for (what, p) in [
            ("socket", &self.socket),
            ("state_dir", &self.state_dir),
            ("run_dir", &self.run_dir),
        ] {
            if !p.is_absolute() {
                return Err(format!("{what} = {p:?}: give an absolute path"));
            }
        }
        if self.socket.as_os_str().len() > 100 {
            return Err(format!(
                "socket = {:?}: a Unix socket path has at most 100 bytes",
                self.socket
            ));
        }
        if self
            .streaming
            .address
            .parse::<std::net::SocketAddr>()
            .is_err()
        {
            return Err(format!(
                "streaming.address = {:?}: give an IP address and a port, as \"127.0.0.1:0\"",
                self.streaming.address
            ));
        }
        if !self.metrics.address.is_empty()
            && self
                .metrics
                .address
                .parse::<std::net::SocketAddr>()
                .is_err()
        {
            return Err(format!(
                "metrics.address = {:?}: give an IP address and a port, as \"127.0.0.1:1338\", or nothing",
                self.metrics.address
            ));
        }
        let s = &self.sandbox;
        if s.standby_vmms > 64 {
            return Err(format!(
                "sandbox.standby_vmms = {}: give 0 (no pool) to 64",
                s.standby_vmms
            ));
        }
        if s.vcpus == 0 || s.max_vcpus < s.vcpus || s.max_vcpus > 32 {
            return Err(format!(
                "sandbox.vcpus = {}, sandbox.max_vcpus = {}: give 1 <= vcpus <= max_vcpus <= 32",
                s.vcpus, s.max_vcpus
            ));
        }
        if s.memory_mib < 64 || s.max_memory_mib < s.memory_mib {
            return Err(format!(
                "sandbox.memory_mib = {}, sandbox.max_memory_mib = {}: give 64 <= memory_mib <= max_memory_mib",
                s.memory_mib, s.max_memory_mib
            ));
        }
        if self.agent_timeout_secs == 0 {
            return Err("agent_timeout_secs = 0: give at least 1".into());
        }
        for h in &self.runtime_handlers {
            if h.is_empty()
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            {
                return Err(format!(
                    "runtime_handlers: {h:?} is not a RuntimeClass handler name"
                ));
            }
        }
        for (host, endpoints) in &self.registry.mirrors {
            if endpoints.is_empty() {
                return Err(format!(
                    "registry.mirrors.{host:?}: give at least one endpoint"
                ));
            }
            for e in endpoints {
                if !(e.starts_with("http://") || e.starts_with("https://")) {
                    return Err(format!(
                        "registry.mirrors.{host:?}: {e:?} must start with http:// or https://"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether RunPodSandbox may use `handler`.
    pub fn serves_handler(&self, handler: &str) -> bool {
        handler.is_empty() || self.runtime_handlers.iter().any(|h| h == handler)
    }

    /// Guest memory and vCPUs for a pod whose limits are `memory_bytes` (0: none)
    /// and `cpu_quota`/`cpu_period` (0: none).
    pub fn sandbox_size(&self, memory_bytes: i64, cpu_quota: i64, cpu_period: i64) -> (u8, u64) {
        let s = &self.sandbox;
        let mem = if memory_bytes > 0 {
            let mib = (memory_bytes as u64).div_ceil(1 << 20);
            (mib + s.overhead_mib).max(s.memory_mib)
        } else {
            s.memory_mib
        };
        let vcpus = if cpu_quota > 0 && cpu_period > 0 {
            let n = (cpu_quota as u64).div_ceil(cpu_period as u64);
            u8::try_from(n).unwrap_or(u8::MAX).max(s.vcpus)
        } else {
            s.vcpus
        };
        (vcpus.min(s.max_vcpus), mem.min(s.max_memory_mib))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_the_defaults() {
        let c = Config::parse(Path::new("/c.toml"), "").unwrap();
        assert_eq!(c, Config::default());
        assert!(c.serves_handler("atoll"));
        assert!(c.serves_handler(""));
        assert!(!c.serves_handler("runc"));
    }

    #[test]
    fn the_shipped_example_config_is_valid_and_says_the_defaults() {
        let text = include_str!("../../../deploy/atoll-cri.toml");
        let c = Config::parse(Path::new("deploy/atoll-cri.toml"), text).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn mirrors_and_sizes_are_read() {
        let c = Config::parse(
            Path::new("/c.toml"),
            r#"
            runtime_handlers = ["atoll", "atoll-big"]
            [sandbox]
            memory_mib = 128
            [registry.mirrors]
            "registry.k8s.io" = ["http://127.0.0.1:5000"]
            "#,
        )
        .unwrap();
        assert_eq!(
            c.registry.mirrors["registry.k8s.io"],
            vec!["http://127.0.0.1:5000".to_owned()]
        );
        assert!(c.serves_handler("atoll-big"));
        assert_eq!(c.sandbox.memory_mib, 128);
    }

    #[test]
    fn bad_configs_say_which_key_is_wrong() {
        for (text, want) in [
            ("sockett = \"/x\"", "line 1: unknown field `sockett`"),
            ("socket = \"rel.sock\"", "socket"),
            ("[sandbox]\nvcpus = 0", "sandbox.vcpus"),
            ("[sandbox]\nmemory_mib = 8", "sandbox.memory_mib"),
            ("runtime_handlers = [\"a b\"]", "runtime_handlers"),
            (
                "[registry.mirrors]\n\"docker.io\" = [\"127.0.0.1:5000\"]",
                "http://",
            ),
            ("agent_timeout_secs = \"x\"", "agent_timeout_secs"),
            ("[streaming]\naddress = \"localhost\"", "streaming.address"),
            ("[streaming]\nport = 1", "unknown field `port`"),
            ("[metrics]\naddress = \":1338\"", "metrics.address"),
        ] {
            let e = Config::parse(Path::new("/c.toml"), text)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("/c.toml: "), "{e}");
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn a_missing_default_file_is_the_defaults_but_a_missing_given_file_is_an_error() {
        let p = Path::new("/nonexistent/atoll-cri.toml");
        assert_eq!(Config::load(p, false).unwrap(), Config::default());
        assert!(Config::load(p, true)
            .unwrap_err()
            .to_string()
            .starts_with("cannot read /nonexistent/atoll-cri.toml"));
    }

    #[test]
    fn sandboxes_are_sized_from_limits_plus_overhead_within_bounds() {
        let c = Config::default();
        assert_eq!(c.sandbox_size(0, 0, 0), (1, 256));
        assert_eq!(c.sandbox_size(512 << 20, 150_000, 100_000), (2, 576));
        assert_eq!(c.sandbox_size(1, 1, 100_000), (1, 256));
        assert_eq!(c.sandbox_size(1 << 50, 1 << 40, 1), (4, 16 << 10));
    }
}
