"""The gateway backend: the same `Backend`, over the multi-user gateway's HTTP API (httpx).

A notebook on a shared cluster holds no store credentials, only its JupyterHub token; the gateway
(`mochi_lab.gateway`) checks the token and decides the account. So `account` here is the server's word
(`GET /whoami`), never the caller's. Errors come back as the direct backend's exceptions: an unknown or
another account's job is `JobNotFound`, bad params `ParamsError`, an unreachable gateway
`StoreUnavailable`, a body over a limit `RecordTooLarge`, as the wire's table says (`mochi_lab.gateway.wire`);
plus `GatewayAuthError` (401/403, a `PermissionError`) and `QuotaExceeded` (429). Routes and bodies are the
wire's too.

Artifacts are downloaded once into a local cache (`<cache_dir>/gateway/<host>/<account>/`), so
`job.result()` returns a path on this machine as it does on the direct backend. The requests themselves, the
token and the error answers are the wire client's (`client/wire_client.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import httpx

from mochi_lab.adapters import AdapterNotFound, AdapterRejected
from mochi_lab.client.backend import ARTIFACTS, Backend
from mochi_lab.client.wire_client import GatewayAuthError, GatewayError, WireClient
from mochi_lab.config import ClientConfig, check_account
from mochi_lab.gateway import wire
from mochi_lab.gateway.wire import at
from mochi_lab.lora_refs import check_adapter_name
from mochi_lab.model import (
    ARTIFACT_SUFFIXES,
    JOB_ID_RE,
    JobNotFound,
    JobRecord,
    QuotaExceeded,
    StoreUnavailable,
    wait_workers_ready,
)
from mochi_lab.params import GenerationParams, SubmitOptions, check_model

DEFAULT_TIMEOUT_S = 30.0
_CHUNK = 1 << 20
_PAGE = wire.JOBS_LIMIT_MAX  # the most jobs one GET /jobs answers


def default_cache_dir() -> Path:
    """Where downloaded artifacts go: `$MOCHI_LAB_CACHE_DIR/gateway`, else `~/.cache/mochi_lab/gateway`."""
    return ClientConfig.from_env().cache_dir / "gateway"


def _host_dir(url: str) -> str:
    """One folder per gateway: host, port and prefix, made safe for a file name."""
    parts = urlsplit(url)
    name = f"{parts.hostname or 'gateway'}{f'_{parts.port}' if parts.port else ''}{parts.path.rstrip('/')}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "gateway"


def _chunks(data: IO[bytes]) -> Iterator[bytes]:
    """A binary stream as an httpx body, read a chunk at a time."""
    while chunk := data.read(_CHUNK):
        yield chunk


class GatewayBackend(Backend):
    """One account's jobs, artifacts, workers and experiments, through the gateway at `url`."""

    def __init__(self, url: str, token: str | None, *, timeout: float = DEFAULT_TIMEOUT_S,
                 cache_dir: str | Path | None = None, model: str = "tiny",
                 transport: httpx.BaseTransport | None = None):
        self.http = WireClient(url, token, timeout=timeout, transport=transport)
        self.url, self._where, self.timeout = self.http.url, self.http.where, timeout
        self.model = model
        try:
            who = self.http.json(*at(wire.WHOAMI))
            self.account = check_account(who["account"])
            self.admin = bool(who.get("admin", False))
            check_model(model, self.models())
        except BaseException:
            self.http.close()
            raise
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_dir = root / _host_dir(self.url) / self.account

    @staticmethod
    def _job_id(job_id: str) -> str:
        """The id as one path segment. A malformed id is unknown here as on the store: no request sent."""
        if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
            raise JobNotFound(f"job {job_id!r:.80} not found")
        return job_id

    @staticmethod
    def _job_missing(job_id: str):
        return lambda detail: JobNotFound(f"job {job_id} not found")

    # -- jobs ------------------------------------------------------------------
    def submit(self, params: GenerationParams, options: SubmitOptions, *, reuse: bool = True) -> JobRecord:
        body = wire.GenerateRequest(params=params.to_dict(), priority=options.priority, tags=list(options.tags),
                                    experiment=options.experiment, idempotency_key=options.idempotency_key,
                                    reuse=reuse).model_dump()
        return JobRecord.from_dict(self.http.json(*at(wire.GENERATE), json=body))

    def get(self, job_id: str) -> JobRecord:
        jid = self._job_id(job_id)
        return JobRecord.from_dict(self.http.json(*at(wire.STATUS, job_id=jid), not_found=self._job_missing(jid)))

    def list(self, *, status: str | None = None, experiment: str | None = None, tag: str | None = None,
             text: str | None = None, limit: int = 50, offset: int = 0) -> list[JobRecord]:
        """Pages of at most `_PAGE` (the server's cap) until `limit` rows or the end: experiments ask for all."""
        query = {k: v for k, v in (("status", status), ("experiment", experiment), ("tag", tag), ("text", text))
                 if v is not None}
        out: list[JobRecord] = []
        while len(out) < limit:
            n = min(_PAGE, limit - len(out))
            rows = self.http.json(*at(wire.JOBS, account=self.account),
                              params={**query, "limit": n, "offset": offset + len(out)})
            out.extend(JobRecord.from_dict(r) for r in rows)
            if len(rows) < n:
                break
        return out

    def cancel(self, job_id: str) -> JobRecord:
        jid = self._job_id(job_id)
        return JobRecord.from_dict(self.http.json(*at(wire.CANCEL, job_id=jid), not_found=self._job_missing(jid)))

    def rerun(self, job_id: str, *, priority: int = 0) -> JobRecord:
        """The server's `POST /rerun/{id}` (which runs `Backend.rerun` there); another priority than 0 is a
        submit of the stored params, as the route takes none."""
        if priority:
            return super().rerun(job_id, priority=priority)
        jid = self._job_id(job_id)
        return JobRecord.from_dict(self.http.json(*at(wire.RERUN, job_id=jid), not_found=self._job_missing(jid)))

    def delete(self, job_id: str) -> None:
        jid = self._job_id(job_id)
        self.http.request(*at(wire.DELETE, job_id=jid), not_found=self._job_missing(jid))
        for name in ARTIFACTS:
            with contextlib.suppress(FileNotFoundError):
                self._cached(jid, name).unlink()

    def counts(self) -> dict[str, int]:
        return self.http.json(*at(wire.COUNTS))

    def events(self, job_id: str, *, timeout: float | None = None) -> Iterator[JobRecord]:
        """The job's progress as the server pushes it (`GET /events/{id}`, server-sent events): one record
        per change of status, stage or step, the last one finished. TimeoutError when nothing (not even a
        keep-alive) arrives for `timeout` s."""
        jid = self._job_id(job_id)
        try:
            read = httpx.Timeout(self.timeout, read=timeout)
            with self.http.client.stream(*at(wire.EVENTS, job_id=jid), timeout=read) as r:
                if not r.is_success:
                    raise self.http.error(r, self._job_missing(jid))
                data: list[str] = []
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        data.append(line[5:].removeprefix(" "))
                    elif not line and data:
                        yield JobRecord.from_dict(json.loads("\n".join(data)))
                        data = []
                if data:
                    yield JobRecord.from_dict(json.loads("\n".join(data)))
        except httpx.TimeoutException:
            raise TimeoutError(f"no progress event for job {jid} within {timeout}s") from None
        except httpx.TransportError as exc:
            raise StoreUnavailable(f"lost the event stream of the mochi_lab gateway at {self._where}: "
                                   f"{self.http.scrub(str(exc)) or type(exc).__name__}") from None

    def watch(self, job_id: str, timeout: float | None = None) -> Iterator[JobRecord]:
        """Pushed by the server (`events`), so the end is seen when it happens, not at the next poll; a
        stream that ends early (the server's time limit, a restart, a cut) is opened again."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                for record in self.events(job_id, timeout=left):
                    yield record
                    if record.finished:
                        return
                    if deadline is not None and time.monotonic() >= deadline:
                        break
            except TimeoutError:
                pass
            except StoreUnavailable:  # a cut stream; a gateway that is gone fails the read below
                time.sleep(0.1)
            record = self.get(job_id)
            yield record
            if record.finished:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {record.status} ({record.stage}) after {timeout}s")

    def preview(self, job_id: str) -> tuple[int, bytes] | None:
        jid = self._job_id(job_id)
        r = self.http.request(*at(wire.PREVIEW, job_id=jid), not_found=self._job_missing(jid))
        return None if r.status_code == 204 else (int(r.headers.get(wire.PREVIEW_STEP_HEADER, 0)), r.content)

    def queue(self, limit: int = 50) -> list[dict[str, Any]]:
        return list(self.http.json(*at(wire.QUEUE), params={"limit": limit}))

    # -- artifacts -------------------------------------------------------------
    def _cached(self, job_id: str, name: str) -> Path:
        return self.cache_dir / f"{job_id}{ARTIFACT_SUFFIXES[name]}"

    @staticmethod
    def _route(name: str) -> tuple[str, str]:
        if name not in ARTIFACTS:
            raise ValueError(f"artifact must be one of {', '.join(ARTIFACTS)}, got {name!r}")
        return wire.ARTIFACT_ROUTES[name]

    def _download(self, job_id: str, name: str, dest: Path) -> Path:
        """Stream the artifact into `dest` (whole, or not at all: a temp file renamed at the end)."""
        route = self._route(name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                with self.http.reaching(f"the {name} of job {job_id}"), \
                        self.http.client.stream(*at(route, job_id=job_id)) as r:
                    if r.status_code in (404, 409, 410):
                        r.read()
                        # an unknown or other account's id raises JobNotFound here; else there is no file
                        record = self.get(job_id)
                        raise FileNotFoundError(f"job {job_id} has no {name} (status {record.status})")
                    if not r.is_success:
                        raise self.http.error(r, self._job_missing(job_id))
                    expected = r.headers.get("content-length")
                    for chunk in r.iter_bytes(_CHUNK):
                        f.write(chunk)
                    got = f.tell()
            if expected is not None and expected.isdigit() and int(expected) != got:
                raise StoreUnavailable(f"download of the {name} of job {job_id} from {self._where} was cut short "
                                       f"({got} of {expected} bytes)")
            os.replace(tmp, dest)
            return dest
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def artifact_path(self, job_id: str, name: str) -> Path:
        """The artifact in the local cache, downloaded on first use (a done job's files never change)."""
        self._route(name)
        jid = self._job_id(job_id)
        path = self._cached(jid, name)
        if path.is_file():
            return path
        return self._download(jid, name, path)

    def save_artifact(self, job_id: str, name: str, dest: Path) -> Path:
        self._route(name)
        jid = self._job_id(job_id)
        cached = self._cached(jid, name)
        if cached.is_file():
            shutil.copyfile(cached, dest)
            return Path(dest)
        return self._download(jid, name, Path(dest))

    # -- LoRA adapters ---------------------------------------------------------
    def put_adapter(self, name: str, data: IO[bytes], *, model: str | None = None) -> dict[str, Any]:
        """PUT /adapters/{name}, the file streamed as the body (the server checks it: AdapterRejected naming why)."""
        try:  # as one path segment: a name the server would refuse is refused here, with its reason
            check_adapter_name(name)
        except ValueError as exc:
            raise AdapterRejected(str(exc)) from None
        headers = {"Content-Type": "application/octet-stream"}
        with contextlib.suppress(AttributeError, OSError, ValueError):  # a file: its size, so a refusal comes first
            headers["Content-Length"] = str(os.fstat(data.fileno()).st_size - data.tell())
        return self.http.json(*at(wire.PUT_ADAPTER, name=name), params={"model": model or self.model},
                              content=_chunks(data), headers=headers)

    def adapters(self) -> list[dict[str, Any]]:
        return list(self.http.json(*at(wire.ADAPTERS)))

    def delete_adapter(self, name: str) -> None:
        try:  # a name no adapter can have is unknown here as on the server: no request sent
            check_adapter_name(name)
        except ValueError:
            raise AdapterNotFound(f"adapter {name!r:.80} not found") from None
        self.http.request(*at(wire.DELETE_ADAPTER, name=name),
                          not_found=lambda detail: AdapterNotFound(f"adapter {name!r} not found"))

    # -- the pool --------------------------------------------------------------
    def models(self) -> list[str]:
        return list(self.http.json(*at(wire.MODELS)))

    def workers(self) -> list[dict[str, Any]]:
        return list(self.http.json(*at(wire.WORKERS)))

    def scale(self, n: int) -> None:
        self.http.request(*at(wire.SCALE), json=wire.ScaleRequest(n=n).model_dump())

    def shutdown_pool(self) -> None:
        self.http.request(*at(wire.SHUTDOWN))

    def wait_ready(self, timeout: float) -> None:
        """Until the server's workers all say idle or busy (at least one): `model.workers_ready` over the rows
        this account sees (a client sees no actors)."""
        wait_workers_ready(self.workers, timeout)

    # -- experiments -----------------------------------------------------------
    def get_experiment(self, name: str) -> dict[str, Any]:
        missing = lambda detail: KeyError(f"experiment {name!r} not found")
        return self.http.json(*at(wire.EXPERIMENT, name=name), not_found=missing)

    def put_experiment(self, record: dict[str, Any]) -> None:
        self.http.request(*at(wire.PUT_EXPERIMENT, name=record["name"]), json=record)

    def list_experiments(self) -> list[dict[str, Any]]:
        return list(self.http.json(*at(wire.EXPERIMENTS)))

    # -- the handle ------------------------------------------------------------
    def info(self) -> dict[str, str]:
        return {"backend": "gateway", "address": self._where, "account": self.account, "model": self.model}

    def close(self) -> None:
        self.http.close()

    def __repr__(self) -> str:
        return f"<GatewayBackend {self._where} account={getattr(self, 'account', None)!r}>"


__all__ = ["GatewayAuthError", "GatewayBackend", "GatewayError", "QuotaExceeded", "default_cache_dir"]
