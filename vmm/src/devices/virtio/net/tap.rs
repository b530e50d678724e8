//! The host end of virtio-net: a tap interface opened through `/dev/net/tun`.
//!
//! The tap is opened non-blocking with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`: every
//! read and write is one Ethernet frame preceded by a 12-byte `virtio_net_hdr_v1`
//! (`TUNSETVNETHDRSZ`), and all offloads are off (`TUNSETOFFLOAD 0`), so the kernel
//! never hands us partial checksums or GSO super-frames the guest did not negotiate.
//! An existing tap of that name is attached to; a missing one is created and lives as
//! long as the fd.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;

use super::device::VNET_HDR_LEN;

const TUN_PATH: &str = "/dev/net/tun";

/// Why a tap could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenTapError {
    /// The interface name is not one Linux accepts.
    #[error("tap name {0:?} is invalid: give 1 to 15 characters without '/', ':', '%' or spaces")]
    BadName(String),
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open {TUN_PATH} (is the tun module loaded? are we root?)")]
    OpenTun(#[source] io::Error),
    /// `TUNSETIFF` refused the interface.
    #[error("cannot attach to tap {name} (TUNSETIFF; is another interface using the name, or the tap busy?)")]
    SetIff {
        /// The interface name.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A tap handed over could not be made non-blocking.
    #[error("cannot make tap {name} non-blocking")]
    NonBlocking {
        /// The interface name.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `TUNSETVNETHDRSZ` failed (for a file handed over: it is not a tap).
    #[error("cannot set the virtio header size of tap {name} (TUNSETVNETHDRSZ)")]
    VnetHdrSize {
        /// The interface name.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `TUNSETOFFLOAD` failed.
    #[error("cannot turn off the offloads of tap {name} (TUNSETOFFLOAD)")]
    Offload {
        /// The interface name.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl From<OpenTapError> for io::Error {
    fn from(e: OpenTapError) -> Self {
        let kind = match &e {
            OpenTapError::BadName(_) => io::ErrorKind::InvalidInput,
            OpenTapError::OpenTun(s)
            | OpenTapError::SetIff { source: s, .. }
            | OpenTapError::NonBlocking { source: s, .. }
            | OpenTapError::VnetHdrSize { source: s, .. }
            | OpenTapError::Offload { source: s, .. } => s.kind(),
        };
        io::Error::new(kind, e)
    }
}

/// Checks `name` the way Linux's `dev_valid_name` does, and refuses `%` (a template
/// the kernel would expand to a name we did not ask for).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == b'%' || b == 0 || b.is_ascii_whitespace())
}

/// An open tap: the file (one frame per read/write) and its interface name.
#[derive(Debug)]
pub struct Tap {
    /// The non-blocking tun file descriptor.
    pub file: File,
    /// The interface name.
    pub name: String,
}

/// Opens (creating if missing) tap interface `name`, non-blocking, with a 12-byte
/// virtio header and no offloads.
pub fn open(name: &str) -> Result<Tap, OpenTapError> {
    if !valid_name(name) {
        return Err(OpenTapError::BadName(name.to_owned()));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map_err(OpenTapError::OpenTun)?;
    let fd = file.as_raw_fd();

    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // The name fits with its NUL (checked above); the flags fit in a c_short.
    ifr.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: `fd` is an open tun fd and `ifr` a valid ifreq the kernel reads and
    // writes back; it outlives the call.
    let rc = unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut ifr as *mut libc::ifreq) };
    if rc < 0 {
        return Err(OpenTapError::SetIff {
            name: name.to_owned(),
            source: io::Error::last_os_error(),
        });
    }

    configure(&file, name)?;
    Ok(Tap {
        file,
        name: name.to_owned(),
    })
}

/// Sets up a tap opened elsewhere (attached with `TUNSETIFF`, `IFF_TAP |
/// IFF_NO_PI | IFF_VNET_HDR`), as [`open`] does its own: non-blocking, a 12-byte
/// virtio header, no offloads. `name` is for messages.
pub fn configure(file: &File, name: &str) -> Result<(), OpenTapError> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on an fd we hold; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    let rc = if flags < 0 {
        flags
    } else {
        // SAFETY: F_SETFL on an fd we hold, flags by value; no memory is passed.
        unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) }
    };
    if rc < 0 {
        return Err(OpenTapError::NonBlocking {
            name: name.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    let hdr_len = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, valid for the call.
    let rc = unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &hdr_len as *const libc::c_int) };
    if rc < 0 {
        return Err(OpenTapError::VnetHdrSize {
            name: name.to_owned(),
            source: io::Error::last_os_error(),
        });
    }

    // SAFETY: TUNSETOFFLOAD takes its flags by value; no memory is passed.
    let rc = unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, 0 as libc::c_ulong) };
    if rc < 0 {
        return Err(OpenTapError::Offload {
            name: name.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_name_rules_match_linux() {
        assert!(valid_name("tap0"));
        assert!(valid_name("atoll-net-12345"), "15 bytes is the maximum");
        assert!(
            !valid_name("atoll-net-123456"),
            "16 bytes leave no room for NUL"
        );
        assert!(!valid_name(""));
        assert!(!valid_name(".."));
        for bad in ["a/b", "a:b", "tap%d", "a b", "a\0b"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn tap_open_with_bad_name_fails_before_touching_the_host() {
        let e = open("no/slashes").unwrap_err();
        assert!(matches!(e, OpenTapError::BadName(_)));
        let io: io::Error = e.into();
        assert_eq!(io.kind(), io::ErrorKind::InvalidInput);
        assert!(io.to_string().contains("no/slashes"));
    }
}
