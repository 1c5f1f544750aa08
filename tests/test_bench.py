"""The benchmark entry point runs from a fresh install (figures are not checked here)."""
import json
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_bench_quick_runs_and_writes_results():
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick"], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("featurize", "heads", "stream", "scale"):
        record = json.loads((REPO / "bench" / "results" / f"{name}-quick.json").read_text())
        assert record["rows"] and record["machine"]["cores"] >= 1
        assert (REPO / "bench" / "results" / f"{name}-quick.md").exists()
    assert "featurize default vs torchvision fp32" in proc.stdout
