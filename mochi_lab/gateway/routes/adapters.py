"""LoRA adapters: GET /adapters, PUT /adapters/{name} (the file as the body), DELETE /adapters/{name}.

The caller's own adapters only: another account's answers 404 as an unknown one. An upload is checked
(mochi_lab.adapters) before anything is kept; the body is bounded by the cluster's max_adapter_bytes.
"""

from __future__ import annotations

import tempfile

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from mochi_lab.client.direct import DirectBackend
from mochi_lab.gateway import wire
from mochi_lab.gateway.door import AUTHED, Door, body_limit
from mochi_lab.gateway.wire import Adapter, errors

_SPOOL = 1 << 20  # an upload stays in memory up to this, then goes to a temporary file


def router(door: Door, max_bytes: int) -> APIRouter:
    api = APIRouter(route_class=door.route_class(), tags=["adapters"])
    user_backend = door.user_backend()

    @api.get(wire.ADAPTERS[1], response_model=list[Adapter], responses=errors(*AUTHED))
    def adapters(backend: DirectBackend = Depends(user_backend)):
        """The caller's adapters, by name."""
        return JSONResponse(backend.adapters())

    @api.put(wire.PUT_ADAPTER[1], status_code=201, response_model=Adapter, responses=errors(*AUTHED, 422),
             openapi_extra={**body_limit(max_bytes), "requestBody": {"required": True, "content": {
                 "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
    async def put_adapter(name: str, request: Request, model: str | None = None,
                          backend: DirectBackend = Depends(user_backend)):
        """Keep the body (a .safetensors LoRA for `model`, default the gateway's) as the caller's adapter `name`,
        replacing one of that name. Refused with 422 (`rejected`, naming why: not safetensors, truncated, a
        header that lies, keys that are not the model's LoRA-targetable modules, a rank over the cap, a bad
        name), 413 over the size cap or 429 over the account's count; nothing is kept then."""
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL) as body:
            async for chunk in request.stream():  # the door counts the bytes against the body limit
                body.write(chunk)
            body.seek(0)
            record = await run_in_threadpool(lambda: backend.put_adapter(name, body, model=model))
        return JSONResponse(record, status_code=201)

    @api.delete(wire.DELETE_ADAPTER[1], status_code=204, response_class=Response,
                responses=errors(*AUTHED, 404, 422))
    def delete_adapter(name: str, backend: DirectBackend = Depends(user_backend)):
        """Forget the adapter (jobs queued with it still run with it: its file stays until they end)."""
        backend.delete_adapter(name)
        return Response(status_code=204)

    return api


__all__ = ["router"]
