"""Offline checks for cluster/: a small kustomize renderer and the validators the tests use.

Nothing here talks to a cluster or the network. The schemas come from:
  * core Kubernetes kinds: the PyPI package kubernetes-validate (its bundled, strict schemas);
  * KubeRay RayCluster: the CRD in ../shared/schemas/ray.io_rayclusters.yaml (openAPIV3Schema of
    the matching version), turned into a strict JSON Schema the way the API server's strict field
    validation treats it (unknown fields are errors);
  * z2jh values: ../shared/schemas/z2jh-values.schema.yaml.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path
from typing import Any, Iterable

import jsonschema
import kubernetes_validate.utils as kv
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
K8S = CLUSTER / "k8s"
OVERLAYS = ("dev", "prod")
SCHEMAS = REPO.parent / "shared" / "schemas"
IMAGES_ENV = CLUSTER / "images.env"
VALUES = CLUSTER / "jupyterhub" / "values.yaml"
SCRIPTS = sorted(
    [*(CLUSTER / "scripts").glob("*.sh"), *(CLUSTER / "local").glob("*.sh")]
)
# Kubernetes minors the manifests must be valid for: the oldest we support and the newest
# kubernetes-validate knows.
K8S_VERSIONS = ("1.30", kv.latest_version())


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def read_env_file(path: Path = IMAGES_ENV) -> dict[str, str]:
    """KEY=value lines (what `source` would set, for files without quoting or expansion)."""
    out: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Z_][A-Z0-9_]*)=([^\s'\"$`]*)", line)
        if not m:
            raise ValueError(f"{path}:{n}: not a plain KEY=value line: {line!r}")
        out[m.group(1)] = m.group(2)
    return out


# ---------------------------------------------------------------------------------------------
# kustomize, the subset this repository uses
# ---------------------------------------------------------------------------------------------
class KustomizeError(Exception):
    pass


CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
    "CustomResourceDefinition", "PriorityClass", "IngressClass", "RuntimeClass",
    "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration", "APIService",
}
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}


def render(kdir: Path) -> list[dict]:
    """Render a kustomization directory like `kustomize build` would, for the fields we use.

    Transformers run in kustomize's order: patches, namespace, labels, images. Anything this
    renderer does not implement is an error, never silently ignored.
    """
    kdir = Path(kdir)
    kfile = kdir / "kustomization.yaml"
    if not kfile.is_file():
        raise KustomizeError(f"no kustomization.yaml in {kdir}")
    k = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(k) - SUPPORTED_FIELDS
    if unknown:
        raise KustomizeError(f"{kfile}: fields not supported by the offline renderer: {sorted(unknown)}")
    if k.get("kind", "Kustomization") != "Kustomization":
        raise KustomizeError(f"{kfile}: kind must be Kustomization")

    docs: list[dict] = []
    for res in k.get("resources", []):
        path = (kdir / res).resolve()
        if path.is_dir():
            docs.extend(render(path))
        elif path.is_file():
            docs.extend(load_docs(path))
        else:
            raise KustomizeError(f"{kfile}: resource {res!r} does not exist")
    ids = [resource_id(d) for d in docs]
    dupes = {i for i in ids if ids.count(i) > 1}
    if dupes:
        raise KustomizeError(f"{kfile}: duplicate resources {sorted(dupes)}")

    for patch in k.get("patches", []):
        docs = _apply_patch_entry(kdir, kfile, patch, docs)
    if "namespace" in k:
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                d.setdefault("metadata", {})["namespace"] = k["namespace"]
    for entry in k.get("labels", []):
        if entry.get("includeSelectors") or entry.get("includeTemplates") or set(entry) - {
            "pairs", "includeSelectors", "includeTemplates"
        }:
            raise KustomizeError(f"{kfile}: only plain `labels: - pairs:` are supported")
        for d in docs:
            d.setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])
    for image in k.get("images", []):
        _set_image(docs, image, kfile)
    return docs


def resource_id(d: dict) -> tuple[str, str, str]:
    return (d.get("apiVersion", ""), d.get("kind", ""), d.get("metadata", {}).get("name", ""))


def _apply_patch_entry(kdir: Path, kfile: Path, entry: dict, docs: list[dict]) -> list[dict]:
    if set(entry) - {"path", "patch", "target"}:
        raise KustomizeError(f"{kfile}: unsupported patch options {sorted(entry)}")
    if "path" in entry:
        ops = yaml.safe_load((kdir / entry["path"]).read_text())
    else:
        ops = yaml.safe_load(entry["patch"])
    if not isinstance(ops, list):
        raise KustomizeError(f"{kfile}: only JSON 6902 patches (a list of ops) are supported")
    target = entry.get("target")
    if not target:
        raise KustomizeError(f"{kfile}: a JSON 6902 patch needs a target")
    hits = [i for i, d in enumerate(docs) if _matches(d, target)]
    if not hits:
        raise KustomizeError(f"{kfile}: patch target {target} matches no resource")
    for i in hits:
        docs[i] = json_patch(docs[i], ops)
    return docs


def _matches(d: dict, target: dict) -> bool:
    unknown = set(target) - {"group", "version", "kind", "name", "namespace"}
    if unknown:
        raise KustomizeError(f"unsupported patch target selectors {sorted(unknown)}")
    api = d.get("apiVersion", "")
    group, _, version = api.rpartition("/")
    checks = {
        "group": group,
        "version": version,
        "kind": d.get("kind"),
        "name": d.get("metadata", {}).get("name"),
        "namespace": d.get("metadata", {}).get("namespace"),
    }
    return all(re.fullmatch(str(v), str(checks[k] or "")) for k, v in target.items())


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise KustomizeError(f"bad JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    for p in parts:
        if isinstance(doc, list):
            doc = doc[int(p)]
        elif isinstance(doc, dict):
            doc = doc[p]
        else:
            raise KeyError(p)
    return doc


def json_patch(doc: dict, ops: Iterable[dict]) -> dict:
    """RFC 6902 (add, remove, replace, test, move, copy), as kustomize applies it."""
    doc = copy.deepcopy(doc)
    for op in ops:
        kind, parts = op["op"], _pointer(op["path"])
        try:
            if kind == "test":
                if _walk(doc, parts) != op["value"]:
                    raise KustomizeError(
                        f"test failed at {op['path']}: {_walk(doc, parts)!r} != {op['value']!r}"
                    )
                continue
            if kind in ("move", "copy"):
                value = copy.deepcopy(_walk(doc, _pointer(op["from"])))
                if kind == "move":
                    doc = json_patch(doc, [{"op": "remove", "path": op["from"]}])
                kind, op = "add", {**op, "value": value}
            parent, last = _walk(doc, parts[:-1]), parts[-1]
            if kind == "add":
                if isinstance(parent, list):
                    parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
                else:
                    parent[last] = copy.deepcopy(op["value"])
            elif kind == "replace":
                if isinstance(parent, list):
                    parent[int(last)] = copy.deepcopy(op["value"])
                else:
                    if last not in parent:
                        raise KeyError(last)
                    parent[last] = copy.deepcopy(op["value"])
            elif kind == "remove":
                del parent[int(last) if isinstance(parent, list) else last]
            else:
                raise KustomizeError(f"unknown patch op {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise KustomizeError(f"patch op {op} failed: {e!r}") from e
    return doc


def split_image(ref: str) -> tuple[str, str | None]:
    """'ghcr.io/x/y:1.0' -> ('ghcr.io/x/y', '1.0'); a registry port is not a tag."""
    if "@" in ref:
        raise KustomizeError(f"digests are not used here: {ref}")
    name, sep, tag = ref.rpartition(":")
    if sep and "/" not in tag:
        return name, tag
    return ref, None


def _containers(node: Any):
    """Every container dict under any `containers` / `initContainers` list, like kustomize."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (c for c in value if isinstance(c, dict))
            else:
                yield from _containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers(item)


