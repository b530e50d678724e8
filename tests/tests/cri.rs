//! End-to-end: atoll-cri, the CRI v1 server, driven by our own CRI client
//! (`atoll-crictl`, tonic over the Unix socket) through what kubelet does: pull
//! from a registry (Debian's docker-registry on 127.0.0.1, reached through a
//! mirror configured for `registry.k8s.io`), run a sandbox (a microVM cloned from
//! the warm pool), create and start two containers of one image, ExecSync (output,
//! exit code, timeout), the CRI log file, stats, log rotation, stop with a grace
//! period, remove; a VM killed under a running pod; atoll-cri killed with SIGKILL
//! and restarted (the pod is still there and answers); bad input. Pods are on a
//! CNI network (Debian's bridge and host-local plugins, a conflist in
//! /etc/cni/net.d): each gets an address, the node reaches it, pods reach each
//! other, and nothing of it is left when they go.
//!
//! The registry's storage is filled on the host (skopeo) and carried into the node,
//! where the same docker-registry serves it. One node run serves every scenario.

mod common;

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use common::{
    artefact, build_dir, kvm_runner, oci, run, scenario, static_dir, value_of, with, SCENARIO_SH,
};

const IMAGE: &str = "registry.k8s.io/e2e-test-images/busybox:1.29-2";
/// iptables' extensions (matches and targets, loaded at run time), which the CNI
/// portmap plugin's rules use.
const XTABLES_EXTENSIONS: &str = "/usr/lib/x86_64-linux-gnu/xtables";

const SCRIPT: &str = r#"
set +e
A=$ATOLL_ARTIFACTS
C="$A/atoll-crictl -r /run/atoll/atoll-cri.sock --timeout 120"
IMAGE=registry.k8s.io/e2e-test-images/busybox:1.29-2
ip link set lo up
mkdir -p /run/reg /tmp/logs /tmp/cfg
cp -r $A/registry /run/reg/data
/usr/bin/docker-registry serve $A/registry.yml >/run/reg/log 2>&1 &
for i in $(seq 100); do wget -q -O /dev/null http://127.0.0.1:5000/v2/ && break; sleep 0.1; done
cat > /tmp/cfg/atoll-cri.toml <<EOF
state_dir = "/var/lib/atoll/cri"
run_dir = "/run/atoll/cri"
image_store = "/var/lib/atoll/images"
kernel = "$A/vmlinux"
initramfs = "$A/initramfs.cpio"
vmm = "$A/atoll-vmm"
[sandbox]
guest_timeout_secs = 15
[registry.mirrors]
"registry.k8s.io" = ["http://127.0.0.1:5000"]
[metrics]
address = "127.0.0.1:1338"
EOF
export ATOLL_CACHE=/tmp/cache
start_cri() {
  $A/atoll-cri --config /tmp/cfg/atoll-cri.toml >>/tmp/cri.log 2>&1 &
  for i in $(seq 200); do $C version >/dev/null 2>&1 && return 0; sleep 0.05; done
  echo "atoll-cri did not start"; cat /tmp/cri.log; return 1
}
# until_state ID STATE [TRIES]: waits for a container state, TRIES (200) times 0.1 s
# (at least 20 s) at most.
until_state() {
  for i in $(seq ${3:-200}); do $C inspect $1 | grep -qx "state=$2" && return 0; sleep 0.1; done
  return 1
}
mkdir -p /etc/cni/net.d
cat > /etc/cni/net.d/10-pods.conflist <<EOF
{"cniVersion":"1.0.0","name":"pods","plugins":[
 {"type":"bridge","bridge":"cni0","isGateway":true,"ipMasq":false,
  "ipam":{"type":"host-local","ranges":[[{"subnet":"10.88.0.0/16"}]],"routes":[{"dst":"0.0.0.0/0"}]}},
 {"type":"portmap","capabilities":{"portMappings":true},"snat":true}]}
EOF
# portmap drives iptables (Debian's legacy backend here: the node has no nf_tables
# modules loaded), whose extensions it loads from the usual place.
ln -sf /usr/sbin/xtables-legacy-multi /usr/sbin/iptables
ln -sf /usr/sbin/xtables-legacy-multi /usr/sbin/iptables-save
ln -sf /usr/sbin/xtables-legacy-multi /usr/sbin/iptables-restore
mkdir -p /usr/lib/x86_64-linux-gnu; cp -r $A/xtables /usr/lib/x86_64-linux-gnu/xtables
cat > /tmp/cfg/pod.json <<EOF
{"metadata":{"name":"web","uid":"uid-1","namespace":"default","attempt":0},
 "hostname":"web","log_directory":"/tmp/logs/web","labels":{"app":"web"},
 "annotations":{"note":"kept as given"},
 "linux":{"resources":{"cpu_quota":50000,"cpu_period":100000},
  "sysctls":{"net.ipv4.ip_unprivileged_port_start":"80","kernel/shm_rmid_forced":"1"}},
 "dns_config":{"servers":["10.96.0.10"],"searches":["default.svc.cluster.local"],"options":["ndots:5","edns0"]}}
EOF
cat > /tmp/cfg/hostpid.json <<EOF
{"metadata":{"name":"hostpid","uid":"uid-5","namespace":"default","attempt":0},
 "linux":{"security_context":{"namespace_options":{"pid":"NODE"}}}}
EOF
cat > /tmp/cfg/badsysctl.json <<EOF
{"metadata":{"name":"badsysctl","uid":"uid-6","namespace":"default","attempt":0},
 "linux":{"sysctls":{"net.ipv4.no_such_sysctl":"1"}}}
EOF
cat > /tmp/cfg/pod4.json <<EOF
{"metadata":{"name":"shared","uid":"uid-7","namespace":"default","attempt":0},
 "linux":{"security_context":{"namespace_options":{"pid":"POD"}}}}
EOF
shared_json() { cat <<EOF
{"metadata":{"name":"$1"},"image":{"image":"$IMAGE"},"command":["sh","-c","$2"],
 "linux":{"security_context":{"namespace_options":{"pid":"POD"}}}}
EOF
}
shared_json one "exec sleep 3601" > /tmp/cfg/one.json
shared_json two "exec sleep 3602" > /tmp/cfg/two.json
shared_json brief "sleep 4321 & sleep 2" > /tmp/cfg/brief.json
cat > /tmp/cfg/grouponly.json <<EOF
{"metadata":{"name":"grouponly"},"image":{"image":"$IMAGE"},"command":["true"],
 "linux":{"security_context":{"run_as_group":{"value":100}}}}
EOF
cat > /tmp/cfg/peer.json <<EOF
{"metadata":{"name":"peer","uid":"uid-4","namespace":"default","attempt":0},
 "log_directory":"/tmp/logs/peer",
 "port_mappings":[{"protocol":"TCP","container_port":8080,"host_port":30080}]}
EOF
cat > /tmp/cfg/httpd.json <<EOF
{"metadata":{"name":"httpd"},"image":{"image":"$IMAGE"},
 "command":["sh","-c","mkdir -p /tmp/w; echo peer-says-hi > /tmp/w/index.html; exec httpd -f -p 8080 -h /tmp/w"]}
EOF
cat > /tmp/cfg/pod2.json <<EOF
{"metadata":{"name":"victim","uid":"uid-2","namespace":"default","attempt":0},
 "log_directory":"/tmp/logs/victim"}
EOF
cat > /tmp/cfg/a.json <<EOF
{"metadata":{"name":"ticker"},"image":{"image":"$IMAGE"},
 "command":["sh","-c","echo hello World; echo oops >&2; i=0; while true; do i=\$((i+1)); echo tick \$i; sleep 0.2; done"],
 "envs":[{"key":"GREETING","value":"hi"}],
 "log_path":"ticker/0.log","labels":{"c":"ticker"},
 "linux":{"security_context":{"supplemental_groups":[1234,5678],
  "masked_paths":["/proc/version"],"readonly_paths":["/root"]}}}
EOF
cat > /tmp/cfg/b.json <<EOF
{"metadata":{"name":"once"},"image":{"image":"$IMAGE"},
 "args":["sh","-c","echo done; exit 3"],"log_path":"once/0.log"}
EOF
cat > /tmp/cfg/oom.json <<EOF
{"metadata":{"name":"oom"},"image":{"image":"$IMAGE"},
 "args":["sh","-c","x=\$(yes | head -c 100000000); echo survived"],"log_path":"oom/0.log",
 "linux":{"resources":{"memory_limit_in_bytes":33554432}}}
EOF
cat > /tmp/cfg/quick.json <<EOF
{"metadata":{"name":"quick"},"image":{"image":"$IMAGE"},
 "args":["sh","-c","exit 0"],"log_path":"quick/0.log"}
EOF
cat > /tmp/cfg/pod3.json <<EOF
{"metadata":{"name":"early","uid":"uid-3","namespace":"default","attempt":0}}
EOF
cat > /tmp/cfg/never.json <<EOF
{"metadata":{"name":"x"},"image":{"image":"registry.k8s.io/never/pulled:1"}}
EOF
cat > /tmp/cfg/cat.json <<EOF
{"metadata":{"name":"cat"},"image":{"image":"$IMAGE"},"command":["sh","-c","echo ready; while read l; do echo \"echo:\$l\"; echo \"err:\$l\" >&2; done; echo bye"],
 "stdin":true,"stdin_once":true,"log_path":"cat/0.log"}
