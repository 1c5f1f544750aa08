"""The frozen backbone's forward pass, as fast as the device allows.

On the CPU, batch norm is folded into the convolutions in fp32, then the model is cast, traced and frozen, which
fuses the activations into the convolutions (Lite0: 1.3x in fp32, 1.6x in bf16, features at cosine 0.997 or better
to fp32 on real photos). Building and tracing take seconds, so the frozen trace is kept in the user's cache, keyed
by everything it depends on; a later run loads it and never imports the model's library.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import warnings
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from stages.atomic import atomic_output
from stages.backbones import Backbone, cache_dir
from stages.identity import FeatureSetIdentity

TRACES_KEPT = 8  # frozen traces kept in the user's cache (about 13 MB each for Lite0 in fp32), least recent dropped


def fold_batchnorm(model: nn.Module, input_size: int) -> int:
    """Fold every eval-mode BatchNorm that directly consumes a convolution's output into that convolution.

    Done in fp32 before any cast to bf16, so that the folded weights carry no extra rounding; each folded
    BatchNorm is left as an exact identity (its activation, if any, still runs). Returns how many were folded.
    """
    produced, pairs, hooks = [], [], []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(lambda m, inputs, out: produced.append((out, m))))
        elif isinstance(module, nn.BatchNorm2d):
            hooks.append(
                module.register_forward_pre_hook(
                    lambda m, inputs: pairs.append((next((c for t, c in produced if t is inputs[0]), None), m))
                )
            )
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
    finally:
        for hook in hooks:
            hook.remove()
    folded = 0
    with torch.no_grad():
        for conv, bn in pairs:
            if conv is None or bn.running_mean is None:
                continue
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.bias)
            conv.bias = nn.Parameter(bias * scale + bn.bias - bn.running_mean * scale)
            bn.running_mean.zero_()
            bn.running_var.fill_(1)
            bn.weight.fill_(1)
            bn.bias.zero_()
            bn.eps = 0.0
            folded += 1
    return folded


class FeatureRunner:
    """Runs a frozen backbone's forward pass on one device and precision: an eager module, or a frozen trace."""

    # Frozen traces by key: TorchScript never frees what a trace compiles (about 57 MB for Lite0), so a process
    # that loads the same backbone again reuses the first.
    _frozen: dict[str, torch.jit.ScriptModule] = {}

    def __init__(self, module: nn.Module, device: str, precision: str):
        self.module = module
        self.device = torch.device(device)
        self.dtype = _dtype(precision)
        self.autocast = precision == "bf16" and self.device.type != "cpu"

    @classmethod
    def for_model(cls, model: nn.Module, device: str, precision: str, input_size: int) -> FeatureRunner:
        """A model made fast: traced and frozen on the CPU (eager when it cannot be traced), as it is elsewhere."""
        model = model.to(device=torch.device(device), memory_format=torch.channels_last).eval()
        if torch.device(device).type != "cpu":
            return cls(model, device, precision)
        dtype = _dtype(precision)
        return cls(_freeze(model, dtype, input_size) or model.to(dtype), device, precision)

    @classmethod
    def for_backbone(cls, backbone: Backbone, device: str, precision: str) -> FeatureRunner:
        """A backbone's runner; on the CPU its frozen trace comes from this process or the user's cache when the same
        backbone, precision and code were traced before (the backbone is then never built)."""
        size = backbone.preprocessing.size
        if torch.device(device).type != "cpu":
            return cls.for_model(backbone.model, device, precision, size)
        key = trace_key(backbone, precision)
        frozen = cls._frozen.get(key) or _load_trace(key)
        if frozen is None:
            runner = cls.for_model(backbone.model, device, precision, size)
            if not isinstance(runner.module, torch.jit.ScriptModule):
                return runner
            frozen = runner.module
            _save_trace(key, frozen)
        cls._frozen[key] = frozen
        return cls(frozen, device, precision)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features (N,D) in float32 for a batch of normalized images (N,3,H,W)."""
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            if not self.autocast:
                images = images.to(self.dtype)
            return self.module(images).float()


def _dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _freeze(model: nn.Module, dtype: torch.dtype, size: int) -> torch.jit.ScriptModule | None:
    example = torch.zeros(2, 3, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)
    try:
        model = copy.deepcopy(model)
        fold_batchnorm(model, size)
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            return torch.jit.freeze(torch.jit.trace(model.to(dtype), example))
    except Exception:  # tracing is an optimisation; any model still runs eagerly
        return None


def trace_key(backbone: Backbone, precision: str) -> str:
    """What a frozen trace depends on: the backbone's identity, the precision, the libraries' versions and the code
    that builds and traces it (this module and the registry's): any change makes a new key, never a stale trace."""
    versions = {package: package_version(package) for package in ("torch", "timm", "torchvision")}
    code = hashlib.sha256()
    for module in (__file__, Path(__file__).with_name("backbones.py")):
        code.update(Path(module).read_bytes())
    identity = FeatureSetIdentity.of(backbone).backbone_part()
    facts = {"identity": identity, "precision": precision, "versions": versions, "code": code.hexdigest()}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]


def package_version(package: str) -> str | None:
    """An installed package's version, from its metadata (nothing imported); None when it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _traces() -> Path:
    return cache_dir() / "traces"


def _trace_file(key: str, digest: str) -> Path:
    """A cached trace is named KEY.SHA256.pt: what it is for, and the hash its bytes must have."""
    return _traces() / f"{key}.{digest}.pt"


def _load_trace(key: str) -> torch.jit.ScriptModule | None:
    """The cached trace of a key, if its bytes still hash to the digest in its name."""
    for path in _traces().glob(f"{key}.*.pt"):
        try:
            data = path.read_bytes()
            if _trace_file(key, hashlib.sha256(data).hexdigest()) != path:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = torch.jit.load(io.BytesIO(data), map_location="cpu")
            os.utime(path)  # most recently used: kept longest
            return module
        except Exception:  # a damaged or unreadable trace is traced again
            continue
    return None


def _save_trace(key: str, module: torch.jit.ScriptModule) -> None:
    """Best effort: a trace that cannot be cached only costs tracing again next time."""
    try:
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(module, buffer)
        data = buffer.getvalue()
        folder = _traces()
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"{key}.*.pt"):
            stale.unlink(missing_ok=True)
        with atomic_output(_trace_file(key, hashlib.sha256(data).hexdigest())) as tmp:
            tmp.write_bytes(data)
        traces = [p for p in folder.glob("*.pt") if not p.name.startswith(".")]  # not another writer's temporary
        kept = sorted(traces, key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kept[TRACES_KEPT:]:
            old.unlink(missing_ok=True)
    except Exception:
        pass
