"""The benchmark's CI mode (``python -m e2e.bench --ci``) runs to the end and writes its results.

It starts its own control plane (the API server needs an audit policy), the fake Entra ID and
Exchange and the operator, so it runs as a child process. Timings are never asserted: this test
fails only if the benchmark itself breaks (an exception, resources never Ready, a missing section).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from e2e.controlplane import BIN_DIR_ENV, REPO_ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_bench_ci_mode_completes(k8s_bin_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    env = {**os.environ, BIN_DIR_ENV: str(k8s_bin_dir)}
    proc = subprocess.run(
        [sys.executable, "-m", "e2e.bench", "--ci", "--out", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    results = json.loads((out / "results.json").read_text())
    for section in ("overhead", "scale", "api", "idle"):
        assert section in results, sorted(results)
    assert results["params"]["mode"] == "ci"
    overhead, scale, api, idle = (results[k] for k in ("overhead", "scale", "api", "idle"))
    assert overhead["rounds"] == len(overhead["create_to_ready_all_s"]) > 0
    assert overhead["floor_median_s"] > 0
    assert overhead["ratio"] > 0
    # Every resource became Ready (the wait raises otherwise) and was really tested.
    assert scale["smtp_auth_ok"] >= scale["resources"]
    assert scale["token_requests"] >= scale["token_requests_floor"]
    assert api["per_reconcile"]["status_patches"] > 0
    assert "writes" in api["steady_state"]
    assert "reads" in api["steady_state"]
    assert idle["resources"] >= results["params"]["idle"]
    assert idle["window_seconds"] > 0
    assert idle["rss_mib_max"] > 0
    assert (out / "results.txt").read_text().startswith("smtp-oauth-operator benchmark")
