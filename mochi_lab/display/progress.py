"""A job's progress, one rule for every view of it: the live HTML, the text bar, a Studio card, the ClusterPanel,
the experiment tables, the gateway's page and `Job.progress` all draw what `progress_view` says, so that they
agree on one record (the same fraction, to the thousandth; the same stage label; the same times).

Pure: a record in (a `JobRecord` or a mapping of its fields, no type assumed), plain values out; no Jinja2.
"""

from __future__ import annotations

from typing import Any

from mochi_lab.display.values import field, is_number, mapping, num, seconds, text, to_float, to_int


def progress_view(r: Any) -> dict[str, Any]:
    """A job's progress as every view of it shows it (the live HTML, the text bar, a Studio card, the
    ClusterPanel, the gateway's page, `Job.progress`), so that they agree on one record:

    `fraction` of the whole job done, 0..1 to the thousandth: the worker's own figure (`live.fraction`: the
    time taken over that plus the ETA, from the job's submission, each stage weighed by what this worker
    expects it to take), else the denoising steps' share (`measure` says which; None where neither is a
    number); 0 while queued, 1 once done. `label`: the stage, with the step while denoising ("denoising
    47/200", "decoding", "queued").
    `step` and `total` (None where not numbers), `elapsed_s` (since the running attempt's claim) and `eta_s`
    (None where unknown; 0 once ended), and `times`: "elapsed 4.2 s · ETA 12 s" while it runs ("ETA …" until
    the worker has a figure). No type is assumed: a value that is not a number is shown as text."""
    status, stage = field(r, "status"), field(r, "stage")
    live = mapping(field(r, "live"))
    raw_step, raw_total = field(r, "step"), field(r, "total_steps")
    step = to_int(raw_step)
    total = to_int(raw_total) or to_int(mapping(field(r, "params")).get("num_inference_steps"))
    total = total if total and total > 0 else None
    if not is_number(raw_total) and raw_total not in (None, ""):
        shown_total: Any = raw_total  # a hostile total is shown, never used as a number
    else:
        shown_total = total
    running, ended = status == "running", status in ("done", "failed", "cancelled")
    worker_fraction = to_float(live.get("fraction"))
    fraction: float | None
    measure = "the whole job"
    if status == "done":
        fraction = 1.0
    elif not (running or ended):  # queued, or a status this version does not know
        fraction = 0.0
    elif worker_fraction is not None:
        fraction = worker_fraction
    else:  # the worker has no pace to weigh the stages by yet (its first job of this model)
        fraction, measure = (step / total if step is not None and total else None), "the denoising steps"
    # to the thousandth every view draws (the HTML's bar, a card's, the text bar's units): rounded once, here,
    # so no view rounds a half-thousandth the other way
    fraction = None if fraction is None else round(max(0.0, min(1.0, fraction)), 3)
    label = text(stage if stage not in (None, "") else status)
    if stage == "denoising" and raw_step is not None and shown_total is not None:
        label += f" {num(raw_step)}/{num(shown_total)}"
    elapsed = to_float(live.get("elapsed_s")) if running else None
    eta = to_float(live.get("eta_s")) if running else (0.0 if ended else None)
    eta = None if eta is None else max(0.0, eta)
    times = [f"elapsed {seconds(elapsed)}"] if elapsed is not None else []
    if running:
        times.append("ETA …" if eta is None else f"ETA {seconds(eta)}")
    return {"fraction": fraction, "percent": None if fraction is None else int(fraction * 100), "measure": measure,
            "label": label, "stage": stage, "status": status, "step": step, "total": total, "elapsed_s": elapsed,
            "eta_s": eta, "running": running, "times": " · ".join(times)}


__all__ = ["progress_view"]
