"""The worker: what runs in a Ray actor per GPU. The loop (`loop`: claim, ride out store outages, health,
its row), one job's path (`job`: admit, generate, heartbeat, encode, complete), its live figures (`clock`),
what it reports about itself (`telemetry`), the model's provenance, and the gates that hold a job at a
stage for a test.

`mochi_lab.worker` was the loop's module: its names still resolve here for one release, with a warning.
"""

from __future__ import annotations

from mochi_lab._moved import lazy_names

__getattr__, __dir__ = lazy_names(__name__, {})
