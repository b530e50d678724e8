//! A CRI client over a Unix socket: what `atoll-crictl` and the tests use (there is
//! no crictl on this node; tonic builds the client from the same API crate).

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint};

/// Both services on one connection.
#[derive(Debug, Clone)]
pub struct Client {
    pub runtime: RuntimeServiceClient<Channel>,
    pub images: ImageServiceClient<Channel>,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot connect to the CRI socket {path}: {source} (is atoll-cri running?)")]
pub struct ConnectError {
    pub path: PathBuf,
    #[source]
    pub source: tonic::transport::Error,
}

impl Client {
    /// Connects to `socket`; every call fails after `timeout`.
    pub async fn connect(socket: &Path, timeout: Duration) -> Result<Self, ConnectError> {
        let path = socket.to_owned();
        let channel = Endpoint::from_static("http://localhost")
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .map_err(|source| ConnectError {
                path: socket.to_owned(),
                source,
            })?;
        Ok(Self {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }
}

/// The JSON configs `atoll-crictl runp` and `create` read: crictl's file shapes
/// (snake_case CRI field names), with every field optional and only the fields
/// atoll-cri acts on; an unknown field is an error rather than silently ignored.
pub mod spec {
    use std::collections::HashMap;

    use k8s_cri::v1 as cri;
    use serde::Deserialize;

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Metadata {
        pub name: String,
        pub uid: String,
        pub namespace: String,
        pub attempt: u32,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Resources {
        pub memory_limit_in_bytes: i64,
        pub cpu_quota: i64,
        pub cpu_period: i64,
    }

    impl Resources {
        fn cri(&self) -> cri::LinuxContainerResources {
            cri::LinuxContainerResources {
                memory_limit_in_bytes: self.memory_limit_in_bytes,
                cpu_quota: self.cpu_quota,
                cpu_period: self.cpu_period,
                ..Default::default()
            }
        }
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct PodLinux {
        pub resources: Option<Resources>,
        pub overhead: Option<Resources>,
        pub sysctls: HashMap<String, String>,
        pub security_context: Option<PodSecurityContext>,
    }

    /// The part of a LinuxSandboxSecurityContext the tests use.
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct PodSecurityContext {
        pub namespace_options: Option<NamespaceOptions>,
    }

    /// NamespaceOption; each "POD", "CONTAINER", "NODE" or "TARGET" (empty: POD).
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct NamespaceOptions {
        pub network: String,
        pub pid: String,
        pub ipc: String,
    }

    impl NamespaceOptions {
        fn cri(&self) -> Result<cri::NamespaceOption, String> {
            Ok(cri::NamespaceOption {
                network: namespace_mode("network", &self.network)?,
                pid: namespace_mode("pid", &self.pid)?,
                ipc: namespace_mode("ipc", &self.ipc)?,
                ..Default::default()
            })
        }
    }

    fn namespace_mode(field: &str, mode: &str) -> Result<i32, String> {
        if mode.is_empty() {
            return Ok(cri::NamespaceMode::Pod as i32);
        }
        cri::NamespaceMode::from_str_name(mode)
            .map(|m| m as i32)
            .ok_or_else(|| format!("{field}: give POD, CONTAINER, NODE or TARGET, not {mode:?}"))
    }

    /// A DNSConfig.
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Dns {
        pub servers: Vec<String>,
        pub searches: Vec<String>,
        pub options: Vec<String>,
    }

    /// A PortMapping (protocol "TCP", "UDP" or "SCTP").
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Port {
        pub protocol: String,
        pub container_port: i32,
        pub host_port: i32,
        pub host_ip: String,
    }

    /// A PodSandboxConfig.
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Pod {
        pub metadata: Metadata,
        pub hostname: String,
        pub log_directory: String,
        pub labels: HashMap<String, String>,
        pub annotations: HashMap<String, String>,
        pub linux: Option<PodLinux>,
        pub dns_config: Option<Dns>,
        pub port_mappings: Vec<Port>,
    }

    impl Pod {
        pub fn cri(&self) -> Result<cri::PodSandboxConfig, String> {
            let m = &self.metadata;
            let linux = match &self.linux {
                None => None,
                Some(l) => {
                    let namespace_options = match l
                        .security_context
                        .as_ref()
                        .and_then(|s| s.namespace_options.as_ref())
                    {
                        None => None,
                        Some(o) => Some(o.cri()?),
                    };
                    Some(cri::LinuxPodSandboxConfig {
                        resources: l.resources.as_ref().map(Resources::cri),
                        overhead: l.overhead.as_ref().map(Resources::cri),
                        sysctls: l.sysctls.clone(),
                        security_context: namespace_options.map(|o| {
                            cri::LinuxSandboxSecurityContext {
                                namespace_options: Some(o),
                                ..Default::default()
                            }
                        }),
                        ..Default::default()
                    })
                }
            };
            Ok(cri::PodSandboxConfig {
                metadata: Some(cri::PodSandboxMetadata {
                    name: m.name.clone(),
                    uid: m.uid.clone(),
                    namespace: m.namespace.clone(),
                    attempt: m.attempt,
                }),
                hostname: self.hostname.clone(),
                log_directory: self.log_directory.clone(),
                labels: self.labels.clone(),
                annotations: self.annotations.clone(),
                linux,
                dns_config: self.dns_config.as_ref().map(|d| cri::DnsConfig {
                    servers: d.servers.clone(),
                    searches: d.searches.clone(),
                    options: d.options.clone(),
                }),
                port_mappings: self
                    .port_mappings
                    .iter()
                    .map(|p| cri::PortMapping {
                        protocol: match p.protocol.to_ascii_uppercase().as_str() {
                            "UDP" => cri::Protocol::Udp,
                            "SCTP" => cri::Protocol::Sctp,
                            _ => cri::Protocol::Tcp,
                        } as i32,
                        container_port: p.container_port,
                        host_port: p.host_port,
                        host_ip: p.host_ip.clone(),
                    })
                    .collect(),
                ..Default::default()
            })
        }
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Image {
        pub image: String,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct KeyValue {
        pub key: String,
        pub value: String,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Value {
        pub value: i64,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Capabilities {
        pub add_capabilities: Vec<String>,
        pub drop_capabilities: Vec<String>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Profile {
        /// `RuntimeDefault`, `Unconfined` or `Localhost`.
        pub profile_type: String,
        pub localhost_ref: String,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct SecurityContext {
        pub privileged: bool,
        pub run_as_user: Option<Value>,
        pub run_as_group: Option<Value>,
        pub run_as_username: String,
        pub readonly_rootfs: bool,
        pub no_new_privs: bool,
        pub capabilities: Option<Capabilities>,
        pub seccomp: Option<Profile>,
        pub supplemental_groups: Vec<i64>,
        pub masked_paths: Vec<String>,
        pub readonly_paths: Vec<String>,
        pub namespace_options: Option<NamespaceOptions>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct ContainerLinux {
        pub resources: Option<Resources>,
        pub security_context: Option<SecurityContext>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Mount {
        pub container_path: String,
        pub host_path: String,
        pub readonly: bool,
        /// `PROPAGATION_PRIVATE` (or empty), `PROPAGATION_HOST_TO_CONTAINER`,
        /// `PROPAGATION_BIDIRECTIONAL`.
        pub propagation: String,
        /// An image volume: the image (id or name) in place of a host path.
        pub image: Option<Image>,
    }

    /// A ContainerConfig.
    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Container {
        pub metadata: Metadata,
        pub image: Image,
        pub command: Vec<String>,
        pub args: Vec<String>,
        pub working_dir: String,
        pub envs: Vec<KeyValue>,
        pub mounts: Vec<Mount>,
        pub labels: HashMap<String, String>,
        pub annotations: HashMap<String, String>,
        pub log_path: String,
        pub stdin: bool,
        pub stdin_once: bool,
        pub tty: bool,
        pub linux: Option<ContainerLinux>,
    }

    impl Container {
        pub fn cri(&self) -> Result<cri::ContainerConfig, String> {
            let linux = match &self.linux {
                None => None,
                Some(l) => Some(cri::LinuxContainerConfig {
                    resources: l.resources.as_ref().map(Resources::cri),
                    security_context: match &l.security_context {
                        None => None,
                        Some(s) => Some(security(s)?),
                    },
                }),
            };
            Ok(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: self.metadata.name.clone(),
                    attempt: self.metadata.attempt,
                }),
                image: Some(cri::ImageSpec {
                    image: self.image.image.clone(),
                    ..Default::default()
                }),
                command: self.command.clone(),
                args: self.args.clone(),
                working_dir: self.working_dir.clone(),
                envs: self
                    .envs
                    .iter()
                    .map(|kv| cri::KeyValue {
                        key: kv.key.clone(),
                        value: kv.value.clone(),
                    })
                    .collect(),
                mounts: self
                    .mounts
                    .iter()
                    .map(|m| {
                        let propagation = if m.propagation.is_empty() {
                            cri::MountPropagation::PropagationPrivate
                        } else {
                            cri::MountPropagation::from_str_name(&m.propagation).ok_or_else(
                                || format!("mounts: unknown propagation {:?}", m.propagation),
                            )?
                        };
                        Ok(cri::Mount {
                            container_path: m.container_path.clone(),
                            host_path: m.host_path.clone(),
                            readonly: m.readonly,
                            propagation: propagation as i32,
                            image: m.image.as_ref().map(|i| cri::ImageSpec {
                                image: i.image.clone(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        })
                    })
                    .collect::<Result<_, String>>()?,
                labels: self.labels.clone(),
                annotations: self.annotations.clone(),
                log_path: self.log_path.clone(),
                stdin: self.stdin,
                stdin_once: self.stdin_once,
                tty: self.tty,
                linux,
                ..Default::default()
            })
        }
    }

    fn security(s: &SecurityContext) -> Result<cri::LinuxContainerSecurityContext, String> {
        let seccomp = match &s.seccomp {
            None => None,
            Some(p) => Some(cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::from_str_name(&p.profile_type)
                    .ok_or_else(|| {
                        format!(
                        "seccomp.profile_type {:?}: give RuntimeDefault, Unconfined or Localhost",
                        p.profile_type
                    )
                    })? as i32,
                localhost_ref: p.localhost_ref.clone(),
            }),
        };
        Ok(cri::LinuxContainerSecurityContext {
            privileged: s.privileged,
            run_as_user: s
                .run_as_user
                .as_ref()
                .map(|v| cri::Int64Value { value: v.value }),
            run_as_group: s
                .run_as_group
                .as_ref()
                .map(|v| cri::Int64Value { value: v.value }),
            run_as_username: s.run_as_username.clone(),
            readonly_rootfs: s.readonly_rootfs,
            no_new_privs: s.no_new_privs,
            capabilities: s.capabilities.as_ref().map(|c| cri::Capability {
                add_capabilities: c.add_capabilities.clone(),
                drop_capabilities: c.drop_capabilities.clone(),
                ..Default::default()
            }),
            seccomp,
            supplemental_groups: s.supplemental_groups.clone(),
            masked_paths: s.masked_paths.clone(),
            readonly_paths: s.readonly_paths.clone(),
            namespace_options: match &s.namespace_options {
                None => None,
                Some(o) => Some(o.cri()?),
            },
            ..Default::default()
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn partial_configs_fill_in_and_typos_are_refused() {
            let p: Pod = serde_json::from_str(
                r#"{"metadata":{"name":"web","uid":"u","namespace":"default"},"log_directory":"/l","linux":{"resources":{"memory_limit_in_bytes":1048576}}}"#,
            )
            .unwrap();
            let c = p.cri().unwrap();
            assert_eq!(c.metadata.unwrap().name, "web");
            assert_eq!(
                c.linux.unwrap().resources.unwrap().memory_limit_in_bytes,
                1 << 20
            );
            let p: Pod = serde_json::from_str(
                r#"{"linux":{"sysctls":{"net.ipv4.ip_forward":"1"},
                    "security_context":{"namespace_options":{"pid":"NODE"}}},
                    "dns_config":{"options":["ndots:5"]}}"#,
            )
            .unwrap();
            let c = p.cri().unwrap();
            assert_eq!(c.dns_config.unwrap().options, ["ndots:5"]);
            let l = c.linux.unwrap();
            assert_eq!(l.sysctls["net.ipv4.ip_forward"], "1");
            let ns = l.security_context.unwrap().namespace_options.unwrap();
            assert_eq!(ns.pid, cri::NamespaceMode::Node as i32);
            assert_eq!(ns.network, cri::NamespaceMode::Pod as i32);
            let p: Pod = serde_json::from_str(
                r#"{"linux":{"security_context":{"namespace_options":{"ipc":"HOST"}}}}"#,
            )
            .unwrap();
            assert!(p.cri().unwrap_err().contains("ipc: give POD"));
            let c: Container = serde_json::from_str(
                r#"{"metadata":{"name":"a"},"image":{"image":"busybox"},"command":["top"],
                    "linux":{"security_context":{"run_as_user":{"value":1000},"seccomp":{"profile_type":"RuntimeDefault"}}}}"#,
            )
            .unwrap();
            let cc = c.cri().unwrap();
            let sc = cc.linux.unwrap().security_context.unwrap();
            assert_eq!(sc.run_as_user.unwrap().value, 1000);
            assert_eq!(sc.seccomp.unwrap().profile_type, 0);
            assert!(serde_json::from_str::<Pod>(r#"{"metdata":{}}"#).is_err());
            let bad: Container = serde_json::from_str(
                r#"{"linux":{"security_context":{"seccomp":{"profile_type":"Strict"}}}}"#,
            )
            .unwrap();
            assert!(bad.cri().unwrap_err().contains("Strict"));
        }
    }
}
