"""The gateway's web page (`GET /`) in Debian's headless Chromium through Playwright.

Signed in at the real hub (OAuth: the hub's login form, then back with a server-side session), a user
queues a video with the page's own form, watches its progress arrive, plays it through the gateway and
downloads it; another user's session shows only theirs; a sign-in or sign-out from another site, or a
sign-in code from another browser, is refused; signing out ends the session on the server, and so does
signing out of the hub. On a gateway without a hub (static tokens, the token form): markup in every
field stays text, another user sees none of it, a form from elsewhere cannot write. /docs renders with
nothing from outside 127.0.0.1. Screenshots go to artifacts/browser/ (ignored by git).
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from mochi_lab.gateway.auth import hash_token
from mochi_lab.gateway.web import CSRF_HEADER, SESSION_COOKIE
from tests.support.hub_fixtures import Gateway
from tests.support.jobkit import TINY
from tests.support.ports import free_port

pytestmark = pytest.mark.usefixtures("chromium")

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts" / "browser"
CHROMIUM = "/usr/bin/chromium"  # Debian's build; Playwright's own browsers are never downloaded
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
FINISHED = ("done", "failed", "cancelled")

IMG = "<img src=x onerror=alert(1)>"
SCRIPT = '"><script>window.__pwned=1</script>'

# Before any page script: every preview picture the page loaded, with its size, however briefly shown.
RECORD_PREVIEWS = """
window.__previews = [];
document.addEventListener("load", (e) => {
  const img = e.target;
  if (img.tagName === "IMG" && img.classList.contains("preview"))
    window.__previews.push({src: img.getAttribute("src"), width: img.naturalWidth, height: img.naturalHeight});
}, true);
"""

# Before any page script: every change of a card's (status, steps) text, in the order the page showed it.
RECORD_PROGRESS = """
window.__shown = [];
document.addEventListener("DOMContentLoaded", () => {
  const jobs = document.getElementById("jobs");
  if (!jobs) return;
  const last = new Map();
  new MutationObserver(() => {
    for (const card of jobs.querySelectorAll("article.job")) {
      const seen = {id: card.dataset.job, status: card.querySelector(".status").textContent.trim(),
                    steps: card.querySelector(".steps").textContent.trim()};
      const key = seen.status + "|" + seen.steps;
      if (last.get(seen.id) !== key) { last.set(seen.id, key); window.__shown.push(seen); }
    }
  }).observe(jobs, {subtree: true, childList: true, characterData: true, attributes: true});
});
"""
# A job the page watches while a gate holds it (a few steps, so the held step lies strictly inside).
WATCHED = {"num_frames": 7, "height": 32, "width": 48, "num_inference_steps": 4, "fps": 8}
# 64x96: a 12x8 latent grid; every step previews (about every 10 % of 4), at most once per min interval.
PREVIEWED = {"num_frames": 7, "height": 64, "width": 96, "num_inference_steps": 4, "fps": 8}

CARD_SHOWS = """([id, status, steps]) => {
  const c = document.getElementById('job-' + id);
  return c !== null && c.querySelector('.status').textContent.trim() === status
    && c.querySelector('.steps').textContent.trim() === steps;
}"""
PREVIEWS_LOADED = """([id, n]) => new Set(window.__previews.filter(p => p.src.includes(id)).map(p => p.src)).size >= n"""
CARD_FINISHED = """(id) => {
  const s = document.querySelector('#job-' + id + ' .status');
  return s !== null && ['done', 'failed', 'cancelled'].includes(s.textContent.trim());
}"""
VIDEO_PLAYABLE = """(id) => {
  const v = document.querySelector('#job-' + id + ' video');
  return v !== null && v.readyState >= 2 && v.duration > 0;
}"""


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield pw, chromium
        finally:
            chromium.close()


STATIC_TOKENS = {"alice": "alice-page-token", "bob": "bob-page-token"}


@pytest.fixture(scope="module")
def static_front(tmp_path_factory):
    """A gateway without a hub (static tokens, the token form) over a store of its own with no pool: its
    jobs stay queued."""
    from mochi_lab.client.direct import DirectBackend
    from mochi_lab.config import GatewayConfig, Settings
    from mochi_lab.gateway.app import create_app
    from mochi_lab.store import open_store

    settings = Settings(data_dir=tmp_path_factory.mktemp("static-front"), account="ops")
    store = open_store(settings.store_url)
    shared = DirectBackend(settings, store, None)
    config = GatewayConfig(static_tokens={hash_token(t): {"account": u} for u, t in STATIC_TOKENS.items()},
                           max_active_jobs=3)
    gw = Gateway(create_app(settings, backend_factory=lambda: shared, config=config), free_port()).start()
    yield gw
    gw.stop()
    store.close()


def sign_in(page, base: str, hub, user: str) -> None:
    """Open the page with no session: sent to the hub's login form, sign in there, and come back."""
    page.goto(base + "/")
    assert page.url.startswith(hub.public_url + "login?next="), page.url
    page.fill("#username_input", user)
    page.fill("#password_input", "any")  # DummyAuthenticator
    page.click("#login_submit")
    page.wait_for_url(base + "/")
    assert page.locator("header .account").inner_text() == user


