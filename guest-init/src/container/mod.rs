//! Containers through youki's `libcontainer`: the rootfs from an image disk (erofs or
//! ext4, read-only, under a tmpfs overlay), the OCI runtime spec built from a
//! [`v1::CreateContainer`], and create / start / exec / signal / remove.
//!
//! The agent (`crate::agent`) owns processes (waiting, stdio streaming); this module
//! owns container state. Every method returns a [`RuntimeError`] whose
//! [`RuntimeError::code`] becomes the protocol error code.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use atoll_agent_proto::v1;
use oci_spec::runtime::LinuxSeccomp;
use v1::error::Code;

pub mod forked;
pub mod layers;
pub mod libcontainer;
pub mod pidns;
pub mod rootfs;
pub mod seccomp;
pub mod spec;
pub mod stats;
pub mod user;

use self::libcontainer::Engine;
use self::rootfs::{Mounts, RootfsError};
use self::spec::{MountSource, SpecError, SpecPaths};
use crate::syscall::{LinuxSyscall, Syscall};

/// How a new process gets its stdio.
#[derive(Debug)]
pub enum Stdio {
    /// The child ends of pipes (or `/dev/null` opened by the agent). `stdin` absent:
    /// `/dev/null`.
    Pipes {
        /// Read end for the process's stdin.
        stdin: Option<OwnedFd>,
        /// Write end for stdout.
        stdout: OwnedFd,
        /// Write end for stderr.
        stderr: OwnedFd,
    },
    /// A pseudo-terminal of that size; its master comes back in [`Spawned`].
    Terminal {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
}

/// A process that now exists (created, perhaps not yet started).
#[derive(Debug)]
pub struct Spawned {
    /// Its pid in the agent's PID namespace; a child of the agent, which reaps it.
    pub pid: i32,
    /// The terminal master, for [`Stdio::Terminal`].
    pub pty_master: Option<OwnedFd>,
    /// A cgroup whose processes die with this one: a container's in the pod's
    /// shared PID namespace, whose init's end does not end the rest.
    pub kill_on_exit: Option<PathBuf>,
}

/// Guest-side phases of a create, in microseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct CreateTimings {
    /// Finding, mounting and overlaying the image.
    pub rootfs_us: u64,
    /// Writing the bundle and libcontainer's create.
    pub create_us: u64,
}

/// A runtime operation failed; the variant is the protocol error code.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The request is malformed (bad id, relative cwd, unknown capability...).
    #[error("{0}")]
    InvalidArgument(String),
    /// No such container or process.
    #[error("{0}")]
    NotFound(String),
    /// The id is taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// Not in this state (start twice...).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The guest could not do it (mount, libcontainer, cgroup).
    #[error("{0}")]
    Internal(String),
}

impl RuntimeError {
    /// The protocol's error code for this failure.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::Internal(_) => Code::Internal,
        }
    }

    /// This error as a protocol response.
    pub fn to_response(&self) -> v1::Response {
        v1::Response::error(self.code(), self.to_string())
    }
}

/// Every container of the pod. Not `Sync`-aware itself: the agent keeps it behind a
/// mutex.
#[derive(Debug)]
pub struct Runtime {
    /// State root, `/run/atoll`: `images/<serial>` (shared read-only mounts),
    /// `containers/<id>/{bundle,rootfs,upper,work}`, `volumes/<name>` (pod tmpfs
    /// volumes), `pod/{hostname,hosts,resolv.conf}` (written by the agent's network
    /// configuration and bind-mounted into every container when present).
    root: PathBuf,
    /// The cgroup v2 root (`/sys/fs/cgroup`).
    cgroup_root: PathBuf,
    mounts: Mounts,
    engine: Engine,
    /// In creation order.
    containers: Vec<Record>,
    /// Numbers console sockets and exec process files.
    serial: u64,
    /// The pod's shared PID namespace, once a container asked for it.
    pod_pid: Option<pidns::PodPidNs>,
}

