//! End-to-end tests of the nested KVM node: they boot L1 under QEMU TCG for real
//! (about 3-8 s each on 2 cores). They force the nested node, so they exercise it on
//! any host that has QEMU, whatever `Where::detect` says.

use std::time::Duration;

use atoll_node::node::NodeError;
use atoll_node::{RunError, RunOutput, Runner, Where};

fn nested() -> Runner<'static> {
    Runner::new(Where::NestedNode("forced by the node tests".into()))
        .timeout(Duration::from_secs(600))
        .stream_to_stderr(false)
}

fn report(name: &str, out: &RunOutput) {
    eprintln!(
        "{name}: status {} total {} ms, node {:?}",
        out.status, out.total_ms, out.node
    );
}

#[test]
fn node_command_sees_dev_kvm_and_svm_and_returns_status() {
    let out = nested()
        .run("test -c /dev/kvm && grep -c -E 'svm' /proc/cpuinfo; exit 3")
        .expect("the nested node runs the command");
    report("kvm_and_svm", &out);
    assert_eq!(out.status, 3, "output: {}", out.output);
    // Two vCPUs, each advertising svm; nothing else (no kernel noise) in the output.
    assert_eq!(out.output, "2\n");
    let node = out.node.expect("ran in the node");
    assert_eq!(node.attempts, 1);
    assert!(node.boot_to_command_ms.is_some() && node.modules_ms.is_some());
}

#[test]
fn node_with_qemu_initialises_kvm_in_l1_and_carries_artifacts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tiny = dir.path().join("tiny.bin");
    std::fs::write(&tiny, [0x90u8; 100]).expect("write tiny.bin");
    let out = nested()
        .with_qemu(true)
        .file(&tiny, "img/tiny.bin")
        .expect("artifact")
        .run(concat!(
            "echo \"where=$ATOLL_WHERE size=$(wc -c < img/tiny.bin)\"\n",
            "qemu-system-x86_64 --version | head -n 1\n",
            "printf '%s\\n' '{\"execute\":\"qmp_capabilities\"}' '{\"execute\":\"query-kvm\"}' ",
            "'{\"execute\":\"quit\"}' | qemu-system-x86_64 -M microvm -accel kvm -cpu host ",
            "-m 64 -display none -nodefaults -S -qmp stdio\n",
            // Not a kernel: QEMU must fail on the image, i.e. after KVM initialised.
            "qemu-system-x86_64 -M microvm -accel kvm -cpu host -m 64 -display none ",
            "-nodefaults -no-reboot -kernel \"$ATOLL_ARTIFACTS/img/tiny.bin\"\n",
            "echo \"boot=$?\"\n",
        ))
        .expect("the nested node runs the command");
    report("with_qemu", &out);
    let o = &out.output;
    assert_eq!(out.status, 0, "output: {o}");
    assert!(o.contains("where=node size=100"), "output: {o}");
    assert!(o.contains("QEMU emulator version"), "output: {o}");
    assert!(
        o.contains("{\"return\": {\"enabled\": true, \"present\": true}}"),
        "output: {o}"
    );
    assert!(o.contains("invalid kernel header"), "output: {o}");
    assert!(
        !o.to_lowercase().contains("failed to initialize kvm"),
        "output: {o}"
    );
    assert!(o.split_whitespace().any(|w| w == "boot=1"), "output: {o}");
    let node = out.node.expect("ran in the node");
    assert!(
        node.initramfs_bytes > 20 << 20,
        "QEMU and its libraries are packed"
    );
}

#[test]
fn node_that_crashes_is_booted_again_then_reported_with_console_tail() {
    let mut notes = Vec::new();
    let r = Runner::new(Where::NestedNode("forced by the node tests".into()))
        .on_line(|src, line| {
            if src == atoll_node::Source::Retry {
                notes.push(line.to_owned());
            }
        })
        .run("echo before; echo c > /proc/sysrq-trigger; sleep 30");
    match r {
        Err(RunError::Node(NodeError::Vanished { attempts, tail, .. })) => {
            assert_eq!(attempts, atoll_node::node::MAX_ATTEMPTS);
            assert!(
                tail.contains("sysrq") || tail.contains("Kernel panic"),
                "tail: {tail}"
            );
        }
        other => panic!("expected a vanished node, got {other:?}"),
    }
    assert_eq!(
        notes.len(),
        atoll_node::node::MAX_ATTEMPTS as usize - 1,
        "a note per retry: {notes:?}"
    );
}
