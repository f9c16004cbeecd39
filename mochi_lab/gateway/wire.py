"""The gateway's wire: its route paths, its request and response models, and which error is which status.

Both ends import this module: the server (`mochi_lab.gateway.app` and its routers) and the HTTP client
(`mochi_lab.client.http.GatewayBackend`). So a route is spelled once, a body has one schema, and an
exception raised behind the gateway comes back out of the client as the same exception. It imports only
the shared modules and pydantic: the client loads no web framework through it.

Request bodies are read loosely and validated by `GenerationParams` / `SubmitOptions`, whose messages name
each bad field and what it allows; their OpenAPI schema is the typed one below (`PARAMS_SCHEMA`, built
from the same limits), so an OpenAPI client sees every constraint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, Field, StrictBool, WithJsonSchema

from mochi_lab.adapters import AdapterNotFound, AdapterRejected
from mochi_lab.lora_refs import LORA_SCALE_MAX, LORA_SCALE_MIN, MAX_JOB_ADAPTERS
from mochi_lab.model import (
    JOB_ID_RE,
    STATUSES,
    JobNotFound,
    JobRecord,
    QuotaExceeded,
    RecordTooLarge,
    StoreError,
    StoreUnavailable,
)
from mochi_lab.params import (
    FPS_MAX,
    FPS_MIN,
    FRAMES_MAX,
    FRAMES_MIN,
    GUIDANCE_MAX,
    GUIDANCE_MIN,
    MAX_KEY_CHARS,
    MAX_PROMPT_CHARS,
    MAX_TAG_CHARS,
    MAX_TAGS,
    MODEL_RE,
    NAME_RE,
    PRIORITY_MAX,
    PRIORITY_MIN,
    SEED_MAX,
    SIZE_MAX,
    SIZE_MIN,
    STEPS_MAX,
    STEPS_MIN,
    SWEEP_ONLY,
    GenerationParams,
    ParamsError,
)

# -- routes: (method, path template); the server mounts them under its prefix, the client joins them to its URL
HEALTHZ = ("GET", "/healthz")
WHOAMI = ("GET", "/whoami")
MODELS = ("GET", "/models")
GENERATE = ("POST", "/generate")
STATUS = ("GET", "/status/{job_id}")
JOBS = ("GET", "/jobs/{account}")
COUNTS = ("GET", "/counts")
CANCEL = ("POST", "/cancel/{job_id}")
DELETE = ("DELETE", "/jobs/{job_id}")
RERUN = ("POST", "/rerun/{job_id}")
DOWNLOAD = ("GET", "/download/{job_id}")
THUMBNAIL = ("GET", "/thumbnail/{job_id}")
PREVIEW = ("GET", "/preview/{job_id}")
EVENTS = ("GET", "/events/{job_id}")
QUEUE = ("GET", "/queue")
WORKERS = ("GET", "/workers/status")
SCALE = ("POST", "/workers/scale")
SHUTDOWN = ("POST", "/workers/shutdown")
EXPERIMENTS = ("GET", "/experiments")
EXPERIMENT = ("GET", "/experiments/{name}")
PUT_EXPERIMENT = ("PUT", "/experiments/{name}")
SWEEP = ("POST", "/experiments/{name}/sweep")
RESUME = ("POST", "/experiments/{name}/resume")
EXPORT = ("GET", "/experiments/{name}/export")
ADAPTERS = ("GET", "/adapters")
PUT_ADAPTER = ("PUT", "/adapters/{name}")
DELETE_ADAPTER = ("DELETE", "/adapters/{name}")
# an artifact's name -> the route that serves it (the job JSON names these, never a server path)
ARTIFACT_ROUTES = {"video": DOWNLOAD, "thumbnail": THUMBNAIL}
PREVIEW_STEP_HEADER = "X-Preview-Step"  # GET /preview's answer: the denoising step its picture shows
JOBS_LIMIT_MAX = 1000  # the most jobs one GET /jobs answers (the client pages by it)


def url(route: tuple[str, str], **params: str) -> str:
    """`route`'s path with `params` filled in, each one path segment, relative (for a client's base URL)."""
    return route[1].lstrip("/").format(**{k: quote(str(v), safe="") for k, v in params.items()})


def at(route: tuple[str, str], **params: str) -> tuple[str, str]:
    """(method, relative path) of `route` with `params` filled in: what an HTTP client sends."""
    return route[0], url(route, **params)


def artifact_url(name: str, job_id: str) -> str:
    """What the job JSON says for an artifact: its route, relative to the gateway ("download/<id>")."""
    return url(ARTIFACT_ROUTES[name], job_id=job_id)


# -- errors: one table, read by the server's handler and by the client ------------------------------------
ErrorKind = Literal["unauthorized", "forbidden", "rate_limited", "not_found", "method_not_allowed", "conflict",
                    "too_large", "invalid", "rejected", "quota", "unavailable", "internal", "error"]


@dataclass(frozen=True)
class WireError:
    """An exception behind the gateway, the status and kind it answers, and what the client raises for it."""

    exception: type[Exception]
    status: int
    kind: str
    raised_as: type[Exception]


# First match wins (subclasses before their bases). Auth errors carry their own status (gateway.auth).
ERRORS: tuple[WireError, ...] = (
    WireError(ParamsError, 422, "invalid", ParamsError),
    WireError(AdapterRejected, 422, "rejected", AdapterRejected),
    WireError(AdapterNotFound, 404, "not_found", AdapterNotFound),
    WireError(QuotaExceeded, 429, "quota", QuotaExceeded),
    WireError(RecordTooLarge, 413, "too_large", RecordTooLarge),
    WireError(JobNotFound, 404, "not_found", JobNotFound),
    WireError(StoreError, 503, "unavailable", StoreUnavailable),
)
# The kind of an answer by its status alone (a framework's own 404/405, a refused body, the door's 401/403).
KIND_OF_STATUS: dict[int, str] = {400: "invalid", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                                  405: "method_not_allowed", 409: "conflict", 413: "too_large", 422: "invalid", 429: "quota",
                                  500: "internal", 503: "unavailable"}
# What the client raises for a status when the route has nothing better (502 and 504: a proxy in front).
RAISED_FOR_STATUS: dict[int, type[Exception]] = {
    **{e.status: e.raised_as for e in ERRORS if e.status != 404 and e.kind == KIND_OF_STATUS.get(e.status)},
    502: StoreUnavailable, 504: StoreUnavailable}
# What the client raises for a kind that is a row's own (a refused adapter is a 422, and not a ParamsError)
RAISED_FOR_KIND: dict[str, type[Exception]] = {e.kind: e.raised_as for e in ERRORS
                                               if e.kind not in KIND_OF_STATUS.values()}


def error_of(exc: BaseException) -> WireError | None:
    """The table's row for `exc`, or None."""
    return next((e for e in ERRORS if isinstance(exc, e.exception)), None)


