//! The CRI RuntimeService: maps each RPC's request to a [`Server`] operation (run
//! on tokio's blocking pool: they talk to guests and VMMs with blocking sockets)
//! and its record back to the CRI's types.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_cri::v1 as cri;
use tonic::{Request, Response, Status};

use super::cni;
use super::server::{ContainerRequest, CriError, SandboxRequest, Server};
use super::store::{
    self, ContainerRecord, ContainerState, HostMount, Meta, SandboxRecord, SandboxState,
};
use super::stream::attach::AttachSpec;
use super::stream::exec::ExecSpec;
use super::stream::portforward::PortForwardSpec;
use super::stream::server::{Request as StreamRequest, Streaming};
use atoll_agent_proto::v1;

/// The CRI version kubelet asks for and we answer.
pub const KUBE_API_VERSION: &str = "0.1.0";
/// The runtime's name in Version.
pub const RUNTIME_NAME: &str = "atoll";
/// Files kubelet mounts into every container, which the guest provides itself.
const KUBELET_FILES: [&str; 4] = [
    "/etc/hosts",
    "/etc/hostname",
    "/etc/resolv.conf",
    "/dev/termination-log",
];
/// Why ListMetricDescriptors and ListPodSandboxMetrics are not served.
const METRICS_UNIMPLEMENTED: &str = "atoll-cri serves pod and container statistics through PodSandboxStats, ListPodSandboxStats, ContainerStats and ListContainerStats, not as cAdvisor-style metrics";

/// The container's host mounts as atoll-cri gives them, [`KUBELET_FILES`] left
/// out; or why one cannot be given. A microVM pod shares no file system with the
/// node: a read-only host path is copied in when the container is created, an
/// emptyDir is a tmpfs of the pod, an image volume the image's own disk; a
/// writable host path, bidirectional propagation or id-mapped mounts cannot be
/// honoured and are refused rather than half-done.
fn host_mounts(mounts: &[cri::Mount]) -> Result<Vec<HostMount>, Status> {
    let mut out = Vec::new();
    for m in mounts {
        if KUBELET_FILES.contains(&m.container_path.as_str()) {
            continue;
        }
        let at = &m.container_path;
        let refuse = |why: String| Err(Status::invalid_argument(format!("mounts: {at}: {why}")));
        if let Some(image) = &m.image {
            // An image volume: the image's disk, attached to one of the VM's slots
            // as a container's root is, and bound read-only (image volumes are
            // read-only by definition, whatever `readonly` says).
            if image.image.is_empty() || !m.host_path.is_empty() {
                return refuse("an image volume names an image and no host path".into());
            }
            out.push(HostMount {
                container_path: m.container_path.clone(),
                readonly: true,
                image: image.image.clone(),
                ..Default::default()
            });
            continue;
        }
        if !m.uid_mappings.is_empty() || !m.gid_mappings.is_empty() {
            return refuse("id-mapped mounts are not supported by microVM pods".into());
        }
        if m.propagation == cri::MountPropagation::PropagationBidirectional as i32 {
            return refuse(
                "bidirectional propagation needs a file system shared with the node, which microVM pods do not have"
                    .into(),
            );
        }
        if !m.host_path.starts_with('/') {
            return refuse(format!("host path {:?} is not absolute", m.host_path));
        }
        let mount = HostMount {
            container_path: m.container_path.clone(),
            host_path: m.host_path.clone(),
            readonly: m.readonly,
            propagation: m.propagation,
            selinux_relabel: m.selinux_relabel,
            recursive_read_only: m.recursive_read_only,
            image: String::new(),
        };
        if !mount.readonly && !mount.is_empty_dir() {
            return refuse(format!(
                "host path {} is writable; a microVM pod gets a copy of host paths, so its writes could not reach the node: mount it readOnly, or use an emptyDir",
                m.host_path
            ));
        }
        out.push(mount);
    }
    Ok(out)
}

/// Largest Localhost seccomp profile read.
const MAX_SECCOMP_PROFILE: u64 = 1 << 20;

pub fn status(e: CriError) -> Status {
    match e {
        CriError::InvalidArgument(m) => Status::invalid_argument(m),
        CriError::NotFound(m) => Status::not_found(m),
        CriError::AlreadyExists(m) => Status::already_exists(m),
        CriError::FailedPrecondition(m) => Status::failed_precondition(m),
        CriError::ResourceExhausted(m) => Status::resource_exhausted(m),
        CriError::DeadlineExceeded(m) => Status::deadline_exceeded(m),
        CriError::Unavailable(m) => Status::unavailable(m),
        CriError::Internal(m) => Status::internal(m),
    }
}

/// Runs `f` on the blocking pool.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CriError> + Send + 'static,
) -> Result<T, Status> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(status),
        Err(e) => Err(Status::internal(format!("the operation failed: {e}"))),
    }
}

