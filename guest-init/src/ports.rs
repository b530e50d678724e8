//! The I/O ports of the host–guest contract (docs/guest-contract.md).

/// Exit port: the byte written is the guest's exit status; the VM stops.
pub const EXIT_PORT: u16 = 0xf4;
/// Boot-stage port: the VMM timestamps each byte written.
pub const STAGE_PORT: u16 = 0x440;

/// The boot stages written to [`STAGE_PORT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BootStage {
    /// PID 1 started.
    Entered = 1,
    /// Everything is mounted; the command is about to run.
    Ready = 2,
    /// The command was started.
    CommandStarted = 3,
}
