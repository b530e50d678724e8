//! Architecture-specific primitives: I/O port access (x86_64 only today).
//!
//! Everything that needs `cfg(target_arch)` lives here so the rest of the crate stays
//! architecture-neutral.

#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use self::x86_64::{enable_port, outb};

#[cfg(not(target_arch = "x86_64"))]
mod unsupported;
#[cfg(not(target_arch = "x86_64"))]
pub use self::unsupported::{enable_port, outb};
