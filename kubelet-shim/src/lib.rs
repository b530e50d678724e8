//! Atoll's host side: the guest agent client ([`agent`]), pods as microVMs ([`pod`])
//! and the `atoll` CLI ([`cli`]; `src/bin/atoll.rs` is its thin entry point). The CRI
//! v1 server arrives in a later issue and wraps the same pod library.

pub mod agent;
pub mod cli;
pub mod pod;