def sign_in_with_token(page, base: str, user: str, token: str) -> None:
    """A gateway without a hub: the page sends to its token form."""
    page.goto(base + "/")
    assert page.url == base + "/login"
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")
    page.wait_for_url(base + "/")
    assert page.locator("header .account").inner_text() == user


def fill_form(page, prompt: str, params: dict) -> None:
    page.fill("textarea[name=prompt]", prompt)
    for name, value in params.items():  # the form's fields are named as the parameters
        page.fill(f"input[name={name}]", str(value))


def submit(page) -> str:
    """Press generate; return the id of the card the page puts first."""
    before = page.locator("#jobs article.job").count()
    page.click("#generate button[type=submit]")
    page.wait_for_function("(n) => document.querySelectorAll('#jobs article.job').length > n", arg=before)
    assert page.locator("#message").inner_text().startswith("queued ")
    return page.locator("#jobs article.job").first.get_attribute("data-job")


def test_alice_queues_watches_plays_and_downloads_on_the_page(browser, hub, gateway, tokens, hold):
    import av

    pw, chromium = browser
    context = chromium.new_context(viewport={"width": 1100, "height": 900})
    context.add_init_script(RECORD_PROGRESS)
    page = context.new_page()
    media = []  # (url, status) of every response the page got
    page.on("response", lambda r: media.append((r.url, r.status)))
    try:
        sign_in(page, gateway.url, hub, "alice")
        prompt = "a paper boat on a pond, seen by the page"
        total = WATCHED["num_inference_steps"]
        gate = hold(prompt, "denoising", step=1)  # held running until the page has shown it so
        fill_form(page, prompt, WATCHED)
        job_id = submit(page)
        gate.wait_reached()
        page.wait_for_function(CARD_SHOWS, arg=[job_id, "running", f"1/{total}"], timeout=60_000, polling=100)
        gate.release()
        page.wait_for_function(CARD_FINISHED, arg=job_id, timeout=180_000, polling=200)
        card = page.locator(f"#job-{job_id}")
        assert card.locator(".status").inner_text() == "done", card.inner_text()

        # progress arrived while it ran: some step strictly between 0 and the total, shown before "done"
        shown = [s for s in page.evaluate("window.__shown") if s["id"] == job_id]
        statuses = [s["status"] for s in shown]
        assert statuses[-1] == "done" and statuses.count("done") == 1, shown
        steps = [tuple(map(int, s["steps"].split("/"))) for s in shown if s["steps"]]
        assert {t for _, t in steps} == {total}, shown
        assert [k for k, _ in steps] == sorted(k for k, _ in steps), shown  # never backwards
        assert any(s["status"] == "running" and 0 < int(s["steps"].split("/")[0]) < total
                   for s in shown[:statuses.index("done")] if s["steps"]), shown

        # the new <video> plays from the gateway, streamed with Range requests (206)
        page.wait_for_function(VIDEO_PLAYABLE, arg=job_id, timeout=60_000, polling=200)
        assert any(url.endswith(f"/download/{job_id}") and status == 206 for url, status in media), media

        # the download link, followed with the page's cookie session, is an MP4 of the job's frames
        href = card.locator("a[download]").get_attribute("href")
        url = urljoin(page.url, href)
        resp = page.request.get(url)
        assert resp.status == 200 and resp.headers["content-type"] == "video/mp4"
        with av.open(io.BytesIO(resp.body())) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        with gateway.client(tokens["alice"]) as alice:
            job = alice.get(f"/status/{job_id}").json()
        assert len(frames) == job["params"]["num_frames"] == WATCHED["num_frames"]
        assert frames[0].shape == (WATCHED["height"], WATCHED["width"], 3)
        anonymous = pw.request.new_context()
        try:
            assert anonymous.get(url).status == 401  # it was the session that opened it
        finally:
            anonymous.dispose()

        card.scroll_into_view_if_needed()
        page.wait_for_timeout(300)  # let a frame paint
        page.screenshot(path=str(ARTIFACTS / "gateway_page.png"), full_page=True)
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "gateway_page-failure.png"), full_page=True)
        raise
    finally:
        context.close()


