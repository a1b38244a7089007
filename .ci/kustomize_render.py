#!/usr/bin/env python3
"""A small kustomize for the features deploy/k8s uses, so that .ci/deploy-tests.sh can render
and validate the Kubernetes overlays on a machine where no kustomize is installed.

Supported in a kustomization.yaml: `resources` (files and directories), `namespace`, `images`
(`name`, `newName`, `newTag`), `patches` given as `- path:` strategic-merge patches, and
`components` (kustomize Components with `resources` and `patches`). Any other key is refused,
so a manifest that grows a feature this renderer lacks fails loudly instead of rendering wrong.
Strategic merge follows kustomize for the lists deploy/k8s patches (containers, env, volumes,
volume mounts and ports merge by their key); other lists are replaced, and `key: null` deletes.

Usage:
    kustomize_render.py DIR               print the rendering of DIR/kustomization.yaml (YAML)
    kustomize_render.py --compare A B     check that the renderings in files A and B hold the
                                          same objects (e.g. this one and `kubectl kustomize`)

Needs PyYAML. Where kustomize exists, deploy-tests.sh checks this rendering against it.
"""
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
