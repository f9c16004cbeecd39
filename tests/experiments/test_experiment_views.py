"""The experiment views without a store: which swept params label the compare grid's rows and columns,
and the run table with whatever a record holds (the store is a trust boundary)."""

import re

import pytest

from mochi_lab.display.compare import grid_axes
from mochi_lab.display.experiment import experiment_html, jobs_html
from mochi_lab.model import JobRecord
from mochi_lab.params import ParamsError
from mochi_lab.sweep import Run, expand_grid, plan_runs

MARKUP = "<img src=x onerror=alert(1)>"

TINY = {"num_frames": 7, "height": 32, "width": 32, "fps": 8}


def runs(prompts, seeds, **lists):
    return plan_runs("axes", expand_grid(prompts, seeds, {**TINY, **lists}), "tiny")


def test_the_innermost_swept_param_runs_across_and_the_others_down():
    assert grid_axes(runs(["a", "b"], [1, 2])) == (["prompt"], "seed")
    three = runs(["a", "b"], [1, 2], num_inference_steps=[2, 4])
    assert grid_axes(three) == (["prompt", "num_inference_steps"], "seed")


def test_one_swept_param_runs_across_unless_it_has_many_values():
    assert grid_axes(runs(["a"], [1, 2, 3])) == ([], "seed")
    assert grid_axes(runs(["a"], list(range(8)))) == (["seed"], None)
    assert grid_axes(runs(["a"], [1])) == ([], None)  # nothing differs: one cell


def test_chosen_axes_are_kept_and_every_other_swept_param_joins_the_rows():
    three = runs(["a", "b"], [1, 2], num_inference_steps=[2, 4])
    assert grid_axes(three, rows="seed", columns="prompt") == (["seed", "num_inference_steps"], "prompt")
    assert grid_axes(three, columns="num_inference_steps") == (["prompt", "seed"], "num_inference_steps")
    assert grid_axes(three, rows=["seed"]) == (["seed", "prompt"], "num_inference_steps")
    with pytest.raises(ValueError):
        grid_axes(three, columns="colour")


@pytest.mark.parametrize("status", [MARKUP, ["a", "list"], {"a": 1}, None, 7])
def test_the_run_table_shows_any_record_as_text(status):
    hostile = JobRecord(id=MARKUP, account="alice", params={"prompt": MARKUP}, status=status, stage=MARKUP,
                        step=MARKUP, total_steps=MARKUP, error=MARKUP, timings={"run_s": MARKUP})
    runs = [Run("a", {"prompt": MARKUP, "seed": 1}), Run("b", {"prompt": "x", "seed": MARKUP})]
    record = {"name": MARKUP, "description": MARKUP, "tags": [MARKUP]}
    for html in (experiment_html(record, runs, {"a": hostile, "b": None}),
                 jobs_html(MARKUP, [({"prompt": MARKUP}, hostile), ({"prompt": "x"}, None)])):
        assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
        assert not re.search(r"<(?!/?(div|b|i|br|progress|span|table|thead|tbody|tr|th|td|code)\b)", html)
        assert "0/2 finished" in html  # a status that is not one of ours never counts as finished


def test_a_running_run_shows_the_bar_and_stage_every_view_of_its_job_shows():
    """The run table draws a running job through `progress_view`, as the live view, the card and the panel
    do: the whole job's fraction through the decode, not the denoising steps (2/2, a full bar)."""
    from mochi_lab.display.progress import progress_view
    from mochi_lab.display.reprs import job_html

    decoding = JobRecord("1-000000000000", "a", {"prompt": "x", "seed": 1}, status="running", stage="decoding",
                         step=2, total_steps=2, live={"fraction": 0.4206, "eta_s": 9.0, "elapsed_s": 3.0})
    assert progress_view(decoding)["fraction"] == 0.421
    table, alone = jobs_html("e", [({"prompt": "x", "seed": 1}, decoding)]), job_html(decoding)
    for html in (table, alone):
        assert re.search(r'class="mochi-bar" value="0\.421" max="1"', html), html
    assert ">decoding<" in table and "2/2" not in table


def test_the_eta_of_an_experiment_counts_running_then_queued_runs_at_the_done_pace():
    from mochi_lab.display.experiment import eta_s
    from mochi_lab.model import JobRecord

    def job(status, run_s=None, eta=None):
        return JobRecord("1-000000000000", "a", {}, status=status, timings={"run_s": run_s} if run_s else {},
                         live={"eta_s": eta} if eta is not None else {})

    assert eta_s([job("done", 10), None]) == 0.0  # nothing waits
    assert eta_s([job("queued")]) is None  # nothing done yet: no basis
    # two running side by side (the longer one counts), then 4 queued at 10 s over those 2 workers
    assert eta_s([job("done", 8), job("done", 12), job("running", eta=3), job("running", eta=5)]
                 + [job("queued")] * 4) == 5 + 4 * 10 / 2


def test_a_lora_sweep_folds_its_scale_into_each_run_and_is_read_by_adapter_and_scale():
    from mochi_lab.display.compare import _axis_label
    from mochi_lab.display.experiment import runs_dataframe

    planned = runs(["a"], [1], lora=[None, "style", ["style", "grain"]], lora_scale=[0.5, 1.0])
    # the base run has no adapter to scale: its two scales are one run
    assert [r.params.get("lora") for r in planned] == [None, *[
        [{"name": n, "scale": s, "sha256": None} for n in names] for names in (["style"], ["style", "grain"])
        for s in (0.5, 1.0)]]
    assert grid_axes(planned) == ([], "lora")
    assert [_axis_label(r.params, ["lora"]) for r in planned] == [
        "none", "style \u00d70.5", "style \u00d71", "style \u00d70.5, grain \u00d70.5", "style \u00d71, grain \u00d71"]
    df = runs_dataframe(planned, {})
    assert list(df.columns[:3]) == ["lora", "lora_scale", "seed"]
    assert df["lora"].isna().tolist() == df["lora_scale"].isna().tolist() == [True] + [False] * 4  # the base run
    assert df["lora"].tolist()[1:] == ["style", "style", "style+grain", "style+grain"]
    assert df["lora_scale"].tolist()[1:] == [0.5, 1.0, (0.5, 0.5), (1.0, 1.0)]
    with pytest.raises(ParamsError, match="lora_scale: must be a number between -2.0 and 2.0, got 3"):
        runs(["a"], [1], lora="style", lora_scale=[3])
