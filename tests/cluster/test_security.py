"""Least privilege, checked over the rendered overlays and the z2jh values: who holds which secret,
which volume and which Kubernetes right; Pod Security `restricted` for every pod; the gateway's
wiring to JupyterHub."""

from __future__ import annotations

import copy
import re
from urllib.parse import urlsplit

import pytest

from tests.support import clusterlib as cl

GATEWAY = ("Deployment", "mochi-lab-gateway")
SERVICE = "mochi-lab"


def _workload(d: dict, label: str) -> str:
    return label if d["kind"] == "RayCluster" else f"{d['kind']}/{d['metadata']['name']}"


def _walk(node, found: list, key: str):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                found.append(v)
            _walk(v, found, key)
    elif isinstance(node, list):
        for v in node:
            _walk(v, found, key)


def secret_holders(docs: list[dict]) -> dict[tuple[str, str], set[str]]:
    """(Secret, key) -> the workloads whose pods (or whose operator, for RayCluster options) get it."""
    out: dict[tuple[str, str], set[str]] = {}
    for d in docs:
        for label, tmpl in cl.pod_templates(d):
            refs: list = []
            _walk(tmpl, refs, "secretKeyRef")
            for ref in refs:
                out.setdefault((ref["name"], ref["key"]), set()).add(_workload(d, label))
        if d["kind"] == "RayCluster":
            ft = d["spec"]["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]["secretKeyRef"]
            out.setdefault((ft["name"], ft["key"]), set()).add("RayCluster/mochi-ray/head")
            auth = d["spec"]["authOptions"]
            # KubeRay puts the token (key auth_token) into every Ray container
            for label, _ in cl.pod_templates(d):
                out.setdefault((auth["secretName"], "auth_token"), set()).add(label)
    return out


def env_holders(docs: list[dict], name: str) -> set[str]:
    return {_workload(d, label) for d in docs for label, tmpl in cl.pod_templates(d)
            for c in cl.all_containers(tmpl) if name in cl.env_list(c)}


def claim_mounts(docs: list[dict], claim: str) -> dict[str, bool]:
    """workload -> mounted read-only (both the mount and the volume say so)."""
    out = {}
    for d in docs:
        for label, tmpl in cl.pod_templates(d):
            vols = {v["name"]: v for v in tmpl["spec"].get("volumes", [])}
            for c in cl.all_containers(tmpl):
                for m in c.get("volumeMounts", []):
                    pvc = vols.get(m["name"], {}).get("persistentVolumeClaim", {})  # StatefulSet claims: not here
                    if pvc.get("claimName") == claim:
                        ro = bool(m.get("readOnly")) and bool(pvc.get("readOnly"))
                        key = f"{_workload(d, label)}:{c['name']}"
                        out[key] = ro
    return out


# ---- who holds what (the table of cluster/README.md, "Who holds what") ----------------------------
def test_who_holds_each_secret(rendered):
    for docs in rendered.values():
        holders = secret_holders(docs)
        redis = "StatefulSet/mochi-redis"  # renders the ACL users
        assert holders.pop(("mochi-redis", "gateway-password")) == {"Deployment/mochi-lab-gateway", redis}
        assert holders.pop(("mochi-redis", "worker-password")) == {"RayCluster/mochi-ray/gpu-workers", redis}
        assert holders.pop(("mochi-redis", "gcs-password")) == {"RayCluster/mochi-ray/head", redis}
        assert holders.pop(("mochi-redis", "healthcheck-password")) == {redis}
        assert holders.pop(("mochi-ray-auth", "auth_token")) == {
            "Deployment/mochi-lab-gateway", "RayCluster/mochi-ray/head", "RayCluster/mochi-ray/gpu-workers"}
        assert holders.pop(("hub", f"hub.services.{SERVICE}.apiToken")) == {"Deployment/mochi-lab-gateway"}
        assert holders.pop(("mochi-hf-token", "token")) == {"Job/mochi-model-prefetch"}
        assert not holders, holders


def test_who_holds_the_ray_address_and_a_store_url(rendered):
    for docs in rendered.values():
        assert env_holders(docs, "RAY_ADDRESS") == {"Deployment/mochi-lab-gateway"}
        assert env_holders(docs, "RAY_AUTH_TOKEN") == {"Deployment/mochi-lab-gateway"}  # KubeRay adds it to Ray pods
        assert env_holders(docs, "REDIS_URL") == {"Deployment/mochi-lab-gateway", "RayCluster/mochi-ray/gpu-workers"}


def test_notebooks_hold_only_the_gateway_address(values, notebook_pods):
    su = values["singleuser"]
    assert set(su["extraEnv"]) == {"MOCHI_LAB_GATEWAY"}
    assert "extraVolumes" not in su["storage"] and "extraVolumeMounts" not in su["storage"]
    refs: list = []
    _walk(su, refs, "secretKeyRef")
    _walk(su, refs, "configMapKeyRef")
    assert not refs
    for slug, pod in notebook_pods.items():
        (c,) = pod["spec"]["containers"]
        names = {e["name"] for e in c["env"]}
        for forbidden in ("REDIS_URL", "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "MOCHI_REDIS_PASSWORD"):
            assert forbidden not in names, (slug, forbidden)
        assert not any("valueFrom" in e for e in c["env"]), slug
        assert not c.get("envFrom"), slug
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"].get("volumes", []) if "persistentVolumeClaim" in v}
        assert not claims & {"mochi-outputs", "mochi-model-cache"}, slug
        assert pod["metadata"]["labels"].get("mochi-lab.io/redis-client") is None
        assert pod["spec"]["serviceAccountName"] == "mochi-notebook"  # no token mounted, no Role (test_invariants)


def test_the_checks_of_notebooks_bite(values, tmp_path):
    bad = copy.deepcopy(values)
    bad["singleuser"]["extraEnv"]["REDIS_URL"] = "redis://x"
    pods = cl.spawner_pods(bad, tmp_path)
    assert "REDIS_URL" in {e["name"] for e in pods["cpu"]["spec"]["containers"][0]["env"]}
    with pytest.raises(AssertionError):
        test_notebooks_hold_only_the_gateway_address(bad, pods)


def test_volumes_least_privilege(rendered):
    for docs in rendered.values():
        cache = claim_mounts(docs, "mochi-model-cache")
        assert cache == {
            "RayCluster/mochi-ray/gpu-workers:wait-for-model": True,
            "RayCluster/mochi-ray/gpu-workers:ray-worker": True,
            "Job/mochi-model-prefetch:prefetch": False,  # the only writer
        }
        outputs = claim_mounts(docs, "mochi-outputs")
        # the workers write videos; the gateway streams them and deletes a job's files with the job
        assert outputs == {"RayCluster/mochi-ray/gpu-workers:ray-worker": False, "Deployment/mochi-lab-gateway:gateway": False}


def test_the_gateway_has_no_kubernetes_api_rights(rendered):
    for docs in rendered.values():
        sa = cl.find(docs, "ServiceAccount", "mochi-lab-gateway")
        assert sa["automountServiceAccountToken"] is False
        dep = cl.find(docs, *GATEWAY)
        spec = dep["spec"]["template"]["spec"]
        assert spec["serviceAccountName"] == "mochi-lab-gateway" and spec["automountServiceAccountToken"] is False
        for d in docs:
            if d["kind"] in ("RoleBinding", "ClusterRoleBinding"):
                assert all(s.get("name") != "mochi-lab-gateway" for s in d.get("subjects", [])), d["metadata"]["name"]
        bound = {s["name"] for d in docs if d["kind"] == "RoleBinding" for s in d["subjects"]}
        assert bound == {"mochi-ray-head"}


# ---- Pod Security ------------------------------------------------------------------------------------
def test_the_namespace_enforces_restricted(rendered):
    for docs in rendered.values():
        labels = cl.find(docs, "Namespace", "mochi-lab")["metadata"]["labels"]
        for mode in ("enforce", "audit", "warn"):
            assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"


def test_every_pod_meets_restricted_and_has_a_read_only_root(rendered):
    for docs in rendered.values():
        seen = 0
        for d in docs:
            for label, tmpl in cl.pod_templates(d):
                seen += 1
                assert not cl.restricted_pod_problems(tmpl["spec"]), label
                psc = tmpl["spec"]["securityContext"]
                assert psc["runAsNonRoot"] is True and psc["seccompProfile"]["type"] == "RuntimeDefault", label
                for c in cl.all_containers(tmpl):
                    assert c["securityContext"].get("readOnlyRootFilesystem") is True, (label, c["name"])
        assert seen == 5  # Redis, gateway, prefetch Job, Ray head, GPU workers
        rc = cl.find(docs, "RayCluster")
        head_psc = rc["spec"]["headGroupSpec"]["template"]["spec"]["securityContext"]
        assert not cl.restricted_container_problems(rc["spec"]["autoscalerOptions"]["securityContext"], head_psc, "autoscaler")


def test_the_restricted_check_bites(rendered):
    dep = copy.deepcopy(cl.find(rendered["prod"], *GATEWAY))
    spec = dep["spec"]["template"]["spec"]
    spec["containers"][0]["securityContext"]["capabilities"] = {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    spec["securityContext"].pop("seccompProfile")
    spec["containers"][0]["securityContext"].pop("seccompProfile")
    spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    problems = " ".join(cl.restricted_pod_problems(spec))
    assert "NET_ADMIN" in problems and "seccompProfile" in problems and "hostPath" in problems
    assert cl.restricted_container_problems({"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                                            {"seccompProfile": {"type": "RuntimeDefault"}}) == ["container: runAsNonRoot must be true"]


def test_jupyterhub_pods_meet_restricted(values, notebook_pods):
    hub = values["hub"]
    assert not cl.restricted_container_problems(hub["containerSecurityContext"], hub["podSecurityContext"], "hub")
    assert not cl.restricted_container_problems(values["proxy"]["chp"]["containerSecurityContext"], None, "proxy")
    pre = values["prePuller"]
    assert not cl.restricted_container_problems(pre["containerSecurityContext"], None, "image-puller")
    assert not cl.restricted_container_problems(pre["pause"]["containerSecurityContext"], None, "pause")
    for slug, pod in notebook_pods.items():
        assert not cl.restricted_pod_problems(pod["spec"]), slug
    # the chart's pods that could not meet it, or need the Kubernetes API, are off
    assert values["singleuser"]["cloudMetadata"]["blockWithIptables"] is False
    assert pre["hook"]["enabled"] is False
    assert values["scheduling"]["userScheduler"]["enabled"] is False
    assert values["scheduling"]["userPlaceholder"]["enabled"] is False
    # and the contexts are valid Kubernetes objects
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": {
        "securityContext": hub["podSecurityContext"],
        "containers": [{"name": n, "image": "i", "securityContext": sc} for n, sc in (
            ("hub", hub["containerSecurityContext"]), ("proxy", values["proxy"]["chp"]["containerSecurityContext"]),
            ("pull", pre["containerSecurityContext"]), ("pause", pre["pause"]["containerSecurityContext"]))]}}
    for version in cl.K8S_VERSIONS:
        cl.validate_core(pod, version)


# ---- the gateway and its JupyterHub registration -------------------------------------------------------
def _mochi_env_names() -> set[str]:
    """Every MOCHI_LAB_* / JUPYTERHUB_* name mochi_lab's code reads (string literals in its sources)."""
    names = set()
    for path in (cl.REPO / "mochi_lab").rglob("*.py"):
        names |= set(re.findall(r"\"((?:MOCHI_LAB|JUPYTERHUB)_[A-Z0-9_]+)\"", path.read_text()))
    return names


def test_gateway_deployment(rendered):
    known = _mochi_env_names()
    for docs in rendered.values():
        dep = cl.find(docs, *GATEWAY)
        assert dep["spec"]["replicas"] == 2
        spec = dep["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        assert c["command"] == ["mochi-lab", "gateway", "--host", "0.0.0.0", "--port", "8000"]
        # the service port, and Prometheus' (tests/cluster/test_monitoring.py)
        assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8000, "metrics": 9464}
        env = {e["name"]: e for e in c["env"]}
        prefix = env["JUPYTERHUB_SERVICE_PREFIX"]["value"]
        assert prefix == f"/services/{env['JUPYTERHUB_SERVICE_NAME']['value']}/" == f"/services/{SERVICE}/"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": prefix + "healthz", "port": "http"}, probe
        # every mochi_lab/JupyterHub variable set here is one the code reads (a typo would be ignored)
        config_keys = set(cl.find(docs, "ConfigMap", "mochi-lab-config")["data"])
        for name in {*env, *config_keys}:
            if name.startswith(("MOCHI_LAB_", "JUPYTERHUB_")):
                assert name in known, name
        assert {"MOCHI_LAB_MODEL", "MOCHI_LAB_WORKERS"} <= config_keys
        assert {"configMapRef": {"name": "mochi-lab-config"}} in c["envFrom"]
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert urlsplit(env["REDIS_URL"]["value"]).username == "gateway"
        svc = cl.find(docs, "Service", "mochi-lab-gateway")
        assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
        assert {(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {(8000, "http"), (9464, "metrics")}
        pdb = cl.find(docs, "PodDisruptionBudget", "mochi-lab-gateway")
        assert pdb["spec"]["selector"] == dep["spec"]["selector"]
        assert 1 <= pdb["spec"]["minAvailable"] < dep["spec"]["replicas"]


def test_the_hub_registers_the_gateway_and_grants_its_scope(values, rendered):
    from jupyterhub.scopes import _check_scopes_exist

    hub = values["hub"]
    (name,) = hub["services"]
    assert name == SERVICE
    svc = cl.find(rendered["prod"], "Service", "mochi-lab-gateway")
    url = urlsplit(hub["services"][name]["url"])
    assert (url.hostname, url.port) == (svc["metadata"]["name"], svc["spec"]["ports"][0]["port"])
    assert "api_token" not in hub["services"][name] and "apiToken" not in hub["services"][name]  # chart-made, in Secret hub
    scope = f"access:services!service={name}"
    assert scope in hub["loadRoles"]["user"]["scopes"]
    token_scopes = hub["config"]["KubeSpawner"]["server_token_scopes"]
    assert scope in token_scopes and "users:activity!user" in token_scopes
    (gateway_role,) = [r for r in hub["loadRoles"].values() if name in r.get("services", [])]
    assert gateway_role["scopes"] == ["read:users"]
    for role in hub["loadRoles"].values():
        _check_scopes_exist(role["scopes"])
    _check_scopes_exist(token_scopes)
    with pytest.raises(KeyError):
        _check_scopes_exist(["acces:services!service=mochi-lab"])
    # notebooks call the Service directly, under the prefix the proxy uses
    gw = urlsplit(values["singleuser"]["extraEnv"]["MOCHI_LAB_GATEWAY"])
    assert gw.hostname == f"{svc['metadata']['name']}.mochi-lab.svc" and gw.port == url.port
    dep = cl.find(rendered["prod"], *GATEWAY)
    env = cl.env_list(dep["spec"]["template"]["spec"]["containers"][0])
    assert gw.path == env["JUPYTERHUB_SERVICE_PREFIX"]["value"]
    # the page's sign-in: the OAuth client the hub registers is the one the gateway uses
    service = hub["services"][name]
    assert service["oauth_client_id"] == env["JUPYTERHUB_CLIENT_ID"]["value"] == f"service-{name}"
    assert service["oauth_redirect_uri"] == env["JUPYTERHUB_OAUTH_CALLBACK_URL"]["value"]
    assert service["oauth_redirect_uri"] == env["JUPYTERHUB_SERVICE_PREFIX"]["value"] + "oauth_callback"


def test_the_gateway_settings_of_the_deployment_are_valid_and_trust_only_private_proxies(rendered, monkeypatch):
    """The Deployment's gateway variables, read by GatewayConfig.from_env as the pod would: the sign-in's
    callback is under the service prefix, and the proxies whose forwarded headers count are private
    networks (the pod network), never any address."""
    import ipaddress

    from mochi_lab.config import GatewayConfig

    gateway_vars = set(GatewayConfig.env_vars().values())
    for docs in rendered.values():
        (c,) = cl.find(docs, *GATEWAY)["spec"]["template"]["spec"]["containers"]
        env = {n: e["value"] for n, e in cl.env_list(c).items() if "value" in e}
        for var in gateway_vars | {"JUPYTERHUB_HOST", "JUPYTERHUB_PUBLIC_HUB_URL"}:
            monkeypatch.delenv(var, raising=False)
        for var, value in env.items():
            if var in gateway_vars:
                monkeypatch.setenv(var, value)
        config = GatewayConfig.from_env()
        assert config.callback_url == "/services/mochi-lab/oauth_callback" and config.client_id == "service-mochi-lab"
        nets = [ipaddress.ip_network(n) for n in config.trusted_proxies]
        assert nets and all(n.is_private and n.prefixlen >= 8 for n in nets), nets


def test_ray_token_auth(rendered):
    import yaml

    crd = yaml.safe_load((cl.SCHEMAS / "ray.io_rayclusters.yaml").read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert "token" in v1["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["authOptions"]["properties"]["mode"]["enum"]
    script = (cl.CLUSTER / "scripts" / "deploy-all.sh").read_text()
    for docs in rendered.values():
        auth = cl.find(docs, "RayCluster")["spec"]["authOptions"]
        assert auth == {"mode": "token", "secretName": "mochi-ray-auth"}
        assert re.search(rf"^RAY_AUTH_SECRET={auth['secretName']}$", script, re.M)
        assert 'ensure_secret "$RAY_AUTH_SECRET" auth_token' in script
