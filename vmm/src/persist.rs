//! The snapshot state file: everything about a paused VM except its RAM (which goes
//! to the memory file, see [`crate::vstate::memory`]).
//!
//! Layout: a 32-byte header — magic `ATOLLSNP`, format version (u32 LE), 4 reserved
//! bytes, payload length (u64 LE), CRC-32 of the payload (u32 LE), 4 reserved bytes —
//! then the payload, [`MicrovmState`] encoded with postcard (serde; compact and
//! stable for a given type). Any change to a state struct bumps [`FORMAT_VERSION`]:
//! an older or newer file is refused with one line, never half-decoded.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::devices::legacy::serial::SerialSnapshot;
use crate::devices::virtio::persist::VirtioDeviceState;
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::VmState;

/// First bytes of a state file.
pub const MAGIC: &[u8; 8] = b"ATOLLSNP";
/// Version of the state encoding this VMM reads and writes.
pub const FORMAT_VERSION: u32 = 2;
const HEADER: usize = 32;
/// Largest state file we read (a few vCPUs and devices need well under 1 MiB).
const MAX_PAYLOAD: u64 = 16 << 20;

/// A paused VM, minus its RAM.
#[derive(Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    /// Names this snapshot; the memory file's trailer carries the same id.
    pub id: [u8; 16],
    /// RAM size in bytes.
    pub mem_size: u64,
    /// The kernel command line the VM was booted with (for people and tools).
    pub cmdline: String,
    /// VM-wide KVM state.
    pub vm: VmState,
    /// Every vCPU.
    pub vcpus: Vec<VcpuState>,
    /// The console UART.
    pub serial: SerialSnapshot,
    /// Every virtio device, in bus order.
    pub devices: Vec<VirtioDeviceState>,
    /// The VM has the generation ID device (booted with ACPI): a restore writes a
    /// new ID and tells the guest.
    pub vmgenid: bool,
}

/// Why a state file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    /// I/O.
    #[error("cannot {what} the snapshot state file {path}")]
    Io {
        /// read or write.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Not a state file, or cut short, or damaged.
    #[error("{path} is not a usable Atoll snapshot state file: {why}; take the snapshot again")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Written by another format version.
    #[error(
        "{path} is a snapshot of format version {found}, this atoll-vmm reads version \
         {FORMAT_VERSION}; take the snapshot again with this atoll-vmm"
    )]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// Encoding (a bug, not bad input).
    #[error("cannot encode the snapshot state: {0}")]
    Encode(String),
}

/// Encodes `state` with its header (magic, format version, length, CRC).
fn encode_state(state: &MicrovmState) -> Result<Vec<u8>, SnapshotFileError> {
    let payload =
        postcard::to_allocvec(state).map_err(|e| SnapshotFileError::Encode(e.to_string()))?;
    let mut out = vec![0u8; HEADER];
    out[..8].copy_from_slice(MAGIC);
    out[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    out[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    out[24..28].copy_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Writes `state` to `out`.
pub fn write_state(out: &Output, state: &MicrovmState) -> Result<(), SnapshotFileError> {
    let bytes = encode_state(state)?;
    out.write(|mut f| f.write_all(&bytes))
        .map_err(|source| SnapshotFileError::Io {
            what: "write",
            path: out.shown().to_path_buf(),
            source,
        })
}

/// Where a file the VMM writes goes.
#[derive(Debug)]
pub enum Output {
    /// A path the VMM opens: the file is written beside it under a temporary name,
    /// synced and renamed over it, so a crash leaves the old file or the new one,
    /// never half of one.
    Path(PathBuf),
    /// A file the API client opened and handed over (crate::api): rewritten from
    /// its start and synced; emptied again when writing fails. Its client renames
    /// it into place.
    Handed {
        /// The path the client named, for messages and reports.
        shown: PathBuf,
        /// The open file.
        file: File,
    },
}

impl Output {
    /// `path`, or the file handed over for it.
    pub fn new(path: PathBuf, handed: Option<File>) -> Self {
        match handed {
            Some(file) => Output::Handed { shown: path, file },
            None => Output::Path(path),
        }
    }

    /// The path to name in messages.
    pub fn shown(&self) -> &Path {
        match self {
            Output::Path(p) => p,
            Output::Handed { shown, .. } => shown,
        }
    }

    /// Writes the file with `write`, which gets it empty and at offset 0.
    pub fn write<T>(&self, write: impl FnOnce(&File) -> io::Result<T>) -> io::Result<T> {
        match self {
            Output::Path(path) => {
                let tmp = tmp_path(path);
                let result = (|| {
                    let f = File::create(&tmp)?;
                    let t = write(&f)?;
                    f.sync_all()?;
                    std::fs::rename(&tmp, path)?;
                    Ok(t)
                })();
                if result.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                result
            }
            Output::Handed { file, .. } => {
                let result = (|| {
                    if !file.metadata()?.is_file() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidInput,
                            "the descriptor handed over is not a regular file",
                        ));
                    }
                    file.set_len(0)?;
                    let mut f: &File = file;
                    f.seek(SeekFrom::Start(0))?;
                    let t = write(file)?;
                    file.sync_all()?;
                    Ok(t)
                })();
                if result.is_err() {
                    let _ = file.set_len(0);
                }
                result
            }
        }
    }

    /// Takes back a finished write (its companion file could not be written).
    pub fn discard(&self) {
        match self {
            Output::Path(p) => {
                let _ = std::fs::remove_file(p);
            }
            Output::Handed { file, .. } => {
                let _ = file.set_len(0);
            }
        }
    }
}

