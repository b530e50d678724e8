//! The snapshot state file: everything about a paused VM except its RAM (which goes
//! to the memory file, see [`crate::vstate::memory`]).
//!
//! Layout: a 32-byte header — magic `ATOLLSNP`, format version (u32 LE), 4 reserved
//! bytes, payload length (u64 LE), CRC-32 of the payload (u32 LE), 4 reserved bytes —
//! then the payload, [`MicrovmState`] encoded with postcard (serde; compact and
//! stable for a given type). Any change to a state struct bumps [`FORMAT_VERSION`]:
//! an older or newer file is refused with one line, never half-decoded.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::devices::legacy::serial::SerialSnapshot;
use crate::devices::virtio::persist::VirtioDeviceState;
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::VmState;

/// First bytes of a state file.
pub const MAGIC: &[u8; 8] = b"ATOLLSNP";
/// Version of the state encoding this VMM reads and writes.
pub const FORMAT_VERSION: u32 = 1;
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

/// Writes `state` to `path` atomically (temporary file, fsync, rename).
pub fn write_state(path: &Path, state: &MicrovmState) -> Result<(), SnapshotFileError> {
    let payload =
        postcard::to_allocvec(state).map_err(|e| SnapshotFileError::Encode(e.to_string()))?;
    let mut header = [0u8; HEADER];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    header[24..28].copy_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    write_atomically(path, &[&header, &payload]).map_err(|source| SnapshotFileError::Io {
        what: "write",
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `parts` to a temporary file beside `path`, syncs it and renames it over
/// `path`: a crash leaves the old file or the new one, never half of one.
pub fn write_atomically(path: &Path, parts: &[&[u8]]) -> io::Result<()> {
    let tmp = tmp_path(path);
    let result = (|| {
        let mut f = File::create(&tmp)?;
        for p in parts {
            f.write_all(p)?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The temporary name a file is written under before it is renamed into place.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// Reads and checks the state file at `path`.
pub fn read_state(path: &Path) -> Result<MicrovmState, SnapshotFileError> {
    let corrupt = |why: String| SnapshotFileError::Corrupt {
        path: path.to_path_buf(),
        why,
    };
    let io_err = |source| SnapshotFileError::Io {
        what: "read",
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(io_err)?;
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
