#!/usr/bin/env bash
# Container tests for deploy/: run from the repository root after `cargo build --release`.
#
# No image registry is reachable here, so the test image is assembled from the binaries built
# on this machine (a root filesystem with the two binaries, the exact shared libraries `ldd`
# lists and the dynamic loader, built FROM scratch); deploy/docker/Dockerfile stays the image
# users build. Then:
#   compose-train    docker compose with 2 workers trains one epoch of `mlp` on the real MNIST
#                    and reaches >= 95% test accuracy (read from the run directory)
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
#   k8s-config       the ConfigMaps' lockstep.toml parses with `lockstep check-config`
# Everything the script creates (containers, networks, volumes, images, temp dirs) is removed
# on exit, pass or fail. Ends with `deploy: N passed, M failed`; exits non-zero on any failure.
#
# Knobs: DEPLOY_TESTS_ONLY (regex of the check names to run), DEPLOY_TESTS_NO_KUSTOMIZE=1 (skip
# the comparison with `kubectl kustomize`), LOCKSTEP_MNIST_DIR (default ../shared/data/mnist),
# LOCKSTEP_CI_CACHE (where the kubernetes-validate venv is kept, default ~/.cache/lockstep-ci),
# KUBE_VERSION (schema version, default 1.36.0), TRAIN_DEADLINE_S (default 600).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

BIN_DIR=$REPO/target/release
MNIST_DIR=${LOCKSTEP_MNIST_DIR:-../shared/data/mnist}
[ -f "$MNIST_DIR/train-images-idx3-ubyte.gz" ] || {
  echo "deploy-tests: MNIST not found in $MNIST_DIR (set LOCKSTEP_MNIST_DIR)" >&2
  exit 1
}
MNIST_DIR=$(cd "$MNIST_DIR" && pwd)
CACHE=${LOCKSTEP_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lockstep-ci}
KUBE_VERSION=${KUBE_VERSION:-1.36.0}
KUBERNETES_VALIDATE=${KUBERNETES_VALIDATE:-kubernetes-validate==1.37.0}
TRAIN_DEADLINE_S=${TRAIN_DEADLINE_S:-600}