class ErrorBody(BaseModel):
    """Every error answer: a kind a program can switch on, and a sentence for a person. Never a token, a
    store URL or a server path."""

    error: ErrorKind
    detail: str


ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
HTML_CONTENT = {"text/html": {"schema": {"type": "string"}}}


def errors(*statuses: int, html: tuple[int, ...] = ()) -> dict[int | str, dict[str, Any]]:
    """A route's OpenAPI `responses`: the error statuses it may answer, each an `ErrorBody` (or, for those in
    `html`, the sign-in page as well)."""
    return {s: {"description": KIND_OF_STATUS.get(s, "error"),
                "content": {**ERROR_CONTENT, **(HTML_CONTENT if s in html else {})}} for s in statuses}


# -- request bodies -------------------------------------------------------------------------------------
_ADAPTER_NAME = {"type": "string", "pattern": f"^{NAME_RE.pattern}$"}
_LORA_SCALE = {"type": "number", "minimum": LORA_SCALE_MIN, "maximum": LORA_SCALE_MAX, "default": 1.0}


def _params_schema() -> dict[str, Any]:
    """GenerationParams as JSON Schema, with the limits its validators enforce (the same constants)."""
    text = {"type": "string", "maxLength": MAX_PROMPT_CHARS}
    size = {"type": "integer", "minimum": SIZE_MIN, "maximum": SIZE_MAX, "multipleOf": 16}
    props: dict[str, Any] = {
        "prompt": {**text, "minLength": 1, "pattern": r"\S", "description": "what the video shows (at most 256 "
                                                                           "tokens)"},
        "negative_prompt": {**text, "default": ""},
        "num_frames": {"type": "integer", "enum": list(range(FRAMES_MIN, FRAMES_MAX + 1, 6)), "default": 19,
                       "description": f"6k+1, {FRAMES_MIN}..{FRAMES_MAX}"},
        "height": {**size, "default": 480},
        "width": {**size, "default": 848},
        "num_inference_steps": {"type": "integer", "minimum": STEPS_MIN, "maximum": STEPS_MAX, "default": 64},
        "guidance_scale": {"type": "number", "minimum": GUIDANCE_MIN, "maximum": GUIDANCE_MAX, "default": 4.5},
        "seed": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": SEED_MAX}, {"type": "null"}],
                 "default": None, "description": "null draws one (recorded in the job)"},
        "fps": {"type": "integer", "minimum": FPS_MIN, "maximum": FPS_MAX, "default": 30},
        "model": {"type": "string", "pattern": f"^{MODEL_RE.pattern}$", "description": "one of GET /models; "
                  "default: the gateway's model"},
        "lora": {"anyOf": [_ADAPTER_NAME, {"type": "null"}, {"type": "array", "maxItems": MAX_JOB_ADAPTERS, "items": {
            "anyOf": [_ADAPTER_NAME,
                      {"type": "array", "prefixItems": [_ADAPTER_NAME, _LORA_SCALE], "minItems": 2, "maxItems": 2},
                      {"type": "object", "properties": {"name": _ADAPTER_NAME, "scale": _LORA_SCALE},
                       "required": ["name"]}]}}],
                 "default": [], "description": "the account's adapters (GET /adapters) applied for this job: a name, "
                                              "or a list of names, [name, scale] pairs or {name, scale} objects"},
    }
    assert set(props) == set(GenerationParams.model_fields), "the wire's params schema must list every field"
    return {"type": "object", "title": "GenerationParams", "properties": props, "required": ["prompt"],
            "additionalProperties": False}