def test_a_running_job_shows_its_forming_video_and_an_eta(browser, hub, gateway, tokens, hold, test_settings):
    pw, chromium = browser
    context = chromium.new_context(viewport={"width": 1100, "height": 700})
    context.add_init_script(RECORD_PREVIEWS)
    page = context.new_page()
    prompt = "a slow sunrise, previewed"
    gate = hold(prompt, "denoising", step=1)
    body = {"params": {"prompt": prompt, **PREVIEWED}, "reuse": False}
    with gateway.client(tokens["alice"]) as alice:
        job_id = alice.post("/generate", json=body).json()["id"]
        try:
            gate.wait_reached()  # step 1 previewed, held
            reached = time.monotonic()
            sign_in(page, gateway.url, hub, "alice")
            img = f"#job-{job_id} img.preview"
            page.wait_for_function(PREVIEWS_LOADED, arg=[job_id, 1], timeout=60_000, polling=100)
            # The worker previews at most once per preview_min_interval_s: once that has passed since step 1's
            # (a lower bound, whatever the machine's speed), the job moves on to step 2, previews it and is held.
            time.sleep(max(0.0, reached + test_settings.preview_min_interval_s - time.monotonic()))
            hold(prompt, "denoising", step=2).wait_reached()
            # the picture is replaced as the job goes on: two different previews loaded and shown
            page.wait_for_function(PREVIEWS_LOADED, arg=[job_id, 2], timeout=60_000, polling=100)
            loaded = [p for p in page.evaluate("window.__previews") if job_id in p["src"]]
            steps = [int(p["src"].rsplit("step=", 1)[1]) for p in loaded]
            total = PREVIEWED["num_inference_steps"]
            assert steps == sorted(steps) and all(0 < s <= total for s in steps), loaded
            assert all((p["width"], p["height"]) == (12, 8) for p in loaded), loaded  # the latent grid
            status = alice.get(f"/status/{job_id}").json()
            assert status["status"] == "running", status
            assert page.locator(img).bounding_box()["width"] > 100  # shown enlarged, not as 12 px
            eta = page.locator(f"#job-{job_id} .eta").inner_text()
            assert eta.endswith("s left"), (eta, page.locator(f"#job-{job_id}").inner_text())
            page.screenshot(path=str(ARTIFACTS / "gateway_page_preview.png"))
        finally:
            alice.post(f"/cancel/{job_id}")
            context.close()


