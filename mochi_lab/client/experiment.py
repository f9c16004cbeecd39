"""`Experiment`: a named, persisted set of runs (a sweep), stored per account like MLflow's experiments.

The experiment record (name, description, tags, the planned runs) lives in the store; each run's
job carries `experiment=name` and a deterministic idempotency key, so re-issuing a sweep, resuming
after a crash or opening the experiment from another kernel never duplicates a job.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mochi_lab.client.backend import Backend
from mochi_lab.client.follow import GroupFollower
from mochi_lab.client.job import Job
from mochi_lab.client.run_table import LIST_LIMIT, MISSING, LiveTable, RunJobs, display_live, summary
from mochi_lab.model import CANCELLED, FAILED, STATUSES, JobRecord, check_job_id
from mochi_lab.params import MAX_PROMPT_CHARS, GenerationParams, SubmitOptions, check_model, check_tags, validate_name
from mochi_lab.sweep import Run, expand_grid, plan_runs

RUN_KEY_RE = r"^[0-9A-Za-z_-]{1,64}$"  # run keys name files (exports) and travel in idempotency keys


class RunRecord(BaseModel):
    """One planned run as the record keeps it (`sweep.Run.to_dict`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    key: str = Field(pattern=RUN_KEY_RE)
    params: dict[str, Any]
    attempt: int = Field(default=0, ge=0, le=1_000_000)
    job_id: str | None = None

    @field_validator("params")
    @classmethod
    def _params(cls, v: dict[str, Any]) -> dict[str, Any]:
        GenerationParams.parse(**v)  # what resume queues and export lists: valid params (kept as given)
        return v

    @field_validator("job_id")
    @classmethod
    def _job_id(cls, v: str | None) -> str | None:
        return None if v is None else check_job_id(v)


class ExperimentRecord(BaseModel):
    """An experiment's record as `Experiment` writes it and reads it back: what a record from outside (the
    gateway's PUT) must be, so that reading it (runs, resume, export) cannot fail later."""

    model_config = ConfigDict(extra="forbid")

    name: str
    account: str | None = None  # the store's: whoever writes it sets it
    description: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    tags: list[str] = Field(default_factory=list)
    created_at: float = Field(default=0.0, allow_inf_nan=False)
    updated_at: float = Field(default=0.0, allow_inf_nan=False)
    runs: list[RunRecord] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return validate_name(v)

    @field_validator("tags", mode="before")
    @classmethod
    def _tags(cls, v: Any) -> Any:
        return list(check_tags(v))  # its runs' jobs carry them


class ExperimentNotFound(KeyError):
    """This account has no experiment of that name (another account's answers the same)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "experiment not found"


class Experiment:
    """Create or re-open with `cluster.experiment(name)`; every method reads the store, not a cache.

    Displayed in a notebook, it is a table of its runs with their status and overall progress, kept live
    until its runs end (`live()`); its HTML repr is the table read at that moment."""

    def __init__(self, backend: Backend, record: dict[str, Any], *, model: str = "tiny"):
        self._backend = backend
        self._record = record
        self.model = model

    @classmethod
    def open(
        cls,
        backend: Backend,
        name: str,
        *,
        description: str | None = None,
        tags: Iterable[str] | None = None,
        model: str = "tiny",
        create: bool = True,
    ) -> "Experiment":
        """Re-open `name`, or create it; a given description or tags replace the stored ones."""
        validate_name(name)
        try:
            record = backend.get_experiment(name)
        except KeyError:
            if not create:
                raise ExperimentNotFound(f"experiment {name!r} not found") from None
            now = time.time()
            tags = list(SubmitOptions.parse(tags=tags or ()).tags)
            record = {"name": name, "account": backend.account, "description": description or "",
                      "tags": tags, "created_at": now, "updated_at": now, "runs": []}
            backend.put_experiment(record)
            return cls(backend, record, model=model)
        exp = cls(backend, record, model=model)
        changes = {k: v for k, v in (("description", description), ("tags", None if tags is None else list(tags)))
                   if v is not None and record.get(k) != v}
        if changes:
            exp._update(lambda rec: rec.update(changes))
        return exp

    # -- the record ------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._record["name"]

    @property
    def description(self) -> str:
        return self._record.get("description", "")

    @property
    def tags(self) -> list[str]:
        return list(self._record.get("tags", []))

    @property
    def created_at(self) -> float:
        return self._record.get("created_at", 0.0)

    @property
    def runs(self) -> list[Run]:
        """The planned runs, in the order they were first added (live)."""
        return [Run.from_dict(r) for r in self._load()["runs"]]

    def _load(self) -> dict[str, Any]:
        try:
            self._record = self._backend.get_experiment(self.name)
        except KeyError:
            raise ExperimentNotFound(f"experiment {self.name!r} not found") from None
        return self._record

    def _update(self, mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        # The store has no compare-and-set for experiments: re-read right before writing so two
        # handles lose as little as possible. Jobs never depend on this write (idempotency keys do).
        record = self._load()
        mutate(record)
        record["updated_at"] = time.time()
        self._backend.put_experiment(record)
        self._record = record
        return record

    # -- queueing --------------------------------------------------------------
    def sweep(
        self, prompts: str | Iterable[str], seeds: Any = None, *, priority: int = 0, **param_lists: Any
    ) -> RunJobs:
        """Queue the grid prompts x params x seeds; a param given as a scalar is fixed for every run.

        Runs without a seed get one derived from the experiment name and the params, so the same
        sweep issued again maps onto the same runs and queues nothing new. Returns the jobs (a list
        that a notebook shows as a live table).
        """
        jobs = self._queue(plan_runs(self.name, expand_grid(prompts, seeds, param_lists), self.model), priority)
        return RunJobs(jobs, experiment=self)

    def add(
        self, params: GenerationParams | Mapping[str, Any] | None = None, /, *, priority: int = 0, **kwargs: Any
    ) -> Job:
        """Queue one run (a GenerationParams, a dict, or keyword params)."""
        spec = params.to_dict() if isinstance(params, GenerationParams) else dict(params or {})
        return self._queue(plan_runs(self.name, [{**spec, **kwargs}], self.model), priority)[0]

    def _queue(self, runs: list[Run], priority: int) -> list[Job]:
        for model in {r.params["model"] for r in runs}:
            check_model(model, self._backend.models())
        # 1. persist the plan first, so a client killed while queueing leaves runs `resume` can find
        def add_plan(rec: dict[str, Any]) -> None:
            known = {r["key"] for r in rec["runs"]}
            rec["runs"].extend(r.to_dict() for r in runs if r.key not in known)

        current = {r["key"]: Run.from_dict(r) for r in self._update(add_plan)["runs"]}
        # 2. queue each run under its idempotency key: an existing job comes back instead of a new one
        planned = [current[r.key] for r in runs]
        records = [self._enqueue(run, priority) for run in planned]
        self._remember({run.key: (run.attempt, rec.id) for run, rec in zip(planned, records, strict=True)})
        return [Job(self._backend, rec) for rec in records]

    def _enqueue(self, run: Run, priority: int) -> JobRecord:
        options = SubmitOptions.parse(priority=priority, experiment=self.name, tags=self.tags,
                                      idempotency_key=run.idempotency_key(self.name))
        return self._backend.submit(GenerationParams.stored(run.params), options)

    def _remember(self, ids: dict[str, tuple[int, str]]) -> None:
        """Store runs' job ids (a cache: the idempotency key alone finds a run's job)."""
        def put(rec: dict[str, Any]) -> None:
            for r in rec["runs"]:
                attempt, job_id = ids.get(r["key"], (None, None))
                if attempt == r.get("attempt", 0):  # a concurrent resume may have moved on
                    r["job_id"] = job_id

        if ids:
            self._update(put)

    def resume(self, *, priority: int = 0) -> RunJobs:
        """Re-queue only the runs that are missing, failed or cancelled; done and in-flight runs stay."""
        runs, jobs = self._snapshot()
        dead = {r.key for r in runs if jobs[r.key] is not None and jobs[r.key].status in (FAILED, CANCELLED)}
        todo = {r.key for r in runs if jobs[r.key] is None} | dead
        if not todo:
            return RunJobs(experiment=self)

        def bump(rec: dict[str, Any]) -> None:
            for r in rec["runs"]:
                if r["key"] in dead:  # a new attempt gets a new idempotency key, hence a new job
                    r["attempt"] = r.get("attempt", 0) + 1
                    r["job_id"] = None

        current = [Run.from_dict(r) for r in self._update(bump)["runs"] if r["key"] in todo]
        records = [self._enqueue(run, priority) for run in current]
        self._remember({run.key: (run.attempt, rec.id) for run, rec in zip(current, records, strict=True)})
        return RunJobs((Job(self._backend, rec) for rec in records), experiment=self)

    # -- reading ---------------------------------------------------------------
    def _snapshot(self) -> tuple[list[Run], dict[str, JobRecord | None]]:
        """The runs and each run's current job (None: never queued, or deleted), in one listing."""
        runs = self.runs
        listed = self._backend.list(experiment=self.name, limit=LIST_LIMIT)
        by_key = {j.idempotency_key: j for j in listed}
        jobs: dict[str, JobRecord | None] = {}
        found = {}
        for run in runs:
            jobs[run.key] = job = by_key.get(run.idempotency_key(self.name))
            if job is not None and job.id != run.job_id:  # ids not recorded yet (a killed client)
                found[run.key] = (run.attempt, job.id)
        self._remember(found)
        return runs, jobs

    def jobs(self) -> list[Job]:
        """The current job of each run that has one, in run order."""
        runs, jobs = self._snapshot()
        return [Job(self._backend, jobs[r.key]) for r in runs if jobs[r.key] is not None]

    def status(self) -> dict[str, int]:
        """Runs per status: queued, running, done, failed, cancelled, and missing (never queued)."""
        _, jobs = self._snapshot()
        counts = dict.fromkeys((*STATUSES, MISSING), 0)
        for job in jobs.values():
            counts[job.status if job is not None else MISSING] += 1
        return counts

    def wait(self, timeout: float | None = None, *, progress: bool = True) -> dict[str, int]:
        """Block until every queued run has finished; returns `status()`. With `progress`, a notebook shows the
        experiment's table kept live meanwhile (HTML: a saved notebook keeps its last state, where a progress
        widget would need its kernel), and a terminal a progress bar over the runs.

        Missing runs are not waited for (nothing would ever finish them): a warning names `resume()`.
        """
        from mochi_lab.display.startup import in_kernel

        runs, jobs = self._snapshot()
        group = self.follower(jobs)
        bar = None
        if progress and in_kernel():
            LiveTable(group, self._drawn(runs)).send()  # redrawn by the group on each change
        elif progress:
            from tqdm import tqdm

            bar = tqdm(total=len(runs), desc=self.name, unit="run")

        def show() -> None:
            bar.n = sum(1 for j in group.records.values() if j is not None and j.finished)
            bar.set_postfix_str(summary(group.records), refresh=False)
            bar.refresh()

        try:
            group.follow(timeout, on_tick=show if bar is not None else None)
        except TimeoutError:
            left = len(group.pending)
            raise TimeoutError(f"experiment {self.name!r}: {left} runs unfinished after {timeout}s") from None
        finally:
            if bar is not None:
                bar.close()
        counts = self.status()
        if counts[MISSING]:
            warnings.warn(f"experiment {self.name!r}: {counts[MISSING]} runs were never queued; "
                          "call resume() to queue them", stacklevel=2)
        return counts

    def follower(self, jobs: Mapping[str, JobRecord | None] | None = None) -> GroupFollower:
        """The runs' jobs followed together: one listing of the experiment's jobs per tick, never a read per
        job. `jobs`: each run's current job, as `_snapshot` gives them (default: read now)."""
        if jobs is None:
            jobs = self._snapshot()[1]
        return GroupFollower(lambda: self._backend.list(experiment=self.name, limit=LIST_LIMIT), dict(jobs))

    def cancel(self) -> int:
        """Cancel every unfinished run (queued ones never start); returns how many were asked."""
        _, jobs = self._snapshot()
        live = [j for j in jobs.values() if j is not None and not j.finished]
        for job in live:
            self._backend.cancel(job.id)
        return len(live)

    # -- views -----------------------------------------------------------------
    def to_dataframe(self, columns: list[str] | None = None, *, all_columns: bool = False):
        """One row per run: the swept params, then the seed and the results (`status`, `run_s` the run
        time in seconds, `video` the MP4's path, `error`, `job_id`). `all_columns=True` adds the rest:
        `run_key` (the run's key in this experiment), `run_attempt`, `job_stage`, the params that did not
        vary, per-stage timings, times, the thumbnail and the worker. `columns=[...]` picks by name."""
        from mochi_lab.display.experiment import runs_dataframe

        return runs_dataframe(*self._snapshot(), columns=columns, all_columns=all_columns)

    def compare(self, rows: str | list[str] | None = None, columns: str | None = None, *, width: int = 256,
                download_dir: str | Any | None = None):
        """The runs' videos in a grid, with row and column headers for the swept params, played in sync
        from one play/pause/scrub control. `rows` / `columns` name the params for each axis (default:
        the innermost swept param across, the others down). A copy of each video goes to `download_dir`
        (default: the Studio's, beside the notebook), so a notebook saved with the save hook keeps the grid
        as posters linked to their videos."""
        from mochi_lab.display.compare import compare_grid

        return compare_grid(*self._snapshot(), video=lambda job_id: self._backend.artifact(job_id, "video"),
                            thumbnail=lambda job_id: self._backend.artifact(job_id, "thumbnail"),
                            rows=rows, columns=columns, width=width, download_dir=download_dir)

    def live(self, *, publish: Callable[[dict[str, Any], bool], None] | None = None) -> LiveTable:
        """The experiment's table, kept live until its runs end (what displaying it does)."""
        runs, jobs = self._snapshot()
        return LiveTable(self.follower(jobs), self._drawn(runs), publish=publish)

    def _drawn(self, runs: list[Run]) -> Callable[[Mapping[str, JobRecord | None]], str]:
        """The experiment's table as its runs' jobs stand (what the live views redraw)."""
        from mochi_lab.display.experiment import experiment_html

        record = self._record
        return lambda records: experiment_html(record, runs, dict(records))

    def _ipython_display_(self) -> None:
        display_live(self.live, self._repr_html_)

    def _repr_html_(self) -> str:
        from mochi_lab.display.experiment import experiment_html
        from mochi_lab.display.reprs import error_html

        try:
            runs, jobs = self._snapshot()  # read now: the table is live each time it is shown
        except Exception as exc:  # the store is down, or the experiment was deleted
            return error_html(f"cannot read experiment {self.name!r}: {type(exc).__name__}: {exc}")
        return experiment_html(self._record, runs, jobs)

    def export(self, folder: str | Any) -> Any:
        """Copy the done runs' videos into `folder`, with manifest.json and manifest.csv; returns the folder."""
        from mochi_lab.display.experiment import export_runs

        return export_runs(self._load(), *self._snapshot(), folder,
                           save=lambda job_id, dest: self._backend.save_artifact(job_id, "video", dest))

    def __repr__(self) -> str:
        return (f"<Experiment {self.name!r} account={self._backend.account!r} runs={len(self._record.get('runs', []))} "
                f"tags={self.tags}>")


__all__ = ["MISSING", "Experiment", "ExperimentNotFound", "ExperimentRecord", "RunJobs", "RunRecord"]