EOF
# Host mounts as kubelet lays them out: a ConfigMap by its atomic writer (a
# timestamped directory, ..data and per-key symlinks), a Secret-like file with its
# owner and mode, an emptyDir, a read-only hostPath file reached through a symlink.
V=/var/lib/kubelet/pods/uid-1/volumes
mkdir -p $V/kubernetes.io~configmap/cfg/..2026_12_05 $V/kubernetes.io~empty-dir/scratch
echo "a=1" > $V/kubernetes.io~configmap/cfg/..2026_12_05/a.conf
echo "s3cret" > $V/kubernetes.io~configmap/cfg/..2026_12_05/token
chown 0:1234 $V/kubernetes.io~configmap/cfg/..2026_12_05/token; chmod 0440 $V/kubernetes.io~configmap/cfg/..2026_12_05/token
ln -s ..2026_12_05 $V/kubernetes.io~configmap/cfg/..data
ln -s ..data/a.conf $V/kubernetes.io~configmap/cfg/a.conf
ln -s ..data/token $V/kubernetes.io~configmap/cfg/token
echo "one file" > /tmp/cfg/host-file.txt; ln -s /tmp/cfg/host-file.txt /tmp/cfg/host-link
vols_json() { cat <<EOF
{"metadata":{"name":"$1"},"image":{"image":"$IMAGE"},"command":["sh","-c","$2"],
 "mounts":[{"container_path":"/etc/cfg","host_path":"$V/kubernetes.io~configmap/cfg","readonly":true},
  {"container_path":"/etc/one.txt","host_path":"/tmp/cfg/host-link","readonly":true},
  {"container_path":"$3","host_path":"$V/kubernetes.io~empty-dir/scratch"}]}
EOF
}
vols_json vols "echo from-vols > /scratch/note; exec sleep 3600" /scratch > /tmp/cfg/vols.json
vols_json vols2 "exec sleep 3600" /shared > /tmp/cfg/vols2.json
cat > /tmp/cfg/rw.json <<EOF
{"metadata":{"name":"rw"},"image":{"image":"$IMAGE"},"command":["true"],
 "mounts":[{"container_path":"/data","host_path":"/tmp/cfg"}]}
EOF
cat > /tmp/cfg/sock.json <<EOF
{"metadata":{"name":"sock"},"image":{"image":"$IMAGE"},"command":["true"],
 "mounts":[{"container_path":"/run/x","host_path":"/run/atoll","readonly":true}]}
EOF
cat > /tmp/cfg/bidi.json <<EOF
{"metadata":{"name":"bidi"},"image":{"image":"$IMAGE"},"command":["true"],
 "mounts":[{"container_path":"/x","host_path":"/tmp/cfg","readonly":true,"propagation":"PROPAGATION_BIDIRECTIONAL"}]}
EOF
cat > /tmp/cfg/s.json <<EOF
{"metadata":{"name":"sleeper"},"image":{"image":"$IMAGE"},"command":["sleep","3600"]}
EOF

