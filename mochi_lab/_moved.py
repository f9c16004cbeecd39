"""Where names live: the package faces' lazy lookups (PEP 562), and the old module paths that still import.

The package was sorted into rooms by where the code runs (client, display, gateway, pool, worker, over
the shared modules). Users' notebooks, scripts and pickles name the old flat modules; for one release
they keep importing, with a DeprecationWarning that names the new path. An old path is an alias: it
gives the new module object itself, so isinstance checks and monkeypatching see one module.

Some names left a module that stays (`MOVED_NAMES`): the job's record, statuses, ids, artifacts and errors
went from the store to `mochi_lab.model`; the worker loop's log format, telemetry and job path went to their
own modules; the pool driver's actor and this process's Ray connection went to `pool.actor` and
`pool.connection`; the experiment views' compare grid to `display.compare`; the job's live views to
`display.live`; the gang's attention processor to `pipelines.attention`. The old module answers them through
`moved_names`, with the same warning.

Four old modules gave their names to the rooms that hold them (`mochi_lab.client`, `.gateway`, `.pool`,
`.worker`): those packages answer the old module's names through `lazy_names`, with the same warning.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

# Old module -> the module that holds its code now. Read by the renovation's codemod as well.
MOVED: dict[str, str] = {
    "mochi_lab.settings": "mochi_lab.config",
    "mochi_lab.client": "mochi_lab.client.cluster",
    "mochi_lab.job": "mochi_lab.client.job",
    "mochi_lab.experiment": "mochi_lab.client.experiment",
    "mochi_lab.backend": "mochi_lab.client.backend",
    "mochi_lab.direct": "mochi_lab.client.direct",
    "mochi_lab.remote": "mochi_lab.client.http",
    "mochi_lab.reprs": "mochi_lab.display.reprs",
    "mochi_lab.experiment_views": "mochi_lab.display.experiment",
    "mochi_lab.widgets": "mochi_lab.display.widgets",
    "mochi_lab.cache": "mochi_lab.store.cache",
    "mochi_lab.worker": "mochi_lab.worker.loop",
    "mochi_lab.gate": "mochi_lab.worker.gate",
    "mochi_lab.provenance": "mochi_lab.worker.provenance",
    "mochi_lab.pool": "mochi_lab.pool.driver",
    "mochi_lab.gang": "mochi_lab.pool.gang",
    "mochi_lab.controller": "mochi_lab.pool.controller",
    "mochi_lab.metrics": "mochi_lab.pool.metrics",
    "mochi_lab.runtime": "mochi_lab.pool.runtime",
    "mochi_lab.reaper": "mochi_lab.pool.reaper",
    "mochi_lab.gateway": "mochi_lab.gateway.app",
    "mochi_lab.gateway_web": "mochi_lab.gateway.web",
    "mochi_lab.hubauth": "mochi_lab.gateway.auth",
}

# The names that left `mochi_lab.store.base` (and the store package's face, which re-exported some).
_TO_MODEL = ("QUEUED", "RUNNING", "DONE", "FAILED", "CANCELLED", "STATUSES", "FINISHED", "check_status",
             "StoreError", "JobNotFound", "LeaseLost", "StoreUnavailable", "QuotaExceeded", "RecordTooLarge",
             "JobRecord", "JOB_ID_RE", "new_job_id", "check_job_id", "ARTIFACT_SUFFIXES", "artifact_path",
             "remove_artifacts")
_STORE_FACE = ("QUEUED", "RUNNING", "DONE", "FAILED", "CANCELLED", "STATUSES", "FINISHED", "StoreError",
               "JobNotFound", "LeaseLost", "StoreUnavailable", "QuotaExceeded", "JobRecord")
# Module that stays -> {name that left it: the module that holds it now}. Read by the renovation's codemod.
MOVED_NAMES: dict[str, dict[str, str]] = {
    "mochi_lab.store.base": {name: "mochi_lab.model" for name in _TO_MODEL},
    "mochi_lab.store": {name: "mochi_lab.model" for name in _STORE_FACE},
    # the worker loop's module was split: its log format, its telemetry and the job's path have their own
    "mochi_lab.worker.loop": {"JsonFormatter": "mochi_lab.logs", "JobRejected": "mochi_lab.worker.job",
                              **{name: "mochi_lab.worker.telemetry"
                                 for name in ("NvmlSampler", "WorkerStats", "STAGE_BUCKETS_S", "STAGES")}},
    # the pool's driver was split: the actor that runs in Ray, and this process's Ray connection
    "mochi_lab.pool.driver": {"WorkerActor": "mochi_lab.pool.actor", "store_url_here": "mochi_lab.pool.actor",
                              "connect": "mochi_lab.pool.connection", "quiet_ray_start": "mochi_lab.pool.connection"},
    # the experiment views' compare grid has its own module
    "mochi_lab.display.experiment": {name: "mochi_lab.display.compare"
                                     for name in ("compare_grid", "compare_widget", "grid_axes")},
    # the job's live views (a notebook cell's output kept live, the text bar) are the display's
    "mochi_lab.client.job": {name: "mochi_lab.display.live"
                             for name in ("LIVE_INTERVAL_S", "LiveView", "Output", "TextProgress", "media")},
    # the gang's attention processor has its own module
    "mochi_lab.pipelines.cfg_parallel": {name: "mochi_lab.pipelines.attention"
                                         for name in ("AttentionKernel", "GangAttention", "attention_kernel")},
}


def _became_package(old: str) -> bool:
    return MOVED[old].startswith(old + ".")


def new_name(fullname: str) -> str | None:
    """The module an old dotted path names now; None if it did not move or is now a package itself."""
    for old, new in MOVED.items():
        if (fullname == old or fullname.startswith(old + ".")) and not _became_package(old):
            return new + fullname[len(old):]
    return None


def _warn(message: str) -> None:
    # Called from a loader or a module __getattr__ here: level 3 is the user's line (warnings skips the
    # import machinery's frames itself). DeprecationWarning is shown by default only when it is attributed
    # to __main__: a script, a notebook cell.
    warnings.warn(message + "; the old path goes in the next release", DeprecationWarning, stacklevel=3)


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new
        self.spec: Any = None

    def create_module(self, spec: Any) -> ModuleType:
        _warn(f"{spec.name} moved to {self.new}")
        module = importlib.import_module(self.new)
        self.spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # importlib stamped the old name's spec on the shared module object: it keeps its own.
        module.__spec__ = self.spec


class _OldPaths(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        new = new_name(fullname) if fullname.startswith("mochi_lab.") else None
        return None if new is None else importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    """Put the old paths' finder first: an old path must not reach a stale copy of the old file."""
    if not any(isinstance(finder, _OldPaths) for finder in sys.meta_path):
        sys.meta_path.insert(0, _OldPaths())