PARAMS_SCHEMA = _params_schema()
_NAME = {"type": "string", "pattern": f"^{NAME_RE.pattern}$"}
_TAGS = {"type": "array", "maxItems": MAX_TAGS, "items": {"type": "string", "minLength": 1, "maxLength": MAX_TAG_CHARS}}
_SEED = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": SEED_MAX}, {"type": "null"}]}
_PRIORITY = {"type": "integer", "minimum": PRIORITY_MIN, "maximum": PRIORITY_MAX, "default": 0}


def _loose(schema: dict[str, Any], python: Any = Any) -> Any:
    """A field read as it comes (its validator runs later, with its own messages) but shown with `schema`."""
    return Annotated[python, WithJsonSchema(schema)]


class GenerateRequest(BaseModel):
    """POST /generate. The account is never taken from a body: the token decides it."""

    model_config = ConfigDict(extra="forbid")

    params: _loose(PARAMS_SCHEMA, dict[str, Any])
    priority: _loose(_PRIORITY) = 0
    tags: _loose(_TAGS) = Field(default_factory=list)
    experiment: _loose({"anyOf": [_NAME, {"type": "null"}], "default": None}) = None
    idempotency_key: _loose({"anyOf": [{"type": "string", "minLength": 1, "maxLength": MAX_KEY_CHARS},
                                       {"type": "null"}], "default": None}) = None
    reuse: StrictBool = Field(True, description="answer an identical earlier job (same params and options) "
                                                "instead of queueing a new one")


class ScaleRequest(BaseModel):
    """POST /workers/scale (admins): the pool's size."""

    model_config = ConfigDict(extra="forbid")

    n: _loose({"type": "integer", "minimum": 0, "maximum": 1024})


class SweepRequest(BaseModel):
    """POST /experiments/{name}/sweep: every prompt x seed x listed value of `params`, one run each."""

    model_config = ConfigDict(extra="forbid")

    prompts: _loose({"anyOf": [{"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS},
                               {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1,
                                                                          "maxLength": MAX_PROMPT_CHARS}}]})
    seeds: _loose({"anyOf": [_SEED, {"type": "array", "minItems": 1, "items": _SEED}], "default": None,
                   "description": "null: one seed per run, derived from the experiment's name and the params"}) = None
    params: _loose({"type": "object", "propertyNames": {"enum": [f for f in GenerationParams.model_fields
                                                                 if f not in ("prompt", "seed")] + list(SWEEP_ONLY)},
                    "description": "GenerationParams fields besides prompt and seed, and lora_scale (the scale of "
                                   "every adapter a run's lora names); a list sweeps its values"},
                   dict[str, Any]) = Field(default_factory=dict)
    priority: _loose(_PRIORITY) = 0