now_ms() { awk '{printf "%d", $1*1000}' /proc/uptime; }
# The VMM of sandbox $1 (its pod directory's state names it).
vmm_of() { sed -n 's/.*"vmm_pid": *\([0-9]*\).*/\1/p' /run/atoll/cri/pods/$1/state.json; }
# The set-up phases sandbox $1's VMM reports (its own account of its start).
vmm_phases() { ./atoll-vmm-api /run/atoll/cri/pods/$1/api.sock GET /metrics | grep -o '\["[a-z_]*",[0-9]*\]' | cut -d'"' -f2 | tr '\n' ' '; }
# atoll-vmm processes waiting in the pool (their cgroup leaf is a standby one) and
# the others (a sandbox's).
waiting_vmms() { n=0; for p in $(pidof atoll-vmm); do grep -q 'atoll/standby-' /proc/$p/cgroup && n=$((n+1)); done; echo $n; }
pod_vmms() { n=0; for p in $(pidof atoll-vmm); do grep -q 'atoll/standby-' /proc/$p/cgroup || n=$((n+1)); done; echo $n; }
version() { $C version; }
info() { $C info; }
runtime_config() { $C runtime-config; }
pull_missing() { $C pull registry.k8s.io/not/there:1; }
early_pod() {
  Q=$($C runp /tmp/cfg/pod3.json) || return 1
  echo "early=ok"
  $C create $Q /tmp/cfg/never.json /tmp/cfg/pod3.json; echo "create_rc=$?"
  $C rmp $Q
}
pull() {
  t0=$(now_ms); id=$($C pull $IMAGE) || return 1
  echo "pull_ms=$(( $(now_ms) - t0 ))"; echo "id=$id"
}
images() { $C images; $C inspecti $IMAGE; $C inspecti $($C pull $IMAGE); }
bad_handler() { $C runp --runtime runc /tmp/cfg/pod.json; }
runp() {
  t0=$(now_ms); P=$($C runp /tmp/cfg/pod.json) || return 1
  echo "runp_ms=$(( $(now_ms) - t0 ))"
  d=/proc/$(vmm_of $P)
  cg=$(cut -d: -f3 $d/cgroup)
  echo "vmm_uid=$(awk '/^Uid:/ {print $2}' $d/status)"
  echo "vmm_cpu_max=$(tr ' ' / < /sys/fs/cgroup$cg/cpu.max)"
  echo "vmm_cgroup=$cg"
  echo "vmm_from_pool=$(tr '\0' ' ' < $d/cmdline | grep -c -- --standby)"
  echo "uid_claim=$(readlink /run/atoll/cri/uids/$(awk '/^Uid:/ {print $2}' $d/status))"
  echo "pool_waiting=$(waiting_vmms)"
  echo "vmm_nice=$(cut -d' ' -f19 $d/stat)"
  for p in $(pidof atoll-vmm); do grep -q 'atoll/standby-' /proc/$p/cgroup && echo "waiting_nice=$(cut -d' ' -f19 /proc/$p/stat)"; done
  $C inspectp $P && $C pods --label app=web
}
runp_again() { $C runp /tmp/cfg/pod.json; }
create() {
  CA=$($C create $P /tmp/cfg/a.json /tmp/cfg/pod.json) || return 1
  CB=$($C create $P /tmp/cfg/b.json /tmp/cfg/pod.json) || return 1
  $C ps --pod $P
}
create_same_name() { $C create $P /tmp/cfg/a.json /tmp/cfg/pod.json; }
start_both() { $C start $CA && $C start $CB && until_state $CA CONTAINER_RUNNING && $C inspect $CA; }
start_twice() { $C start $CA; }
exited() { until_state $CB CONTAINER_EXITED && $C inspect $CB && cat /tmp/logs/web/once/0.log; }
exec_() {
  $C exec $CA -- sh -c 'echo -n "out $GREETING"; echo err >&2; exit 7'; rc=$?
  echo; echo "rc=$rc"
}
exec_stdout_only() { $C exec $CA -- echo -n hello 2>/tmp/err; echo; echo "stderr_bytes=$(wc -c </tmp/err)"; }
exec_timeout() {
  t0=$(now_ms); $C exec --timeout 1 $CA -- sleep 4321; echo "rc=$?"
  echo "took_ms=$(( $(now_ms) - t0 ))"
  $C exec $CA -- sh -c 'ps | grep -q "sleep 432[1]" && echo sleep-left || echo no-sleep-left'
}
# The guest agent's own figures (PodSandboxStatus verbose info) and atoll-cri's.
figures() {
  echo "$1_agent=$($C inspectp --verbose $P | sed -n 's/^info.agent=//p')"
  s=/proc/$(pidof atoll-cri)
  echo "$1_server_fds=$(ls $s/fd | wc -l)"
  echo "$1_server_rss_kib=$(awk '/^VmRSS:/ {print $2}' $s/status)"
}
# ExecSync as a liveness probe calls it, after a warm-up and 250 more times:
# nothing of the agent or the server may grow with the calls.
exec_many() {
  n=0; for i in $(seq 50); do $C exec $CA -- true && n=$((n+1)); done
  figures warm
  for i in $(seq 250); do $C exec $CA -- true && n=$((n+1)); done
  figures after
  echo "ok=$n"
}
# Exec through the streaming server: stdin in, stdout and stderr apart, the exit
# code on the error channel; over SPDY and WebSocket, and with the Go SPDY library.
exec_stream() {
  for t in spdy websocket; do
    echo "line-$t" | $C exec -i --transport $t $CA -- sh -c 'read l; echo "got $l $GREETING"; echo e-$l >&2; exit 5' 2>/tmp/err.$t
    echo "rc_$t=$?"; echo "err_$t=$(cat /tmp/err.$t)"
  done
  $C exec --stream --transport websocket $CA -- sh -c 'exit 0'; echo "rc_zero=$?"
  $C exec -t --size 100x30 $CA -- sh -c 'sleep 1; stty size; tty'; echo "rc_tty=$?"
  U=$($C exec -i --print-url $CA -- sh -c 'cat; echo " seen" >&2; exit 4') || return 1
  echo from-go | $A/spdy-peer exec $U 2>/tmp/err.go; echo "rc_go=$?"; echo "err_go=$(cat /tmp/err.go)"
  echo "again=$(echo x | $A/spdy-peer exec $U 2>&1)"
  $C exec -i $CA -- sh -c 'cat >/dev/null' </dev/zero & ex=$!
  sleep 2; kill -9 $ex; sleep 1
  echo "cat=$($C exec $CA -- sh -c 'ps | grep -q "cat$" && echo cat-left || echo no-cat-left')"
  echo "big_bytes=$(head -c 3000000 /dev/urandom | $C exec -i $CA -- sh -c 'cat | wc -c')"
  for i in 1 2 3 4 5 6; do
    n=$($C exec --stream $CA -- /bin/busybox head -c 8388608 /dev/zero 2>/tmp/big.err | wc -c)
    echo "big_out_$i=$n"; [ "$n" = 8388608 ] || { cat /tmp/big.err; tail -20 /run/atoll/cri/pods/$P/console.log; }
  done
}
log() { sleep 1; head -3 /tmp/logs/web/ticker/0.log; }
# What the pod and container configs set beyond the basics: DNS options and sysctls
# (pod-wide, in the VM), supplemental groups (the container's init and its execs),
# masked and read-only paths; and what a microVM pod refuses.
pod_settings() {
  $C exec $CA -- sh -c 'echo "resolv_options=$(grep ^options /etc/resolv.conf)"
    echo "port_start=$(cat /proc/sys/net/ipv4/ip_unprivileged_port_start)"
    echo "shm_rmid=$(cat /proc/sys/kernel/shm_rmid_forced)"
    echo "init_groups=$(sed -n "s/^Groups:[[:space:]]*//p" /proc/1/status | tr -s " " | sed "s/ $//")"
    echo "exec_groups=$(id -G)"
    echo "version_bytes=$(cat /proc/version | wc -c)"
    touch /root/x 2>/dev/null && echo root_write=allowed || echo root_write=refused
    touch /tmp/x 2>/dev/null && echo tmp_write=allowed || echo tmp_write=refused'
  $C runp /tmp/cfg/hostpid.json; echo "hostpid_rc=$?"
  $C runp /tmp/cfg/badsysctl.json; echo "badsysctl_rc=$?"
  echo "badsysctl_left=$($C pods | grep -c badsysctl)"
  $C create $P /tmp/cfg/grouponly.json /tmp/cfg/pod.json; echo "grouponly_rc=$?"
}
# An image volume: the image's disk on a slot of the VM, bound read-only.
image_volume() {
  I=$($C pull $IMAGE) || return 1
  cat > /tmp/cfg/imgvol.json <<EOF
{"metadata":{"name":"imgvol"},"image":{"image":"$IMAGE"},"command":["sleep","3600"],
 "mounts":[{"container_path":"/img","image":{"image":"$I"}}]}
EOF
  G=$($C create $P /tmp/cfg/imgvol.json /tmp/cfg/pod.json) && $C start $G || return 1
  until_state $G CONTAINER_RUNNING || return 1
  $C exec $G -- sh -c 'echo "img_busybox=$(ls /img/bin/busybox)"; echo "img_passwd=$(head -1 /img/etc/passwd)"
    touch /img/x 2>/dev/null && echo img_write=allowed || echo img_write=refused'
  $C inspect $G | grep '^mounts='
  $C stop -t 0 $G && $C rm $G && echo imgvol_removed
  sed 's/"image":{"image":"[^"]*"}}]/"image":{"image":"registry.k8s.io\/never\/pulled:1"}}]/' /tmp/cfg/imgvol.json > /tmp/cfg/imgvol2.json
  $C create $P /tmp/cfg/imgvol2.json /tmp/cfg/pod.json; echo "missing_rc=$?"
}
# A pod whose containers share its PID namespace (shareProcessNamespace): they see
# each other and a pause process as PID 1; one that did not ask sees only its own;
# a container's leftover processes die with its init.
shared_pid() {
  Q=$($C runp /tmp/cfg/pod4.json) || return 1
  S1=$($C create $Q /tmp/cfg/one.json /tmp/cfg/pod4.json) && $C start $S1 || return 1
  S2=$($C create $Q /tmp/cfg/two.json /tmp/cfg/pod4.json) && $C start $S2 || return 1
  S4=$($C create $Q /tmp/cfg/s.json /tmp/cfg/pod4.json) && $C start $S4 || return 1
  until_state $S2 CONTAINER_RUNNING && until_state $S4 CONTAINER_RUNNING || return 1
  $C exec $S2 -- sh -c 'echo "pid1=$(cat /proc/1/comm)"; echo "two_sees_one=$(ps | grep -c "sleep 360[1]")"'
  $C exec $S4 -- sh -c 'echo "private_sees_one=$(ps | grep -c "sleep 360[1]")"; echo "private_pid1=$(cat /proc/1/comm)"'
  S3=$($C create $Q /tmp/cfg/brief.json /tmp/cfg/pod4.json) && $C start $S3 || return 1
  until_state $S3 CONTAINER_RUNNING; $C exec $S2 -- sh -c 'echo "orphan_while_running=$(ps | grep -c "sleep 432[1]")"'
  until_state $S3 CONTAINER_EXITED || return 1
  $C inspect $S3 | grep -E '^(exit_code|reason)='
  for i in $(seq 20); do
    n=$($C exec $S2 -- sh -c 'ps | grep -c "sleep 432[1]"'); [ "$n" = 0 ] && break; sleep 0.2
  done
  echo "orphans_left=$n"
  $C exec $S1 -- echo one-still-runs
  $C stopp $Q && $C rmp $Q && echo shared_gone
}
# A container past its 32 MiB limit: OOM-killed, by the kernel or (stuck at the limit
# by its own page cache, about 1 run in 15) by the agent's memory-stall watch after
# 30 s; hence the longer wait.
oom_killed() {
  O=$($C create $P /tmp/cfg/oom.json /tmp/cfg/pod.json) && $C start $O || return 1
  until_state $O CONTAINER_EXITED 1200 || return 1
  $C inspect $O | grep -E '^(exit_code|reason)='
  echo "survived=$(grep -c survived /tmp/logs/web/oom/0.log)"
  $C rm $O
}
# Attach to a container created with stdin (stdin_once): its output from the
# moment of attaching, our stdin to it; closing stdin ends it.
attach() {
  K=$($C create $P /tmp/cfg/cat.json /tmp/cfg/pod.json) && $C start $K || return 1
  until_state $K CONTAINER_RUNNING || return 1
  $C attach -i $CA; echo "attach_i_rc=$?"
  (echo one; sleep 1; echo two) | $C attach -i --transport websocket $K 2>/tmp/attach.err
  echo "attach_rc=$?"; echo "attach_err=$(tr '\n' ' ' </tmp/attach.err)"
  until_state $K CONTAINER_EXITED && $C inspect $K | grep -E '^(exit_code|reason)='
  echo "log_has_two=$(grep -c 'stdout F echo:two' /tmp/logs/web/cat/0.log)"
  $C attach $K; echo "exited_rc=$?"
  $C rm $K
}
stats() { $C stats $CA; }
metrics() {
  wget -q -O - http://127.0.0.1:1338/metrics > /tmp/metrics.txt; echo "metrics_rc=$?"
  grep -E '^atoll_cri_(sandboxes|containers|streaming|build_info)' /tmp/metrics.txt
  grep -E '^atoll_cri_rpc_duration_seconds_count\{method="(RunPodSandbox|ExecSync|Exec|PullImage)"' /tmp/metrics.txt
  tail -1 /tmp/metrics.txt
  wget -q -O - http://127.0.0.1:1338/other; echo "other_rc=$?"
}
update() {
  $C update --memory 67108864 --cpu-quota 50000 --cpu-period 100000 $CA; echo "update_rc=$?"
  $C exec $CA -- sh -c 'echo "mem=$(cat /sys/fs/cgroup/memory.max)"; echo "cpu=$(cat /sys/fs/cgroup/cpu.max)"'
  $C update --cpu-quota 10 $CA; echo "bad_rc=$?"
  $C update $CA; echo "lift_rc=$?"
  $C exec $CA -- sh -c 'echo "mem_after=$(cat /sys/fs/cgroup/memory.max)"'
  $C update --memory 67108864 $CB; echo "exited_rc=$?"
}
# Host mounts: copies of read-only host paths, an emptyDir shared by the pod's
# containers; writable host paths, sockets and bidirectional propagation refused.
volumes() {
  V1=$($C create $P /tmp/cfg/vols.json /tmp/cfg/pod.json) && $C start $V1 || return 1
  until_state $V1 CONTAINER_RUNNING || return 1
  $C inspect $V1 | grep '^mounts='
  $C exec $V1 -- sh -c 'echo "cfg_a=$(cat /etc/cfg/a.conf)"; echo "cfg_link=$(readlink /etc/cfg/a.conf)";
    echo "token_stat=$(stat -L -c %u:%g:%a /etc/cfg/token)"; echo "one=$(cat /etc/one.txt)";
    echo x > /etc/cfg/new 2>/dev/null && echo cfg_write=allowed || echo cfg_write=refused;
    echo "scratch=$(cat /scratch/note)"'
  # Updated on the host as kubelet's atomic writer does (a new version directory,
  # ..data switched to it, the old one removed): a container created now sees it,
  # and so does the running one (the pod has one copy of each host path).
  D=$V/kubernetes.io~configmap/cfg
  cfg_version() {
    mkdir $D/..$1; echo "a=$2" > $D/..$1/a.conf; cp -p $D/..data/token $D/..$1/token
    old=$(readlink $D/..data); ln -sfn ..$1 $D/..data; rm -rf $D/$old
  }
  cfg_version 2026_12_06 2
  V2=$($C create $P /tmp/cfg/vols2.json /tmp/cfg/pod.json) && $C start $V2 || return 1
  until_state $V2 CONTAINER_RUNNING || return 1
  $C exec $V2 -- sh -c 'echo "shared=$(cat /shared/note)"; echo "cfg_a2=$(cat /etc/cfg/a.conf)"'
  $C exec $V1 -- sh -c 'echo "cfg_a1=$(cat /etc/cfg/a.conf)"'
  # A later update reaches both running containers without any CRI call.
  t0=$(now_ms); cfg_version 2026_12_07 3
  for i in $(seq 60); do
    a1=$($C exec $V1 -- cat /etc/cfg/a.conf); a2=$($C exec $V2 -- cat /etc/cfg/a.conf)
    [ "$a1" = a=3 ] && [ "$a2" = a=3 ] && break; sleep 0.5
  done
  echo "cfg_live=$a1,$a2"; echo "cfg_live_ms=$(( $(now_ms) - t0 ))"
  $C exec $V1 -- sh -c 'echo "cfg_versions=$(ls -A /etc/cfg | tr "\n" " ")"'
  $C create $P /tmp/cfg/rw.json /tmp/cfg/pod.json; echo "rw_rc=$?"
  $C create $P /tmp/cfg/sock.json /tmp/cfg/pod.json; echo "sock_rc=$?"
  $C create $P /tmp/cfg/bidi.json /tmp/cfg/pod.json; echo "bidi_rc=$?"
  $C stop -t 0 $V1; $C stop -t 0 $V2; $C rm $V1; $C rm $V2
}
events() {
  $C events --count 4 --for 90 > /tmp/events.txt 2>&1 & ev=$!
  sleep 1
  E=$($C create $P /tmp/cfg/quick.json /tmp/cfg/pod.json) || return 1
  $C start $E && until_state $E CONTAINER_EXITED && $C rm $E
  wait $ev; echo "events_rc=$?"
  echo "E=$E"; cat /tmp/events.txt
}
statsp() { $C statsp $P; $C statsp 0123456789abcdef; echo "missing_rc=$?"; }
reopen() {
  L=/tmp/logs/web/ticker/0.log
  mv $L $L.1; $C reopen $CA; echo "reopened=$?"
  test -e $L && echo new_file=yes
  a=$(wc -l < $L.1); sleep 1.5; b=$(wc -l < $L.1)
  echo "old_grew=$((b - a))"; echo "new_lines=$(wc -l < $L)"
}
ip_of() { $C inspectp $1 | sed -n 's/^ip=//p'; }
network() {
  IP=$(ip_of $P); echo "ip=$IP"
  ping -c 1 -W 10 $IP >/dev/null && echo "node_ping=ok"
  $C exec $CA -- sh -c 'ip addr show eth0; ip route; cat /etc/resolv.conf'
  Q=$($C runp /tmp/cfg/peer.json) || return 1
  # The VMM's own account of its start: a pool VMM that had the template
  # preloaded only finished the restore.
  echo "peer_vmm_phases=$(vmm_phases $Q)"
  H=$($C create $Q /tmp/cfg/httpd.json /tmp/cfg/peer.json) && $C start $H || return 1
  IP2=$(ip_of $Q); echo "peer_ip=$IP2"
  for i in $(seq 30); do
    got=$($C exec --timeout 10 $CA -- wget -q -O - http://$IP2:8080/ 2>/dev/null) && break; sleep 1
  done
  echo "pod_to_pod=$got"
  [ -n "$got" ] || { $C exec $H -- netstat -ltn; $C exec $CA -- wget -O - http://$IP2:8080/; }
  # The peer's port mapping (portmap's DNAT): the node's port 30080 on its own
  # address on the pod network reaches the pod's 8080.
  echo "hostport=$(timeout 20 wget -q -O - http://10.88.0.1:30080/)"
  echo "hostport_rules=$(iptables -t nat -S | grep -c 'dport 30080')"
  [ -n "$(timeout 20 wget -q -O - http://10.88.0.1:30080/)" ] || iptables -t nat -S
  # Port-forward to the peer's httpd: through atoll-crictl's listener (SPDY and
  # WebSocket) and with the Go SPDY library; a port nothing listens on.
  for t in spdy websocket; do
    $C port-forward --transport $t $Q 0:8080 > /tmp/pf.$t 2>&1 & pf=$!
    for i in $(seq 100); do grep -q listening= /tmp/pf.$t && break; sleep 0.1; done
    LP=$(sed -n 's/^listening=//p' /tmp/pf.$t)
    echo "pf_$t=$(wget -q -O - http://127.0.0.1:$LP/)"
    echo "pf2_$t=$(wget -q -O - http://127.0.0.1:$LP/)"
    kill $pf
  done
  U=$($C port-forward --print-url $Q 0:8080) || return 1
  printf 'GET / HTTP/1.0\r\n\r\n' | $A/spdy-peer portforward $U 8080 > /tmp/pf.go; echo "pf_go_rc=$?"
  echo "pf_go=$(tail -1 /tmp/pf.go)"
  U=$($C port-forward --print-url $Q 0:9) || return 1
  echo "pf_closed=$($A/spdy-peer portforward $U 9 </dev/null 2>&1)"
  U=$($C port-forward --print-url $Q 0:8080) || return 1
  echo "pf_other=$($A/spdy-peer portforward $U 9 </dev/null 2>&1)"
  $C stopp $Q; $C rmp $Q
  echo "hostport_rules_after_peer=$(iptables -t nat -S | grep -c 'dport 30080')"
  echo "veths_after_peer=$(ls /sys/class/net | grep -c ^veth)"
  echo "netns_left=$(ls /run/atoll/cri/netns | wc -l)"
}
# The ticker writes a numbered line every 0.2 s: none may be lost while no server
# runs (the guest holds them) and the log goes on after the restart.
kill_server() {
  L=/tmp/logs/web/ticker/0.log
  waiting=""; for p in $(pidof atoll-vmm); do grep -q 'atoll/standby-' /proc/$p/cgroup && waiting="$waiting $p"; done
  kill -9 $(pidof atoll-cri); sleep 2
  echo "vmms=$(pod_vmms)"
  echo "waiting_left=$(echo $waiting | wc -w)"
  last_before=$(sed -n 's/.* stdout F tick //p' $L | tail -1)
  start_cri || return 1
  n=0; for p in $waiting; do [ -d /proc/$p ] && n=$((n+1)); done; echo "waiting_alive_after_restart=$n"
  $C pods; $C inspect $CA | grep state=; $C exec $CA -- echo still-here
  sleep 2
  last_after=$(sed -n 's/.* stdout F tick //p' $L | tail -1)
  echo "ticks_while_down_and_after=$((last_after - last_before))"
  echo "last_before=$last_before"
  echo "missing=$(sed -n 's/.* stdout F tick //p' $L | awk 'p && $1 > p+1 {for (i = p+1; i < $1; i++) printf "%d,", i} $1 > p {p=$1}')"
  echo "repeated=$(sed -n 's/.* stdout F tick //p' $L | sort -n | uniq -d | tr '\n' ',')"
}
stop_grace() {
  t0=$(now_ms); $C stop -t 2 $CA; echo "rc=$?"; echo "stop_ms=$(( $(now_ms) - t0 ))"
  $C inspect $CA
}
stop_again() { $C stop $CA && $C stop 0123456789abcdef && echo idempotent; }
remove() {
  $C rm $CA && $C rm $CA && $C rm $CB && echo removed
  $C ps --pod $P | wc -l
  $C inspect $CA
}
vm_killed() {
  Q=$($C runp /tmp/cfg/pod2.json) || return 1
  # The first sandbox since the server restarted: its pool found the default
  # template on disk and preloaded it.
  echo "first_after_restart_phases=$(vmm_phases $Q)"
  S=$($C create $Q /tmp/cfg/s.json /tmp/cfg/pod2.json) && $C start $S || return 1
  kill -9 $(vmm_of $Q)
  sleep 1
  $C inspectp $Q | grep state=; $C inspect $S
  K=$($C inspectp --verbose $Q | sed -n 's/^info.info=//p' | grep -o '"console":"[^"]*"' | cut -d'"' -f4)
  echo "console_kept=$K"; [ -s "$K" ]; echo "console_nonempty=$?"
  $C rmp $Q; echo "rmp=$?"
  [ -e "$K" ]; echo "console_after_rmp=$?"
}
# A guest that stops answering: its VMM frozen (SIGSTOP), sockets and process alive.
vm_wedged() {
  Q=$($C runp /tmp/cfg/pod2.json) || return 1
  S=$($C create $Q /tmp/cfg/s.json /tmp/cfg/pod2.json) && $C start $S || return 1
  V=$(vmm_of $Q); kill -STOP $V; t0=$(date +%s)
  for i in $(seq 120); do $C inspectp $Q | grep -q state=SANDBOX_NOTREADY && break; sleep 1; done
  echo "secs=$(($(date +%s) - t0))"
  $C inspectp $Q | grep -e state= -e message=; $C inspect $S | grep -e state= -e message=
  kill -0 $V 2>/dev/null; echo "vmm_alive=$?"
  $C rmp $Q; echo "rmp=$?"
}
stopp() {
  $C stopp $P && $C stopp $P && $C stopp nonexistent && echo stopped
  $C inspectp $P | grep state=
  $C rmp $P && $C rmp $P && echo removed
  $C pods | wc -l
  echo "vmms=$(pod_vmms)"
  echo "pod_dirs=$(ls /run/atoll/cri/pods | grep -vc ^standby-)"
  echo "pool_waiting=$(waiting_vmms)"
  echo "records=$(ls /var/lib/atoll/cri/sandboxes /var/lib/atoll/cri/containers | grep -c json)"
  echo "netns=$(ls /run/atoll/cri/netns | wc -l)"
  echo "veths=$(ls /sys/class/net | grep -c ^veth)"
  echo "leases=$(ls /var/lib/cni/networks/pods 2>/dev/null | grep -c '^10\.')"
}
rmi() { $C rmi $IMAGE && $C rmi $IMAGE && echo removed; $C inspecti $IMAGE; }
bad_config() { echo 'sockett = "/x"' > /tmp/cfg/bad.toml; $A/atoll-cri --config /tmp/cfg/bad.toml; }
second_server() { timeout 10 $A/atoll-cri --config /tmp/cfg/atoll-cri.toml; }

scenario start start_cri
scenario version version
scenario info info
scenario runtime_config runtime_config
scenario pull_missing pull_missing
scenario early_pod early_pod
scenario pull pull
scenario images images
scenario bad_handler bad_handler
scenario runp runp
scenario runp_again runp_again
scenario create create
scenario create_same_name create_same_name
scenario start_both start_both
scenario start_twice start_twice
scenario exited exited
scenario exec exec_
scenario exec_stdout_only exec_stdout_only
scenario exec_timeout exec_timeout
scenario exec_many exec_many
scenario exec_stream exec_stream
scenario log log
scenario pod_settings pod_settings
scenario shared_pid shared_pid
scenario image_volume image_volume
scenario attach attach
scenario oom_killed oom_killed
scenario stats stats
scenario metrics metrics
scenario network network
scenario statsp statsp
scenario volumes volumes
scenario events events
scenario update update
scenario reopen reopen
scenario kill_server kill_server
scenario stop_grace stop_grace
scenario stop_again stop_again
scenario remove remove
scenario vm_killed vm_killed
scenario vm_wedged vm_wedged
scenario stopp stopp
scenario rmi rmi
scenario bad_config bad_config
scenario second_server second_server
echo "--- atoll-cri log"; tail -30 /tmp/cri.log
"#;

/// The registry's storage: the busybox image as [`IMAGE`], pushed by skopeo into a
/// docker-registry on the host.
fn registry_storage(dir: &Path) -> std::path::PathBuf {
    let layout = dir.join("layout");
    oci::write_layout(
        &layout,
        &[oci::busybox_layer()],
        serde_json::json!({"Cmd": ["sh"], "Env": ["PATH=/bin"]}),
    );
    let storage = atoll_node::oci::registry_dir(dir);
    atoll_node::oci::fill_registry(
        dir,
        &storage,
        &[(&layout, IMAGE.trim_start_matches("registry.k8s.io/"))],
    );
    std::fs::remove_dir_all(&layout).ok();
    storage
}

/// kubelet's SPDY library (spdystream) in a Go client, built by `make go-peers`.
fn go_peer() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/go/spdy-peer")
}

fn node_output() -> &'static str {
    static OUT: OnceLock<String> = OnceLock::new();
    OUT.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let storage = registry_storage(dir.path());
        let runner = || {
            with(
                kvm_runner(),
                &build_dir().join("initramfs.cpio"),
                "initramfs.cpio",
            )
            .file(artefact(static_dir().join("atoll-cri")), "atoll-cri")
            .unwrap()
            .file(artefact(static_dir().join("atoll-crictl")), "atoll-crictl")
            .unwrap()
            .file(
                artefact(static_dir().join("atoll-vmm-api")),
                "atoll-vmm-api",
            )
            .unwrap()
            .file(storage.clone(), "registry")
            .unwrap()
            .file(artefact(go_peer()), "spdy-peer")
            .unwrap()
            .file(
                atoll_node::oci::node_registry_config(dir.path()),
                "registry.yml",
            )
            .unwrap()
            .host_program("/usr/bin/docker-registry")
            .host_program("/usr/bin/mkfs.erofs")
            .host_program("/usr/lib/cni/bridge")
            .host_program("/usr/lib/cni/host-local")
            .host_program("/usr/sbin/tc")
            .host_program("/usr/lib/cni/portmap")
            .host_program("/usr/sbin/xtables-legacy-multi")
            .file(Path::new(XTABLES_EXTENSIONS), "xtables")
            .unwrap()
            .extra_modules(
                &[
                    &atoll_node::kernel::CNI_NET[..],
                    &atoll_node::kernel::CNI_PORTMAP[..],
                ]
                .concat(),
            )
            .timeout(Duration::from_secs(900))
        };
        let mut out = run(runner(), &format!("{SCENARIO_SH}{SCRIPT}")).output;
        // Every scenario shares one pod VM: one whose guest triple-faulted (the
        // nested node's emulation does that to a few percent of long runs, as the
        // containers tests see) would fail all that follow. The node run is
        // repeated once, said past the harness's capture; a second fault fails.
        if out.contains("the guest triple-faulted") {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr().lock(),
                "cri: a pod's guest VM triple-faulted in the node run; running it once more"
            );
            out = run(runner(), &format!("{SCENARIO_SH}{SCRIPT}")).output;
        }
        drop(dir);
        out
    })
}

