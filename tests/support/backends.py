"""What the backend contract suite (tests/client/backend) does with a `Backend`: queue tiny jobs, hold them at the
test gate, follow them to their end, and empty an account between tests."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable

from mochi_lab.client.backend import Backend
from mochi_lab.config import GatewayConfig
from mochi_lab.model import JobRecord
from mochi_lab.params import GenerationParams, SubmitOptions
from tests.support.faults_helpers import wait_for
from tests.support.gate import Gate
from tests.support.jobkit import TINY

# The contract suite's two accounts per kind; the gateway's are hub users (tests/support/hub_fixtures.USERS).
ACCOUNTS = {"direct": ("ann", "ben"), "gateway": ("gwen", "gary")}
# The session gateway's quota (hub_fixtures builds it with GatewayConfig's default); the direct side gets it too.
QUOTA = GatewayConfig.model_fields["max_active_jobs"].default


def unique(text: str) -> str:
    """`text` made unique to this call: the result cache, gates and filters see only this test's jobs."""
    return f"{text} {uuid.uuid4().hex[:10]}"


def tiny(prompt: str, **over) -> GenerationParams:
    return GenerationParams.parse(prompt, **{**TINY, "seed": 1, **over})


def submit(backend: Backend, prompt: str, *, reuse: bool = True, seed: int = 1, **options) -> JobRecord:
    """A tiny job of `prompt`; `options` are SubmitOptions (priority, tags, experiment, idempotency_key)."""
    return backend.submit(tiny(prompt, seed=seed), SubmitOptions.parse(**options), reuse=reuse)


def held(backend: Backend, hold: Callable[..., Gate], prompt: str, n: int = 1, step: int = 1,
         **options) -> tuple[Gate, list[JobRecord]]:
    """n jobs of `prompt` running, held at denoising `step` until the gate is released (or they are
    cancelled): with n = the pool's size, every worker is busy and later jobs stay queued."""
    gate = hold(prompt, "denoising", step)
    jobs = [submit(backend, prompt, reuse=False, seed=i, **options) for i in range(n)]
    gate.wait_reached(n)
    return gate, jobs


def finish(backend: Backend, job_id: str, timeout: float = 120) -> JobRecord:
    """The job's last state, followed with `watch` (TimeoutError past `timeout`)."""
    *_, last = backend.watch(job_id, timeout=timeout)
    return last


def empty(store_backends: Iterable[Backend], timeout: float = 120) -> None:
    """Cancel every unfinished job of these accounts, wait until each has ended, then delete them all: the
    next test starts with no job of theirs queued, running or listed."""
    backends = list(store_backends)
    for b in backends:
        for r in b.list(limit=10_000):
            if not r.finished:
                b.cancel(r.id)

    def all_ended() -> bool:
        return all(r.finished for b in backends for r in b.list(limit=10_000))

    wait_for(all_ended, timeout, "the contract accounts' jobs to end after a cancel")
    for b in backends:
        for r in b.list(limit=10_000):
            b.delete(r.id)


__all__ = ["ACCOUNTS", "QUOTA", "empty", "finish", "held", "submit", "tiny", "unique"]
