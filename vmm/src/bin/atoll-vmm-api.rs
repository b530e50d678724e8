//! `atoll-vmm-api SOCKET METHOD PATH [BODY]`: one request to a running atoll-vmm's
//! control API (what `curl --unix-socket` does, for machines without curl, such as
//! the nested test node). The files a request names (snapshot files, working set,
//! a drive's backing file) are opened here and handed to the VMM as descriptors,
//! which a jailed VMM needs. Prints the answer's body; exits 0 on a 2xx status, 1
//! otherwise (or when a named file cannot be opened or created), 2 when the socket
//! cannot be reached.

use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (sock, method, path, body) = match args.as_slice() {
        [s, m, p] => (s, m, p, ""),
        [s, m, p, b] => (s, m, p, b.as_str()),
        _ => {
            eprintln!("usage: atoll-vmm-api SOCKET METHOD PATH [JSON-BODY]");
            return ExitCode::from(2);
        }
    };
    match atoll_vmm::api::call(sock.as_ref(), method, path, body, Duration::from_secs(300)) {
        Ok((status, answer)) => {
            println!("{answer}");
            if (200..300).contains(&status) {
                ExitCode::SUCCESS
            } else {
                eprintln!("atoll-vmm-api: {method} {path}: HTTP {status}");
                ExitCode::from(1)
            }
        }
        Err(atoll_vmm::api::CallError::Files(e)) => {
            eprintln!("atoll-vmm-api: {method} {path}: {e}");
            ExitCode::from(1)
        }
        Err(atoll_vmm::api::CallError::Exchange(e)) => {
            eprintln!("atoll-vmm-api: cannot reach the VMM at {sock}: {e}");
            ExitCode::from(2)
        }
    }
}
