#!/usr/bin/env bash
# Lockstep CPU benchmark: by default the `mlp` preset, global batch 64, 2 local workers, 3 epochs.
# Prints, per run, training samples/s, final test accuracy, training time and the whole job's
# wall time (process start to exit, MNIST loading and evaluation included), the workers' own
# split of a step (ms computing, waiting for the all-reduce, applying it) with the all-reduce's
# effective bandwidth, then the medians.
#
#   bash bench/bench.sh            # 3 runs with ../shared/data/mnist (or $LOCKSTEP_DATA_DIR)
#   RUNS=5 bash bench/bench.sh
#   BACKEND=grpc bash bench/bench.sh  # through the coordinator (default: tcp, the workers
#                                     # all-reduce among themselves, as lockstep train's default)
#   TLS=1 bash bench/bench.sh       # the job over TLS (certificates from `lockstep certs`)
#   LOCKSTEP_CLUSTER__SHARED_MEMORY=false bash bench/bench.sh   # tcp ranks on their sockets
#                                   # instead of shared memory (any LOCKSTEP_ setting passes through)
#   BIN=/path/to/other/build bash bench/bench.sh   # another build's lockstep + lockstep-worker
#                                      # (to compare two versions in one sitting, interleaved)
#   PEER=torch bash bench/bench.sh  # PyTorch in the same sitting, interleaved with our runs:
#                                   # DDP over gloo with WORKERS processes, and one process
#                                   # (bench/torch_ref.py; PyTorch from PyPI into a venv under
#                                   # $LOCKSTEP_BENCH_CACHE, default ~/.cache/lockstep-bench)
#   MODEL=mlp:2048,2048 EPOCHS=1 PEER=torch bash bench/bench.sh   # a bandwidth-bound model
#   PRESET=cnn EPOCHS=1 TRAIN_SAMPLES=6400 PEER=torch bash bench/bench.sh   # 100 steps of cnn
# Other knobs: WORKERS (default 2), BATCH (default 64).
set -euo pipefail
cd "$(dirname "$0")/.."
data=${LOCKSTEP_DATA_DIR:-../shared/data/mnist}
runs=${RUNS:-3}
backend=${BACKEND:-tcp}
bin=${BIN:-./target/release}
preset=${PRESET:-mlp}
model=${MODEL:-}
epochs=${EPOCHS:-3}
train_samples=${TRAIN_SAMPLES:-0}
workers=${WORKERS:-2}
batch=${BATCH:-64}
peer=${PEER:-}
cache=${LOCKSTEP_BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lockstep-bench}
[ -n "${BIN:-}" ] || cargo build --release --workspace --quiet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python=python3
if [ "$peer" = torch ]; then
  # PyTorch from PyPI into a venv kept between runs (about 3 GB with its CUDA libraries, which
  # the CPU runs do not use; the first install takes minutes).
  if ! "$cache/venv/bin/python" -c 'import torch, numpy' 2>/dev/null; then
    echo "installing PyTorch into $cache/venv (once)" >&2
    mkdir -p "$cache"
    python3 -m venv "$cache/venv"
    "$cache/venv/bin/pip" install --quiet --disable-pip-version-check torch numpy
  fi
  python=$cache/venv/bin/python
elif [ -n "$peer" ]; then
  echo "bench.sh: PEER=$peer is not known (PEER=torch runs PyTorch alongside)" >&2
  exit 2
fi

tls=()
if [ -n "${TLS:-}" ]; then
  "$bin/lockstep" certs --out "$work/tls" >/dev/null 2>&1
  tls=(--tls-cert "$work/tls/server.pem" --tls-key "$work/tls/server.key" --tls-ca "$work/tls/ca.pem")
fi
model_args=()
[ -z "$model" ] || model_args=(--model "$model")
peer_model=${model:-$preset}

echo "preset $preset${model:+, model $model}, batch $batch, $epochs epoch(s), ${TRAIN_SAMPLES:+$train_samples samples, }$workers workers"
echo "backend: $backend, binaries: $bin${TLS:+, TLS}${peer:+, peer: $peer}"
echo "machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')), $(free -g | awk '/Mem:/ { print $2 }') GiB, $(date -u +%Y-%m-%dT%H:%MZ)"