# -- answers --------------------------------------------------------------------------------------------
HIDDEN_FIELDS = ("fence", "lease_expires_at")  # the store's fencing internals


class JobArtifacts(BaseModel):
    """A done job's files, as routes relative to the gateway (`download/<id>`), never server paths."""

    video: str | None = Field(None, description="GET download/{id}: the MP4")
    thumbnail: str | None = Field(None, description="GET thumbnail/{id}: a PNG")


class Job(BaseModel):
    """A job as a client sees it (`job_json`)."""

    id: str = Field(pattern=f"^{JOB_ID_RE.pattern}$")
    account: str
    params: dict[str, Any] = Field(description="the GenerationParams it was queued with (seed drawn if null)")
    status: Literal[STATUSES]  # type: ignore[valid-type]
    stage: str
    step: int
    total_steps: int
    message: str
    live: dict[str, Any] = Field(description="the running attempt's elapsed_s, eta_s, rate, preview_step")
    priority: int
    attempts: int
    experiment: str | None
    tags: list[str]
    idempotency_key: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    worker_id: str | None
    cancel_requested: bool
    artifacts: JobArtifacts
    timings: dict[str, float]
    meta: dict[str, Any]
    error: str | None
    traceback: str | None


assert set(Job.model_fields) == {f.name for f in dataclasses.fields(JobRecord)} - set(HIDDEN_FIELDS), \
    "the wire's Job must list every JobRecord field it shows"


def job_json(record: JobRecord) -> dict[str, Any]:
    """The record as the client may see it (`Job`): no fencing internals, artifacts as route names only."""
    data = dataclasses.asdict(record)
    for name in HIDDEN_FIELDS:
        data.pop(name, None)
    data["artifacts"] = {name: artifact_url(name, record.id) for name in ARTIFACT_ROUTES
                         if name in (record.artifacts or {})}
    return data


class Adapter(BaseModel):
    """A LoRA adapter of the caller's account (PUT /adapters/{name} answers it, GET /adapters lists them)."""

    name: str = Field(pattern=f"^{NAME_RE.pattern}$")
    sha256: str = Field(description="of the file: a job's params and provenance name it")
    bytes: int
    model: str = Field(description="the model whose transformer it was checked against")
    rank: int = Field(description="its largest LoRA rank")
    modules: int = Field(description="how many of the transformer's Linear layers it changes")
    dtypes: list[str]
    created_at: float


class Whoami(BaseModel):
    account: str
    admin: bool


class Ok(BaseModel):
    ok: Literal[True]


class QueueRow(BaseModel):
    """A queued job, in the order workers take them: another account's by place and size only."""

    position: int
    mine: bool
    account: str | None = Field(description="for admins and the caller's own")
    id: str | None = Field(description="for admins and the caller's own")
    prompt: str | None = Field(description="the caller's own only")
    model: str | None
    width: int | None
    height: int | None
    num_frames: int | None
    steps: int | None
    priority: int
    created_at: float


class WorkerRow(BaseModel):
    """A worker as any account sees it; admins get its node, pid, memory, errors and stats as well."""

    model_config = ConfigDict(extra="allow")

    worker_id: str
    state: str
    current_job: str | None = Field(None, description="where the job is the caller's (any, for admins)")
    mine: bool = False


__all__ = [
    "ARTIFACT_ROUTES",
    "Adapter",
    "ERRORS",
    "ERROR_CONTENT",
    "HTML_CONTENT",
    "JOBS_LIMIT_MAX",
    "KIND_OF_STATUS",
    "PARAMS_SCHEMA",
    "RAISED_FOR_KIND",
    "RAISED_FOR_STATUS",
    "ErrorBody",
    "GenerateRequest",
    "Job",
    "JobArtifacts",
    "Ok",
    "QueueRow",
    "ScaleRequest",
    "SweepRequest",
    "Whoami",
    "WireError",
    "WorkerRow",
    "artifact_url",
    "at",
    "error_of",
    "errors",
    "job_json",
    "url",
]
