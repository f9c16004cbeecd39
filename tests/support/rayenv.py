"""The environment the tests' Ray processes run with, and a clean one for a process that must not inherit the
session's Ray, Redis or mochi_lab settings but starts a Ray of its own."""

from __future__ import annotations

import os

# Ray starts its worker processes at niceness 15 (its worker_niceness), where anything else busy on the machine
# takes nearly all the CPU from them: a pool's actors loading a model beside two busy processes got ~1/30 of a
# core each and missed every deadline. The tests' Ray processes run at the pytest process's own priority.
TEST_RAY_PRIORITY = {"RAY_worker_niceness": "0"}


def clean_env(*prefixes: str) -> dict[str, str]:
    """This process's environment without the variables starting with `prefixes`, with the tests' Ray priority."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith(prefixes)}, **TEST_RAY_PRIORITY}
