"""Planning an experiment's runs: names, grids, deterministic seeds and run keys.

Pure functions and plain data: nothing here touches the store, so a plan can be checked (and
every run's params validated) before anything is queued.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from mochi_lab.params import SEED_MAX, SWEEP_ONLY, GenerationParams, ParamsError, validate_name, with_lora_scale
from mochi_lab.store.cache import canonical_json, params_key


@dataclass
class Run:
    """One planned video of an experiment. `attempt` grows each time `resume` re-queues it."""

    key: str
    params: dict[str, Any]
    attempt: int = 0
    job_id: str | None = None

    def idempotency_key(self, experiment: str) -> str:
        return f"exp/{experiment}/{self.key}/{self.attempt}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Run":
        return cls(key=data["key"], params=dict(data["params"]), attempt=int(data.get("attempt", 0)),
                   job_id=data.get("job_id"))


def _axis(name: str, values: Any) -> list[Any]:
    # A scalar (or a string) is a one-value axis, so fixed params and swept ones mix freely.
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        return [values]
    values = list(values)
    if not values:
        raise ValueError(f"sweep axis {name!r} is empty")
    return values


def _axes(prompts: Any, seeds: Any, params: Mapping[str, Any] | None) -> dict[str, list[Any]]:
    axes: dict[str, list[Any]] = {"prompt": _axis("prompts", prompts)}
    for name, values in (params or {}).items():
        if name in ("prompt", "seed"):
            raise ValueError(f"pass {name}s through the {name}s= argument, not as a param list")
        if name not in GenerationParams.model_fields and name not in SWEEP_ONLY:
            swept = [f for f in GenerationParams.model_fields if f not in ("prompt", "seed")] + list(SWEEP_ONLY)
            raise ValueError(f"{name!r:.80} is not a generation parameter; the swept ones can be {', '.join(swept)}")
        axes[name] = _axis(name, values)
    axes["seed"] = _axis("seeds", seeds)
    return axes


def grid_size(prompts: str | Iterable[str], seeds: Any = None, params: Mapping[str, Any] | None = None) -> int:
    """How many runs `expand_grid` gives, without making them (a huge grid is refused before it exists)."""
    return math.prod(len(axis) for axis in _axes(prompts, seeds, params).values())


def expand_grid(
    prompts: str | Iterable[str], seeds: Any = None, params: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The cartesian product, in order: prompts outermost, then each param as given, seeds innermost."""
    axes = _axes(prompts, seeds, params)
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]


def derived_seed(experiment: str, params: Mapping[str, Any]) -> int:
    """A seed fixed by the experiment name and the other params: re-issuing a sweep plans the same runs."""
    rest = {k: v for k, v in params.items() if k != "seed"}
    digest = hashlib.sha256(f"{experiment}\n{canonical_json(rest)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (SEED_MAX + 1)


def plan_run(experiment: str, spec: Mapping[str, Any], model: str) -> Run:
    """Validate one run's params (ParamsError before anything is queued) and key it by content."""
    spec = {"model": model, **spec}
    if "lora_scale" in spec:
        spec = with_lora_scale(spec)
    seed = spec.get("seed")
    # with a placeholder seed, defaults are filled in before the seed is derived from them
    params = GenerationParams.parse(**{**spec, "seed": 0 if seed is None else seed}).to_dict()
    if seed is None:
        params["seed"] = derived_seed(experiment, params)
    return Run(key=params_key(params)[:16], params=params)


def plan_runs(experiment: str, specs: Iterable[Mapping[str, Any]], model: str) -> list[Run]:
    """Plan every run (duplicates collapse to one), naming the run of the first bad param set."""
    runs: dict[str, Run] = {}
    for i, spec in enumerate(specs):
        try:
            run = plan_run(experiment, spec, model)
        except ParamsError as exc:
            raise ParamsError(f"run {i} ({dict(spec)}): {exc}") from None
        runs.setdefault(run.key, run)
    return list(runs.values())


def varying_params(runs: Iterable[Run]) -> list[str]:
    """The params whose values differ between runs, in GenerationParams field order."""
    runs = list(runs)
    return [f for f in GenerationParams.model_fields if len({canonical_json({"v": r.params.get(f)}) for r in runs}) > 1]


__all__ = ["Run", "derived_seed", "expand_grid", "grid_size", "plan_run", "plan_runs", "validate_name",
           "varying_params"]
