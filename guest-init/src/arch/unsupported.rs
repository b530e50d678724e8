//! Port I/O on architectures that have none: every call reports `Unsupported`.

use std::io;

/// Always fails: this architecture has no I/O ports.
pub fn enable_port(_port: u16) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "I/O ports exist only on x86",
    ))
}

/// Never called: [`enable_port`] never succeeds here.
///
/// # Safety
/// Trivially safe; `unsafe` only to match the x86_64 signature.
pub unsafe fn outb(_port: u16, _value: u8) {}