fn sc(name: &str) -> (&'static str, i32) {
    scenario(node_output(), name)
}

#[test]
fn the_server_starts_and_answers_version_status_and_runtime_config() {
    let (out, st) = sc("start");
    assert_eq!(st, 0, "{out}");
    let (out, st) = sc("version");
    assert_eq!(st, 0, "{out}");
    assert_eq!(value_of(out, "version"), "0.1.0");
    assert_eq!(value_of(out, "runtime_name"), "atoll");
    assert_eq!(value_of(out, "runtime_api_version"), "v1");
    let (out, st) = sc("info");
    assert_eq!(st, 0, "{out}");
    assert!(value_of(out, "RuntimeReady").starts_with("true"), "{out}");
    assert!(
        value_of(out, "NetworkReady").starts_with("true"),
        "a CNI network list is in /etc/cni/net.d: {out}"
    );
    assert_eq!(value_of(out, "handlers"), r#""","atoll""#);
    let (out, st) = sc("runtime_config");
    assert_eq!(
        (st, value_of(out, "cgroup_driver")),
        (0, "CGROUPFS"),
        "{out}"
    );
}

#[test]
fn images_are_pulled_through_the_mirror_and_keep_their_name() {
    let (out, st) = sc("pull");
    assert_eq!(st, 0, "{out}");
    let id = value_of(out, "id");
    assert!(id.starts_with("sha256:") && id.len() == 71, "{out}");
    let (out, st) = sc("images");
    assert_eq!(st, 0, "{out}");
    assert!(
        out.contains(&format!("{id} {IMAGE} ")),
        "ListImages names it as pulled:\n{out}"
    );
    // By name and by the id PullImage returned: the same image.
    assert_eq!(out.matches(&format!("id={id}")).count(), 2, "{out}");
    assert!(out.contains(&format!("repo_tags={IMAGE}")), "{out}");
    assert!(
        out.contains("repo_digests=registry.k8s.io/e2e-test-images/busybox@sha256:"),
        "{out}"
    );
}

#[test]
fn a_missing_image_or_an_unknown_handler_is_refused_clearly() {
    let (out, st) = sc("pull_missing");
    assert_eq!(st, 1, "{out}");
    assert!(
        out.contains("NotFound: pulling registry.k8s.io/not/there:1"),
        "{out}"
    );
    let (out, st) = sc("bad_handler");
    assert_eq!(st, 1, "{out}");
    assert!(
        out.contains("InvalidArgument: runtime handler \"runc\" is not served by atoll-cri"),
        "{out}"
    );
}

#[test]
fn a_sandbox_is_a_ready_microvm_with_its_metadata() {
    let (out, st) = sc("runp");
    assert_eq!(st, 0, "{out}");
    let id = value_of(out, "id");
    assert_eq!(id.len(), 64, "{out}");
    assert_eq!(value_of(out, "state"), "SANDBOX_READY");
    assert_eq!(value_of(out, "name"), "web");
    assert_eq!(value_of(out, "runtime_handler"), "atoll");
    assert!(
        out.contains(&format!("{id} web SANDBOX_READY")),
        "listed by label:\n{out}"
    );
    let ms: u64 = value_of(out, "runp_ms").parse().unwrap();
    eprintln!("RunPodSandbox took {ms} ms (a clone of the template the early pod built)");
    // Its VMM: a uid of the pods' range, and the pod's CPU limit (0.5) plus the
    // VMM's own 10 % in its cgroup leaf.
    let uid: u32 = value_of(out, "vmm_uid").parse().unwrap();
    assert!(uid >= 2_000_000_000, "{out}");
    assert_eq!(value_of(out, "vmm_cpu_max"), "60000/100000", "{out}");
    // It was a pre-started VMM of the pool: it now runs in the pod's own cgroup
    // leaf, and its uid is claimed by the pod.
    assert_eq!(value_of(out, "vmm_from_pool"), "1", "{out}");
    assert!(
        value_of(out, "vmm_cgroup").ends_with(&format!("/atoll/{id}")),
        "{out}"
    );
    assert_eq!(value_of(out, "uid_claim"), id, "{out}");
    // Waiting VMMs start on idle CPU only; the sandbox's has its priority back.
    assert_eq!(value_of(out, "vmm_nice"), "0", "{out}");
    assert_eq!(value_of(out, "waiting_nice"), "19", "{out}");
}

#[test]
fn the_same_pod_metadata_twice_is_refused() {
    let (out, st) = sc("runp_again");
    assert_eq!(st, 1, "{out}");
    assert!(
        out.contains("AlreadyExists: a sandbox named default/web"),
        "{out}"
    );
}

#[test]
fn containers_are_created_then_run_and_one_that_exits_reports_its_code() {
    let (out, st) = sc("create");
    assert_eq!(st, 0, "{out}");
    assert_eq!(out.matches("CONTAINER_CREATED").count(), 2, "{out}");
    let (out, st) = sc("create_same_name");
    assert_eq!(st, 1, "{out}");
    assert!(out.contains("AlreadyExists: container \"ticker\""), "{out}");
    let (out, st) = sc("start_both");
    assert_eq!(st, 0, "{out}");
    assert_eq!(value_of(out, "state"), "CONTAINER_RUNNING");
    assert_ne!(value_of(out, "started_at"), "0");
    assert_eq!(value_of(out, "finished_at"), "0");
    assert_eq!(value_of(out, "image"), IMAGE);
    assert!(value_of(out, "image_id").starts_with("sha256:"), "{out}");
    assert!(value_of(out, "log_path").ends_with("/tmp/logs/web/ticker/0.log"));
    let (out, st) = sc("start_twice");
    assert_eq!(st, 1, "{out}");
    assert!(out.contains("FailedPrecondition"), "{out}");
    let (out, st) = sc("exited");
    assert_eq!(st, 0, "{out}");
    assert_eq!(value_of(out, "state"), "CONTAINER_EXITED");
    assert_eq!(value_of(out, "exit_code"), "3");
    assert_eq!(value_of(out, "reason"), "Error");
    // Its output is in the log by the time it is reported exited.
    assert!(out.lines().any(|l| l.ends_with(" stdout F done")), "{out}");
}

#[test]
fn exec_sync_returns_output_and_exit_code_and_kills_at_its_timeout() {
    let (out, st) = sc("exec");
    assert_eq!(st, 0, "{out}");
    assert!(
        out.contains("out hi"),
        "the container's env reaches exec: {out}"
    );
    assert!(out.contains("err"), "{out}");
    assert_eq!(value_of(out, "rc"), "7");
    let (out, _) = sc("exec_stdout_only");
    assert!(out.starts_with("hello\n"), "{out}");
    assert_eq!(value_of(out, "stderr_bytes"), "0");
    let (out, _) = sc("exec_timeout");
    assert!(
        out.contains("DeadlineExceeded: command timed out after 1 s"),
        "{out}"
    );
    assert_eq!(value_of(out, "rc"), "1");
    let took: u64 = value_of(out, "took_ms").parse().unwrap();
    assert!((1000..20_000).contains(&took), "{out}");
    assert!(
        out.contains("no-sleep-left"),
        "the timed-out command was killed:\n{out}"
    );
}

#[test]
fn exec_sync_as_a_probe_grows_nothing_in_the_agent_or_the_server() {
    let (out, st) = sc("exec_many");
    assert_eq!(st, 0, "{out}");
    assert_eq!(value_of(out, "ok"), "300", "{out}");
    let agent = |when: &str| -> serde_json::Value {
        serde_json::from_str(value_of(out, &format!("{when}_agent")))
            .unwrap_or_else(|e| panic!("{when}_agent: {e}\n{out}"))
    };
    let (warm, after) = (agent("warm"), agent("after"));
    for key in ["fds", "threads", "processes", "connections"] {
        assert!(warm[key].as_u64().is_some(), "{key} in {warm}");
        assert_eq!(after[key], warm[key], "agent {key}: {warm} then {after}");
    }
    let rss = |v: &serde_json::Value| v["rss_bytes"].as_u64().unwrap();
    assert!(
        rss(&after) <= rss(&warm) + (1 << 20),
        "agent memory grew by more than 1 MiB over 250 calls: {warm} then {after}"
    );
    let num = |key: &str| -> u64 { value_of(out, key).parse().unwrap() };
    assert!(
        num("after_server_fds") <= num("warm_server_fds") + 2,
        "server descriptors: {out}"
    );
    assert!(
        num("after_server_rss_kib") <= num("warm_server_rss_kib") + 8192,
        "server memory grew by more than 8 MiB over 250 calls: {out}"
    );
}

#[test]
fn prometheus_metrics_count_rpcs_by_method_and_code_and_pods_by_state() {
    let (out, st) = sc("metrics");
    assert_eq!(st, 0, "{out}");
    assert_eq!(value_of(out, "metrics_rc"), "0", "{out}");
    let line = |prefix: &str| -> u64 {
        out.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .unwrap_or_else(|| panic!("no {prefix}... in:\n{out}"))
    };
    assert_eq!(line("atoll_cri_sandboxes{state=\"ready\"} "), 1, "{out}");
    assert!(
        line("atoll_cri_containers{state=\"running\"} ") >= 1,
        "{out}"
    );
    assert!(
        line("atoll_cri_rpc_duration_seconds_count{method=\"RunPodSandbox\",code=\"OK\"} ") >= 1,
        "{out}"
    );
    assert!(
        line("atoll_cri_rpc_duration_seconds_count{method=\"ExecSync\",code=\"OK\"} ") >= 50,
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.starts_with(
            "atoll_cri_rpc_duration_seconds_count{method=\"RunPodSandbox\",code=\"AlreadyExists\"}"
        )),
        "a refused call is counted by its code: {out}"
    );
    assert!(out.contains("atoll_cri_build_info{version="), "{out}");
    assert!(out.lines().any(|l| l == "# EOF"), "{out}");
    assert_eq!(value_of(out, "other_rc"), "1", "{out}");
}

