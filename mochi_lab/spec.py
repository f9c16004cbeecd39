"""Experiment specs in YAML, and `mochi-lab experiment run SPEC [--wait]`.

A spec names the experiment and its grid; fixed params apply to every run, grid params are swept:

    name: steps-vs-quality
    description: ...
    tags: [demo]
    model: tiny
    prompts: ["a cat surfing a wave"]
    seeds: [1, 2]
    params: {num_frames: 7, height: 32, width: 32, fps: 8}
    grid: {num_inference_steps: [2, 4, 8]}
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mochi_lab.sweep import validate_name


class SpecError(ValueError):
    """The YAML spec is malformed; the message names the file and the field."""


class ExperimentSpec(BaseModel):
    """One experiment: its identity, prompts, seeds, fixed params and swept grid."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    tags: list[str] = Field(default_factory=list)
    model: str = "tiny"
    prompts: list[str] = Field(min_length=1)
    seeds: list[int] | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return validate_name(v)

    @model_validator(mode="after")
    def _disjoint(self) -> "ExperimentSpec":
        both = set(self.params) & set(self.grid)
        if both:
            raise ValueError(f"{', '.join(sorted(both))} appear in both params and grid; keep each in one")
        if any(not values for values in self.grid.values()):
            raise ValueError("every grid entry needs at least one value")
        return self

    @classmethod
    def load(cls, path: str | Path) -> "ExperimentSpec":
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text())
            return cls.model_validate(data if isinstance(data, dict) else {})
        except (OSError, yaml.YAMLError) as exc:
            raise SpecError(f"{path}: {exc}") from None
        except ValidationError as exc:
            lines = [f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg'].removeprefix('Value error, ')}"
                     for e in exc.errors()]
            raise SpecError(f"{path}: invalid experiment spec:\n  " + "\n  ".join(lines)) from None

    @property
    def group_by(self) -> list[str]:
        """The columns the summary groups by: the grid's params, else the prompt."""
        return list(self.grid) or ["prompt"]


def summarize(df, group_by: list[str]):
    """Runs, done and mean timings per value of `group_by` (e.g. seconds per steps value)."""
    done = df[df["status"] == "done"]
    table = df.groupby(group_by, dropna=False).agg(runs=("run", "size"))
    table["done"] = done.groupby(group_by).size().reindex(table.index, fill_value=0)
    for col in ("denoise_s", "decode_s", "run_s"):
        table[f"mean_{col}"] = done.groupby(group_by)[col].mean().reindex(table.index).round(3)
    return table


def run_spec(args) -> int:
    """The `experiment run` subcommand: queue the spec's sweep, optionally wait and print timings."""
    from mochi_lab import MochiCluster, ParamsError

    try:
        spec = ExperimentSpec.load(args.spec)
    except SpecError as exc:
        print(exc, file=sys.stderr)
        return 2
    cluster = MochiCluster(address=args.address, redis_url=args.redis_url, model=spec.model)
    exp = cluster.experiment(spec.name, description=spec.description, tags=spec.tags)
    try:
        jobs = exp.sweep(spec.prompts, spec.seeds, **spec.params, **spec.grid)
    except ParamsError as exc:
        print(exc, file=sys.stderr)
        return 2
    requeued = exp.resume() if args.resume else []
    print(f"experiment {exp.name}: {len(jobs)} runs ({len(requeued)} re-queued); status {exp.status()}",
          file=sys.stderr)
    if not args.wait:
        return 0
    counts = exp.wait(timeout=args.timeout)
    df = exp.to_dataframe()
    print(summarize(df, spec.group_by).to_string())
    if args.export:
        print(f"exported to {exp.export(args.export)}", file=sys.stderr)
    return 0 if counts["done"] == len(df) else 1


def add_subcommand(sub) -> None:
    """Register `experiment run` on the CLI's subparsers."""
    e = sub.add_parser("experiment", help="run experiments from YAML specs")
    esub = e.add_subparsers(dest="experiment_command", required=True)
    r = esub.add_parser("run", help="queue a spec's sweep (idempotent: re-running queues nothing new)")
    r.add_argument("spec", help="path of the YAML spec, e.g. experiments/prompt_sweep.yaml")
    r.add_argument("--wait", action="store_true", help="wait for every run and print timings per grid value")
    r.add_argument("--resume", action="store_true", help="also re-queue failed and cancelled runs")
    r.add_argument("--timeout", type=float, default=None, help="seconds to wait (with --wait)")
    r.add_argument("--export", metavar="DIR", help="copy the videos and manifests here (with --wait)")
    r.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else a local Ray)")
    r.add_argument("--redis-url", help="default: REDIS_URL, else SQLite in the data dir")
    r.set_defaults(func=run_spec)


__all__ = ["ExperimentSpec", "SpecError", "add_subcommand", "run_spec", "summarize"]
