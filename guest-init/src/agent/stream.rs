//! Stream connections: one framed Attach, one framed AttachReply, then raw bytes of
//! one stdio stream until its end.
//!
//! STDOUT/STDERR: the pipe's read end to the socket until EOF (every writer of the
//! pipe closed), then the socket is shut down so the host sees EOF. STDIN: the socket
//! to the pipe's write end until the host half-closes, then the pipe is closed so the
//! process sees EOF. TTY: both directions with the pty master, one thread each; the
//! master reading EIO (the terminal's last user is gone) is its end. TCP: a
//! connection to a port on the guest's loopback (port-forward), both directions,
//! each half-closed at its end.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use atoll_agent_proto::v1::{self, attach::Stream};
use atoll_agent_proto::{read_frame, validate_id, write_frame, FrameError};

use atoll_oci_unpack::unpack::{unpack_sources, Compression, LayerSource, UnpackLimits};

use super::conn::{Agent, RequestError};
use super::process::{stream_of, AttachError, OutputSink};
use super::ContainerRuntime;

fn find_end<R: ContainerRuntime>(
    agent: &Agent<R>,
    attach: &v1::Attach,
) -> Result<(Stream, File), RequestError> {
    validate_id(&attach.container_id)
        .map_err(|e| RequestError::InvalidArgument(format!("container_id: {e}")))?;
    if !attach.exec_id.is_empty() {
        validate_id(&attach.exec_id)
            .map_err(|e| RequestError::InvalidArgument(format!("exec_id: {e}")))?;
    }
    let stream =
        stream_of(attach.stream).map_err(|e| RequestError::InvalidArgument(e.to_string()))?;
    let process = agent
        .processes
        .get(&attach.container_id, &attach.exec_id)
        .ok_or_else(|| {
            RequestError::NotFound(format!(
                "no process {:?} in container {:?}",
                attach.exec_id, attach.container_id
            ))
        })?;
    let file = process.take_stream(stream).map_err(|e| match e {
        AttachError::UnknownStream(_) => RequestError::InvalidArgument(e.to_string()),
        _ => RequestError::FailedPrecondition(e.to_string()),
    })?;
    Ok((stream, file))
}

/// Serves one stream connection to its end.
pub fn serve_stream<R: ContainerRuntime>(agent: &Agent<R>, mut conn: UnixStream) {
    let attach: v1::Attach = match read_frame(&mut conn) {
        Ok(attach) => attach,
        Err(FrameError::Decode(err)) => {
            let error = RequestError::InvalidArgument(format!("malformed Attach: {err}"));
            let _ = write_frame(
                &mut conn,
                &v1::AttachReply {
                    error: Some(error.to_proto()),
                },
            );
            return;
        }
        Err(_) => return,
    };
    if attach.stream == Stream::Tcp as i32 {
        return forward(conn, attach.port);
    }
    if attach.stream == Stream::Volume as i32 {
        return receive_volume(agent, conn, &attach.volume);
    }
    if attach.take_over {
        match take_over(agent, &attach, conn) {
            Ok(()) => return,
            Err(c) => conn = c,
        }
    }
    let (stream, end) = match find_end(agent, &attach) {
        Ok(found) => found,
        Err(err) => {
            let _ = write_frame(
                &mut conn,
                &v1::AttachReply {
                    error: Some(err.to_proto()),
                },
            );
            return;
        }
    };
    if write_frame(&mut conn, &v1::AttachReply { error: None }).is_err() {
        return;
    }
    // A container's init keeps its output for a host that comes back; an exec
    // process's output goes with its host.
    let process = (attach.keep && attach.exec_id.is_empty())
        .then(|| agent.processes.get(&attach.container_id, ""))
        .flatten();
    let sink = process.as_ref().and_then(|p| p.sink(stream));
    match stream {
        Stream::Stdin => pump_in(conn, end),
        Stream::Tty => pump_tty(conn, end, sink),
        _ => pump_out(end, conn, sink),
    }
}

