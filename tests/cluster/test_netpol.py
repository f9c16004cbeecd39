"""NetworkPolicies, evaluated (netpol.py) over the pods of the rendered overlays and the z2jh values.

The pods carry the labels they will have in the cluster: their templates' labels, the ones KubeRay
adds to every pod it creates (ray.io/cluster, ray.io/node-type, ray.io/group), and for notebooks the
ones KubeSpawner and z2jh set. JupyterHub's own NetworkPolicies (hub, proxy, notebooks) come from
the z2jh chart, which is not vendored: `z2jh_policies` models the rules of its templates that matter
here, with the values' additions, and the decisive checks hold without them (our ingress rules alone).
"""

from __future__ import annotations

import copy

import pytest

from tests.support import clusterlib as cl
from tests.support.netpol import Cluster, External, Pod

NS = "mochi-lab"
INTERNET = External("151.101.1.1", "internet")
METADATA = External("169.254.169.254", "cloud metadata")
APISERVER = External("172.18.0.2", "kubernetes API endpoint")
PRIVATE = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]
KUBERAY = {"head": {"ray.io/node-type": "head", "ray.io/group": "headgroup"}}


def _pods(docs: list[dict], values: dict, notebook_labels: dict) -> dict[str, Pod]:
    """One pod per workload, with the labels it gets in the cluster."""
    pods: dict[str, Pod] = {}
    ip = iter(f"10.1.0.{i}" for i in range(1, 250))

    def add(key: str, labels: dict, ns: str = NS) -> None:
        pods[key] = Pod(key, ns, dict(labels), next(ip))

    for d in docs:
        for label, tmpl in cl.pod_templates(d):
            labels = dict(tmpl.get("metadata", {}).get("labels", {}))
            if d["kind"] == "RayCluster":
                group = label.rsplit("/", 1)[1]
                labels["ray.io/cluster"] = d["metadata"]["name"]
                labels.update(KUBERAY.get(group, {"ray.io/node-type": "worker", "ray.io/group": group}))
                add("ray-head" if group == "head" else "ray-worker", labels)
            else:
                add(d["metadata"]["name"], labels)
    # JupyterHub's pods (z2jh chart labels) and the notebook (KubeSpawner + z2jh + extraLabels)
    z2jh = {"app": "jupyterhub", "release": "jupyterhub"}
    add("hub", {**z2jh, "component": "hub"})
    add("proxy", {**z2jh, "component": "proxy"})
    # z2jh adds these two to what KubeSpawner sets (extraLabels included)
    add("notebook", {**notebook_labels, "release": "jupyterhub", "hub.jupyter.org/network-access-hub": "true"})
    add("kube-dns", {"k8s-app": "kube-dns"}, "kube-system")
    return pods


def _policy(name: str, spec: dict) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": NS}, "spec": spec}


def z2jh_policies(values: dict) -> list[dict]:
    """What the z2jh chart's NetworkPolicy templates allow (defaults of egressAllowRules), plus the
    values' own rules."""
    z2jh = {"app": "jupyterhub", "release": "jupyterhub"}
    dns = {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}},
                  *({"ipBlock": {"cidr": c}} for c in PRIVATE)],
           "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}
    non_private = {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": [*PRIVATE, "169.254.169.254/32"]}}]}
    everywhere = {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}
    su = values["singleuser"]["networkPolicy"]
    return [
        _policy("singleuser", {
            "podSelector": {"matchLabels": {**z2jh, "component": "singleuser-server"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"hub.jupyter.org/network-access-singleuser": "true"}}}],
                         "ports": [{"port": 8888}]}, *su.get("ingress", [])],
            "egress": [{"to": [{"podSelector": {"matchLabels": {**z2jh, "component": "hub"}}}], "ports": [{"port": 8081}]},
                       dns, non_private, *su.get("egress", [])],
        }),
        _policy("hub", {
            "podSelector": {"matchLabels": {**z2jh, "component": "hub"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"hub.jupyter.org/network-access-hub": "true"}}}],
                         "ports": [{"port": 8081}]}],
            "egress": [everywhere],
        }),
        _policy("proxy", {
            "podSelector": {"matchLabels": {**z2jh, "component": "proxy"}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"ports": [{"port": 8000}]}],
            "egress": [everywhere, *values["proxy"]["chp"]["networkPolicy"].get("egress", [])],
        }),
    ]


