"""The fault-injection suite, CI-sized (issue 10); the full run is ``python -m e2e.faults --full``.

Each test drives one fault (see e2e/faults.py) and asserts behaviour only: the resources converge, and
there is no duplicate alarm e-mail, no duplicate test message, no lost change, no ghost and no
unexpected reconciler error. Timings are recorded (printed at the end of the module), never asserted.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e.controlplane import ControlPlane
from e2e.faults import CI, SCENARIOS, Record, World, table
from e2e.fixtures import Dev

from smtp_oauth_operator.testing.devservers import DevServers

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

_RECORDS: list[Record] = []

# Faults the operator does not survive yet, each a bug report of its own (strict: once fixed, the test
# passes, pytest reports XPASS as a failure, and the entry must go).
KNOWN: dict[str, str] = {}


@pytest.fixture(scope="module")
def world(k8s_bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    # A control plane of its own: these tests restart the API server and etcd.
    workdir = tmp_path_factory.mktemp("faults")
    with (
        ControlPlane(k8s_bin_dir) as cp,
        DevServers(workdir / "devservers", client_secret="e2e~faults-default-unused") as servers,
    ):
        w = World(cp, Dev(servers, "e2e~faults-default-unused"), workdir)
        w.setup()
        yield w
    print("\n" + table(_RECORDS))


@pytest.mark.parametrize(
    "scenario",
    [
        pytest.param(name, marks=pytest.mark.xfail(reason=KNOWN[name], strict=True))
        if name in KNOWN
        else name
        for name in SCENARIOS
    ],
)
def test_fault(world: World, scenario: str) -> None:
    record = SCENARIOS[scenario](world, CI)
    _RECORDS.append(record)
    print(record)
    assert not record.problems(), f"{record.fault}: {record.problems()}\n{record}"
