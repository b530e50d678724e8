//! End-to-end: `atoll run IMAGE` runs an OCI image as a container inside its own
//! microVM (atoll-vmm + our guest kernel + atoll-init's agent + libcontainer), on a
//! real KVM (the host's, or the nested node's).
//!
//! Booting the node costs tens of seconds, so each group of scenarios is one node run
//! (a `OnceLock`): the script prints `@@@ NAME` before and `@@@ NAME status=N` after
//! each scenario, and every `#[test]` asserts on its own scenario's output. The
//! images come from a store prepared here: the built-in busybox image, an image whose
//! config sets entrypoint/cmd/env/workdir/user, a three-layer image with whiteouts
//! and an opaque directory whose expected tree comes from `umoci unpack` (run both
//! from its erofs conversion and with its layers unpacked by the guest agent), and an
//! image never converted (the node has no mkfs.erofs: its layers go to the guest).

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use common::oci::{self, E};
use common::{
    artefact, build_dir, kvm_runner, run, scenario, static_dir, value_of, with, word, SCENARIO_SH,
};

/// Everything the node needs, prepared once per test binary.
struct Fixture {
    _dir: tempfile::TempDir,
    store: PathBuf,
    /// Expected `LIST_SCRIPT` output for `/data` of the whiteout image.
    whiteout_tree: String,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let bin = static_dir();
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        oci::atoll_image(&bin, &store, &["builtin"]);
        let tmp = dir.path().join("busybox.erofs");
        oci::atoll_image(
            &bin,
            &store,
            &[
                "convert",
                "atoll/busybox:latest",
                "-o",
                &tmp.to_string_lossy(),
            ],
        );

        // entrypoint + cmd + env + workdir + a non-root user.
        let cfg = dir.path().join("cfg-layout");
        oci::write_layout(
            &cfg,
            &[
                oci::busybox_layer(),
                oci::layer(&[E::Dir("work", 0o755, 65534)]),
            ],
            serde_json::json!({
                "Entrypoint": ["/bin/sh", "-c"],
                "Cmd": ["echo \"$GREETING from $(pwd) as $(id -u):$(id -g)\""],
                "Env": ["PATH=/bin", "GREETING=hi"],
                "WorkingDir": "/work",
                "User": "nobody",
            }),
        );
        oci::import(&bin, &store, &cfg, "test/config:latest");

        // Three layers: base, a tree, then whiteouts, an opaque directory, a
        // replacement and additions.
        let wh = dir.path().join("wh-layout");
        oci::write_layout(
            &wh,
            &[
                oci::busybox_layer(),
                oci::layer(&[
                    E::Dir("data", 0o755, 0),
                    E::File("data/keep", 0o644, b"keep\n"),
                    E::File("data/gone", 0o644, b"gone\n"),
                    E::Dir("data/dir", 0o755, 0),
                    E::File("data/dir/a", 0o644, b"a\n"),
                    E::File("data/dir/b", 0o640, b"b\n"),
                    E::Dir("data/opq", 0o750, 0),
                    E::File("data/opq/x", 0o644, b"x\n"),
                    E::Dir("data/opq/sub", 0o755, 0),
                    E::File("data/opq/sub/y", 0o644, b"y\n"),
                    E::File("data/mode", 0o600, b"secret\n"),
                    E::Link("data/link", "keep"),
                ]),
                oci::layer(&[
                    E::File("data/.wh.gone", 0o644, b""),
                    E::File("data/dir/.wh.a", 0o644, b""),
                    E::File("data/opq/.wh..wh..opq", 0o644, b""),
                    E::File("data/opq/z", 0o644, b"z\n"),
                    E::File("data/keep", 0o644, b"keep, replaced\n"),
                    E::File("data/new", 0o755, b"new\n"),
                ]),
            ],
            serde_json::json!({"Cmd": ["sh"]}),
        );
        oci::import(&bin, &store, &wh, "test/whiteouts:latest");
        // Imported but never converted: without mkfs.erofs, atoll falls back to
        // unpacking its layers in the guest.
        let raw = dir.path().join("raw-layout");
        oci::write_layout(
            &raw,
            &[
                oci::busybox_layer(),
                oci::layer(&[E::File("hello", 0o644, b"from layers\n")]),
            ],
            serde_json::json!({"Cmd": ["sh"]}),
        );
        oci::atoll_image(
            &bin,
            &store,
            &[
                "import",
                &raw.to_string_lossy(),
                "--name",
                "test/unconverted:latest",
            ],
        );
        let whiteout_tree = oci::umoci_listing(&wh, dir.path(), "/data");
        assert!(whiteout_tree.contains("f /data/opq/z"), "{whiteout_tree}");
        assert!(!whiteout_tree.contains("/data/gone"), "{whiteout_tree}");
        // The layouts, umoci's bundle and the scratch erofs stay on the host.
        for d in ["cfg-layout", "wh-layout", "raw-layout", "umoci-bundle"] {
            std::fs::remove_dir_all(dir.path().join(d)).ok();
        }
        std::fs::remove_file(&tmp).ok();
        Fixture {
            _dir: dir,
            store,
            whiteout_tree,
        }
    })
}

