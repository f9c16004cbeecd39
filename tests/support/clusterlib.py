"""Offline checks for cluster/: rendering with the real kustomize and the validators the tests use.

Nothing here talks to a cluster or the network, and nothing is read from outside the repository:
  * the overlays: `kubectl kustomize` (kustomize built into kubectl; .ci/run installs kubectl);
  * core Kubernetes kinds: the PyPI package kubernetes-validate (its bundled, strict schemas);
  * KubeRay RayCluster: the CRD in cluster/schemas/ray.io_rayclusters.yaml (openAPIV3Schema of
    the matching version), checked strictly the way the API server's strict field validation
    does (unknown fields are errors);
  * z2jh values: cluster/schemas/z2jh-values.schema.yaml.
See cluster/schemas/README.md for where the schema files come from.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate.utils as kv
import yaml

from tests.support.tools import need_tool

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
K8S = CLUSTER / "k8s"
OVERLAYS = ("dev", "prod")
SCHEMAS = CLUSTER / "schemas"
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
# kustomize: the real one, built into kubectl
# ---------------------------------------------------------------------------------------------
class KustomizeError(Exception):
    pass


def kubectl() -> str:
    """kubectl on PATH (.ci/run installs it); without it the calling test is skipped naming its install line
    (failed when MOCHI_LAB_TESTS_STRICT=1)."""
    return need_tool("kubectl")


def render(kdir: Path) -> list[dict]:
    """`kubectl kustomize DIR`, offline, parsed."""
    out = subprocess.run([kubectl(), "kustomize", str(kdir)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise KustomizeError(f"kubectl kustomize {kdir}: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


def json_patch(doc: dict, ops: list[dict]) -> dict:
    """An RFC 6902 patch applied by kustomize (the JSON-patch library the API server uses too)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "doc.yaml").write_text(yaml.safe_dump(doc))
        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump({
            "resources": ["doc.yaml"],
            "patches": [{"patch": json.dumps(ops), "target": {"kind": doc["kind"], "name": doc["metadata"]["name"]}}],
        }))
        (out,) = render(Path(tmp))
    return out


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


def _unknown_fields(validator, properties, instance, schema):
    """`properties` as the API server's strict field validation reads it: in an object schema
    with properties and no additionalProperties (and no x-kubernetes-preserve-unknown-fields),
    any other field is an error."""
    yield from jsonschema.Draft7Validator.VALIDATORS["properties"](validator, properties, instance, schema)
    if validator.is_type(instance, "object") and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        for field in sorted(set(instance) - set(properties)):
            yield jsonschema.ValidationError(f"unknown field {field!r}")


def _list_type(validator, list_type, instance, schema):
    """Uniqueness the API server enforces for x-kubernetes-list-type: map (by its keys) and set."""
    if list_type not in ("map", "set") or not validator.is_type(instance, "array"):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    seen = [json.dumps([i.get(k) for k in keys] if list_type == "map" else i, sort_keys=True) for i in instance]
    dups = sorted({s for s in seen if seen.count(s) > 1})
    if dups:
        yield jsonschema.ValidationError(f"duplicate entries (list-type {list_type} {keys}): {dups}")


StrictCRDValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"properties": _unknown_fields, "x-kubernetes-list-type": _list_type}
)


@functools.lru_cache(maxsize=None)
def crd_validator(crd_name: str, version: str) -> jsonschema.Draft7Validator:
    """The openAPIV3Schema of VERSION in the CRD file, strict. metadata is only `type: object`
    there; validate_crd_object checks it as an ObjectMeta."""
    crd = yaml.safe_load((SCHEMAS / crd_name).read_text())
    (schema,) = [v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version]
    StrictCRDValidator.check_schema(schema)
    return StrictCRDValidator(schema)


def _errors(validator: jsonschema.Draft7Validator, instance: Any) -> list[str]:
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def validate_crd_object(doc: dict, crd_name: str, version: str = "v1", k8s_version: str = K8S_VERSIONS[-1]) -> None:
    api = doc.get("apiVersion", "")
    if api.rpartition("/")[2] != version:
        raise Invalid(f"{doc.get('kind')} uses {api}, expected version {version}")
    msgs = _errors(crd_validator(crd_name, version), doc)
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


@functools.lru_cache(maxsize=None)
def z2jh_validator() -> jsonschema.Draft7Validator:
    """The chart's values schema, minus `required`: helm validates the user's values merged
    over the chart's own values.yaml, which supplies every required key. Everything else
    (additionalProperties: false, types, enums) is kept."""
    schema = yaml.safe_load((SCHEMAS / "z2jh-values.schema.yaml").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.validators.extend(jsonschema.Draft7Validator, {"required": lambda *_: ()})(schema)


def validate_values(values: dict) -> None:
    msgs = _errors(z2jh_validator(), values)
    if msgs:
        raise Invalid("\n".join(msgs))


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


# ---------------------------------------------------------------------------------------------
# Pod Security Standards
# ---------------------------------------------------------------------------------------------
RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}