fn btree(m: HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

fn hash(m: &BTreeMap<String, String>) -> HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn sandbox_meta(m: &Meta) -> cri::PodSandboxMetadata {
    cri::PodSandboxMetadata {
        name: m.name.clone(),
        uid: m.uid.clone(),
        namespace: m.namespace.clone(),
        attempt: m.attempt,
    }
}

fn container_meta(m: &Meta) -> cri::ContainerMetadata {
    cri::ContainerMetadata {
        name: m.name.clone(),
        attempt: m.attempt,
    }
}

fn sandbox_state(s: SandboxState) -> i32 {
    match s {
        SandboxState::Ready => cri::PodSandboxState::SandboxReady as i32,
        SandboxState::Creating | SandboxState::NotReady => {
            cri::PodSandboxState::SandboxNotready as i32
        }
    }
}

fn container_state(s: ContainerState) -> i32 {
    match s {
        ContainerState::Created => cri::ContainerState::ContainerCreated as i32,
        ContainerState::Running => cri::ContainerState::ContainerRunning as i32,
        ContainerState::Exited => cri::ContainerState::ContainerExited as i32,
        ContainerState::Unknown => cri::ContainerState::ContainerUnknown as i32,
    }
}

fn image_spec(c: &ContainerRecord) -> cri::ImageSpec {
    cri::ImageSpec {
        image: c.image.clone(),
        ..Default::default()
    }
}

/// The agent's security settings from the CRI's.
fn security(sc: Option<&cri::LinuxContainerSecurityContext>) -> Result<v1::Security, CriError> {
    use v1::security::Seccomp;
    let mut s = v1::Security {
        // A container without a seccomp profile runs unconfined (the CRI default).
        seccomp: Seccomp::Unconfined as i32,
        ..Default::default()
    };
    let Some(sc) = sc else { return Ok(s) };
    s.privileged = sc.privileged;
    s.no_new_privileges = sc.no_new_privs;
    s.masked_paths = sc.masked_paths.clone();
    s.readonly_paths = sc.readonly_paths.clone();
    // The guest kernel has no AppArmor, and a node's profile cannot reach into the
    // VM: a profile by name is refused rather than silently not enforced. The
    // runtime's default (what kubelet asks on an AppArmor node) and unconfined are
    // what the VM boundary gives.
    if let Some(name) = named_apparmor_profile(sc) {
        return Err(CriError::InvalidArgument(format!(
            "apparmor profile {name:?}: a microVM pod's guest kernel has no AppArmor and the node's profiles cannot confine it; use RuntimeDefault or Unconfined"
        )));
    }
    if let Some(ns) = &sc.namespace_options {
        // kubelet always sends them: POD for a pod that shares its process
        // namespace, CONTAINER otherwise.
        match cri::NamespaceMode::try_from(ns.pid) {
            Ok(cri::NamespaceMode::Pod) => s.share_pod_pid = true,
            Ok(cri::NamespaceMode::Container) => {}
            Ok(cri::NamespaceMode::Node) => {
                return Err(CriError::InvalidArgument(
                    "namespace_options.pid = NODE: a microVM pod has its own kernel, so it cannot share the node's pid namespace".into(),
                ))
            }
            _ => {
                return Err(CriError::InvalidArgument(format!(
                    "namespace_options.pid = {}: atoll-cri gives a container its own PID namespace (CONTAINER) or the pod's (POD)",
                    ns.pid
                )))
            }
        }
    }
    if let Some(caps) = &sc.capabilities {
        s.add_capabilities = caps.add_capabilities.iter().map(|c| cap_name(c)).collect();
        s.drop_capabilities = caps.drop_capabilities.iter().map(|c| cap_name(c)).collect();
    }
    if let Some(p) = &sc.seccomp {
        match cri::security_profile::ProfileType::try_from(p.profile_type) {
            Ok(cri::security_profile::ProfileType::RuntimeDefault) => {
                s.seccomp = Seccomp::RuntimeDefault as i32
            }
            Ok(cri::security_profile::ProfileType::Unconfined) => {}
            Ok(cri::security_profile::ProfileType::Localhost) => {
                let path = std::path::Path::new(&p.localhost_ref);
                let json = read_profile(path)?;
                s.seccomp = Seccomp::Custom as i32;
                s.seccomp_json = json;
            }
            Err(_) => {
                return Err(CriError::InvalidArgument(format!(
                    "seccomp.profile_type {} is unknown",
                    p.profile_type
                )))
            }
        }
    }
    Ok(s)
}

/// The AppArmor profile `sc` names, if it names one: the `apparmor` field, or
/// without it the deprecated string kubelet still fills for older runtimes.
#[allow(deprecated)]
fn named_apparmor_profile(sc: &cri::LinuxContainerSecurityContext) -> Option<String> {
    match &sc.apparmor {
        Some(p) if p.profile_type == cri::security_profile::ProfileType::Localhost as i32 => {
            Some(p.localhost_ref.clone())
        }
        Some(_) => None,
        None => sc
            .apparmor_profile
            .strip_prefix("localhost/")
            .map(str::to_owned),
    }
}

/// `NET_ADMIN` and `CAP_NET_ADMIN` both name the capability; `ALL` stays.
fn cap_name(c: &str) -> String {
    let up = c.to_ascii_uppercase();
    if up == "ALL" || up.starts_with("CAP_") {
        up
    } else {
        format!("CAP_{up}")
    }
}

fn read_profile(path: &std::path::Path) -> Result<String, CriError> {
    use std::io::Read;
    let bad =
        |m: String| CriError::InvalidArgument(format!("seccomp profile {}: {m}", path.display()));
    if !path.is_absolute() {
        return Err(bad("give an absolute path".into()));
    }
    let mut json = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_SECCOMP_PROFILE + 1).read_to_string(&mut json))
        .map_err(|e| bad(e.to_string()))?;
    if json.len() as u64 > MAX_SECCOMP_PROFILE {
        return Err(bad(format!("larger than {MAX_SECCOMP_PROFILE} bytes")));
    }
    serde_json::from_str::<serde_json::Value>(&json).map_err(|e| bad(format!("not JSON: {e}")))?;
    Ok(json)
}

/// The user a container runs as: `run_as_username`, or `run_as_user[:run_as_group]`;
/// None for the image's. A group without a user is refused, as the CRI says.
fn user(sc: Option<&cri::LinuxContainerSecurityContext>) -> Result<Option<String>, CriError> {
    let Some(sc) = sc else { return Ok(None) };
    let name = if !sc.run_as_username.is_empty() {
        sc.run_as_username.clone()
    } else if let Some(uid) = &sc.run_as_user {
        id_of("run_as_user", uid.value)?.to_string()
    } else if sc.run_as_group.is_some() {
        return Err(CriError::InvalidArgument(
            "run_as_group is set without run_as_user or run_as_username: give the user too".into(),
        ));
    } else {
        return Ok(None);
    };
    Ok(Some(match &sc.run_as_group {
        Some(g) => format!("{name}:{}", id_of("run_as_group", g.value)?),
        None => name,
    }))
}

/// A uid or gid from the CRI's int64: 0 to 2^32-2.
fn id_of(field: &str, value: i64) -> Result<u32, CriError> {
    u32::try_from(value)
        .ok()
        .filter(|&v| v != u32::MAX)
        .ok_or_else(|| CriError::InvalidArgument(format!("{field} {value} is not a valid id")))
}

/// The container's supplemental groups (kubelet puts the pod's fsGroup among them).
fn supplemental_groups(
    sc: Option<&cri::LinuxContainerSecurityContext>,
) -> Result<Vec<u32>, CriError> {
    sc.map_or(&[][..], |s| &s.supplemental_groups[..])
        .iter()
        .map(|&g| id_of("supplemental_groups", g))
        .collect()
}