/// Runs `script` where a real KVM is, with `atoll`, `atoll-vmm`, the guest kernel and
/// initramfs, and the fixture store (`$ATOLL_STORE`).
fn in_pod_node(script: &str) -> String {
    let f = fixture();
    let runner = with(
        kvm_runner(),
        &build_dir().join("initramfs.cpio"),
        "initramfs.cpio",
    )
    .file(artefact(static_dir().join("atoll")), "atoll")
    .unwrap()
    .file(artefact(static_dir().join("atoll-pty")), "atoll-pty")
    .unwrap()
    .file(f.store.clone(), "store")
    .unwrap()
    .timeout(Duration::from_secs(900));
    let prelude =
        "export ATOLL_STORE=$ATOLL_ARTIFACTS/store ATOLL_KERNEL=$ATOLL_ARTIFACTS/vmlinux \
         ATOLL_INITRAMFS=$ATOLL_ARTIFACTS/initramfs.cpio ATOLL_VMM=$ATOLL_ARTIFACTS/atoll-vmm \
         ATOLL_RUN_DIR=/run/atoll\n";
    run(runner, &format!("{SCENARIO_SH}{prelude}{script}")).output
}

/// On the host itself, where the host's KVM cannot run the guest (KVM-PVM, or no
/// /dev/kvm): `atoll run` fails fast with the VMM's one-line explanation and leaves no
/// pod behind. Where it can, the same command runs the container.
#[test]
fn atoll_run_on_this_host_runs_or_says_at_once_why_it_cannot() {
    let f = fixture();
    let run_dir = tempfile::tempdir().unwrap();
    let start = std::time::Instant::now();
    let out = std::process::Command::new(artefact(static_dir().join("atoll")))
        .args(["run", "busybox", "--", "echo", "on-the-host"])
        .env("ATOLL_STORE", &f.store)
        .env("ATOLL_RUN_DIR", run_dir.path())
        .env("ATOLL_KERNEL", artefact(build_dir().join("vmlinux")))
        .env(
            "ATOLL_INITRAMFS",
            artefact(build_dir().join("initramfs.cpio")),
        )
        .env("ATOLL_VMM", artefact(static_dir().join("atoll-vmm")))
        .output()
        .unwrap();
    let elapsed = start.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("{err}");
    let pods = run_dir.path().join("pods");
    let left = std::fs::read_dir(&pods).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "no pod directory is left behind");
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    if pvm || !std::path::Path::new("/dev/kvm").exists() {
        assert_eq!(out.status.code(), Some(125), "{err}");
        assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(
            err.contains(if pvm { "KVM-PVM" } else { "/dev/kvm" }),
            "{err}"
        );
    } else {
        assert_eq!(out.status.code(), Some(0), "{err}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "on-the-host\n");
    }
}

// ---- Group 1: running, statuses, image config, streams, layers ----

fn basics() -> &'static str {
    static OUT: OnceLock<String> = OnceLock::new();
    OUT.get_or_init(|| {
        in_pod_node(&format!(
            "A=./atoll; \
             big_run() {{ for a in 1 2; do $A run busybox -- seq 1 1500000 2>big.err | $1 > big.out; \
                 if [ $a = 1 ] && grep -q 'guest triple-faulted' big.err; then retried=$((retried+1)); continue; fi; \
                 cat big.out; cat big.err; return; done; }}; \
             big_stdout() {{ retried=0; big_run md5sum; seq 1 1500000 | md5sum; big_run 'wc -c'; echo retried=$retried; }}; \
             scenario hello $A run busybox -- echo hello; \
             scenario exit3 $A run busybox -- sh -c 'exit 3'; \
             scenario missing $A run busybox -- /no/such/program; \
             scenario streams sh -c \"$A run busybox -- sh -c 'echo to-out; echo to-err >&2' 2>err.txt; \
                echo status=\\$?; echo err=\\$(cat err.txt)\"; \
             scenario config $A run test/config; \
             scenario config_env $A run -e GREETING=yo test/config; \
             scenario config_args $A run test/config -- 'echo args replace cmd'; \
             scenario nonroot_write $A run --entrypoint /bin/sh test/config -- -c 'touch /etc/x'; \
             scenario root_write $A run -u 0 --entrypoint /bin/sh test/config -- -c 'touch /etc/x && echo wrote'; \
             scenario big_stdout big_stdout; \
             scenario stdin sh -c \"seq 1 100000 | $A run -i busybox -- md5sum; seq 1 100000 | md5sum\"; \
             scenario sigpipe $A run busybox -- grep SigIgn /proc/self/status; \
             scenario oom_adj $A run busybox -- cat /proc/self/oom_score_adj; \
             scenario stdin_read sh -c \"echo typed | $A run -i busybox -- sh -c 'read x; echo got:\\$x'\"; \
             scenario whiteouts $A run test/whiteouts -- sh -c '{list}' -- /data; \
             scenario whiteouts_in_guest $A run --unpack-in-guest test/whiteouts -- sh -c '{list}' -- /data; \
             scenario no_mkfs_falls_back sh -c \"PATH=/nonexistent $A run test/unconverted -- cat /hello\"; \
             scenario pidns $A run busybox -- sh -c 'echo pid=$$; ps -o pid,comm | wc -l'",
            list = oci::LIST_SCRIPT.replace('\'', "'\\''"),
        ))
    })
}

