#!/usr/bin/env bash
# Builds the VMM's fuzz targets (vmm/fuzz, libFuzzer, nightly, AddressSanitizer) the
# way `cargo fuzz build` does, and runs each a few seconds on a scratch copy of its
# seed corpus, so the targets cannot rot. Long runs: see vmm/fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-5}
target=x86_64-unknown-linux-gnu
out=$PWD/target/fuzz
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz-smoke: installing the nightly toolchain (the fuzz targets need it)" >&2
  rustup toolchain install nightly --profile minimal >/dev/null
fi
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Zsanitizer=address \
-Cdebug-assertions -Coverflow-checks"
if ! (cd vmm/fuzz && cargo +nightly metadata --locked --format-version 1 >/dev/null 2>&1); then
  echo "fuzz-smoke: vmm/fuzz/Cargo.lock is behind the VMM's dependencies (a crate was added or" \
    "bumped in vmm/Cargo.toml): run 'cd vmm/fuzz && cargo +nightly update --workspace' and commit" \
    "the lock file" >&2
  exit 1
fi
(cd vmm/fuzz && cargo +nightly build --release --locked --target "$target" --target-dir "$out" --bins)
for t in block_request queue_walk vsock_packet; do
  corpus=$(mktemp -d)
  trap 'rm -rf "$corpus"' EXIT
  if [ -d "vmm/fuzz/seeds/$t" ]; then cp "vmm/fuzz/seeds/$t"/* "$corpus"/; fi
  log=$corpus.log
  mkdir -p "$out/artifacts/$t"
  if ! "$out/$target/release/$t" -max_total_time="$secs" -max_len=16384 -timeout=10 \
      -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$out/artifacts/$t/" \
      "$corpus" >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "fuzz-smoke: $t failed; the input is in $out/artifacts/$t/" >&2
    exit 1
  fi
  echo "fuzz-smoke: $t: $(grep -o 'Done [0-9]* runs in [0-9]* second(s)' "$log"), no finding"
  rm -rf "$corpus" "$log"
done
