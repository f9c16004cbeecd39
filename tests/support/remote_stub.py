"""A tiny in-memory stand-in for the gateway's HTTP contract (/work/gateway_contract.md), for the client's
unit tests: it answers the contract's shapes (JSON errors, job JSON, artifacts, SSE) through an
`httpx.MockTransport`. It tests how `mochi_lab.remote` maps the contract, not the product: the real
server is `mochi_lab.gateway`, exercised end to end in tests/test_remote.py when it is there.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Any

import httpx

from mochi_lab.store.base import FINISHED, JobRecord, new_job_id

ALICE, BOB, NOSCOPE = "tok-alice-5f2b9c0e7d1a", "tok-bob-8c3d4e1f0a9b", "tok-noscope-3e4f5a6b7c8d"
VIDEO = b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 64
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))


class GatewayStub:
    """State: jobs and experiments per account, worker rows; `inject` makes the next matching call fail."""

    def __init__(self):
        self.tokens = {ALICE: "alice", BOB: "bob", NOSCOPE: "carol"}
        self.admins = {"alice"}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.experiments: dict[tuple[str, str], dict[str, Any]] = {}
        self.workers = [{"worker_id": "w0", "state": "idle", "started_at": time.time() - 5}]
        self.requests: list[httpx.Request] = []
        self.failures: list[tuple[str, int, Any, dict]] = []  # (path prefix, status, body, headers)
        self.scaled: list[int] = []
        self.steps = 2
        self.cut_events = 0  # event streams still to break after their first event
        self.page_max = 1000  # the server's cap on one GET /jobs
        self.prefix = "/services/mochi-lab"  # the hub's service prefix; routes are the same below it

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def inject(self, prefix: str, status: int, body: Any = None, headers: dict | None = None) -> None:
        self.failures.append((prefix, status, body, headers or {}))

    # -- helpers ---------------------------------------------------------------
    @staticmethod
    def _error(status: int, kind: str, detail: str) -> httpx.Response:
        return httpx.Response(status, json={"error": kind, "detail": detail})

    def _job_json(self, job: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in job.items() if k not in ("fence", "lease_expires_at")}
        out["artifacts"] = {k: k for k in job["artifacts"]}  # route names only, never server paths
        return out

    def _own(self, account: str, job_id: str) -> dict[str, Any] | None:
        job = self.jobs.get(job_id)
        return job if job is not None and job["account"] == account else None

    def advance(self, job: dict[str, Any]) -> None:
        """Each read moves a job on: queued -> running (step 1) -> ... -> done with artifacts."""
        if job["status"] == "queued":
            job.update(status="running", stage="denoising", step=1, total_steps=self.steps, started_at=time.time())
        elif job["status"] == "running" and job["step"] < job["total_steps"]:
            job["step"] += 1
        elif job["status"] == "running":
            job.update(status="done", stage="done", finished_at=time.time(),
                       artifacts={"video": "/srv/x.mp4", "thumbnail": "/srv/x.png"}, timings={"run_s": 0.1})

    # -- the routes ------------------------------------------------------------
    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path.removeprefix(self.prefix).lstrip("/")
        for i, (prefix, status, body, headers) in enumerate(self.failures):
            if path.startswith(prefix):
                del self.failures[i]
                if isinstance(body, (bytes, str)):
                    return httpx.Response(status, content=body, headers=headers)
                return httpx.Response(status, json=body, headers=headers)
        if path == "healthz":
            return httpx.Response(200, json={"ok": True})
        auth = request.headers.get("authorization", "")
        m = re.fullmatch(r"(?:token|Bearer) (.+)", auth)
        account = self.tokens.get(m.group(1)) if m else None
        if account is None:
            return self._error(401, "unauthorized", "missing or invalid token")
        if account == "carol":
            return self._error(403, "forbidden", "the token lacks the scope access:services!service=mochi-lab")
        method = request.method
        body = json.loads(request.content) if request.content else None

        if (method, path) == ("GET", "whoami"):
            return httpx.Response(200, json={"account": account, "admin": account in self.admins})
        if (method, path) == ("GET", "models"):
            return httpx.Response(200, json=["mochi-1-preview", "tiny"])
        if (method, path) == ("GET", "counts"):
            counts = dict.fromkeys(("queued", "running", "done", "failed", "cancelled"), 0)
            for job in self.jobs.values():
                if job["account"] == account:
                    counts[job["status"]] += 1
            return httpx.Response(200, json=counts)
        if (method, path) == ("POST", "generate"):
            return self._generate(account, body)
        if (method, path) == ("GET", "workers/status"):
            rows, self.workers = self.workers, [dict(r, state="idle" if r["state"] == "loading" else r["state"])
                                                for r in self.workers]
            return httpx.Response(200, json=rows)
        if (method, path) in (("POST", "workers/scale"), ("POST", "workers/shutdown")):
            if account not in self.admins:
                return self._error(403, "forbidden", "only admins may change the pool")
            if path == "workers/scale":
                self.scaled.append(body["n"])
            return httpx.Response(200, json={"ok": True})
        if m := re.fullmatch(r"(status|cancel|download|thumbnail|events)/([^/]+)", path):
            route, job_id = m.groups()
            job = self._own(account, job_id)
            if job is None:
                return self._error(404, "not_found", f"job {job_id} not found")
            if route == "status":
                self.advance(job)
                return httpx.Response(200, json=self._job_json(job))
            if route == "cancel":
                if job["status"] not in FINISHED:
                    job.update(status="cancelled", stage="cancelled", finished_at=time.time())
                return httpx.Response(200, json=self._job_json(job))
            if route == "events":
                return self._events(job)
            if job["status"] != "done":
                return self._error(404, "not_found", f"job {job_id} has no {route}")
            if route == "download":
                return httpx.Response(200, content=VIDEO, headers={"content-type": "video/mp4",
                                                                   "accept-ranges": "bytes"})
            return httpx.Response(200, content=PNG, headers={"content-type": "image/png"})
        if m := re.fullmatch(r"jobs/([^/]+)", path):
            if method == "DELETE":
                if self._own(account, m.group(1)) is None:
                    return self._error(404, "not_found", f"job {m.group(1)} not found")
                del self.jobs[m.group(1)]
                return httpx.Response(204)
            if m.group(1) != account and account not in self.admins:
                return self._error(404, "not_found", f"account {m.group(1)} not found")
            return self._list(m.group(1), dict(request.url.params))
        if path == "experiments" and method == "GET":
            recs = [r for (a, _), r in self.experiments.items() if a == account]
            return httpx.Response(200, json=sorted(recs, key=lambda r: -r.get("created_at", 0)))
        if m := re.fullmatch(r"experiments/([^/]+)", path):
            name = m.group(1)
            if method == "GET":
                rec = self.experiments.get((account, name))
                if rec is None:
                    return self._error(404, "not_found", f"experiment {name!r} not found")
                return httpx.Response(200, json=rec)
            if method == "PUT":
                if body.get("name") != name:
                    return self._error(422, "invalid", "the record's name must equal the path's")
                self.experiments[(account, name)] = dict(body, account=account)
                return httpx.Response(204)
        return self._error(404, "not_found", f"no route {method} /{path}")

    def _generate(self, account: str, body: dict[str, Any]) -> httpx.Response:
        params = body["params"]
        if params.get("num_frames", 19) % 6 != 1:
            return self._error(422, "invalid", "invalid generation parameters:\n  num_frames: must be of the "
                                               "form 6k+1 between 1 and 283, got 8")
        key = body.get("idempotency_key")
        for job in self.jobs.values():
            if job["account"] != account:
                continue
            if key is not None and job["idempotency_key"] == key:
                return httpx.Response(201, json=self._job_json(job))
            if (key is None and body.get("reuse", True) and job["params"] == params
                    and job["experiment"] == body.get("experiment") and job["status"] not in ("failed", "cancelled")):
                return httpx.Response(201, json=self._job_json(job))
        record = JobRecord(id=new_job_id(), account=account, params=params, priority=body.get("priority", 0),
                           experiment=body.get("experiment"), tags=list(body.get("tags", [])),
                           idempotency_key=key, created_at=time.time())
        self.jobs[record.id] = job = dataclasses.asdict(record)
        return httpx.Response(201, json=self._job_json(job))

    def _list(self, account: str, q: dict[str, str]) -> httpx.Response:
        rows = [j for j in self.jobs.values() if j["account"] == account
                and (q.get("status") is None or j["status"] == q["status"])
                and (q.get("experiment") is None or j["experiment"] == q["experiment"])
                and (q.get("tag") is None or q["tag"] in j["tags"])
                and (q.get("text") is None or q["text"].lower() in j["params"]["prompt"].lower())]
        rows.sort(key=lambda j: j["created_at"], reverse=True)
        offset, limit = int(q.get("offset", 0)), int(q.get("limit", 50))
        if not 0 < limit <= self.page_max or offset < 0:
            return self._error(422, "invalid", f"limit must be 1..{self.page_max} and offset >= 0")
        return httpx.Response(200, json=[self._job_json(j) for j in rows[offset:offset + limit]])

    def _events(self, job: dict[str, Any]) -> httpx.Response:
        """The whole stream at once; while `cut_events` > 0 a stream breaks after its first event."""
        def chunks():
            while True:
                yield f"event: progress\ndata: {json.dumps(self._job_json(job))}\n\n".encode()
                if job["status"] in FINISHED:
                    return
                self.advance(job)
                if self.cut_events > 0:
                    self.cut_events -= 1
                    raise httpx.ReadError("connection reset by peer")

        return httpx.Response(200, content=chunks(), headers={"content-type": "text/event-stream"})