#[test]
fn echo_hello_prints_hello_and_exits_zero() {
    let (out, status) = scenario(basics(), "hello");
    assert_eq!(out, "hello\n");
    assert_eq!(status, 0);
}

#[test]
fn the_container_exit_status_is_the_exit_status() {
    assert_eq!(scenario(basics(), "exit3").1, 3);
}

#[test]
fn a_missing_program_fails_with_127_and_says_so() {
    let (out, status) = scenario(basics(), "missing");
    assert_eq!(status, 127, "{out}");
    assert!(out.contains("/no/such/program"), "{out}");
}

#[test]
fn stdout_and_stderr_stay_apart() {
    let (out, _) = scenario(basics(), "streams");
    assert!(out.starts_with("to-out\n"), "{out}");
    assert!(out.contains("status=0\n"), "{out}");
    assert!(out.contains("err=to-err\n"), "{out}");
}

#[test]
fn image_config_entrypoint_cmd_env_workdir_user_are_honoured() {
    let (out, status) = scenario(basics(), "config");
    assert_eq!(out, "hi from /work as 65534:65534\n");
    assert_eq!(status, 0);
    let (out, _) = scenario(basics(), "config_env");
    assert_eq!(
        out, "yo from /work as 65534:65534\n",
        "-e overrides the image env"
    );
    let (out, _) = scenario(basics(), "config_args");
    assert_eq!(
        out, "args replace cmd\n",
        "args replace Cmd, Entrypoint stays"
    );
}

#[test]
fn a_non_root_user_cannot_write_where_root_can() {
    let (out, status) = scenario(basics(), "nonroot_write");
    assert_ne!(status, 0, "{out}");
    assert!(out.contains("Permission denied"), "{out}");
    let (out, status) = scenario(basics(), "root_write");
    assert_eq!((out, status), ("wrote\n", 0));
}

#[test]
fn ten_mib_of_stdout_arrive_intact_and_in_order() {
    let (out, status) = scenario(basics(), "big_stdout");
    let lines: Vec<&str> = out.lines().collect();
    // A run whose guest VM triple-faulted (the nested node's emulation does that to
    // a few percent of 10 MiB streams, output intact or not) is run once more, and
    // said so past the harness's capture; a second one fails the test.
    let retried: u32 = value_of(out, "retried").parse().unwrap();
    if retried > 0 {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr().lock(),
            "big_stdout: {retried} run(s) repeated after the guest VM triple-faulted"
        );
    }
    assert!(retried <= 1, "{out}");
    assert_eq!(lines.len(), 4, "{out}");
    assert_eq!(
        lines[0], lines[1],
        "container output md5 equals the local one"
    );
    let bytes: u64 = lines[2].trim().parse().unwrap();
    assert!(bytes >= 10 << 20, "{bytes} bytes");
    assert_eq!(status, 0);
}

#[test]
fn containers_start_with_sigpipe_at_its_default() {
    // Rust ignores SIGPIPE and an ignored signal survives exec: the agent must not
    // pass that on (a `yes | head` would spin on EPIPE instead of ending).
    let (out, status) = scenario(basics(), "sigpipe");
    assert_eq!(status, 0, "{out}");
    let mask = out
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no SigIgn line: {out}"));
    assert_eq!(
        mask & (1 << (libc::SIGPIPE - 1)),
        0,
        "SIGPIPE ignored: {out}"
    );
}

#[test]
fn containers_are_not_shielded_from_the_oom_killer_like_the_agent() {
    let (out, status) = scenario(basics(), "oom_adj");
    assert_eq!(status, 0, "{out}");
    assert_eq!(out.trim(), "0", "the agent's -1000 is not inherited: {out}");
}

#[test]
fn stdin_piped_in_is_read_by_the_container() {
    let (out, _) = scenario(basics(), "stdin");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert_eq!(lines[0], lines[1]);
    assert_eq!(scenario(basics(), "stdin_read").0, "got:typed\n");
}

#[test]
fn three_layers_with_whiteouts_give_exactly_umocis_tree() {
    let (out, status) = scenario(basics(), "whiteouts");
    assert_eq!(status, 0, "{out}");
    assert_eq!(out, fixture().whiteout_tree);
}

#[test]
fn layers_unpacked_in_the_guest_give_exactly_umocis_tree() {
    let (out, status) = scenario(basics(), "whiteouts_in_guest");
    assert_eq!(status, 0, "{out}");
    assert_eq!(out, fixture().whiteout_tree);
}

#[test]
fn without_mkfs_erofs_an_unconverted_image_is_unpacked_in_the_guest() {
    let (out, status) = scenario(basics(), "no_mkfs_falls_back");
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("mkfs.erofs is not installed"), "{out}");
    assert!(out.ends_with("from layers\n"), "{out}");
}

#[test]
fn the_container_has_its_own_pid_namespace() {
    let (out, _) = scenario(basics(), "pidns");
    assert!(out.starts_with("pid=1\n"), "{out}");
}

// ---- Group 2: seccomp, cgroup limits, pods ----

