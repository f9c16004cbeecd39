"""The gateway's OpenAPI document: committed (tests/gateway/openapi.json), and held to by the real app.

* The document the app serves is the committed one. After a deliberate change of a route, a body or an
  answer, write the new one with:  MOCHI_LAB_UPDATE_OPENAPI=1 python -m pytest tests/gateway/test_openapi.py
* Schemathesis (an OpenAPI client of its own) calls every route of the real app, with an admin's static
  token, over a store of its own with no pool: no answer may be a 5xx, nor have a status, a content type, a
  header or a body its operation does not document, nor take a request the document says is invalid. (That a
  schema-valid request may be refused is not checked: which models the pool serves, a prompt's 256 tokens
  and the pool's admission limit are the server's to decide at run time, and they answer 422.)
* The wire (`mochi_lab.gateway.wire`) is what both ends use: every route it names is served, every API route
  served is named there, and each row of its error table is the status the server answers and the exception
  the client raises.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import positive_data_acceptance

from mochi_lab.gateway import wire

SNAPSHOT = Path(__file__).with_name("openapi.json")
UPDATE = "MOCHI_LAB_UPDATE_OPENAPI"
TOKEN = "schemathesis-admin-token-0123456789"
EXAMPLES = 25  # per operation; about 30 s for all of them on a 2-core machine


def _app(tmp_path, **config):
    from mochi_lab.client.direct import DirectBackend
    from mochi_lab.config import GatewayConfig, Settings
    from mochi_lab.gateway.app import create_app
    from mochi_lab.gateway.auth import hash_token
    from mochi_lab.store import open_store

    settings = Settings(data_dir=tmp_path, account="sam")
    store = open_store(settings.store_url)
    gateway = GatewayConfig(static_tokens={hash_token(TOKEN): {"account": "sam", "admin": True}}, **config)
    return create_app(settings, backend_factory=lambda: DirectBackend(settings, store, None), config=gateway), store


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    app, store = _app(tmp_path_factory.mktemp("openapi"), max_active_jobs=5)
    yield app
    store.close()


def test_the_served_document_is_the_committed_one(app):
    served = json.dumps(app.openapi(), indent=2, sort_keys=True) + "\n"
    if os.environ.get(UPDATE):
        SNAPSHOT.write_text(served)
    committed = SNAPSHOT.read_text() if SNAPSHOT.exists() else ""
    assert served == committed, (f"the gateway's OpenAPI document differs from {SNAPSHOT.name}: if the change is "
                                 f"meant, write it with  {UPDATE}=1 python -m pytest {Path(__file__).name}")


def test_the_document_types_every_body_and_answer(app):
    doc = app.openapi()
    schemas = doc["components"]["schemas"]
    params = schemas["GenerateRequest"]["properties"]["params"]
    assert params["properties"]["num_frames"]["enum"][:3] == [1, 7, 13] and params["additionalProperties"] is False
    assert params["properties"]["width"] == {"type": "integer", "minimum": 16, "maximum": 1280, "multipleOf": 16,
                                             "default": 848}
    assert set(schemas["Job"]["required"]) >= {"id", "status", "params", "artifacts"}
    assert "HTTPValidationError" not in schemas  # FastAPI's own 422 body: the gateway answers an ErrorBody
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            for status, answer in op["responses"].items():
                if status.startswith(("4", "5")):
                    assert answer["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/ErrorBody"}, (method, path, status)
                elif status in ("200", "201") and path not in ("/", "/login", "/logout"):
                    assert answer.get("content"), f"{method.upper()} {path} {status} has no content type"


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(scope="module")
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.explicit, Phase.generate], derandomize=True,
          suppress_health_check=list(HealthCheck), database=None)
def test_schemathesis_finds_no_server_error_and_no_conformance_failure(case):
    case.call_and_validate(headers={"Authorization": f"token {TOKEN}"}, excluded_checks=[positive_data_acceptance])


# -- the wire: one spelling of each route, one table of errors ---------------------------------------------------
def _wire_routes() -> set[tuple[str, str]]:
    return {v for k, v in vars(wire).items() if k.isupper() and isinstance(v, tuple) and len(v) == 2
            and isinstance(v[0], str) and v[0] in ("GET", "POST", "PUT", "DELETE")}


def test_the_wire_names_every_api_route_and_the_app_serves_each(app):
    served = {(m, path) for path, ops in app.openapi()["paths"].items() for m in (o.upper() for o in ops)}
    web = {("GET", "/"), ("GET", "/login"), ("POST", "/login"), ("GET", "/logout"), ("POST", "/logout")}
    assert _wire_routes() == served - web
    assert wire.url(wire.JOBS, account="a b/c") == "jobs/a%20b%2Fc"


@pytest.fixture(scope="module")
def raising(tmp_path_factory):
    """A gateway (on uvicorn) with one more route, which raises the exception its path names: the real app's
    handler answers it, and the real client reads the answer."""
    from tests.support.hub_fixtures import Gateway
    from tests.support.ports import free_port

    app, store = _app(tmp_path_factory.mktemp("wire"))
    rows = {row.exception.__name__: row for row in wire.ERRORS}

    @app.get("/raise/{name}")
    def raise_(name: str):
        if name == "bug":
            raise RuntimeError("a bug, its text never shown: /srv/secret/path")
        raise rows[name].exception(f"{name} raised behind the gateway")

    gw = Gateway(app, free_port()).start()
    yield gw, rows
    gw.stop()
    store.close()


@pytest.mark.parametrize("name", [row.exception.__name__ for row in wire.ERRORS])
def test_each_error_of_the_table_is_its_status_and_the_client_raises_it_again(raising, name):
    from mochi_lab.client.http import GatewayBackend

    gw, rows = raising
    row = rows[name]
    with gw.client(TOKEN) as c:
        r = c.get(f"/raise/{name}")
    assert (r.status_code, r.json()["error"]) == (row.status, row.kind)
    client = GatewayBackend(gw.url, TOKEN)
    try:  # a 404 raises what the route says a missing thing is (a job's: JobNotFound)
        missing = row.raised_as if row.status == 404 else None
        with pytest.raises(row.raised_as):
            client.http.request(*wire.at(("GET", "/raise/{name}"), name=name), not_found=missing)
    finally:
        client.close()


def test_anything_else_is_a_500_with_no_detail_and_GatewayError_on_the_client(raising):
    from mochi_lab.client.http import GatewayBackend, GatewayError

    gw, _ = raising
    client = GatewayBackend(gw.url, TOKEN)
    try:
        with pytest.raises(GatewayError, match="answered 500 internal: internal error$") as exc:
            client.http.request(*wire.at(("GET", "/raise/{name}"), name="bug"))
        assert exc.value.status == 500 and "secret" not in str(exc.value)
    finally:
        client.close()


def test_a_body_over_its_limit_is_RecordTooLarge_on_the_client(raising):
    from mochi_lab.client.http import GatewayBackend
    from mochi_lab.model import RecordTooLarge

    gw, _ = raising
    client = GatewayBackend(gw.url, TOKEN)
    try:
        with pytest.raises(RecordTooLarge, match="is at most 1048576 bytes"):
            client.put_experiment({"name": "big", "description": "x" * (2 << 20)})
    finally:
        client.close()


def _answer_schema(doc: dict, method: str, template: str, status: int) -> dict:
    content = doc["paths"][template][method.lower()]["responses"][str(status)]["content"]
    return {**content["application/json"]["schema"], "components": doc["components"]}


def test_a_pool_with_workers_and_a_done_job_answers_as_the_committed_document_says(gateway, tokens):
    """What the store-only app above cannot show: live worker rows (an admin's whole ones too), a done job's
    artifacts and timings, every experiment the session's tests left, checked against the committed document."""
    from jsonschema import Draft202012Validator

    from tests.support.backends import unique
    from tests.support.jobkit import TINY

    doc = json.loads(SNAPSHOT.read_text())
    with gateway.client(tokens["alice"]) as alice, gateway.client(tokens["carol"]) as carol:
        r = alice.post("/generate", json={"params": {"prompt": unique("a wire of gold"), **TINY}, "tags": ["w"]})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 180
        while (job := alice.get(f"/status/{job_id}").json())["status"] not in ("done", "failed", "cancelled"):
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
        assert job["status"] == "done" and job["artifacts"] == {"video": f"download/{job_id}",
                                                                "thumbnail": f"thumbnail/{job_id}"}
        for client, (method, template), path, params in (
                (alice, wire.STATUS, f"/status/{job_id}", None), (alice, wire.JOBS, "/jobs/alice", {"limit": 20}),
                (alice, wire.WORKERS, "/workers/status", None), (carol, wire.WORKERS, "/workers/status", None),
                (carol, wire.QUEUE, "/queue", None), (alice, wire.COUNTS, "/counts", None),
                (alice, wire.MODELS, "/models", None), (carol, wire.WHOAMI, "/whoami", None),
                (alice, wire.EXPERIMENTS, "/experiments", None), (alice, wire.HEALTHZ, "/healthz", None)):
            r = client.request(method, path, params=params)
            assert r.status_code == 200, (path, r.text)
            Draft202012Validator(_answer_schema(doc, method, template, 200)).validate(r.json())
        r = alice.get(f"/status/{'0' * 11}-{'0' * 12}")
        Draft202012Validator(_answer_schema(doc, "GET", wire.STATUS[1], 404)).validate(r.json())
