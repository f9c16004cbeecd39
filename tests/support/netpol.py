"""A small evaluator of Kubernetes NetworkPolicies (networking.k8s.io/v1), for the offline tests.

It answers "may this pod open a connection to that endpoint on this port?" the way the API's
semantics define it (what a conforming CNI enforces):
  * a pod is isolated for ingress (egress) when some policy in its namespace selects it with
    "Ingress" ("Egress") among its policyTypes; policyTypes left out means ["Ingress"], plus
    "Egress" when the policy has an `egress` section;
  * a connection needs both: the source's egress allows it (or the source is not egress-isolated)
    and the destination's ingress allows it (or it is not ingress-isolated); policies only add;
  * a rule matches when one of its peers matches (no `from`/`to`: every peer) and one of its ports
    matches (no `ports`: every port); a port is a number or a container port name of the
    destination, with an optional endPort; protocol defaults to TCP;
  * a peer is a podSelector (pods of the policy's namespace), a namespaceSelector (every pod of the
    matching namespaces), both in one peer (pods matching in namespaces matching), or an ipBlock
    (addresses in cidr and not in except; it matches pods by their IP too, as most CNIs do);
  * selectors: matchLabels and matchExpressions (In, NotIn, Exists, DoesNotExist); {} matches all.
Endpoints outside the cluster (the internet, the API server's address) have an IP and no policy.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: dict = field(default_factory=dict, hash=False, compare=False)
    ip: str = "10.0.0.1"
    ports: dict = field(default_factory=dict, hash=False, compare=False)  # container port name -> number


@dataclass(frozen=True)
class External:
    """An address that is no pod of the cluster."""

    ip: str
    name: str = ""


def selector_matches(selector: dict | None, labels: dict) -> bool:
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
        if op not in ("In", "NotIn", "Exists", "DoesNotExist"):
            raise ValueError(f"unknown selector operator {op!r}")
    return True


def policy_types(policy: dict) -> set[str]:
    spec = policy["spec"]
    if "policyTypes" in spec:
        return set(spec["policyTypes"])
    return {"Ingress", "Egress"} if "egress" in spec else {"Ingress"}


def _in_block(ip: str, block: dict) -> bool:
    addr = ipaddress.ip_address(ip)
    if addr not in ipaddress.ip_network(block["cidr"]):
        return False
    return not any(addr in ipaddress.ip_network(e) for e in block.get("except") or [])


class Cluster:
    """Pods, namespaces (name -> labels) and policies; `allowed` decides a connection."""

    def __init__(self, policies: list[dict], pods: list[Pod], namespaces: dict[str, dict] | None = None):
        self.policies = [p for p in policies if p.get("kind", "NetworkPolicy") == "NetworkPolicy"]
        self.pods = list(pods)
        names = {p.namespace for p in self.pods} | {p["metadata"]["namespace"] for p in self.policies}
        self.namespaces = {n: {"kubernetes.io/metadata.name": n} for n in names}
        for name, labels in (namespaces or {}).items():
            self.namespaces[name] = {"kubernetes.io/metadata.name": name, **labels}

    def _selecting(self, pod: Pod, kind: str) -> list[dict]:
        return [p for p in self.policies
                if p["metadata"]["namespace"] == pod.namespace and kind in policy_types(p)
                and selector_matches(p["spec"].get("podSelector", {}), pod.labels)]

    def _peer_matches(self, peer: dict, policy_ns: str, other: Pod | External) -> bool:
        if "ipBlock" in peer:
            return _in_block(other.ip, peer["ipBlock"])
        if isinstance(other, External):
            return False  # pod and namespace selectors name pods only
        if "namespaceSelector" in peer:
            ns_ok = selector_matches(peer["namespaceSelector"], self.namespaces.get(other.namespace, {}))
        else:
            ns_ok = other.namespace == policy_ns
        pod_ok = selector_matches(peer["podSelector"], other.labels) if "podSelector" in peer else True
        return ns_ok and pod_ok

    @staticmethod
    def _port_matches(rule_ports: list[dict] | None, dst: Pod | External, port: int, protocol: str) -> bool:
        if not rule_ports:
            return True
        for p in rule_ports:
            if p.get("protocol", "TCP") != protocol:
                continue
            if "port" not in p:
                return True  # every port of that protocol
            want = p["port"]
            if isinstance(want, str) and not want.isdigit():
                want = dst.ports.get(want) if isinstance(dst, Pod) else None
                if want is None:
                    continue
            want = int(want)
            if want <= port <= int(p.get("endPort", want)):
                return True
        return False

    def _rules_allow(self, policies: list[dict], section: str, peers_key: str, other, dst, port, protocol) -> bool:
        for policy in policies:
            for rule in policy["spec"].get(section) or []:
                peers = rule.get(peers_key)
                if peers and not any(self._peer_matches(peer, policy["metadata"]["namespace"], other) for peer in peers):
                    continue
                if self._port_matches(rule.get("ports"), dst, port, protocol):
                    return True
        return False

    def egress_allowed(self, src: Pod, dst: Pod | External, port: int, protocol: str = "TCP") -> bool:
        policies = self._selecting(src, "Egress")
        return not policies or self._rules_allow(policies, "egress", "to", dst, dst, port, protocol)

    def ingress_allowed(self, src: Pod | External, dst: Pod, port: int, protocol: str = "TCP") -> bool:
        policies = self._selecting(dst, "Ingress")
        return not policies or self._rules_allow(policies, "ingress", "from", src, dst, port, protocol)

    def allowed(self, src: Pod | External, dst: Pod | External, port: int, protocol: str = "TCP") -> bool:
        if isinstance(src, Pod) and not self.egress_allowed(src, dst, port, protocol):
            return False
        if isinstance(dst, Pod) and not self.ingress_allowed(src, dst, port, protocol):
            return False
        return True
