//! Pod templates: the warm pool. A template is a VM booted once to "agent ready",
//! quiesced and snapshotted; every pod of that shape starts as a restored clone of
//! it instead of booting a kernel.
//!
//! One template per (kernel, initramfs, atoll-vmm, vCPUs, memory, net or not),
//! keyed by a hash of those inputs (files by device, inode, size and modification
//! time: a rebuilt kernel or VMM makes a new key) and kept under
//! `$ATOLL_CACHE/templates/<key>/`: `state` and `memory` (the snapshot), `slot.img`
//! (the empty disk behind the spare slots), `working-set` (the guest pages a restored
//! clone touches until its agent has taken its identity, recorded from one probe
//! restore and prefetched by every clone) and `meta.json`, which is written last
//! and marks a template as complete. The template VM has [`SLOTS`] spare read-only
//! disks of size 0 (`slot0`..); a clone gets the pod's disks in them at restore,
//! under the pod's serials, and the guest re-reads their size. Concurrent builders
//! serialise on `<key>.lock`; a build happens in `<key>.tmp-<pid>` and is renamed
//! into place, so a crash never leaves a half template behind.

use std::fs::{self, File};
use std::io;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Boot, Disk, Pod, PodConfig, PodError, API_SOCK, GUEST_CMDLINE};

/// Spare disk slots of every template.
pub const SLOTS: usize = 4;
/// Bumped when what a template holds, or how it is built, changes.
const TEMPLATE_FORMAT: u32 = 1;
/// Templates kept; the least recently built go first.
const KEEP: usize = 8;
/// How long one control-API call of the template build may take.
const API_TIMEOUT: Duration = Duration::from_secs(120);

/// What makes a template.
#[derive(Debug, Clone)]
pub struct TemplateSpec {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub vmm: PathBuf,
    pub vcpus: u8,
    pub mem_mib: u64,
    /// The template VM has a net device (pods with a tap).
    pub net: bool,
}

/// A complete template on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub dir: PathBuf,
    pub key: String,
    pub net: bool,
}

