"""The thin client's cost: its size on disk, and the time from `import mochi_lab` to a handle on a gateway.

  python benchmarks/thin_client.py sizes [--extras "" notebook] [--keep DIR]
  JUPYTERHUB_API_TOKEN=... python benchmarks/thin_client.py connect --python VENV/bin/python --gateway URL [--runs 7]

`sizes` installs a copy of this repository into a fresh venv per extra (`pip install .`, `pip install .[notebook]`;
pip's cache makes a second run fast) and prints the venv's site-packages on disk, with and without pip and
setuptools (which every venv starts with), its distribution count, and which of torch, diffusers, transformers,
ray, fastapi and uvicorn `pip list` shows (none, for these extras). `connect` runs, in fresh processes of
`--python`, `import mochi_lab` then `MochiCluster(<gateway>)` (which asks the gateway who the token is and which
models it serves: two round trips), and prints each part's median wall time over the runs, the whole's CPU time
(what a busy machine's wall time inflates), and what else got imported.
Both print one JSON object per line (tests/client/test_thin_client.py runs `connect` against a real gateway).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.support, from a clone of the repository
from tests.support.venvs import HEAVY, clean_env, clone, make_venv, pip_list, run, site_packages_bytes  # noqa: E402

SEEDED = ("pip", "setuptools", "pkg_resources", "_distutils_hack", "distutils")  # what `python -m venv` puts there

# Run by the measured python: timings of one cold start, and what it imported beyond the standard library.
CONNECT = """
import json, os, sys, time
t0, c0 = time.perf_counter(), time.process_time()
import mochi_lab
from mochi_lab import MochiCluster
t1, c1 = time.perf_counter(), time.process_time()
cluster = MochiCluster(sys.argv[1])
t2, c2 = time.perf_counter(), time.process_time()
tops = sorted({m.split(".")[0] for m in sys.modules} - set(sys.stdlib_module_names) - {"mochi_lab"})
print(json.dumps({"import_s": t1 - t0, "connect_s": t2 - t1, "total_s": t2 - t0, "total_cpu_s": c2 - c0,
                  "account": cluster.account, "imported": [m for m in tops if not m.startswith("_")]}))
"""


def sizes(extras: list[str], keep: Path | None) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="thin-client-") as tmp:
        root = keep or Path(tmp)
        src = clone(root / "clone")
        env = clean_env()
        for extra in extras:
            python = make_venv(root / f"venv-{extra or 'plain'}", env)
            target = f"{src}[{extra}]" if extra else str(src)
            run([python, "-m", "pip", "install", "-q", target], env, timeout=1800)
            installed = pip_list(python, env)
            row = {"install": f"pip install .{f'[{extra}]' if extra else ''}",
                   "site_packages_mb": round(site_packages_bytes(python, env) / 1e6, 1),
                   "without_pip_setuptools_mb": round(site_packages_bytes(python, env, leave_out=SEEDED) / 1e6, 1),
                   "distributions": len(installed), "heavy": sorted(set(HEAVY) & set(installed))}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def connect(python: str, gateway: str, runs: int) -> dict:
    env = clean_env()
    token = os.environ.get("JUPYTERHUB_API_TOKEN")
    if not token:
        raise SystemExit("connect: set JUPYTERHUB_API_TOKEN to a token the gateway accepts")
    env["JUPYTERHUB_API_TOKEN"] = token
    samples = []
    for _ in range(runs):
        out = subprocess.run([python, "-c", CONNECT, gateway], env=env, capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise SystemExit(f"connect: {python} exited {out.returncode}:\n{out.stderr[-3000:]}")
        samples.append(json.loads(out.stdout.strip().splitlines()[-1]))
    keys = ("import_s", "connect_s", "total_s", "total_cpu_s")
    row = {key: round(statistics.median(s[key] for s in samples), 3) for key in keys}
    row.update(runs=runs, max_total_s=round(max(s["total_s"] for s in samples), 3), account=samples[-1]["account"],
               imported=samples[-1]["imported"], python=python)
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    s = sub.add_parser("sizes", help="site-packages of fresh venvs per extra")
    s.add_argument("--extras", nargs="+", default=["", "notebook"], help='extras to install ("" is plain)')
    s.add_argument("--keep", type=Path, default=None, help="build the venvs here and keep them")
    c = sub.add_parser("connect", help="import mochi_lab and MochiCluster(<gateway>) in fresh processes")
    c.add_argument("--python", required=True, help="the python of a venv with the thin client")
    c.add_argument("--gateway", required=True, help="the gateway's URL")
    c.add_argument("--runs", type=int, default=7)
    args = parser.parse_args(argv)
    if args.what == "sizes":
        sizes(args.extras, args.keep)
    else:
        connect(args.python, args.gateway, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
