//! x86_64 port I/O: `ioperm(2)` to get access, `out dx, al` to write.

use std::io;

/// Grants the calling process access to the single I/O port `port`.
pub fn enable_port(port: u16) -> io::Result<()> {
    // SAFETY: ioperm only changes this process's I/O permission bitmap; the
    // arguments are plain integers and the return value is checked.
    let rc = unsafe { libc::ioperm(libc::c_ulong::from(port), 1, 1) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes `value` to I/O port `port`.
///
/// # Safety
/// The caller must have enabled `port` with [`enable_port`] (otherwise the CPU raises
/// #GP and the process gets SIGSEGV), and the write must be one the device on that
/// port expects: it can have effects outside this process (ending the VM, for one).
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: access to `port` was granted (caller contract); `out` touches no memory
    // and no stack, and leaves the flags alone.
    unsafe {
        std::arch::asm!(
            "out dx, al",
            in("dx") port,
            in("al") value,
            options(nomem, nostack, preserves_flags)
        );
    }
}
