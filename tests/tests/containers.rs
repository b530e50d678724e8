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
use common::{artefact, build_dir, kvm_runner, run, static_dir, with};

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
    .file(f.store.clone(), "store")
    .unwrap()
    .timeout(Duration::from_secs(900));
    let prelude = "export ATOLL_STORE=$ATOLL_ARTIFACTS/store ATOLL_KERNEL=$ATOLL_ARTIFACTS/vmlinux \
         ATOLL_INITRAMFS=$ATOLL_ARTIFACTS/initramfs.cpio ATOLL_VMM=$ATOLL_ARTIFACTS/atoll-vmm \
         ATOLL_RUN_DIR=/run/atoll; \
         scenario() { name=$1; shift; echo \"@@@ $name\"; \"$@\"; echo \"@@@ $name status=$?\"; }; ";
    run(runner, &format!("{prelude}{script}")).output
}

/// The output of scenario `name` and its status.
fn scenario<'a>(output: &'a str, name: &str) -> (&'a str, i32) {
    let start_marker = format!("@@@ {name}\n");
    let end_marker = format!("@@@ {name} status=");
    let start = output
        .find(&start_marker)
        .unwrap_or_else(|| panic!("scenario {name} did not run:\n{output}"))
        + start_marker.len();
    let end = output[start..]
        .find(&end_marker)
        .unwrap_or_else(|| panic!("scenario {name} did not end:\n{output}"))
        + start;
    let status = output[end + end_marker.len()..]
        .lines()
        .next()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("scenario {name}: no status"));
    (&output[start..end], status)
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
             scenario big_stdout sh -c \"$A run busybox -- seq 1 1500000 | md5sum; seq 1 1500000 | md5sum; \
                $A run busybox -- seq 1 1500000 | wc -c\"; \
             scenario stdin sh -c \"seq 1 100000 | $A run -i busybox -- md5sum; seq 1 100000 | md5sum\"; \
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
    assert_eq!(lines.len(), 3, "{out}");
    assert_eq!(
        lines[0], lines[1],
        "container output md5 equals the local one"
    );
    let bytes: u64 = lines[2].trim().parse().unwrap();
    assert!(bytes >= 10 << 20, "{bytes} bytes");
    assert_eq!(status, 0);
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
             scenario pod_localhost $A run --sidecar 'echo pong-from-sidecar | nc -l -p 7000' busybox -- \
                sh -c 'for i in 1 2 3 4 5 6 7 8 9 10; do nc 127.0.0.1 7000 && exit 0; sleep 1; done; exit 1'",
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
    assert!(out.contains("atoll=137"), "SIGKILL: 128 + 9: {out}");
}

#[test]
fn logs_of_an_ended_pod_are_kept() {
    let (out, _) = scenario(lifecycle(), "logs");
    assert!(out.contains("logged-line"), "{out}");
}

#[test]
fn no_pod_is_listed_once_all_have_ended() {
    let (out, status) = scenario(lifecycle(), "ps_empty");
    assert_eq!(status, 0);
    assert!(!out.contains("victim") && !out.contains("chatty"), "{out}");
}