fn isolation() -> &'static str {
    static OUT: OnceLock<String> = OnceLock::new();
    OUT.get_or_init(|| {
        in_pod_node(
            "A=./atoll; \
             echo '{\"defaultAction\":\"SCMP_ACT_ALLOW\",\"syscalls\":[{\"names\":[\"mkdir\",\"mkdirat\"],\"action\":\"SCMP_ACT_ERRNO\",\"errnoRet\":1}]}' > nomkdir.json; \
             scenario seccomp_custom $A run --seccomp nomkdir.json busybox -- mkdir /tmp/d; \
             scenario seccomp_custom_off $A run busybox -- sh -c 'mkdir /tmp/d && echo made'; \
             scenario seccomp_default $A run busybox -- dmesg; \
             scenario seccomp_unconfined sh -c \"$A run --seccomp unconfined busybox -- dmesg | grep -c Linux\"; \
             scenario oom $A run --memory-limit 32m busybox -- sh -c 'x=$(yes | head -c 100000000); echo survived'; \
             scenario within_limit $A run --memory-limit 32m busybox -- sh -c 'x=$(yes 2>/dev/null | head -c 1000000); echo fine'; \
             scenario tmpfs_shared $A run --tmpfs /shared --sidecar 'echo from-sidecar > /shared/x' busybox -- \
                sh -c 'for i in 1 2 3 4 5 6 7 8 9 10; do [ -s /shared/x ] && break; sleep 1; done; cat /shared/x; grep -c \" /shared tmpfs \" /proc/mounts'; \
             scenario ulimit $A run --ulimit nofile=100:200 busybox -- sh -c 'ulimit -n; ulimit -Hn'; \
             scenario cap_drop $A run --cap-drop CHOWN busybox -- chown 65534 /tmp; \
             scenario cap_default $A run busybox -- sh -c 'chown 65534 /tmp && echo chowned'; \
             scenario read_only $A run --read-only busybox -- touch /x; \
             scenario pids_limit $A run --pids-limit 7 busybox -- cat /sys/fs/cgroup/pids.max; \
             scenario pod_localhost $A run --sidecar 'echo pong-from-sidecar | nc -l -p 7000' busybox -- \
                sh -c 'for i in 1 2 3 4 5 6 7 8 9 10; do nc 127.0.0.1 7000 && exit 0; sleep 1; done; exit 1'; \
             stall_once() { rm -rf /run/atoll/logs; \
                $A run --memory-limit 32m busybox -- sh -c 'cur=$(cat /sys/fs/cgroup/memory.current); \
                  file=$(grep -w ^file /sys/fs/cgroup/memory.stat | cut -d\\  -f2); \
                  head -c $((33554432 - cur + file - 32768)) /dev/zero > /dev/shm/fill; \
                  yes | head -c 300000000 | wc -c; echo finished'; \
                echo \"status=$?\"; grep -h 'agent: killed container' /run/atoll/logs/*.console; }; \
             stall_tries() { for t in 1 2 3; do echo \"=== attempt $t\"; o=$(stall_once 2>&1); echo \"$o\"; \
                case \"$o\" in *'agent: killed container'*) return 0;; esac; done; return 1; }; \
             scenario stall stall_tries",
        )
    })
}

#[test]
fn a_syscall_the_custom_profile_forbids_fails_in_the_container() {
    let (out, status) = scenario(isolation(), "seccomp_custom");
    assert_ne!(status, 0, "{out}");
    assert!(out.contains("Operation not permitted"), "{out}");
    let (out, status) = scenario(isolation(), "seccomp_custom_off");
    assert_eq!((out, status), ("made\n", 0), "allowed without the profile");
}

#[test]
fn the_default_profile_refuses_syslog_that_unconfined_allows() {
    let (out, status) = scenario(isolation(), "seccomp_default");
    assert_ne!(status, 0, "{out}");
    assert!(out.contains("Operation not permitted"), "{out}");
    let (out, status) = scenario(isolation(), "seccomp_unconfined");
    assert_eq!(status, 0, "{out}");
    assert_ne!(out.trim(), "0", "the kernel log is readable: {out}");
}

#[test]
fn exceeding_the_memory_limit_is_reported_as_an_oom_kill() {
    let (out, status) = scenario(isolation(), "oom");
    assert_eq!(status, 137, "{out}");
    assert!(out.contains("OOM"), "{out}");
    assert!(!out.contains("survived"), "{out}");
    let (out, status) = scenario(isolation(), "within_limit");
    assert_eq!((out, status), ("fine\n", 0));
}

/// A container held at its limit by its own page cache: shared memory fills all but
/// 32 KiB of the limit not taken by page cache, so the pipeline's processes keep
/// evicting each other's program text and reading it back, and reclaim never fails
/// outright, so the kernel's OOM killer does not act. The agent's memory-stall watch
/// ends it (docs/guest-contract.md, "Memory-stall relief"). Now and then the kernel
/// does find nothing to reclaim and kills first (in the node, with 32 KiB left: none
/// of 5 tries; 16 KiB: 1 of 3; 128 KiB: 1 of 2): that is an OOM kill too, and the try
/// is repeated, up to 3 times.
#[test]
fn a_container_stuck_at_its_memory_limit_is_ended_and_reported_oom_killed() {
    let (out, status) = scenario(isolation(), "stall");
    assert_eq!(
        status, 0,
        "no try ended by the agent's memory-stall watch: {out}"
    );
    let tries: Vec<&str> = out.split("=== attempt ").skip(1).collect();
    assert!(!tries.is_empty(), "{out}");
    for t in &tries {
        assert!(t.contains("status=137\n"), "{t}");
        assert!(t.contains("atoll: container was OOM-killed"), "{t}");
        assert!(!t.contains("finished"), "{t}");
    }
    let last = tries.last().unwrap();
    assert!(
        last.contains("agent: killed container main: stuck at its memory limit"),
        "{last}"
    );
    assert!(last.contains("for 30 s"), "{last}");
}