ID="lockstep-ci-$$-$(date +%s)"
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
  docker image rm -f "$IMAGE" >/dev/null 2>&1
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
# (a) The test image: the host-built binaries and exactly the libraries they load, FROM scratch.
build_test_image() {
  local rootfs=$WORK/image/rootfs owned=$WORK/image/owned
  mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc" "$rootfs/tmp" "$owned/lockstep/runs" "$owned/data/mnist"
  chmod 1777 "$rootfs/tmp"
  for bin in lockstep lockstep-worker; do
    [ -x "$BIN_DIR/$bin" ] || { echo "missing $BIN_DIR/$bin: run cargo build --release first"; return 1; }
    cp "$BIN_DIR/$bin" "$rootfs/usr/local/bin/"
    if ldd "$BIN_DIR/$bin" | grep 'not found'; then
      echo "$BIN_DIR/$bin needs libraries this machine lacks"
      return 1
    fi
    # Every library at the path the loader will look for it (`=> /path`), plus the loader itself
    # (the line with no `=>`); symlinks resolved so the file itself is copied.
    while read -r lib; do
      mkdir -p "$rootfs$(dirname "$lib")"
      cp -L "$lib" "$rootfs$lib"
    done < <(ldd "$BIN_DIR/$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
  done
  printf 'root:x:0:0:root:/root:/sbin/nologin\nlockstep:x:10001:10001:lockstep:/lockstep:/sbin/nologin\n' >"$rootfs/etc/passwd"
  printf 'root:x:0:\nlockstep:x:10001:\n' >"$rootfs/etc/group"
  printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"
  cat >"$WORK/image/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
COPY --chown=10001:10001 owned/ /
USER 10001:10001
WORKDIR /lockstep
ENV PATH=/usr/local/bin HOME=/lockstep LOCKSTEP_CACHE_DIR=/data/mnist
EXPOSE 50051
CMD ["lockstep", "--help"]
DOCKERFILE
  docker build --quiet --label lockstep-ci=1 -t "$IMAGE" "$WORK/image" >"$WORK/image/build.log" 2>&1 || {
    cat "$WORK/image/build.log"
    return 1
  }
  echo "  $IMAGE: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{ printf "%.0f MB", $1 / 1e6 }'), $(find "$rootfs" -name '*.so*' | wc -l) shared objects"
  # The binaries start inside it, as the unprivileged user.
  [ "$(docker image inspect -f '{{.Config.User}}' "$IMAGE")" = 10001:10001 ]
  docker run --rm "$IMAGE" lockstep train --help >"$WORK/image/train-help.txt"
  grep -q -- --external-workers "$WORK/image/train-help.txt"
  docker run --rm "$IMAGE" lockstep-worker --help >/dev/null
  docker run --rm "$IMAGE" lockstep check-config --epochs 1 >"$WORK/image/check-config.txt"
  grep -q '^epochs = 1$' "$WORK/image/check-config.txt"
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
    "$BIN_DIR/lockstep" certs --out "$WORK/tls-$name" >/dev/null 2>&1
    [ "$(id -u)" -ne 0 ] || chown -R 10001:10001 "$WORK/tls-$name"
    files+=(-f "$REPO/deploy/docker-compose.tls.yml")
  fi
  log "compose-train ($name): project $project, runs in $runs"
  set +e
  LOCKSTEP_TLS_DIR=$WORK/tls-$name LOCKSTEP_BACKEND=$backend LOCKSTEP_RUNS=$runs timeout "$TRAIN_DEADLINE_S" \
    "${COMPOSE[@]}" -p "$project" "${files[@]}" \
    up --scale worker=2 --exit-code-from coordinator --no-color >"$WORK/train-$name.log" 2>&1
  rc=$?
  set -e
  if [ "$rc" -ne 0 ]; then
    tail -n 40 "$WORK/train-$name.log"
    echo "docker compose up exited $rc"
    return 1
  fi
  grep -E '^coordinator.*(done|accuracy)' "$WORK/train-$name.log" | tail -n 2 | plain || true
  if [ "$tls" = tls ]; then
    grep -F '(TLS only)' "$WORK/train-$name.log" | plain
    grep -F 'listens for the other ranks' "$WORK/train-$name.log" | grep -F '(TLS)' | head -n 1 | plain
    grep -F '(TLS only)' "$WORK/train-$name.log" >/dev/null || { echo "the coordinator did not serve TLS"; return 1; }
    grep -F 'listens for the other ranks' "$WORK/train-$name.log" | grep -F '(TLS)' >/dev/null ||
      { echo "the workers' tcp links were not TLS"; return 1; }
  fi
  python3 - "$runs" "${LOCKSTEP_USER:-10001}" "$backend" <<'PY'
import glob, json, os, sys
runs, user, backend = sys.argv[1], int(sys.argv[2].split(":")[0]), sys.argv[3]
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
acc = m["test_accuracy"]
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
  local how=$1 project=$ID-$1 runs coordinator victim victim_host rc exit_code logs
  runs=$(new_runs_dir "$how")
  log "compose-$how: project $project"
  LOCKSTEP_RUNS=$runs LOCKSTEP_EPOCHS=2 LOCKSTEP_CHECKPOINT_EVERY_STEPS=100 \
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
      wait_log "$coordinator" 'epoch 2/2 step [0-9]+' 180
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
  python3 - "$runs" "$how" <<'PY'
import glob, json, sys
runs, how = sys.argv[1], sys.argv[2]
found = glob.glob(f"{runs}/*/summary.json")
assert len(found) == 1, f"expected one finished run in {runs}, found {found}"
run = found[0].rsplit("/", 1)[0]
metrics = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if l.strip()]
assert [m["epoch"] for m in metrics] == [1, 2], f"epochs in metrics.jsonl: {[m['epoch'] for m in metrics]}"
for m in metrics:
    assert m["samples_covered"] == m["samples_applied"] == 60000, f"epoch {m['epoch']}: {m}"
changes = sum(m["membership_changes"] for m in metrics)
if how != "resume":
    assert changes >= 1, f"no membership change recorded: {metrics}"
acc = metrics[-1]["test_accuracy"]
print(f"  finished: test_accuracy {acc:.4f} after 2 epochs, every sample once per epoch, "
      f"{changes} membership change(s), workers at the end: {metrics[-1]['workers']}")
assert acc >= 0.95, f"test accuracy {acc:.4f} < 0.95"
PY
}

