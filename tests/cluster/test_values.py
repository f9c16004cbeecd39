"""JupyterHub (z2jh) values: the chart's schema, and the Pods KubeSpawner builds from them."""

from __future__ import annotations

import asyncio
import copy

import pytest

import clusterlib as cl


def test_values_validate_against_the_z2jh_schema(values):
    cl.validate_values(values)


@pytest.mark.parametrize(
    "path,key,typo",
    [
        ((), "singleuser", "singelUser"),
        (("singleuser",), "extraEnv", "extraEnvv"),
        (("singleuser", "image"), "tag", "tagg"),
        (("singleuser", "storage"), "extraVolumeMounts", "extraVolumeMount"),
        (("singleuser", "networkPolicy"), "egress", "egres"),
        (("cull",), "timeout", "timout"),
    ],
)
def test_typo_in_values_fails(values, path, key, typo):
    bad = copy.deepcopy(values)
    node = bad
    for part in path:
        node = node[part]
    node[typo] = node.pop(key)
    with pytest.raises(cl.Invalid, match=typo):
        cl.validate_values(bad)


def test_wrong_types_in_values_fail(values):
    bad = copy.deepcopy(values)
    bad["singleuser"]["cpu"]["limit"] = "two"
    with pytest.raises(cl.Invalid, match="two"):
        cl.validate_values(bad)
    bad = copy.deepcopy(values)
    bad["singleuser"]["image"]["pullPolicy"] = "Sometimes"
    with pytest.raises(cl.Invalid, match="Sometimes"):
        cl.validate_values(bad)


def test_chart_resources_are_valid_resource_requirements(values):
    """z2jh passes these through untyped: check them as Kubernetes ResourceRequirements."""
    blocks = {
        "hub": values["hub"]["resources"],
        "proxy.chp": values["proxy"]["chp"]["resources"],
        "prePuller": values["prePuller"]["resources"],
        "prePuller.hook": values["prePuller"]["hook"]["resources"],
        "scheduling.userScheduler": values["scheduling"]["userScheduler"]["resources"],
    }
    for name, res in blocks.items():
        assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"]), name
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
               "spec": {"containers": [{"name": "c", "image": "i", "resources": res}]}}
        for version in cl.K8S_VERSIONS:
            cl.validate_core(pod, version)


def test_notebook_egress_rules_are_valid_network_policy_rules(values):
    policy = {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "x"},
        "spec": {"podSelector": {}, "policyTypes": ["Egress"], "egress": values["singleuser"]["networkPolicy"]["egress"]},
    }
    for version in cl.K8S_VERSIONS:
        cl.validate_core(policy, version)
    policy["spec"]["egress"][0]["too"] = policy["spec"]["egress"][0].pop("to")
    with pytest.raises(cl.Invalid, match="too"):
        cl.validate_core(policy, cl.K8S_VERSIONS[-1])


# ---- the single-user Pods, built by KubeSpawner itself -------------------------------------------
def _spawner_pods(values, monkeypatch, tmp_path) -> dict[str, dict]:
    """Apply the values the way the z2jh chart configures KubeSpawner, then let KubeSpawner
    apply each profile (load_user_options) and build the Pod (get_pod_manifest)."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(  # KubeSpawner loads a config at construction; nothing is contacted
        "apiVersion: v1\nkind: Config\ncurrent-context: offline\n"
        "clusters: [{name: offline, cluster: {server: 'https://127.0.0.1:9'}}]\n"
        "contexts: [{name: offline, context: {cluster: offline, user: offline}}]\n"
        "users: [{name: offline, user: {token: offline}}]\n"
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    from kubernetes_asyncio.client import ApiClient
    from kubespawner import KubeSpawner

    su = values["singleuser"]
    traits = KubeSpawner.class_traits(config=True)
    for profile in su["profileList"]:
        unknown = set(profile.get("kubespawner_override", {})) - set(traits)
        assert not unknown, f"profile {profile['slug']}: not KubeSpawner options: {unknown}"

    async def build() -> dict[str, dict]:
        pods = {}
        async with ApiClient() as api:
            for profile in su["profileList"]:
                sp = KubeSpawner(_mock=True, namespace="mochi-lab")
                sp.image = f"{su['image']['name']}:{su['image']['tag']}"
                sp.image_pull_policy = su["image"]["pullPolicy"]
                sp.environment = copy.deepcopy(su["extraEnv"])
                sp.extra_labels = su["extraLabels"]
                sp.service_account = su["serviceAccountName"]
                sp.volumes = su["storage"]["extraVolumes"]
                sp.volume_mounts = su["storage"]["extraVolumeMounts"]
                sp.cpu_limit, sp.cpu_guarantee = su["cpu"]["limit"], su["cpu"]["guarantee"]
                sp.mem_limit, sp.mem_guarantee = su["memory"]["limit"], su["memory"]["guarantee"]
                sp.profile_list = su["profileList"]
                sp.user_options = {"profile": profile["slug"]}
                await sp.load_user_options()
                pod = api.sanitize_for_serialization(await sp.get_pod_manifest())
                pods[profile["slug"]] = {"apiVersion": "v1", "kind": "Pod", **pod}
        return pods

    return asyncio.run(build())


def test_every_profile_builds_a_valid_pod(values, rendered, monkeypatch, tmp_path):
    pods = _spawner_pods(values, monkeypatch, tmp_path)
    assert set(pods) == {"cpu", "gpu"}
    for slug, pod in pods.items():
        for version in cl.K8S_VERSIONS:
            cl.validate_core(pod, version)
        (c,) = pod["spec"]["containers"]
        env = [e["name"] for e in c["env"]]
        assert env.index("MOCHI_REDIS_PASSWORD") < env.index("REDIS_URL"), slug  # $(VAR) order
        assert {"RAY_ADDRESS", "REDIS_URL", "MOCHI_LAB_DATA_DIR", "MOCHI_LAB_WORKERS"} <= set(env)
        assert pod["metadata"]["labels"]["mochi-lab.io/redis-client"] == "true"
        assert pod["spec"]["serviceAccountName"] == "mochi-notebook"
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
        assert "mochi-outputs" in claims
        assert c["image"] == f"{values['singleuser']['image']['name']}:{values['singleuser']['image']['tag']}"
        assert {"cpu", "memory"} <= set(c["resources"]["limits"]) and {"cpu", "memory"} <= set(c["resources"]["requests"])
    assert "nvidia.com/gpu" not in pods["cpu"]["spec"]["containers"][0]["resources"]["limits"]
    gpu = pods["gpu"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]


def test_a_typo_in_a_profile_override_fails(values, monkeypatch, tmp_path):
    bad = copy.deepcopy(values)
    bad["singleuser"]["profileList"][1]["kubespawner_override"]["extra_resource_limit"] = {"nvidia.com/gpu": "1"}
    with pytest.raises(AssertionError, match="extra_resource_limit"):
        _spawner_pods(bad, monkeypatch, tmp_path)
