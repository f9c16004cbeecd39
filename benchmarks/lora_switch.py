"""What switching LoRA adapters on a warm worker costs, against reloading the whole model.

    python benchmarks/lora_switch.py [--repeats 5] [--rank 16] [--targets attention|every] [--model tiny]

In this process (no Ray, no store): the model loaded as a worker loads it (`load_runner`), two adapters made with
peft for its transformer and kept in an account's folder as an upload keeps them (`AdapterStore.put`), then, each
timed `--repeats` times (median and min printed):

- `model reload`: `load_runner` again, what a worker would pay to change its weights without adapters;
- `adapter load (cold)`: the worker's `load_adapter` of a file not loaded yet (read, sha256, the file's checks
  again, `load_lora_weights`), with a cache of 1 so each switch evicts the other adapter (the worst case);
- `adapter switch (warm)`: both adapters loaded; setting one for a job and disabling it after (`applied`), what a
  job pays when its adapter is in the worker's cache (`MOCHI_LAB_LORA_CACHE`);
- `upload check`: `AdapterStore.put`'s checks and write, once per upload (not per job).

With `--job`, one small job's `generate` with and without the adapter, for scale. Run it on the machine whose
figures you report, and name it: times on a shared CPU VM vary from run to run.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
EVERY = ATTENTION + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "ff.net.0.proj", "ff.net.2",
                     "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "proj_out")


def make_adapter(path: Path, config: dict, *, seed: int, rank: int, targets: tuple[str, ...]) -> Path:
    """A LoRA of a transformer with `config` (random, non-zero), saved as diffusers saves one."""
    import torch
    from diffusers import MochiPipeline, MochiTransformer3DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    transformer = MochiTransformer3DModel(**config)
    torch.manual_seed(seed)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets),
                                       init_lora_weights=False))
    MochiPipeline.save_lora_weights(path.parent, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                    weight_name=path.name)
    return path


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def row(name: str, times: list[float], base: float | None = None) -> str:
    med = statistics.median(times)
    ratio = f"{base / med:>9.0f}x" if base else f"{'':>10}"
    return f"  {name:<26} {med * 1e3:>10.2f} {min(times) * 1e3:>10.2f} {ratio}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", choices=("attention", "every"), default="attention")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--job", action="store_true", help="also time one small job with and without the adapter")
    args = ap.parse_args()

    import torch

    from mochi_lab.adapters import AdapterStore, transformer_config
    from mochi_lab.config import Settings
    from mochi_lab.params import GenerationParams
    from mochi_lab.pipelines import load_runner
    from mochi_lab.worker.job import load_adapter

    data = Path(tempfile.mkdtemp(prefix="mochi-lora-bench-"))
    settings = Settings.from_env(data_dir=data, account="bench")
    targets = ATTENTION if args.targets == "attention" else EVERY
    config = transformer_config(args.model, settings.cache_dir)
    store = AdapterStore(settings.artifacts_dir, "bench", max_bytes=settings.max_adapter_bytes,
                         max_rank=settings.max_adapter_rank, max_count=settings.max_adapters)
    shas, uploads = [], []
    for name, seed in (("a", 1), ("b", 2)):
        path = make_adapter(data / "made" / f"{name}.safetensors", config, seed=seed, rank=args.rank,
                            targets=targets)
        blob = path.read_bytes()
        t0 = time.perf_counter()
        record = store.put(name, blob, model=args.model)
        uploads.append(time.perf_counter() - t0)
        shas.append(hashlib.sha256(blob).hexdigest())
    size = store.get("a")["bytes"]

    runner = load_runner(args.model, settings.cache_dir)  # the first load builds or reads the checkpoint
    params_m = sum(p.numel() for p in runner.pipe.transformer.parameters()) / 1e6  # before any adapter's layers
    reload = timed(lambda: load_runner(args.model, settings.cache_dir), args.repeats)

    cache = runner.lora
    cache.size = 1
    turn = [0]

    def cold() -> None:  # alternate a and b in a cache of 1: every load evicts the other one
        sha = shas[turn[0] % 2]
        turn[0] += 1
        load_adapter(cache, settings, "bench", args.model, "x", sha)
        cache.evict(keep=[sha])

    cold()  # the first adapter ever: peft's layers are added to the transformer (not a switch)
    cold_times = timed(cold, args.repeats)
    cache.size = 2
    for sha in shas:
        load_adapter(cache, settings, "bench", args.model, "x", sha)

    def warm() -> None:
        sha = shas[turn[0] % 2]
        turn[0] += 1
        with cache.applied([(sha, 0.8)]):
            pass

    warm_times = timed(warm, args.repeats)

    threads = torch.get_num_threads()
    print(f"lora_switch: model {args.model} ({params_m:.2f} M "
          f"transformer parameters, device {runner.device}, {threads} torch threads); adapters of rank {args.rank} "
          f"on {len(targets)} target names ({record['modules']} modules, {size / 2**20:.2f} MiB each); "
          f"{args.repeats} repeats")
    base = statistics.median(reload)
    print(f"  {'':<26} {'median ms':>10} {'min ms':>10} {'vs reload':>10}")
    print(row("model reload", reload))
    print(row("adapter load (cold)", cold_times, base))
    print(row("adapter switch (warm)", warm_times, base))
    print(row("upload check (once)", uploads))
    if args.job:
        params = GenerationParams.parse("a cat surfing a wave", seed=1, num_frames=7, height=32, width=32,
                                        num_inference_steps=4)
        plain = timed(lambda: runner.generate(params), args.repeats)

        def with_adapter() -> None:
            with cache.applied([(shas[0], 0.8)]):
                runner.generate(params)

        styled = timed(with_adapter, args.repeats)
        print(row("job, 7x32x32, 4 steps", plain))
        print(row("same job with adapter a", styled))
    return 0


if __name__ == "__main__":
    sys.exit(main())
