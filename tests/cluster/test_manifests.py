"""Kubernetes manifests: kustomize renders offline, every object validates against its schema,
and the checks fail on typos."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess

import pytest
import yaml

import clusterlib as cl

EXPECTED_KINDS = {
    "Namespace", "ConfigMap", "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim",
    "Service", "StatefulSet", "NetworkPolicy", "Job", "RayCluster",
}


@pytest.mark.parametrize("overlay", cl.OVERLAYS)
def test_overlay_renders_with_every_component(rendered, overlay):
    kinds = {d["kind"] for d in rendered[overlay]}
    assert kinds == EXPECTED_KINDS
    for d in rendered[overlay]:
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mochi-lab"
        assert d["metadata"]["labels"]["mochi-lab.io/environment"] == overlay
        if d["kind"] not in cl.CLUSTER_SCOPED:
            assert d["metadata"]["namespace"] == "mochi-lab", cl.resource_id(d)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
@pytest.mark.parametrize("target", ["base", *(f"overlays/{o}" for o in cl.OVERLAYS)])
def test_offline_renderer_agrees_with_kubectl_kustomize(target):
    """Where kubectl is available, the offline renderer must produce exactly what kustomize does."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(cl.K8S / target)], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    theirs = {json.dumps(cl.resource_id(d)): d for d in yaml.safe_load_all(out) if d}
    ours = {json.dumps(cl.resource_id(d)): d for d in cl.render(cl.K8S / target)}
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == theirs[key], key


@pytest.mark.parametrize("version", cl.K8S_VERSIONS)
@pytest.mark.parametrize("overlay", cl.OVERLAYS)
def test_core_kinds_pass_kubernetes_validate_strict(rendered, overlay, version):
    checked = 0
    for d in rendered[overlay]:
        if d["kind"] == "RayCluster":
            continue
        cl.validate_core(d, version)
        checked += 1
    assert checked == len(rendered[overlay]) - 1


@pytest.mark.parametrize("overlay", cl.OVERLAYS)
def test_raycluster_validates_against_kuberay_crd(rendered, overlay):
    rc = cl.find(rendered[overlay], "RayCluster", "mochi-ray")
    for version in cl.K8S_VERSIONS:
        cl.validate_raycluster(rc, version)


def test_crd_schema_is_the_shared_one_and_the_served_storage_version():
    crd = yaml.safe_load((cl.SCHEMAS / "ray.io_rayclusters.yaml").read_text())
    assert crd["spec"]["names"]["kind"] == "RayCluster"
    v1 = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert v1 and v1[0]["served"] and v1[0]["storage"]


# ---- the checks bite ---------------------------------------------------------------------------
def _fails(fn, *args) -> str:
    with pytest.raises(cl.Invalid) as info:
        fn(*args)
    return str(info.value)


def test_typo_in_raycluster_fails(rendered):
    rc = copy.deepcopy(cl.find(rendered["prod"], "RayCluster"))
    group = rc["spec"]["workerGroupSpecs"][0]
    group["replicass"] = group.pop("replicas")
    assert "replicass" in _fails(cl.validate_raycluster, rc)

    rc = copy.deepcopy(cl.find(rendered["prod"], "RayCluster"))
    rc["spec"]["autoscalerOptions"]["idleTimeoutSecond"] = 60
    assert "idleTimeoutSecond" in _fails(cl.validate_raycluster, rc)

    rc = copy.deepcopy(cl.find(rendered["prod"], "RayCluster"))
    container = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["resources"]["limit"] = container["resources"].pop("limits")
    assert "limit" in _fails(cl.validate_raycluster, rc)

    rc = copy.deepcopy(cl.find(rendered["prod"], "RayCluster"))
    rc["metadata"]["labelz"] = {}
    assert "labelz" in _fails(cl.validate_raycluster, rc)