/// What the runtime remembers of a container.
#[derive(Debug)]
struct Record {
    id: String,
    /// The serial of the image disk mounted for it; empty for a root unpacked from
    /// layers (no image disk is mounted then).
    image: String,
    disks: Vec<String>,
    rootfs: PathBuf,
    security: v1::Security,
    seccomp: Option<LinuxSeccomp>,
    /// The groups its init process has beyond its user's (the CRI's supplemental
    /// groups); exec processes get them too.
    extra_gids: Vec<u32>,
}

impl From<SpecError> for RuntimeError {
    fn from(e: SpecError) -> Self {
        Self::InvalidArgument(e.to_string())
    }
}

impl From<RootfsError> for RuntimeError {
    fn from(e: RootfsError) -> Self {
        match e {
            RootfsError::FsType(_) | RootfsError::Missing => Self::InvalidArgument(e.to_string()),
            RootfsError::Layers(ref l) if l.is_bad_input() => Self::InvalidArgument(e.to_string()),
            RootfsError::Layers(_) => Self::Internal(self::libcontainer::chain("rootfs", &e)),
            RootfsError::NoDisk(_) | RootfsError::EmptyDisk(..) => {
                Self::FailedPrecondition(e.to_string())
            }
            RootfsError::Io { .. } => Self::Internal(self::libcontainer::chain("rootfs", &e)),
        }
    }
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// How long `remove` waits for the killed init process to be gone.
const REMOVE_WAIT: Duration = Duration::from_secs(2);

impl Runtime {
    /// A runtime keeping its state under `root`.
    pub fn new(root: PathBuf) -> Self {
        Self::with_parts(
            root,
            PathBuf::from("/sys/block"),
            PathBuf::from("/sys/fs/cgroup"),
            Box::new(LinuxSyscall::new()),
        )
    }

    /// A runtime with its system paths and system calls given (tests).
    pub fn with_parts(
        root: PathBuf,
        sys_block: PathBuf,
        cgroup_root: PathBuf,
        sys: Box<dyn Syscall>,
    ) -> Self {
        Self {
            mounts: Mounts::new(root.clone(), sys_block, sys),
            engine: Engine {
                state: root.join("state"),
                sockets: root.join("tty"),
            },
            cgroup_root,
            root,
            containers: Vec::new(),
            serial: 0,
            pod_pid: None,
        }
    }

    /// The pod's PID namespace, started now if it is not there (or died).
    fn pod_pid_ns(&mut self) -> Result<PathBuf, RuntimeError> {
        if let Some(ns) = self.pod_pid.as_mut() {
            if ns.alive() {
                return Ok(ns.path());
            }
        }
        let exe = std::env::current_exe().map_err(|e| {
            RuntimeError::Internal(self::libcontainer::chain("the agent's own binary", &e))
        })?;
        let ns = pidns::PodPidNs::start(&exe).map_err(|e| {
            RuntimeError::Internal(self::libcontainer::chain(
                "cannot start the pod's PID namespace",
                &e,
            ))
        })?;
        let path = ns.path();
        self.pod_pid = Some(ns);
        Ok(path)
    }

    /// The state root.
    pub fn root(&self) -> &std::path::Path {
        &self.root
    }

    fn record(&self, id: &str) -> Result<&Record, RuntimeError> {
        self.containers
            .iter()
            .find(|r| r.id == id)
            .ok_or_else(|| RuntimeError::NotFound(format!("no container {id:?}")))
    }

    fn next_serial(&mut self) -> u64 {
        self.serial += 1;
        self.serial
    }

    fn cgroup_dir(&self, id: &str) -> PathBuf {
        self.cgroup_root.join("atoll").join(id)
    }

