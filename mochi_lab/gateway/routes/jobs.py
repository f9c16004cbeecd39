"""Jobs and their files: POST /generate, GET /status/{id}, GET /jobs/{account}, GET /counts,
POST /cancel/{id}, DELETE /jobs/{id}, POST /rerun/{id}, GET /download|thumbnail|preview/{id}."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import WithJsonSchema

from mochi_lab.client.direct import DirectBackend
from mochi_lab.gateway import wire
from mochi_lab.gateway.auth import Identity
from mochi_lab.gateway.door import AUTHED, JSON_BODY, KIB, Door, body_limit, invalid, not_found
from mochi_lab.gateway.wire import GenerateRequest, Job, errors, job_json
from mochi_lab.model import STATUSES, check_status
from mochi_lab.params import GenerationParams, SubmitOptions

_JOBS_MAX = wire.JOBS_LIMIT_MAX


def _binary(media_type: str, description: str) -> dict[int | str, dict[str, Any]]:
    return {200: {"content": {media_type: {"schema": {"type": "string", "format": "binary"}}},
                  "description": description}}


def router(door: Door) -> APIRouter:
    api = APIRouter(route_class=door.route_class(), tags=["jobs"])
    user_backend = door.user_backend()

    # two prompts of MAX_PROMPT_CHARS, even as JSON's \uXXXX escapes, and the rest
    @api.post(wire.GENERATE[1], status_code=201, response_model=Job, openapi_extra=body_limit(64 * KIB),
              responses=errors(*AUTHED, *JSON_BODY))
    def generate(body: GenerateRequest, backend: DirectBackend = Depends(user_backend)):
        """Queue one video (or answer the identical earlier job, with `reuse`)."""
        params = GenerationParams.parse(**{"model": backend.model, **body.params})
        options = SubmitOptions.parse(priority=body.priority, tags=body.tags, experiment=body.experiment,
                                      idempotency_key=body.idempotency_key)
        return JSONResponse(job_json(backend.submit(params, options, reuse=body.reuse)), status_code=201)

    @api.get(wire.STATUS[1], response_model=Job, responses=errors(*AUTHED, 404, 422))
    def status(job_id: str, backend: DirectBackend = Depends(user_backend)):
        return JSONResponse(job_json(backend.get(door.job_id(job_id))))

    @api.get(wire.JOBS[1], response_model=list[Job], responses=errors(*AUTHED, 404, 422))
    def jobs(account: str,
             status: Annotated[str | None, WithJsonSchema({"anyOf": [{"type": "string", "enum": list(STATUSES)},
                                                                     {"type": "null"}]})] = None,
             experiment: str | None = None, tag: str | None = None, text: str | None = None,
             limit: Annotated[int, Query(json_schema_extra={"minimum": 1, "maximum": _JOBS_MAX})] = 50,
             offset: Annotated[int, Query(json_schema_extra={"minimum": 0})] = 0,
             identity: Identity = Depends(door.identify)):
        """An account's jobs, newest first (an admin may read any account's)."""
        if account != identity.account and not identity.admin:
            raise not_found("account not found")
        try:
            backend = door.backend_for(account)
        except ValueError:
            raise not_found("account not found") from None
        try:
            check_status(status)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        if not 0 < limit <= _JOBS_MAX or offset < 0:
            raise invalid(f"limit must be 1..{_JOBS_MAX} and offset >= 0")
        return JSONResponse([job_json(r) for r in backend.list(status=status, experiment=experiment, tag=tag,
                                                               text=text, limit=limit, offset=offset)])

    @api.get(wire.COUNTS[1], response_model=dict[str, int], responses=errors(*AUTHED))
    def counts(backend: DirectBackend = Depends(user_backend)):
        """The caller's jobs by status."""
        return JSONResponse(backend.counts())

    @api.post(wire.CANCEL[1], response_model=Job, responses=errors(*AUTHED, 404, 422))
    def cancel(job_id: str, backend: DirectBackend = Depends(user_backend)):
        return JSONResponse(job_json(backend.cancel(door.job_id(job_id))))

    @api.delete(wire.DELETE[1], status_code=204, response_class=Response, responses=errors(*AUTHED, 404, 422))
    def delete(job_id: str, backend: DirectBackend = Depends(user_backend)):
        """Forget a job: its record, progress, preview and files."""
        backend.delete(door.job_id(job_id))
        return Response(status_code=204)

    @api.post(wire.RERUN[1], status_code=201, response_model=Job, responses=errors(*AUTHED, 404, 422))
    def rerun(job_id: str, backend: DirectBackend = Depends(user_backend)):
        """The same params again, as a new job tagged `reproduces:<id>`."""
        return JSONResponse(job_json(backend.rerun(door.job_id(job_id))), status_code=201)

    def artifact(backend: DirectBackend, job_id: str, name: str) -> Path:
        job_id = door.job_id(job_id)
        try:
            return backend.artifact_path(job_id, name)
        except FileNotFoundError:  # its text may name a server path: say it in our own words
            record = backend.get(job_id)
            raise not_found(f"job {job_id} has no {name} (status {record.status})") from None

    @api.get(wire.DOWNLOAD[1], tags=["artifacts"], response_class=FileResponse,
             responses={**_binary("video/mp4", "the video"), **errors(*AUTHED, 404, 422)})
    def download(job_id: str, backend: DirectBackend = Depends(user_backend)):
        path = artifact(backend, job_id, "video")
        return FileResponse(path, media_type="video/mp4", filename=f"{job_id}.mp4",
                            content_disposition_type="inline", headers={"Cache-Control": "private, max-age=3600"})

    @api.get(wire.THUMBNAIL[1], tags=["artifacts"], response_class=FileResponse,
             responses={**_binary("image/png", "the video's first frame"), **errors(*AUTHED, 404, 422)})
    def thumbnail(job_id: str, backend: DirectBackend = Depends(user_backend)):
        path = artifact(backend, job_id, "thumbnail")
        return FileResponse(path, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @api.get(wire.PREVIEW[1], tags=["artifacts"], response_class=Response,
             responses={**_binary("image/webp", "the latest preview"), 204: {"description": "no preview (yet)"},
                        **errors(*AUTHED, 404, 422)})
    def preview(job_id: str, backend: DirectBackend = Depends(user_backend)):
        """The running (or cancelled, or failed) job's latest preview: an animated WebP, one picture per
        latent frame, its step in X-Preview-Step; 204 when it has none (yet, or any more: a done job has its
        video)."""
        found = backend.preview(door.job_id(job_id))
        if found is None:
            return Response(status_code=204, headers={"Cache-Control": "no-store"})
        step, data = found
        return Response(data, media_type="image/webp",
                        headers={wire.PREVIEW_STEP_HEADER: str(step), "Cache-Control": "no-store"})

    return api


__all__ = ["router"]
