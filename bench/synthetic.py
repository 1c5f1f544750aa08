"""Synthetic feature stores for tests and benchmarks, written with plain h5py from the README schema."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


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

    identity = {
        "backbone": backbone,
        "arch": "tf_efficientnet_lite0",
        "weights_sha256": "0" * 64,
        "preprocessing": json.dumps({"size": 224, "resize": 256, "mean": [127.5] * 3, "std": [127.5] * 3}),
        "feature_dim": int(train[0].shape[1]),
        "views": views,
        "seed": 0,
        "augmentation": "null",
        "precision": "fp32",
        "dtype": str(train[0].dtype),
    }
    with h5py.File(path, "w") as f:
        f.attrs["schema_version"] = 1
        group = f.create_group("sets").create_group(f"{backbone}-test")
        for key, value in {**identity, "classes": json.dumps(list(classes)), "updated": "now"}.items():
            group.attrs[key] = value
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
            g.create_dataset("labels", data=np.asarray(labels, np.int32))
            g.create_dataset("view", data=np.asarray(view, np.uint8))
            g.create_dataset(
                "paths",
                data=[f"{split}/{i // (views + 1 if split == 'train' else 1)}.jpg" for i in range(len(labels))],
                dtype=h5py.string_dtype(),
            )
            for name in ("size", "mtime_ns", "ctime_ns"):
                g.create_dataset(name, data=np.zeros(len(labels), np.int64))
            g.create_dataset("sha256", data=np.array([b"0" * 64] * len(labels)), dtype="S64")
    return path


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
