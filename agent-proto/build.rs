//! Compiles `proto/agent.proto` with protox (pure Rust: no protoc on the build machine).

fn main() {
    let proto = "proto/agent.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = match protox::compile([proto], ["proto"]) {
        Ok(fds) => fds,
        Err(err) => panic!("{proto} does not compile: {err}"),
    };
    let mut config = prost_build::Config::new();
    config.btree_map(["."]);
    if let Err(err) = config.compile_fds(fds) {
        panic!("generating Rust from {proto} failed: {err}");
    }
}