def _set_image(docs: list[dict], image: dict, kfile: Path) -> None:
    if set(image) - {"name", "newName", "newTag"}:
        raise KustomizeError(f"{kfile}: unsupported image fields {sorted(image)}")
    for d in docs:
        for c in _containers(d):
            if "image" not in c:
                continue
            name, tag = split_image(c["image"])
            if name != image["name"]:
                continue
            name = image.get("newName", name)
            tag = str(image["newTag"]) if "newTag" in image else tag
            c["image"] = f"{name}:{tag}" if tag else name


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    hits = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    if len(hits) != 1:
        raise LookupError(f"expected one {kind} {name or ''}, found {len(hits)}")
    return hits[0]


def pod_templates(d: dict) -> list[tuple[str, dict]]:
    """(label, pod template) for every pod a workload or RayCluster creates."""
    kind = d["kind"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return [(f"{kind}/{d['metadata']['name']}", d["spec"]["template"])]
    if kind == "CronJob":
        return [(f"{kind}/{d['metadata']['name']}", d["spec"]["jobTemplate"]["spec"]["template"])]
    if kind == "RayCluster":
        out = [(f"RayCluster/{d['metadata']['name']}/head", d["spec"]["headGroupSpec"]["template"])]
        for g in d["spec"].get("workerGroupSpecs", []):
            out.append((f"RayCluster/{d['metadata']['name']}/{g['groupName']}", g["template"]))
        return out
    if kind == "Pod":
        return [(f"Pod/{d['metadata']['name']}", d)]
    return []


def all_containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
class Invalid(Exception):
    pass


def validate_core(doc: dict, version: str) -> None:
    """kubernetes-validate --strict. A kind it has no schema for is an error here (it would
    otherwise pass silently)."""
    try:
        kv.validate(doc, version, strict=True)
    except kv.SchemaNotFoundError as e:
        raise Invalid(f"no schema for {doc.get('apiVersion')}/{doc.get('kind')}: {e}") from e
    except kv.ValidationError as e:
        raise Invalid(f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}: {e}") from e


def validate_metadata(metadata: dict, version: str) -> None:
    """ObjectMeta against the Kubernetes schema (CRDs only say `type: object`)."""
    try:
        validate_core({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata}, version)
    except Invalid as e:
        raise Invalid(f"metadata of {metadata.get('name')!r}: {e}") from e


def _strict(node: Any) -> Any:
    """openAPIV3Schema (structural) -> JSON Schema with unknown fields rejected."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {k: _strict(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = _strict(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = _strict(value)
        elif key in ("nullable", "description", "default") or key.startswith("x-kubernetes-"):
            continue
        else:
            out[key] = value
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        node.get("type") == "object"
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        # the API server prunes, and with strict field validation rejects, unknown fields
        out["additionalProperties"] = False if "properties" in node else out.get("additionalProperties", True)
    return out


def _crd_version_schema(crd_file: Path, version: str) -> dict:
    crd = yaml.safe_load(crd_file.read_text())
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise LookupError(f"{crd_file.name} has no version {version}")


@functools.lru_cache(maxsize=None)
def crd_validator(crd_name: str, version: str) -> tuple[jsonschema.Draft7Validator, dict]:
    raw = _crd_version_schema(SCHEMAS / crd_name, version)
    schema = _strict(raw)
    # metadata is checked against ObjectMeta separately
    schema["properties"]["metadata"] = {"type": "object"}
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema), raw


def _list_key_errors(schema: dict, inst: Any, path: str) -> list[str]:
    """Uniqueness the API server enforces for x-kubernetes-list-type map/set."""
    errors: list[str] = []
    if isinstance(inst, dict):
        props = schema.get("properties", {})
        for k, v in inst.items():
            sub = props.get(k) or (schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), dict) else None)
            if sub:
                errors += _list_key_errors(sub, v, f"{path}.{k}")
    elif isinstance(inst, list):
        lt = schema.get("x-kubernetes-list-type")
        if lt == "map":
            keys = schema.get("x-kubernetes-list-map-keys", [])
            seen = [tuple(json.dumps(i.get(k), sort_keys=True) for k in keys) for i in inst if isinstance(i, dict)]
            dup = {s for s in seen if seen.count(s) > 1}
            if dup:
                errors.append(f"{path}: duplicate entries for keys {keys}: {sorted(dup)}")
        elif lt == "set":
            seen = [json.dumps(i, sort_keys=True) for i in inst]
            if len(set(seen)) != len(seen):
                errors.append(f"{path}: duplicate set items")
        for i, item in enumerate(inst):
            if isinstance(schema.get("items"), dict):
                errors += _list_key_errors(schema["items"], item, f"{path}[{i}]")
    return errors


def validate_crd_object(doc: dict, crd_name: str, version: str = "v1", k8s_version: str = K8S_VERSIONS[-1]) -> None:
    api = doc.get("apiVersion", "")
    if api.rpartition("/")[2] != version:
        raise Invalid(f"{doc.get('kind')} uses {api}, expected version {version}")
    validator, raw = crd_validator(crd_name, version)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    msgs = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
    msgs += _list_key_errors(raw, doc, doc.get("kind", ""))
    if msgs:
        raise Invalid(f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}:\n  " + "\n  ".join(msgs))
    validate_metadata(doc["metadata"], k8s_version)


def validate_raycluster(doc: dict, k8s_version: str = K8S_VERSIONS[-1]) -> None:
    """CRD schema plus the checks KubeRay's operator makes before it creates pods."""
    validate_crd_object(doc, "ray.io_rayclusters.yaml", "v1", k8s_version)
    spec = doc["spec"]
    problems = []
    head = spec["headGroupSpec"]["template"]["spec"]["containers"]
    if not head:
        problems.append("head template has no container")
    for g in spec.get("workerGroupSpecs", []):
        lo, hi, n = g.get("minReplicas", 0), g["maxReplicas"], g.get("replicas", g.get("minReplicas", 0))
        if not (0 <= lo <= hi):
            problems.append(f"{g['groupName']}: minReplicas {lo} > maxReplicas {hi}")
        if not (lo <= n <= hi):
            problems.append(f"{g['groupName']}: replicas {n} outside [{lo}, {hi}]")
    for label, tmpl in pod_templates(doc):
        # the pod templates must be valid Pods
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", **tmpl.get("metadata", {})}, "spec": tmpl["spec"]}
        try:
            validate_core(pod, k8s_version)
        except Invalid as e:
            problems.append(f"{label}: {e}")
    if problems:
        raise Invalid("; ".join(problems))


def _drop_required(node: Any) -> Any:
    if isinstance(node, list):
        return [_drop_required(n) for n in node]
    if isinstance(node, dict):
        return {k: _drop_required(v) for k, v in node.items() if not (k == "required" and isinstance(v, list))}
    return node


@functools.lru_cache(maxsize=None)
def z2jh_validator() -> jsonschema.Draft7Validator:
    """The chart's values schema, minus `required`: helm validates the user's values merged
    over the chart's own values.yaml, which supplies every required key. Everything else
    (additionalProperties: false, types, enums) is kept."""
    schema = yaml.safe_load((SCHEMAS / "z2jh-values.schema.yaml").read_text())
    schema = _drop_required(schema)
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def validate_values(values: dict) -> None:
    errors = sorted(z2jh_validator().iter_errors(values), key=lambda e: list(e.absolute_path))
    if errors:
        raise Invalid("\n".join(f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors))


def deep_merge(base: Any, over: Any) -> Any:
    """Helm's merge of values files: maps merge, everything else is replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = deep_merge(base[k], v) if k in base else v
        return out
    return over


def env_list(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def quantity(q: Any) -> float:
    """Kubernetes quantity -> number (bytes for memory, cores for cpu)."""
    s = str(q)
    units = {
        "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
        "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    }
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", s)
    if not m or (m.group(2) and m.group(2) not in units):
        raise ValueError(f"not a quantity: {q!r}")
    return float(m.group(1)) * units.get(m.group(2), 1)
