"""An account's LoRA adapters (mochi_lab.adapters): the file's check, read without torch and before any tensor,
against hostile files; the modules an adapter may target, against the real transformer's layers; and where
adapters are kept (a name replaced, deleted, nothing kept of a refused file)."""

from __future__ import annotations

import io
import pickle
import struct

import pytest

from mochi_lab.adapters import (
    MAX_HEADER_BYTES,
    MOCHI_1_TRANSFORMER,
    AdapterNotFound,
    AdapterRejected,
    AdapterStore,
    adapter_file,
    lora_targets,
    read_adapter,
    read_header,
)
from mochi_lab.model import QuotaExceeded, RecordTooLarge
from mochi_lab.params import GenerationParams, ParamsError
from mochi_lab.pipelines.tiny import TINY_TRANSFORMER
from tests.support.lora import join, lie, make_adapter, renamed, split, with_rank

CAPS = {"max_bytes": 1 << 20, "max_rank": 8, "max_count": 3}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> bytes:
    return make_adapter(tmp_path_factory.mktemp("lora") / "a.safetensors").read_bytes()


@pytest.fixture()
def shelf(tmp_path) -> AdapterStore:
    return AdapterStore(tmp_path / "artifacts", "alice", **CAPS)


def _stored(shelf: AdapterStore) -> list[str]:
    return sorted(p.name for p in shelf.dir.iterdir()) if shelf.dir.is_dir() else []