# ---------------------------------------------------------------------------------------------
# (d) Kubernetes manifests, offline: strict schema validation of base and rendered overlays.
k8s_venv() {
  local venv=$CACHE/venv
  if ! "$venv/bin/python" -c 'import kubernetes_validate, yaml' 2>/dev/null; then
    rm -rf "$venv"
    mkdir -p "$CACHE"
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$KUBERNETES_VALIDATE" pyyaml >&2
  fi
  echo "$venv"
}

# A small kustomize for the features deploy/k8s uses (resources, namespace, images, strategic-
# merge patches), so the overlays are rendered and checked where no kustomize is installed;
# `--compare A B` checks that two renderings hold the same objects.
write_k8s_renderer() {
  cat >"$WORK/k8s-render.py" <<'PY'
import json, os, sys, yaml

CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole",
                  "ClusterRoleBinding", "CustomResourceDefinition", "PriorityClass"}
# Strategic-merge keys of the lists deploy/k8s patches; other lists are replaced.
MERGE_KEYS = {"containers": "name", "initContainers": "name", "env": "name", "volumes": "name",
              "volumeMounts": "mountPath", "ports": "containerPort"}
KNOWN = {"apiVersion", "kind", "resources", "namespace", "images", "patches", "components"}

def merge(base, patch, key=None):
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)  # `key: null` deletes the key, as in kustomize
            else:
                out[k] = merge(base[k], v, k) if k in base else v
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        mk = MERGE_KEYS[key]
        out = list(base)
        for item in patch:
            idx = [i for i, b in enumerate(out) if b.get(mk) == item.get(mk)]
            if idx:
                out[idx[0]] = merge(out[idx[0]], item)
            else:
                out.insert(0, item)
        return out
    return patch

def containers(doc):
    spec = doc.get("spec", {})
    spec = spec.get("template", {}).get("spec", spec)
    return spec.get("containers", []) + spec.get("initContainers", [])

def patch(docs, directory, kust):
    for p in kust.get("patches", []):
        assert set(p) == {"path"}, f"{directory}: only `patches: - path:` is supported, got {p}"
        for patch in yaml.safe_load_all(open(os.path.join(directory, p["path"]))):
            hits = [i for i, d in enumerate(docs) if d["kind"] == patch["kind"]
                    and d["metadata"]["name"] == patch["metadata"]["name"]]
            assert len(hits) == 1, (f"{directory}/{p['path']}: patch for {patch['kind']} "
                                    f"{patch['metadata']['name']} matches {len(hits)} resources")
            docs[hits[0]] = merge(docs[hits[0]], patch)
    return docs

def render(directory):
    kust = yaml.safe_load(open(os.path.join(directory, "kustomization.yaml")))
    unknown = set(kust) - KNOWN
    assert not unknown, f"{directory}/kustomization.yaml: keys this renderer does not know: {unknown}"
    docs = []
    for r in kust.get("resources", []):
        assert not os.path.isabs(r), f"{directory}: kustomize refuses the absolute path {r}"
        path = os.path.normpath(os.path.join(directory, r))
        if os.path.isdir(path):
            docs += render(path)
        else:
            docs += [d for d in yaml.safe_load_all(open(path)) if d]
    docs = patch(docs, directory, kust)
    # A Component's resources and patches apply to what the kustomization built so far.
    for c in kust.get("components", []):
        cdir = os.path.normpath(os.path.join(directory, c))
        comp = yaml.safe_load(open(os.path.join(cdir, "kustomization.yaml")))
        assert comp.get("kind") == "Component", f"{cdir} is not a kustomize Component"
        unknown = set(comp) - {"apiVersion", "kind", "resources", "patches"}
        assert not unknown, f"{cdir}/kustomization.yaml: keys this renderer does not know: {unknown}"
        for r in comp.get("resources", []):
            docs += [d for d in yaml.safe_load_all(open(os.path.join(cdir, r))) if d]
        docs = patch(docs, cdir, comp)
    if "namespace" in kust:
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                d["metadata"]["namespace"] = kust["namespace"]
    for img in kust.get("images", []):
        for d in docs:
            for c in containers(d):
                if c["image"].split(":")[0] == img["name"]:
                    c["image"] = img.get("newName", img["name"]) + ":" + img.get("newTag", "latest")
    return docs

