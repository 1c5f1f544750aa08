"""What commands write: one writer per output, published whole, never replacing a run unasked; an interrupted
command says in one line what it kept."""

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, make_images, one_line_error, run_cli, run_json

from stages.atomic import locked_output

pytestmark = pytest.mark.slow  # every test here runs the CLI


def test_a_second_writer_of_any_output_is_refused_naming_the_first(trained, tmp_path):
    data, store, head = trained
    outputs = {
        "train-head": (("train-head", "--store", store), tmp_path / "head"),
        "lr-find": (("lr-find", "--store", store), tmp_path / "lr"),
        "audit": (("audit", "--store", store), tmp_path / "audit"),
        "evaluate": (("evaluate", head, data / "valid", "--store", store), tmp_path / "eval"),
        "inspect": (("inspect", data), tmp_path / "inspect"),
        "finetune": (("finetune", data, "--head", head, "--epochs", "1"), tmp_path / "ft"),
        "export": (("export", head), tmp_path / "model.onnx"),
    }
    for name, (command, out) in outputs.items():
        with locked_output(out, folder=name != "export"):  # held by this process, as a running command holds it
            proc = run_cli(*command, "--out", out, check=False)
        one_line_error(proc, f"--out {out} is being written by another command (pid ", "wait for it")
        assert not out.exists() or not any(out.iterdir()), name


def test_an_existing_run_is_replaced_only_with_overwrite(trained, tmp_path):
    data, store, head = trained
    before = {p.name: p.read_bytes() for p in head.iterdir() if p.is_file()}
    for command in (
        ("finetune", data, "--head", head, "--epochs", "1", "--out", head),  # its own head: refused, not destroyed
        ("train-head", "--store", store, "--head", "linear", "--out", head),
    ):
        one_line_error(run_cli(*command, check=False), f"--out {head} already holds a run", "--overwrite")
    assert {p.name: p.read_bytes() for p in head.iterdir() if p.is_file()} == before
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "checkpoint.pt").write_bytes(b"a fine-tune's checkpoint")
    one_line_error(
        run_cli("finetune", data, "--head", head, "--out", unfinished, check=False), "--resume", "--overwrite"
    )
    assert (unfinished / "checkpoint.pt").read_bytes() == b"a fine-tune's checkpoint"


def test_out_naming_a_file_or_a_foreign_folder_is_refused_before_any_work(trained, tmp_path):
    data, store, head = trained
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"mine too")
    for out, message in ((a_file, "is a file"), (foreign, "holds other files")):
        for command in (
            ("train-head", "--store", store),
            ("audit", "--store", store),
            ("evaluate", head, data / "valid", "--store", store),
            ("lr-find", "--store", store),
            ("inspect", data),
            ("finetune", data, "--head", head),
        ):
            one_line_error(run_cli(*command, "--out", out, check=False), f"--out {out}", message)
    assert a_file.read_text() == "mine" and (foreign / "holiday.jpg").read_bytes() == b"mine too"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["notes.txt", "photos"]


def test_reports_are_replaced_whole_and_runs_list_only_whole_runs(trained, tmp_path):
    data, store, head = trained
    first = run_json("audit", "--store", store, "--out", tmp_path / "audit")
    (tmp_path / "audit" / "stale.csv").write_text("from an older audit")
    again = run_json("audit", "--store", store, "--out", tmp_path / "audit")
    assert not (tmp_path / "audit" / "stale.csv").exists()  # the folder was replaced, not written into
    assert json.loads((tmp_path / "audit" / "audit.json").read_text())["seconds"] == again["seconds"]
    assert first["images"] == again["images"]
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def _start(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _interrupt_when(proc: subprocess.Popen, ready, sig=signal.SIGINT) -> str:
    deadline = time.monotonic() + 300
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the command ended before the point to interrupt it at"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted: ") and "Traceback" not in stderr, stderr
    return lines[0]


def test_an_interrupted_audit_leaves_nothing_and_says_so(tmp_path):
    from bench.synthetic import separable_features, write_feature_store

    store = write_feature_store(
        tmp_path / "s.h5", separable_features(40_000, dim=256, classes=3), classes=("a", "b", "c"), chunk_rows=1024
    )
    out = tmp_path / "audit"
    proc = _start("audit", "--store", store, "--out", out)
    line = _interrupt_when(proc, lambda: any(tmp_path.glob(".audit.tmp-*")), signal.SIGTERM)
    assert "nothing was written" in line and str(out) in line
    assert not out.exists() and not list(tmp_path.glob(".audit.tmp-*"))


def test_an_interrupted_fine_tune_says_where_its_checkpoint_is_and_resumes(trained, tmp_path):
    data, _, head = trained
    more = make_images(tmp_path / "data", {"train": {"a": 40, "b": 40, "c": 40}, "valid": {"a": 4, "b": 4, "c": 4}})
    out = tmp_path / "ft"
    args = ("finetune", more, "--head", head, "--epochs", "3", "--batch-size", "8", "--calibration-pct", "0")
    proc = _start(*args, "--out", out)
    line = _interrupt_when(proc, lambda: (out / "checkpoint.pt").is_file())
    assert f"the last checkpoint is in {out}; continue with --resume {out}" in line
    assert not (out / "config.json").exists()  # an unfinished run is no run: only its checkpoint
    resumed = run_json(*args, "--resume", out)
    assert len(resumed["history"]) == 3 and (out / "config.json").is_file() and (out / "checkpoint.pt").is_file()
