"""Planning runs: grid order, deterministic seeds and keys, validation before queueing. No store."""

import pytest

from mochi_lab import GenerationParams, ParamsError
from mochi_lab.cli import ExperimentSpec, SpecError
from mochi_lab.store.cache import cache_key, params_key
from mochi_lab.sweep import expand_grid, plan_runs, validate_name, varying_params

TINY = {"num_frames": 7, "height": 32, "width": 32, "num_inference_steps": 2, "fps": 8}


def test_grid_is_the_cartesian_product_prompts_outer_seeds_inner():
    grid = expand_grid(["a", "b"], [1, 2], {"num_inference_steps": [2, 4], "height": 32})
    assert len(grid) == 2 * 2 * 2
    assert [(g["prompt"], g["num_inference_steps"], g["seed"]) for g in grid[:4]] == [
        ("a", 2, 1), ("a", 2, 2), ("a", 4, 1), ("a", 4, 2)]
    assert all(g["height"] == 32 for g in grid)  # a scalar is a fixed param
    assert expand_grid("one prompt", range(3))[2] == {"prompt": "one prompt", "seed": 2}


def test_empty_axis_and_misplaced_seed_are_refused():
    with pytest.raises(ValueError, match="'num_inference_steps' is empty"):
        expand_grid(["a"], [1], {"num_inference_steps": []})
    with pytest.raises(ValueError, match="seeds= argument"):
        expand_grid(["a"], None, {"seed": [1, 2]})


def test_missing_seeds_are_derived_from_name_and_params_so_plans_repeat():
    first = plan_runs("exp-a", expand_grid(["a cat", "a dog"], None, TINY), "tiny")
    again = plan_runs("exp-a", expand_grid(["a cat", "a dog"], None, TINY), "tiny")
    other = plan_runs("exp-b", expand_grid(["a cat", "a dog"], None, TINY), "tiny")
    assert [r.key for r in first] == [r.key for r in again]
    assert [r.params["seed"] for r in first] == [r.params["seed"] for r in again]
    assert {r.params["seed"] for r in first}.isdisjoint({r.params["seed"] for r in other})
    # spelling out a default does not change the derived seed
    explicit = plan_runs("exp-a", [{"prompt": "a cat", **TINY, "guidance_scale": 4.5}], "tiny")
    assert explicit[0].key == first[0].key


def test_run_key_is_the_params_content_hash_and_duplicates_collapse():
    runs = plan_runs("e", [{"prompt": "x", "seed": 1, **TINY}, {"prompt": "x", "seed": 1, **TINY}], "tiny")
    assert len(runs) == 1
    params = GenerationParams(prompt="x", seed=1, **TINY).to_dict()
    assert runs[0].params == params
    assert runs[0].key == params_key(params)[:16]
    assert params_key(dict(reversed(params.items()))) == params_key(params)  # canonical: key order is irrelevant
    assert cache_key(params) != cache_key(params, "some-experiment")


def test_a_bad_run_fails_the_whole_plan_naming_the_run():
    with pytest.raises(ParamsError) as err:
        plan_runs("e", expand_grid(["a"], [1], {**TINY, "num_frames": [7, 8]}), "tiny")
    assert "run 1" in str(err.value) and "num_frames" in str(err.value)


@pytest.mark.parametrize("name", ["", "-x", "a b", "a/b", "a:b", "x" * 65, "ünïcode"])
def test_bad_names_are_refused(name):
    with pytest.raises(ValueError, match="experiment name"):
        validate_name(name)


def test_varying_params_lists_only_what_differs():
    runs = plan_runs("e", expand_grid(["a", "b"], [1, 2], TINY), "tiny")
    assert varying_params(runs) == ["prompt", "seed"]
    assert varying_params(runs[:1]) == []


def test_shipped_specs_load_and_plan(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "experiments"
    sizes = {}
    for path in sorted(root.glob("*.yaml")):
        spec = ExperimentSpec.load(path)
        runs = plan_runs(spec.name, expand_grid(spec.prompts, spec.seeds, {**spec.params, **spec.grid}), spec.model)
        sizes[path.name] = len(runs)
        assert all(r.params["height"] <= 64 and r.params["model"] == "tiny" for r in runs)  # CPU-sized
    assert sizes == {"prompt_sweep.yaml": 4, "steps_vs_quality.yaml": 6}
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: has space\nprompts: []\ngrid: {height: [32]}\nparams: {height: 32}\n")
    with pytest.raises(SpecError) as err:
        ExperimentSpec.load(bad)
    assert "name" in str(err.value) and "prompts" in str(err.value)
