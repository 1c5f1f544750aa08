"""Export: a run's whole model (normalization, backbone, head, calibration, its task's activation) as one file.

The exported model takes what any image library gives after resizing and cropping (uint8 RGB, N x S x S x 3) and
returns what its head's task gives (stages.tasks): calibrated class probabilities (a softmax; a sigmoid per class
for a multi-label head, whose thresholds travel in the metadata), or values, and each image's familiarity (its
threshold in the metadata) where the run has a reference, so deployment code needs neither this project nor torch.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from stages.backbones import Backbone
from stages.errors import PipelineError
from stages.familiarity import Familiarity
from stages.head import Head

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
ONNX_EXTRA = ("onnx", "onnxruntime", "onnxscript")  # the exporter writes, onnxscript translates, the runtime checks
INPUT = "images"
FAMILIARITY_OUTPUT = "familiarity"


class DeployableClassifier(nn.Module):
    """uint8 RGB crops (N,S,S,3) -> probabilities (N,C), or values (N,1): normalization, backbone and head in one;
    with a familiarity reference (stages.familiarity), the familiarity scores (N,) as a second output."""

    def __init__(self, backbone: Backbone, head: Head, familiarity: Familiarity | None = None):
        super().__init__()
        pre = backbone.preprocessing
        self.backbone = backbone.model.float().eval()
        self.head = head.float().eval()
        self.familiarity = familiarity.eval() if familiarity is not None else None
        self.register_buffer("mean", torch.tensor(pre.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pre.std, dtype=torch.float32).view(1, 3, 1, 1))

    @property
    def outputs(self) -> list[str]:
        return [self.head.task.output, *([FAMILIARITY_OUTPUT] if self.familiarity is not None else [])]

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = (images.permute(0, 3, 1, 2).float() - self.mean) / self.std
        features = self.backbone(x)
        outputs = self.head.task.activation(self.head(features))
        return outputs if self.familiarity is None else (outputs, self.familiarity(features))


def deployment_metadata(
    backbone: Backbone, head: Head, classes: list[str], version: str, familiarity: Familiarity | None = None
) -> dict[str, str]:
    """What deployment code needs besides the graph: class names in output order, how to prepare a photo, the
    task, a multi-label head's threshold per class (a class is predicted when its probability reaches it), and the
    familiarity under which an image is unlike the training images."""
    pre = backbone.preprocessing
    preprocessing = {
        "resize": pre.resize,
        "crop": pre.size,
        "interpolation": f"{pre.interpolation}, antialiased (Pillow Image.{pre.interpolation.upper()})",
        "steps": f"shorter side to {pre.resize} (longer side floor(resize * long / short)), then the centre "
        f"{pre.size}x{pre.size} crop (offset round((side - crop) / 2), half to even)",
        "input": f"uint8 RGB, shape (N, {pre.size}, {pre.size}, 3); normalization is inside the model",
    }
    metadata = {
        "classes": json.dumps(classes),
        "preprocessing": json.dumps(preprocessing),
        "backbone": backbone.name,
        "weights_sha256": backbone.weights_sha256,
        "pipeline_version": version,
        "task": head.task.name,
    }
    if head.task.name == "multi":
        metadata["thresholds"] = json.dumps(dict(zip(classes, head.thresholds.tolist())))
    if familiarity is not None:
        metadata["familiarity_threshold"] = json.dumps(float(familiarity.threshold))
    return metadata


def require_onnx() -> None:
    """The ONNX exporter's packages are an optional extra: say how to install them when one is missing."""
    missing = []
    for name in ONNX_EXTRA:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise PipelineError(
            f"export to ONNX needs {', '.join(missing)}: pip install -e '.[export]' "
            "(in the project folder), or use --format torchscript"
        )


def export_onnx(module: DeployableClassifier, size: int, metadata: dict[str, str], path: Path) -> None:
    """One self-contained ONNX file (weights inside, dynamic batch), its metadata in metadata_props."""
    import onnx

    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            (example,),
            input_names=[INPUT],
            output_names=module.outputs,
            dynamo=True,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
    proto = program.model_proto
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    onnx.save_model(proto, str(path))


def export_torchscript(module: DeployableClassifier, size: int, metadata: dict[str, str], path: Path) -> None:
    """A traced TorchScript file; the metadata travels as extra files (torch.jit.load(..., _extra_files=...))."""
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example)
        torch.jit.save(traced, str(path), _extra_files={f"{key}.txt": value for key, value in metadata.items()})


def check_format(fmt: str) -> None:
    """A known format whose packages are installed."""
    if fmt not in FORMATS:
        raise PipelineError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_onnx()


def export_classifier(
    backbone: Backbone,
    head: Head,
    classes: list[str],
    path: Path,
    fmt: str,
    version: str,
    familiarity: Familiarity | None = None,
) -> dict[str, str]:
    """Write backbone, head (and familiarity) as one `fmt` file at `path`; returns the metadata written with it."""
    check_format(fmt)
    metadata = deployment_metadata(backbone, head, classes, version, familiarity)
    write = export_onnx if fmt == "onnx" else export_torchscript
    write(DeployableClassifier(backbone, head, familiarity), backbone.preprocessing.size, metadata, path)
    return metadata
