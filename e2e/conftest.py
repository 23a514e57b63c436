"""Shared fixtures for the e2e tests: a real etcd + kube-apiserver on loopback.

Fixtures:
- ``k8s_bin_dir`` (session): the bin dir with etcd, kube-apiserver, kubectl, helm and
  kube-controller-manager (``$SMTPOAUTH_K8S_BIN_DIR``, or built/reused by
  ``hack/k8s-tools.sh all``).
- ``control_plane`` (session): a started :class:`e2e.controlplane.ControlPlane` (etcd +
  kube-apiserver only, like envtest: no garbage collector, no namespace deletion, no default
  ServiceAccounts); stopped at the end of the session (its work dir with logs is kept if a
  test failed). Start your own ``ControlPlane(k8s_bin_dir, controller_manager=True)`` when a
  test needs the controllers.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_REPO_ROOT = Path(__file__).resolve().parent.parent
if str(_REPO_ROOT) not in sys.path:  # plain `python3 -m pytest e2e/...` without the pyproject config
    sys.path.insert(0, str(_REPO_ROOT))

from e2e.controlplane import ControlPlane, ensure_tools  # noqa: E402


@pytest.fixture(scope="session")
def k8s_bin_dir() -> Path:
    return ensure_tools(["all"])


@pytest.fixture(scope="session")
def control_plane(k8s_bin_dir: Path, request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    cp = ControlPlane(k8s_bin_dir)
    cp.start()
    try:
        yield cp
    finally:
        if request.session.testsfailed:
            cp.keep_workdir = True  # keep the logs for a look
        cp.stop()


# The operator's e2e fixtures (crds, dev, operator, ns): see e2e/fixtures.py.
pytest_plugins = ["e2e.fixtures"]
