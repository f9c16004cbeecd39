"""GenerationParams: every bad field is named with what is allowed; seeds are drawn and recorded."""

import numpy as np
import pytest

from mochi_lab.config import known_models
from mochi_lab.params import (
    MAX_PROMPT_TOKENS,
    PRIORITY_MAX,
    GenerationParams,
    ParamsError,
    SubmitOptions,
    check_model,
    check_prompt_tokens,
)


@pytest.mark.parametrize(
    ("params", "field", "allowed"),
    [
        ({"num_frames": 84}, "num_frames", "79 or 85"),
        ({"num_frames": 20}, "num_frames", "19 or 25"),
        ({"num_frames": 0}, "num_frames", "6k+1"),
        ({"num_frames": 289}, "num_frames", "between 1 and 283"),
        ({"height": 100}, "height", "multiple of 16"),
        ({"width": 850}, "width", "848 or 864"),
        ({"height": 2048}, "height", "between 16 and 1280"),
        ({"width": 0}, "width", "multiple of 16"),
        ({"num_inference_steps": 0}, "num_inference_steps", "between 2 and 200"),
        ({"num_inference_steps": 1}, "num_inference_steps", "between 2 and 200"),
        ({"num_inference_steps": 201}, "num_inference_steps", "between 2 and 200"),
        ({"guidance_scale": -1}, "guidance_scale", "between 0.0 and 30.0"),
        ({"seed": -5}, "seed", "between 0 and 4294967295"),
        ({"fps": 0}, "fps", "between 1 and 120"),
        ({"model": "../sora"}, "model", "a model name"),
        ({"prompt": "   "}, "prompt", "non-empty"),
        ({"steps": 4}, "steps", "allowed: prompt, negative_prompt"),
        ({"num_frames": "many"}, "num_frames", "must be an integer"),
    ],
)
def test_bad_field_is_named_with_allowed_values(params, field, allowed):
    params = {"prompt": "a cat", **params}
    with pytest.raises(ParamsError) as err:
        GenerationParams.parse(**params)
    msg = str(err.value)
    assert f"{field}: " in msg
    assert allowed in msg


def test_several_bad_fields_are_all_reported():
    with pytest.raises(ParamsError) as err:
        GenerationParams.parse("x", num_frames=10, height=33, num_inference_steps=500)
    msg = str(err.value)
    assert "num_frames:" in msg and "height:" in msg and "num_inference_steps:" in msg


def test_prompt_over_token_limit_is_rejected(tiny_checkpoint):
    from mochi_lab.pipelines.tokens import local_tokenizer

    tokenizer = local_tokenizer("tiny", tiny_checkpoint.parent)  # on this machine: no network, no torch
    count = lambda text: len(tokenizer(text).input_ids)  # noqa: E731
    # the tiny tokenizer is close to one token per character
    with pytest.raises(ParamsError, match=rf"prompt: is \d+ tokens .* limit is {MAX_PROMPT_TOKENS}"):
        check_prompt_tokens(GenerationParams.parse("q" * 400), count)
    check_prompt_tokens(GenerationParams.parse("a cat " * 30), lambda text: 1 / 0)  # short: never counted
    assert local_tokenizer("mochi-1-preview", tiny_checkpoint.parent) is None  # not here: the worker checks


def test_unknown_model_is_named_with_the_models_served():
    with pytest.raises(ParamsError, match=r"model: must be one of mochi-1-preview, tiny.*, got .sora."):
        check_model("sora", known_models())
    assert check_model("tiny", known_models()) == "tiny"


@pytest.mark.parametrize(
    ("field", "value", "want"),
    [
        ("num_frames", True, "must be an integer"),
        ("seed", True, "must be an integer"),
        ("num_frames", "1_3", "must be an integer"),
        ("height", " 32 ", "must be an integer"),
        ("width", b"32", "must be an integer"),
        ("guidance_scale", True, "must be a number"),
        ("guidance_scale", float("nan"), "between 0.0 and 30.0"),
        ("fps", 8.0, "must be an integer"),
        ("prompt", b"a cat", "must be a string"),
        ("prompt", "a \ud800 cat", "lone surrogate"),
        ("negative_prompt", "x" * 5000, "at most 4000"),
    ],
)
def test_python_api_is_strict_nothing_is_coerced(field, value, want):
    with pytest.raises(ParamsError) as err:
        GenerationParams.parse(**{"prompt": "a cat", field: value})
    assert f"{field}: " in str(err.value) and want in str(err.value)


def test_numpy_numbers_are_taken_as_the_numbers_they_are():
    p = GenerationParams.parse("a cat", num_frames=np.int64(7), guidance_scale=np.float32(2.5), seed=np.uint32(3))
    assert (p.num_frames, p.guidance_scale, p.seed) == (7, 2.5, 3)
    assert type(p.num_frames) is int and type(p.guidance_scale) is float