def _world(docs: list[dict], values: dict, notebook: dict, *, with_z2jh: bool = True) -> tuple[Cluster, dict[str, Pod]]:
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    if with_z2jh:
        policies += z2jh_policies(values)
    pods = _pods(docs, values, notebook["metadata"]["labels"])
    return Cluster(policies, pods.values()), pods


@pytest.fixture(params=cl.OVERLAYS)
def world(request, rendered, values, notebook_pods):
    return _world(rendered[request.param], values, notebook_pods["cpu"])


# ---- the deployment ----------------------------------------------------------------------------
RAY_PORTS = {"GCS": 6379, "Ray Client": 10001, "dashboard": 8265, "metrics": 8080, "raylet": 12345, "worker": 20001}


def test_notebooks_reach_the_gateway_and_nothing_else_of_mochi_lab(world):
    net, p = world
    nb = p["notebook"]
    assert net.allowed(nb, p["mochi-lab-gateway"], 8000)
    assert not net.allowed(nb, p["mochi-redis"], 6379)
    for what, port in RAY_PORTS.items():
        assert not net.allowed(nb, p["ray-head"], port), what
        assert not net.allowed(nb, p["ray-worker"], port), what
    assert not net.allowed(nb, p["mochi-model-prefetch"], 443)
    assert not net.allowed(nb, p["mochi-lab-gateway"], 8001)  # only the service port
    assert not net.allowed(nb, METADATA, 80)


def test_our_ingress_rules_alone_keep_notebooks_out(rendered, values, notebook_pods):
    """Even if z2jh's egress policy for notebooks were gone (a chart change, networkPolicy.enabled
    false), Redis, Ray and the dashboard refuse them."""
    for docs in rendered.values():
        net, p = _world(docs, values, notebook_pods["gpu"], with_z2jh=False)
        nb = p["notebook"]
        assert net.egress_allowed(nb, p["mochi-redis"], 6379) is False  # namespace default deny
        open_egress = Cluster(net.policies + [_policy("notebook-anything", {
            "podSelector": {"matchLabels": {"component": "singleuser-server"}}, "policyTypes": ["Egress"],
            "egress": [{}]})], p.values())
        assert open_egress.egress_allowed(nb, p["mochi-redis"], 6379)
        assert not open_egress.allowed(nb, p["mochi-redis"], 6379)
        assert not open_egress.allowed(nb, p["ray-head"], 10001)
        assert not open_egress.allowed(nb, p["ray-head"], 8265)
        assert not open_egress.allowed(nb, p["ray-worker"], 20001)
        assert open_egress.allowed(nb, p["mochi-lab-gateway"], 8000)


def test_the_gateway_reaches_redis_ray_and_the_hub(world):
    net, p = world
    gw = p["mochi-lab-gateway"]
    assert net.allowed(gw, p["mochi-redis"], 6379)
    assert net.allowed(gw, p["ray-head"], 10001)
    assert net.allowed(gw, p["ray-head"], 8265)
    assert net.allowed(gw, p["hub"], 8081)
    assert net.allowed(p["proxy"], gw, 8000)  # browsers through https://<hub>/services/mochi-lab/
    reach = {name for name, pod in p.items() if name != "mochi-lab-gateway" and net.allowed(pod, gw, 8000)}
    assert reach == {"notebook", "proxy", "hub"}
    # and nothing else: not the GCS directly, not the workers, not the internet
    assert not net.allowed(gw, p["ray-head"], 6379)
    assert not net.allowed(gw, p["ray-worker"], 20001)
    assert not net.allowed(gw, INTERNET, 443)
    assert not net.allowed(gw, p["notebook"], 8888)


def test_only_the_gateway_and_ray_pods_reach_the_dashboard_and_ray_client(world):
    net, p = world
    for port in (8265, 10001):
        reach = {name for name, pod in p.items() if name != "ray-head" and net.allowed(pod, p["ray-head"], port)}
        assert reach == {"mochi-lab-gateway", "ray-worker"}, port


def test_redis_answers_only_the_gateway_and_the_ray_pods(world):
    net, p = world
    reach = {name for name, pod in p.items() if name != "mochi-redis" and net.allowed(pod, p["mochi-redis"], 6379)}
    assert reach == {"mochi-lab-gateway", "ray-head", "ray-worker"}
    assert not net.allowed(INTERNET, p["mochi-redis"], 6379)


