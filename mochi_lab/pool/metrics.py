"""Prometheus metrics of the pool owner (the gateway, or the embedded default when asked).

Everything is read at scrape time: the queue from the store (`Store.queue_depth`), the workers and
their cumulative figures from their rows (`Worker.row`: jobs finished, stage-time histograms, steps,
NVML readings, store errors), and the controller's last decision. A worker's counters restart with
it, as a Prometheus target's do. Label values are bounded: models, states, outcomes, stages and pool
worker names (at most max_workers); never a job id or a prompt, and accounts only when
`Settings.metrics_accounts` allows it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from mochi_lab.config import known_models
from mochi_lab.model import StoreError
from mochi_lab.store import Store

log = logging.getLogger("mochi_lab.pool.metrics")

WORKER_STATES = ("pending", "loading", "idle", "busy", "error", "retiring")
# row field -> (metric, help); present only where the worker has a GPU that NVML reads
GPU_FIELDS = {
    "gpu_utilization": ("mochi_gpu_utilization_ratio", "GPU utilisation (0-1) of each worker's GPU, from NVML."),
    "gpu_device_memory_used": ("mochi_gpu_memory_used_bytes", "GPU memory used on each worker's device, from NVML."),
    "gpu_device_memory_total": ("mochi_gpu_memory_total_bytes", "GPU memory of each worker's device, from NVML."),
    "gpu_power_w": ("mochi_gpu_power_watts", "Power drawn by each worker's GPU, from NVML."),
}


class PoolCollector:
    """A prometheus_client collector over the store (and the controller's `snapshot`, if any)."""

    def __init__(self, store: Store, controller: Any = None, *, accounts: bool = False):
        self.store = store
        self.controller = controller
        self.accounts = accounts
        self._lock = threading.Lock()
        self.store_errors = 0  # this process's: scrapes and requests that met a store error

    def store_error(self) -> None:
        with self._lock:
            self.store_errors += 1

    def collect(self) -> Iterator[Metric]:
        self._models = set(known_models())
        try:
            depth = self.store.queue_depth()
            rows = self.store.workers()
        except StoreError as exc:
            log.warning("metrics: store unavailable: %s", exc)
            self.store_error()
            depth, rows = None, []
        yield GaugeMetricFamily("mochi_store_up", "1 when this scrape could read the store.",
                                value=0 if depth is None else 1)
        if depth is not None:
            yield self._queue(depth)
        yield from self._workers(rows)
        errors = CounterMetricFamily("mochi_store_errors", "Store errors met, by component (and pool worker).",
                                     labels=["component", "worker"])
        errors.add_metric(["owner", ""], self.store_errors)
        for row in rows:
            errors.add_metric(["worker", row["worker_id"]], (row.get("stats") or {}).get("store_errors", 0))
        yield errors

    def _model(self, model: str) -> str:
        """A model label: a known model's name, else "other" (the store is a trust boundary: a stored job
        could name anything)."""
        return model if model in self._models else "other"

    def _queue(self, depth: dict[tuple[str, str, str], int]) -> Metric:
        labels = ["model", "state"] + (["account"] if self.accounts else [])
        gauge = GaugeMetricFamily("mochi_queue_jobs", "Jobs queued or running, by model and state.", labels=labels)
        summed: dict[tuple[str, ...], int] = {}
        for (account, model, state), n in depth.items():
            model = self._model(model)
            key = (model, state, account) if self.accounts else (model, state)
            summed[key] = summed.get(key, 0) + n
        for key, n in sorted(summed.items()):
            gauge.add_metric(list(key), n)
        return gauge

    def _workers(self, rows: list[dict[str, Any]]) -> Iterator[Metric]:
        snap = getattr(self.controller, "snapshot", None) or {}
        states = dict.fromkeys(WORKER_STATES, 0)
        for row in rows:
            state = row.get("state") if row.get("state") in WORKER_STATES else "error"  # a bounded label
            states[state] += 1
        if snap.get("leader"):
            states["pending"], states["retiring"] = snap.get("pending", 0), snap.get("retiring", 0)
        by_state = GaugeMetricFamily("mochi_workers", "Pool workers by state.", labels=["state"])
        for state, n in states.items():
            by_state.add_metric([state], n)
        yield by_state
        # the controller's view, from the replica that leads (the others export these without samples)
        for name, key, text in (("mochi_pool_desired_workers", "desired", "Workers the controller sizes the pool to."),
                                ("mochi_pool_work", "work", "Queued + running jobs the controller sized from.")):
            family = GaugeMetricFamily(name, text, labels=[])
            if snap.get("leader"):
                family.add_metric([], snap[key])
            yield family

        finished = CounterMetricFamily("mochi_jobs_finished", "Jobs a worker finished, by model and outcome.",
                                       labels=["worker", "model", "outcome"])
        steps = CounterMetricFamily("mochi_denoise_steps", "Denoising steps of finished jobs.", labels=["worker"])
        rate = GaugeMetricFamily("mochi_steps_per_second", "Denoising steps per second of each worker's last job.",
                                 labels=["worker"])
        stages = HistogramMetricFamily("mochi_stage_seconds", "Time of each stage of a finished job.",
                                       labels=["worker", "stage"])
        gpu = {field: GaugeMetricFamily(name, text, labels=["worker"]) for field, (name, text) in GPU_FIELDS.items()}
        for row in rows:
            worker, stats = row["worker_id"], row.get("stats") or {}
            by_label: dict[tuple[str, str], int] = {}
            for model, outcomes in (stats.get("finished") or {}).items():
                for outcome, n in outcomes.items():
                    key = (self._model(model), outcome)
                    by_label[key] = by_label.get(key, 0) + n
            for (model, outcome), n in sorted(by_label.items()):
                finished.add_metric([worker, model, outcome], n)
            steps.add_metric([worker], stats.get("steps", 0))
            if stats.get("rate") is not None:
                rate.add_metric([worker], stats["rate"])
            bounds = stats.get("buckets") or []
            for stage, h in (stats.get("stages") or {}).items():
                buckets = [(repr(float(b)), n) for b, n in zip(bounds, _cumulative(h["buckets"]))]
                stages.add_metric([worker, stage], buckets + [("+Inf", h["count"])], sum_value=h["sum"])
            for field in GPU_FIELDS:
                if row.get(field) is not None:
                    gpu[field].add_metric([worker], row[field])
        yield from (finished, steps, rate, stages, *gpu.values())


def _cumulative(counts: list[int]) -> list[int]:
    """The row keeps each bucket's own count (observations in (previous bound, bound]); Prometheus
    buckets count everything up to their bound."""
    out, total = [], 0
    for n in counts:
        total += n
        out.append(total)
    return out


class Metrics:
    """The registry of one pool owner, and its HTTP endpoint once `serve()`d."""

    def __init__(self, store: Store, controller: Any = None, *, accounts: bool = False):
        self.collector = PoolCollector(store, controller, accounts=accounts)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self.server: Any = None
        self.port: int | None = None

    def store_error(self) -> None:
        self.collector.store_error()

    def render(self) -> bytes:
        """The exposition text, as a scrape gets it."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics on host:port (0: a free port) in a daemon thread; returns the port."""
        self.server, _ = start_http_server(port, addr=host, registry=self.registry)
        self.port = self.server.server_port
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


__all__ = ["GPU_FIELDS", "Metrics", "PoolCollector"]