    /// Prepares the rootfs, builds the spec and creates the container: its init
    /// process exists, stopped before `exec`, until [`Runtime::start`].
    pub fn create(
        &mut self,
        req: &v1::CreateContainer,
        stdio: Stdio,
    ) -> Result<(Spawned, CreateTimings), RuntimeError> {
        let id = req.id.as_str();
        atoll_agent_proto::validate_id(id)
            .map_err(|e| RuntimeError::InvalidArgument(format!("id {id:?}: {e}")))?;
        if self.containers.iter().any(|r| r.id == id) {
            return Err(RuntimeError::AlreadyExists(format!(
                "container {id:?} already exists"
            )));
        }
        // Everything that can be checked without the image, before mounting anything.
        let default_security = v1::Security::default();
        let security = req.security.as_ref().unwrap_or(&default_security);
        let seccomp = spec::seccomp_for(security)?;
        let planned = spec::plan_mounts(&req.mounts)?;
        if !req.hostname.is_empty() {
            spec::check_hostname(&req.hostname)?;
        }
        let wants_tty = matches!(stdio, Stdio::Terminal { .. });
        let process_tty = req.process.as_ref().is_some_and(|p| p.terminal);
        if wants_tty != process_tty {
            return Err(RuntimeError::InvalidArgument(
                "process.terminal does not match the stdio the agent prepared".into(),
            ));
        }
        let rootfs_req = req
            .rootfs
            .as_ref()
            .ok_or_else(|| RuntimeError::from(RootfsError::Missing))?;
        let (field, serial) = match &rootfs_req.source {
            Some(v1::rootfs::Source::Block(b)) => ("block", &b.serial),
            Some(v1::rootfs::Source::Layers(l)) => ("layers", &l.serial),
            None => return Err(RootfsError::Missing.into()),
        };
        atoll_agent_proto::validate_id(serial).map_err(|e| {
            RuntimeError::InvalidArgument(format!("rootfs.{field}.serial {serial:?}: {e}"))
        })?;

        let t0 = Instant::now();
        let (rootfs, image) = match &rootfs_req.source {
            Some(v1::rootfs::Source::Block(b)) => (
                self.mounts
                    .prepare_rootfs(id, &b.serial, &b.fs_type, rootfs_req.readonly)?,
                b.serial.clone(),
            ),
            Some(v1::rootfs::Source::Layers(l)) => {
                (self.mounts.prepare_layers_rootfs(id, l)?, String::new())
            }
            None => return Err(RootfsError::Missing.into()),
        };
        let mut record = Record {
            id: id.to_owned(),
            image,
            disks: Vec::new(),
            rootfs: rootfs.clone(),
            security: security.clone(),
            seccomp,
            extra_gids: req
                .process
                .as_ref()
                .map_or_else(Vec::new, |p| p.additional_gids.clone()),
        };
        let result = self.create_in(req, &planned, &mut record, stdio, t0);
        match result {
            Ok(done) => {
                self.containers.push(record);
                Ok(done)
            }
            Err(e) => {
                let _ = self.engine.destroy(id, REMOVE_WAIT);
                self.release(&record);
                Err(e)
            }
        }
    }

