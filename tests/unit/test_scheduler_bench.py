"""bench/placement runs end to end on a small cluster and writes its JSON result."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_placement_bench_smoke(tmp_path):
    out = tmp_path / "placement.json"
    subprocess.run(
        [sys.executable, "-m", "bench.placement.run", "--nodes", "50", "--models", "100", "--repeats", "1",
         "--out", str(out)],
        check=True, capture_output=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    result = json.loads(out.read_text())
    assert result["replicas"] == 400 and result["placer"]["placed"] == 400
    assert result["planner"]["cold_assignments"] == 400 and result["planner"]["steady_writes"] == 0
    assert result["meets_target"]
