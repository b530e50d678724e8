//! `atoll-vsock-probe`: both ends of virtio-vsock end-to-end tests and benchmarks.
//!
//! Guest modes use AF_VSOCK; host modes use atoll-vmm's Unix sockets, except
//! `vsock-bench`, which dials a guest over AF_VSOCK (QEMU's vhost-vsock) (`CONNECT
//! <port>\n` / `OK <host port>\n` on the device's socket, `<uds>_<port>` listeners
//! for guest-initiated connections). Static, so it runs in the guest and the node.
//!
//! ```text
//! guest: listen PORT [--exit-after N]      echo every connection (N: then exit 0)
//!        stall PORT --seconds S            accept, never read, exit after S s
//!        connect PORT MSG [--count N]      N parallel echoes through CID 2 (host)
//! host:  serve PATH                        echo every connection on a Unix listener
//!        host-connect UDS PORT MSG [--count N]  N parallel echoes via the device
//!        host-dial UDS PORT [--seconds S]  one connection to the guest's PORT, retried S s
//!        flood UDS PORT --seconds S        write without pause; print bytes taken
//!        bench UDS PORT --rtt N --bytes B  latency and throughput as one JSON line
//!        vsock-bench CID PORT --rtt N --bytes B  the same over AF_VSOCK (vhost-vsock)
//! ```

use std::io::{self, Read, Write};
use std::os::unix::io::FromRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

