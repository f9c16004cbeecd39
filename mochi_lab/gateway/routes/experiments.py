"""Experiments: GET /experiments, GET|PUT /experiments/{name}, POST /experiments/{name}/sweep|resume and
GET /experiments/{name}/export (a zip whose manifest names the gateway's routes, never server paths)."""

from __future__ import annotations

import dataclasses
import io
import json
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from mochi_lab.client.direct import DirectBackend
from mochi_lab.client.experiment import Experiment, ExperimentRecord
from mochi_lab.gateway import wire
from mochi_lab.gateway.door import AUTHED, JSON_BODY, KIB, Door, body_limit, invalid, not_found, validation_text
from mochi_lab.gateway.wire import Job, SweepRequest, errors, job_json
from mochi_lab.model import JobRecord
from mochi_lab.params import SubmitOptions, validate_name
from mochi_lab.sweep import grid_size


class RoutedBackend:
    """A user's backend whose listed jobs name their artifacts' routes, not server paths: what an export's
    manifest may show. The gateway opens the exported experiment on it (`Experiment(RoutedBackend(b), ...)`)."""

    def __init__(self, inner: DirectBackend):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def list(self, **kwargs: Any) -> list[JobRecord]:
        return [dataclasses.replace(r, artifacts={k: wire.artifact_url(k, r.id) for k in wire.ARTIFACT_ROUTES
                                                  if k in r.artifacts}) for r in self._inner.list(**kwargs)]


_RECORD = {"$ref": "#/components/schemas/ExperimentRecord"}
_ZIP = {200: {"description": "<name>/ with the done runs' videos, manifest.json and manifest.csv",
              "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}}}}


def router(door: Door) -> APIRouter:
    api = APIRouter(route_class=door.route_class(), tags=["experiments"])
    user_backend = door.user_backend()
    max_bytes = door.config.max_experiment_bytes

    def experiment_name(name: str) -> str:
        try:
            return validate_name(name)
        except ValueError:
            raise not_found("experiment not found") from None

    def open_experiment(backend: DirectBackend | RoutedBackend, name: str, create: bool = False) -> Experiment:
        try:
            record = backend.get_experiment(experiment_name(name))
        except KeyError:
            if not create:
                raise not_found("experiment not found") from None
            return Experiment.open(backend, name, model=backend.model)
        return Experiment(backend, record, model=backend.model)

    @api.get(wire.EXPERIMENTS[1], response_model=list[ExperimentRecord], responses=errors(*AUTHED))
    def experiments(backend: DirectBackend = Depends(user_backend)):
        """The caller's experiment records, newest first."""
        return JSONResponse(backend.list_experiments())

    @api.get(wire.EXPERIMENT[1], response_model=ExperimentRecord, responses=errors(*AUTHED, 404, 422))
    def get_experiment(name: str, backend: DirectBackend = Depends(user_backend)):
        try:
            return JSONResponse(backend.get_experiment(experiment_name(name)))
        except KeyError:
            raise not_found("experiment not found") from None

    @api.put(wire.PUT_EXPERIMENT[1], status_code=204, response_class=Response, responses=errors(*AUTHED, 422),
             openapi_extra={**body_limit(max_bytes), "requestBody": {
                 "required": True, "content": {"application/json": {"schema": _RECORD}}}})
    async def put_experiment(name: str, request: Request, backend: DirectBackend = Depends(user_backend)):
        """Create or replace the record (`ExperimentRecord`: 422 naming the field otherwise; its account is
        the caller's, whatever it says)."""
        try:
            validate_name(name)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        try:
            raw = json.loads(await request.body())
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
            raise invalid("the body must be a JSON object (an experiment record)") from None
        try:
            record = ExperimentRecord.model_validate(raw).model_dump()
        except ValidationError as exc:
            raise invalid(validation_text(exc)) from None
        if record["name"] != name:
            raise invalid("name: the record's name must equal the path's")
        record["account"] = backend.account  # forced: never the client's
        await run_in_threadpool(backend.put_experiment, record)
        return Response(status_code=204)

    # a sweep's prompts are at most max_active_jobs (its quota), each at most MAX_PROMPT_CHARS
    @api.post(wire.SWEEP[1], response_model=list[Job], openapi_extra=body_limit(256 * KIB),
              responses=errors(*AUTHED, *JSON_BODY))
    def sweep(name: str, body: SweepRequest, backend: DirectBackend = Depends(user_backend)):
        """Queue the grid's runs into the experiment (made if new): all of them, or none over the quota."""
        try:
            validate_name(name)
            planned = grid_size(body.prompts, body.seeds, body.params)
        except (ValueError, TypeError) as exc:
            raise invalid(str(exc)) from None
        priority = SubmitOptions.parse(priority=body.priority).priority
        door.check_quota(backend, planned)
        exp = open_experiment(backend, name, create=True)
        jobs = exp.sweep(body.prompts, body.seeds, priority=priority, **body.params)
        return JSONResponse([job_json(j.record) for j in jobs])

    @api.post(wire.RESUME[1], response_model=list[Job], responses=errors(*AUTHED, 404, 422))
    def resume(name: str, backend: DirectBackend = Depends(user_backend)):
        """Queue again the runs that are missing, failed or cancelled."""
        exp = open_experiment(backend, name)
        todo = sum(n for k, n in exp.status().items() if k in ("missing", "failed", "cancelled"))
        if todo:
            door.check_quota(backend, todo)
        jobs = exp.resume()
        return JSONResponse([job_json(j.record) for j in jobs])

    @api.get(wire.EXPORT[1], response_class=Response, responses={**_ZIP, **errors(*AUTHED, 404, 422)})
    def export(name: str, backend: DirectBackend = Depends(user_backend)):
        exp = open_experiment(RoutedBackend(backend), name)
        with tempfile.TemporaryDirectory(prefix="mochi-export-") as tmp:
            folder = exp.export(Path(tmp) / name)
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
                for path in sorted(folder.rglob("*")):
                    if path.is_file():
                        zf.write(path, f"{name}/{path.relative_to(folder)}")
        return Response(buf.getvalue(), media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="{name}.zip"'})

    return api


__all__ = ["RoutedBackend", "router"]