/// Moves an init's output stream that is attached already to `conn` (a host that
/// restarted). Gives `conn` back when this is not such a stream, for the usual
/// attach to answer.
fn take_over<R: ContainerRuntime>(
    agent: &Agent<R>,
    attach: &v1::Attach,
    mut conn: UnixStream,
) -> Result<(), UnixStream> {
    let Ok(stream) = stream_of(attach.stream) else {
        return Err(conn);
    };
    if !attach.exec_id.is_empty() || validate_id(&attach.container_id).is_err() {
        return Err(conn);
    }
    let Some(process) = agent.processes.get(&attach.container_id, "") else {
        return Err(conn);
    };
    let Some(sink) = process.sink(stream) else {
        return Err(conn);
    };
    if !process.was_attached(stream) || !sink.is_kept() {
        return Err(conn);
    }
    // A terminal's input direction needs its own copy of the master.
    let input = match stream {
        Stream::Tty => match (
            conn.try_clone(),
            process.pty().and_then(|p| p.try_clone().ok()),
        ) {
            (Ok(c), Some(m)) => Some((c, m)),
            _ => return Err(conn),
        },
        _ => None,
    };
    if write_frame(&mut conn, &v1::AttachReply { error: None }).is_err() {
        return Ok(());
    }
    if let Some((mut from, mut master)) = input {
        let _ = thread::Builder::new().name("tty-in".into()).spawn(move || {
            let _ = copy_until_end(&mut from, &mut master);
        });
    }
    let lost = sink.attach(conn, attach.resume_from);
    if lost > 0 {
        eprintln!(
            "atoll-init agent: {lost} bytes of {:?} of container {} were no longer kept for the host that took it over",
            stream, attach.container_id
        );
    }
    Ok(())
}

/// Most copied volumes one pod holds.
pub const MAX_COPIES: usize = 1024;
/// Longest pause in a volume's tar stream before the copy is abandoned.
const VOLUME_IDLE: Duration = Duration::from_secs(60);
/// What one copied volume may hold (its bytes are bounded by the copies tmpfs).
const VOLUME_LIMITS: UnpackLimits = UnpackLimits {
    max_entries: 100_000,
    max_bytes: 1 << 30,
    max_path_len: 4096,
};

/// Receives a copied volume: checks the name, answers, unpacks the tar stream into
/// a hidden directory, then renames it into place or, when the volume exists (a
/// host path that changed), makes the volume's entries those of the new tree one
/// rename at a time; answers with the outcome.
fn receive_volume<R: ContainerRuntime>(agent: &Agent<R>, mut conn: UnixStream, name: &str) {
    let reply = |conn: &mut UnixStream, error: Option<RequestError>| {
        write_frame(
            conn,
            &v1::AttachReply {
                error: error.map(|e| e.to_proto()),
            },
        )
        .is_ok()
    };
    let prepared = validate_id(name)
        .map_err(|e| RequestError::InvalidArgument(format!("volume: {e}")))
        .and_then(|()| agent.copies_dir())
        .and_then(|dir| {
            let (done, partial) = (dir.join(name), dir.join(format!(".partial-{name}")));
            let count = std::fs::read_dir(&dir)
                .map_err(|e| RequestError::Internal(format!("cannot list the copies: {e}")))?
                .take(MAX_COPIES + 1)
                .count();
            if count >= MAX_COPIES {
                return Err(RequestError::ResourceExhausted(format!(
                    "the pod holds {MAX_COPIES} copied volumes already"
                )));
            }
            match std::fs::create_dir(&partial) {
                Ok(()) => Ok((done, partial)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    Err(RequestError::FailedPrecondition(format!(
                        "copied volume {name:?} is being received on another connection"
                    )))
                }
                Err(e) => Err(RequestError::Internal(format!(
                    "cannot create {}: {e}",
                    partial.display()
                ))),
            }
        });
    let (done, partial) = match prepared {
        Ok(paths) => paths,
        Err(e) => {
            reply(&mut conn, Some(e));
            return;
        }
    };
    let outcome = if !reply(&mut conn, None) {
        Err(None)
    } else {
        let _ = conn.set_read_timeout(Some(VOLUME_IDLE));
        match conn.try_clone() {
            Err(e) => Err(Some(RequestError::Internal(format!("socket: {e}")))),
            Ok(reader) => {
                let source = LayerSource {
                    reader: Box::new(reader),
                    compression: Some(Compression::None),
                    digest: None,
                };
                unpack_sources([Ok(source)], &partial, VOLUME_LIMITS)
                    .map_err(|e| {
                        Some(RequestError::InvalidArgument(format!(
                            "copied volume {name:?}: {e}"
                        )))
                    })
                    .and_then(|_| {
                        let placed = if done.symlink_metadata().is_ok() {
                            update_in_place(&partial, &done)
                        } else {
                            std::fs::rename(&partial, &done)
                        };
                        placed.map_err(|e| {
                            Some(RequestError::Internal(format!(
                                "cannot move copied volume {name:?} into place: {e}"
                            )))
                        })
                    })
            }
        }
    };
    match outcome {
        Ok(()) => {
            reply(&mut conn, None);
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            if let Some(e) = e {
                reply(&mut conn, Some(e));
            }
        }
    }
    let _ = conn.shutdown(Shutdown::Both);
}

