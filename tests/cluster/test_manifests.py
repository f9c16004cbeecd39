"""Kubernetes manifests: `kubectl kustomize` renders them offline, every object validates against
its schema, and the checks fail on typos."""

from __future__ import annotations

import copy
import hashlib
import re
import shutil

import pytest
import yaml

from tests.support import clusterlib as cl

EXPECTED_KINDS = {
    "Namespace", "ConfigMap", "ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim",
    "Service", "StatefulSet", "NetworkPolicy", "Job", "RayCluster", "Deployment", "PodDisruptionBudget",
}
CLUSTER_SCOPED = {"Namespace"}  # of EXPECTED_KINDS


@pytest.mark.parametrize("overlay", cl.OVERLAYS)
def test_overlay_renders_with_every_component(rendered, overlay):
    kinds = {d["kind"] for d in rendered[overlay]}
    assert kinds == EXPECTED_KINDS
    for d in rendered[overlay]:
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mochi-lab"
        assert d["metadata"]["labels"]["mochi-lab.io/environment"] == overlay
        if d["kind"] not in CLUSTER_SCOPED:
            assert d["metadata"]["namespace"] == "mochi-lab", (d["kind"], d["metadata"]["name"])


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


def test_crd_schema_is_the_vendored_one_and_the_served_storage_version():
    crd = yaml.safe_load((cl.SCHEMAS / "ray.io_rayclusters.yaml").read_text())
    assert crd["spec"]["names"]["kind"] == "RayCluster"
    v1 = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    assert v1 and v1[0]["served"] and v1[0]["storage"]


def test_vendored_schemas_are_in_the_repository_and_unchanged():
    """The schemas live in cluster/schemas/, as copied from upstream: the checksums in its README."""
    assert cl.SCHEMAS.is_relative_to(cl.REPO)
    readme = (cl.SCHEMAS / "README.md").read_text()
    recorded = dict((name, digest) for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", readme, re.M))
    files = {p.name for p in cl.SCHEMAS.iterdir() if p.name != "README.md"}
    assert files == set(recorded) == {"ray.io_rayclusters.yaml", "z2jh-values.schema.yaml"}
    for name, digest in recorded.items():
        assert hashlib.sha256((cl.SCHEMAS / name).read_bytes()).hexdigest() == digest, name
        assert f"`{name}`" in readme  # and a provenance row


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
    """A typo'd copy of the overlay tree, rendered by kustomize and validated like the real one, fails."""
    shutil.copytree(cl.K8S, tmp_path / "k8s")
    raycluster = tmp_path / "k8s" / "base" / "raycluster.yaml"
    original = raycluster.read_text()
    raycluster.write_text(original.replace("      replicas: 1\n", "      replicass: 1\n", 1))
    # it renders (the overlays' JSON 6902 `replace` of /replicas adds the key back, as kustomize
    # does), and the typo fails validation everywhere
    for target in ("base", *(f"overlays/{o}" for o in cl.OVERLAYS)):
        rc = cl.find(cl.render(tmp_path / "k8s" / target), "RayCluster")
        assert "replicass" in _fails(cl.validate_raycluster, rc), target

    raycluster.write_text(original)
    redis = tmp_path / "k8s" / "base" / "redis.yaml"
    redis.write_text(redis.read_text().replace("  serviceName: mochi-redis-headless", "  servicename: mochi-redis-headless"))
    sts = cl.find(cl.render(tmp_path / "k8s" / "overlays" / "prod"), "StatefulSet")
    assert "servicename" in _fails(cl.validate_core, sts, cl.K8S_VERSIONS[-1])


def test_a_base_the_overlay_patches_do_not_fit_fails_to_render(tmp_path):
    """The overlays' JSON 6902 `test` ops make kustomize fail when the base's layout changes."""
    shutil.copytree(cl.K8S, tmp_path / "k8s")
    raycluster = tmp_path / "k8s" / "base" / "raycluster.yaml"
    raycluster.write_text(raycluster.read_text().replace("groupName: gpu-workers", "groupName: gpu-pool"))
    for overlay in cl.OVERLAYS:
        with pytest.raises(cl.KustomizeError, match="/spec/workerGroupSpecs/0/groupName failed: test failed"):
            cl.render(tmp_path / "k8s" / "overlays" / overlay)
    with pytest.raises(cl.KustomizeError, match="kustomization"):
        cl.render(tmp_path)  # not a kustomization directory