def restricted_container_problems(csc: dict | None, psc: dict | None = None, name: str = "container") -> list[str]:
    """The container rules of the Pod Security Standard `restricted` (Kubernetes 1.30), for one
    container's securityContext given the pod's. Pod-level runAsNonRoot / seccompProfile count."""
    csc, psc = csc or {}, psc or {}
    out = []
    if csc.get("privileged"):
        out.append(f"{name}: privileged")
    if csc.get("allowPrivilegeEscalation") is not False:
        out.append(f"{name}: allowPrivilegeEscalation must be false")
    caps = csc.get("capabilities") or {}
    if "ALL" not in (caps.get("drop") or []):
        out.append(f"{name}: capabilities must drop ALL")
    if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
        out.append(f"{name}: capabilities added: {caps['add']}")
    if csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
        out.append(f"{name}: runAsNonRoot must be true")
    if csc.get("runAsUser", psc.get("runAsUser")) == 0:
        out.append(f"{name}: runAsUser 0")
    seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        out.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost, got {seccomp}")
    if csc.get("procMount", "Default") != "Default":
        out.append(f"{name}: procMount")
    return out


def restricted_pod_problems(spec: dict) -> list[str]:
    """Every rule of `restricted` (which includes `baseline`) for a pod spec."""
    out = []
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            out.append(f"{key}")
    psc = spec.get("securityContext") or {}
    if psc.get("runAsUser") == 0:
        out.append("pod runAsUser 0")
    for sysctl in psc.get("sysctls") or []:
        out.append(f"sysctl {sysctl['name']}")
    for v in spec.get("volumes") or []:
        kinds = set(v) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            out.append(f"volume {v['name']}: {sorted(kinds - RESTRICTED_VOLUME_TYPES)}")
    for c in [*spec.get("initContainers", []), *spec.get("containers", []), *spec.get("ephemeralContainers", [])]:
        out += restricted_container_problems(c.get("securityContext"), psc, c["name"])
        for p in c.get("ports") or []:
            if p.get("hostPort"):
                out.append(f"{c['name']}: hostPort {p['hostPort']}")
    return out


# ---------------------------------------------------------------------------------------------
# JupyterHub: the single-user Pods KubeSpawner builds from the z2jh values
# ---------------------------------------------------------------------------------------------
def spawner_pods(values: dict, workdir: Path) -> dict[str, dict]:
    """Apply the values the way the z2jh chart configures KubeSpawner (singleuser.* and
    hub.config.KubeSpawner), then let KubeSpawner apply each profile (load_user_options) and build
    the Pod (get_pod_manifest). {profile slug: Pod}. Nothing is contacted."""
    import asyncio
    import copy

    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(  # KubeSpawner loads a config at construction
        "apiVersion: v1\nkind: Config\ncurrent-context: offline\n"
        "clusters: [{name: offline, cluster: {server: 'https://127.0.0.1:9'}}]\n"
        "contexts: [{name: offline, context: {cluster: offline, user: offline}}]\n"
        "users: [{name: offline, user: {token: offline}}]\n"
    )
    import kubernetes_asyncio.config.kube_config as kube_config
    from kubernetes_asyncio.client import ApiClient
    from kubespawner import KubeSpawner

    su = values["singleuser"]
    traits = KubeSpawner.class_traits(config=True)
    for profile in su["profileList"]:
        unknown = set(profile.get("kubespawner_override", {})) - set(traits)
        assert not unknown, f"profile {profile['slug']}: not KubeSpawner options: {unknown}"
    hub_config = values.get("hub", {}).get("config", {}).get("KubeSpawner", {})
    unknown = set(hub_config) - set(traits)
    assert not unknown, f"hub.config.KubeSpawner: not KubeSpawner options: {unknown}"

    async def build() -> dict[str, dict]:
        pods = {}
        async with ApiClient() as api:
            for profile in su["profileList"]:
                sp = KubeSpawner(_mock=True, namespace="mochi-lab")
                for name, value in hub_config.items():
                    setattr(sp, name, copy.deepcopy(value))
                sp.image = f"{su['image']['name']}:{su['image']['tag']}"
                sp.image_pull_policy = su["image"]["pullPolicy"]
                sp.environment = copy.deepcopy(su.get("extraEnv", {}))
                sp.extra_labels = su.get("extraLabels", {})
                sp.service_account = su["serviceAccountName"]
                sp.volumes = su["storage"].get("extraVolumes", [])
                sp.volume_mounts = su["storage"].get("extraVolumeMounts", [])
                sp.uid, sp.fs_gid = su.get("uid", 1000), su.get("fsGid", 100)  # the chart's defaults
                sp.allow_privilege_escalation = su.get("allowPrivilegeEscalation", False)
                sp.cpu_limit, sp.cpu_guarantee = su["cpu"]["limit"], su["cpu"]["guarantee"]
                sp.mem_limit, sp.mem_guarantee = su["memory"]["limit"], su["memory"]["guarantee"]
                sp.profile_list = su["profileList"]
                sp.user_options = {"profile": profile["slug"]}
                await sp.load_user_options()
                pod = api.sanitize_for_serialization(await sp.get_pod_manifest())
                pods[profile["slug"]] = {"apiVersion": "v1", "kind": "Pod", **pod}
        return pods

    # read once at import by kubernetes_asyncio: point it at the offline file for this call
    old = kube_config.KUBE_CONFIG_DEFAULT_LOCATION
    kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(kubeconfig)
    try:
        return asyncio.run(build())
    finally:
        kube_config.KUBE_CONFIG_DEFAULT_LOCATION = old
