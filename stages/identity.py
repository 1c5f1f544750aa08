"""A feature set's identity: what makes two sets of features interchangeable, in one place.

Built from a backbone and the featurize settings, written to and read from a store set's attributes, named and
compared here and nowhere else. It lives with the stages that make the features (a run records the identity of the
features its head was trained on, stages/rundir.py; a trace cache keys on the backbone's part, stages/runner.py);
the store records and compares it through its public face (`store.FeatureSetIdentity`). A leaf module: it imports
nothing of this project.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace

# The fields a head depends on: features of another backbone, weights or preprocessing mean nothing to it. The
# rest (views, seed, augmentation, precision, dtype) make another set of the same features.
BACKBONE_FIELDS = ("backbone", "arch", "weights_sha256", "preprocessing", "feature_dim")
FEATURE_DTYPE = "float16"  # stored features' default dtype: half the bytes of float32, the same head accuracy


@dataclass(frozen=True)
class FeatureSetIdentity:
    """Two feature sets are interchangeable exactly when their identities are equal."""

    backbone: str
    arch: str
    weights_sha256: str
    preprocessing: dict  # size, resize, mean, std (0-255 scale)
    feature_dim: int
    views: int = 0
    seed: int = 0
    augmentation: dict | None = None
    precision: str = "fp32"
    dtype: str = FEATURE_DTYPE

    @classmethod
    def of(cls, backbone, **settings) -> FeatureSetIdentity:
        """From a backbone (stages.backbones.Backbone: name, arch, weights_sha256, preprocessing, feature_dim) and
        the settings that make its features (views, seed, augmentation, precision, dtype)."""
        return cls(
            backbone=backbone.name,
            arch=backbone.arch,
            weights_sha256=backbone.weights_sha256,
            preprocessing=backbone.preprocessing.to_dict(),
            feature_dim=backbone.feature_dim,
            **settings,
        )

    @classmethod
    def from_dict(cls, values: dict) -> FeatureSetIdentity:
        """From a set's attributes (JSON already decoded) or a run's record of them; other keys are ignored."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def to_dict(self) -> dict:
        return asdict(self)

    def to_attrs(self) -> dict:
        """As HDF5 attributes: dicts and None as JSON text (the README's schema)."""
        return {k: json.dumps(v) if v is None or isinstance(v, dict) else v for k, v in self.to_dict().items()}

    @property
    def name(self) -> str:
        """The set's group name in a store: the backbone's name and a short hash of the whole identity."""
        digest = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.backbone.replace('/', '_').replace('@', '_')}-{digest}"

    def backbone_part(self) -> dict:
        """The fields that describe the backbone alone (what its compiled forward pass depends on)."""
        return {k: getattr(self, k) for k in BACKBONE_FIELDS}

    def first_difference(self, other: FeatureSetIdentity) -> str | None:
        """The first backbone field in which two identities differ, or None when they agree on all of them."""
        return next((k for k in BACKBONE_FIELDS if getattr(self, k) != getattr(other, k)), None)

    def compatible_with(self, other: FeatureSetIdentity) -> bool:
        """Whether a head trained on features of one can use the other's: the same backbone, weights and
        preprocessing (views, seed, precision and dtype may differ)."""
        return self.first_difference(other) is None

    def with_weights(self, weights_sha256: str) -> FeatureSetIdentity:
        """The same settings with other weights of the backbone (a fine-tuned backbone)."""
        return replace(self, weights_sha256=weights_sha256)