/// `meta.json`: written last; a directory without it is not a template.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    pub format: u32,
    pub key: String,
    pub vcpus: u8,
    pub mem_mib: u64,
    pub net: bool,
    pub slots: usize,
    /// Time to boot to "agent ready" and take the snapshot, in milliseconds.
    pub build_ms: u64,
    /// What the snapshot wrote (atoll-vmm's answer to the snapshot request).
    pub snapshot: serde_json::Value,
    /// What the probe restore recorded (atoll-vmm's answer: ranges, bytes).
    #[serde(default)]
    pub working_set: serde_json::Value,
}

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("booting the pod template VM")]
    Boot(#[source] Box<PodError>),
    #[error("quiescing the pod template's agent")]
    Quiesce(#[source] crate::agent::AgentError),
    #[error("atoll-vmm refused `{request}` while building the pod template: {answer}")]
    Api { request: String, answer: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TemplateError + '_ {
    move |source| TemplateError::Io {
        path: path.to_owned(),
        source,
    }
}

/// `$ATOLL_CACHE/templates` (default `/var/cache/atoll/templates`).
pub fn templates_dir() -> PathBuf {
    std::env::var_os("ATOLL_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/atoll"))
        .join("templates")
}

impl TemplateSpec {
    /// The template key: a hash of every input.
    pub fn key(&self) -> io::Result<String> {
        let mut h = Sha256::new();
        h.update(format!(
            "format={TEMPLATE_FORMAT} vcpus={} mem={} net={} slots={SLOTS} cmdline={GUEST_CMDLINE}\n",
            self.vcpus, self.mem_mib, self.net
        ));
        for f in [&self.kernel, &self.initramfs, &self.vmm] {
            let m = fs::metadata(f)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", f.display())))?;
            h.update(format!(
                "{} dev={} ino={} size={} mtime={}.{}\n",
                f.display(),
                m.dev(),
                m.ino(),
                m.size(),
                m.mtime(),
                m.mtime_nsec()
            ));
        }
        Ok(hex::encode(&h.finalize()[..8]))
    }
}

impl TemplateSpec {
    /// The template a pod of `cfg`'s shape is cloned from.
    pub fn for_pod(cfg: &PodConfig) -> Self {
        Self {
            kernel: cfg.kernel.clone(),
            initramfs: cfg.initramfs.clone(),
            vmm: cfg.vmm.clone(),
            vcpus: cfg.vcpus,
            mem_mib: cfg.mem_mib,
            // A pod with a tap (its own, or one made for it in a CNI namespace)
            // needs a template with a net device.
            net: cfg.net || cfg.network.is_some(),
        }
    }

    /// A pod of this shape with the control API, for building the template.
    fn pod_config(&self, id: &str, run_dir: &Path) -> PodConfig {
        let mut cfg = PodConfig::new(
            id,
            self.kernel.clone(),
            self.initramfs.clone(),
            self.vmm.clone(),
        );
        cfg.vcpus = self.vcpus;
        cfg.mem_mib = self.mem_mib;
        cfg.run_dir = run_dir.to_owned();
        cfg.net = self.net;
        cfg.api = true;
        cfg
    }
}

impl Template {
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn memory(&self) -> PathBuf {
        self.dir.join("memory")
    }

    pub fn working_set(&self) -> PathBuf {
        self.dir.join("working-set")
    }

    /// Whether a pod with these disks can start from a template: at most
    /// [`SLOTS`] disks, all read-only (the slots are).
    pub fn fits(disks: &[Disk]) -> bool {
        disks.len() <= SLOTS && disks.iter().all(|d| d.read_only)
    }

    /// [`Template::fits`] for a pod about to start (its layers disk, written at
    /// start, counts too).
    pub fn fits_pod(cfg: &PodConfig) -> bool {
        Self::fits(&cfg.disks) && cfg.disks.len() + usize::from(cfg.layers_disk.is_some()) <= SLOTS
    }

    /// atoll-vmm's arguments to restore a clone for the pod in `pod_dir`: its own
    /// vsock socket, its disks in the first slots (the rest keep the empty disk),
    /// its tap.
    pub fn restore_args(&self, pod_dir: &Path, disks: &[Disk], tap: Option<&str>) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--restore".into(),
            self.state().display().to_string(),
            "--mem-file".into(),
            self.memory().display().to_string(),
            "--vsock-uds".into(),
            pod_dir.join("vsock.sock").display().to_string(),
            "--metrics".into(),
            pod_dir.join("vmm-metrics.json").display().to_string(),
        ];
        let empty = self.dir.join("slot.img");
        for slot in 0..SLOTS {
            let swap = match disks.get(slot) {
                Some(d) => format!("slot{slot}={},id={}", d.path.display(), d.serial),
                None => format!("slot{slot}={}", empty.display()),
            };
            a.push("--disk-path".into());
            a.push(swap);
        }
        if let Some(t) = tap {
            a.push("--net-tap".into());
            a.push(t.to_owned());
        }
        let ws = self.working_set();
        if ws.is_file() {
            a.push("--working-set".into());
            a.push(ws.display().to_string());
        }
        a
    }

    /// atoll-vmm's arguments for a VMM that waits, jailed, for a clone of this
    /// template for the pod in `pod_dir` ([`Template::load_body`]).
    pub fn standby_args(pod_dir: &Path) -> Vec<String> {
        vec![
            "--standby".into(),
            "--api-sock".into(),
            pod_dir.join(super::API_SOCK).display().to_string(),
            "--vsock-uds".into(),
            pod_dir.join("vsock.sock").display().to_string(),
            "--metrics".into(),
            pod_dir.join("vmm-metrics.json").display().to_string(),
        ]
    }

    /// The body of the `PUT /snapshot/load` that makes a VMM started with
    /// [`Template::standby_args`] a clone: the pod's disks in the first slots (the
    /// rest get the empty disk, handed over like the others: a jailed VMM opens no
    /// path), its tap, the working set; running at once when `resume`.
    pub fn load_body(&self, disks: &[Disk], tap: Option<&str>, resume: bool) -> String {
        let empty = self.dir.join("slot.img");
        let drives: Vec<serde_json::Value> = (0..SLOTS)
            .map(|slot| match disks.get(slot) {
                Some(d) => serde_json::json!({
                    "drive_id": format!("slot{slot}"),
                    "path_on_host": d.path,
                    "id": d.serial,
                }),
                None => serde_json::json!({
                    "drive_id": format!("slot{slot}"),
                    "path_on_host": empty,
                }),
            })
            .collect();
        let mut body = serde_json::json!({
            "snapshot_path": self.state(),
            "mem_file_path": self.memory(),
            "drives": drives,
            "resume_vm": resume,
        });
        let ws = self.working_set();
        if ws.is_file() {
            body["working_set_path"] = serde_json::json!(ws);
        }
        if let Some(t) = tap {
            body["net_tap"] = serde_json::json!(t);
        }
        body.to_string()
    }

    /// The body of the `PUT /snapshot/preload` that prepares a VMM started with
    /// [`Template::standby_args`] for this template's clones: the snapshot's files
    /// and working set, the parts of [`Template::load_body`] every clone shares.
    pub fn preload_body(&self) -> String {
        let mut body = serde_json::json!({
            "snapshot_path": self.state(),
            "mem_file_path": self.memory(),
        });
        let ws = self.working_set();
        if ws.is_file() {
            body["working_set_path"] = serde_json::json!(ws);
        }
        body.to_string()
    }

    /// Removes the template (it could not be restored).
    pub fn discard(&self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The complete template for `spec`, if one is there already (nothing is built).
pub fn find(spec: &TemplateSpec) -> Option<Template> {
    let key = spec.key().ok()?;
    existing(&templates_dir().join(&key), &key)
}

/// The complete template at `dir`, if `meta.json` says it is one for `key`.
fn existing(dir: &Path, key: &str) -> Option<Template> {
    let meta: Meta = serde_json::from_slice(&fs::read(dir.join("meta.json")).ok()?).ok()?;
    let whole = meta.format == TEMPLATE_FORMAT
        && meta.key == key
        && meta.slots == SLOTS
        && dir.join("state").is_file()
        && dir.join("memory").is_file()
        && dir.join("slot.img").is_file()
        && dir.join("working-set").is_file();
    whole.then(|| Template {
        dir: dir.to_owned(),
        key: key.to_owned(),
        net: meta.net,
    })
}

/// What [`ensure`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Ensured {
    /// The template was there.
    Found,
    /// It was built now.
    Built(Meta),
}