    fn create_in(
        &mut self,
        req: &v1::CreateContainer,
        planned: &[spec::RequestMount],
        record: &mut Record,
        stdio: Stdio,
        t0: Instant,
    ) -> Result<(Spawned, CreateTimings), RuntimeError> {
        let user_spec = req.process.as_ref().map_or("", |p| p.user.as_str());
        let user = user::resolve_in_rootfs(&record.rootfs, user_spec)
            .map_err(|e| match e {
                user::ResolveUserError::User(u) => RuntimeError::InvalidArgument(u.to_string()),
                other => RuntimeError::Internal(self::libcontainer::chain("process.user", &other)),
            })?
            .with_groups(&record.extra_gids)
            .map_err(|e| RuntimeError::InvalidArgument(e.to_string()))?;
        for m in planned {
            match &m.source {
                MountSource::Volume(name) => self.mounts.ensure_volume(name)?,
                MountSource::Copy { name, entry } => {
                    let dir = Mounts::copy_dir(&self.root, name);
                    let path = entry.as_ref().map_or_else(|| dir.clone(), |e| dir.join(e));
                    if path.symlink_metadata().is_err() {
                        return Err(RuntimeError::NotFound(format!(
                            "copied volume {:?} has no {}: send it first (Attach VOLUME)",
                            name,
                            entry
                                .as_deref()
                                .map_or("root".to_owned(), |e| format!("entry {e:?}"))
                        )));
                    }
                }
                MountSource::Disk(serial) => {
                    if !record.disks.contains(serial) {
                        self.mounts.acquire_data_disk(serial)?;
                        record.disks.push(serial.clone());
                    }
                }
            }
        }
        let rootfs_us = micros(t0);

        let t1 = Instant::now();
        let pod_files = spec::POD_FILES
            .iter()
            .copied()
            .filter(|f| self.root.join("pod").join(f).is_file())
            .collect();
        let pid_ns = if record.security.share_pod_pid {
            Some(self.pod_pid_ns()?)
        } else {
            None
        };
        let paths = SpecPaths {
            root: self.root.clone(),
            rootfs: record.rootfs.clone(),
            pod_files,
            pid_ns,
        };
        let oci = spec::build_spec(req, &user, &paths)?;
        let bundle = self.mounts.container_dir(&record.id).join("bundle");
        std::fs::create_dir_all(&bundle).map_err(|e| {
            RuntimeError::Internal(self::libcontainer::chain("cannot create the bundle", &e))
        })?;
        oci.save(bundle.join("config.json")).map_err(|e| {
            RuntimeError::Internal(self::libcontainer::chain("cannot write config.json", &e))
        })?;
        let tty_name = format!("{}.sock", self.next_serial());
        let mut spawned = self.engine.create(&record.id, &bundle, stdio, &tty_name)?;
        spawned.kill_on_exit = record
            .security
            .share_pod_pid
            .then(|| self.cgroup_dir(&record.id));
        let timings = CreateTimings {
            rootfs_us,
            create_us: micros(t1),
        };
        Ok((spawned, timings))
    }

    fn release(&mut self, record: &Record) {
        for serial in &record.disks {
            self.mounts.release_data_disk(serial);
        }
        self.mounts.release_rootfs(&record.id, &record.image);
    }

    /// Lets the created container's init process run its command.
    pub fn start(&mut self, id: &str) -> Result<(), RuntimeError> {
        self.record(id)?;
        self.engine.start(id)
    }

    /// Runs another process in the running container `container_id`.
    pub fn exec(
        &mut self,
        container_id: &str,
        process: &v1::Process,
        stdio: Stdio,
    ) -> Result<Spawned, RuntimeError> {
        let record = self.record(container_id)?;
        if matches!(stdio, Stdio::Terminal { .. }) != process.terminal {
            return Err(RuntimeError::InvalidArgument(
                "process.terminal does not match the stdio the agent prepared".into(),
            ));
        }
        let user = user::resolve_in_rootfs(&record.rootfs, &process.user)
            .map_err(|e| match e {
                user::ResolveUserError::User(u) => RuntimeError::InvalidArgument(u.to_string()),
                other => RuntimeError::Internal(self::libcontainer::chain("process.user", &other)),
            })?
            .with_groups(&record.extra_gids)
            .and_then(|u| u.with_groups(&process.additional_gids))
            .map_err(|e| RuntimeError::InvalidArgument(e.to_string()))?;
        let oci = spec::build_process(process, &user, &record.security)?;
        let seccomp = record.seccomp.clone();
        let n = self.next_serial();
        let dir = self.mounts.container_dir(container_id).join("bundle");
        let path = dir.join(format!("exec-{n}.json"));
        let json = serde_json::to_vec(&oci)
            .map_err(|e| RuntimeError::Internal(self::libcontainer::chain("process.json", &e)))?;
        std::fs::write(&path, json).map_err(|e| {
            RuntimeError::Internal(self::libcontainer::chain(
                &format!("cannot write {}", path.display()),
                &e,
            ))
        })?;
        let result = self
            .engine
            .exec(container_id, &path, seccomp, stdio, &format!("{n}.sock"));
        let _ = std::fs::remove_file(&path);
        result
    }

