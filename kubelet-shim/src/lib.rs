//! Atoll's host side: the guest agent client ([`agent`]), pods as microVMs ([`pod`]),
//! the `atoll` CLI ([`cli`]; `src/bin/atoll.rs` is its thin entry point) and the
//! Kubernetes CRI v1 server ([`cri`]; `src/bin/atoll-cri.rs`), which wraps the same
//! pod library.

pub mod agent;
pub mod cli;
pub mod cri;
pub mod pod;
