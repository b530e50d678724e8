//! Containers through youki's `libcontainer`: the rootfs from an image disk (erofs or
//! ext4, read-only, under a tmpfs overlay), the OCI runtime spec built from a
//! [`v1::CreateContainer`], and create / start / exec / signal / remove.
//!
//! The agent (`crate::agent`) owns processes (waiting, stdio streaming); this module
//! owns container state. Every method returns a [`RuntimeError`] whose
//! [`RuntimeError::code`] becomes the protocol error code.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use atoll_agent_proto::v1;
use v1::error::Code;

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
}

impl Runtime {
    /// A runtime keeping its state under `root`.
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// The state root.
    pub fn root(&self) -> &std::path::Path {
        &self.root
    }

    /// Prepares the rootfs, builds the spec and creates the container: its init
    /// process exists, stopped before `exec`, until [`Runtime::start`].
    pub fn create(
        &mut self,
        req: &v1::CreateContainer,
        stdio: Stdio,
    ) -> Result<(Spawned, CreateTimings), RuntimeError> {
        let _ = (req, stdio);
        Err(RuntimeError::Internal("containers are not implemented yet".into()))
    }

    /// Lets the created container's init process run its command.
    pub fn start(&mut self, id: &str) -> Result<(), RuntimeError> {
        Err(RuntimeError::NotFound(format!("no container {id:?}")))
    }

    /// Runs another process in the running container `container_id`.
    pub fn exec(
        &mut self,
        container_id: &str,
        process: &v1::Process,
        stdio: Stdio,
    ) -> Result<Spawned, RuntimeError> {
        let _ = (process, stdio);
        Err(RuntimeError::NotFound(format!("no container {container_id:?}")))
    }

    /// Sends `signal` to the container's init process, or to all of its processes.
    pub fn signal(&mut self, id: &str, signal: i32, all: bool) -> Result<(), RuntimeError> {
        let _ = (signal, all);
        Err(RuntimeError::NotFound(format!("no container {id:?}")))
    }

    /// The container's cgroup v2 counters.
    pub fn stats(&self, id: &str) -> Result<v1::StatsReply, RuntimeError> {
        Err(RuntimeError::NotFound(format!("no container {id:?}")))
    }

    /// OOM kills recorded in the container's cgroup (`memory.events` `oom_kill`).
    pub fn oom_kills(&self, id: &str) -> Result<u64, RuntimeError> {
        Err(RuntimeError::NotFound(format!("no container {id:?}")))
    }

    /// Kills what is left (SIGKILL), then frees the container's mounts, cgroup and
    /// state. Idempotent for a container that is already gone.
    pub fn remove(&mut self, id: &str) -> Result<(), RuntimeError> {
        Err(RuntimeError::NotFound(format!("no container {id:?}")))
    }

    /// The ids of every container, in creation order.
    pub fn ids(&self) -> Vec<String> {
        Vec::new()
    }
}