#[test]
fn a_tmpfs_volume_is_shared_by_the_containers_of_a_pod() {
    let (out, status) = scenario(isolation(), "tmpfs_shared");
    assert_eq!((out, status), ("from-sidecar\n1\n", 0));
}

#[test]
fn rlimits_capabilities_read_only_root_and_pids_limit_apply() {
    assert_eq!(scenario(isolation(), "ulimit"), ("100\n200\n", 0));
    let (out, status) = scenario(isolation(), "cap_drop");
    assert_ne!(status, 0, "{out}");
    assert!(out.contains("Operation not permitted"), "{out}");
    assert_eq!(scenario(isolation(), "cap_default"), ("chowned\n", 0));
    let (out, status) = scenario(isolation(), "read_only");
    assert_ne!(status, 0, "{out}");
    assert!(out.contains("Read-only file system"), "{out}");
    assert_eq!(scenario(isolation(), "pids_limit"), ("7\n", 0));
}

#[test]
fn two_containers_of_one_pod_reach_each_other_on_localhost() {
    let (out, status) = scenario(isolation(), "pod_localhost");
    assert!(out.contains("pong-from-sidecar"), "{out}");
    assert_eq!(status, 0, "{out}");
}

// ---- Group 3: lifecycle ----

fn lifecycle() -> &'static str {
    static OUT: OnceLock<String> = OnceLock::new();
    OUT.get_or_init(|| {
        in_pod_node(
            "A=./atoll; \
             ls /tmp | sort > tmp.before; \
             scenario sigterm sh -c \"$A run --name victim busybox -- sleep 1000 & pid=\\$!; \
                for i in \\$(seq 1 60); do $A ps | grep victim | grep -q running && break; sleep 1; done; \
                $A ps; ps | grep -c '[a]toll-vmm'; \
                kill -TERM \\$pid; wait \\$pid; echo atoll=\\$?; \
                echo vmm=\\$(ps | grep -c '[a]toll-vmm'); \
                echo pods=\\$(ls /run/atoll/pods | wc -l); \
                echo socks=\\$(find /run/atoll -type s | wc -l); \
                ls /tmp | sort > tmp.after; echo tmpdiff=\\$(diff tmp.before tmp.after | grep -c '^[+]')\"; \
             scenario killed sh -c \"$A run --name target busybox -- sleep 1000 & pid=\\$!; \
                until $A kill -s KILL target 2>/dev/null; do sleep 1; done; wait \\$pid; echo atoll=\\$?\"; \
             scenario wedged sh -c \"$A run --name frozen --guest-timeout 6 busybox -- sleep 1000 2>wedged.err & pid=\\$!; \
                for i in \\$(seq 1 60); do $A ps | grep frozen | grep -q running && break; sleep 1; done; \
                kill -STOP \\$(pidof atoll-vmm); t0=\\$(date +%s); wait \\$pid; echo atoll=\\$?; \
                echo secs=\\$((\\$(date +%s) - t0)); cat wedged.err; \
                echo vmm=\\$(pidof atoll-vmm | wc -w); echo pods=\\$(ls /run/atoll/pods | wc -l)\"; \
             scenario logs sh -c \"$A run --name chatty busybox -- echo logged-line >/dev/null; $A logs chatty\"; \
             scenario ps_empty $A ps",
        )
    })
}

#[test]
fn sigterm_to_atoll_run_stops_the_vm_and_leaves_nothing_behind() {
    let (out, _) = scenario(lifecycle(), "sigterm");
    assert!(out.contains("victim"), "`atoll ps` listed the pod: {out}");
    let value = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("no {k}= in {out}"))
    };
    assert_eq!(value("vmm"), "0", "no atoll-vmm left: {out}");
    assert_eq!(value("pods"), "0", "no pod directory left: {out}");
    assert_eq!(value("socks"), "0", "no socket left: {out}");
    assert_eq!(value("tmpdiff"), "0", "no temp file left: {out}");
    let status: i32 = value("atoll").parse().unwrap();
    assert!(status == 143 || status == 137, "{out}");
}

#[test]
fn a_container_killed_by_a_signal_reports_128_plus_n() {
    let (out, _) = scenario(lifecycle(), "killed");
    assert_eq!(word(out, "atoll"), Some("137"), "SIGKILL: 128 + 9: {out}");
}

