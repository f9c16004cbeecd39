"""MkDocs hooks: pages whose content comes from the code at build time, so they cannot drift from it.

- `reference/openapi.json`: the gateway's OpenAPI document, from the app itself (rendered by Swagger UI on
  the REST page, and summed up there as a table of routes);
- `<!-- cli-help -->`: every `mochi-lab` command's `--help`, from the CLI's own parser;
- `<!-- gateway-routes -->`: the route table;
- `<!-- constants: NAME ... -->`: a table of the package's constants and their values;
- `<!-- config-vars -->`: every environment variable, by the config that reads it (`mochi_lab.config`);
- `<!-- include: PATH -->` / `<!-- include: PATH section: HEADING -->`: another README of the repository
  (deployment, experiments, benchmarks, notebooks), or one section of it, included rather than copied; a
  section that is not there fails the build.

The app is built with a hub URL that is never called: building the OpenAPI document reads no store, starts
no Ray and makes no request.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from functools import cache
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File

OPENAPI = "reference/openapi.json"
INCLUDE = re.compile(r"<!-- include: (\S+?)(?: section: (.+?))? -->")
REPO = Path(__file__).resolve().parents[1]
CONSTANTS = re.compile(r"<!-- constants: ([A-Za-z_ ]+) -->")


@cache
def openapi() -> dict[str, Any]:
    # a hub URL so the app can be built (it needs a hub or static tokens); no request is made to it
    os.environ.setdefault("JUPYTERHUB_API_URL", "http://127.0.0.1:9/hub/api/")
    from mochi_lab.gateway.app import create_app

    return create_app(backend_factory=lambda: None).openapi()


def routes_table() -> str:
    lines = ["| method | path | what it does |", "| --- | --- | --- |"]
    for path, ops in openapi()["paths"].items():
        for method, op in ops.items():
            what = (op.get("description") or op.get("summary") or "").strip().split("\n\n")[0]
            what = " ".join(what.split()).replace("|", "\\|")
            lines.append(f"| `{method.upper()}` | `{path}` | {what} |")
    return "\n".join(lines)


def _subparsers(p: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    found = []
    for action in p._actions:  # argparse keeps its subcommands here and nowhere public
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append((name, sub))
                found.extend((f"{name} {n}", s) for n, s in _subparsers(sub))
    return found


def cli_help() -> str:
    from mochi_lab.cli import parser

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal; the page's width is fixed
    top = parser()
    blocks = [("mochi-lab --help", top.format_help())]
    blocks += [(f"mochi-lab {name} --help", sub.format_help()) for name, sub in _subparsers(top)]
    return "\n\n".join(f"### `{cmd[:-7]}`\n\n```text\n$ {cmd}\n{text.rstrip()}\n```" for cmd, text in blocks)


def on_files(files, config):
    files.append(File.generated(config, OPENAPI, content=json.dumps(openapi(), indent=1)))
    return files


def constants_table(names: list[str]) -> str:
    """Module constants (set by tuple assignment, which the docstring collector cannot follow), from the face."""
    import mochi_lab

    rows = [f"| `mochi_lab.{name}` | `{getattr(mochi_lab, name)!r}` |" for name in names]
    return "\n".join(["| name | value |", "| --- | --- |", *rows])


CONFIGS = ("StoreConfig", "WorkerConfig", "PoolConfig", "Settings", "ClientConfig", "GatewayConfig", "ScalingConfig")


def config_vars_table() -> str:
    """Each config's own variables (a subclass's inherited ones are listed with its base), from `env_vars()`."""
    from pydantic_core import PydanticUndefined

    from mochi_lab import config

    lines = ["| config | variable | field | default |", "| --- | --- | --- | --- |"]
    for name in CONFIGS:
        cls = getattr(config, name)
        inherited = {v for base in cls.__mro__[1:] if hasattr(base, "env_vars") for v in base.env_vars().values()}
        for field, var in cls.env_vars().items():
            if var in inherited:
                continue
            info = cls.model_fields[field]
            value = str(info.default) if isinstance(info.default, Path) else info.default
            default = "computed" if value is PydanticUndefined else f"`{value!r}`"
            lines.append(f"| `{name}` | `{var}` | `{field}` | {default} |")
    return "\n".join(lines)


def include(path: str, section: str | None) -> str:
    text = (REPO / path).read_text()
    if section is None:
        return text
    lines = text.splitlines()
    for i, line in enumerate(lines):
        level = len(line) - len(line.lstrip("#"))
        if level and line[level:].strip().startswith(section):
            end = next((j for j in range(i + 1, len(lines))
                        if lines[j].startswith("#") and len(lines[j]) - len(lines[j].lstrip("#")) <= level), len(lines))
            return "\n".join(lines[i + 1:end]).strip() + "\n"
    raise ValueError(f"{path} has no section {section!r} (included by the docs)")


def on_page_markdown(markdown: str, page, config, files) -> str:
    markdown = INCLUDE.sub(lambda m: include(m.group(1), m.group(2)), markdown)
    markdown = CONSTANTS.sub(lambda m: constants_table(m.group(1).split()), markdown)
    if "<!-- gateway-routes -->" in markdown:
        markdown = markdown.replace("<!-- gateway-routes -->", routes_table())
    if "<!-- config-vars -->" in markdown:
        markdown = markdown.replace("<!-- config-vars -->", config_vars_table())
    if "<!-- cli-help -->" in markdown:
        markdown = markdown.replace("<!-- cli-help -->", cli_help())
    return markdown