    /// Sends `signal` to the container's init process, or to all of its processes.
    pub fn signal(&mut self, id: &str, signal: i32, all: bool) -> Result<(), RuntimeError> {
        self.record(id)?;
        self.engine.kill(id, signal, all)
    }

    /// Gives the container new limits (its cgroup's files).
    pub fn update(&self, id: &str, r: &v1::Resources) -> Result<(), RuntimeError> {
        self.record(id)?;
        let limits =
            spec::cgroup_limits(r).map_err(|e| RuntimeError::InvalidArgument(e.to_string()))?;
        let dir = self.cgroup_dir(id);
        for (file, value) in limits {
            let path = dir.join(file);
            // A controller the guest kernel lacks has no file: nothing to limit.
            if file == "memory.swap.max" && !path.exists() {
                continue;
            }
            std::fs::write(&path, &value).map_err(|e| {
                RuntimeError::Internal(self::libcontainer::chain(
                    &format!("cannot write {value} to {}", path.display()),
                    &e,
                ))
            })?;
        }
        Ok(())
    }

    /// The container's cgroup v2 counters.
    pub fn stats(&self, id: &str) -> Result<v1::StatsReply, RuntimeError> {
        self.record(id)?;
        let dir = self.cgroup_dir(id);
        stats::read(&dir).map_err(|e| {
            RuntimeError::Internal(self::libcontainer::chain(
                &format!("cannot read {}", dir.display()),
                &e,
            ))
        })
    }

    /// OOM kills recorded in the container's cgroup (`memory.events` `oom_kill`).
    pub fn oom_kills(&self, id: &str) -> Result<u64, RuntimeError> {
        self.record(id)?;
        let dir = self.cgroup_dir(id);
        stats::read_oom_kills(&dir).map_err(|e| {
            RuntimeError::Internal(self::libcontainer::chain(
                &format!("cannot read {}", dir.display()),
                &e,
            ))
        })
    }

    /// Kills what is left (SIGKILL), then frees the container's mounts, cgroup and
    /// state. Idempotent for a container that is already gone.
    pub fn remove(&mut self, id: &str) -> Result<(), RuntimeError> {
        let Some(index) = self.containers.iter().position(|r| r.id == id) else {
            return Ok(());
        };
        let destroyed = self.engine.destroy(id, REMOVE_WAIT);
        let record = self.containers.remove(index);
        self.release(&record);
        // libcontainer removes both on success; after a failure, leave no stale
        // state that would make the id "already exist" again.
        let _ = std::fs::remove_dir_all(self.engine.state.join(id));
        let _ = std::fs::remove_dir(self.cgroup_dir(id));
        destroyed
    }

    /// The directory of copied volumes (a tmpfs, mounted on first use), where a
    /// stream connection unpacks a host mount.
    pub fn copies_dir(&mut self) -> Result<PathBuf, RuntimeError> {
        Ok(self.mounts.ensure_copies()?)
    }

    /// The ids of every container, in creation order.
    pub fn ids(&self) -> Vec<String> {
        self.containers.iter().map(|r| r.id.clone()).collect()
    }

    /// The container's rootfs as the agent sees it (for diagnostics).
    pub fn rootfs(&self, id: &str) -> Option<&Path> {
        self.containers
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.rootfs.as_path())
    }
}

#[cfg(test)]
mod tests {
    use super::rootfs::fake::{ops, Op};
    use super::*;
    use crate::syscall::fake::SharedFake;

    struct Fixture {
        _dirs: Vec<tempfile::TempDir>,
        rt: Runtime,
        fake: SharedFake,
    }