/// A guest that stops answering (its VMM frozen with SIGSTOP: the sockets stay,
/// nothing answers) is declared dead by `atoll run`'s liveness checks after
/// `--guest-timeout`, its VM killed and the pod removed, with the reason.
#[test]
fn a_guest_that_stops_answering_ends_the_pod_with_the_reason() {
    let (out, _) = scenario(lifecycle(), "wedged");
    assert_ne!(word(out, "atoll"), Some("0"), "{out}");
    assert!(word(out, "atoll").is_some(), "{out}");
    assert!(out.contains("the guest stopped answering"), "{out}");
    let secs: u64 = value_of(out, "secs").parse().unwrap();
    // 6 s of silence, plus the emulated node's slowness; never the 1000 s sleep.
    assert!(
        (5..=60).contains(&secs),
        "declared dead after {secs} s: {out}"
    );
    assert_eq!(
        value_of(out, "vmm"),
        "0",
        "the frozen VMM was killed: {out}"
    );
    assert_eq!(value_of(out, "pods"), "0", "the pod was removed: {out}");
}

#[test]
fn logs_of_an_ended_pod_are_kept() {
    let (out, _) = scenario(lifecycle(), "logs");
    assert!(out.contains("logged-line"), "{out}");
}

#[test]
fn no_pod_is_listed_once_all_have_ended() {
    let (out, status) = scenario(lifecycle(), "ps_empty");
    assert_eq!(status, 0, "{out}");
    // `atoll ps` ran (its header is there) and listed nothing under it.
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "only the header: {out}");
    assert!(lines[0].starts_with("POD ID"), "{out}");
}

// ---- Group 4: exec, terminals, pod networking ----

/// The node's side of group 4, sourced by the node's shell (so `scenario` is there).
/// `atoll-pty` plays a user at a terminal: the node has none.
const NETWORK_AND_EXEC: &str = r#"
A=./atoll
P=./atoll-pty
# atoll-pty needs pseudo-terminals, which the node does not mount.
[ -e /dev/pts/ptmx ] || { mkdir -p /dev/pts; mount -t devpts devpts /dev/pts; }
# The host's DNS servers go to the pod; a loopback one (a local stub) does not.
printf 'nameserver 127.0.0.53\nnameserver 192.0.2.53\n' >/etc/resolv.conf
running() {
  for i in $(seq 1 120); do
    $A ps | awk -v n="$1" '$2 == n && $4 == "running" {f=1} END {exit !f}' && return 0
    sleep 1
  done
  echo "pod $1 never ran"; return 1
}

$A run --name svc --cpus 1 busybox -- sh -c 'echo shared-data >/tmp/shared; echo main-pid=$$; exec sleep 1000' >svc.out 2>&1 &
svc=$!
running svc
# The pod's VMM from outside: its own uid, its cgroup leaf and limits, its root.
confined() {
  vmm=$(pidof atoll-vmm); echo vmms=$(echo $vmm | wc -w)
  echo uid=$(awk '/^Uid:/ {print $2}' /proc/$vmm/status)
  cg=$(cut -d: -f3 /proc/$vmm/cgroup); echo cgroup=$cg
  echo memory_max=$(cat /sys/fs/cgroup$cg/memory.max) pids_max=$(cat /sys/fs/cgroup$cg/pids.max)
  echo cpu_max=$(tr ' ' / < /sys/fs/cgroup$cg/cpu.max) procs=$(wc -l < /sys/fs/cgroup$cg/cgroup.procs)
  echo root=[$(ls -A /proc/$vmm/root/ | tr '\n' ' ')] run0=[$(ls -A /proc/$vmm/root/run/0 | tr '\n' ' ')]
}
scenario confined confined
scenario exec_fs $A exec svc sh -c 'cat /tmp/shared; echo exec-pid=$$; echo init=$(cat /proc/1/cmdline | tr "\0" " ")'
scenario exec_status $A exec svc sh -c 'exit 7'
scenario exec_env $A exec -e FOO=bar -w /tmp svc sh -c 'echo foo=$FOO pwd=$(pwd) path=$PATH'
scenario exec_stdin sh -c "echo typed | $A exec -i svc sh -c 'read x; echo got:\$x'"
scenario exec_tty $P --rows 20 --cols 70 --expect ready --send 'hello\r' -- \
  $A exec -i -t svc sh -c 'tty; stty size; echo ready; read x; echo got:$x; exit 4'
$A stop svc >/dev/null
wait $svc
scenario confined_gone sh -c 'echo leaves=$(find /sys/fs/cgroup/atoll -mindepth 1 -type d | wc -l) uids=$(ls /run/atoll/uids | wc -l)'
scenario exec_main cat svc.out

scenario tty_run $P --rows 33 --cols 101 --expect ready --resize 40x120 --send 'typed\r' -- \
  $A run -i -t busybox -- sh -c 'tty; stty size; echo ready; read x; i=0; \
    while [ "$(stty size)" != "40 120" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; \
    stty size; echo got:$x; exit 3'
scenario tty_ctrl_c $P --expect ready --send '\x03' -- \
  $A run -i -t busybox -- sh -c 'trap "echo got-sigint; exit 42" INT; echo ready; while :; do sleep 1; done'

scenario hostname_only $A run --hostname solo busybox -- hostname

$A run --net --name web busybox -- sh -c 'echo hostname=$(hostname); cat /etc/resolv.conf; \
  mkdir -p /tmp/www; echo hello-from-pod >/tmp/www/index.html; exec httpd -f -p 8080 -h /tmp/www' >web.out 2>&1 &
