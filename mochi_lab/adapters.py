"""An account's LoRA adapters: the check of an uploaded file, and where adapters are kept.

An adapter is a `.safetensors` file of LoRA weights (diffusers' and peft's layout: `transformer.<module>.lora_A.weight`
and `.lora_B.weight`) for one model's transformer. It is checked before anything is stored, without torch and
before any tensor is read: the header is parsed here (`read_header`), so a header that claims huge shapes or
offsets past the file is refused before anything is allocated; every key must name a LoRA-targetable module of
the model (`lora_targets`: the Linear layers of its transformer) with the shapes that module takes, and
every rank must be at most the cap. Each refusal is an `AdapterRejected` (or `RecordTooLarge` for the size cap)
whose message names the reason.

Adapters live beside the account's videos (`<artifacts>/<account>/adapters/`): each file under its sha256
(`<sha256>.safetensors`, never changed once written) and each name as a small JSON record pointing at one
(`<name>.json`), so a name is replaced atomically and a job loads exactly the file its params' sha256 names.
A file stays while a name points at it or an unfinished job names its sha256 (`in_use`), so a job queued before
its adapter was replaced or deleted runs with the file it was queued with; files neither keeps are removed at
the account's next upload or delete. Plain files and JSON only: the store, the gateway and the client use this
without torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from mochi_lab.config import check_account, known_models
from mochi_lab.lora_refs import SHA256_RE, LoraRef, check_adapter_name
from mochi_lab.model import QuotaExceeded, RecordTooLarge
from mochi_lab.params import ParamsError
from mochi_lab.private import private_dir

SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 8 * 2**20  # far above any LoRA's header (about 100 bytes a tensor)
_CHUNK = 1 << 20
# safetensors' dtypes and their sizes; a LoRA's weights are one of LORA_DTYPES
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
LORA_DTYPES = ("F32", "F16", "BF16")
_KEY_RE = re.compile(r"transformer\.(?P<module>[A-Za-z0-9_.]+)\.lora_(?P<part>[AB])\.weight")
# genmo/mochi-1-preview's transformer (its config.json), for checking adapters where its files are not
MOCHI_1_TRANSFORMER = {"patch_size": 2, "num_attention_heads": 24, "attention_head_dim": 128, "num_layers": 48,
                       "pooled_projection_dim": 1536, "in_channels": 12, "out_channels": None,
                       "qk_norm": "rms_norm", "text_embed_dim": 4096, "time_embed_dim": 256,
                       "activation_fn": "swiglu", "max_sequence_length": 256}


class AdapterRejected(ValueError):
    """An adapter file or name that is refused (a gateway answers 422); the message names why. Nothing was stored."""


class AdapterNotFound(KeyError):
    """No adapter of that name in this account (another account's adapter answers the same)."""

    def __str__(self) -> str:  # KeyError quotes its message
        return str(self.args[0]) if self.args else "adapter not found"


# -- the file: its header, read without torch ----------------------------------------------------------
def _sniff(head: bytes) -> str | None:
    """What a file that is not safetensors is, by its first bytes, when it is one of the formats people try."""
    if head.startswith(b"PK\x03\x04"):
        return "a PyTorch checkpoint (torch.save's zip of pickles, as .bin or .pt files are)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a pickle (as older .bin or .pt files are)"
    return None


def read_header(f: IO[bytes], size: int) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensors' entries ({key: {dtype, shape, data_offsets}}) and the `__metadata__` of the safetensors
    file `f` of `size` bytes, checked before any tensor is read: AdapterRejected naming what is wrong.

    Every entry must have a known dtype, a shape of whole numbers whose bytes equal its offsets' span, and
    the spans must tile the data exactly (no gap, no overlap, nothing past the end), as safetensors writes them."""
    head = f.read(8)
    what = _sniff(head)
    if what is not None:
        raise AdapterRejected(f"the file is {what}, not safetensors: only .safetensors adapters are accepted "
                              "(pickled weights can run code when loaded)")
    if len(head) < 8:
        raise AdapterRejected(f"the file is truncated: {size} bytes, and a safetensors file starts with an "
                              "8-byte header length")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        raise AdapterRejected(f"the safetensors header claims {n} bytes; at most {MAX_HEADER_BYTES} are accepted "
                              "(is this a safetensors file?)")
    if 8 + n > size:
        raise AdapterRejected(f"the file is truncated: its header claims {n} bytes, and only {size - 8} follow")
    raw = f.read(n)
    if len(raw) != n:
        raise AdapterRejected(f"the file is truncated: its header claims {n} bytes, and only {len(raw)} were read")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise AdapterRejected("the safetensors header is not a JSON object (is this a safetensors file?)") from None
    if not isinstance(header, dict):
        raise AdapterRejected("the safetensors header is not a JSON object (is this a safetensors file?)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise AdapterRejected("the safetensors header's __metadata__ must map strings to strings")
    data_size = size - 8 - n
    spans = []
    for key, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise AdapterRejected(f"the safetensors header's entry {key!r:.80} is not a tensor's "
                                  "(dtype, shape, data_offsets)")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise AdapterRejected(f"tensor {key!r:.80} has an unknown dtype {dtype!r:.20}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_whole(d) for d in shape):
            raise AdapterRejected(f"tensor {key!r:.80} has a malformed shape {shape!r:.60}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_whole(o) for o in offsets)
                or offsets[0] > offsets[1]):
            raise AdapterRejected(f"tensor {key!r:.80} has malformed data_offsets {offsets!r:.60}")
        if offsets[1] > data_size:
            raise AdapterRejected(f"tensor {key!r:.80} claims bytes {offsets[0]}..{offsets[1]}, past the end of "
                                  f"the file's {data_size} bytes of data (truncated, or a lying header)")
        nbytes = DTYPE_BYTES[dtype]
        for d in shape:
            nbytes *= d
        if nbytes != offsets[1] - offsets[0]:
            raise AdapterRejected(f"tensor {key!r:.80} of shape {shape} ({dtype}) needs {nbytes} bytes, and its "
                                  f"data_offsets span {offsets[1] - offsets[0]}: the header lies")
        spans.append((offsets[0], offsets[1], key))
    at = 0
    for begin, end, key in sorted(spans):
        if begin != at:
            raise AdapterRejected(f"tensor {key!r:.80} starts at byte {begin} of the data, not at {at}: the "
                                  "tensors overlap or leave a gap")
        at = end
    if at != data_size:
        raise AdapterRejected(f"the tensors cover {at} bytes of data and the file has {data_size}: "
                              "the header does not describe the file")
    return header, metadata


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# -- the model: which modules an adapter may target ------------------------------------------------------
def transformer_config(model: str, cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The transformer config of `model` (a name of `known_models()`), read without torch: the tiny model's and
    mochi-1-preview's are known here; another model's comes from `<its folder>/transformer/config.json`."""
    if model == "tiny":
        from mochi_lab.pipelines.tiny import TINY_TRANSFORMER

        return dict(TINY_TRANSFORMER)
    if model == "mochi-1-preview":
        return dict(MOCHI_1_TRANSFORMER)
    source = known_models().get(model)
    if source is None:
        raise AdapterRejected(f"no model {model!r}: adapters are checked against one of "
                              f"{', '.join(sorted(known_models()))}")
    config = Path(source) / "transformer" / "config.json"
    try:
        return json.loads(config.read_text())
    except (OSError, ValueError):
        raise AdapterRejected(f"cannot check adapters for model {model!r} here: its transformer's config.json "
                              "is not on this machine") from None


def lora_targets(config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """The LoRA-targetable modules of a MochiTransformer3DModel with `config`: every Linear layer (each as
    (out_features, in_features)): the timestep and caption embedding's, each transformer block's (attention,
    feed-forward, adaptive norms; the last block is `context_pre_only`, without text-side output layers), and the
    output's. (Trainers' usual `to_q`, `to_k`, `to_v`, `to_out.0` match the caption pooler's `to_q` too.)"""
    layers = int(config["num_layers"])
    dim = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    ctx, text = int(config["pooled_projection_dim"]), int(config["text_embed_dim"])
    patch, channels = int(config["patch_size"]), int(config.get("out_channels") or config["in_channels"])
    ff, ff_ctx = (4 * dim * 2) // 3, (4 * ctx * 2) // 3  # diffusers' MochiTransformerBlock (swiglu)
    out: dict[str, tuple[int, int]] = {
        "time_embed.timestep_embedder.linear_1": (dim, int(config["time_embed_dim"])),
        "time_embed.timestep_embedder.linear_2": (dim, dim),
        "time_embed.pooler.to_kv": (2 * text, text), "time_embed.pooler.to_q": (text, text),
        "time_embed.pooler.to_out": (dim, text),
        "time_embed.caption_proj": (ctx, text),
        "norm_out.linear": (2 * dim, dim),
        "proj_out": (patch * patch * channels, dim),
    }
    for i in range(layers):
        last = i == layers - 1
        block = {
            "norm1.linear": (4 * dim, dim),
            "attn1.to_q": (dim, dim), "attn1.to_k": (dim, dim), "attn1.to_v": (dim, dim),
            "attn1.add_q_proj": (dim, ctx), "attn1.add_k_proj": (dim, ctx), "attn1.add_v_proj": (dim, ctx),
            "attn1.to_out.0": (dim, dim),
            "ff.net.0.proj": (2 * ff, dim), "ff.net.2": (dim, ff),
        }
        if last:
            block["norm1_context.linear_1"] = (ctx, dim)
        else:
            block.update({"norm1_context.linear": (4 * ctx, dim), "attn1.to_add_out": (ctx, dim),
                          "ff_context.net.0.proj": (2 * ff_ctx, ctx), "ff_context.net.2": (ctx, ff_ctx)})
        out.update({f"transformer_blocks.{i}.{name}": shape for name, shape in block.items()})
    return out


def check_lora(header: Mapping[str, Any], targets: Mapping[str, tuple[int, int]], *, model: str,
               max_rank: int) -> dict[str, Any]:
    """Refuse (AdapterRejected) unless the tensors are a LoRA of `targets`: each key `transformer.<module>.lora_A`
    or `.lora_B.weight` of a targetable module, both halves present, shapes (rank, in) and (out, rank), a float
    dtype, ranks 1..max_rank. Returns {rank, modules, dtypes}."""
    if not header:
        raise AdapterRejected("the file holds no tensors")
    halves: dict[str, dict[str, Any]] = {}
    unknown = []
    for key, entry in header.items():
        found = _KEY_RE.fullmatch(key)
        if found is None or found["module"] not in targets:
            unknown.append(key)
            continue
        if entry["dtype"] not in LORA_DTYPES:
            raise AdapterRejected(f"tensor {key!r} is {entry['dtype']}; LoRA weights are one of "
                                  f"{', '.join(LORA_DTYPES)}")
        if len(entry["shape"]) != 2:
            raise AdapterRejected(f"tensor {key!r} has shape {entry['shape']}; a LoRA weight is a matrix")
        halves.setdefault(found["module"], {})[found["part"]] = entry["shape"]
    if unknown:
        shown = ", ".join(repr(k[:120]) for k in sorted(unknown)[:3])
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise AdapterRejected(
            f"{len(unknown)} key(s) match no LoRA-targetable module of model {model!r}: {shown}{more}. Keys are "
            "transformer.<module>.lora_A.weight and .lora_B.weight (diffusers' and peft's layout), for the "
            "transformer's Linear layers (transformer_blocks.<i>.attn1.to_q, .attn1.to_out.0, .ff.net.0.proj, "
            "proj_out, ...)")
    ranks = set()
    for module, parts in sorted(halves.items()):
        if set(parts) != {"A", "B"}:
            missing = "lora_B" if "A" in parts else "lora_A"
            raise AdapterRejected(f"module {module!r} has no {missing}.weight: a LoRA needs both halves")
        out_f, in_f = targets[module]
        (rank, a_in), (b_out, b_rank) = parts["A"], parts["B"]
        if (a_in, b_out, b_rank) != (in_f, out_f, rank):
            raise AdapterRejected(f"module {module!r} of model {model!r} takes lora_A ({rank}, {in_f}) and lora_B "
                                  f"({out_f}, {rank}); the file has {tuple(parts['A'])} and {tuple(parts['B'])} "
                                  "(an adapter for another model?)")
        if not 1 <= rank <= max_rank:
            raise AdapterRejected(f"module {module!r} has rank {rank}; this cluster accepts ranks 1..{max_rank}")
        ranks.add(rank)
    return {"rank": max(ranks), "modules": len(halves),
            "dtypes": sorted({e["dtype"] for e in header.values()})}


def check_adapter_file(f: IO[bytes], size: int, *, model: str, targets: Mapping[str, tuple[int, int]],
                       max_bytes: int, max_rank: int) -> dict[str, Any]:
    """The whole check of an adapter file `f` of `size` bytes for `model`: its size, its header, its keys."""
    if size > max_bytes:
        raise RecordTooLarge(f"the adapter is {size} bytes; the limit is max_adapter_bytes={max_bytes}; "
                             "nothing was stored")
    header, _ = read_header(f, size)
    return check_lora(header, targets, model=model, max_rank=max_rank)


def read_adapter(path: Path, sha256: str, *, model: str, max_bytes: int, max_rank: int,
                 cache_dir: str | os.PathLike | None = None) -> bytes:
    """The bytes of the adapter file at `path`, checked again where it is loaded (a worker: the files are a trust
    boundary too): its sha256 must be `sha256`, and it must pass `check_adapter_file` for `model`.
    FileNotFoundError when it is gone, AdapterRejected otherwise."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:  # before reading it
            raise AdapterRejected(f"the file is {size} bytes; the limit is max_adapter_bytes={max_bytes}")
        data = f.read()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise AdapterRejected(f"the file's sha256 is not {sha256}: it changed after it was checked")
    check_adapter_file(io.BytesIO(data), len(data), model=model, max_bytes=max_bytes, max_rank=max_rank,
                       targets=lora_targets(transformer_config(model, cache_dir)))
    return data


# -- where adapters live ---------------------------------------------------------------------------------
def adapters_dir(root: Path, account: str) -> Path:
    """The account's adapters, beside its videos under the artifacts root."""
    return Path(root) / check_account(account) / "adapters"


def adapter_file(root: Path, account: str, sha256: str) -> Path:
    """The file of the account's adapter with this sha256 (derived, never read from a record)."""
    if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256):
        raise ValueError(f"not a sha256: {sha256!r:.80}")
    return adapters_dir(root, account) / f"{sha256}{SUFFIX}"


class AdapterStore:
    """One account's adapters under the artifacts root `root`: put, get, list, delete, and resolving a job's
    `lora` to the files' sha256. `max_bytes`, `max_rank` and `max_count` are the caps (WorkerConfig's);
    `in_use()` gives the sha256 of the adapters the account's unfinished jobs name (their files are kept)."""

    def __init__(self, root: Path, account: str, *, max_bytes: int, max_rank: int, max_count: int,
                 cache_dir: Path | None = None, in_use: Callable[[], Iterable[str]] | None = None):
        self.root, self.account = Path(root), check_account(account)
        self.dir = adapters_dir(self.root, self.account)
        self.max_bytes, self.max_rank, self.max_count = max_bytes, max_rank, max_count
        self.cache_dir = cache_dir
        self.in_use = in_use

    def _record_path(self, name: str) -> Path:
        try:
            return self.dir / f"{check_adapter_name(name)}.json"
        except ValueError as exc:
            raise AdapterRejected(str(exc)) from None

    def get(self, name: str) -> dict[str, Any]:
        """The adapter's record: name, sha256, bytes, rank, modules, dtypes, model, created_at."""
        try:
            path = self._record_path(name)
        except AdapterRejected:
            raise AdapterNotFound(f"adapter {name!r:.80} not found") from None
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            raise AdapterNotFound(f"adapter {name!r} not found") from None
        return record

    def list(self) -> list[dict[str, Any]]:
        """The account's adapters' records, by name."""
        out = []
        for path in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else ():
            if path.name.startswith("."):
                continue
            with contextlib.suppress(AdapterNotFound):
                out.append(self.get(path.stem))
        return out

    def put(self, name: str, data: IO[bytes] | bytes, *, model: str) -> dict[str, Any]:
        """Check `data` (a binary stream or bytes) as an adapter for `model` and keep it as `name`, replacing
        the adapter of that name. Nothing is kept when a check fails (AdapterRejected, RecordTooLarge, or
        QuotaExceeded when the account has max_count adapters and `name` is new)."""
        self._record_path(name)  # the name first: a bad one is refused before a byte is written
        targets = lora_targets(transformer_config(model, self.cache_dir))
        stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
        private_dir(self.dir)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".upload-", suffix=".part")
        try:
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as out:
                while chunk := stream.read(_CHUNK):
                    size += len(chunk)
                    if size > self.max_bytes:  # before the rest is read: an upload over the cap stops here
                        raise RecordTooLarge(f"the adapter is over {self.max_bytes} bytes; the limit is "
                                             f"max_adapter_bytes={self.max_bytes}; nothing was stored")
                    digest.update(chunk)
                    out.write(chunk)
            with open(tmp, "rb") as f:
                facts = check_adapter_file(f, size, model=model, targets=targets, max_bytes=self.max_bytes,
                                           max_rank=self.max_rank)
            if not self._record_path(name).exists() and len(self.list()) >= self.max_count:
                raise QuotaExceeded(f"account {self.account} has {self.max_count} adapters; the limit is "
                                    f"max_adapters={self.max_count} (delete some); nothing was stored")
            sha = digest.hexdigest()
            os.replace(tmp, adapter_file(self.root, self.account, sha))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        record = {"name": name, "sha256": sha, "bytes": size, "model": model, "created_at": time.time(), **facts}
        self._write_record(name, record)
        self.collect()
        return record

    def delete(self, name: str) -> None:
        """Forget the adapter (AdapterNotFound when there is none); its file goes unless another name or an
        unfinished job uses it (that job runs with it)."""
        self.get(name)
        with contextlib.suppress(FileNotFoundError):
            self._record_path(name).unlink()
        self.collect()

    def resolve(self, refs: Iterable[LoraRef], model: str) -> list[LoraRef]:
        """A job's adapters with their files' sha256, for `model`; ParamsError naming the `lora` field for a
        name this account does not have or an adapter made for another model."""
        out = []
        for ref in refs:
            try:
                record = self.get(ref.name)
            except AdapterNotFound:
                raise ParamsError(f"invalid generation parameters:\n  lora: no adapter named {ref.name!r} in "
                                  f"account {self.account} (upload it first: cluster.adapters.upload(path, "
                                  f"name={ref.name!r}))") from None
            if record.get("model") != model:
                raise ParamsError(f"invalid generation parameters:\n  lora: adapter {ref.name!r} was made for model "
                                  f"{record.get('model')!r}, and this job runs {model!r}")
            out.append(LoraRef(name=ref.name, scale=ref.scale, sha256=record["sha256"]))
        return out

    def _write_record(self, name: str, record: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".record-", suffix=".part")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(record, out)
            os.replace(tmp, self._record_path(name))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def collect(self) -> list[str]:
        """Remove the files that no name points at and no unfinished job names (`in_use`, asked only when there
        is such a file); the sha256 of those removed."""
        named = {r.get("sha256") for r in self.list()}
        unnamed = [p for p in self.dir.glob(f"*{SUFFIX}") if SHA256_RE.fullmatch(p.stem) and p.stem not in named]
        if not unnamed:
            return []
        keep = set(self.in_use()) if self.in_use is not None else set()
        gone = []
        for path in unnamed:
            if path.stem not in keep:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                gone.append(path.stem)
        return gone


__all__ = ["DTYPE_BYTES", "MAX_HEADER_BYTES", "AdapterNotFound", "AdapterRejected", "AdapterStore", "adapter_file",
           "adapters_dir", "check_adapter_file", "check_lora", "lora_targets", "read_adapter", "read_header",
           "transformer_config"]
