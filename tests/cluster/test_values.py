"""JupyterHub (z2jh) values: the chart's schema, and the Pods KubeSpawner builds from them."""

from __future__ import annotations

import copy

import pytest

from tests.support import clusterlib as cl


def test_values_validate_against_the_z2jh_schema(values):
    cl.validate_values(values)


@pytest.mark.parametrize(
    "path,key,typo",
    [
        ((), "singleuser", "singelUser"),
        (("singleuser",), "extraEnv", "extraEnvv"),
        (("singleuser", "image"), "tag", "tagg"),
        (("singleuser", "storage"), "type", "typ"),
        (("singleuser", "cloudMetadata"), "blockWithIptables", "blockWithIpTables"),
        (("hub",), "loadRoles", "loadRole"),
        (("proxy", "chp"), "containerSecurityContext", "containerSecurityContxt"),
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
def test_every_profile_builds_a_valid_pod(values, tmp_path):
    pods = cl.spawner_pods(values, tmp_path)
    assert set(pods) == {"cpu", "gpu"}
    for slug, pod in pods.items():
        for version in cl.K8S_VERSIONS:
            cl.validate_core(pod, version)
        (c,) = pod["spec"]["containers"]
        env = {e["name"]: e for e in c["env"]}
        assert env["MOCHI_LAB_GATEWAY"]["value"] == values["singleuser"]["extraEnv"]["MOCHI_LAB_GATEWAY"]
        assert pod["spec"]["serviceAccountName"] == "mochi-notebook"
        assert pod["metadata"]["labels"]["mochi-lab.io/gateway-client"] == "true"
        assert c["image"] == f"{values['singleuser']['image']['name']}:{values['singleuser']['image']['tag']}"
        assert {"cpu", "memory"} <= set(c["resources"]["limits"]) and {"cpu", "memory"} <= set(c["resources"]["requests"])
        assert not cl.restricted_pod_problems(pod["spec"]), slug
    assert "nvidia.com/gpu" not in pods["cpu"]["spec"]["containers"][0]["resources"]["limits"]
    gpu = pods["gpu"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]


def test_a_typo_in_a_profile_override_fails(values, tmp_path):
    bad = copy.deepcopy(values)
    bad["singleuser"]["profileList"][1]["kubespawner_override"]["extra_resource_limit"] = {"nvidia.com/gpu": "1"}
    with pytest.raises(AssertionError, match="extra_resource_limit"):
        cl.spawner_pods(bad, tmp_path)
    bad = copy.deepcopy(values)
    bad["hub"]["config"]["KubeSpawner"]["container_securty_context"] = {}
    with pytest.raises(AssertionError, match="container_securty_context"):
        cl.spawner_pods(bad, tmp_path)
