"""A cold `MochiCluster()` shown as it goes: opening the store, starting (or joining) Ray and the pool,
the workers loading their model, ready, each step with its seconds.

In a notebook the steps are one output, updated in place through a display id; once the handle is made,
the workers' loading is followed on the kernel's event loop (the cell has returned by then), so the kernel
is free while the model loads. Outside a kernel nothing is shown.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from mochi_lab.display.reprs import render
from mochi_lab.display.values import mapping

# The steps of a start, in order, as `DirectBackend.start` reports them (`progress(step, detail)`).
STEPS = {
    "store": "opening the store",
    "runtime": "starting or joining the local runtime (Ray and its pool)",
    "ray": "starting Ray",
    "join": "joining Ray",
    "pool": "starting the pool's workers",
    "model": "loading the model",
    "ready": "ready",
}
FOLLOW_FOR_S = 600.0  # the longest a model load is followed (a real Mochi checkpoint from a cold disk)
NO_WORKER_AFTER_S = 30.0  # a pool without any worker by then starts them on demand (an autoscaler): say so


def in_kernel() -> bool:
    """True inside a Jupyter kernel (where a display shows in the cell, and follows display ids): a shell with
    a kernel, so subclasses of IPython's kernel shell (Colab's) count too."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class StartProgress:
    """The steps of one start, shown as they go. Call it with each step's name (`STEPS`) and a detail;
    `follow(cluster)` then shows the workers loading until they are ready."""

    def __init__(self, publish: Callable[[dict[str, Any], bool], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self._publish = publish or _display()
        self._clock = clock
        self.began = clock()
        self.steps: list[dict[str, Any]] = []  # {"label", "detail", "started", "ended"}
        self.shown = False
        self.poller: Any = None

    def __call__(self, step: str, detail: str = "") -> None:
        now = self._clock()
        if self.steps and self.steps[-1]["ended"] is None:
            self.steps[-1]["ended"] = now
        self.steps.append({"label": STEPS.get(step, step), "detail": detail, "started": now,
                           "ended": now if step == "ready" else None, "step": step})
        self._show()

    def failed(self, exc: BaseException) -> None:
        """The step under way did not finish: say so, with the error's first line (its traceback follows)."""
        now = self._clock()
        if self.steps and self.steps[-1]["ended"] is None:
            self.steps[-1]["ended"] = now
            self.steps[-1]["failed"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self._show()

    def html(self) -> str:
        now = self._clock()
        rows = [{"label": s["label"], "detail": s["detail"], "done": s["ended"] is not None,
                 "seconds": (s["ended"] if s["ended"] is not None else now) - s["started"],
                 "ready": s["step"] == "ready", "failed": s.get("failed")}
                for s in self.steps]
        return render("startup.html", steps=rows, total=now - self.began)

    def _show(self) -> None:
        self._publish({"text/plain": " · ".join(s["label"] for s in self.steps), "text/html": self.html()},
                      self.shown)
        self.shown = True

    # -- after the handle is made: the workers load their model -----------------------------------------
    def follow(self, workers: Callable[[], list[Any]], model: str, *, interval: float = 0.5) -> bool:
        """Show the workers loading `model` until none is loading (on the kernel's loop; returns False
        where there is no running loop, after checking once)."""
        from mochi_lab.display.widgets._poll import Poller

        self("model", model)
        self.poller = Poller(lambda: self.check(workers, model), interval)
        if not self.poller.start():
            self.check(workers, model)
            return False
        return True

    def check(self, workers: Callable[[], list[Any]], model: str) -> bool:
        """One look at the workers; True while they are still loading (follow on)."""
        rows = [mapping(r) for r in workers()]
        waited = self._clock() - self.steps[-1]["started"]
        loading = sum(1 for r in rows if r.get("state") == "loading")
        ready = sum(1 for r in rows if r.get("state") in ("idle", "busy"))
        if rows and not loading:
            served = sorted({str(r.get("model")) for r in rows if r.get("model")})
            self("ready", f"{ready} worker{'' if ready == 1 else 's'} serving {', '.join(served) or model}")
            return False
        if not rows and waited > NO_WORKER_AFTER_S:
            self("ready", "no worker yet: the pool starts them when jobs arrive")
            return False
        if waited > FOLLOW_FOR_S:
            self.steps[-1]["detail"] = f"{model}: still loading after {waited:.0f} s (cluster.workers() says more)"
            self._show()
            return False
        on = f"{model} on {loading} worker{'' if loading == 1 else 's'}" + (f" ({ready} ready)" if ready else "")
        self.steps[-1]["detail"] = on if rows else f"{model}: waiting for the workers"
        self._show()
        return True


def _display() -> Callable[[dict[str, Any], bool], None]:
    handle: list[Any] = []

    def publish(bundle: dict[str, Any], update: bool) -> None:
        from IPython.display import display

        if update and handle:
            handle[0].update(bundle, raw=True)
        else:
            handle.append(display(bundle, raw=True, display_id=True))

    return publish


__all__ = ["STEPS", "StartProgress", "in_kernel"]