/// Makes the entries of the directory `current` those of `new` (both on one file
/// system), each with one atomic rename, so a container reading the volume sees
/// every file whole, old or new: entries only `new` has first, then the ones both
/// have exchanged (`RENAME_EXCHANGE`), then the ones only `current` has removed.
/// For kubelet's atomic-writer layout that is: the new timestamped directory, the
/// `..data` link switched to it, the old directory gone. `new` is removed.
fn update_in_place(new: &std::path::Path, current: &std::path::Path) -> io::Result<()> {
    let names = |dir: &std::path::Path| -> io::Result<Vec<std::ffi::OsString>> {
        let mut v = std::fs::read_dir(dir)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<Vec<_>>>()?;
        v.sort();
        Ok(v)
    };
    let (incoming, present) = (names(new)?, names(current)?);
    let (fresh, both): (Vec<_>, Vec<_>) = incoming
        .into_iter()
        .partition(|n| present.binary_search(n).is_err());
    for n in &fresh {
        std::fs::rename(new.join(n), current.join(n))?;
    }
    for n in &both {
        crate::syscall::rename_exchange(&new.join(n), &current.join(n))?;
    }
    for n in present.iter().filter(|n| both.binary_search(n).is_err()) {
        let p = current.join(n);
        if p.symlink_metadata()?.is_dir() {
            std::fs::remove_dir_all(&p)?;
        } else {
            std::fs::remove_file(&p)?;
        }
    }
    // What is left in `new` is the old entries exchanged out.
    std::fs::remove_dir_all(new)
}

/// How long a connection to a guest port may take.
const TCP_CONNECT: Duration = Duration::from_secs(5);

/// Connects to `port` on the guest's loopback (IPv4, then IPv6), answers, and
/// carries both directions until each ends.
fn forward(mut conn: UnixStream, port: u32) {
    let reply = |conn: &mut UnixStream, error: Option<RequestError>| {
        write_frame(
            conn,
            &v1::AttachReply {
                error: error.map(|e| e.to_proto()),
            },
        )
        .is_ok()
    };
    let Some(port) = u16::try_from(port).ok().filter(|&p| p != 0) else {
        reply(
            &mut conn,
            Some(RequestError::InvalidArgument(format!(
                "port {port} is not between 1 and 65535"
            ))),
        );
        return;
    };
    let mut tcp = None;
    let mut failure = None;
    for addr in [
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
    ] {
        match TcpStream::connect_timeout(&addr, TCP_CONNECT) {
            Ok(t) => {
                tcp = Some(t);
                break;
            }
            Err(e) => failure = Some(e),
        }
    }
    let Some(tcp) = tcp else {
        let why = failure.map(|e| e.to_string()).unwrap_or_default();
        reply(
            &mut conn,
            Some(RequestError::FailedPrecondition(format!(
                "nothing accepts connections on port {port} in the pod: {why}"
            ))),
        );
        return;
    };
    if !reply(&mut conn, None) {
        return;
    }
    let (Ok(conn_in), Ok(mut tcp_out)) = (conn.try_clone(), tcp.try_clone()) else {
        return;
    };
    let inbound = thread::Builder::new().name("tcp-in".into()).spawn(move || {
        let mut conn_in = conn_in;
        let _ = copy_until_end(&mut conn_in, &mut tcp_out);
        let _ = tcp_out.shutdown(Shutdown::Write);
    });
    let (mut tcp, mut conn) = (tcp, conn);
    let _ = copy_until_end(&mut tcp, &mut conn);
    let _ = conn.shutdown(Shutdown::Write);
    if let Ok(inbound) = inbound {
        let _ = inbound.join();
    }
    let _ = conn.shutdown(Shutdown::Both);
}

