"""Synthetic feature stores for tests and benchmarks, written with plain h5py from the README schema."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

SET_NAME = "efficientnet_lite0-test"


def _new_set(f, dim: int, dtype, classes, views: int, backbone: str):
    """The store's root attributes and one feature set's group, as featurize writes them."""
    identity = {
        "backbone": backbone,
        "arch": "tf_efficientnet_lite0",
        "weights_sha256": "0" * 64,
        "preprocessing": json.dumps({"size": 224, "resize": 256, "mean": [127.5] * 3, "std": [127.5] * 3}),
        "feature_dim": int(dim),
        "views": views,
        "seed": 0,
        "augmentation": "null",
        "precision": "fp32",
        "dtype": str(np.dtype(dtype)),
    }
    f.attrs["schema_version"] = 1
    group = f.create_group("sets").create_group(f"{backbone}-test")
    for key, value in {**identity, "classes": json.dumps(list(classes)), "updated": "now"}.items():
        group.attrs[key] = value
    return group


def _columns(g, split: str, labels, view, views: int) -> None:
    """The per-row columns of a split: labels, view, a path per image and a distinct content hash per row."""
    import h5py

    n = len(labels)
    g.create_dataset("labels", data=np.asarray(labels, np.int32))
    g.create_dataset("view", data=np.asarray(view, np.uint8))
    per_image = views + 1 if split == "train" else 1
    g.create_dataset("paths", data=[f"{split}/{i // per_image}.jpg" for i in range(n)], dtype=h5py.string_dtype())
    for name in ("size", "mtime_ns", "ctime_ns"):
        g.create_dataset(name, data=np.zeros(n, np.int64))
    digests = [hashlib.sha256(f"{split}/{i // per_image}".encode()).hexdigest().encode() for i in range(n)]
    g.create_dataset("sha256", data=np.array(digests, "S64"))


def write_feature_store(
    path: Path,
    train: tuple,
    valid: tuple | None = None,
    classes=("a", "b"),
    views: int = 0,
    backbone: str = "efficientnet_lite0",
    chunk_rows: int = 64,
    checksums: bool = True,
) -> Path:
    """A store written with plain h5py from the schema in README.md: (features, labels, view) per split; the
    features with Fletcher-32 checksums as featurize writes them, or without (to measure what they cost)."""
    import h5py

    with h5py.File(path, "w") as f:
        group = _new_set(f, train[0].shape[1], train[0].dtype, classes, views, backbone)
        for split, content in (("train", train), ("valid", valid)):
            if content is None:
                continue
            features, labels, view = content
            g = group.create_group(split)
            g.create_dataset(
                "features",
                data=features,
                chunks=(min(chunk_rows, len(features)), features.shape[1]),
                fletcher32=checksums,
            )
            _columns(g, split, labels, view, views)
    return path


def write_blob_store(
    path: Path,
    n: int,
    dim: int = 1280,
    classes: int = 5,
    valid_share: float = 0.1,
    seed: int = 0,
    flips: float = 0.0,
    copies: float = 0.0,
) -> tuple[Path, set[str], set[tuple[str, str]]]:
    """A store of n rows, written block by block so that it need not fit in memory: Gaussian blobs, one per class
    (7 standard deviations apart, as real features are), a share of them in valid, a share `flips` of the labels
    moved to the next class (label errors to find) and a share `copies` of the rows made near-copies of the row
    before them (cosine about 0.999). Returns the path, the flipped rows' paths and the planted pairs' paths."""
    import h5py

    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, dim), dtype=np.float32) * 0.15
    counts = {"train": n - int(n * valid_share), "valid": int(n * valid_share)}
    block = 65536
    flipped: set[str] = set()
    planted: set[tuple[str, str]] = set()
    with h5py.File(path, "w") as f:
        group = _new_set(f, dim, np.float16, [chr(ord("a") + c) for c in range(classes)], 0, "efficientnet_lite0")
        for split, count in counts.items():
            g = group.create_group(split)
            chunks = (min(1024, count), dim)
            features = g.create_dataset("features", (count, dim), np.float16, chunks=chunks, fletcher32=True)
            labels = np.empty(count, np.int32)
            for start in range(0, count, block):
                k = min(block, count - start)
                truth = rng.integers(0, classes, k)
                x = rng.standard_normal((k, dim), dtype=np.float32) + means[truth]
                copied = np.flatnonzero(rng.random(k) < copies)
                copied = copied[(copied > 0) & ~np.isin(copied - 1, copied)]  # pairs, not chains
                x[copied] = x[copied - 1] + 0.05 * rng.standard_normal((len(copied), dim), dtype=np.float32)
                truth[copied] = truth[copied - 1]
                features[start : start + k] = x.astype(np.float16)
                flip = rng.random(k) < flips
                labels[start : start + k] = np.where(flip, (truth + 1) % classes, truth)
                flipped |= {f"{split}/{start + i}.jpg" for i in np.flatnonzero(flip)}
                planted |= {(f"{split}/{start + i - 1}.jpg", f"{split}/{start + i}.jpg") for i in copied}
            _columns(g, split, labels, np.zeros(count, np.uint8), 0)
    return path, flipped, planted


def separable_features(
    n: int, dim: int = 32, classes: int = 2, seed: int = 0, views: int = 0, dtype=np.float16, noise: float = 1.0
):
    """Gaussian blobs around one mean per class: (features, labels, view) with views+1 rows per sample."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(classes, dim))
    labels = np.repeat(np.arange(n) % classes, views + 1)
    view = np.tile(np.arange(views + 1), n)
    features = centres[labels] + rng.normal(0, noise, size=(len(labels), dim)) + rng.normal(5, 1, size=dim)
    return features.astype(dtype), labels, view
