//! Architecture-specific pieces of a VM: memory layout, boot protocol, CPU set-up and
//! firmware tables. Only x86_64 exists today; aarch64 (vm-fdt) will sit beside it.

pub mod x86_64;