def test_ray_pods_talk_to_each_other_and_nowhere_else(world):
    net, p = world
    head, worker = p["ray-head"], p["ray-worker"]
    for port in RAY_PORTS.values():
        assert net.allowed(worker, head, port) and net.allowed(head, worker, port)
    assert net.allowed(worker, p["mochi-redis"], 6379)
    assert not net.allowed(worker, INTERNET, 443)  # the model is loaded offline from the cache
    assert not net.allowed(worker, p["mochi-lab-gateway"], 8000)
    assert not net.allowed(worker, p["hub"], 8081)
    assert net.allowed(head, APISERVER, 6443)  # the autoscaler
    assert not net.allowed(worker, APISERVER, 6443)


def test_prefetch_reaches_the_internet_only(world):
    net, p = world
    job = p["mochi-model-prefetch"]
    assert net.allowed(job, INTERNET, 443)
    assert not net.allowed(job, INTERNET, 22)
    assert not net.allowed(job, METADATA, 80)
    for target, port in (("mochi-redis", 6379), ("ray-head", 10001), ("mochi-lab-gateway", 8000), ("hub", 8081)):
        assert not net.allowed(job, p[target], port), target


def test_every_pod_resolves_names_and_redis_calls_nobody(world):
    net, p = world
    for name, pod in p.items():
        if pod.namespace == NS:
            assert net.allowed(pod, p["kube-dns"], 53, "UDP"), name
    redis = p["mochi-redis"]
    assert not any(net.allowed(redis, other, 6379) for name, other in p.items() if name != "mochi-redis")
    assert not net.allowed(redis, INTERNET, 443)


def test_nothing_outside_the_cluster_reaches_a_pod_but_the_proxy(world):
    net, p = world
    for name, pod in p.items():
        if pod.namespace == NS and name != "proxy":
            for port in (80, 443, 6379, 8000, 8265, 10001):
                assert not net.allowed(INTERNET, pod, port), (name, port)


def test_every_pod_of_the_namespace_is_isolated_both_ways(rendered):
    for docs in rendered.values():
        (deny,) = [d for d in docs if d["kind"] == "NetworkPolicy" and d["spec"]["podSelector"] == {}
                   and "ingress" not in d["spec"] and "egress" not in d["spec"]]
        assert set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"}


def test_the_modelled_z2jh_policies_are_valid_network_policies(values):
    for policy in z2jh_policies(values):
        for version in cl.K8S_VERSIONS:
            cl.validate_core(policy, version)


# ---- the evaluator itself: each rule can fail ------------------------------------------------------
A = Pod("a", NS, {"app": "a"}, "10.2.0.1", {"web": 8080})
B = Pod("b", NS, {"app": "b", "tier": "db"}, "10.2.0.2")
C = Pod("c", "other", {"app": "c"}, "10.3.0.1")


def test_no_policy_allows_everything():
    net = Cluster([], [A, B, C])
    assert net.allowed(A, B, 1) and net.allowed(C, A, 9) and net.allowed(A, INTERNET, 443)


def test_a_deliberately_permissive_policy_opens_the_path(rendered, values, notebook_pods):
    docs = copy.deepcopy(rendered["prod"])
    redis = next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "mochi-redis-clients-only")
    redis["spec"]["ingress"].append({})  # from anyone, any port
    net, p = _world(docs, values, notebook_pods["cpu"], with_z2jh=False)
    allow_all_egress = _policy("nb-out", {"podSelector": {"matchLabels": {"component": "singleuser-server"}},
                                          "policyTypes": ["Egress"], "egress": [{}]})
    net = Cluster(net.policies + [allow_all_egress], p.values())
    assert net.allowed(p["notebook"], p["mochi-redis"], 6379)
    docs = copy.deepcopy(rendered["prod"])
    docs = [d for d in docs if not (d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "mochi-ray-head-from-gateway")]
    docs.append(_policy("open-head", {"podSelector": {"matchLabels": {"ray.io/node-type": "head"}}, "ingress": [{}]}))
    net, p = _world(docs, values, notebook_pods["cpu"], with_z2jh=False)
    net = Cluster(net.policies + [allow_all_egress], p.values())
    assert net.allowed(p["notebook"], p["ray-head"], 8265)