/// The template for `spec`, built (once, whoever asks first) when missing. Pods are
/// spawned under `run_dir`.
pub fn ensure(spec: &TemplateSpec, run_dir: &Path) -> Result<(Template, Ensured), TemplateError> {
    let root = templates_dir();
    let key = spec.key().map_err(io_err(&spec.kernel))?;
    let dir = root.join(&key);
    if let Some(t) = existing(&dir, &key) {
        return Ok((t, Ensured::Found));
    }
    fs::create_dir_all(&root).map_err(io_err(&root))?;
    let lock_path = root.join(format!("{key}.lock"));
    let lock = File::create(&lock_path).map_err(io_err(&lock_path))?;
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| io_err(&lock_path)(e.into()))?;
    // Someone else may have built it while we waited.
    if let Some(t) = existing(&dir, &key) {
        return Ok((t, Ensured::Found));
    }
    let _ = fs::remove_dir_all(&dir);
    let tmp = root.join(format!("{key}.tmp-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    let built = build(spec, &key, &tmp, run_dir);
    let meta = match built {
        Ok(m) => m,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
    prune(&root, KEEP);
    let t = Template {
        dir,
        key,
        net: spec.net,
    };
    Ok((t, Ensured::Built(meta)))
}

/// Boots the template VM in `tmp`, waits for its agent, quiesces it and snapshots it.
fn build(
    spec: &TemplateSpec,
    key: &str,
    tmp: &Path,
    run_dir: &Path,
) -> Result<Meta, TemplateError> {
    let t0 = Instant::now();
    let slot = tmp.join("slot.img");
    File::create(&slot).map_err(io_err(&slot))?;
    let id = format!("template-{key}-{}", std::process::id());
    let mut cfg = spec.pod_config(&id, run_dir);
    cfg.boot = Boot::Cold;
    cfg.disks = (0..SLOTS)
        .map(|n| Disk {
            path: slot.clone(),
            serial: format!("slot{n}"),
            read_only: true,
        })
        .collect();
    let mut pod = Pod::start(cfg).map_err(|e| TemplateError::Boot(Box::new(e)))?;
    pod.control()
        .and_then(|c| c.quiesce())
        .map_err(TemplateError::Quiesce)?;
    // Connections open at the snapshot would be reset in every clone anyway.
    pod.control = None;
    let api = pod.dir().join(API_SOCK);
    api_call(&api, "PATCH", "/vm", r#"{"state":"Paused"}"#)?;
    let body = serde_json::json!({
        "snapshot_path": tmp.join("state"),
        "mem_file_path": tmp.join("memory"),
    })
    .to_string();
    let snapshot = api_call(&api, "PUT", "/snapshot/create", &body)?;
    let _ = api_call(&api, "PUT", "/actions", r#"{"action_type":"Stop"}"#);
    let _ = pod.reap(super::VMM_EXIT_TIMEOUT);
    drop(pod);
    let working_set = record_working_set(spec, key, tmp, run_dir)?;
    let meta = Meta {
        format: TEMPLATE_FORMAT,
        key: key.to_owned(),
        vcpus: spec.vcpus,
        mem_mib: spec.mem_mib,
        net: spec.net,
        slots: SLOTS,
        build_ms: t0.elapsed().as_millis() as u64,
        snapshot: serde_json::from_str(&snapshot).unwrap_or_default(),
        working_set: serde_json::from_str(&working_set).unwrap_or_default(),
    };
    let path = tmp.join("meta.json");
    let mut f = File::create(&path).map_err(io_err(&path))?;
    f.write_all(&serde_json::to_vec_pretty(&meta).unwrap_or_default())
        .and_then(|()| f.sync_all())
        .map_err(io_err(&path))?;
    Ok(meta)
}

/// Restores the fresh snapshot in `tmp` once, as a pod start does (agent connected,
/// Restored answered), and records the guest pages resident then as the template's
/// working set. Returns atoll-vmm's answer.
fn record_working_set(
    spec: &TemplateSpec,
    key: &str,
    tmp: &Path,
    run_dir: &Path,
) -> Result<String, TemplateError> {
    let probe = Template {
        dir: tmp.to_owned(),
        key: key.to_owned(),
        net: false,
    };
    let id = format!("template-{key}-{}-probe", std::process::id());
    let mut cfg = spec.pod_config(&id, run_dir);
    cfg.boot = Boot::Template(probe.clone());
    let mut pod = Pod::start(cfg).map_err(|e| TemplateError::Boot(Box::new(e)))?;
    let api = pod.dir().join(API_SOCK);
    let body = serde_json::json!({ "path": probe.working_set() }).to_string();
    let answer = api_call(&api, "PUT", "/snapshot/working-set", &body);
    let _ = api_call(&api, "PUT", "/actions", r#"{"action_type":"Stop"}"#);
    let _ = pod.reap(super::VMM_EXIT_TIMEOUT);
    answer
}

/// One request to atoll-vmm's control API (docs/vmm-api.md); the answer's body on a
/// 2xx status. The files it names travel as descriptors (the VMM is jailed and
/// opens none itself); files it writes land only when it succeeds.
pub fn api_call(
    sock: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> Result<String, TemplateError> {
    let request = format!("{method} {path}");
    match atoll_vmm::api::call(sock, method, path, body, API_TIMEOUT) {
        Ok((status, body)) if (200..300).contains(&status) => Ok(body),
        Ok((status, body)) => Err(TemplateError::Api {
            request,
            answer: format!("HTTP {status} {body}"),
        }),
        Err(e) => Err(TemplateError::Api {
            request,
            answer: e.to_string(),
        }),
    }
}

/// Keeps the `keep` most recently built templates under `root`.
fn prune(root: &Path, keep: usize) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    let mut templates: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| e.path().join("meta.json").is_file())
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    templates.sort();
    let excess = templates.len().saturating_sub(keep);
    for (_, dir) in templates.into_iter().take(excess) {
        let _ = fs::remove_dir_all(&dir);
        let mut lock = dir.into_os_string();
        lock.push(".lock");
        let _ = fs::remove_file(lock);
    }
}

/// Whether atoll-vmm's one-line error says the snapshot itself is unusable (then
/// the template is rebuilt), rather than the host or the pod's own inputs.
pub fn is_snapshot_error(line: &str) -> bool {
    [
        "snapshot state file",
        "does not belong to this snapshot",
        "is a snapshot of format version",
        "cannot restore the snapshot",
        "cannot restore the VM from the snapshot",
        "cannot restore virtio device",
        "saved state of vCPU",
    ]
    .iter()
    .any(|s| line.contains(s))
}

/// How long a restored clone's agent gets to answer on the first try. A clone answers
/// in milliseconds on hardware and within seconds under the nested node's emulation
/// with ten restoring at once; one that has not answered by then is replaced.
pub const CLONE_FIRST_ANSWER: Duration = Duration::from_secs(20);

/// Whether `e` means the clone itself failed before any of the pod's code ran in it
/// (its guest crashed, the VMM ended, the agent never answered or could not take
/// the clone's identity), so that a fresh clone of the same template may be tried.
fn clone_failed_early(e: &PodError) -> bool {
    match e {
        PodError::VmmFailed(line) => !is_snapshot_error(line),
        PodError::VmmExited { .. } | PodError::AgentTimeout { .. } | PodError::Restored(_) => true,
        _ => false,
    }
}

/// Starts the pod as a clone of the template for its shape, building the template
/// first if needed. A template that cannot be restored (corrupt, from another
/// atoll-vmm) is rebuilt once, and a clone that fails before its agent has answered
/// (see [`clone_failed_early`]) is replaced by a fresh one once; each with one line
/// on stderr saying so.
pub fn start_pod(cfg: PodConfig, spec: &TemplateSpec) -> Result<Pod, PodError> {
    let full_wait = cfg.agent_timeout;
    let mut first = cfg.clone();
    first.agent_timeout = full_wait.min(CLONE_FIRST_ANSWER);
    match start_clone(first, spec) {
        Err(e) if clone_failed_early(&e) => {
            let why = e.to_string();
            let why = why.lines().next().unwrap_or_default();
            eprintln!("atoll: the restored clone failed before its agent answered ({why}); starting another clone");
            tracing::warn!("pod {}: clone replaced: {e}", cfg.id);
            let mut again = cfg;
            again.agent_timeout = full_wait;
            start_clone(again, spec)
        }
        other => other,
    }
}

fn start_clone(mut cfg: PodConfig, spec: &TemplateSpec) -> Result<Pod, PodError> {
    let (t, ensured) = ensure(spec, &cfg.run_dir)?;
    if let Ensured::Built(meta) = &ensured {
        tracing::info!(
            "built pod template {} in {} ms",
            t.dir.display(),
            meta.build_ms
        );
    }
    cfg.boot = Boot::Template(t.clone());
    match Pod::start(cfg.clone()) {
        Err(PodError::VmmFailed(line)) if is_snapshot_error(&line) => {
            eprintln!(
                "atoll: the pod template {} cannot be restored ({line}); rebuilding it",
                t.dir.display()
            );
            t.discard();
            let (t, _) = ensure(spec, &cfg.run_dir)?;
            cfg.boot = Boot::Template(t);
            Pod::start(cfg)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(dir: &Path) -> TemplateSpec {
        for f in ["vmlinux", "initramfs", "vmm"] {
            fs::write(dir.join(f), f).unwrap();
        }
        TemplateSpec {
            kernel: dir.join("vmlinux"),
            initramfs: dir.join("initramfs"),
            vmm: dir.join("vmm"),
            vcpus: 1,
            mem_mib: 256,
            net: false,
        }
    }

    #[test]
    fn only_a_clone_that_failed_before_answering_is_replaced() {
        let crash = PodError::VmmFailed(
            "atoll-vmm: error: the guest triple-faulted before reporting an exit status".into(),
        );
        assert!(clone_failed_early(&crash));
        let timeout = PodError::AgentTimeout {
            waited: Duration::from_secs(20),
            threads: "vcpu0 S 1ms".into(),
            log: "/x".into(),
            tail: String::new(),
        };
        assert!(clone_failed_early(&timeout));
        // A damaged template is rebuilt instead; a cancelled start stays cancelled.
        let damaged = PodError::VmmFailed(
            "atoll-vmm: error: cannot restore the VM from the snapshot: bad CRC".into(),
        );
        assert!(!clone_failed_early(&damaged));
        assert!(!clone_failed_early(&PodError::Cancelled(15)));
    }

    #[test]
    fn template_key_changes_with_every_input() {
        let dir = tempfile::tempdir().unwrap();
        let s = spec(dir.path());
        let k = s.key().unwrap();
        assert_eq!(k, s.key().unwrap(), "stable");
        assert_eq!(k.len(), 16);
        let mut other = s.clone();
        other.mem_mib = 512;
        assert_ne!(other.key().unwrap(), k);
        let mut other = s.clone();
        other.net = true;
        assert_ne!(other.key().unwrap(), k);
        // A rebuilt kernel (new size) is a new template.
        fs::write(dir.path().join("vmlinux"), "a rebuilt kernel").unwrap();
        assert_ne!(s.key().unwrap(), k);
        fs::remove_file(dir.path().join("vmm")).unwrap();
        assert!(s.key().is_err(), "a missing input is an error, not a key");
    }

    #[test]
    fn template_restore_args_fill_slots_in_order_and_keep_the_rest_empty() {
        let t = Template {
            dir: "/c/templates/k".into(),
            key: "k".into(),
            net: true,
        };
        let disks = vec![Disk {
            path: "/s/img.erofs".into(),
            serial: "img0".into(),
            read_only: true,
        }];
        let a = t
            .restore_args(Path::new("/run/pods/p"), &disks, Some("atlp"))
            .join(" ");
        assert!(
            a.starts_with("--restore /c/templates/k/state --mem-file /c/templates/k/memory"),
            "{a}"
        );
        assert!(a.contains("--vsock-uds /run/pods/p/vsock.sock"), "{a}");
        assert!(a.contains("--disk-path slot0=/s/img.erofs,id=img0"), "{a}");
        assert!(
            a.contains("--disk-path slot3=/c/templates/k/slot.img"),
            "{a}"
        );
        assert!(a.ends_with("--net-tap atlp"), "{a}");
        assert!(Template::fits(&disks));
        let rw = vec![Disk {
            read_only: false,
            ..disks[0].clone()
        }];
        assert!(!Template::fits(&rw), "slots are read-only");
        assert!(!Template::fits(&vec![disks[0].clone(); SLOTS + 1]));
    }

    #[test]
    fn template_only_whole_ones_count_and_prune_keeps_the_newest() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("k1");
        fs::create_dir(&dir).unwrap();
        for f in ["state", "memory", "slot.img", "working-set"] {
            fs::write(dir.join(f), b"").unwrap();
        }
        assert!(existing(&dir, "k1").is_none(), "no meta.json: half built");
        let meta = Meta {
            format: TEMPLATE_FORMAT,
            key: "k1".into(),
            vcpus: 1,
            mem_mib: 256,
            net: false,
            slots: SLOTS,
            build_ms: 1,
            snapshot: serde_json::Value::Null,
            working_set: serde_json::Value::Null,
        };
        fs::write(dir.join("meta.json"), serde_json::to_vec(&meta).unwrap()).unwrap();
        assert!(existing(&dir, "k1").is_some());
        assert!(existing(&dir, "k2").is_none(), "another key");
        fs::remove_file(dir.join("memory")).unwrap();
        assert!(existing(&dir, "k1").is_none(), "memory file gone");
        for n in 0..5 {
            let d = root.path().join(format!("t{n}"));
            fs::create_dir(&d).unwrap();
            fs::write(d.join("meta.json"), b"{}").unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
        prune(root.path(), 2);
        let left: Vec<_> = fs::read_dir(root.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .filter(|n| n.starts_with('t'))
            .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert!(left.contains(&"t4".to_string()));
    }

    #[test]
    fn snapshot_errors_are_told_from_host_errors() {
        assert!(is_snapshot_error(
            "atoll-vmm: error: /x/state is not a usable Atoll snapshot state file: its checksum does not match"
        ));
        assert!(is_snapshot_error(
            "atoll-vmm: error: /x/state is a snapshot of format version 2, this atoll-vmm reads version 1"
        ));
        assert!(!is_snapshot_error(
            "atoll-vmm: error: /dev/kvm is KVM-PVM (module kvm_pvm): ..."
        ));
    }
}
