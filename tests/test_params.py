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
