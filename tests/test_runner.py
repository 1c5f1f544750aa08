"""The backbone's forward pass: its frozen trace kept in the user's cache, loaded instead of built, never stale."""

import hashlib

import pytest
import torch
from torch import nn

from stages.backbones import Backbone, FeatureExtractor, Preprocessing
from stages.runner import FeatureRunner, trace_key


def tiny_backbone(weights_file, seed: int = 0) -> Backbone:
    """A small conv net standing in for a registered backbone, its 'weights' a real file whose hash it carries."""
    weights_file.write_bytes(f"weights {seed}".encode())

    def build() -> FeatureExtractor:
        torch.manual_seed(seed)
        body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        body[1].running_mean.uniform_(-1, 1)  # a BatchNorm that folding has to get right
        return FeatureExtractor(body, nn.Linear(8, 4), 8, "fc")

    return Backbone(
        name="tiny",
        arch="tiny",
        preprocessing=Preprocessing.from_crop_pct(32, 0.875, (127.5,) * 3, (127.5,) * 3),
        weights_sha256=hashlib.sha256(weights_file.read_bytes()).hexdigest(),
        weights_path=str(weights_file),
        feature_dim=8,
        build=build,
    )


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty user cache, and a process that has traced nothing yet."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(FeatureRunner, "_frozen", {})
    return tmp_path / "cache" / "pipeline" / "traces"


def fresh_process():
    FeatureRunner._frozen.clear()


def test_a_cached_trace_runs_without_building_the_backbone(cache, tmp_path):
    images = torch.rand(5, 3, 32, 32) * 2 - 1
    first = tiny_backbone(tmp_path / "w.bin")
    features = FeatureRunner.for_backbone(first, "cpu", "fp32")(images)
    with torch.no_grad():
        assert torch.allclose(features, first.model(images), atol=1e-5)  # the trace computes the model
    assert len(list(cache.glob("*.pt"))) == 1
    fresh_process()
    again = tiny_backbone(tmp_path / "w.bin")
    assert torch.equal(FeatureRunner.for_backbone(again, "cpu", "fp32")(images), features)
    assert not again.built  # loaded from the cache: nothing built, nothing traced


def test_damaged_cached_trace_is_traced_again(cache, tmp_path):
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    features = FeatureRunner.for_backbone(tiny_backbone(tmp_path / "w.bin"), "cpu", "fp32")(images)
    (path,) = cache.glob("*.pt")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    fresh_process()
    again = tiny_backbone(tmp_path / "w.bin")
    assert torch.equal(FeatureRunner.for_backbone(again, "cpu", "fp32")(images), features)
    assert again.built  # the damaged file was not used
    (repaired,) = cache.glob("*.pt")
    assert hashlib.sha256(repaired.read_bytes()).hexdigest() == repaired.name.split(".")[1]


def test_other_weights_or_precision_never_reuse_a_trace(cache, tmp_path):
    a = tiny_backbone(tmp_path / "a.bin", seed=0)
    b = tiny_backbone(tmp_path / "b.bin", seed=1)
    assert len({trace_key(a, "fp32"), trace_key(b, "fp32"), trace_key(a, "bf16")}) == 3
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    fa = FeatureRunner.for_backbone(a, "cpu", "fp32")(images)
    fb = FeatureRunner.for_backbone(b, "cpu", "fp32")(images)
    assert b.built and not torch.allclose(fa, fb)
    assert len(list(cache.glob("*.pt"))) == 2


def test_the_cache_keeps_the_most_recent_traces(cache, tmp_path, monkeypatch):
    monkeypatch.setattr("stages.runner.TRACES_KEPT", 2)
    for seed in range(3):
        FeatureRunner.for_backbone(tiny_backbone(tmp_path / f"{seed}.bin", seed), "cpu", "fp32")
    assert len(list(cache.glob("*.pt"))) == 2
