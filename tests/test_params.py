"""GenerationParams: every bad field is named with what is allowed; seeds are drawn and recorded."""

import pytest

from mochi_lab.params import MAX_PROMPT_TOKENS, GenerationParams, ParamsError


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
        ({"num_inference_steps": 0}, "num_inference_steps", "between 1 and 200"),
        ({"num_inference_steps": 201}, "num_inference_steps", "between 1 and 200"),
        ({"guidance_scale": -1}, "guidance_scale", "between 0.0 and 30.0"),
        ({"seed": -5}, "seed", "between 0 and 4294967295"),
        ({"fps": 0}, "fps", "between 1 and 120"),
        ({"model": "sora"}, "model", "mochi-1-preview, tiny"),
        ({"prompt": "   "}, "prompt", "non-empty"),
        ({"steps": 4}, "steps", "allowed: prompt, negative_prompt"),
        ({"num_frames": "many"}, "num_frames", "valid integer"),
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
    # the tiny tokenizer is close to one token per character
    with pytest.raises(ParamsError, match=rf"prompt is \d+ tokens .* limit is {MAX_PROMPT_TOKENS}"):
        GenerationParams.parse("q" * 400)
    GenerationParams.parse("a cat " * 30)  # 180 characters: within the limit, no tokenizer needed


def test_seed_none_draws_and_records_a_seed():
    a, b = GenerationParams.parse("a cat"), GenerationParams.parse("a cat")
    assert isinstance(a.seed, int) and isinstance(b.seed, int)
    assert a.seed != b.seed
    assert GenerationParams(**a.to_dict()).seed == a.seed


def test_defaults_are_diffusers_defaults():
    p = GenerationParams.parse("a cat", seed=1)
    assert (p.num_frames, p.height, p.width, p.num_inference_steps, p.guidance_scale) == (19, 480, 848, 64, 4.5)