fn resources(r: Option<&cri::LinuxContainerResources>) -> v1::Resources {
    let Some(r) = r else {
        return v1::Resources::default();
    };
    let quota = u64::try_from(r.cpu_quota).unwrap_or(0);
    v1::Resources {
        memory_limit_bytes: u64::try_from(r.memory_limit_in_bytes).unwrap_or(0),
        cpu_quota_us: quota,
        cpu_period_us: if quota > 0 {
            u64::try_from(r.cpu_period)
                .ok()
                .filter(|&p| p > 0)
                .unwrap_or(100_000)
        } else {
            0
        },
        pids_limit: 0,
    }
}

fn sandbox_status(s: &SandboxRecord) -> cri::PodSandboxStatus {
    cri::PodSandboxStatus {
        id: s.id.clone(),
        metadata: Some(sandbox_meta(&s.meta)),
        state: sandbox_state(s.state),
        created_at: s.created_ns,
        network: Some(cri::PodSandboxNetworkStatus {
            // Addresses without their prefix, IPv4 first, as kubelet wants them.
            ip: s
                .ips
                .first()
                .map(|a| a.split('/').next().unwrap_or_default().to_owned())
                .unwrap_or_default(),
            additional_ips: s
                .ips
                .iter()
                .skip(1)
                .map(|a| cri::PodIp {
                    ip: a.split('/').next().unwrap_or_default().to_owned(),
                })
                .collect(),
        }),
        linux: Some(cri::LinuxPodSandboxStatus {
            namespaces: Some(cri::Namespace {
                options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Pod as i32,
                    pid: cri::NamespaceMode::Container as i32,
                    ipc: cri::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
            }),
        }),
        labels: hash(&s.labels),
        annotations: hash(&s.annotations),
        runtime_handler: s.runtime_handler.clone(),
    }
}

