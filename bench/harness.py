"""Benchmark harness: ours and a reference alternate (A B A B ...), medians and pair-by-pair ratios, saved results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"  # real photos (../shared/data/README.md), never in the repository


@dataclass
class Row:
    """One figure of a benchmark: ours, the reference, and ours/reference (reference/ours when lower is better)."""

    figure: str
    ours: float | None
    reference: float | None = None
    unit: str = ""
    higher_is_better: bool = True
    note: str = ""
    pairs: list = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.reference in (None, 0) or self.ours == 0:
            return None
        return self.ours / self.reference if self.higher_is_better else self.reference / self.ours


def alternate(ours: Callable[[], float], reference: Callable[[], float], pairs: int) -> tuple[float, float, list]:
    """Run A B A B ... and return the medians and each pair's (ours, reference)."""
    results = []
    for _ in range(pairs):
        results.append((ours(), reference()))
    return statistics.median(a for a, _ in results), statistics.median(b for _, b in results), results


def machine() -> dict:
    """CPU model, cores, GPU and library versions, for the record."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import h5py
    import nvidia.dali
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dali": nvidia.dali.__version__,
        "h5py": h5py.__version__,
    }


def run_json_command(args: list[str], env: dict | None = None, timeout: float = 3600) -> tuple[dict, float]:
    """Run a command that prints JSON on stdout; return it and the wall seconds."""
    started = time.perf_counter()
    proc = subprocess.run(
        args, capture_output=True, text=True, cwd=REPO, timeout=timeout, env={**os.environ, **(env or {})}
    )
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout), seconds


def pipeline_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "pipeline", *map(str, args), "--json"]


def torchrun_cmd(processes: int, *args) -> list[str]:
    """A pipeline command launched by torchrun on this machine alone, `processes` ranks."""
    return [
        *[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)],
        *["-m", "pipeline", *map(str, args)],
    ]


def peak_rss_command(args: list[str]) -> tuple[dict, float, float]:
    """Run a JSON-printing command under /usr/bin/time -v when present: (result, wall seconds, peak RSS MB)."""
    timer = Path("/usr/bin/time")
    if not timer.exists():
        result, seconds = run_json_command(args)
        return result, seconds, float("nan")
    started = time.perf_counter()
    proc = subprocess.run([str(timer), "-v", *args], capture_output=True, text=True, cwd=REPO)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    peak = next(int(line.split(":")[1]) for line in proc.stderr.splitlines() if "Maximum resident" in line)
    return json.loads(proc.stdout), seconds, peak / 1024


def report(name: str, rows: list[Row], extra: dict | None = None) -> dict:
    """Print the table, write bench/results/<name>.json and <name>.md; return the record."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bench {name}")
    for column in ("figure", "ours", "reference", "ratio", "unit", "note"):
        table.add_column(column, justify="right" if column in ("ours", "reference", "ratio") else "left")

    def fmt(v):
        return "-" if v is None else f"{v:,.4g}" if isinstance(v, float) else str(v)

    for r in rows:
        table.add_row(
            r.figure, fmt(r.ours), fmt(r.reference), "-" if r.ratio is None else f"{r.ratio:.2f}x", r.unit, r.note
        )
    Console(width=160).print(table)
    record = {
        "name": name,
        "machine": machine(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rows": [{**r.__dict__, "ratio": r.ratio} for r in rows],
        **(extra or {}),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    m = record["machine"]
    lines = [
        f"# bench {name}",
        "",
        f"{record['when']}; {m['cpu']}, {m['cores']} cores, GPU {m['gpu'] or 'none'}; "
        f"torch {m['torch']}, DALI {m['dali']}, h5py {m['h5py']}",
        "",
        "| figure | ours | reference | ratio | unit | note |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.figure} | {fmt(r.ours)} | {fmt(r.reference)} | {'-' if r.ratio is None else f'{r.ratio:.2f}x'} "
        f"| {r.unit} | {r.note} |"
        for r in rows
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    return record