const HOST_CID: u32 = 2;

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain old data; all-zero is valid.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn vsock_socket() -> io::Result<i32> {
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A vsock stream as a `UnixStream` (both are plain stream fds for read/write).
fn stream_from(fd: i32) -> UnixStream {
    // SAFETY: `fd` is a connected socket we own; the stream closes it.
    unsafe { UnixStream::from_raw_fd(fd) }
}

fn vsock_listen(port: u32) -> io::Result<i32> {
    let fd = vsock_socket()?;
    let a = vsock_addr(libc::VMADDR_CID_ANY, port);
    // SAFETY: `a` is a valid sockaddr_vm of the size given.
    check(unsafe {
        libc::bind(
            fd,
            std::ptr::addr_of!(a).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })?;
    // SAFETY: listen(2) on our socket.
    check(unsafe { libc::listen(fd, 128) })?;
    Ok(fd)
}

fn vsock_accept(fd: i32) -> io::Result<UnixStream> {
    loop {
        // SAFETY: accept(2) without an address buffer.
        let c = unsafe {
            libc::accept4(
                fd,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if c >= 0 {
            return Ok(stream_from(c));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn vsock_connect(cid: u32, port: u32) -> io::Result<UnixStream> {
    let fd = vsock_socket()?;
    let s = stream_from(fd);
    let a = vsock_addr(cid, port);
    // SAFETY: `a` is a valid sockaddr_vm of the size given.
    check(unsafe {
        libc::connect(
            fd,
            std::ptr::addr_of!(a).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })?;
    Ok(s)
}

fn echo(mut s: UnixStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

/// Sends `msg`, half-closes, and checks the echo is `msg`.
fn echo_check(mut s: UnixStream, msg: &[u8]) -> anyhow::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back).context("reading the echo")?;
    if back != msg {
        bail!("echo mismatch");
    }
    Ok(())
}

/// Host side of a host-initiated connection: `CONNECT port`, then `OK n`. Retries
/// while the guest is not listening yet (the device closes the socket on RST).
fn host_dial(uds: &Path, port: u32, patience: Duration) -> anyhow::Result<UnixStream> {
    let start = Instant::now();
    loop {
        match try_dial(uds, port) {
            Ok(s) => return Ok(s),
            Err(e) if start.elapsed() > patience => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn try_dial(uds: &Path, port: u32) -> anyhow::Result<UnixStream> {
    let mut s = UnixStream::connect(uds).with_context(|| format!("connect {}", uds.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if s.read(&mut b)? == 0 {
            bail!("the device closed the connection (guest port {port} refused)");
        }
        line.push(b[0]);
        if line.len() > 32 {
            bail!("bad reply");
        }
    }
    if !line.starts_with(b"OK ") {
        bail!("bad reply {:?}", String::from_utf8_lossy(&line));
    }
    s.set_read_timeout(None)?;
    Ok(s)
}

fn flag(args: &[String], name: &str, default: u64) -> anyhow::Result<u64> {
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .context("flag value missing")?
            .parse()
            .with_context(|| format!("bad {name}")),
        None => Ok(default),
    }
}

fn arg<'a>(args: &'a [String], i: usize, what: &str) -> anyhow::Result<&'a str> {
    args.get(i)
        .map(String::as_str)
        .with_context(|| format!("missing {what}"))
}

fn parallel(count: u64, f: impl Fn(u64) -> anyhow::Result<()> + Sync) -> anyhow::Result<()> {
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..count)
            .map(|i| {
                s.spawn({
                    let f = &f;
                    move || f(i)
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a worker panicked"))??;
        }
        Ok(())
    })
}

/// Connects to a guest's AF_VSOCK port, retrying while it is not listening yet.
fn vsock_dial(cid: u32, port: u32, patience: Duration) -> anyhow::Result<UnixStream> {
    let start = Instant::now();
    loop {
        match vsock_connect(cid, port) {
            Ok(s) => return Ok(s),
            Err(e) if start.elapsed() > patience => {
                return Err(e).with_context(|| format!("vsock connect {cid}:{port}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Times `rtt_n` 64-byte round trips, then echoes `bytes` each way; prints one
/// JSON line.
fn bench(mut s: UnixStream, rtt_n: u64, bytes: u64) -> anyhow::Result<()> {
    let mut lat = Vec::with_capacity(rtt_n as usize);
    let mut b = [0u8; 64];
    for _ in 0..rtt_n {
        let t = Instant::now();
        s.write_all(&b)?;
        s.read_exact(&mut b)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize];
    // Throughput: write `bytes` while a second thread reads the echo back.
    let reader = s.try_clone()?;
    let t = Instant::now();
    let rx = std::thread::spawn(move || -> io::Result<u64> {
        let mut r = reader;
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0u64;
        while got < bytes {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        Ok(got)
    });
    let chunk = vec![0xa5u8; 256 * 1024];
    let mut sent = 0u64;
    while sent < bytes {
        let n = chunk.len().min((bytes - sent) as usize);
        s.write_all(&chunk[..n])?;
        sent += n as u64;
    }
    let got = rx
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let secs = t.elapsed().as_secs_f64();
    if got != bytes {
        bail!("echoed {got} of {bytes} bytes");
    }
    println!(
        "{{\"rtt_n\":{rtt_n},\"rtt_median_us\":{:.1},\"rtt_p99_us\":{:.1},\"rtt_min_us\":{:.1},\"bytes_each_way\":{bytes},\"echo_seconds\":{secs:.3},\"mib_per_s_each_way\":{:.2}}}",
        pct(0.5),
        pct(0.99),
        lat[0],
        bytes as f64 / (1 << 20) as f64 / secs
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = arg(&args, 0, "mode")?;
    match mode {
        "listen" => {
            let port: u32 = arg(&args, 1, "PORT")?.parse()?;
            let exit_after = flag(&args, "--exit-after", 0)?;
            let fd = vsock_listen(port).context("vsock listen")?;
            println!("probe: listening on vsock port {port}");
            let mut workers = Vec::new();
            let mut served = 0;
            loop {
                let s = vsock_accept(fd)?;
                workers.push(std::thread::spawn(move || echo(s)));
                served += 1;
                if exit_after != 0 && served >= exit_after {
                    break;
                }
            }
            for w in workers {
                let _ = w.join();
            }
            println!("probe: served {served}");
        }
        "stall" => {
            let port: u32 = arg(&args, 1, "PORT")?.parse()?;
            let secs = flag(&args, "--seconds", 10)?;
            let fd = vsock_listen(port).context("vsock listen")?;
            println!("probe: stalling on vsock port {port}");
            let s = vsock_accept(fd)?;
            std::thread::sleep(Duration::from_secs(secs));
            drop(s);
        }
        "connect" => {
            let port: u32 = arg(&args, 1, "PORT")?.parse()?;
            let msg = arg(&args, 2, "MSG")?;
            let count = flag(&args, "--count", 1)?;
            parallel(count, |i| {
                let s = vsock_connect(HOST_CID, port)
                    .with_context(|| format!("vsock connect {port}"))?;
                echo_check(s, format!("{msg}-{i}").as_bytes())
            })?;
            println!("probe: guest-echo-ok {count}");
        }
        "serve" => {
            let path = Path::new(arg(&args, 1, "PATH")?);
            let _ = std::fs::remove_file(path);
            let l = UnixListener::bind(path)?;
            for s in l.incoming() {
                let s = s?;
                std::thread::spawn(move || echo(s));
            }
        }
        "host-connect" => {
            let uds = Path::new(arg(&args, 1, "UDS")?);
            let port: u32 = arg(&args, 2, "PORT")?.parse()?;
            let msg = arg(&args, 3, "MSG")?;
            let count = flag(&args, "--count", 1)?;
            parallel(count, |i| {
                let s = host_dial(uds, port, Duration::from_secs(60))?;
                echo_check(s, format!("{msg}-{i}").as_bytes())
            })?;
            println!("probe: host-echo-ok {count}");
        }
        "host-dial" => {
            let uds = Path::new(arg(&args, 1, "UDS")?);
            let port: u32 = arg(&args, 2, "PORT")?.parse()?;
            let secs = flag(&args, "--seconds", 30)?;
            host_dial(uds, port, Duration::from_secs(secs))?;
            println!("probe: dialed guest port {port}");
        }
        "flood" => {
            let uds = Path::new(arg(&args, 1, "UDS")?);
            let port: u32 = arg(&args, 2, "PORT")?.parse()?;
            let secs = flag(&args, "--seconds", 5)?;
            let s = host_dial(uds, port, Duration::from_secs(60))?;
            s.set_nonblocking(true)?;
            let chunk = vec![0x5au8; 64 * 1024];
            let mut total = 0u64;
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(secs) {
                match (&s).write(&chunk) {
                    Ok(n) => total += n as u64,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(e) => return Err(e).context("flood write"),
                }
            }
            println!("probe: flood-bytes {total}");
        }
        "bench" => {
            let uds = Path::new(arg(&args, 1, "UDS")?);
            let port: u32 = arg(&args, 2, "PORT")?.parse()?;
            let rtt_n = flag(&args, "--rtt", 1000)?;
            let bytes = flag(&args, "--bytes", 64 << 20)?;
            let s = host_dial(uds, port, Duration::from_secs(60))?;
            bench(s, rtt_n, bytes)?;
        }
        "vsock-bench" => {
            let cid: u32 = arg(&args, 1, "CID")?.parse()?;
            let port: u32 = arg(&args, 2, "PORT")?.parse()?;
            let rtt_n = flag(&args, "--rtt", 1000)?;
            let bytes = flag(&args, "--bytes", 64 << 20)?;
            let s = vsock_dial(cid, port, Duration::from_secs(180))?;
            bench(s, rtt_n, bytes)?;
        }
        other => bail!("unknown mode {other:?}"),
    }
    Ok(())
}
