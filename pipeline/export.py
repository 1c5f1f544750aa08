"""export: a run directory as one ONNX (or TorchScript) file for deployment without this project."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from stages.atomic import atomic_output, locked_output
from stages.errors import PipelineError
from stages.export import FAMILIARITY_OUTPUT, FORMATS, INPUT, check_format, export_classifier
from stages.familiarity import load_familiarity


def pipeline_version() -> str:
    try:
        return version("pipeline")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _check_writable(path: Path) -> None:
    folder = path.parent
    if not folder.is_dir():
        raise PipelineError(f"--out {path}: the folder {folder} does not exist; create it or choose another path")
    if path.is_dir():
        raise PipelineError(f"--out {path} is a folder; give a file name such as {path / 'model.onnx'}")
    if not os.access(folder, os.W_OK):
        raise PipelineError(f"--out {path}: the folder {folder} is not writable; choose another path")


@dataclass
class ExportResult:
    """The file written: where, its format and size, its input and output, the classes and its metadata."""

    out: str
    format: str
    bytes: int
    seconds: float
    input: str
    output: str
    classes: list[str]
    metadata: dict[str, str]
    precision: str  # the file's: fp32 (ONNX Runtime's CPU kernels have no bf16 convolutions)
    precision_note: str | None  # set when the run's own metrics were measured in another

    def to_json(self) -> dict:
        return asdict(self)


def export_run(run_dir: Path, out: Path | None = None, fmt: str = "onnx") -> ExportResult:
    """Write a train-head or finetune run as one file; returns where, its size, format and metadata."""
    from stages.model import load_run

    check_format(fmt)  # before loading anything: a missing extra is said at once
    out = Path(out) if out is not None else Path(run_dir) / f"model{FORMATS[fmt]}"
    _check_writable(out)
    with locked_output(out, folder=False):  # a second export to the same file is refused at once
        backbone, head, config = load_run(run_dir)
        started = time.perf_counter()
        try:
            with atomic_output(out) as tmp:
                familiarity = load_familiarity(run_dir)
                metadata = export_classifier(backbone, head, config.classes, tmp, fmt, pipeline_version(), familiarity)
        except OSError as exc:
            raise PipelineError(
                f"--out {out} could not be written ({exc.strerror or exc}); choose another path"
            ) from None
    size = backbone.preprocessing.size
    return ExportResult(
        out=str(out),
        format=fmt,
        bytes=out.stat().st_size,
        seconds=time.perf_counter() - started,
        input=f"{INPUT}: uint8 (N, {size}, {size}, 3) RGB",
        output=f"{head.task.output}: float32 (N, {head.task.outputs(len(config.classes))})"
        + (f"; {FAMILIARITY_OUTPUT}: float32 (N,)" if familiarity is not None else ""),
        classes=config.classes,
        metadata=metadata,
        precision="fp32",
        precision_note=None
        if config.precision == "fp32"
        else f"the file computes in fp32 (ONNX Runtime has no bf16 convolutions on CPUs); the run's metrics were "
        f"measured in {config.precision}: its probabilities differ slightly from the run's",
    )
