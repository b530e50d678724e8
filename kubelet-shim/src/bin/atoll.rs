//! `atoll`: run containers in their own KVM microVMs. The logic is in
//! `atoll_cri::cli`.

fn main() -> std::process::ExitCode {
    atoll_cri::cli::main()
}