def test_markup_stays_text_other_users_see_nothing_and_foreign_forms_cannot_write(browser, static_front):
    _, chromium = browser
    prompt = f"alice's secret cat {IMG} {SCRIPT}"
    tags = [IMG, SCRIPT, "plain"]
    # Without the page's CSP, so that escaping alone is what keeps the markup inert (the CSP is a second wall).
    context = chromium.new_context(bypass_csp=True, viewport={"width": 1100, "height": 900})
    page = context.new_page()
    dialogs = []

    def on_dialog(dialog):
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    job_id = None
    alice = static_front.client(STATIC_TOKENS["alice"])
    try:
        r = alice.post("/generate", json={"params": {"prompt": "x", "num_frames": 7, "height": 32, "width": 32,
                                                     "num_inference_steps": 2}, "experiment": SCRIPT})
        assert r.status_code == 422 and "experiment" in r.json()["detail"]  # not a name: refused, not stored

        sign_in_with_token(page, static_front.url, "alice", STATIC_TOKENS["alice"])
        fill_form(page, prompt, TINY)
        page.fill("input[name=negative_prompt]", SCRIPT)
        page.fill("input[name=tags]", ", ".join(tags))
        job_id = submit(page)  # the card the script builds from the job's JSON

        def check_card():
            card = page.locator(f"#job-{job_id}")
            assert card.locator(".prompt").inner_text() == prompt
            assert card.locator(".negative").inner_text() == SCRIPT
            assert card.locator(".tag").all_inner_texts() == tags
            assert page.locator("#jobs img, #jobs script, #jobs [onerror]").count() == 0
            page.wait_for_timeout(300)  # an <img src=x> would have failed to load by now
            assert dialogs == [] and page.evaluate("typeof window.__pwned") == "undefined"

        check_card()
        page.reload()  # now the server's rendering of the same job
        assert page.locator("#jobs article.job").first.get_attribute("data-job") == job_id
        check_card()
        page.screenshot(path=str(ARTIFACTS / "gateway_page_markup.png"), full_page=True)

        # a form on another site posting to the gateway: the browser's session does not make it a write
        evil = "http://evil.example/"
        page.route(evil, lambda route: route.fulfill(content_type="text/html", body=(
            f'<form method="post" action="{static_front.url}/cancel/{job_id}"><input name="a" value="1"></form>'
            "<script>document.forms[0].submit()</script>")))
        with page.expect_response(f"{static_front.url}/cancel/{job_id}") as answer:
            page.goto(evil)
        assert answer.value.status in (401, 403)
        # a form posted from the page's own origin without the CSRF header: refused too
        page.goto(static_front.url + "/")
        with page.expect_response(f"{static_front.url}/cancel/{job_id}") as answer:
            page.evaluate("""(id) => {
              const f = document.createElement('form');
              f.method = 'post'; f.action = 'cancel/' + id;
              document.body.appendChild(f); f.submit();
            }""", job_id)
        assert answer.value.status == 403 and CSRF_HEADER in answer.value.json()["detail"]
        assert alice.get(f"/status/{job_id}").json()["status"] == "queued"  # neither cancelled it

        # bob, signed in, sees his own jobs and none of alice's
        bob_context = chromium.new_context()
        try:
            bob_page = bob_context.new_page()
            sign_in_with_token(bob_page, static_front.url, "bob", STATIC_TOKENS["bob"])
            on_page = set(bob_page.locator("#jobs article.job").evaluate_all("cs => cs.map(c => c.dataset.job)"))
            with static_front.client(STATIC_TOKENS["bob"]) as bob:
                assert on_page == {j["id"] for j in bob.get("/jobs/bob").json()}
            assert job_id not in bob_page.content() and "secret cat" not in bob_page.content()
        finally:
            bob_context.close()

        # the watch would have seen markup run: the same string inserted as HTML does raise a dialog
        page.evaluate("(html) => document.body.insertAdjacentHTML('beforeend', html)", IMG)
        page.wait_for_timeout(500)
        assert dialogs == ["1"]
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "gateway_page_markup-failure.png"), full_page=True)
        raise
    finally:
        context.close()
        if job_id is not None:  # the storefront's quota is per account: leave alice's place free
            alice.post(f"/cancel/{job_id}")
        alice.close()


def _session_cookie(context, base: str) -> dict:
    (cookie,) = [c for c in context.cookies(base) if c["name"] == SESSION_COOKIE]
    return cookie


def _whoami(pw, base: str, sid: str) -> int:
    """GET /whoami from a fresh client with only this session cookie: a replay."""
    ctx = pw.request.new_context(extra_http_headers={"Cookie": f"{SESSION_COOKIE}={sid}"})
    try:
        return ctx.get(base + "/whoami").status
    finally:
        ctx.dispose()


def _page_posting_to(action: str):
    """A route handler: another site's page whose form posts itself to `action` at once."""
    body = f'<form method="post" action="{action}"></form><script>document.forms[0].submit()</script>'
    return lambda route: route.fulfill(content_type="text/html", body=body)