def test_wrong_values_in_raycluster_fail(rendered):
    rc = copy.deepcopy(cl.find(rendered["prod"], "RayCluster"))
    rc["spec"]["gcsFaultToleranceOptions"]["backend"] = "mysql"
    assert "mysql" in _fails(cl.validate_raycluster, rc)

    rc = copy.deepcopy(cl.find(rendered["prod"], "RayCluster"))
    rc["spec"]["workerGroupSpecs"][0]["replicas"] = 99
    assert "outside" in _fails(cl.validate_raycluster, rc)

    rc = copy.deepcopy(cl.find(rendered["prod"], "RayCluster"))
    env = rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
    env.append(dict(env[0]))
    assert "duplicate" in _fails(cl.validate_raycluster, rc)

    rc = copy.deepcopy(cl.find(rendered["prod"], "RayCluster"))
    rc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "lots"
    assert "lots" in _fails(cl.validate_raycluster, rc)


def test_typo_in_core_manifest_fails(rendered):
    sts = copy.deepcopy(cl.find(rendered["dev"], "StatefulSet", "mochi-redis"))
    sts["spec"]["replicass"] = sts["spec"].pop("replicas")
    assert "replicass" in _fails(cl.validate_core, sts, cl.K8S_VERSIONS[-1])

    job = copy.deepcopy(cl.find(rendered["dev"], "Job", "mochi-model-prefetch"))
    job["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []
    assert "volumeMount" in _fails(cl.validate_core, job, cl.K8S_VERSIONS[-1])


def test_unknown_kind_is_an_error_not_a_silent_pass():
    doc = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"}}
    assert "no schema" in _fails(cl.validate_core, doc, cl.K8S_VERSIONS[-1])


def test_typo_in_a_manifest_file_fails_through_the_renderer(tmp_path):
    """A typo'd copy of the overlay tree, rendered and validated like the real one, fails."""
    shutil.copytree(cl.K8S, tmp_path / "k8s")
    raycluster = tmp_path / "k8s" / "base" / "raycluster.yaml"
    original = raycluster.read_text()
    raycluster.write_text(original.replace("      replicas: 1\n", "      replicass: 1\n", 1))
    # the base renders, and the typo fails validation
    rc = cl.find(cl.render(tmp_path / "k8s" / "base"), "RayCluster")
    assert "replicass" in _fails(cl.validate_raycluster, rc)
    # the overlays replace /replicas, which the typo removed: rendering fails, as in kustomize
    with pytest.raises(cl.KustomizeError, match="replicas"):
        cl.render(tmp_path / "k8s" / "overlays" / "dev")

    raycluster.write_text(original)
    redis = tmp_path / "k8s" / "base" / "redis.yaml"
    redis.write_text(redis.read_text().replace("  serviceName: mochi-redis-headless", "  servicename: mochi-redis-headless"))
    sts = cl.find(cl.render(tmp_path / "k8s" / "overlays" / "prod"), "StatefulSet")
    assert "servicename" in _fails(cl.validate_core, sts, cl.K8S_VERSIONS[-1])


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\ncommonAnnotations: {a: b}\n")
    with pytest.raises(cl.KustomizeError, match="commonAnnotations"):
        cl.render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [cm.yaml]\npatches:\n- patch: '[{op: replace, path: /data/x, value: y}]'\n  target: {kind: Secret}\n"
    )
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {x: a}\n")
    with pytest.raises(cl.KustomizeError, match="matches no resource"):
        cl.render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [cm.yaml]\npatches:\n- patch: '[{op: test, path: /data/x, value: b}]'\n  target: {kind: ConfigMap}\n"
    )
    with pytest.raises(cl.KustomizeError, match="test failed"):
        cl.render(tmp_path)


def test_json_patch_ops():
    doc = {"a": [1, 2], "b": {"c": 1}}
    out = cl.json_patch(doc, [
        {"op": "add", "path": "/a/-", "value": 3},
        {"op": "add", "path": "/a/0", "value": 0},
        {"op": "replace", "path": "/b/c", "value": 2},
        {"op": "copy", "from": "/b", "path": "/d"},
        {"op": "move", "from": "/d/c", "path": "/e"},
        {"op": "remove", "path": "/a/1"},
        {"op": "test", "path": "/e", "value": 2},
    ])
    assert out == {"a": [0, 2, 3], "b": {"c": 2}, "d": {}, "e": 2}
    assert doc == {"a": [1, 2], "b": {"c": 1}}
    with pytest.raises(cl.KustomizeError):
        cl.json_patch(doc, [{"op": "replace", "path": "/nope", "value": 1}])