#[test]
fn exec_streams_stdio_and_exit_codes_over_spdy_websocket_a_terminal_and_the_go_library() {
    let (out, st) = sc("exec_stream");
    assert_eq!(st, 0, "{out}");
    for t in ["spdy", "websocket"] {
        assert!(
            out.lines().any(|l| l == format!("got line-{t} hi")),
            "stdin reached the command and its env is the container's ({t}): {out}"
        );
        assert_eq!(value_of(out, &format!("rc_{t}")), "5", "{out}");
        assert_eq!(
            value_of(out, &format!("err_{t}")),
            format!("e-line-{t}"),
            "stderr apart from stdout: {out}"
        );
    }
    assert_eq!(value_of(out, "rc_zero"), "0", "{out}");
    assert!(
        out.lines().any(|l| l.trim_end_matches('\r') == "30 100"),
        "the terminal took the client's size: {out}"
    );
    assert!(out.contains("/dev/pts/"), "a terminal: {out}");
    assert_eq!(value_of(out, "rc_tty"), "0", "{out}");
    assert!(out.lines().any(|l| l == "from-go"), "{out}");
    assert_eq!(value_of(out, "rc_go"), "4", "{out}");
    assert_eq!(value_of(out, "err_go"), " seen", "{out}");
    assert!(
        value_of(out, "again").contains("HTTP 404"),
        "a URL is good once: {out}"
    );
    assert_eq!(
        value_of(out, "big_bytes"),
        "3000000",
        "3 MB of stdin arrive whole: {out}"
    );
    for i in 1..=6 {
        assert_eq!(
            value_of(out, &format!("big_out_{i}")),
            "8388608",
            "8 MiB of stdout arrive whole: {out}"
        );
    }
    assert_eq!(
        value_of(out, "cat"),
        "no-cat-left",
        "a client killed mid-stream kills its command: {out}"
    );
}

