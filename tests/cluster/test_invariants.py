"""Cross-file invariants: names, ports, GPU counts, images and versions agree everywhere."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from urllib.parse import urlsplit

import pytest

from tests.support import clusterlib as cl

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REDIS_SERVICE = "mochi-redis"
REDIS_SECRET = "mochi-redis"
# Redis user -> its password's key in the Secret (cluster/k8s/base/redis.yaml)
REDIS_USERS = {"gateway": "gateway-password", "worker": "worker-password", "gcs": "gcs-password",
               "healthcheck": "healthcheck-password"}
CONFIG = "mochi-lab-config"


def _configmap(docs) -> dict[str, str]:
    return cl.find(docs, "ConfigMap", CONFIG)["data"]


def _redis_service(docs) -> tuple[str, int]:
    svc = cl.find(docs, "Service", REDIS_SERVICE)
    assert svc["spec"].get("clusterIP") != "None"
    (port,) = [p for p in svc["spec"]["ports"] if p["name"] == "redis"]
    return svc["metadata"]["name"], port["port"]


def _check_redis_url(url: str, docs) -> str:
    """REDIS_URL points at the Redis Service as an ACL user; returns the user."""
    name, port = _redis_service(docs)
    parts = urlsplit(url)
    assert parts.scheme == "redis"
    assert parts.hostname in (name, f"{name}.mochi-lab.svc", f"{name}.mochi-lab.svc.cluster.local"), url
    assert parts.port == port, url
    assert parts.username in REDIS_USERS, url
    assert parts.password == "$(MOCHI_REDIS_PASSWORD)", url
    assert parts.path == "/0"
    return parts.username


def test_redis_url_of_every_pod_matches_the_service_and_secret(rendered):
    for overlay, docs in rendered.items():
        users = {}
        for d in docs:
            for label, tmpl in cl.pod_templates(d):
                for c in cl.all_containers(tmpl):
                    env = cl.env_list(c)
                    if "REDIS_URL" not in env:
                        continue
                    user = _check_redis_url(env["REDIS_URL"]["value"], docs)
                    users[label if d["kind"] == "RayCluster" else d["kind"]] = user
                    ref = env["MOCHI_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
                    assert (ref["name"], ref["key"]) == (REDIS_SECRET, REDIS_USERS[user]), label
                    # $(VAR) only expands variables defined earlier in the list
                    names = [e["name"] for e in c["env"]]
                    assert names.index("MOCHI_REDIS_PASSWORD") < names.index("REDIS_URL"), label
        assert users == {"Deployment": "gateway", "RayCluster/mochi-ray/gpu-workers": "worker"}, overlay


def test_every_redis_user_has_an_acl_line_and_a_password_in_the_secret(rendered):
    for docs in rendered.values():
        acl = cl.find(docs, "ConfigMap", "mochi-redis-config")["data"]["users.acl"]
        lines = {line.split()[1]: line for line in acl.splitlines() if line.startswith("user ")}
        assert set(lines) == {"default", *REDIS_USERS}
        assert " off " in lines["default"] and " on " not in lines["default"]
        (redis,) = cl.find(docs, "StatefulSet", "mochi-redis")["spec"]["template"]["spec"]["containers"]
        env = cl.env_list(redis)
        for user, key in REDIS_USERS.items():
            (placeholder,) = re.findall(r">@([A-Z_]+)@", lines[user])
            assert env[placeholder]["valueFrom"]["secretKeyRef"] == {"name": REDIS_SECRET, "key": key}, user


def test_redis_statefulset(rendered):
    for docs in rendered.values():
        sts = cl.find(docs, "StatefulSet", "mochi-redis")
        assert sts["spec"]["serviceName"] == "mochi-redis-headless"
        headless = cl.find(docs, "Service", "mochi-redis-headless")
        assert headless["spec"]["clusterIP"] == "None"
        selector = sts["spec"]["selector"]["matchLabels"]
        for svc in (headless, cl.find(docs, "Service", REDIS_SERVICE)):
            assert svc["spec"]["selector"] == selector
        (c,) = sts["spec"]["template"]["spec"]["containers"]
        assert c["command"] == ["sh", "/etc/mochi-redis/start.sh"]
        args = " ".join(c["args"])
        assert "--appendonly yes" in args and "--appendfsync everysec" in args
        assert "--maxmemory-policy noeviction" in args and "--maxmemory $(REDIS_MAXMEMORY)" in args
        assert "--port 6379" in args and {p["containerPort"] for p in c["ports"]} == {6379}
        assert "pass" not in args  # passwords only through the environment and stdin
        config = cl.find(docs, "ConfigMap", "mochi-redis-config")
        (vol,) = [v for v in sts["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
        assert vol["configMap"]["name"] == config["metadata"]["name"]
        assert {"name": vol["name"], "mountPath": "/etc/mochi-redis", "readOnly": True} in c["volumeMounts"]
        assert set(config["data"]) == {"users.acl", "start.sh"}
        for probe in ("readinessProbe", "livenessProbe"):
            assert "--user healthcheck" in " ".join(c[probe]["exec"]["command"])
        maxmem = cl.env_list(c)["REDIS_MAXMEMORY"]["value"]
        assert cl.quantity(maxmem.replace("gb", "G")) < cl.quantity(c["resources"]["limits"]["memory"])
        (claim,) = sts["spec"]["volumeClaimTemplates"]
        assert claim["metadata"]["name"] in {m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/data"}
        assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_secret_is_created_by_deploy_all_with_the_referenced_name():
    script = (cl.CLUSTER / "scripts" / "deploy-all.sh").read_text()
    assert re.search(rf"^SECRET={REDIS_SECRET}$", script, re.M)
    (keys,) = re.findall(r"^SECRET_KEYS=\(([^)]*)\)$", script, re.M)
    assert set(keys.split()) == set(REDIS_USERS.values())
    assert 'ensure_secret "$SECRET" "${SECRET_KEYS[@]}"' in script
    assert "--from-literal" not in script  # values go through stdin


def test_every_secret_and_configmap_reference_resolves(rendered, values):
    for docs in rendered.values():
        data = _configmap(docs)
        refs = []

        def walk(node):
            if isinstance(node, dict):
                for k, v in node.items():
                    if k in ("secretKeyRef", "configMapKeyRef", "configMapRef", "secretRef"):
                        refs.append((k, v))
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)

        walk(docs)
        walk(values["singleuser"])
        rc = cl.find(docs, "RayCluster")
        assert rc["spec"]["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]["secretKeyRef"] in [
            v for k, v in refs if k == "secretKeyRef"
        ]
        made = {(REDIS_SECRET, key) for key in REDIS_USERS.values()} | {("mochi-ray-auth", "auth_token")}
        made.add(("hub", "hub.services.mochi-lab.apiToken"))  # the z2jh chart's Secret
        for kind, ref in refs:
            if kind == "configMapKeyRef":
                assert ref["name"] == CONFIG and ref["key"] in data, ref
            elif kind == "configMapRef":
                assert ref["name"] == CONFIG
            elif kind == "secretKeyRef":
                assert (ref["name"], ref["key"]) in made or ref.get("optional") is True, ref
            else:
                pytest.fail(f"unexpected {kind}")


def test_gcs_fault_tolerance_points_at_redis(rendered):
    for docs in rendered.values():
        rc = cl.find(docs, "RayCluster")
        ft = rc["spec"]["gcsFaultToleranceOptions"]
        name, port = _redis_service(docs)
        assert ft["redisAddress"] == f"{name}:{port}"
        assert ft["redisUsername"] == {"value": "gcs"}
        ref = ft["redisPassword"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == (REDIS_SECRET, REDIS_USERS["gcs"])
        # the gcs user's keys are exactly Ray's namespace (Ray names its hashes RAY<namespace>@<table>)
        acl = cl.find(docs, "ConfigMap", "mochi-redis-config")["data"]["users.acl"]
        (gcs,) = [line for line in acl.splitlines() if line.startswith("user gcs ")]
        assert set(re.findall(r"(\S*~\S+)", gcs)) == {f"~RAY{ft['externalStorageNamespace']}@*", "%W~DUMMY"}
        for line in acl.splitlines():
            if line.startswith(("user gateway ", "user worker ")):
                assert re.findall(r"(\S*~\S+)", line) == ["~mochi:*"]
        # KubeRay rejects the old annotation together with gcsFaultToleranceOptions
        assert "ray.io/ft-enabled" not in rc["metadata"].get("annotations", {})
        for _, tmpl in cl.pod_templates(rc):
            for c in cl.all_containers(tmpl):
                assert "RAY_REDIS_ADDRESS" not in cl.env_list(c)


@pytest.mark.parametrize("overlay", cl.OVERLAYS)
def test_gpu_count_per_pod_matches_the_worker_actors(rendered, overlay):
    docs = rendered[overlay]
    rc = cl.find(docs, "RayCluster")
    (group,) = rc["spec"]["workerGroupSpecs"]
    assert group["groupName"] == "gpu-workers"
    gpus = int(group["rayStartParams"]["num-gpus"])
    (worker,) = group["template"]["spec"]["containers"]
    res = worker["resources"]
    assert int(res["limits"]["nvidia.com/gpu"]) == gpus
    assert int(res["requests"]["nvidia.com/gpu"]) == gpus
    assert gpus == 2  # the design: 2 x H100 a pod, one worker actor a GPU
    # the pool: one actor per GPU of the pods the group starts with
    workers = int(_configmap(docs)["MOCHI_LAB_WORKERS"])
    assert workers == gpus * group["replicas"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert workers <= gpus * group["maxReplicas"]
    # head: no GPUs and no CPUs for tasks, so every actor lands on a GPU worker
    head = rc["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["num-cpus"] == "0"
    for c in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    # GPU nodes are usually tainted
    tolerations = group["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    # the gateway (the pool's owner) and every Ray pod read MOCHI_LAB_WORKERS from the same ConfigMap
    gateway = cl.find(docs, "Deployment", "mochi-lab-gateway")
    for _, tmpl in [*cl.pod_templates(rc), *cl.pod_templates(gateway)]:
        for c in tmpl["spec"]["containers"]:
            assert {"configMapRef": {"name": CONFIG}} in c["envFrom"]


def test_autoscaling_and_shared_memory(rendered):
    for docs in rendered.values():
        rc = cl.find(docs, "RayCluster")
        assert rc["spec"]["enableInTreeAutoscaling"] is True
        assert rc["spec"]["autoscalerOptions"]["idleTimeoutSeconds"] > 0
        for label, tmpl in cl.pod_templates(rc):
            spec = tmpl["spec"]
            (c,) = spec["containers"]
            shm_mounts = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
            assert shm_mounts, label
            (vol,) = [v for v in spec["volumes"] if v["name"] == shm_mounts[0]["name"]]
            assert vol["emptyDir"]["medium"] == "Memory"
            size = cl.quantity(vol["emptyDir"]["sizeLimit"])
            params = (rc["spec"]["headGroupSpec"] if label.endswith("/head") else rc["spec"]["workerGroupSpecs"][0])["rayStartParams"]
            assert int(params["object-store-memory"]) <= size, label
            # /dev/shm is memory: it must fit in the container's limit
            assert size < cl.quantity(c["resources"]["limits"]["memory"]), label
            if not label.endswith("/head"):
                assert size >= 10 * 2**30


def test_every_container_has_requests_and_limits(rendered):
    for docs in rendered.values():
        for d in docs:
            for label, tmpl in cl.pod_templates(d):
                for c in cl.all_containers(tmpl):
                    res = c["resources"]
                    for kind in ("cpu", "memory"):
                        req, lim = res["requests"][kind], res["limits"][kind]
                        assert cl.quantity(req) <= cl.quantity(lim), (label, c["name"], kind)
        rc = cl.find(docs, "RayCluster")
        res = rc["spec"]["autoscalerOptions"]["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"])


def test_service_accounts_exist_and_rbac_is_minimal(rendered, values):
    for docs in rendered.values():
        accounts = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceAccount"}
        for d in docs:
            for label, tmpl in cl.pod_templates(d):
                sa = tmpl["spec"].get("serviceAccountName")
                assert sa in accounts, label
                if sa != "mochi-ray-head":
                    assert accounts[sa].get("automountServiceAccountToken") is False, sa
        assert values["singleuser"]["serviceAccountName"] in accounts
        binding = cl.find(docs, "RoleBinding", "mochi-ray-autoscaler")
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "mochi-ray-head", "namespace": "mochi-lab"}]
        role = cl.find(docs, "Role", binding["roleRef"]["name"])
        # what KubeRay gives the autoscaler it creates itself (common/rbac.go BuildRole)
        rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): set(r["verbs"]) for r in role["rules"]}
        assert rules == {
            (("",), ("pods",)): {"get", "list", "watch", "patch"},
            (("",), ("pods/resize",)): {"patch"},
            (("ray.io",), ("rayclusters",)): {"get", "patch"},
        }
        rc = cl.find(docs, "RayCluster")
        assert rc["spec"]["headGroupSpec"]["template"]["spec"]["serviceAccountName"] == "mochi-ray-head"


def test_only_labelled_clients_reach_redis(rendered, values):
    label = "mochi-lab.io/redis-client"
    for docs in rendered.values():
        policy = cl.find(docs, "NetworkPolicy", "mochi-redis-clients-only")
        sts = cl.find(docs, "StatefulSet", "mochi-redis")
        assert policy["spec"]["podSelector"]["matchLabels"] == sts["spec"]["selector"]["matchLabels"]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        (rule,) = policy["spec"]["ingress"]
        assert rule["from"] == [{"podSelector": {"matchLabels": {label: "true"}}}]
        assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
        # exactly the pods that talk to Redis carry the label: the gateway, the GPU workers (REDIS_URL)
        # and the Ray head (its GCS, gcsFaultToleranceOptions)
        for d in docs:
            for name, tmpl in cl.pod_templates(d):
                uses_redis = any("REDIS_URL" in cl.env_list(c) for c in cl.all_containers(tmpl)) or name.endswith("/head")
                labelled = tmpl.get("metadata", {}).get("labels", {}).get(label) == "true"
                if d["kind"] == "StatefulSet":
                    continue  # Redis itself
                assert uses_redis == labelled, name
        ray_policy = cl.find(docs, "NetworkPolicy", "mochi-ray")
        assert ray_policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/cluster": cl.find(docs, "RayCluster")["metadata"]["name"]}
    assert label not in values["singleuser"]["extraLabels"]


def test_notebook_egress_opens_only_the_gateway(values, rendered):
    (rule,) = values["singleuser"]["networkPolicy"]["egress"]
    dep = cl.find(rendered["prod"], "Deployment", "mochi-lab-gateway")
    assert rule["to"] == [{"podSelector": {"matchLabels": dep["spec"]["selector"]["matchLabels"]}}]
    assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]


def test_ray_address_matches_the_head_service(rendered):
    for docs in rendered.values():
        gateway = cl.find(docs, "Deployment", "mochi-lab-gateway")
        url = urlsplit(cl.env_list(gateway["spec"]["template"]["spec"]["containers"][0])["RAY_ADDRESS"]["value"])
        rc = cl.find(docs, "RayCluster")
        # KubeRay names the head Service <cluster>-head-svc
        assert url.scheme == "ray" and url.hostname == f"{rc['metadata']['name']}-head-svc"
        (head,) = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in head["ports"]}
        assert url.port == ports["client"] == 10001
        assert ports["dashboard"] == 8265
    script = (cl.CLUSTER / "scripts" / "port-forward.sh").read_text()
    assert "mochi-ray-head-svc" in script and "8265" in script and "proxy-public" in script


def test_volumes_and_paths_agree(rendered, values):
    for docs in rendered.values():
        data = _configmap(docs)
        pvcs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}
        for name in ("mochi-model-cache", "mochi-outputs"):
            assert pvcs[name]["spec"]["accessModes"] == ["ReadWriteMany"], name
        rc = cl.find(docs, "RayCluster")
        job = cl.find(docs, "Job", "mochi-model-prefetch")
        gateway = cl.find(docs, "Deployment", "mochi-lab-gateway")
        cache_mounts, output_mounts = set(), set()
        for d in (rc, job, gateway):
            for label, tmpl in cl.pod_templates(d):
                vols = {v["name"]: v for v in tmpl["spec"]["volumes"]}
                for c in cl.all_containers(tmpl):
                    for m in c.get("volumeMounts", []):
                        claim = vols[m["name"]].get("persistentVolumeClaim", {}).get("claimName")
                        assert claim is None or claim in pvcs, (label, claim)
                        if claim == "mochi-model-cache":
                            cache_mounts.add(m["mountPath"])
                        elif claim == "mochi-outputs":
                            output_mounts.add(m["mountPath"])
        assert cache_mounts == {"/models"}
        assert output_mounts == {data["MOCHI_LAB_DATA_DIR"]}
        for key in ("HF_HOME", "MOCHI_LAB_CACHE_DIR", "MOCHI_MODEL_READY_FILE"):
            assert data[key].startswith("/models/"), key
        assert "extraVolumes" not in values["singleuser"]["storage"]  # notebooks get videos through the gateway


def test_model_prefetch_job_and_worker_wait_agree(rendered):
    for docs in rendered.values():
        data = _configmap(docs)
        assert data["MOCHI_MODEL_ID"] == "genmo/mochi-1-preview"
        job = cl.find(docs, "Job", "mochi-model-prefetch")
        (c,) = job["spec"]["template"]["spec"]["containers"]
        assert {"configMapRef": {"name": CONFIG}} in c["envFrom"]
        script = c["command"][2]
        compile(script, "prefetch", "exec")
        assert "DiffusionPipeline.download" in script and "MOCHI_MODEL_READY_FILE" in script
        rc = cl.find(docs, "RayCluster")
        (wait,) = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["initContainers"]
        assert "MOCHI_MODEL_READY_FILE" in " ".join(wait["command"])
        assert {"configMapRef": {"name": CONFIG}} in wait["envFrom"]
        (worker,) = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"]
        assert cl.env_list(worker)["HF_HUB_OFFLINE"]["value"] == "1"


def test_prefetch_script_skips_a_cached_model(tmp_path, rendered):
    """Run the Job's own script: with the ready marker in place it exits at once (no network)."""
    data = _configmap(rendered["dev"])
    job = cl.find(rendered["dev"], "Job", "mochi-model-prefetch")
    script = job["spec"]["template"]["spec"]["containers"][0]["command"][2]
    ready = tmp_path / ".ready" / "model"
    ready.parent.mkdir()
    want = f"{data['MOCHI_MODEL_ID']} revision={data['MOCHI_MODEL_REVISION']} variant={data['MOCHI_MODEL_VARIANT']}"
    ready.write_text(f"{want}\n/somewhere\n")
    env = {k: data[k] for k in ("MOCHI_MODEL_ID", "MOCHI_MODEL_VARIANT", "MOCHI_MODEL_REVISION")}
    env.update(MOCHI_MODEL_READY_FILE=str(ready), HF_HOME=str(tmp_path / "hf"), PATH="/usr/bin:/bin", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"already cached: {want}"


# ---- images and versions ------------------------------------------------------------------------
def test_images_agree_everywhere(rendered, values, images_env):
    ray_image = f"{images_env['MOCHI_RAY_IMAGE']}:{images_env['MOCHI_IMAGE_TAG']}"
    redis_image = images_env["REDIS_IMAGE"]
    for docs in rendered.values():
        images = set()
        for d in docs:
            for _, tmpl in cl.pod_templates(d):
                images |= {c["image"] for c in cl.all_containers(tmpl)}
        assert images == {ray_image, redis_image}
    img = values["singleuser"]["image"]
    assert f"{img['name']}:{img['tag']}" == f"{images_env['MOCHI_NOTEBOOK_IMAGE']}:{images_env['MOCHI_IMAGE_TAG']}"


def test_ray_version_matches_images_and_this_environment(rendered, images_env):
    import ray

    for docs in rendered.values():
        assert cl.find(docs, "RayCluster")["spec"]["rayVersion"] == images_env["RAY_VERSION"]
    # the images pin the Ray that the package's tests run with; a bump shows up here first
    assert ray.__version__ == images_env["RAY_VERSION"]


@pytest.mark.parametrize("dockerfile", ["worker.Dockerfile", "notebook.Dockerfile"])
def test_dockerfile_defaults_match_images_env(dockerfile, images_env):
    text = (cl.CLUSTER / "images" / dockerfile).read_text()
    args = dict(re.findall(r"^ARG ([A-Z_]+)=(\S+)$", text, re.M))
    for key, value in args.items():
        if key in images_env:
            assert value == images_env[key], (dockerfile, key)
    assert {"PYTHON_VERSION", "MOCHI_EXTRAS"} <= set(args)
    if dockerfile == "worker.Dockerfile":  # installs mochi_lab from this repository with a pyproject extra, and pins Ray
        assert "RAY_VERSION" in args
        m = re.search(r'pip install "(/[^"\[]+)\[\$\{MOCHI_EXTRAS\}\]" "ray\[[a-z,]+\]==\$\{RAY_VERSION\}"', text)
    else:  # the thin client and its notebook extra: no Ray (a notebook talks HTTP to the gateway)
        assert "RAY_VERSION" not in args and args["MOCHI_EXTRAS"] == "notebook", args
        m = re.search(r'pip install "(/[^"\[]+)\[\$\{MOCHI_EXTRAS\}\]" \\$', text, re.M)  # and nothing else
    assert m, dockerfile
    assert re.search(rf"^COPY (--chown=\S+ )?\. {re.escape(m.group(1))}$", text, re.M), dockerfile
    pyproject = tomllib.loads((cl.REPO / "pyproject.toml").read_text())
    extras = set(pyproject["project"].get("optional-dependencies", {}))
    assert set(args["MOCHI_EXTRAS"].split(",")) <= extras, (args["MOCHI_EXTRAS"], extras)


@pytest.mark.parametrize("dockerfile", ["worker.Dockerfile", "notebook.Dockerfile"])
def test_dockerignore_keeps_what_the_package_build_needs(dockerfile):
    ignore = (cl.CLUSTER / "images" / f"{dockerfile}.dockerignore").read_text().split()
    pyproject = tomllib.loads((cl.REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", "mochi_lab", pyproject["project"].get("readme", "README.md")}
    needed |= set(pyproject.get("tool", {}).get("setuptools", {}).get("package-dir", {}).values())
    for pattern in ignore:
        for path in needed:
            assert pattern.rstrip("/") != path and not (pattern.endswith("*") and path.startswith(pattern[:-1])), (
                dockerfile, pattern, path
            )


def test_build_script_tags_what_the_manifests_use(images_env):
    out = subprocess.run(
        ["bash", str(cl.CLUSTER / "scripts" / "build-images.sh"), "--dry-run", "--push"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    for image, dockerfile in (("MOCHI_RAY_IMAGE", "worker.Dockerfile"), ("MOCHI_NOTEBOOK_IMAGE", "notebook.Dockerfile")):
        ref = f"{images_env[image]}:{images_env['MOCHI_IMAGE_TAG']}"
        build = [line for line in out.splitlines() if f"-t {ref} " in line]
        assert len(build) == 1 and f"images/{dockerfile}" in build[0], out
        if dockerfile == "worker.Dockerfile":  # the notebook image has no Ray (tests/client/test_thin_client.py)
            assert f"RAY_VERSION={images_env['RAY_VERSION']}" in build[0]
        assert f"PYTHON_VERSION={images_env['PYTHON_VERSION']}" in build[0]
        assert f"+ docker push {ref}" in out
    kustomization = (cl.K8S / "base" / "kustomization.yaml").read_text()
    assert f"newName: {images_env['MOCHI_RAY_IMAGE']}" in kustomization


@pytest.mark.parametrize("n,gpus", [(1, 2), (2, 2), (5, 2), (8, 2), (0, 2), (3, 1)])
def test_scale_workers_patch_is_valid_and_sized(rendered, n, gpus):
    out = subprocess.run(
        ["bash", str(cl.CLUSTER / "scripts" / "scale-workers.sh"), "--dry-run", "--gpus-per-pod", str(gpus), str(n)],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    m = re.search(r"RayCluster JSON patch[^\n]*\n(\[.*?\n\])", out, re.S)
    assert m, out
    patch = json.loads(m.group(1))
    rc = cl.json_patch(cl.find(rendered["prod"], "RayCluster"), patch)
    cl.validate_raycluster(rc)
    group = rc["spec"]["workerGroupSpecs"][0]
    pods = math.ceil(n / gpus)
    assert group["replicas"] == group["minReplicas"] == pods
    assert f'"MOCHI_LAB_WORKERS": "{n}"' in out
    assert f'/services/mochi-lab/workers/scale {{"n": {n}}}' in out  # through the pool's owner, the gateway
    assert "MochiCluster" not in out


def test_deploy_all_applies_the_overlay_and_the_values():
    out = subprocess.run(
        ["bash", str(cl.CLUSTER / "scripts" / "deploy-all.sh"), "--dry-run", "-o", "prod", "--chart-version", "9.9.9"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    assert f"kubectl apply -k {cl.K8S / 'overlays' / 'prod'}" in out
    assert f"--values {cl.VALUES}" in out and "--namespace mochi-lab" in out and "--version 9.9.9" in out
    assert out.index("create secret generic mochi-redis") < out.index("apply -k")
    assert out.index("create secret generic mochi-ray-auth") < out.index("apply -k")
    assert out.index("--values") < out.index("rollout status deployment/mochi-lab-gateway")
    kustomization = (cl.K8S / "base" / "kustomization.yaml").read_text()
    assert "namespace: mochi-lab" in kustomization
    bad = subprocess.run(["bash", str(cl.CLUSTER / "scripts" / "deploy-all.sh"), "--dry-run", "-o", "staging"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "no overlay" in bad.stderr