/// Copies until EOF; a pty master's EIO counts as EOF. Returns on any other error of
/// either side (the other side is then dropped by the caller).
fn copy_until_end(from: &mut impl Read, to: &mut impl Write) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::EIO) => return Ok(()),
            Err(e) => return Err(e),
        };
        to.write_all(buf.get(..n).unwrap_or_default())?;
    }
}

/// Process output to the host, then EOF. With a sink (a container's init), to
/// whichever host is attached, waiting for one while none is.
fn pump_out(mut end: File, mut conn: UnixStream, sink: Option<&OutputSink>) {
    let Some(sink) = sink else {
        let _ = copy_until_end(&mut end, &mut conn);
        let _ = conn.shutdown(Shutdown::Both);
        return;
    };
    sink.attach(conn, None);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match end.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
            Err(_) => break,
        };
        if !sink.deliver(buf.get(..n).unwrap_or_default()) {
            return;
        }
    }
    sink.finish();
}

/// Host input to the process until the host half-closes; dropping `end` closes the
/// pipe (the process reads EOF).
fn pump_in(mut conn: UnixStream, mut end: File) {
    let _ = copy_until_end(&mut conn, &mut end);
    drop(end);
    let _ = conn.shutdown(Shutdown::Both);
}

/// Both directions of a terminal. When the terminal's output ends the socket is shut
/// down both ways, which also ends the input direction.
fn pump_tty(conn: UnixStream, master: File, sink: Option<&OutputSink>) {
    let (Ok(conn_in), Ok(master_in)) = (conn.try_clone(), master.try_clone()) else {
        let _ = conn.shutdown(Shutdown::Both);
        return;
    };
    let input = thread::Builder::new().name("tty-in".into()).spawn(move || {
        let (mut conn, mut master) = (conn_in, master_in);
        let _ = copy_until_end(&mut conn, &mut master);
    });
    pump_out(master, conn, sink);
    if let Ok(input) = input {
        let _ = input.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::conn::tests::{agent_with, create_req, FakeRuntime};
    use crate::agent::conn::Session;
    use atoll_agent_proto::v1::error::Code;
    use std::sync::Arc;

    fn attach(
        agent: &Arc<Agent<FakeRuntime>>,
        container: &str,
        stream: Stream,
    ) -> (UnixStream, v1::AttachReply, thread::JoinHandle<()>) {
        let (mut host, guest) = UnixStream::pair().unwrap();
        let server = {
            let agent = Arc::clone(agent);
            thread::spawn(move || serve_stream(&*agent, guest))
        };
        write_frame(
            &mut host,
            &v1::Attach {
                container_id: container.into(),
                exec_id: String::new(),
                stream: stream as i32,
                ..Default::default()
            },
        )
        .unwrap();
        let reply: v1::AttachReply = read_frame(&mut host).unwrap();
        (host, reply, server)
    }

    #[test]
    fn stdin_is_echoed_to_stdout_and_eof_travels_both_ways() {
        let (agent, _rx, _dir) = agent_with(FakeRuntime::default());
        let mut session = Session { greeted: true };
        let (resp, _) = agent.handle(&mut session, create_req("c", "cat; echo done >&2", true));
        assert!(matches!(resp.result, Some(v1::response::Result::Create(_))));
        let (mut out, reply, out_server) = attach(&agent, "c", Stream::Stdout);
        assert_eq!(reply.error, None);
        let (mut err, reply, err_server) = attach(&agent, "c", Stream::Stderr);
        assert_eq!(reply.error, None);
        let (mut input, reply, in_server) = attach(&agent, "c", Stream::Stdin);
        assert_eq!(reply.error, None);
        input.write_all(b"hello\n").unwrap();
        input.shutdown(Shutdown::Write).unwrap();
        let mut text = String::new();
        out.read_to_string(&mut text).unwrap();
        assert_eq!(text, "hello\n");
        let mut text = String::new();
        err.read_to_string(&mut text).unwrap();
        assert_eq!(text, "done\n");
        for server in [out_server, err_server, in_server] {
            server.join().unwrap();
        }
    }

    #[test]
    fn output_written_before_attach_is_not_lost() {
        let (agent, _rx, _dir) = agent_with(FakeRuntime::default());
        let mut session = Session { greeted: true };
        agent.handle(&mut session, create_req("c", "echo early", false));
        let process = agent.processes.get("c", "").unwrap();
        process.wait();
        let (mut out, reply, server) = attach(&agent, "c", Stream::Stdout);
        assert_eq!(reply.error, None);
        let mut text = String::new();
        out.read_to_string(&mut text).unwrap();
        assert_eq!(text, "early\n");
        server.join().unwrap();
    }

    #[test]
    fn second_attach_and_missing_streams_are_refused() {
        let (agent, _rx, _dir) = agent_with(FakeRuntime::default());
        let mut session = Session { greeted: true };
        agent.handle(&mut session, create_req("c", "true", false));
        let (_out, reply, _server) = attach(&agent, "c", Stream::Stdout);
        assert_eq!(reply.error, None);
        let (_again, reply, _) = attach(&agent, "c", Stream::Stdout);
        assert_eq!(
            reply.error.map(|e| e.code),
            Some(Code::FailedPrecondition as i32)
        );
        let (_, reply, _) = attach(&agent, "c", Stream::Stdin);
        let error = reply.error.unwrap();
        assert_eq!(error.code, Code::FailedPrecondition as i32);
        assert!(
            error.message.contains("no STDIN stream"),
            "{}",
            error.message
        );
        let (_, reply, _) = attach(&agent, "nope", Stream::Stdout);
        assert_eq!(reply.error.map(|e| e.code), Some(Code::NotFound as i32));
        let (_, reply, _) = attach(&agent, "../c", Stream::Stdout);
        assert_eq!(
            reply.error.map(|e| e.code),
            Some(Code::InvalidArgument as i32)
        );
    }

    /// Sends `req` on a new stream connection; the socket and the reply.
    fn send(agent: &Arc<Agent<FakeRuntime>>, req: v1::Attach) -> (UnixStream, v1::AttachReply) {
        let (mut host, guest) = UnixStream::pair().unwrap();
        let agent = Arc::clone(agent);
        thread::spawn(move || serve_stream(&*agent, guest));
        write_frame(&mut host, &req).unwrap();
        let reply: v1::AttachReply = read_frame(&mut host).unwrap();
        (host, reply)
    }

    fn kept_attach(
        agent: &Arc<Agent<FakeRuntime>>,
        container: &str,
        stream: Stream,
    ) -> (UnixStream, v1::AttachReply) {
        let req = v1::Attach {
            container_id: container.into(),
            stream: stream as i32,
            keep: true,
            ..Default::default()
        };
        send(agent, req)
    }

    fn take_over_attach(
        agent: &Arc<Agent<FakeRuntime>>,
        container: &str,
        stream: Stream,
    ) -> (UnixStream, v1::AttachReply) {
        let req = v1::Attach {
            container_id: container.into(),
            stream: stream as i32,
            take_over: true,
            ..Default::default()
        };
        send(agent, req)
    }

    #[test]
    fn a_host_that_resumes_gets_again_what_the_killed_one_read_but_did_not_store() {
        let (agent, _rx, _dir) = agent_with(FakeRuntime::default());
        let mut session = Session { greeted: true };
        agent.handle(
            &mut session,
            create_req("c", "echo one; echo two; read x; echo three", true),
        );
        let (mut out, reply) = kept_attach(&agent, "c", Stream::Stdout);
        assert_eq!(reply.error, None);
        let mut got = [0u8; 8];
        out.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"one\ntwo\n");
        // The host is killed having stored only "one\n" (4 bytes): what it had
        // read beyond that is gone with it.
        drop(out);
        let (mut input, reply, _) = attach(&agent, "c", Stream::Stdin);
        assert_eq!(reply.error, None);
        input.write_all(b"go\n").unwrap();
        input.shutdown(Shutdown::Write).unwrap();
        thread::sleep(std::time::Duration::from_millis(200));
        let req = v1::Attach {
            container_id: "c".into(),
            stream: Stream::Stdout as i32,
            take_over: true,
            resume_from: Some(4),
            ..Default::default()
        };
        let (mut again, reply) = send(&agent, req);
        assert_eq!(reply.error, None);
        let mut rest = String::new();
        again.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "two\nthree\n", "from offset 4 on, once");
    }

    #[test]
    fn an_inits_output_waits_for_a_host_that_went_away_and_takes_over() {
        let (agent, _rx, _dir) = agent_with(FakeRuntime::default());
        let mut session = Session { greeted: true };
        agent.handle(
            &mut session,
            create_req("c", "echo one; read x; echo two; echo three", true),
        );
        let (mut out, reply) = kept_attach(&agent, "c", Stream::Stdout);
        assert_eq!(reply.error, None);
        let mut first = [0u8; 4];
        out.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"one\n");
        // The host goes away. As the VMM tells it to the guest, its side is only
        // half-closed (a write would still be accepted, and lost): the process
        // writes more.
        out.shutdown(Shutdown::Write).unwrap();
        let (mut input, reply, _) = attach(&agent, "c", Stream::Stdin);
        assert_eq!(reply.error, None);
        input.write_all(b"go\n").unwrap();
        input.shutdown(Shutdown::Write).unwrap();
        thread::sleep(std::time::Duration::from_millis(200));
        // An attach without take_over is still refused ...
        let (_, reply, _) = attach(&agent, "c", Stream::Stdout);
        assert_eq!(
            reply.error.map(|e| e.code),
            Some(Code::FailedPrecondition as i32)
        );
        // ... and one with it gets everything the old host missed, then EOF.
        let (mut again, reply) = take_over_attach(&agent, "c", Stream::Stdout);
        assert_eq!(reply.error, None);
        let mut rest = String::new();
        again.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "two\nthree\n");
        let mut stale = Vec::new();
        out.read_to_end(&mut stale).unwrap();
        assert!(stale.is_empty(), "nothing went to the old host: {stale:?}");
        // take_over of a stream never attached is an ordinary attach.
        let (mut err, reply) = take_over_attach(&agent, "c", Stream::Stderr);
        assert_eq!(reply.error, None);
        let mut nothing = String::new();
        err.read_to_string(&mut nothing).unwrap();
        assert_eq!(nothing, "");
    }

    #[test]
    fn taking_over_an_ended_output_gets_its_end_at_once() {
        let (agent, _rx, _dir) = agent_with(FakeRuntime::default());
        let mut session = Session { greeted: true };
        agent.handle(&mut session, create_req("c", "echo only", false));
        let (mut out, reply) = kept_attach(&agent, "c", Stream::Stdout);
        assert_eq!(reply.error, None);
        let mut all = String::new();
        out.read_to_string(&mut all).unwrap();
        assert_eq!(all, "only\n");
        let (mut again, reply) = take_over_attach(&agent, "c", Stream::Stdout);
        assert_eq!(reply.error, None);
        let mut nothing = Vec::new();
        again.read_to_end(&mut nothing).unwrap();
        assert!(nothing.is_empty());
    }

    #[test]
    fn a_removed_containers_waiting_output_pump_ends() {
        let (agent, _rx, _dir) = agent_with(FakeRuntime::default());
        let mut session = Session { greeted: true };
        agent.handle(&mut session, create_req("c", "echo one; echo two", false));
        let (out, reply) = kept_attach(&agent, "c", Stream::Stdout);
        assert_eq!(reply.error, None);
        drop(out);
        thread::sleep(std::time::Duration::from_millis(200));
        agent.processes.remove_container("c");
    }

    fn forward_to(agent: &Arc<Agent<FakeRuntime>>, port: u32) -> (UnixStream, v1::AttachReply) {
        let req = v1::Attach {
            stream: Stream::Tcp as i32,
            port,
            ..Default::default()
        };
        send(agent, req)
    }

    #[test]
    fn tcp_streams_reach_a_loopback_port_both_ways() {
        let (agent, _rx, _dir) = agent_with(FakeRuntime::default());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let echo = thread::spawn(move || {
            let (mut c, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            c.read_to_end(&mut got).unwrap();
            c.write_all(&got).unwrap();
            c.write_all(b" back").unwrap();
        });
        let (mut host, reply) = forward_to(&agent, u32::from(port));
        assert_eq!(reply.error, None);
        host.write_all(b"ping").unwrap();
        host.shutdown(Shutdown::Write).unwrap();
        let mut text = String::new();
        host.read_to_string(&mut text).unwrap();
        assert_eq!(text, "ping back");
        echo.join().unwrap();
    }

    #[test]
    fn tcp_streams_to_nothing_or_nowhere_are_refused() {
        let (agent, _rx, _dir) = agent_with(FakeRuntime::default());
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let (_, reply) = forward_to(&agent, u32::from(port));
        let e = reply.error.unwrap();
        assert_eq!(e.code, Code::FailedPrecondition as i32);
        assert!(e.message.contains(&format!("port {port}")), "{}", e.message);
        for bad in [0, 65536, u32::MAX] {
            let (_, reply) = forward_to(&agent, bad);
            assert_eq!(
                reply.error.map(|e| e.code),
                Some(Code::InvalidArgument as i32)
            );
        }
    }

    #[test]
    fn malformed_attach_gets_an_error_reply() {
        let (agent, _rx, _dir) = agent_with(FakeRuntime::default());
        let (mut host, guest) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || serve_stream(&*agent, guest));
        host.write_all(&[0, 0, 0, 2, 0xff, 0xff]).unwrap();
        let reply: v1::AttachReply = read_frame(&mut host).unwrap();
        assert_eq!(
            reply.error.map(|e| e.code),
            Some(Code::InvalidArgument as i32)
        );
        server.join().unwrap();
    }

    /// Sends `tar` as the copied volume `name`: the first reply, then (when it
    /// accepted) the outcome.
    fn send_volume(
        agent: &Arc<Agent<FakeRuntime>>,
        name: &str,
        tar: &[u8],
    ) -> (v1::AttachReply, Option<v1::AttachReply>) {
        let (mut host, guest) = UnixStream::pair().unwrap();
        let server = {
            let agent = Arc::clone(agent);
            thread::spawn(move || serve_stream(&*agent, guest))
        };
        let req = v1::Attach {
            stream: Stream::Volume as i32,
            volume: name.into(),
            ..Default::default()
        };
        write_frame(&mut host, &req).unwrap();
        let first: v1::AttachReply = read_frame(&mut host).unwrap();
        let second = first.error.is_none().then(|| {
            host.write_all(tar).unwrap();
            host.shutdown(Shutdown::Write).unwrap();
            read_frame(&mut host).unwrap()
        });
        server.join().unwrap();
        (first, second)
    }

    fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h
    }

    /// A volume as kubelet's atomic writer lays it out, at version `stamp`.
    fn atomic_writer_tar(stamp: &str, token: &[u8]) -> Vec<u8> {
        use tar::EntryType::{Directory, Regular, Symlink};
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(&mut header(Directory, 0o755, 0), stamp, &[][..])
            .unwrap();
        b.append_data(
            &mut header(Regular, 0o400, token.len() as u64),
            format!("{stamp}/token"),
            token,
        )
        .unwrap();
        b.append_link(&mut header(Symlink, 0o777, 0), "..data", stamp)
            .unwrap();
        b.append_link(&mut header(Symlink, 0o777, 0), "token", "..data/token")
            .unwrap();
        b.into_inner().unwrap()
    }

    fn volume_tar() -> Vec<u8> {
        atomic_writer_tar("..2026_12_05", b"secret")
    }

    #[test]
    fn a_copied_volume_is_unpacked_whole_then_updated_in_place() {
        let copies = tempfile::tempdir().unwrap();
        let (agent, _rx, _dir) = agent_with(FakeRuntime {
            copies: Some(copies.path().to_owned()),
            ..FakeRuntime::default()
        });
        let (first, second) = send_volume(&agent, "c-1", &volume_tar());
        assert!(first.error.is_none(), "{first:?}");
        let second = second.unwrap();
        assert!(second.error.is_none(), "{second:?}");
        let token = copies.path().join("c-1/token");
        assert_eq!(std::fs::read(&token).unwrap(), b"secret");
        assert!(token.symlink_metadata().unwrap().is_symlink());
        // The host path changed: the same volume (the directory a container has
        // bound) takes the new tree, the old version's directory goes.
        let ino = |p: &std::path::Path| std::os::unix::fs::MetadataExt::ino(&p.metadata().unwrap());
        let before = ino(&copies.path().join("c-1"));
        let (first, second) = send_volume(
            &agent,
            "c-1",
            &atomic_writer_tar("..2026_12_06", b"rotated"),
        );
        assert!(first.error.is_none(), "{first:?}");
        assert!(second.unwrap().error.is_none());
        assert_eq!(std::fs::read(&token).unwrap(), b"rotated");
        assert_eq!(ino(&copies.path().join("c-1")), before);
        let mut left: Vec<_> = std::fs::read_dir(copies.path().join("c-1"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["..2026_12_06", "..data", "token"]);
        let all: Vec<_> = std::fs::read_dir(copies.path()).unwrap().collect();
        assert_eq!(all.len(), 1, "no partial directory left: {all:?}");
    }

    #[test]
    fn a_broken_or_hostile_volume_leaves_nothing_behind() {
        let copies = tempfile::tempdir().unwrap();
        let (agent, _rx, _dir) = agent_with(FakeRuntime {
            copies: Some(copies.path().to_owned()),
            ..FakeRuntime::default()
        });
        // Cut in the middle of an entry.
        let tar = volume_tar();
        let (first, second) = send_volume(&agent, "cut", &tar[..700]);
        assert!(first.error.is_none());
        assert_eq!(
            second.unwrap().error.map(|e| e.code),
            Some(Code::InvalidArgument as i32)
        );
        // An entry escaping the volume.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = header(tar::EntryType::Regular, 0o644, 1);
        h.as_gnu_mut().unwrap().name[..10].copy_from_slice(b"../escaped");
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        let (_, second) = send_volume(&agent, "escape", &b.into_inner().unwrap());
        assert!(second.unwrap().error.is_some());
        assert!(!copies.path().parent().unwrap().join("escaped").exists());
        let left: Vec<_> = std::fs::read_dir(copies.path()).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        // Bad names are refused at once.
        for bad in ["", "../x", "a/b", ".hidden"] {
            let (first, _) = send_volume(&agent, bad, b"");
            assert_eq!(
                first.error.map(|e| e.code),
                Some(Code::InvalidArgument as i32),
                "{bad:?}"
            );
        }
    }
}
