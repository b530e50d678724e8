//! x86_64: guest physical layout, boot-time CPU state, CPUID, MSRs, the MP table and
//! the ACPI tables.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