@pytest.mark.parametrize(
    ("options", "field", "want"),
    [
        ({"priority": "high"}, "priority", "must be an integer"),
        ({"priority": 2**70}, "priority", f"between -100 and {PRIORITY_MAX}"),
        ({"priority": True}, "priority", "must be an integer"),
        ({"tags": "abc"}, "tags", "a list of strings"),
        ({"tags": [1]}, "tags", "strings of 1-64"),
        ({"tags": ["x"] * 40}, "tags", "at most 32"),
        ({"experiment": 123}, "experiment", "must be a string"),
        ({"experiment": "../x"}, "experiment", "letters, digits"),
        ({"idempotency_key": ""}, "idempotency_key", "1-200 printable"),
        ({"idempotency_key": "a\ud800"}, "idempotency_key", "printable"),
    ],
)
def test_submit_options_are_checked_by_name(options, field, want):
    with pytest.raises(ParamsError) as err:
        SubmitOptions.parse(**options)
    assert f"{field}: " in str(err.value) and want in str(err.value)
    assert SubmitOptions.parse(tags=["a", "b"], priority=PRIORITY_MAX).tags == ("a", "b")


def test_stored_params_are_rebuilt_without_checks():
    old = {"prompt": "x", "model": "a-model-since-removed", "num_frames": 84, "seed": 3, "retired_field": 1}
    p = GenerationParams.stored(old)
    assert (p.model, p.num_frames, p.seed) == ("a-model-since-removed", 84, 3)


def test_seed_none_draws_and_records_a_seed():
    a, b = GenerationParams.parse("a cat"), GenerationParams.parse("a cat")
    assert isinstance(a.seed, int) and isinstance(b.seed, int)
    assert a.seed != b.seed
    assert GenerationParams(**a.to_dict()).seed == a.seed


def test_defaults_are_diffusers_defaults():
    p = GenerationParams.parse("a cat", seed=1)
    assert (p.num_frames, p.height, p.width, p.num_inference_steps, p.guidance_scale) == (19, 480, 848, 64, 4.5)


# -- lora: the account's adapters for one job -------------------------------------------------------------
@pytest.mark.parametrize(("lora", "expected"), [
    (None, ()), ("", ()), ([], ()),
    ("style", (("style", 1.0),)),
    (("style", 0.8), (("style", 0.8),)),  # one pair
    (["a", "b"], (("a", 1.0), ("b", 1.0))),  # two names
    ([("a", 0.8), ("b", np.float64(0.25))], (("a", 0.8), ("b", 0.25))),
    ([{"name": "a", "scale": -1, "sha256": "ab" * 32}], (("a", -1.0),)),  # stored params, JSON
])
def test_lora_takes_a_name_pairs_or_objects(lora, expected):
    params = GenerationParams.parse("a cat", lora=lora)
    assert tuple((r.name, r.scale) for r in params.lora) == expected
    again = GenerationParams.parse(**params.to_dict())  # what a worker reads back from the store
    assert again == params and GenerationParams.stored(params.to_dict()) == params


def test_a_job_without_adapters_has_the_params_and_cache_key_it_had_before_them():
    from mochi_lab.store.cache import params_key

    params = GenerationParams.parse("a cat", seed=3)
    assert "lora" not in params.to_dict()
    assert params_key(params.to_dict()) == params_key(GenerationParams.parse("a cat", seed=3, lora=[]).to_dict())
    assert params_key(params.to_dict()) != params_key(GenerationParams.parse("a cat", seed=3, lora="a").to_dict())


@pytest.mark.parametrize(("lora", "allowed"), [
    (5, "must be an adapter's name or a list"),
    (["../x"], "an adapter name is 1-64 letters, digits"),
    ([".hidden"], "an adapter name is 1-64 letters, digits"),
    ([("a", 2.5)], "an adapter's scale is between -2.0 and 2.0, got 2.5"),
    ([("a", float("nan"))], "an adapter's scale is between -2.0 and 2.0"),
    ([("a", True)], "must be a number, got bool True"),
    ([("a", "0.5")], "must be a number, got str '0.5'"),
    ([("a", 1), ("a", 0.5)], "each adapter at most once"),
    (["a", "b", "c", "d", "e"], "at most 4 adapters per job, got 5"),
    ([("a", 1, 2)], "a pair is (name, scale)"),
    ([{"name": "a", "sha256": "not-hex"}], "64 lowercase hex digits"),
    ([{"name": "a", "weight": 1}], "lora: "),
])
def test_a_bad_lora_is_refused_naming_the_field(lora, allowed):
    with pytest.raises(ParamsError) as exc:
        GenerationParams.parse("a cat", lora=lora)
    assert "\n  lora: " in str(exc.value) and allowed in str(exc.value), str(exc.value)
