"""The service and the pool: GET /healthz, GET /whoami, GET /models, GET /queue, GET /workers/status, and the
admins' POST /workers/scale and POST /workers/shutdown."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse

from mochi_lab.client.direct import DirectBackend
from mochi_lab.gateway import wire
from mochi_lab.gateway.auth import Identity
from mochi_lab.gateway.door import AUTHED, JSON_BODY, KIB, ApiError, Door, body_limit, invalid
from mochi_lab.gateway.wire import Ok, QueueRow, ScaleRequest, Whoami, WorkerRow, errors
from mochi_lab.model import StoreError
from mochi_lab.store.base import QUEUE_LIST_MAX

log = logging.getLogger("mochi_lab.gateway")
SCALE_MAX = 1024


def router(door: Door) -> APIRouter:
    api = APIRouter(route_class=door.route_class())
    user_backend = door.user_backend()
    admin_only = door.admin_only()

    def pool_of(identity: Identity) -> DirectBackend:
        backend = door.backend_for(identity.account)
        if backend.pool is None and backend.controller is None:  # a gateway over the store alone
            raise ApiError(409, "conflict", "this gateway serves a store with no pool: there are no workers to change")
        return backend

    @api.get(wire.HEALTHZ[1], tags=["service"], response_model=Ok, responses=errors(413, 503))
    def healthz():
        """Open to anyone: 200 while the store answers."""
        try:
            door.shared().store.workers()
        except StoreError:
            raise ApiError(503, "unavailable", "the job store is unavailable") from None
        return JSONResponse({"ok": True})

    @api.get(wire.WHOAMI[1], tags=["service"], response_model=Whoami, responses=errors(*AUTHED))
    async def whoami(identity: Identity = Depends(door.identify)):
        """The account the token stands for, as the server decided it."""
        return JSONResponse({"account": identity.account, "admin": identity.admin})

    @api.get(wire.MODELS[1], tags=["pool"], response_model=list[str], responses=errors(*AUTHED))
    def models(backend: DirectBackend = Depends(user_backend)):
        return JSONResponse(backend.models())

    @api.get(wire.QUEUE[1], tags=["pool"], response_model=list[QueueRow], responses=errors(*AUTHED, 422))
    def queue(limit: Annotated[int, Query(json_schema_extra={"minimum": 1, "maximum": QUEUE_LIST_MAX})] = 50,
              identity: Identity = Depends(door.identify)):
        """Every account's queued jobs in the order workers take them: the caller's own in full, others'
        by place and size only (with their account for admins)."""
        if not 0 < limit <= QUEUE_LIST_MAX:
            raise invalid(f"limit must be 1..{QUEUE_LIST_MAX}")
        return JSONResponse(door.backend_for(identity.account, admin=identity.admin).queue(limit))

    @api.get(wire.WORKERS[1], tags=["pool"], response_model=list[WorkerRow], responses=errors(*AUTHED))
    def workers(identity: Identity = Depends(door.identify)):
        """Every worker's state; its current job's id where the job is the caller's (any, for admins); nodes,
        pids and memory for admins only (`backend.worker_rows`)."""
        return JSONResponse(door.backend_for(identity.account, admin=identity.admin).workers())

    @api.post(wire.SCALE[1], tags=["pool"], response_model=Ok, openapi_extra=body_limit(KIB),
              responses=errors(*AUTHED, *JSON_BODY, 409))
    def scale(body: ScaleRequest, identity: Identity = Depends(admin_only)):
        """Admins: the pool's size (with an autoscaler, its bounds both become n)."""
        n = body.n
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= SCALE_MAX:
            raise invalid(f"n must be a whole number of workers between 0 and {SCALE_MAX}, got {n!r:.40}")
        pool_of(identity).scale(n)
        log.info("pool scaled to %d by %s", n, identity.account)
        return JSONResponse({"ok": True})

    @api.post(wire.SHUTDOWN[1], tags=["pool"], response_model=Ok, responses=errors(*AUTHED, 409))
    def shutdown(identity: Identity = Depends(admin_only)):
        """Admins: stop every worker (queued jobs wait for the next ones)."""
        pool_of(identity).shutdown_pool()
        log.info("pool shut down by %s", identity.account)
        return JSONResponse({"ok": True})

    return api


__all__ = ["router"]
