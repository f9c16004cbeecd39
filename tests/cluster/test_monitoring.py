"""Monitoring files: the Grafana dashboard's queries name metrics mochi_lab exports, and Prometheus finds the
gateway's metrics port (pod annotations, ServiceMonitor, a NetworkPolicy that lets only it in)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from mochi_lab.pool.metrics import Metrics
from mochi_lab.store import open_store
from mochi_lab.worker.telemetry import WorkerStats

MONITORING = Path(__file__).resolve().parents[2] / "cluster" / "monitoring"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exported_names(tmp_path: Path) -> set[str]:
    """Every sample name a scrape can carry, from the exposition of a store with a worker row."""
    store = open_store(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    stats = WorkerStats()
    stats.job_finished("tiny", "done", {"queue_s": 0.1, "denoise_s": 1.0}, 8)
    store.put_worker({"worker_id": "mochi-worker-0", "state": "idle", "stats": stats.to_dict()}, 60)
    names = set()
    for family in text_string_to_metric_families(Metrics(store).render().decode()):
        names.update(family.name + s for s in SUFFIXES[family.type])
        names.update(s.name for s in family.samples)
    store.close()
    return names


def test_every_dashboard_query_names_metrics_that_exist(tmp_path):
    dash = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exported = exported_names(tmp_path)
    named = set()
    titles = set()
    for panel in dash["panels"]:
        titles.add(panel["title"])
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            found = set(re.findall(r"\bmochi_[a-z_]+\b", target["expr"]))
            assert found, (panel["title"], target["expr"])
            assert found <= exported, (panel["title"], found - exported)
            named |= found
    assert {"Queue depth", "Throughput (jobs / min)", "Stage time p95", "GPU utilisation"} <= titles
    # the families the issue asks for all reach a panel
    for family in ("mochi_queue_jobs", "mochi_jobs_finished_total", "mochi_stage_seconds_bucket",
                   "mochi_steps_per_second", "mochi_workers", "mochi_gpu_utilization_ratio",
                   "mochi_gpu_memory_used_bytes", "mochi_gpu_memory_total_bytes", "mochi_gpu_power_watts",
                   "mochi_store_errors_total"):
        assert family in named, family


def test_prometheus_finds_the_gateways_metrics_port(base_docs):
    gateway = next(d for d in base_docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mochi-lab-gateway")
    pod = gateway["spec"]["template"]
    container = pod["spec"]["containers"][0]
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "metrics")
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MOCHI_LAB_METRICS_PORT"] == str(port) == pod["metadata"]["annotations"]["prometheus.io/port"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    service = next(d for d in base_docs if d["kind"] == "Service" and d["metadata"]["name"] == "mochi-lab-gateway")
    assert {"name": "metrics", "port": port, "targetPort": "metrics", "protocol": "TCP"} in service["spec"]["ports"]
    monitor = yaml.safe_load((MONITORING / "servicemonitor.yaml").read_text())
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    policy = next(d for d in base_docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "mochi-lab-gateway-metrics")
    assert policy["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": port}]


def test_the_dev_overlay_scales_its_gpu_pool_to_zero(rendered):
    config = next(d for d in rendered["dev"] if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mochi-lab-config")
    data = config["data"]
    assert (data["MOCHI_LAB_AUTOSCALE"], data["MOCHI_LAB_MIN_WORKERS"], data["MOCHI_LAB_GPU_WORKERS"]) == ("1", "0", "true")
    ray = next(d for d in rendered["dev"] if d["kind"] == "RayCluster")
    group = ray["spec"]["workerGroupSpecs"][0]
    assert group["minReplicas"] == 0 and ray["spec"]["enableInTreeAutoscaling"] is True
    assert int(data["MOCHI_LAB_MAX_WORKERS"]) <= group["maxReplicas"] * int(group["rayStartParams"]["num-gpus"])
