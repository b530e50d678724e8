//! `atoll`: run containers in microVMs.

fn main() {}