#[test]
fn attach_joins_a_running_containers_stdio_and_stdin_once_ends_it() {
    let (out, st) = sc("attach");
    assert_eq!(st, 0, "{out}");
    assert!(
        out.contains("was not created with stdin"),
        "stdin to a container without it is refused: {out}"
    );
    assert_eq!(value_of(out, "attach_i_rc"), "1", "{out}");
    assert!(out.lines().any(|l| l == "echo:one"), "{out}");
    assert!(out.lines().any(|l| l == "echo:two"), "{out}");
    assert!(out.lines().any(|l| l == "bye"), "{out}");
    assert!(
        !out.lines().any(|l| l == "ready"),
        "output before the attach is in the log, not replayed: {out}"
    );
    assert_eq!(value_of(out, "attach_err"), "err:one err:two ", "{out}");
    assert_eq!(value_of(out, "attach_rc"), "0", "{out}");
    assert_eq!(
        value_of(out, "exit_code"),
        "0",
        "closing stdin (stdin_once) ended it: {out}"
    );
    assert_eq!(value_of(out, "log_has_two"), "1", "{out}");
    assert_eq!(value_of(out, "exited_rc"), "1", "{out}");
}

#[test]
fn a_container_past_its_memory_limit_exits_137_with_reason_oom_killed() {
    let (out, st) = sc("oom_killed");
    assert_eq!(st, 0, "{out}");
    assert_eq!(value_of(out, "exit_code"), "137", "{out}");
    assert_eq!(value_of(out, "reason"), "OOMKilled", "{out}");
    assert_eq!(value_of(out, "survived"), "0", "{out}");
}

/// `<RFC 3339 ns>Z <stream> <F|P> <text>`
fn is_cri_record(l: &str, stream: &str, text: &str) -> bool {
    let mut f = l.splitn(4, ' ');
    let (Some(t), Some(s), Some(tag), Some(rest)) = (f.next(), f.next(), f.next(), f.next()) else {
        return false;
    };
    let time_ok = t.len() == 30
        && t.as_bytes()[10] == b'T'
        && t.ends_with('Z')
        && t[20..29].bytes().all(|b| b.is_ascii_digit());
    time_ok && s == stream && tag == "F" && rest == text
}

#[test]
fn dns_options_sysctls_groups_and_hidden_paths_reach_the_guest_and_what_a_vm_cannot_do_is_refused()
{
    let (out, st) = sc("pod_settings");
    assert_eq!(st, 0, "{out}");
    // Pod-wide, from the sandbox config: resolv.conf's options, both sysctl forms.
    assert_eq!(
        value_of(out, "resolv_options"),
        "options ndots:5 edns0",
        "{out}"
    );
    assert_eq!(value_of(out, "port_start"), "80", "{out}");
    assert_eq!(value_of(out, "shm_rmid"), "1", "{out}");
    // The container's supplemental groups, on its init and on an exec.
    assert_eq!(value_of(out, "init_groups"), "1234 5678", "{out}");
    assert_eq!(value_of(out, "exec_groups"), "0 1234 5678", "{out}");
    // The CRI's masked and read-only paths replace the defaults.
    assert_eq!(value_of(out, "version_bytes"), "0", "{out}");
    assert_eq!(value_of(out, "root_write"), "refused", "{out}");
    assert_eq!(value_of(out, "tmp_write"), "allowed", "{out}");
    // What a microVM pod cannot do, refused with the reason.
    assert_ne!(value_of(out, "hostpid_rc"), "0", "{out}");
    assert!(
        out.contains("namespace_options.pid = NODE: a microVM pod has its own kernel"),
        "{out}"
    );
    assert_ne!(value_of(out, "badsysctl_rc"), "0", "{out}");
    assert!(
        out.contains("cannot set sysctl net.ipv4.no_such_sysctl"),
        "{out}"
    );
    assert_eq!(value_of(out, "badsysctl_left"), "0", "{out}");
    assert_ne!(value_of(out, "grouponly_rc"), "0", "{out}");
    assert!(
        out.contains("run_as_group is set without run_as_user or run_as_username"),
        "{out}"
    );
}