def normal(x):
    if isinstance(x, dict):
        return {k: normal(v) for k, v in x.items()}
    if isinstance(x, list):
        return sorted((normal(v) for v in x), key=lambda v: json.dumps(v, sort_keys=True))
    return x

if sys.argv[1] == "--compare":
    a, b = ({(d["kind"], d["metadata"]["name"]): normal(d) for d in yaml.safe_load_all(open(f)) if d}
            for f in sys.argv[2:4])
    assert a.keys() == b.keys(), f"objects differ: {sorted(a.keys() ^ b.keys())}"
    for k in a:
        assert a[k] == b[k], f"{k} differs from kustomize's rendering:\n{yaml.safe_dump(a[k])}\n---\n{yaml.safe_dump(b[k])}"
else:
    yaml.safe_dump_all(render(sys.argv[1]), sys.stdout, sort_keys=False)
PY
}

test_k8s_validate() {
  local venv files render
  venv=$(k8s_venv)
  write_k8s_renderer
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
  if kubectl kustomize --help >/dev/null 2>&1 && [ -z "${DEPLOY_TESTS_NO_KUSTOMIZE:-}" ]; then
    kustomize=yes
  fi
  for target in deploy/k8s/base deploy/k8s/overlays/cpu deploy/k8s/overlays/gpu \
    "$WORK/k8s/my-job-cpu" "$WORK/k8s/my-job-gpu" "$WORK/k8s/my-job-gpu-tls"; do
    render=$WORK/k8s/$(basename "$target").yaml
    "$venv/bin/python" "$WORK/k8s-render.py" "$target" >"$render"
    if [ "$kustomize" = yes ]; then
      # Where kustomize exists, this rendering must agree with it.
      kubectl kustomize "$target" >"$render.kustomize"
      "$venv/bin/python" "$WORK/k8s-render.py" --compare "$render" "$render.kustomize"
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
  venv=$(k8s_venv)
  write_k8s_renderer
  mkdir -p "$WORK/k8s-config"
  for target in base gpu; do
    toml=$WORK/k8s-config/$target.toml
    "$venv/bin/python" "$WORK/k8s-render.py" "deploy/k8s/$([ "$target" = base ] && echo base || echo "overlays/$target")" \
      >"$WORK/k8s-config/$target.yaml"
    "$venv/bin/python" - "$WORK/k8s-config/$target.yaml" >"$toml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
maps = [d for d in docs if d["kind"] == "ConfigMap" and "lockstep.toml" in d.get("data", {})]
assert len(maps) == 1, f"expected one ConfigMap with lockstep.toml, found {len(maps)}"
sys.stdout.write(maps[0]["data"]["lockstep.toml"])
PY
    # Only the file's settings: no LOCKSTEP_* from this environment.
    env -u LOCKSTEP_PRESET -u LOCKSTEP_EPOCHS -u LOCKSTEP_WORKERS \
      "$BIN_DIR/lockstep" check-config --config "$toml" >"$toml.effective"
    echo "  $target: $(tr '\n' ' ' <"$toml" | cut -c1-150)"
  done
}

# ---------------------------------------------------------------------------------------------
run_check() {
  local name=$1
  shift
  if [ -n "${DEPLOY_TESTS_ONLY:-}" ] && ! [[ $name =~ $DEPLOY_TESTS_ONLY ]]; then
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

# The compose checks need the test image; without it they fail at once.
needs_image() {
  docker image inspect "$IMAGE" >/dev/null 2>&1 || { echo "no test image (image-assembly failed)"; return 1; }
  "$@"
}

run_check image-assembly build_test_image
run_check compose-train needs_image test_compose_train grpc
run_check compose-train-tcp needs_image test_compose_train tcp
run_check compose-train-tls needs_image test_compose_train tcp tls
run_check compose-kill needs_image test_compose_fault kill
run_check compose-freeze needs_image test_compose_fault freeze
run_check compose-resume needs_image test_compose_fault resume
run_check k8s-validate test_k8s_validate
run_check k8s-config test_k8s_config

log "took $(($(date +%s) - START)) s"
echo "deploy: $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
