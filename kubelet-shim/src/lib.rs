//! Atoll's host side: the guest agent client ([`agent`]), pods as microVMs ([`pod`])
//! and the `atoll` CLI (in `src/bin/atoll.rs`, its logic in [`cli`]). The CRI v1
//! server arrives in a later issue and wraps the same pod library.

pub mod agent;