/// The temporary name a file is written under before it is renamed into place.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// A file the VMM reads: a host path it opens, or a file an API client opened and
/// handed over (a jailed VMM's only way to read one).
#[derive(Debug, Clone)]
pub struct Input {
    /// The path, for messages (and to open when nothing was handed over).
    pub path: PathBuf,
    /// The file handed over for it.
    pub handed: Option<std::sync::Arc<File>>,
}

impl Input {
    /// A path the VMM opens itself.
    pub fn path(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            handed: None,
        }
    }

    /// `path`, or the file handed over for it.
    pub fn new(path: PathBuf, handed: Option<File>) -> Self {
        Self {
            path,
            handed: handed.map(std::sync::Arc::new),
        }
    }

    /// An open file of its own (a duplicate of a handed-over one).
    pub fn open(&self) -> io::Result<File> {
        match &self.handed {
            Some(f) => f.try_clone(),
            None => File::open(&self.path),
        }
    }

    /// Which file this is now: equal for the same file unchanged, whatever its
    /// path or descriptor (a template rebuilt is renamed into place: a new inode).
    pub fn identity(&self) -> io::Result<FileIdentity> {
        use std::os::unix::fs::MetadataExt;
        let m = match &self.handed {
            Some(f) => f.metadata()?,
            None => std::fs::metadata(&self.path)?,
        };
        Ok(FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: (m.mtime(), m.mtime_nsec()),
        })
    }
}

/// A file's device, inode, size and modification time: what tells that a file
/// handed over now is the one read earlier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: (i64, i64),
}

/// Reads and checks the state file at `path`.
pub fn read_state(path: &Path) -> Result<MicrovmState, SnapshotFileError> {
    read_state_from(&Input::path(path))
}

/// Reads and checks the state file `input`.
pub fn read_state_from(input: &Input) -> Result<MicrovmState, SnapshotFileError> {
    let path = input.path.as_path();
    let corrupt = |why: String| SnapshotFileError::Corrupt {
        path: path.to_path_buf(),
        why,
    };
    let io_err = |source| SnapshotFileError::Io {
        what: "read",
        path: path.to_path_buf(),
        source,
    };
    let mut f = input.open().map_err(io_err)?;
    let mut header = [0u8; HEADER];
    f.read_exact(&mut header)
        .map_err(|_| corrupt("it is shorter than the header".into()))?;
    if &header[..8] != MAGIC {
        return Err(corrupt("it does not start with the ATOLLSNP magic".into()));
    }
    let u32_at =
        |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let found = u32_at(8);
    if found != FORMAT_VERSION {
        return Err(SnapshotFileError::Version {
            path: path.to_path_buf(),
            found,
        });
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&header[16..24]);
    let len = u64::from_le_bytes(len_bytes);
    if len > MAX_PAYLOAD {
        return Err(corrupt(format!("it claims a {len}-byte payload")));
    }
    let mut payload = Vec::with_capacity(len as usize);
    f.take(len + 1).read_to_end(&mut payload).map_err(io_err)?;
    if payload.len() as u64 != len {
        return Err(corrupt(format!(
            "the header says {len} bytes of state follow, the file has {}",
            payload.len()
        )));
    }
    if crc32fast::hash(&payload) != u32_at(24) {
        return Err(corrupt("its checksum does not match (damaged)".into()));
    }
    let state: MicrovmState =
        postcard::from_bytes(&payload).map_err(|e| corrupt(format!("cannot decode it: {e}")))?;
    if state.vcpus.is_empty() {
        return Err(corrupt("it has no vCPU".into()));
    }
    Ok(state)
}