#[test]
fn containers_of_a_pod_that_shares_its_process_namespace_see_each_other_and_a_pause_pid_1() {
    let (out, st) = sc("shared_pid");
    assert_eq!(st, 0, "{out}");
    assert_eq!(value_of(out, "pid1"), "pause", "{out}");
    assert_eq!(value_of(out, "two_sees_one"), "1", "{out}");
    // A container of the same pod that did not ask keeps a namespace of its own.
    assert_eq!(value_of(out, "private_sees_one"), "0", "{out}");
    assert_eq!(value_of(out, "private_pid1"), "sleep", "{out}");
    // The init of a container in the shared namespace takes its processes with it.
    assert_eq!(value_of(out, "orphan_while_running"), "1", "{out}");
    assert_eq!(value_of(out, "exit_code"), "0", "{out}");
    assert_eq!(value_of(out, "orphans_left"), "0", "{out}");
    assert!(out.contains("one-still-runs"), "{out}");
    assert!(out.contains("shared_gone"), "{out}");
}

#[test]
fn an_image_volume_is_the_images_files_read_only_in_the_container() {
    let (out, st) = sc("image_volume");
    assert_eq!(st, 0, "{out}");
    assert_eq!(value_of(out, "img_busybox"), "/img/bin/busybox", "{out}");
    assert_eq!(
        value_of(out, "img_passwd"),
        "root:x:0:0:root:/root:/bin/sh",
        "{out}"
    );
    assert_eq!(value_of(out, "img_write"), "refused", "{out}");
    let mounts = value_of(out, "mounts");
    assert!(
        mounts.starts_with("/img:image=sha256:") && mounts.ends_with(":ro"),
        "{out}"
    );
    assert!(out.contains("imgvol_removed"), "{out}");
    assert_ne!(value_of(out, "missing_rc"), "0", "{out}");
    assert!(
        out.contains(
            "image volume \"registry.k8s.io/never/pulled:1\": the image is not on this node"
        ),
        "{out}"
    );
}

#[test]
fn container_output_is_in_the_cri_log_format_and_rotates_on_reopen() {
    let (out, st) = sc("log");
    assert_eq!(st, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines
            .iter()
            .any(|l| is_cri_record(l, "stdout", "hello World")),
        "{out}"
    );
    assert!(
        lines.iter().any(|l| is_cri_record(l, "stderr", "oops")),
        "{out}"
    );
    let (out, st) = sc("reopen");
    assert_eq!(st, 0, "{out}");
    assert_eq!(value_of(out, "reopened"), "0");
    assert_eq!(value_of(out, "new_file"), "yes");
    assert_eq!(value_of(out, "old_grew"), "0", "{out}");
    let new: u32 = value_of(out, "new_lines").parse().unwrap();
    assert!(new >= 3, "ticks go to the new file: {out}");
}

#[test]
fn container_stats_come_from_the_guest() {
    let (out, st) = sc("stats");
    assert_eq!(st, 0, "{out}");
    let mem: u64 = value_of(out, "memory_working_set").parse().unwrap();
    let cpu: u64 = value_of(out, "cpu_ns").parse().unwrap();
    assert!(mem > 0 && cpu > 0, "{out}");
}

#[test]
fn update_container_resources_reaches_the_containers_cgroup_in_the_guest() {
    let (out, st) = sc("update");
    assert_eq!(st, 0, "{out}");
    assert_eq!(value_of(out, "update_rc"), "0", "{out}");
    assert_eq!(value_of(out, "mem"), "67108864", "{out}");
    assert_eq!(value_of(out, "cpu"), "50000 100000", "{out}");
    assert_eq!(
        value_of(out, "bad_rc"),
        "1",
        "a 10 µs quota is refused: {out}"
    );
    assert!(out.contains("InvalidArgument"), "{out}");
    assert_eq!(value_of(out, "lift_rc"), "0", "{out}");
    assert_eq!(
        value_of(out, "mem_after"),
        "max",
        "0 lifts the limit: {out}"
    );
    assert_eq!(
        value_of(out, "exited_rc"),
        "1",
        "an exited container: {out}"
    );
    assert!(out.contains("FailedPrecondition"), "{out}");
}

#[test]
fn container_events_stream_created_started_stopped_deleted_with_the_pods_status() {
    let (out, st) = sc("events");
    assert_eq!(st, 0, "{out}");
    assert_eq!(value_of(out, "events_rc"), "0", "{out}");
    let id = value_of(out, "E");
    let events: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("CONTAINER_"))
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(
        kinds,
        [
            "CONTAINER_CREATED_EVENT",
            "CONTAINER_STARTED_EVENT",
            "CONTAINER_STOPPED_EVENT",
            "CONTAINER_DELETED_EVENT"
        ],
        "{out}"
    );
    for l in &events {
        assert!(l.contains(id), "every event names the container: {out}");
        assert!(!l.contains("pod= "), "and carries its pod's status: {out}");
    }
}

#[test]
fn pod_sandbox_stats_come_from_the_vmms_cgroup_and_the_pods_interface() {
    let (out, st) = sc("statsp");
    assert_eq!(st, 0, "{out}");
    let n = |k: &str| -> u64 {
        value_of(out, k)
            .parse()
            .unwrap_or_else(|_| panic!("{k}: {out}"))
    };
    assert!(n("cpu_ns") > 0, "{out}");
    // The VMM's leaf holds the guest's memory as the VMM touched it.
    assert!(n("memory_bytes") > 8 << 20, "{out}");
    assert!(n("memory_working_set") <= n("memory_bytes"), "{out}");
    assert!(n("processes") >= 3, "the VMM's threads: {out}");
    assert!(
        n("rx_bytes") > 0 && n("tx_bytes") > 0,
        "the pod's eth0 carried the network test's traffic: {out}"
    );
    assert_eq!(n("containers"), 1, "the running ticker: {out}");
    assert_eq!(value_of(out, "missing_rc"), "1", "{out}");
}

#[test]
fn pods_get_cni_addresses_the_node_and_other_pods_reach() {
    let (out, st) = sc("network");
    assert_eq!(st, 0, "{out}");
    let ip = value_of(out, "ip");
    assert!(
        ip.starts_with("10.88."),
        "an address of the network list: {out}"
    );
    assert_eq!(value_of(out, "node_ping"), "ok", "{out}");
    assert!(
        out.contains(&format!("inet {ip}/16")),
        "the guest's eth0 has the pod's address: {out}"
    );
    assert!(out.contains("default via 10.88.0.1"), "{out}");
    assert!(
        out.contains("nameserver 10.96.0.10"),
        "the pod's DNS: {out}"
    );
    assert!(out.contains("search default.svc.cluster.local"), "{out}");
    let peer = value_of(out, "peer_ip");
    assert!(peer.starts_with("10.88.") && peer != ip, "{out}");
    assert_eq!(value_of(out, "pod_to_pod"), "peer-says-hi", "{out}");
    assert_eq!(
        value_of(out, "veths_after_peer"),
        "1",
        "peer's veth went: {out}"
    );
    assert_eq!(value_of(out, "netns_left"), "1", "only web's: {out}");
}

#[test]
fn a_sandbox_from_the_pool_finishes_the_restore_its_vmm_prepared_while_waiting() {
    let (out, st) = sc("network");
    assert_eq!(st, 0, "{out}");
    // By the time peer starts, web's template is the expected one and every
    // waiting VMM has preloaded it: the load only built the clone's devices.
    assert_finished_a_preloaded_restore(out, "peer_vmm_phases");
}

/// The VMM phases under `key` in `out` are those of a load into a standby VMM
/// that had the template preloaded: no state read, the vCPUs started.
fn assert_finished_a_preloaded_restore(out: &str, key: &str) {
    let phases = value_of(out, key);
    assert!(phases.contains("template_preloaded"), "{key}: {out}");
    assert!(!phases.contains("state_read"), "{key}: {out}");
    assert!(phases.contains("vcpus_started"), "{key}: {out}");
}

#[test]
fn a_port_mapping_reaches_the_pod_from_the_node_and_goes_with_it() {
    let (out, st) = sc("network");
    assert_eq!(st, 0, "{out}");
    // The pod's port_mappings reached the portmap plugin, whose DNAT carries the
    // node's port 30080 to the pod's httpd on 8080.
    assert_eq!(value_of(out, "hostport"), "peer-says-hi", "{out}");
    assert_ne!(value_of(out, "hostport_rules"), "0", "{out}");
    // StopPodSandbox ran the plugins' DEL: the rules are gone.
    assert_eq!(value_of(out, "hostport_rules_after_peer"), "0", "{out}");
}

#[test]
fn port_forward_reaches_a_pods_port_over_spdy_websocket_and_the_go_library() {
    let (out, st) = sc("network");
    assert_eq!(st, 0, "{out}");
    for t in ["spdy", "websocket"] {
        assert_eq!(value_of(out, &format!("pf_{t}")), "peer-says-hi", "{out}");
        assert_eq!(
            value_of(out, &format!("pf2_{t}")),
            "peer-says-hi",
            "a second connection through the same listener: {out}"
        );
    }
    assert_eq!(value_of(out, "pf_go_rc"), "0", "{out}");
    assert_eq!(value_of(out, "pf_go"), "peer-says-hi", "{out}");
    let closed = value_of(out, "pf_closed");
    assert!(
        closed.contains("nothing accepts connections on port 9"),
        "a closed port is reported on the error stream: {out}"
    );
    let other = value_of(out, "pf_other");
    assert!(
        other.contains("port 9 was not among the ports"),
        "a URL serves only the ports it was asked for: {out}"
    );
}

