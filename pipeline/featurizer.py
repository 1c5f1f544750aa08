"""The computing part of featurize: decode and forward image files, handing their rows to a sink as it goes.

It knows nothing of how a run was planned (pipeline.featurize) or where it runs (this process, or a Ray actor:
pipeline.ray_engine); both use it and it imports neither. The store's partition writer is one sink; another (Parquet,
Lance, a vector database) is a class with the same `commit`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from stages.decode import ImageDecoder
from stages.files import Dataset, Fingerprint, read_image_file, stat_fingerprint
from stages.runner import FeatureRunner
from store import FileRecord, PendingRows, SplitRows, views_in


class FeatureSink(Protocol):
    def commit(self, rows: dict[str, SplitRows], feature_dtype: str) -> object:
        """Make the rows durable (per split: their file records and features), the features in `feature_dtype`."""


class FeaturizerSettings(Protocol):
    """What the featurizer reads of a run's options (pipeline.featurize.FeaturizeOptions)."""

    views: int
    batch_size: int
    seed: int
    dtype: str
    commit_every: int
    commit_seconds: float


class Featurizer:
    """Decode and forward the files to do, handing their rows to the sink as it goes (every commit_every rows or
    commit_seconds, and at the end)."""

    def __init__(
        self,
        opts: FeaturizerSettings,
        dataset: Dataset,
        backbone,
        sink: FeatureSink,
        device: str,
        precision: str,
        progress: Callable[[int, int], None] | None,
    ):
        self.opts, self.dataset, self.sink = opts, dataset, sink
        self.backbone, self.device, self.precision = backbone, device, precision
        self.progress = progress
        self.forward = FeatureRunner.for_backbone(backbone, device, precision)
        self.fingerprints: dict[str, Fingerprint] = {}
        self.decoders: dict[str, ImageDecoder] = {}
        self.pending = PendingRows(list(dataset.splits))
        self.last_commit = time.monotonic()
        self.done = 0
        self.skipped = 0

    def run(self, todo: list) -> None:
        total = len(todo)
        try:
            for split in self.dataset.splits:
                files = [f for s, f in todo if s == split]
                if files:
                    self._featurize_split(split, files, total)
        finally:
            self._commit()

    def _featurize_split(self, split: str, files: list, total: int) -> None:
        views = views_in(split, self.opts.views)
        if split not in self.decoders:  # one per split, its DALI pipeline built once (a Ray actor runs many blocks)
            self.decoders[split] = ImageDecoder(
                self.backbone.preprocessing,
                views=views,
                device=self.device,
                batch_size=self.opts.batch_size,
                seed=self.opts.seed,
                num_threads=torch.get_num_threads(),
            )
        decoder = self.decoders[split]
        labels = {f.path: f.label for f in files}
        for batch in decoder.decode((f.path, self._loader(f.path)) for f in files):
            for key, reason in batch.failed:
                fp = self.fingerprints.get(key) or _safe_stat(self.dataset.root / key)
                self.pending.add_skipped(split, self._record(key, labels[key], fp), reason)
                self.skipped += 1
            if batch.keys:
                features = self.forward(batch.images.flatten(0, 1)).cpu().numpy()
                for i, key in enumerate(batch.keys):
                    record = self._record(key, labels[key], self.fingerprints[key])
                    self.pending.add(split, record, features[i * (views + 1) : (i + 1) * (views + 1)], views + 1)
            self.done += len(batch.keys) + len(batch.failed)
            if self.progress:
                self.progress(self.done, total)
            if (
                self.pending.count >= self.opts.commit_every
                or time.monotonic() - self.last_commit >= self.opts.commit_seconds
            ):
                self._commit()

    @staticmethod
    def _record(key: str, label: int, fp: Fingerprint) -> FileRecord:
        return FileRecord(key, label, fp.size, fp.mtime_ns, fp.ctime_ns, fp.sha256)

    def _loader(self, key: str):
        def load():
            data, fp = read_image_file(self.dataset.root / key)
            self.fingerprints[key] = fp
            return data

        return load

    def _commit(self) -> None:
        self.sink.commit(self.pending.rows, self.opts.dtype)
        self.pending.clear()
        self.last_commit = time.monotonic()


def _safe_stat(path: Path) -> Fingerprint:
    try:
        return stat_fingerprint(path)
    except OSError:
        return Fingerprint(0, 0)