@pytest.mark.parametrize("config", [TINY_TRANSFORMER, MOCHI_1_TRANSFORMER], ids=["tiny", "mochi-1-preview"])
def test_the_targetable_modules_are_the_real_transformers_linear_layers_with_their_shapes(config):
    """Derived from the config without torch, checked here against diffusers' own model (the 10B one built on
    the meta device: no memory)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import MochiTransformer3DModel

    with init_empty_weights():
        transformer = MochiTransformer3DModel(**config)
    real = {name: tuple(m.weight.shape) for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert lora_targets(transformer.config) == real


def test_a_peft_adapter_is_kept_under_its_sha256_and_a_job_resolves_its_name(shelf, adapter):
    record = shelf.put("style-1.v2", adapter, model="tiny")
    assert record["name"] == "style-1.v2" and record["rank"] == 4 and record["model"] == "tiny"
    assert record["bytes"] == len(adapter) and record["dtypes"] == ["F32"] and record["modules"] > 0
    assert adapter_file(shelf.root, "alice", record["sha256"]).read_bytes() == adapter
    assert [r["name"] for r in shelf.list()] == ["style-1.v2"]
    params = GenerationParams.parse("a cat", lora=[("style-1.v2", 0.5)])
    (ref,) = shelf.resolve(params.lora, "tiny")
    assert (ref.name, ref.scale, ref.sha256) == ("style-1.v2", 0.5, record["sha256"])
    with pytest.raises(ParamsError, match=r"lora: no adapter named 'nope' in account alice"):
        shelf.resolve(GenerationParams.parse("a cat", lora="nope").lora, "tiny")
    with pytest.raises(ParamsError, match=r"lora: adapter 'style-1.v2' was made for model 'tiny'"):
        shelf.resolve(params.lora, "mochi-1-preview")
    # where it is loaded, it is checked again: by its sha256 and its header
    path = adapter_file(shelf.root, "alice", record["sha256"])
    assert read_adapter(path, record["sha256"], model="tiny", max_bytes=1 << 20, max_rank=8) == adapter
    with pytest.raises(AdapterRejected, match="changed after it was checked"):
        read_adapter(path, "0" * 64, model="tiny", max_bytes=1 << 20, max_rank=8)


def test_a_name_replaced_points_at_the_new_file_and_the_old_one_goes(shelf, tmp_path):
    a = shelf.put("x", make_adapter(tmp_path / "a.safetensors", seed=1).read_bytes(), model="tiny")
    shelf.put("y", make_adapter(tmp_path / "a.safetensors", seed=1).read_bytes(), model="tiny")  # same file
    b = shelf.put("x", make_adapter(tmp_path / "b.safetensors", seed=2).read_bytes(), model="tiny")
    assert a["sha256"] != b["sha256"] and shelf.get("x")["sha256"] == b["sha256"]
    assert adapter_file(shelf.root, "alice", a["sha256"]).is_file()  # y still uses it
    shelf.delete("y")
    assert not adapter_file(shelf.root, "alice", a["sha256"]).exists()
    shelf.delete("x")
    assert _stored(shelf) == [] and shelf.list() == []
    with pytest.raises(AdapterNotFound, match="adapter 'x' not found"):
        shelf.delete("x")


def test_another_accounts_adapter_is_not_found_as_an_unknown_one(tmp_path, adapter):
    AdapterStore(tmp_path, "alice", **CAPS).put("mine", adapter, model="tiny")
    bob = AdapterStore(tmp_path, "bob", **CAPS)
    for name in ("mine", "nothing"):
        with pytest.raises(AdapterNotFound) as exc:
            bob.get(name)
        assert str(exc.value) == f"adapter {name!r} not found"
    assert bob.list() == []


HOSTILE = {
    "a pickle": (lambda a: pickle.dumps({"w": [1.0] * 10}, protocol=4), "is a pickle"),
    "a torch.save file": (lambda a: _torch_saved(), "a PyTorch checkpoint"),
    "empty": (lambda a: b"", "truncated: 0 bytes"),
    "cut in the length": (lambda a: a[:5], "truncated: 5 bytes"),
    "cut in the header": (lambda a: a[:40], "truncated: its header claims"),
    "cut in the data": (lambda a: a[:-10], "past the end"),
    "a header length past the file": (lambda a: struct.pack("<Q", 10_000) + a[8:], "truncated: its header claims"),
    "a header length of 2**63": (lambda a: struct.pack("<Q", 2**63) + a[8:], f"at most {MAX_HEADER_BYTES}"),
    "a header that is not JSON": (lambda a: struct.pack("<Q", 4) + b"\xff\xfe{[", "not a JSON object"),
    "a header nested past the parser": (lambda a: _deep(), "not a JSON object"),
    "huge shapes": (lambda a: lie(a, shape=[2**40, 2**40]), "the header lies"),
    "offsets past the file": (lambda a: lie(a, data_offsets=[0, 2**62]), "past the end"),
    "negative offsets": (lambda a: lie(a, data_offsets=[-8, 0]), "malformed data_offsets"),
    "an unknown dtype": (lambda a: lie(a, dtype="F128"), "unknown dtype"),
    "an integer dtype": (lambda a: lie(a, dtype="I32"), "LoRA weights are one of F32, F16, BF16"),
    "overlapping tensors": (lambda a: _overlap(a), "overlap or leave a gap"),
    "bytes the header does not describe": (lambda a: a + bytes(16), "does not describe the file"),
    "a key of no module": (lambda a: renamed(a, "attn1.to_q", "attn1.to_qq"), "match no LoRA-targetable module"),
    "kohya's key layout": (lambda a: renamed(a, "transformer.", "lora_unet_"), "match no LoRA-targetable module"),
    "one half missing": (lambda a: _drop_half(a), "a LoRA needs both halves"),
    "a rank over the cap": (lambda a: with_rank(a, 16), "rank 16; this cluster accepts ranks 1..8"),
    "another model's shapes": (lambda a: _for_wider(a), "(an adapter for another model?)"),
    "no tensors": (lambda a: join({"__metadata__": {"format": "pt"}}, b""), "holds no tensors"),
}


def _torch_saved() -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"transformer.proj_out.lora_A.weight": torch.ones(4, 16)}, buf)
    return buf.getvalue()


def _deep() -> bytes:
    raw = b"[" * 100_000 + b"]" * 100_000
    return struct.pack("<Q", len(raw)) + raw


def _overlap(adapter: bytes) -> bytes:
    header, body = split(adapter)
    keys = [k for k in header if k != "__metadata__"]
    a, b = header[keys[0]], header[keys[1]]
    header[keys[1]] = {**b, "data_offsets": [a["data_offsets"][0], a["data_offsets"][0] + b["data_offsets"][1]
                                             - b["data_offsets"][0]]}
    return join(header, body)


def _drop_half(adapter: bytes) -> bytes:
    header, body = split(adapter)
    key = next(k for k in header if k.endswith("lora_B.weight"))
    begin, end = header.pop(key)["data_offsets"]
    for e in header.values():  # the data closed up behind it, so only the missing half is wrong
        if isinstance(e, dict) and "data_offsets" in e and e["data_offsets"][0] >= end:
            e["data_offsets"] = [e["data_offsets"][0] - (end - begin), e["data_offsets"][1] - (end - begin)]
    return join(header, body[:begin] + body[end:])


def _for_wider(adapter: bytes) -> bytes:
    header, _ = split(adapter)
    out, at = {}, 0
    for key, e in header.items():
        if key == "__metadata__":
            continue
        shape = [e["shape"][0], e["shape"][1] * 2] if ".lora_A." in key else [e["shape"][0] * 2, e["shape"][1]]
        n = shape[0] * shape[1] * 4
        out[key] = {"dtype": "F32", "shape": shape, "data_offsets": [at, at + n]}
        at += n
    return join(out, bytes(at))


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_file_is_refused_naming_why_and_nothing_is_kept(shelf, adapter, case):
    make, reason = HOSTILE[case]
    with pytest.raises(AdapterRejected) as exc:
        shelf.put("x", make(adapter), model="tiny")
    assert reason in str(exc.value)
    assert _stored(shelf) == [] and shelf.list() == []


class _Reads(io.BytesIO):
    """A file that fails any read larger than `limit`: what a check may allocate for."""

    def __init__(self, data: bytes, limit: int):
        super().__init__(data)
        self.limit = limit

    def read(self, n: int | None = -1) -> bytes:
        assert n is not None and 0 <= n <= self.limit, f"read({n}) of a file whose header claims more than it has"
        return super().read(n)


@pytest.mark.parametrize("claim", [2**63, MAX_HEADER_BYTES, 10_000])
def test_a_header_claiming_more_than_the_file_is_refused_before_reading_it(adapter, claim):
    data = struct.pack("<Q", claim) + adapter[8:]
    with pytest.raises(AdapterRejected):
        read_header(_Reads(data, limit=len(data)), len(data))


def test_the_size_cap_stops_an_upload_before_its_end_and_keeps_nothing(tmp_path, adapter):
    shelf = AdapterStore(tmp_path, "alice", **{**CAPS, "max_bytes": len(adapter) - 1})
    with pytest.raises(RecordTooLarge, match=f"the limit is max_adapter_bytes={len(adapter) - 1}"):
        shelf.put("x", io.BytesIO(adapter), model="tiny")
    assert _stored(shelf) == []


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "x" * 65, "a b", "caf\u00e9", "a\x00b", "-x"])
def test_a_name_that_is_not_letters_digits_dot_underscore_dash_is_refused_first(shelf, adapter, name):
    with pytest.raises(AdapterRejected, match="an adapter name is 1-64 letters, digits"):
        shelf.put(name, adapter, model="tiny")
    assert _stored(shelf) == []


def test_an_account_keeps_at_most_max_count_adapters_and_may_replace_one(shelf, adapter):
    for name in ("a", "b", "c"):
        shelf.put(name, adapter, model="tiny")
    with pytest.raises(QuotaExceeded, match="max_adapters=3"):
        shelf.put("d", adapter, model="tiny")
    shelf.put("a", adapter, model="tiny")  # a replacement is no new adapter
    assert [r["name"] for r in shelf.list()] == ["a", "b", "c"]
    assert len([n for n in _stored(shelf) if n.endswith(".safetensors")]) == 1  # one file, three names


def test_an_unknown_model_is_refused(shelf, adapter):
    with pytest.raises(AdapterRejected, match="no model 'nope'"):
        shelf.put("x", adapter, model="nope")