#[test]
fn pods_survive_a_killed_server_which_adopts_them_on_restart() {
    let (out, st) = sc("kill_server");
    assert_eq!(st, 0, "{out}");
    assert_eq!(
        value_of(out, "vmms"),
        "1",
        "the VM outlived the server: {out}"
    );
    // The pool's waiting VMMs outlived it too, and the next server swept them.
    assert_ne!(value_of(out, "waiting_left"), "0", "{out}");
    assert_eq!(value_of(out, "waiting_alive_after_restart"), "0", "{out}");
    assert!(out.contains(" web SANDBOX_READY"), "{out}");
    assert_eq!(value_of(out, "state"), "CONTAINER_RUNNING");
    assert!(out.contains("still-here"), "{out}");
    let more: u32 = value_of(out, "ticks_while_down_and_after").parse().unwrap();
    assert!(
        more >= 10,
        "the container's output reaches its log again after the restart: {out}"
    );
    // Every line written while no server ran was held by the guest and reached
    // the log, and so did the one in flight when the server was killed (read by
    // it, or in its socket, never logged): the new server said how much the log
    // holds and the guest sent the rest again. A kill between a log write and
    // the count's update repeats that one chunk instead of losing it.
    let numbers = |key: &str| -> Vec<u64> {
        value_of(out, key)
            .split(',')
            .filter(|m| !m.is_empty())
            .map(|m| m.parse().unwrap())
            .collect()
    };
    assert_eq!(numbers("missing"), Vec::<u64>::new(), "no line lost: {out}");
    let last_before: u64 = value_of(out, "last_before").parse().unwrap();
    assert!(
        numbers("repeated")
            .iter()
            .all(|&n| n + 2 >= last_before && n <= last_before + 2),
        "a line is repeated only at the kill: {out}"
    );
}

#[test]
fn stop_kills_after_the_grace_period_and_is_idempotent() {
    let (out, st) = sc("stop_grace");
    assert_eq!(st, 0, "{out}");
    assert_eq!(value_of(out, "rc"), "0");
    // sh as PID 1 of its container ignores SIGTERM: SIGKILL after 2 s.
    let ms: u64 = value_of(out, "stop_ms").parse().unwrap();
    assert!((2000..15000).contains(&ms), "{out}");
    assert_eq!(value_of(out, "state"), "CONTAINER_EXITED");
    assert_eq!(value_of(out, "exit_code"), "137");
    let (out, st) = sc("stop_again");
    assert_eq!(st, 0, "{out}");
    assert!(out.contains("idempotent"), "{out}");
}

#[test]
fn removed_containers_are_gone_and_removing_twice_is_fine() {
    let (out, st) = sc("remove");
    assert_eq!(st, 1, "the last inspect fails: {out}");
    assert!(out.contains("removed"), "{out}");
    assert!(
        out.lines().any(|l| l.trim() == "0"),
        "no container left: {out}"
    );
    assert!(out.contains("NotFound: no container"), "{out}");
}

#[test]
fn a_vm_killed_under_a_running_pod_shows_in_its_status_within_a_second() {
    let (out, st) = sc("vm_killed");
    assert_eq!(st, 0, "{out}");
    assert_eq!(value_of(out, "state"), "SANDBOX_NOTREADY", "{out}");
    assert!(out.contains("state=CONTAINER_EXITED"), "{out}");
    assert!(out.contains("message=its pod's VM ended"), "{out}");
    // The end of its console is kept for whoever looks into why, until removal.
    assert!(
        value_of(out, "console_kept").ends_with(".log"),
        "no kept console named: {out}"
    );
    assert_eq!(value_of(out, "console_nonempty"), "0", "{out}");
    assert_eq!(value_of(out, "rmp"), "0");
    assert_eq!(
        value_of(out, "console_after_rmp"),
        "1",
        "removed with it: {out}"
    );
}

#[test]
fn a_restarted_server_has_its_pool_preload_the_template_already_on_disk() {
    let (out, st) = sc("vm_killed");
    assert_eq!(st, 0, "{out}");
    // No sandbox had asked this server for a template yet: the pool took the
    // default size's from the cache at start.
    assert_finished_a_preloaded_restore(out, "first_after_restart_phases");
}

/// A guest that stops answering (its VMM frozen: alive, sockets open) is declared
/// dead by the sandbox's liveness checks after `guest_timeout_secs` (15 here): the
/// VMM is killed, the sandbox NotReady and its container Exited, saying why.
#[test]
fn a_guest_that_stops_answering_turns_its_sandbox_not_ready_with_the_reason() {
    let (out, st) = sc("vm_wedged");
    assert_eq!(st, 0, "{out}");
    assert_eq!(value_of(out, "state"), "SANDBOX_NOTREADY", "{out}");
    assert!(out.contains("state=CONTAINER_EXITED"), "{out}");
    assert!(out.contains("the guest stopped answering"), "{out}");
    let secs: u64 = value_of(out, "secs").parse().unwrap();
    assert!(
        (12..=90).contains(&secs),
        "declared dead after {secs} s: {out}"
    );
    assert_eq!(
        value_of(out, "vmm_alive"),
        "1",
        "the frozen VMM was killed: {out}"
    );
    assert_eq!(value_of(out, "rmp"), "0", "{out}");
}

#[test]
fn stopping_and_removing_a_sandbox_leaves_nothing_behind() {
    let (out, st) = sc("stopp");
    assert_eq!(st, 0, "{out}");
    assert!(out.contains("stopped"), "{out}");
    assert_eq!(value_of(out, "state"), "SANDBOX_NOTREADY");
    assert!(out.contains("removed"), "{out}");
    assert_eq!(value_of(out, "vmms"), "0", "{out}");
    assert_eq!(value_of(out, "pod_dirs"), "0", "{out}");
    assert_eq!(
        value_of(out, "pool_waiting"),
        "2",
        "the pool is full again: {out}"
    );
    assert_eq!(value_of(out, "records"), "0", "{out}");
    assert_eq!(value_of(out, "netns"), "0", "{out}");
    assert_eq!(value_of(out, "veths"), "0", "{out}");
    assert_eq!(
        value_of(out, "leases"),
        "0",
        "every address went back: {out}"
    );
    assert!(out.lines().any(|l| l.trim() == "0"), "no pod listed: {out}");
}

#[test]
fn host_mounts_are_copied_in_read_only_and_an_empty_dir_is_shared_by_the_pod() {
    let (out, st) = sc("volumes");
    assert_eq!(st, 0, "{out}");
    // ContainerStatus lists the host mounts as given (kubelet's own files apart).
    let mounts = value_of(out, "mounts");
    assert!(
        mounts.starts_with("/etc/cfg:/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~configmap/cfg:ro,/etc/one.txt:/tmp/cfg/host-link:ro,/scratch:"),
        "{out}"
    );
    assert!(
        mounts.ends_with("kubernetes.io~empty-dir/scratch:rw"),
        "{out}"
    );
    // The ConfigMap's tree arrives whole: content, symlinks, owner and mode.
    assert_eq!(value_of(out, "cfg_a"), "a=1");
    assert_eq!(value_of(out, "cfg_link"), "..data/a.conf");
    assert_eq!(value_of(out, "token_stat"), "0:1234:440");
    assert_eq!(value_of(out, "one"), "one file");
    assert_eq!(value_of(out, "cfg_write"), "refused");
    // The emptyDir is the pod's: one container's file is the other's.
    assert_eq!(value_of(out, "scratch"), "from-vols");
    assert_eq!(value_of(out, "shared"), "from-vols");
    // One copy per host path in the pod, brought up to date at each creation and
    // by the server's sync while containers run.
    assert_eq!(value_of(out, "cfg_a2"), "a=2");
    assert_eq!(value_of(out, "cfg_a1"), "a=2");
    assert_eq!(value_of(out, "cfg_live"), "a=3,a=3", "{out}");
    assert_eq!(
        value_of(out, "cfg_versions").trim(),
        "..2026_12_07 ..data a.conf token",
        "the old versions went, as on the node: {out}"
    );
    // What a copy cannot honour is refused, with the reason.
    assert_eq!(value_of(out, "rw_rc"), "1");
    assert!(
        out.contains("mounts: /data: host path /tmp/cfg is writable"),
        "{out}"
    );
    assert_eq!(value_of(out, "sock_rc"), "1");
    assert!(
        out.contains(
            "/run/atoll/atoll-cri.sock is a socket, which cannot be copied into a microVM pod"
        ),
        "{out}"
    );
    assert_eq!(value_of(out, "bidi_rc"), "1");
    assert!(
        out.contains("mounts: /x: bidirectional propagation"),
        "{out}"
    );
}

#[test]
fn removing_an_image_twice_is_fine_and_it_is_gone() {
    let (out, st) = sc("rmi");
    assert_eq!(st, 0, "{out}");
    assert!(out.contains("removed"), "{out}");
    assert_eq!(value_of(out, "image"), "none");
}

#[test]
fn a_bad_config_and_a_second_server_on_the_socket_fail_with_one_line() {
    let (out, st) = sc("bad_config");
    assert_eq!(st, 1, "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("atoll-cri: "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.starts_with("atoll-cri: /tmp/cfg/bad.toml: line 1: unknown field `sockett`"),
        "{out}"
    );
    assert_eq!(
        out.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "one line: {out}"
    );
    let (out, st) = sc("second_server");
    assert_eq!(st, 1, "{out}");
    assert!(
        out.contains("/run/atoll/atoll-cri.sock is in use by a running server"),
        "{out}"
    );
}

#[test]
fn a_sandbox_needs_no_image_but_a_container_of_a_missing_one_is_refused() {
    // RunPodSandbox before any pull works: the sandbox is the VM alone.
    let (out, st) = sc("early_pod");
    assert_eq!(st, 0, "{out}");
    assert_eq!(value_of(out, "early"), "ok");
    assert!(
        out.contains(
            "NotFound: image \"registry.k8s.io/never/pulled:1\" is not on this node: pull it first"
        ),
        "{out}"
    );
    assert_eq!(value_of(out, "create_rc"), "1");
}