    fn fixture() -> Fixture {
        let root = tempfile::tempdir().unwrap();
        let sys = tempfile::tempdir().unwrap();
        std::fs::create_dir(sys.path().join("vda")).unwrap();
        std::fs::write(sys.path().join("vda/serial"), "img1").unwrap();
        let cg = tempfile::tempdir().unwrap();
        let fake = SharedFake::default();
        let rt = Runtime::with_parts(
            root.path().into(),
            sys.path().into(),
            cg.path().into(),
            Box::new(fake.clone()),
        );
        Fixture {
            _dirs: vec![root, sys, cg],
            rt,
            fake,
        }
    }

    fn pipes() -> Stdio {
        let (r, w) = nix::unistd::pipe().unwrap();
        drop(r);
        let w2 = w.try_clone().unwrap();
        Stdio::Pipes {
            stdin: None,
            stdout: w,
            stderr: w2,
        }
    }

    fn req(id: &str) -> v1::CreateContainer {
        v1::CreateContainer {
            id: id.into(),
            rootfs: Some(v1::Rootfs {
                source: Some(v1::rootfs::Source::Block(v1::BlockImage {
                    serial: "img1".into(),
                    fs_type: "erofs".into(),
                })),
                readonly: false,
            }),
            process: Some(v1::Process {
                args: vec!["/bin/true".into()],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn create_bad_id_is_invalid_argument_and_mounts_nothing() {
        let mut f = fixture();
        let err = f.rt.create(&req("../x"), pipes()).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(ops(&f.fake).is_empty());
    }

    /// A layers disk `vdb` (serial `layers0`) holding `blobs`; the request for it.
    fn layers_fixture(f: &mut Fixture, blobs: &[Vec<u8>]) -> v1::CreateContainer {
        let sys = f._dirs[1].path().to_owned();
        std::fs::create_dir(sys.join("vdb")).unwrap();
        std::fs::write(sys.join("vdb/serial"), "layers0").unwrap();
        let dev = tempfile::tempdir().unwrap();
        let layers = layers::testing::write_disk(&dev.path().join("vdb"), blobs);
        f.rt.mounts.set_dev_dir(dev.path().to_owned());
        f._dirs.push(dev);
        let mut r = req("c1");
        r.rootfs.as_mut().unwrap().source = Some(v1::rootfs::Source::Layers(v1::OciLayers {
            serial: "layers0".into(),
            layers,
        }));
        r
    }

    fn busybox_like_layer() -> Vec<u8> {
        use layers::testing::{gzip, tar_of};
        gzip(&tar_of(&[
            ("etc", None),
            ("etc/passwd", Some(b"root:x:0:0:root:/root:/bin/sh\n")),
            ("etc/group", Some(b"root:x:0:\n")),
        ]))
    }

    #[test]
    fn create_layers_unpacks_into_the_container_tmpfs_and_cleans_up_on_failure() {
        let mut f = fixture();
        let mut r = layers_fixture(&mut f, &[busybox_like_layer()]);
        // Fails after the rootfs is ready (no such user in the unpacked /etc/passwd).
        r.process.as_mut().unwrap().user = "nobody".into();
        let err = f.rt.create(&r, pipes()).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.to_string().contains("no user \"nobody\""), "{err}");
        let ops = ops(&f.fake);
        let dir = f.rt.root().join("containers/c1");
        assert_eq!(
            ops.first(),
            Some(&Op::Mount {
                source: "tmpfs".into(),
                target: dir.clone(),
                fstype: "tmpfs".into(),
                kind: rootfs::MountKind::New { readonly: false },
                data: "mode=0700".into(),
            })
        );
        assert!(
            !ops.iter()
                .any(|o| matches!(o, Op::Mount { fstype, .. } if fstype == "overlay" || fstype == "erofs")),
            "no image mount, no overlay: {ops:?}"
        );
        assert!(ops.contains(&Op::Unmount(dir.clone())));
        assert!(!dir.exists(), "the unpacked tree is removed");
        assert!(f.rt.ids().is_empty());
    }

    #[test]
    fn create_layers_digest_mismatch_is_refused_and_leaves_nothing() {
        let mut f = fixture();
        let mut r = layers_fixture(&mut f, &[busybox_like_layer()]);
        if let Some(v1::rootfs::Source::Layers(l)) = &mut r.rootfs.as_mut().unwrap().source {
            l.layers[0].digest = format!("sha256:{}", "0".repeat(64));
        }
        let err = f.rt.create(&r, pipes()).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.to_string().contains("layer 0"), "{err}");
        assert!(err.to_string().contains("tampered"), "{err}");
        let dir = f.rt.root().join("containers/c1");
        assert!(ops(&f.fake).contains(&Op::Unmount(dir.clone())));
        assert!(!dir.exists());
    }

    #[test]
    fn create_layers_out_of_range_mounts_nothing() {
        let mut f = fixture();
        let mut r = layers_fixture(&mut f, &[busybox_like_layer()]);
        if let Some(v1::rootfs::Source::Layers(l)) = &mut r.rootfs.as_mut().unwrap().source {
            l.layers[0].length = 1 << 40;
        }
        let err = f.rt.create(&r, pipes()).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.to_string().contains("goes past the end"), "{err}");
        assert!(ops(&f.fake).is_empty());
    }

    #[test]
    fn create_layers_on_a_missing_disk_is_failed_precondition() {
        let mut f = fixture();
        let mut r = req("c1");
        r.rootfs.as_mut().unwrap().source = Some(v1::rootfs::Source::Layers(v1::OciLayers {
            serial: "layers9".into(),
            layers: vec![],
        }));
        let err = f.rt.create(&r, pipes()).unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(ops(&f.fake).is_empty());
    }

    #[test]
    fn create_bad_mount_fails_before_mounting() {
        let mut f = fixture();
        let mut r = req("c1");
        r.mounts.push(v1::Mount {
            destination: "/x/../etc".into(),
            r#type: "tmpfs".into(),
            source: "v".into(),
            options: vec![],
        });
        let err = f.rt.create(&r, pipes()).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.to_string().starts_with("mounts[0].destination"),
            "{err}"
        );
        assert!(ops(&f.fake).is_empty());
    }

