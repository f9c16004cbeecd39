"""No value from the store reaches a page as markup: every view, every field, hostile types included.

Pure rendering: records are built directly (the store is a trust boundary, so each field may hold
markup, and a string where a number belongs); handles are the fakes in fakes.py. `assert_safe` parses
each HTML fragment as a browser would and allows only the elements and attributes the templates emit,
and checks the hostile value was shown (escaped), not silently dropped.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

import ipywidgets as W
import pytest

from mochi_lab import ParamsError
from mochi_lab.display import notes, reprs
from mochi_lab.display.widgets import ClusterPanel, History, HistoryRow, JobCard, Studio, workers_html
from tests.support.fakes import (
    ALL,
    DOUBLE,
    MARKUP,
    PAYLOADS,
    SINGLE,
    FakeCluster,
    FakeJob,
    assert_safe,
    hostile_record,
    record,
)

ROOT = Path(__file__).resolve().parents[2]
NOOP = {"play": lambda j: None, "rerun": lambda j: None, "delete": lambda j: None}

# Where each job field lives, as record() overrides that put `v` there and nowhere else.
JOB_FIELDS = {
    "id": lambda v: {"id": v},
    "status": lambda v: {"status": v},
    "stage": lambda v: {"stage": v},
    "step": lambda v: {"step": v},
    "total_steps": lambda v: {"total_steps": v},
    "attempts": lambda v: {"attempts": v},
    "experiment": lambda v: {"experiment": v},
    "tags": lambda v: {"tags": ["ok", v]},
    "worker_id": lambda v: {"worker_id": v, "meta": {"worker_id": None}},
    "meta.worker_id": lambda v: {"meta": {"worker_id": v}},
    "error": lambda v: {"error": v},
    "traceback": lambda v: {"error": "boom", "traceback": v},
    "artifacts.video": lambda v: {"artifacts": {"video": v}},
    **{f"params.{k}": (lambda k: lambda v: {"params": {k: v}})(k)
       for k in ("prompt", "negative_prompt", "width", "height", "num_frames", "num_inference_steps", "seed",
                 "guidance_scale", "fps", "model")},
    "params.lora": lambda v: {"params": {"lora": [{"name": "ok", "scale": 1.0}, {"name": v, "scale": v}]}},
    "params.lora (not a list)": lambda v: {"params": {"lora": v}},
    **{f"timings.{k}": (lambda k: lambda v: {"timings": {k: v}})(k)
       for k in ("queue_s", "load_s", "denoise_s", "decode_s", "encode_s", "run_s")},
}
CARD_HEADER_FIELDS = ["id", "status", "params.prompt", "params.width", "params.height", "params.num_frames",
                      "params.num_inference_steps", "params.seed", "params.model", "params.lora"]
HISTORY_FIELDS = CARD_HEADER_FIELDS + ["experiment", "timings.run_s"]
WORKER_FIELDS = ["worker_id", "node", "gpu_name", "device", "gpu_memory_used", "gpu_memory_total", "rss_bytes", "model",
                 "state", "error", "current_job", "jobs_done", "uptime_s"]
WORKER = {"worker_id": "w-1", "node": "n-1", "gpu_name": "H100", "gpu_memory_used": 2**30,
          "gpu_memory_total": 80 * 2**30, "model": "tiny", "state": "idle", "error": None, "current_job": None,
          "jobs_done": 3, "uptime_s": 12.0}


# -- reprs: job, cluster, badge, error ---------------------------------------------------------------
@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("status", ["running", "failed", "done", None])
def test_job_html_with_markup_in_every_field(payload, status):
    r = hostile_record(payload) if status is None else hostile_record(payload, status=status)
    assert_safe(reprs.job_html(r), payload)
    assert_safe(reprs.job_html(dataclasses.asdict(r)), payload)  # a mapping renders the same way


@pytest.mark.parametrize("where", sorted(JOB_FIELDS))
@pytest.mark.parametrize("payload", [MARKUP, DOUBLE, SINGLE])
def test_job_html_shows_each_field_escaped(where, payload):
    html = reprs.job_html(record(**JOB_FIELDS[where](payload)))
    assert_safe(html, payload)


def test_job_html_takes_wrong_types_without_crashing():
    r = record(params=MARKUP, timings=[MARKUP], meta=MARKUP, artifacts=MARKUP, tags=MARKUP, step=[MARKUP],
               total_steps={"x": MARKUP}, attempts=float("nan"), created_at=MARKUP)
    assert_safe(reprs.job_html(r), MARKUP)  # the tags string is shown; the rest just must not break out
    assert "nan" in reprs.job_html(r)
    assert_safe(reprs.job_html(object()), None)  # nothing at all: every field missing
    assert_safe(reprs.job_html(record(step=True)), None)


def test_a_jobs_adapters_and_scales_are_shown_in_its_view_its_card_and_its_history_row(tmp_path):
    lora = [{"name": "style", "scale": 0.8, "sha256": "a" * 64}, {"name": "grain", "scale": -0.25, "sha256": "b" * 64}]
    shown = '&middot; LoRA <span class="mochi-lora">style \u00d70.8, grain \u00d7-0.25</span>'
    with_lora = record(params={"lora": lora}, status="done", stage="done")
    views = {"job": reprs.job_html(with_lora),
             "history": HistoryRow(FakeJob(with_lora), None, NOOP).info.value,
             "card": JobCard(FakeJob(with_lora), download_dir=tmp_path).header.value}
    for where, html in views.items():
        assert shown in html, where
        assert_safe(html)
    assert "LoRA" not in reprs.job_html(record()) and "LoRA" not in HistoryRow(FakeJob(record()), None, NOOP).info.value


def test_job_html_formats_real_numbers():
    html = reprs.job_html(record(step=1, total_steps=2))
    assert '<progress class="mochi-bar" value="0.500" max="1"' in html and "denoising 1/2" in html
    assert "32x32 &middot; 7 frames &middot; 2 steps &middot; seed 1 &middot; model tiny" in html
    # the timings once, on one line, in stage order, each formatted; the total last
    assert "queue 0.1 s &middot; load 0.0 s &middot; denoise 1.0 s &middot; decode 0.2 s &middot; encode 0.1 s " \
           "&middot; total 1.4 s" in html and "&#9654; j-1.mp4" in html
    hostile = reprs.job_html(record(step=MARKUP))
    assert "<progress" not in hostile and "&lt;img" in hostile  # no bar from a value that is not a number


@pytest.mark.parametrize("payload", PAYLOADS)
def test_job_notes_and_media_are_text(payload):
    """Notes (a lost worker, the queue), the stopped step and the media block escape what they quote,
    and a src/href that mochi_lab did not build (a stored or hostile value) never reaches an attribute."""
    html = reprs.job_html(record(status="cancelled", stage="cancelled", step=3, total_steps=9, started_at=1.0),
                          notes=[payload, f"worker lost at {payload}"],
                          media={"href": payload, "thumbnail": payload, "name": payload, "note": payload})
    scan = assert_safe(html, payload)
    assert "stopped at denoising step 3/9" in scan.text and "worker lost at " + payload in scan.text
    assert not any(name in ("src", "poster", "href") for name, _ in scan.attrs)  # none of these URIs is ours
    ok = reprs.job_html(record(status="done", stage="done"), media={"href": "./v/j-1.mp4", "name": payload,
                                                                    "thumbnail": "data:image/jpeg;base64,AAAA"})
    attrs = assert_safe(ok, payload).attrs
    assert ("src", "./v/j-1.mp4") in attrs and ("poster", "data:image/jpeg;base64,AAAA") in attrs
    assert ("download", payload) in attrs


@pytest.mark.parametrize("payload", PAYLOADS)
def test_queue_note_and_retry_lines_take_any_value(payload):
    assert notes.queue_note({"position": payload, "queued": payload}) is None  # not a number: no place to show
    line = notes.queue_note({"position": 2, "queued": payload, "eta_s": payload, "workers": payload})
    assert line == "next in the queue"  # a count that is not a number is no count
    tracker = notes.RetryTracker()
    for r in (record(status="running", stage=payload, attempts=1), record(status="queued", stage="queued", attempts=1)):
        tracker.observe(r)
    (note,) = tracker.notes(record(status="queued", attempts=1))
    assert_safe(reprs.render("_macros.html", "notes", lines=[note]), payload)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_cluster_html_escapes_every_field(payload):
    keys = ("backend", "address", "store", "account", "model")  # the pool's live figures: below
    assert_safe(reprs.cluster_html({k: payload for k in keys}), payload)
    for key in keys:
        info = {"backend": "direct", "address": "127.0.0.1:6379", "store": "sqlite /x", "account": "alice",
                "model": "tiny", "workers": "4", key: payload}
        assert_safe(reprs.cluster_html(info), payload)
    rows = [{"state": payload, "gpu_name": payload, "device": payload, "model": payload}, {"state": "idle"}]
    assert_safe(reprs.cluster_html({}, workers=rows, queue=[{"mine": payload}], dashboard=payload, error=payload),
                payload)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_badge_and_error_escape(payload):
    assert_safe(reprs.status_badge(payload), payload)
    assert_safe(reprs.error_html(payload, payload), payload)
    assert "&lt;" in reprs.error_html("<x>") and "traceback" not in reprs.error_html("e")


def test_video_widget_takes_bytes_and_any_size():
    v = reprs.video_widget(b"mp4", 32, 32)
    assert isinstance(v, W.Video) and v.format == "mp4" and v.value == b"mp4" and v.loop and v.autoplay
    assert (v.width, v.height) == ("256", "256")  # scaled up to MIN_VIDEO_PX
    assert (reprs.video_widget(b"", 848, 480).width, reprs.video_widget(b"", 848, 480).height) == ("848", "480")
    assert reprs.video_widget(b"", MARKUP, None).width == str(reprs.MIN_VIDEO_PX)  # a hostile size: a default
    box = reprs.job_widget(hostile_record(MARKUP, status="done"), v)
    assert isinstance(box, W.VBox) and box.children[1] is v
    assert_safe(box.children[0].value, MARKUP)


# -- widgets -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("status", ["running", "queued", "failed", "cancelled", None])
def test_job_card_with_markup_in_every_field(payload, status, tmp_path):
    r = hostile_record(payload) if status is None else hostile_record(payload, status=status)
    card = JobCard(FakeJob(r), download_dir=tmp_path)
    assert_safe(card.header.value, payload if len(payload) < 80 else None)
    assert_safe(card.stage.value, payload if status != "queued" else None)  # queued: the badge says it all
    assert (card.stage.value == "") == (status == "queued")
    assert_safe(card.error.value, payload if status == "failed" else None)
    assert isinstance(card.bar.value, float) and card.bar.max == 1.0
    card.poll()
    card.cancel()
    for html in (card.header.value, card.stage.value, card.error.value, card.notes.value, card.timings.value,
                 card.static_html()):
        assert_safe(html, None)


def _widgets(w: W.Widget):
    yield w
    for child in getattr(w, "children", ()):
        yield from _widgets(child)


def test_a_card_with_a_preview_renders_in_the_browser(tmp_path):
    """@jupyter-widgets/controls reads `description.length` whenever a view's tooltip is set
    (DOMWidgetView.updateTooltip), so a tooltip on a widget without a description (an Image) makes its view
    fail in JupyterLab ("Failed to create view for 'ImageView'"): no widget of a card may have one."""
    job = FakeJob(record(live={"preview_step": 1}))
    job.preview = b"RIFF\x00\x00\x00\x00WEBPVP8 "
    card = JobCard(job, download_dir=tmp_path)
    card.poll()
    assert card.preview.value == job.preview and card.preview.layout.display is None  # the preview is shown
    offenders = [type(w).__name__ for w in _widgets(card) if w.tooltip and not w.has_trait("description")]
    assert offenders == []


@pytest.mark.parametrize("payload", PAYLOADS)
def test_job_card_of_a_done_hostile_job_links_its_video_safely(payload, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the kernel's cwd is the notebook's folder; links are relative to it
    job = FakeJob(hostile_record(payload, status="done"))
    card = JobCard(job, download_dir=Path("videos"))
    assert card.video is not None and card.thumbnail is None  # the video plays: no thumbnail beside it
    link = card.download_html
    assert card.download.outputs[0]["data"]["text/html"] == link  # rendered by the front end, which resolves it
    scan = assert_safe(link, payload)
    href = dict(scan.attrs)["href"]
    assert href.startswith("./") and all(c not in href for c in "<>\"' :")  # percent-encoded, no scheme
    assert (tmp_path / "videos" / f"{payload}.mp4").read_bytes() == job._video
    static = card.static_html()  # the notebook file's copy: the same link, the payload as text
    assert dict(assert_safe(static, payload).attrs)["href"] == href


def test_job_card_link_cannot_become_a_javascript_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = FakeJob(record(id="javascript:alert(1)//", status="done", stage="done"))
    card = JobCard(job, download_dir=Path("."))
    href = dict(assert_safe(card.download_html).attrs)["href"]
    assert href.startswith("./javascript%3Aalert") and card.link == Path("javascript:alert(1)__.mp4")


@pytest.mark.parametrize("where", CARD_HEADER_FIELDS)
def test_job_card_header_shows_each_field_escaped(where, tmp_path):
    card = JobCard(FakeJob(record(**JOB_FIELDS[where](MARKUP))), download_dir=tmp_path)
    assert_safe(card.header.value, MARKUP)


@pytest.mark.parametrize("where", ["stage", "step"])
def test_job_card_stage_shows_each_field_escaped(where, tmp_path):
    fields = {"stage": {"stage": MARKUP}, "step": {"stage": "denoising", "step": MARKUP}}[where]
    card = JobCard(FakeJob(record(**fields)), download_dir=tmp_path)
    assert_safe(card.stage.value, MARKUP)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_history_row_with_markup_in_every_field(payload):
    for status in ("done", "failed", payload):
        row = HistoryRow(FakeJob(hostile_record(payload, status=status)), None, NOOP)
        assert_safe(row.info.value, payload)
        assert_safe(row.thumbnail.value, None)  # the placeholder


@pytest.mark.parametrize("where", HISTORY_FIELDS + ["created_at"])
def test_history_row_shows_each_field_escaped(where):
    fields = {"created_at": MARKUP} if where == "created_at" else JOB_FIELDS[where](MARKUP)
    row = HistoryRow(FakeJob(record(**fields)), None, NOOP)
    assert_safe(row.info.value, MARKUP)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_history_browser_escapes_jobs_errors_and_captions(payload, tmp_path):
    done = FakeJob(hostile_record(payload, status="done"))
    broken = FakeJob(record(id=payload, status="done", stage="done"), video=None)
    cluster = FakeCluster(jobs=[done, broken], experiments=[payload])
    history = History(cluster, download_dir=tmp_path)
    assert history.experiment.options == (payload,)  # options are text (DOM textContent), never HTML
    for row in history.rows:
        assert_safe(row.info.value, None)
    history.play(done)
    assert_safe(history.player.children[0].children[0].value, payload)  # the caption beside Close
    history.play(broken)  # the backend's error, which quotes the id, is text
    assert_safe(history.error.value, payload)
    cluster.fail = RuntimeError(payload)
    history.refresh()
    assert_safe(history.error.value, payload)
    cluster.fail = None
    cluster._jobs = []
    history.refresh()
    assert "no jobs match" in history.table.children[0].value


@pytest.mark.parametrize("payload", PAYLOADS)
def test_cluster_panel_with_markup_in_every_worker_field(payload):
    rows = [{k: payload for k in WORKER_FIELDS}, {**WORKER, "gpu_memory_total": None, "rss_bytes": payload}]
    cluster = FakeCluster(workers=rows, counts={payload: payload, "done": 3})
    panel = ClusterPanel(cluster)
    assert_safe(panel.table.value, payload)
    assert_safe(panel.counts.value, payload)
    assert "done <b>3</b>" in panel.counts.value


@pytest.mark.parametrize("where", WORKER_FIELDS)
@pytest.mark.parametrize("payload", [MARKUP, DOUBLE, SINGLE])
def test_worker_table_shows_each_field_escaped(where, payload):
    row = {**WORKER, where: payload}
    if where in ("gpu_name", "device"):
        row.pop("gpu_name")  # device shows only without a GPU name
        row["device"] = payload
    if where == "rss_bytes":
        row["gpu_memory_total"] = None  # RSS shows only without GPU memory
    html = workers_html([row])
    scan = assert_safe(html, payload)
    if where == "error":  # the tooltip: a quoted attribute the payload must not leave
        assert (("title", payload)) in scan.attrs


def test_worker_table_takes_rows_that_are_not_mappings():
    html = workers_html([MARKUP, None, ["x"]])
    assert_safe(html, None)
    assert html.count("<tr>") == 4  # the header and three rows of dashes


def test_cluster_panel_errors_are_text():
    cluster = FakeCluster(workers=[WORKER])
    panel = ClusterPanel(cluster)
    cluster.fail = RuntimeError(MARKUP)
    panel.refresh()
    assert_safe(panel.message.value, MARKUP)
    panel.scale(2)  # no running loop: runs at once, and the failure is shown
    assert_safe(panel.message.value, MARKUP)
    assert not panel.scale_button.disabled


@pytest.mark.parametrize("payload", PAYLOADS)
def test_studio_errors_and_notices_are_text(payload, tmp_path):
    cluster = FakeCluster(models=["tiny", payload], workers=[{"worker_id": "w-0", "state": "idle", "model": payload},
                                                             {"worker_id": "w-1", "state": "idle", "model": "tiny"}])
    studio = Studio(cluster, prompt="a kite", download_dir=tmp_path)
    assert payload in studio.model.options  # options are text, not HTML
    cluster.fail = RuntimeError(payload)
    assert studio.submit() is None
    assert_safe(studio.error.value, payload)
    cluster.fail = None
    cluster.next_job = FakeJob(hostile_record(payload, status="running"))
    studio.submit()
    assert_safe(studio.cards[0].header.value, payload if len(payload) < 80 else None)
    studio.submit()  # the same job again: the reuse notice quotes its id
    assert_safe(studio.error.value, payload)
    assert "reused" in studio.error.value and len(studio.cards) == 1
    assert_safe(studio.static_html(), payload)  # the notebook file's stand-in
    cluster.fail = ParamsError(f"invalid generation parameters:\n  prompt: {payload}\n  {payload}: {payload}")
    studio.submit()  # the backend's own refusal: each line by its field, the rest below the form
    assert_safe(studio.field_errors["prompt"].value, payload)
    assert_safe(studio.error.value, payload)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_experiment_grid_parts_escape(payload):
    assert_safe(reprs.render("experiment_grid.html", "label", label=payload, title=payload), payload)
    assert_safe(reprs.render("experiment_grid.html", "status", status=payload), payload)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_experiment_compare_grid_carries_labels_and_statuses_as_text(payload):
    """The grid is drawn in the browser from plain strings, which its script sets as text only."""
    from mochi_lab.display.compare import _COMPARE_ESM, compare_grid
    from mochi_lab.sweep import Run

    runs = [Run(payload, {"prompt": payload, "seed": 1}), Run("b", {"prompt": "x", "seed": 2})]
    jobs = {payload: hostile_record(payload), "b": None}
    grid = compare_grid(runs, jobs, video=lambda job_id: b"")
    assert grid.row_labels == [payload[:59] + "…" if len(payload) > 60 else payload, "x"]
    assert {c["status"] for c in grid.cells} == {payload, "missing"} and grid.videos == []
    assert json.loads(grid.cells[0]["title"])["prompt"] == payload  # the tooltip: the run's params
    # the only ways a string reaches the page: textContent, a title, a dataset value
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|DOMParser", _COMPARE_ESM)


# -- no HTML by string formatting in the view code ----------------------------------------------------
# reprs and the modules it is built on (a record's values as text, the progress, the notes), and the widgets
VIEWS = ("reprs", "values", "progress", "notes")
VIEW_FILES = [*(ROOT / "mochi_lab" / "display" / f"{name}.py" for name in VIEWS),
              *sorted((ROOT / "mochi_lab" / "display" / "widgets").glob("*.py"))]


TAG = re.compile(r"<\s*[A-Za-z/!]")
HEX = re.compile(r"(?<![&\w])#[0-9a-fA-F]{3,8}\b")


@pytest.mark.parametrize("path", VIEW_FILES, ids=lambda p: p.name)
def test_view_code_builds_no_html_from_strings(path):
    """Markup lives in the templates: no string in the view code (f-string, %-format, concatenation) writes a tag."""
    source = path.read_text()
    tree = ast.parse(source)
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            assert not TAG.search(node.value), f"{path.name}:{node.lineno}: HTML in a string: {node.value!r}"
    assert "import html" not in source  # escaping is the templates' job, not html.escape's
    # colours are JupyterLab's CSS variables; a literal colour only as a var() fallback
    for m in HEX.finditer(source):
        assert re.search(r"var\(--jp-[a-z0-9-]+, $", source[: m.start()]), f"{path.name}: bare colour {m.group()}"


@pytest.mark.parametrize("name", VIEWS)
def test_reprs_is_a_leaf(name):
    """reprs and the modules it is built on import nothing of mochi_lab but one another."""
    tree = ast.parse((ROOT / "mochi_lab" / "display" / f"{name}.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    ours = {f"mochi_lab.display.{view}" for view in VIEWS}
    assert not {m for m in imported if m and m.startswith("mochi_lab") and m not in ours}


WEB_PAGES = {"page.html", "login.html"}


def test_templates_autoescape_and_mark_nothing_safe():
    folder = ROOT / "mochi_lab" / "display" / "templates"
    for t in folder.glob("*.html"):
        source = t.read_text()
        assert "|safe" not in source.replace(" ", "") and "autoescape false" not in source, t.name
        if t.name in WEB_PAGES:  # the gateway's own pages: no JupyterLab theme to follow there
            continue
        assert not HEX.search(source), f"{t.name}: a literal colour (use the theme variables in reprs)"
    assert reprs._env().autoescape is True
    assert ALL in assert_safe(reprs.render("cluster_panel.html", "notice", message=ALL)).text