fn container_status(c: &ContainerRecord) -> cri::ContainerStatus {
    cri::ContainerStatus {
        id: c.id.clone(),
        metadata: Some(container_meta(&c.meta)),
        state: container_state(c.state),
        created_at: c.created_ns,
        started_at: c.started_ns,
        finished_at: c.finished_ns,
        exit_code: c.exit_code,
        image: Some(image_spec(c)),
        image_ref: c.image_ref.clone(),
        reason: c.reason.clone(),
        message: c.message.clone(),
        labels: hash(&c.labels),
        annotations: hash(&c.annotations),
        mounts: c
            .mounts
            .iter()
            .map(|m| cri::Mount {
                container_path: m.container_path.clone(),
                host_path: m.host_path.clone(),
                readonly: m.readonly,
                selinux_relabel: m.selinux_relabel,
                propagation: m.propagation,
                recursive_read_only: m.recursive_read_only,
                image: (!m.image.is_empty()).then(|| cri::ImageSpec {
                    image: m.image.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
        log_path: c.log_path.clone(),
        resources: None,
        image_id: c.image_id.clone(),
        user: None,
    }
}

fn container_item(c: &ContainerRecord) -> cri::Container {
    cri::Container {
        id: c.id.clone(),
        pod_sandbox_id: c.sandbox_id.clone(),
        metadata: Some(container_meta(&c.meta)),
        image: Some(image_spec(c)),
        image_ref: c.image_ref.clone(),
        state: container_state(c.state),
        created_at: c.created_ns,
        labels: hash(&c.labels),
        annotations: hash(&c.annotations),
        image_id: c.image_id.clone(),
    }
}

fn container_stats(c: &ContainerRecord, s: Option<&v1::StatsReply>) -> cri::ContainerStats {
    let now = super::server::now_ns();
    cri::ContainerStats {
        attributes: Some(cri::ContainerAttributes {
            id: c.id.clone(),
            metadata: Some(container_meta(&c.meta)),
            labels: hash(&c.labels),
            annotations: hash(&c.annotations),
        }),
        cpu: s.map(|s| cri::CpuUsage {
            timestamp: now,
            usage_core_nano_seconds: Some(cri::UInt64Value {
                value: s.cpu_usage_us.saturating_mul(1000),
            }),
            usage_nano_cores: None,
        }),
        memory: s.map(|s| cri::MemoryUsage {
            timestamp: now,
            working_set_bytes: Some(cri::UInt64Value {
                value: s.memory_current_bytes,
            }),
            usage_bytes: Some(cri::UInt64Value {
                value: s.memory_current_bytes,
            }),
            ..Default::default()
        }),
        writable_layer: None,
        swap: None,
    }
}

fn sandbox_stats(s: &super::server::SandboxStats) -> cri::PodSandboxStats {
    let now = super::server::now_ns();
    let u64v = |value| Some(cri::UInt64Value { value });
    let rec = &s.sandbox;
    cri::PodSandboxStats {
        attributes: Some(cri::PodSandboxAttributes {
            id: rec.id.clone(),
            metadata: Some(sandbox_meta(&rec.meta)),
            labels: hash(&rec.labels),
            annotations: hash(&rec.annotations),
        }),
        linux: Some(cri::LinuxPodSandboxStats {
            cpu: s.usage.as_ref().map(|u| cri::CpuUsage {
                timestamp: now,
                usage_core_nano_seconds: u64v(u.cpu_ns),
                usage_nano_cores: None,
            }),
            memory: s.usage.as_ref().map(|u| cri::MemoryUsage {
                timestamp: now,
                working_set_bytes: u64v(u.working_set_bytes),
                usage_bytes: u64v(u.memory_bytes),
                rss_bytes: u64v(u.anon_bytes),
                page_faults: u64v(u.page_faults),
                major_page_faults: u64v(u.major_page_faults),
                available_bytes: None,
            }),
            network: s.network.map(|n| cri::NetworkUsage {
                timestamp: now,
                default_interface: Some(cri::NetworkInterfaceUsage {
                    name: cni::IFNAME.into(),
                    rx_bytes: u64v(n.rx_bytes),
                    rx_errors: u64v(n.rx_errors),
                    tx_bytes: u64v(n.tx_bytes),
                    tx_errors: u64v(n.tx_errors),
                }),
                interfaces: Vec::new(),
            }),
            process: s.usage.as_ref().map(|u| cri::ProcessUsage {
                timestamp: now,
                process_count: u64v(u.tasks),
            }),
            containers: s
                .containers
                .iter()
                .map(|(c, st)| container_stats(c, st.as_ref()))
                .collect(),
        }),
        windows: None,
    }
}

/// An event as kubelet's evented PLEG wants it: with the pod's status and every
/// container of the pod as they are now.
fn event_response(
    server: &Server,
    ev: &super::events::ContainerEvent,
) -> cri::ContainerEventResponse {
    use super::events::EventKind;
    let kind = match ev.kind {
        EventKind::Created => cri::ContainerEventType::ContainerCreatedEvent,
        EventKind::Started => cri::ContainerEventType::ContainerStartedEvent,
        EventKind::Stopped => cri::ContainerEventType::ContainerStoppedEvent,
        EventKind::Deleted => cri::ContainerEventType::ContainerDeletedEvent,
    };
    cri::ContainerEventResponse {
        container_id: ev.container_id.clone(),
        container_event_type: kind as i32,
        created_at: ev.at_ns,
        pod_sandbox_status: server
            .sandbox(&ev.sandbox_id)
            .ok()
            .map(|s| sandbox_status(&s)),
        containers_statuses: server
            .containers()
            .iter()
            .filter(|c| c.sandbox_id == ev.sandbox_id)
            .map(container_status)
            .collect(),
    }
}

/// The RuntimeService.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub server: Arc<Server>,
    pub streaming: Arc<Streaming>,
}

fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!("{what} is not implemented by atoll-cri yet"))
}

#[tonic::async_trait]
impl cri::runtime_service_server::RuntimeService for Runtime {
    async fn version(
        &self,
        _: Request<cri::VersionRequest>,
    ) -> Result<Response<cri::VersionResponse>, Status> {
        Ok(Response::new(cri::VersionResponse {
            version: KUBE_API_VERSION.into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: "v1".into(),
        }))
    }

    async fn run_pod_sandbox(
        &self,
        request: Request<cri::RunPodSandboxRequest>,
    ) -> Result<Response<cri::RunPodSandboxResponse>, Status> {
        let r = request.into_inner();
        let config = r
            .config
            .ok_or_else(|| Status::invalid_argument("config is required"))?;
        let md = config
            .metadata
            .ok_or_else(|| Status::invalid_argument("config.metadata is required"))?;
        let linux = config.linux.unwrap_or_default();
        let res = linux.resources.clone().unwrap_or_default();
        let overhead = linux.overhead.clone().unwrap_or_default();
        let namespaces = linux
            .security_context
            .as_ref()
            .and_then(|c| c.namespace_options.clone())
            .unwrap_or_default();
        let host_network = namespaces.network == cri::NamespaceMode::Node as i32;
        for (what, mode) in [("pid", namespaces.pid), ("ipc", namespaces.ipc)] {
            if mode == cri::NamespaceMode::Node as i32 {
                return Err(Status::invalid_argument(format!(
                    "namespace_options.{what} = NODE: a microVM pod has its own kernel, so it cannot share the node's {what} namespace (hostPID/hostIPC pods need a runtime class without VMs)"
                )));
            }
        }
        let port_mappings = config
            .port_mappings
            .iter()
            .map(|p| cni::PortMapping {
                host_port: p.host_port,
                container_port: p.container_port,
                protocol: match cri::Protocol::try_from(p.protocol) {
                    Ok(cri::Protocol::Udp) => "udp",
                    Ok(cri::Protocol::Sctp) => "sctp",
                    _ => "tcp",
                }
                .into(),
                host_ip: p.host_ip.clone(),
            })
            .filter(|p| p.host_port > 0)
            .collect();
        let dns = config.dns_config.clone().unwrap_or_default();
        let req = SandboxRequest {
            meta: Meta {
                name: md.name,
                uid: md.uid,
                namespace: md.namespace,
                attempt: md.attempt,
            },
            labels: btree(config.labels),
            annotations: btree(config.annotations),
            hostname: config.hostname,
            log_directory: config.log_directory,
            runtime_handler: r.runtime_handler,
            memory_bytes: res
                .memory_limit_in_bytes
                .saturating_add(overhead.memory_limit_in_bytes.max(0)),
            cpu_quota: res.cpu_quota,
            cpu_period: res.cpu_period,
            host_network,
            port_mappings,
            dns_servers: dns.servers,
            dns_search: dns.searches,
            dns_options: dns.options,
            sysctls: linux.sysctls.clone().into_iter().collect(),
        };
        let server = Arc::clone(&self.server);
        let id = blocking(move || server.run_sandbox(req)).await?;
        Ok(Response::new(cri::RunPodSandboxResponse {
            pod_sandbox_id: id,
        }))
    }

    async fn stop_pod_sandbox(
        &self,
        request: Request<cri::StopPodSandboxRequest>,
    ) -> Result<Response<cri::StopPodSandboxResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        let server = Arc::clone(&self.server);
        blocking(move || server.stop_sandbox(&id)).await?;
        Ok(Response::new(cri::StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        request: Request<cri::RemovePodSandboxRequest>,
    ) -> Result<Response<cri::RemovePodSandboxResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        let server = Arc::clone(&self.server);
        blocking(move || server.remove_sandbox(&id)).await?;
        Ok(Response::new(cri::RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        request: Request<cri::PodSandboxStatusRequest>,
    ) -> Result<Response<cri::PodSandboxStatusResponse>, Status> {
        let r = request.into_inner();
        let s = self.server.sandbox(&r.pod_sandbox_id).map_err(status)?;
        let mut info = HashMap::new();
        if r.verbose {
            let v = serde_json::json!({
                "vcpus": s.vcpus,
                "memory_mib": s.mem_mib,
                "vmm_pid": s.vmm_pid,
                "pod_dir": s.pod_dir,
                "slots": s.slots,
                "message": s.message,
                // The end of the console of a VM that ended unasked (a guest
                // kernel's panic is there), kept until the sandbox is removed.
                "console": self.server.kept_console(&s.id),
            });
            info.insert("info".to_owned(), v.to_string());
            // The guest agent's own figures: what a long-running pod watches for
            // leaks (ExecSync probes, attach sessions).
            let server = Arc::clone(&self.server);
            let id = s.id.clone();
            let agent = match blocking(move || server.agent_stats(&id)).await {
                Ok(a) => serde_json::json!({
                    "rss_bytes": a.agent_rss_bytes,
                    "fds": a.agent_fds,
                    "threads": a.agent_threads,
                    "processes": a.agent_processes,
                    "connections": a.agent_connections,
                }),
                Err(e) => serde_json::json!({ "error": e.message() }),
            };
            info.insert("agent".to_owned(), agent.to_string());
        }
        Ok(Response::new(cri::PodSandboxStatusResponse {
            status: Some(sandbox_status(&s)),
            info,
            containers_statuses: Vec::new(),
            timestamp: 0,
        }))
    }

    async fn list_pod_sandbox(
        &self,
        request: Request<cri::ListPodSandboxRequest>,
    ) -> Result<Response<cri::ListPodSandboxResponse>, Status> {
        let f = request.into_inner().filter.unwrap_or_default();
        let items = self
            .server
            .sandboxes()
            .into_iter()
            .filter(|s| f.id.is_empty() || s.id == f.id)
            .filter(|s| {
                f.state
                    .as_ref()
                    .is_none_or(|v| v.state == sandbox_state(s.state))
            })
            .filter(|s| store::matches_labels(&s.labels, &f.label_selector))
            .map(|s| cri::PodSandbox {
                id: s.id.clone(),
                metadata: Some(sandbox_meta(&s.meta)),
                state: sandbox_state(s.state),
                created_at: s.created_ns,
                labels: hash(&s.labels),
                annotations: hash(&s.annotations),
                runtime_handler: s.runtime_handler.clone(),
            })
            .collect();
        Ok(Response::new(cri::ListPodSandboxResponse { items }))
    }

    async fn create_container(
        &self,
        request: Request<cri::CreateContainerRequest>,
    ) -> Result<Response<cri::CreateContainerResponse>, Status> {
        let r = request.into_inner();
        let config = r
            .config
            .ok_or_else(|| Status::invalid_argument("config is required"))?;
        let md = config
            .metadata
            .ok_or_else(|| Status::invalid_argument("config.metadata is required"))?;
        // kubelet mounts its own files into every container. They are left out: the
        // guest sets the pod's hostname and resolver itself, /etc/hosts is the
        // image's, and the termination message kubelet reads from its host file
        // stays empty. Other mounts are copied in or are pod tmpfs volumes.
        let mounts = host_mounts(&config.mounts)?;
        if let Some(d) = config.devices.first() {
            return Err(Status::invalid_argument(format!(
                "devices: host devices cannot reach a microVM pod (asked for {})",
                d.host_path
            )));
        }
        let linux = config.linux.unwrap_or_default();
        let sc = linux.security_context.as_ref();
        let req = ContainerRequest {
            sandbox_id: r.pod_sandbox_id,
            meta: Meta {
                name: md.name,
                attempt: md.attempt,
                ..Default::default()
            },
            labels: btree(config.labels),
            annotations: btree(config.annotations),
            image: config.image.map(|i| i.image).unwrap_or_default(),
            command: config.command,
            args: config.args,
            envs: config
                .envs
                .into_iter()
                .map(|kv| (kv.key, kv.value))
                .collect(),
            working_dir: config.working_dir,
            user: user(sc).map_err(status)?,
            supplemental_groups: supplemental_groups(sc).map_err(status)?,
            log_path: config.log_path,
            tty: config.tty,
            stdin: config.stdin,
            stdin_once: config.stdin_once,
            readonly_rootfs: sc.is_some_and(|s| s.readonly_rootfs),
            resources: resources(linux.resources.as_ref()),
            security: security(sc).map_err(status)?,
            mounts,
        };
        let server = Arc::clone(&self.server);
        let id = blocking(move || server.create_container(req)).await?;
        Ok(Response::new(cri::CreateContainerResponse {
            container_id: id,
        }))
    }

    async fn start_container(
        &self,
        request: Request<cri::StartContainerRequest>,
    ) -> Result<Response<cri::StartContainerResponse>, Status> {
        let id = request.into_inner().container_id;
        let server = Arc::clone(&self.server);
        blocking(move || server.start_container(&id)).await?;
        Ok(Response::new(cri::StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        request: Request<cri::StopContainerRequest>,
    ) -> Result<Response<cri::StopContainerResponse>, Status> {
        let r = request.into_inner();
        let server = Arc::clone(&self.server);
        blocking(move || server.stop_container(&r.container_id, r.timeout)).await?;
        Ok(Response::new(cri::StopContainerResponse {}))
    }

    async fn remove_container(
        &self,
        request: Request<cri::RemoveContainerRequest>,
    ) -> Result<Response<cri::RemoveContainerResponse>, Status> {
        let id = request.into_inner().container_id;
        let server = Arc::clone(&self.server);
        blocking(move || server.remove_container(&id)).await?;
        Ok(Response::new(cri::RemoveContainerResponse {}))
    }

    async fn list_containers(
        &self,
        request: Request<cri::ListContainersRequest>,
    ) -> Result<Response<cri::ListContainersResponse>, Status> {
        let f = request.into_inner().filter.unwrap_or_default();
        let containers = self
            .server
            .containers()
            .iter()
            .filter(|c| f.id.is_empty() || c.id == f.id)
            .filter(|c| f.pod_sandbox_id.is_empty() || c.sandbox_id == f.pod_sandbox_id)
            .filter(|c| {
                f.state
                    .as_ref()
                    .is_none_or(|v| v.state == container_state(c.state))
            })
            .filter(|c| store::matches_labels(&c.labels, &f.label_selector))
            .map(container_item)
            .collect();
        Ok(Response::new(cri::ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        request: Request<cri::ContainerStatusRequest>,
    ) -> Result<Response<cri::ContainerStatusResponse>, Status> {
        let r = request.into_inner();
        let c = self.server.container(&r.container_id).map_err(status)?;
        Ok(Response::new(cri::ContainerStatusResponse {
            status: Some(container_status(&c)),
            info: HashMap::new(),
        }))
    }

    async fn update_container_resources(
        &self,
        request: Request<cri::UpdateContainerResourcesRequest>,
    ) -> Result<Response<cri::UpdateContainerResourcesResponse>, Status> {
        let r = request.into_inner();
        let l = r.linux.unwrap_or_default();
        // What the guest's cgroup can carry: memory, CPU bandwidth (0: no limit).
        let resources = v1::Resources {
            memory_limit_bytes: u64::try_from(l.memory_limit_in_bytes).unwrap_or(0),
            cpu_quota_us: u64::try_from(l.cpu_quota).unwrap_or(0),
            cpu_period_us: u64::try_from(l.cpu_period).unwrap_or(0),
            pids_limit: 0,
        };
        let server = Arc::clone(&self.server);
        blocking(move || server.update_resources(&r.container_id, resources)).await?;
        Ok(Response::new(cri::UpdateContainerResourcesResponse {}))
    }

    async fn reopen_container_log(
        &self,
        request: Request<cri::ReopenContainerLogRequest>,
    ) -> Result<Response<cri::ReopenContainerLogResponse>, Status> {
        let id = request.into_inner().container_id;
        let server = Arc::clone(&self.server);
        blocking(move || server.reopen_log(&id)).await?;
        Ok(Response::new(cri::ReopenContainerLogResponse {}))
    }

    async fn exec_sync(
        &self,
        request: Request<cri::ExecSyncRequest>,
    ) -> Result<Response<cri::ExecSyncResponse>, Status> {
        let r = request.into_inner();
        let server = Arc::clone(&self.server);
        let (stdout, stderr, exit_code) =
            blocking(move || server.exec_sync(&r.container_id, r.cmd, r.timeout)).await?;
        Ok(Response::new(cri::ExecSyncResponse {
            stdout,
            stderr,
            exit_code,
        }))
    }

    async fn exec(
        &self,
        request: Request<cri::ExecRequest>,
    ) -> Result<Response<cri::ExecResponse>, Status> {
        let r = request.into_inner();
        let spec = ExecSpec {
            container_id: r.container_id,
            cmd: r.cmd,
            tty: r.tty,
            stdin: r.stdin,
            stdout: r.stdout,
            stderr: r.stderr,
        };
        spec.validate().map_err(status)?;
        let server = Arc::clone(&self.server);
        let id = spec.container_id.clone();
        blocking(move || server.exec_target(&id).map(|_| ())).await?;
        let url = self
            .streaming
            .url(StreamRequest::Exec(spec))
            .map_err(status)?;
        Ok(Response::new(cri::ExecResponse { url }))
    }

    async fn attach(
        &self,
        request: Request<cri::AttachRequest>,
    ) -> Result<Response<cri::AttachResponse>, Status> {
        let r = request.into_inner();
        let spec = AttachSpec {
            container_id: r.container_id,
            stdin: r.stdin,
            tty: r.tty,
            stdout: r.stdout,
            stderr: r.stderr,
        };
        spec.validate().map_err(status)?;
        let server = Arc::clone(&self.server);
        let id = spec.container_id.clone();
        let want_stdin = spec.stdin;
        blocking(move || {
            let c = server.container(&id)?;
            server.attach_hub(&id)?;
            if want_stdin && !c.stdin {
                return Err(CriError::InvalidArgument(format!(
                    "container {id} was not created with stdin: attach without it"
                )));
            }
            Ok(())
        })
        .await?;
        let url = self
            .streaming
            .url(StreamRequest::Attach(spec))
            .map_err(status)?;
        Ok(Response::new(cri::AttachResponse { url }))
    }

    async fn port_forward(
        &self,
        request: Request<cri::PortForwardRequest>,
    ) -> Result<Response<cri::PortForwardResponse>, Status> {
        let r = request.into_inner();
        let ports = r
            .port
            .iter()
            .map(|&p| u16::try_from(p).ok().filter(|&p| p != 0))
            .collect::<Option<Vec<u16>>>()
            .ok_or_else(|| Status::invalid_argument("a port is not between 1 and 65535"))?;
        let server = Arc::clone(&self.server);
        let id = r.pod_sandbox_id.clone();
        blocking(move || server.ready_sandbox(&id).map(|_| ())).await?;
        let url = self
            .streaming
            .url(StreamRequest::PortForward(PortForwardSpec {
                sandbox_id: r.pod_sandbox_id,
                ports,
            }))
            .map_err(status)?;
        Ok(Response::new(cri::PortForwardResponse { url }))
    }

    async fn container_stats(
        &self,
        request: Request<cri::ContainerStatsRequest>,
    ) -> Result<Response<cri::ContainerStatsResponse>, Status> {
        let id = request.into_inner().container_id;
        let server = Arc::clone(&self.server);
        let (c, s) = blocking(move || server.stats(&id)).await?;
        Ok(Response::new(cri::ContainerStatsResponse {
            stats: Some(container_stats(&c, s.as_ref())),
        }))
    }

    async fn list_container_stats(
        &self,
        request: Request<cri::ListContainerStatsRequest>,
    ) -> Result<Response<cri::ListContainerStatsResponse>, Status> {
        let f = request.into_inner().filter.unwrap_or_default();
        let ids: Vec<String> = self
            .server
            .containers()
            .iter()
            .filter(|c| c.state == ContainerState::Running)
            .filter(|c| f.id.is_empty() || c.id == f.id)
            .filter(|c| f.pod_sandbox_id.is_empty() || c.sandbox_id == f.pod_sandbox_id)
            .filter(|c| store::matches_labels(&c.labels, &f.label_selector))
            .map(|c| c.id.clone())
            .collect();
        let server = Arc::clone(&self.server);
        let stats = blocking(move || {
            Ok(ids
                .iter()
                .filter_map(|id| server.stats(id).ok())
                .map(|(c, s)| container_stats(&c, s.as_ref()))
                .collect())
        })
        .await?;
        Ok(Response::new(cri::ListContainerStatsResponse { stats }))
    }

    async fn pod_sandbox_stats(
        &self,
        request: Request<cri::PodSandboxStatsRequest>,
    ) -> Result<Response<cri::PodSandboxStatsResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        let server = Arc::clone(&self.server);
        let s = blocking(move || server.sandbox_stats(&id)).await?;
        Ok(Response::new(cri::PodSandboxStatsResponse {
            stats: Some(sandbox_stats(&s)),
        }))
    }

    async fn list_pod_sandbox_stats(
        &self,
        request: Request<cri::ListPodSandboxStatsRequest>,
    ) -> Result<Response<cri::ListPodSandboxStatsResponse>, Status> {
        let f = request.into_inner().filter.unwrap_or_default();
        let ids: Vec<String> = self
            .server
            .sandboxes()
            .into_iter()
            .filter(|s| s.state == SandboxState::Ready)
            .filter(|s| f.id.is_empty() || s.id == f.id)
            .filter(|s| store::matches_labels(&s.labels, &f.label_selector))
            .map(|s| s.id)
            .collect();
        let server = Arc::clone(&self.server);
        let stats = blocking(move || {
            Ok(ids
                .iter()
                .filter_map(|id| server.sandbox_stats(id).ok())
                .map(|s| sandbox_stats(&s))
                .collect())
        })
        .await?;
        Ok(Response::new(cri::ListPodSandboxStatsResponse { stats }))
    }

    async fn update_runtime_config(
        &self,
        _: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> Result<Response<cri::UpdateRuntimeConfigResponse>, Status> {
        // kubelet sends the node's pod CIDR; pod networking comes from CNI.
        Ok(Response::new(cri::UpdateRuntimeConfigResponse {}))
    }

    async fn status(
        &self,
        request: Request<cri::StatusRequest>,
    ) -> Result<Response<cri::StatusResponse>, Status> {
        let verbose = request.into_inner().verbose;
        let server = Arc::clone(&self.server);
        let ready = blocking(move || Ok(server.runtime_ready())).await?;
        let runtime = match &ready {
            Ok(()) => cri::RuntimeCondition {
                r#type: "RuntimeReady".into(),
                status: true,
                ..Default::default()
            },
            Err(why) => cri::RuntimeCondition {
                r#type: "RuntimeReady".into(),
                status: false,
                reason: "VmmNotReady".into(),
                message: why.clone(),
            },
        };
        let network = match cni::NetworkList::load(&self.server.cfg.cni.conf_dir) {
            Ok(_) => cri::RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: true,
                ..Default::default()
            },
            Err(e) => cri::RuntimeCondition {
                r#type: "NetworkReady".into(),
                status: false,
                reason: "NetworkPluginNotReady".into(),
                message: e.to_string(),
            },
        };
        let mut info = HashMap::new();
        if verbose {
            info.insert(
                "config".to_owned(),
                serde_json::json!({
                    "state_dir": self.server.cfg.state_dir,
                    "run_dir": self.server.cfg.run_dir,
                    "runtime_handlers": self.server.cfg.runtime_handlers,
                    "kernel": self.server.artifacts.kernel,
                    "vmm": self.server.artifacts.vmm,
                })
                .to_string(),
            );
        }
        let handlers = std::iter::once(String::new())
            .chain(self.server.cfg.runtime_handlers.iter().cloned())
            .map(|name| cri::RuntimeHandler {
                name,
                features: Some(cri::RuntimeHandlerFeatures {
                    recursive_read_only_mounts: false,
                    user_namespaces: false,
                }),
            })
            .collect();
        Ok(Response::new(cri::StatusResponse {
            status: Some(cri::RuntimeStatus {
                conditions: vec![runtime, network],
            }),
            info,
            runtime_handlers: handlers,
            features: None,
        }))
    }

    async fn checkpoint_container(
        &self,
        _: Request<cri::CheckpointContainerRequest>,
    ) -> Result<Response<cri::CheckpointContainerResponse>, Status> {
        Err(unimplemented("CheckpointContainer"))
    }

    type GetContainerEventsStream =
        tokio_stream::wrappers::ReceiverStream<Result<cri::ContainerEventResponse, Status>>;

    async fn get_container_events(
        &self,
        _: Request<cri::GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        let events = self.server.events.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let server = Arc::clone(&self.server);
        // A thread per subscriber bridges the server's (blocking) bus to the
        // stream; it ends when the client goes (checked at least every second).
        std::thread::spawn(move || loop {
            match events.recv_timeout(std::time::Duration::from_secs(1)) {
                Ok(ev) => {
                    if tx.blocking_send(Ok(event_response(&server, &ev))).is_err() {
                        return;
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !tx.is_closed() => {}
                Err(_) => return,
            }
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            rx,
        )))
    }

    async fn list_metric_descriptors(
        &self,
        _: Request<cri::ListMetricDescriptorsRequest>,
    ) -> Result<Response<cri::ListMetricDescriptorsResponse>, Status> {
        // As containerd: kubelet's CRI stats provider then uses the stats RPCs
        // (PodSandboxStats and ContainerStats), which atoll-cri serves.
        Err(Status::unimplemented(METRICS_UNIMPLEMENTED))
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> Result<Response<cri::ListPodSandboxMetricsResponse>, Status> {
        Err(Status::unimplemented(METRICS_UNIMPLEMENTED))
    }

    async fn runtime_config(
        &self,
        _: Request<cri::RuntimeConfigRequest>,
    ) -> Result<Response<cri::RuntimeConfigResponse>, Status> {
        // Containers live in the guest's own cgroup v2 tree, written directly.
        Ok(Response::new(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: cri::CgroupDriver::Cgroupfs as i32,
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_mounts_keep_read_only_paths_and_empty_dirs_and_refuse_the_rest() {
        let m = |container: &str, host: &str, readonly: bool| cri::Mount {
            container_path: container.into(),
            host_path: host.into(),
            readonly,
            ..Default::default()
        };
        let empty_dir = "/var/lib/kubelet/pods/u/volumes/kubernetes.io~empty-dir/cache";
        let got = host_mounts(&[
            m("/etc/hosts", "/var/lib/kubelet/pods/u/etc-hosts", false),
            m("/dev/termination-log", "/var/lib/kubelet/pods/u/c/x", false),
            m(
                "/etc/cfg",
                "/var/lib/kubelet/pods/u/volumes/kubernetes.io~configmap/c",
                true,
            ),
            m("/cache", empty_dir, false),
        ])
        .unwrap();
        assert_eq!(got.len(), 2, "kubelet's own files are left out: {got:?}");
        assert!(got[0].readonly && !got[0].is_empty_dir());
        assert!(!got[1].readonly && got[1].is_empty_dir());

        let refused = |mount: cri::Mount| host_mounts(&[mount]).unwrap_err().message().to_owned();
        assert!(refused(m("/data", "/srv/data", false)).contains("is writable"));
        assert!(refused(m("/data", "relative", true)).contains("not absolute"));
        let mut bidi = m("/x", "/srv", true);
        bidi.propagation = cri::MountPropagation::PropagationBidirectional as i32;
        assert!(refused(bidi).contains("bidirectional"));
        let mut mapped = m("/x", "/srv", true);
        mapped.uid_mappings.push(cri::IdMapping {
            host_id: 1000,
            container_id: 0,
            length: 1,
        });
        assert!(refused(mapped).contains("id-mapped"));
        let mut image = m("/x", "", false);
        image.image = Some(cri::ImageSpec {
            image: "sha256:ab".into(),
            ..Default::default()
        });
        let got = host_mounts(&[image.clone()]).unwrap();
        assert_eq!(
            (got[0].image.as_str(), got[0].readonly),
            ("sha256:ab", true)
        );
        image.host_path = "/srv".into();
        assert!(refused(image).contains("an image volume names an image and no host path"));
    }

    #[test]
    fn security_maps_profiles_capabilities_and_users() {
        let s = security(None).unwrap();
        assert_eq!(s.seccomp, v1::security::Seccomp::Unconfined as i32);
        let sc = cri::LinuxContainerSecurityContext {
            seccomp: Some(cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
                localhost_ref: String::new(),
            }),
            capabilities: Some(cri::Capability {
                add_capabilities: vec!["NET_ADMIN".into()],
                drop_capabilities: vec!["ALL".into()],
                ..Default::default()
            }),
            run_as_user: Some(cri::Int64Value { value: 1000 }),
            run_as_group: Some(cri::Int64Value { value: 100 }),
            ..Default::default()
        };
        let s = security(Some(&sc)).unwrap();
        assert_eq!(s.seccomp, v1::security::Seccomp::RuntimeDefault as i32);
        assert_eq!(s.add_capabilities, vec!["CAP_NET_ADMIN"]);
        assert_eq!(s.drop_capabilities, vec!["ALL"]);
        assert_eq!(user(Some(&sc)).unwrap().as_deref(), Some("1000:100"));
        assert_eq!(user(None).unwrap(), None);
        let by_name = cri::LinuxContainerSecurityContext {
            run_as_username: "www".into(),
            run_as_group: Some(cri::Int64Value { value: 33 }),
            masked_paths: vec!["/proc/kcore".into()],
            readonly_paths: vec!["/proc/sys".into()],
            supplemental_groups: vec![1234, 5678],
            ..Default::default()
        };
        assert_eq!(user(Some(&by_name)).unwrap().as_deref(), Some("www:33"));
        assert!(!security(Some(&by_name)).unwrap().share_pod_pid);
        let ns = |pid: cri::NamespaceMode| cri::LinuxContainerSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                pid: pid as i32,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert!(
            security(Some(&ns(cri::NamespaceMode::Pod)))
                .unwrap()
                .share_pod_pid
        );
        assert!(
            !security(Some(&ns(cri::NamespaceMode::Container)))
                .unwrap()
                .share_pod_pid
        );
        assert!(security(Some(&ns(cri::NamespaceMode::Node))).is_err());
        assert!(security(Some(&ns(cri::NamespaceMode::Target))).is_err());
        let apparmor = |t: Option<cri::security_profile::ProfileType>, legacy: &str| {
            #[allow(deprecated)]
            let sc = cri::LinuxContainerSecurityContext {
                apparmor: t.map(|t| cri::SecurityProfile {
                    profile_type: t as i32,
                    localhost_ref: "k8s-deny-write".into(),
                }),
                apparmor_profile: legacy.into(),
                ..Default::default()
            };
            security(Some(&sc))
        };
        use cri::security_profile::ProfileType;
        assert!(apparmor(Some(ProfileType::RuntimeDefault), "runtime/default").is_ok());
        assert!(apparmor(Some(ProfileType::Unconfined), "unconfined").is_ok());
        let e = apparmor(Some(ProfileType::Localhost), "").unwrap_err();
        assert!(
            e.to_string()
                .contains("apparmor profile \"k8s-deny-write\""),
            "{e}"
        );
        // The deprecated string counts only without the field.
        assert!(apparmor(None, "localhost/x").is_err());
        assert!(apparmor(None, "runtime/default").is_ok());
        assert!(apparmor(Some(ProfileType::RuntimeDefault), "localhost/x").is_ok());
        assert_eq!(supplemental_groups(Some(&by_name)).unwrap(), [1234, 5678]);
        let s = security(Some(&by_name)).unwrap();
        assert_eq!(
            (s.masked_paths, s.readonly_paths),
            (vec!["/proc/kcore".to_owned()], vec!["/proc/sys".to_owned()])
        );
        // The CRI: run_as_group without a user MUST be an error.
        let group_only = cri::LinuxContainerSecurityContext {
            run_as_group: Some(cri::Int64Value { value: 100 }),
            ..Default::default()
        };
        let e = user(Some(&group_only)).unwrap_err();
        assert!(matches!(e, CriError::InvalidArgument(_)), "{e}");
        assert!(
            e.to_string()
                .contains("run_as_group is set without run_as_user"),
            "{e}"
        );
        let negative = cri::LinuxContainerSecurityContext {
            run_as_user: Some(cri::Int64Value { value: -1 }),
            supplemental_groups: vec![-5],
            ..Default::default()
        };
        assert!(user(Some(&negative)).is_err());
        assert!(supplemental_groups(Some(&negative)).is_err());
        let bad = cri::LinuxContainerSecurityContext {
            seccomp: Some(cri::SecurityProfile {
                profile_type: cri::security_profile::ProfileType::Localhost as i32,
                localhost_ref: "/nonexistent/profile.json".into(),
            }),
            ..Default::default()
        };
        let e = security(Some(&bad)).unwrap_err().to_string();
        assert!(
            e.starts_with("seccomp profile /nonexistent/profile.json: "),
            "{e}"
        );
    }

    #[test]
    fn limits_map_to_the_guest_cgroup() {
        let r = resources(Some(&cri::LinuxContainerResources {
            memory_limit_in_bytes: 64 << 20,
            cpu_quota: 50_000,
            cpu_period: 0,
            ..Default::default()
        }));
        assert_eq!(
            (r.memory_limit_bytes, r.cpu_quota_us, r.cpu_period_us),
            (64 << 20, 50_000, 100_000)
        );
        assert_eq!(resources(None), v1::Resources::default());
    }
}