web=$!
running web
scenario net_reach sh -c "addr=\$($A ps | awk '\$2 == \"web\" {print \$6}'); echo addr=\$addr; echo taps=\$(ls /sys/class/net | grep -c ^atl); \
  ping -c 1 -W 10 \$addr >/dev/null && echo ping=ok; \
  for i in \$(seq 1 20); do wget -q -O - http://\$addr:8080/ && break; sleep 1; done"
$A stop web >/dev/null
wait $web
scenario net_inside cat web.out
scenario net_gone sh -c 'echo taps=$(ls /sys/class/net | grep -c ^atl); echo pods=$(ls /run/atoll/pods | wc -l)'
scenario net_failed sh -c "$A run --net busybox -- /no/such/program; echo status=\$?; echo taps=\$(ls /sys/class/net | grep -c ^atl)"

# A failed exec leaves libcontainer's process a zombie child of the agent, which
# reaps it: the pod must still stop normally afterwards.
$A run --name bad busybox -- sleep 1000 >/dev/null 2>&1 &
bad=$!
running bad
scenario exec_missing $A exec bad /no/such/program
scenario stop_after_failed_exec sh -c "$A stop bad >/dev/null; echo stop=\$?; echo pods=\$(ls /run/atoll/pods | wc -l)"
wait $bad

# A VMM whose vCPU thread leaves its seccomp filter (the hidden test switch) as the
# guest's init starts the agent: the pod says why it ended.
printf '#!/bin/sh\nexec %s/atoll-vmm --test-seccomp-trip "$@"\n' "$ATOLL_ARTIFACTS" >trip-vmm
chmod +x trip-vmm
scenario seccomp_trip sh -c "ATOLL_VMM=\$PWD/trip-vmm $A run --cold busybox -- echo must-not-run; echo status=\$?; \
  echo vmms=\$(pidof atoll-vmm | wc -w); echo pods=\$(ls /run/atoll/pods | wc -l)"
# The same while the container runs: the VMM dies under the pod.
printf '#!/bin/sh\nexec %s/atoll-vmm --test-seccomp-trip-after 20 "$@"\n' "$ATOLL_ARTIFACTS" >late-trip-vmm
chmod +x late-trip-vmm
scenario seccomp_late sh -c "ATOLL_VMM=\$PWD/late-trip-vmm $A run --cold busybox -- sh -c 'echo container-up; sleep 120'; \
  echo status=\$?; echo vmms=\$(pidof atoll-vmm | wc -w); echo pods=\$(ls /run/atoll/pods | wc -l)"
"#;

#[test]
fn a_pods_vmm_runs_as_its_own_uid_in_its_own_cgroup_leaf_with_an_empty_root() {
    let (out, status) = scenario(network_and_exec(), "confined");
    assert_eq!(status, 0, "{out}");
    assert_eq!(word(out, "vmms"), Some("1"), "{out}");
    let uid: u32 = word(out, "uid").unwrap().parse().unwrap();
    assert!(
        uid >= 2_000_000_000,
        "a uid of the pods' range, not root: {out}"
    );
    let cgroup = word(out, "cgroup").unwrap();
    assert!(cgroup.starts_with("/atoll/"), "{out}");
    // `atoll run`'s default 256 MiB guest + 128 MiB for the VMM itself.
    assert_eq!(
        word(out, "memory_max"),
        Some(&*((384u64 << 20).to_string())),
        "{out}"
    );
    assert_eq!(word(out, "pids_max"), Some("17"), "16 + 1 vCPU: {out}");
    assert_eq!(
        word(out, "cpu_max"),
        Some("110000/100000"),
        "--cpus 1 + 10%: {out}"
    );
    assert_eq!(word(out, "procs"), Some("1"), "the VMM alone: {out}");
    assert!(out.contains("root=[run ]"), "{out}");
    assert!(out.contains("run0=["), "{out}");
    assert!(
        out.contains("vsock.sock"),
        "its pod directory, at /run/0: {out}"
    );
    let (out, status) = scenario(network_and_exec(), "confined_gone");
    assert_eq!(status, 0, "{out}");
    assert_eq!(
        word(out, "leaves"),
        Some("0"),
        "the leaf went with the pod: {out}"
    );
    assert_eq!(word(out, "uids"), Some("0"), "and its uid claim: {out}");
}

#[test]
fn a_vmm_stopped_by_its_seccomp_filter_is_reported_by_the_pod() {
    let (out, _) = scenario(network_and_exec(), "seccomp_trip");
    assert!(
        out.contains("the vcpu thread made system call") && out.contains("seccomp filter"),
        "{out}"
    );
    assert!(!out.contains("must-not-run"), "{out}");
    assert_eq!(
        word(out, "status"),
        Some("125"),
        "atoll run's own failure: {out}"
    );
    assert_eq!(word(out, "vmms"), Some("0"), "{out}");
    assert_eq!(word(out, "pods"), Some("0"), "{out}");
}

#[test]
fn a_vmm_that_dies_under_a_running_pod_is_reported_with_its_reason() {
    let (out, _) = scenario(network_and_exec(), "seccomp_late");
    assert!(
        out.contains("container-up"),
        "the container ran first: {out}"
    );
    assert!(
        out.contains("the pod's VM ended: atoll-vmm: error: the devices thread made system call"),
        "{out}"
    );
    assert_eq!(word(out, "status"), Some("125"), "{out}");
    assert_eq!(word(out, "vmms"), Some("0"), "{out}");
    assert_eq!(word(out, "pods"), Some("0"), "{out}");
}