    #[test]
    fn create_unknown_disk_is_failed_precondition() {
        let mut f = fixture();
        let mut r = req("c1");
        if let Some(v1::rootfs::Source::Block(b)) = &mut r.rootfs.as_mut().unwrap().source {
            b.serial = "other".into();
        }
        let err = f.rt.create(&r, pipes()).unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert!(err.to_string().contains("\"other\""), "{err}");
    }

    #[test]
    fn create_unknown_user_unmounts_what_it_mounted() {
        let mut f = fixture();
        let mut r = req("c1");
        r.process.as_mut().unwrap().user = "nobody".into();
        let err = f.rt.create(&r, pipes()).unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.to_string().contains("no user \"nobody\""), "{err}");
        let ops = ops(&f.fake);
        let root = f.rt.root().to_owned();
        assert!(ops.contains(&Op::Unmount(root.join("images/img1"))));
        assert!(ops.contains(&Op::Unmount(root.join("containers/c1"))));
        assert!(f.rt.ids().is_empty());
    }

    #[test]
    fn create_terminal_mismatch_is_refused() {
        let mut f = fixture();
        let err =
            f.rt.create(&req("c1"), Stdio::Terminal { rows: 24, cols: 80 })
                .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }

    #[test]
    fn operations_on_unknown_container_are_not_found() {
        let mut f = fixture();
        assert_eq!(f.rt.start("c").unwrap_err().code(), Code::NotFound);
        assert_eq!(
            f.rt.signal("c", 15, false).unwrap_err().code(),
            Code::NotFound
        );
        assert_eq!(f.rt.stats("c").unwrap_err().code(), Code::NotFound);
        assert_eq!(f.rt.oom_kills("c").unwrap_err().code(), Code::NotFound);
        let p = v1::Process {
            args: vec!["sh".into()],
            ..Default::default()
        };
        assert_eq!(
            f.rt.exec("c", &p, pipes()).unwrap_err().code(),
            Code::NotFound
        );
        assert!(f.rt.remove("c").is_ok());
    }
}