def test_sign_in_at_the_hub_sessions_stay_per_user_and_end_on_the_server(browser, hub, gateway, tokens):
    pw, chromium = browser
    base = gateway.url
    alice_ctx, bob_ctx = chromium.new_context(), chromium.new_context()
    alice, bob = alice_ctx.new_page(), bob_ctx.new_page()
    try:
        # alice signs in at the hub and lands on the page as herself; her cookie is a random id, not a token
        sign_in(alice, base, hub, "alice")
        cookie = _session_cookie(alice_ctx, base)
        sid = cookie["value"]
        assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and not cookie["secure"]  # http hub
        with httpx.Client(trust_env=False) as plain:
            assert plain.get(hub.api_url + "/user", headers={"Authorization": f"token {sid}"}).status_code in (401, 403)
            assert plain.get(base + "/whoami", headers={"Authorization": f"token {sid}"}).status_code == 401
        assert _whoami(pw, base, sid) == 200

        # bob, in his own browser, is bob: alice's job is not on his page and answers him 404
        with gateway.client(tokens["alice"]) as api:
            job_id = api.post("/generate", json={"params": {"prompt": "alice's lantern", **TINY}}).json()["id"]
        sign_in(bob, base, hub, "bob")
        bob.reload()
        assert job_id not in bob.content() and "lantern" not in bob.content()
        assert bob.request.get(f"{base}/status/{job_id}").status == 404
        assert alice.request.get(f"{base}/status/{job_id}").status == 200
        # a made-up session id signs nobody in
        assert _whoami(pw, base, "A" * 43) == 401

        # login CSRF: bob's sign-in code, unused, sent to alice's browser does not sign her in as bob.
        # Bob's browser (its own cookies) starts a sign-in and stops before the callback.
        r = bob_ctx.request.get(base + "/login", max_redirects=0)
        assert r.status == 303
        r = bob_ctx.request.get(r.headers["location"], max_redirects=0)  # the hub knows bob: straight back
        assert r.status == 302
        bobs_callback = urljoin(hub.public_url, r.headers["location"])
        assert bobs_callback.startswith(base + "/oauth_callback?") and "code=" in bobs_callback
        answer = alice.goto(bobs_callback)
        assert answer.status == 403 and "not started by this browser" in answer.text()
        alice.goto(base + "/")
        assert alice.locator("header .account").inner_text() == "alice"

        # another site's forms cannot sign alice in or out
        evil = "http://evil.example/"
        for action in ("login", "logout"):
            alice.route(evil, _page_posting_to(f"{base}/{action}"))
            with alice.expect_response(f"{base}/{action}") as answer:
                alice.goto(evil)
            assert answer.value.status == 403, action
            assert "cross-site request refused" in answer.value.json()["detail"]
            alice.unroute(evil)
        assert _whoami(pw, base, sid) == 200

        # signing out ends the session on the server: the old cookie, replayed, is refused
        alice.goto(base + "/")
        alice.click("form.logout button")
        alice.wait_for_url(base + "/logout")
        assert "signed out" in alice.content()
        alice.screenshot(path=str(ARTIFACTS / "gateway_signed_out.png"))
        assert _whoami(pw, base, sid) == 401
        assert not [c for c in alice_ctx.cookies(base) if c["name"] == SESSION_COOKIE]

        # signing in again needs no password while the hub session lasts; a new session, a new id
        alice.click("button[type=submit]")
        alice.wait_for_url(base + "/")
        assert alice.locator("header .account").inner_text() == "alice"
        again = _session_cookie(alice_ctx, base)["value"]
        assert again != sid and _whoami(pw, base, again) == 200
        # signing out of the hub revokes the token the session stands for: the session ends within the
        # gateway's auth cache (tests/hub_fixtures.py: AUTH_CACHE_S)
        alice.goto(hub.public_url + "logout")
        deadline = time.monotonic() + 30
        while _whoami(pw, base, again) == 200:
            assert time.monotonic() < deadline, "the session outlived the hub's sign-out"
            time.sleep(0.2)
    except Exception:
        alice.screenshot(path=str(ARTIFACTS / "gateway_sign_in-failure.png"), full_page=True)
        raise
    finally:
        alice_ctx.close()
        bob_ctx.close()


RECORD_CSP = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", (e) => window.__csp.push(e.violatedDirective + " " + e.blockedURI));
"""


def test_docs_render_with_nothing_from_outside(browser, static_front):
    """Swagger UI at /docs, in Chromium, with every host but 127.0.0.1 blocked: it renders the API, asks no
    other host for anything, and breaks none of its CSP."""
    _, chromium = browser
    context = chromium.new_context(viewport={"width": 1100, "height": 900})
    context.add_init_script(RECORD_CSP)
    outside, served = [], []

    def gate(route):
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            served.append(route.request.url)
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", gate)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        answer = page.goto(static_front.url + "/docs")
        assert answer.status == 200 and "default-src 'none'" in answer.headers["content-security-policy"]
        page.wait_for_selector(".swagger-ui .info .title", timeout=30_000)
        assert page.locator(".swagger-ui .info .title").inner_text().startswith("mochi_lab gateway")
        page.wait_for_function("document.querySelectorAll('.opblock').length >= 10")
        page.locator(".opblock-summary-path", has_text="/generate").first.wait_for()
        assert outside == [] and errors == [], (outside, errors)
        assert page.evaluate("window.__csp") == []
        assert any(u.endswith("/docs/assets/swagger-ui-bundle.js") for u in served) and \
            any(u.endswith("/openapi.json") for u in served)
        page.screenshot(path=str(ARTIFACTS / "gateway_docs.png"))
    finally:
        context.close()