def moved_names(module: str) -> Callable[[str], Any]:
    """PEP 562 `__getattr__` for `module`: the names that left it (MOVED_NAMES) still answer, from their
    new home, with a DeprecationWarning."""
    homes = MOVED_NAMES[module]

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        _warn(f"{module}.{name} moved to {home}.{name}")
        return getattr(importlib.import_module(home), name)

    return __getattr__


def lazy_names(package: str, homes: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """PEP 562 `__getattr__` and `__dir__` for `package`: `homes` maps each public name to its module.

    A name is imported on first use; a submodule is imported when it is asked for; a package that took
    an old module's name still answers that module's names, with a DeprecationWarning.
    """
    old_home = MOVED.get(package) if package in MOVED and _became_package(package) else None

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is not None:
            value = getattr(importlib.import_module(home), name)
            setattr(sys.modules[package], name, value)  # later reads skip this function
            return value
        if name.startswith("__"):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        moved = new_name(f"{package}.{name}")
        if moved is not None:  # an old module, as an attribute
            _warn(f"{package}.{name} moved to {moved}")
            return importlib.import_module(moved)
        if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}") is not None:
            return importlib.import_module(f"{package}.{name}")
        if old_home is not None:
            final = MOVED_NAMES.get(old_home, {}).get(name)
            if final is not None:  # it left the old module's new home too: name where it is now
                _warn(f"{package}.{name} moved to {final}.{name}")
                return getattr(importlib.import_module(final), name)
            module = importlib.import_module(old_home)
            if hasattr(module, name):
                _warn(f"{package}.{name} moved to {old_home}.{name}")
                return getattr(module, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *homes})

    return __getattr__, __dir__