# The host's memcpy bandwidth: the best of 5 copies of 256 MiB, one thread.
memcpy=$("$python" - <<'PY'
import time
try:
    import numpy as np
    a = np.ones(64 << 20, dtype=np.float32); b = np.empty_like(a)
    best = min((lambda t: (np.copyto(b, a), time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(5))
    print(f"{a.nbytes / best / 1e9:.1f}")
except ImportError:
    print("")
PY
)
[ -z "$memcpy" ] || echo "memcpy: $memcpy GB/s (one thread, 256 MiB)"

printf '%-4s %-22s %12s %10s %9s %8s %28s\n' run system samples/s accuracy train_s wall_s "ms/step compute/wait/apply"
for i in $(seq 1 "$runs"); do
  start=$(date +%s.%N)
  LOCKSTEP_TRAIN_SAMPLES=$train_samples \
    "$bin/lockstep" train --preset "$preset" "${model_args[@]}" --epochs "$epochs" --batch-size "$batch" \
    --workers "$workers" --backend "$backend" --data-dir "$data" --out "$work/run$i" "${tls[@]}" \
    2>"$work/log$i" </dev/null \
    || { cat "$work/log$i"; exit 1; }
  end=$(date +%s.%N)
  python3 - "$work/run$i" "$start" "$end" "$i" "lockstep $backend x$workers" "$memcpy" <<'PY'
import json, re, sys, glob
run, start, end, i, name, memcpy = sys.argv[1:]
s = json.load(open(f"{run}/summary.json"))
wall = float(end) - float(start)
# Each worker's own split, from the last line of its log that gives one.
splits = []
for log in sorted(glob.glob(f"{run}/logs/worker-*.log")):
    found = re.findall(r"([\d.]+) ms/step computing gradients, ([\d.]+) ms/step waiting for the all-reduce, ([\d.]+) ms/step applying", open(log).read())
    if found:
        splits.append([float(v) for v in found[-1]])
split = ""
if splits:
    c, w, a = (sum(x[k] for x in splits) / len(splits) for k in range(3))
    # Gradients of the whole model go out and their average comes back, once per step.
    gb_s = s["parameters"] * 4 * 2 / (w / 1000) / 1e9 if w > 0 else float("inf")
    split = f"{c:.2f}/{w:.2f}/{a:.2f} ({gb_s:.1f} GB/s)"
print(f"{i:<4} {name:<22} {s['samples_per_second']:12.0f} {s['test_accuracy']*100:9.2f}% {s['train_seconds']:9.2f} {wall:8.2f} {split:>28}")
PY
  if [ "$peer" = torch ]; then
    for ddp in "$workers" 0; do
      name="torch DDP gloo x$workers"
      [ "$ddp" != 0 ] || name="torch 1 process"
      start=$(date +%s.%N)
      "$python" bench/torch_ref.py --data-dir "$data" --model "$peer_model" --ddp "$ddp" --epochs "$epochs" \
        --batch-size "$batch" --train-samples "$train_samples" >"$work/peer$i-$ddp.json" 2>"$work/peer$i-$ddp.log" \
        || { cat "$work/peer$i-$ddp.log"; exit 1; }
      end=$(date +%s.%N)
      python3 - "$work/peer$i-$ddp.json" "$start" "$end" "$i" "$name" <<'PY'
import json, sys
path, start, end, i, name = sys.argv[1:]
s = json.loads(open(path).read().strip().splitlines()[-1])
wall = float(end) - float(start)
print(f"{i:<4} {name:<22} {s['samples_per_second']:12.0f} {s['test_accuracy']*100:9.2f}% {s['train_seconds']:9.2f} {wall:8.2f} {'':>28}")
PY
    done
  fi
done | tee "$work/table"
python3 - "$work/table" <<'PY'
import statistics, sys, collections
rows = collections.OrderedDict()
for line in open(sys.argv[1]):
    # Fixed columns: the run (4), the system's name (22, several words), then the figures.
    if not line[:4].strip().isdigit():
        continue
    name, figures = line[5:27].strip(), line[27:].split()[:4]
    rows.setdefault(name, []).append([float(f.rstrip('%')) for f in figures])
med = {}
for name, r in rows.items():
    m = [statistics.median(x[k] for x in r) for k in range(4)]
    med[name] = m[0]
    print(f"median {name}: {m[0]:.0f} samples/s, {m[1]:.2f}% test accuracy, {m[2]:.2f}s training, {m[3]:.2f}s wall")
ours = [n for n in med if n.startswith("lockstep")]
for n in ours:
    for peer in med:
        if not peer.startswith("lockstep"):
            print(f"ratio {n} / {peer}: {med[n] / med[peer]:.2f}")
PY
