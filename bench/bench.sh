#!/usr/bin/env bash
# Lockstep CPU benchmark: the `mlp` preset, global batch 64, 2 local workers, 3 epochs.
# Prints, per run, training samples/s, final test accuracy, training time and the whole job's
# wall time (process start to exit, MNIST loading and evaluation included), then the medians.
#
#   bash bench/bench.sh            # 3 runs with ../shared/data/mnist (or $LOCKSTEP_DATA_DIR)
#   RUNS=5 bash bench/bench.sh
#   BACKEND=tcp bash bench/bench.sh   # workers all-reduce among themselves (default: grpc)
#   TLS=1 bash bench/bench.sh       # the job over TLS (certificates from `lockstep certs`)
#   BIN=/path/to/other/build bash bench/bench.sh   # another build's lockstep + lockstep-worker
#                                      # (to compare two versions in one sitting, interleaved)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${LOCKSTEP_DATA_DIR:-../shared/data/mnist}
runs=${RUNS:-3}
backend=${BACKEND:-grpc}
bin=${BIN:-./target/release}
[ -n "${BIN:-}" ] || cargo build --release --workspace --quiet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tls=()
if [ -n "${TLS:-}" ]; then
  "$bin/lockstep" certs --out "$work/tls" >/dev/null 2>&1
  tls=(--tls-cert "$work/tls/server.pem" --tls-key "$work/tls/server.key" --tls-ca "$work/tls/ca.pem")
fi
echo "backend: $backend, binaries: $bin${TLS:+, TLS}"
printf '%-4s %14s %10s %12s %10s\n' run samples/s accuracy train_s wall_s
for i in $(seq 1 "$runs"); do
  start=$(date +%s.%N)
  "$bin/lockstep" train --preset mlp --epochs 3 --batch-size 64 --workers 2 \
    --backend "$backend" --data-dir "$data" --out "$work/run$i" "${tls[@]}" 2>"$work/log$i" || { cat "$work/log$i"; exit 1; }
  end=$(date +%s.%N)
  python3 - "$work/run$i/summary.json" "$start" "$end" "$i" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
wall = float(sys.argv[3]) - float(sys.argv[2])
print(f"{sys.argv[4]:<4} {s['samples_per_second']:14.0f} {s['test_accuracy']*100:9.2f}% {s['train_seconds']:12.2f} {wall:10.2f}")
PY
done | tee "$work/table"
python3 - "$work/table" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
med = lambda i: statistics.median(float(r[i].rstrip('%')) for r in rows)
print(f"median: {med(1):.0f} samples/s, {med(2):.2f}% test accuracy, {med(3):.2f}s training, {med(4):.2f}s wall")
PY
