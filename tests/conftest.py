"""Fixtures shared by the end-to-end modules: a real ocpp-package CSMS and a node before it.

Both are module-scoped: each test module gets its own CSMS and node subprocess.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.nodeproc import NodeProcess, start_node
from tests.peers import edge_config, node_env
from tests.peers.ocpp_csms import Csms


@pytest.fixture(scope="module")
def csms() -> Iterator[Csms]:
    with Csms() as server:
        yield server


@pytest.fixture(scope="module")
def node(
    csms: Csms, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[NodeProcess]:
    directory = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    proc = start_node(edge_config(csms.url), directory, env=node_env())
    try:
        yield proc
    finally:
        proc.stop()
