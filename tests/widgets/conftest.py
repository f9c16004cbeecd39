"""Widget tests drive real jobs on the session's pool, through each backend: `mochi` is the session's
direct handle, then a handle on the hub-authenticated gateway (a hub token and the URL, nothing else).
widget_helpers steps their polling."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session", params=["direct", "gateway"])
def mochi(request, mochi):
    if request.param == "direct":
        yield mochi
        return
    from mochi_lab import GatewayBackend, MochiCluster

    gateway, tokens = request.getfixturevalue("gateway"), request.getfixturevalue("tokens")
    cache = Path(request.getfixturevalue("tmp_path_factory").mktemp("widget-downloads"))
    with MochiCluster(backend=GatewayBackend(gateway.url, tokens["wendy"], cache_dir=cache)) as cluster:
        assert cluster.account == "wendy"
        yield cluster