def test_isolation_by_direction_and_default_policy_types():
    deny_in = _policy("deny-in", {"podSelector": {"matchLabels": {"app": "b"}}})  # no policyTypes: Ingress
    net = Cluster([deny_in], [A, B])
    assert not net.allowed(A, B, 80) and net.allowed(B, A, 80) and net.allowed(B, INTERNET, 80)
    deny_both = _policy("deny-both", {"podSelector": {}, "egress": []})  # egress present: Egress too
    net = Cluster([deny_both], [A, B])
    assert not net.allowed(A, INTERNET, 80) and not net.allowed(INTERNET, B, 80)
    deny_out = _policy("deny-out", {"podSelector": {}, "policyTypes": ["Egress"]})
    net = Cluster([deny_out], [A, B])
    assert not net.allowed(A, B, 80) and net.allowed(INTERNET, B, 80)


def test_both_directions_must_allow():
    out = _policy("a-out", {"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Egress"],
                            "egress": [{"to": [{"podSelector": {"matchLabels": {"app": "b"}}}]}]})
    inn = _policy("b-in", {"podSelector": {"matchLabels": {"app": "b"}}, "policyTypes": ["Ingress"],
                           "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}], "ports": [{"port": 5432}]}]})
    net = Cluster([out, inn], [A, B])
    assert net.allowed(A, B, 5432)
    assert not net.allowed(A, B, 5433)  # ingress port
    assert net.allowed(B, A, 5432)  # B is not isolated for egress, A not for ingress
    assert not Cluster([out], [A, B, C]).allowed(A, C, 1)


def test_namespace_and_pod_selectors_in_one_peer_are_and_in_two_peers_or():
    both = _policy("both", {"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"team": "x"}}, "podSelector": {"matchLabels": {"app": "c"}}}]}]})
    either = _policy("either", {"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"from": [
        {"namespaceSelector": {"matchLabels": {"team": "x"}}}, {"podSelector": {"matchLabels": {"app": "b"}}}]}]})
    c_other_team = Pod("c2", "other", {"app": "zz"}, "10.3.0.2")
    net = Cluster([both], [A, B, C, c_other_team], {"other": {"team": "x"}})
    assert net.allowed(C, A, 1) and not net.allowed(c_other_team, A, 1) and not net.allowed(B, A, 1)
    net = Cluster([either], [A, B, C, c_other_team], {"other": {"team": "x"}})
    assert net.allowed(C, A, 1) and net.allowed(c_other_team, A, 1) and net.allowed(B, A, 1)
    # a podSelector alone means the policy's own namespace
    same_ns_only = _policy("ns", {"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"from": [
        {"podSelector": {"matchLabels": {"app": "c"}}}]}]})
    assert not Cluster([same_ns_only], [A, C]).allowed(C, A, 1)


def test_ports_protocols_ranges_and_named_ports():
    pol = _policy("ports", {"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"ports": [
        {"port": 1000, "endPort": 1010}, {"port": "web"}, {"protocol": "UDP", "port": 53}]}]})
    net = Cluster([pol], [A, B])
    assert net.allowed(B, A, 1000) and net.allowed(B, A, 1010) and not net.allowed(B, A, 1011)
    assert net.allowed(B, A, 8080) and not net.allowed(B, A, 8081)  # "web" is A's port 8080
    assert net.allowed(B, A, 53, "UDP") and not net.allowed(B, A, 53, "TCP")


def test_ip_blocks_and_their_exceptions():
    pol = _policy("ip", {"podSelector": {}, "policyTypes": ["Egress"], "egress": [
        {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8"]}}], "ports": [{"port": 443}]}]})
    net = Cluster([pol], [A, B])
    assert net.allowed(A, INTERNET, 443) and not net.allowed(A, INTERNET, 80)
    assert not net.allowed(A, B, 443)  # B's IP is in the exception
    assert not net.allowed(A, External("10.9.9.9"), 443)


def test_match_expressions():
    pol = _policy("expr", {"podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["db"]}]},
                           "ingress": [{"from": [{"podSelector": {"matchExpressions": [
                               {"key": "tier", "operator": "DoesNotExist"},
                               {"key": "app", "operator": "NotIn", "values": ["c"]}]}}]}]})
    net = Cluster([pol], [A, B, Pod("c", NS, {"app": "c"}, "10.2.0.3")])
    assert net.allowed(A, B, 1)
    assert not net.allowed(Pod("c", NS, {"app": "c"}, "10.2.0.3"), B, 1)
    assert net.allowed(B, A, 1)  # A is not selected (no tier label)
    with pytest.raises(ValueError):
        Cluster([_policy("bad", {"podSelector": {"matchExpressions": [{"key": "x", "operator": "Near"}]}})],
                [A]).allowed(B, A, 1)