fn network_and_exec() -> &'static str {
    static OUT: OnceLock<String> = OnceLock::new();
    OUT.get_or_init(|| {
        in_pod_node(&format!(
            "cat >group4.sh <<'EOS'\n{NETWORK_AND_EXEC}\nEOS\n. ./group4.sh"
        ))
    })
}

#[test]
fn exec_runs_in_the_same_container_as_another_process() {
    let (out, status) = scenario(network_and_exec(), "exec_fs");
    assert_eq!(status, 0, "{out}");
    assert!(
        out.starts_with("shared-data\n"),
        "sees the main container's files: {out}"
    );
    let pid: u32 = value_of(out, "exec-pid").parse().unwrap();
    assert_ne!(pid, 1, "not the main process: {out}");
    assert_eq!(
        value_of(out, "init").trim(),
        "sleep 1000",
        "in the main container's PID namespace"
    );
    let (main, _) = scenario(network_and_exec(), "exec_main");
    assert!(main.contains("main-pid=1\n"), "{main}");
}

#[test]
fn exec_exit_status_comes_back() {
    assert_eq!(scenario(network_and_exec(), "exec_status").1, 7);
    let (out, status) = scenario(network_and_exec(), "exec_missing");
    assert_eq!(status, 127, "{out}");
    assert!(out.contains("/no/such/program"), "{out}");
}

#[test]
fn a_pod_still_stops_after_an_exec_that_could_not_run() {
    let (out, _) = scenario(network_and_exec(), "stop_after_failed_exec");
    assert!(out.contains("stop=0\n"), "{out}");
    assert!(out.contains("pods=0\n"), "{out}");
}

#[test]
fn exec_starts_from_the_containers_env_with_options_on_top() {
    let (out, status) = scenario(network_and_exec(), "exec_env");
    assert_eq!(status, 0, "{out}");
    assert_eq!(value_of(out, "foo").split(' ').next(), Some("bar"), "{out}");
    assert!(out.contains("pwd=/tmp "), "{out}");
    let path = out.split("path=").nth(1).unwrap_or("").trim();
    assert!(path.contains("/bin"), "the container's PATH: {out}");
    let (out, _) = scenario(network_and_exec(), "exec_stdin");
    assert_eq!(out, "got:typed\n");
}

#[test]
fn exec_t_gives_a_terminal_of_the_callers_size() {
    let (out, status) = scenario(network_and_exec(), "exec_tty");
    assert_eq!(status, 4, "{out}");
    assert!(out.contains("/dev/pts/0"), "{out}");
    assert!(out.contains("20 70"), "{out}");
    assert!(out.contains("got:hello"), "typed input reached it: {out}");
}

#[test]
fn run_t_gives_a_terminal_that_follows_resizes_and_passes_keys() {
    let (out, status) = scenario(network_and_exec(), "tty_run");
    assert_eq!(status, 3, "{out}");
    assert!(out.contains("/dev/pts/0"), "{out}");
    assert!(out.contains("33 101"), "initial size: {out}");
    assert!(
        out.contains("40 120"),
        "SIGWINCH resized the container's tty: {out}"
    );
    assert!(out.contains("got:typed"), "{out}");
    // Raw mode: Ctrl-C is a byte for the container's terminal (its process gets
    // SIGINT), not a signal to atoll (which would stop the container with SIGTERM).
    let (out, status) = scenario(network_and_exec(), "tty_ctrl_c");
    assert!(out.contains("got-sigint"), "{out}");
    assert_eq!(status, 42, "{out}");
}

#[test]
fn hostname_sets_the_pods_hostname() {
    let (out, status) = scenario(network_and_exec(), "hostname_only");
    assert_eq!((out, status), ("solo\n", 0));
}

#[test]
fn net_pod_answers_ping_and_serves_http_to_the_host() {
    let (out, _) = scenario(network_and_exec(), "net_reach");
    let addr = value_of(out, "addr");
    assert!(
        addr.starts_with("10.") && addr.ends_with(".2"),
        "atoll ps shows the guest address: {out}"
    );
    assert_eq!(value_of(out, "taps"), "1", "one tap while it runs: {out}");
    assert_eq!(value_of(out, "ping"), "ok", "{out}");
    assert!(out.contains("hello-from-pod\n"), "{out}");
}

#[test]
fn net_pod_sees_its_hostname_and_the_hosts_dns() {
    let (out, _) = scenario(network_and_exec(), "net_inside");
    assert_eq!(value_of(out, "hostname"), "web", "{out}");
    assert!(out.contains("nameserver 192.0.2.53"), "{out}");
    assert!(!out.contains("127.0.0.53"), "no loopback resolver: {out}");
}

#[test]
fn net_tap_is_deleted_when_the_pod_ends_or_fails() {
    let (out, _) = scenario(network_and_exec(), "net_gone");
    assert_eq!(value_of(out, "taps"), "0", "{out}");
    assert_eq!(value_of(out, "pods"), "0", "{out}");
    let (out, _) = scenario(network_and_exec(), "net_failed");
    assert_eq!(value_of(out, "status"), "127", "{out}");
    assert_eq!(value_of(out, "taps"), "0", "{out}");
}
