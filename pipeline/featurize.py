"""Featurize: image files -> DALI decode -> frozen backbone -> feature store, computing only what the store lacks."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import h5py
import numpy as np
import torch

from pipeline.distributed import Shard, current_shard
from pipeline.runtime import available_memory, cpu_count, torch_threads
from stages.backbones import (
    DEFAULT_BACKBONE,
    REGISTRY,
    FeatureRunner,
    backbone_identity,
    create_backbone,
    resolve_precision,
)
from stages.decode import Augmentation, ImageDecoder, batch_memory_bytes, resolve_device
from stages.errors import MAX_VIEWS, SEED_MAX, PipelineError, check_memory, check_range
from stages.files import Dataset, Fingerprint, content_sha256, read_image_file, scan_dataset, stat_fingerprint
from store.reader import FileRows, open_h5, split_file_index, split_skipped
from store.schema import FEATURE_DTYPES, ROW_COLUMNS, SETS, SKIPPED_COLUMNS, SPLITS, set_name
from store.verify import verify_split
from store.writer import (
    Journal,
    RowRun,
    SplitPlan,
    SplitRows,
    StoreLock,
    now_iso,
    remove_stale_temporaries,
    write_store,
)

Progress = Callable[[int, int], None]


@dataclass
class FeaturizeOptions:
    """Everything `featurize` needs; the CLI fills it from its options."""

    data_dir: Path
    store: Path
    backbone: str = DEFAULT_BACKBONE
    weights: Path | None = None
    arch: str | None = None
    views: int = 0
    seed: int = 0
    valid_pct: float | None = None
    dtype: str = "float16"
    precision: str = "auto"
    device: str = "auto"
    batch_size: int = 32
    commit_rows: int = 2048  # journal commit after this many rows (or commit_seconds), whichever comes first
    commit_seconds: float = 30.0
    num_shards: int = 1
    shard_id: int = 0
    threads: int | None = None  # torch's threads while featurizing; None: the cores, shared among local ranks


@dataclass
class _Decision:
    """What the run does with one current file of a split."""

    file_label: int
    fingerprint: Fingerprint
    source: str | None = None  # where reusable rows lie: "store" or a journal part name
    source_split: str | None = None  # the split of the source they lie in
    rows: FileRows | None = None
    skip_reason: str | None = None


@dataclass
class _Sources:
    """The old store's set and the journal's parts, opened read-only, newest first for lookups."""

    files: dict[str, h5py.File | h5py.Group] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    damaged: dict[tuple[str, str], set[str] | None] = field(default_factory=dict)  # paths not to reuse; None: all
    indexes: dict[tuple[str, str], tuple] = field(default_factory=dict)  # built once per (source, split)

    def add(self, name: str, root, newest: bool) -> None:
        self.files[name] = root
        self.order.insert(0, name) if newest else self.order.append(name)

    def groups(self, split: str):
        for name in self.order:
            if split in self.files[name] and self.damaged.get((name, split), ()) is not None:
                yield name, self.files[name][split]

    def index(self, name: str, group: h5py.Group) -> tuple[dict[str, FileRows], dict[str, dict]]:
        """The reusable files of a source's split: its index less the files whose rows failed verification."""
        key = (name, group.name.rsplit("/", 1)[-1])
        if key not in self.indexes:
            bad = self.damaged.get(key, set())
            self.indexes[key] = (
                {k: v for k, v in split_file_index(group).items() if k not in bad},
                {k: v for k, v in split_skipped(group).items() if k not in bad},
            )
        return self.indexes[key]

    def verify_store(self, old_set: h5py.Group, where: str) -> list[str]:
        """Check every byte of the old store's set; damaged files are featurized again. Returns notes."""
        notes = []
        for split in [s for s in old_set if isinstance(old_set[s], h5py.Group)]:
            damage = verify_split(old_set[split])
            if not damage:
                continue
            if damage.columns:
                self.damaged["store", split] = None
                notes.append(
                    f"{where} {split}: {damage.describe()} failed verification; every {split} image is featurized again"
                )
                continue
            paths = old_set[split]["paths"][()]
            bad = {(p.decode() if isinstance(p, bytes) else p) for a, b in damage.rows for p in paths[a:b]}
            self.damaged["store", split] = bad
            notes.append(
                f"{where} {split}: {damage.describe()} failed verification; featurized again: "
                f"{', '.join(sorted(bad)[:5])}{' ...' if len(bad) > 5 else ''}"
            )
        return notes


def open_journal_part(part: Path) -> tuple[h5py.File | None, str | None]:
    """A journal part opened and verified; a damaged one is renamed PART.damaged and its rows done again."""
    try:
        f = h5py.File(part, "r", locking=False)
        try:
            damage = {s: verify_split(f[s]) for s in f if isinstance(f[s], h5py.Group)}
        except (OSError, KeyError) as exc:
            damage = {"part": str(exc).splitlines()[0][:80]}
        if not any(damage.values()):
            return f, None
        f.close()
        reason = "; ".join(f"{s}: {d.describe() if hasattr(d, 'describe') else d}" for s, d in damage.items() if d)
    except OSError as exc:
        reason = str(exc).splitlines()[0][:80]
    aside = part.with_name(part.name + ".damaged")
    os.replace(part, aside)
    return None, f"journal part {part} is damaged ({reason}); set aside as {aside.name}, its images featurized again"


def set_identity(backbone: dict, views: int, seed: int, precision: str, dtype: str) -> dict:
    """The fields that make two feature sets interchangeable: the backbone's identity and these settings."""
    return {
        **backbone,
        "views": views,
        "seed": seed,
        "augmentation": Augmentation().to_dict() if views else None,
        "precision": precision,
        "dtype": dtype,
    }


def _library_versions() -> dict:
    import nvidia.dali
    import timm

    return {
        "torch": torch.__version__,
        "dali": nvidia.dali.__version__,
        "timm": timm.__version__,
        "h5py": h5py.__version__,
        "numpy": np.__version__,
    }


def _views_in(split: str, views: int) -> int:
    """Augmented views are stored for training images only; valid and test keep the plain view."""
    return views if split == "train" else 0


def _decide(dataset: Dataset, sources: _Sources, views: int) -> tuple[dict[str, dict[str, _Decision]], list]:
    """For every current file: reuse rows whose fingerprint matches, keep a known-bad record, or featurize anew."""
    decisions: dict[str, dict[str, _Decision]] = {}
    todo = []
    for split, files in dataset.splits.items():
        count = _views_in(split, views) + 1
        # The same split first; with no augmented views a file's row is the same in any split (--valid-pct changed).
        others = [s for s in SPLITS if s != split and _views_in(s, views) + 1 == count]
        indexes = [(name, src, *sources.index(name, g)) for src in [split, *others] for name, g in sources.groups(src)]
        decisions[split] = {}
        for f in files:
            path = dataset.root / f.path
            try:
                fp = stat_fingerprint(path)
            except OSError as exc:
                decisions[split][f.path] = _Decision(
                    f.label, Fingerprint(0, 0), skip_reason=f"cannot read: {exc.strerror}"
                )
                continue
            decision = _Decision(f.label, fp)
            same_size = False
            for name, src, index, skipped in indexes:
                rows, bad = index.get(f.path), skipped.get(f.path)
                if rows and rows.count == count and fp.same_stat(rows.size, rows.mtime_ns, rows.ctime_ns):
                    decision.source, decision.source_split, decision.rows = name, src, rows
                    decision.fingerprint = replace(fp, sha256=rows.sha256)
                    break
                if bad and fp.same_stat(bad["size"], bad["mtime_ns"], bad["ctime_ns"]):
                    decision.skip_reason, decision.fingerprint = bad["reason"], replace(fp, sha256=bad["sha256"])
                    break
                same_size |= bool(rows and rows.count == count and rows.size == fp.size)
            else:
                if same_size:  # touched but perhaps unchanged: the content hash decides
                    _reuse_by_content(decision, dataset.root / f.path, indexes, f.path, count)
            if decision.source is None and decision.skip_reason is None:
                todo.append((split, f))
            decisions[split][f.path] = decision
    return decisions, todo


def _reuse_by_content(decision: _Decision, path: Path, indexes, key: str, count: int) -> None:
    try:
        sha = content_sha256(path.read_bytes())
    except OSError:
        return
    for name, src, index, _ in indexes:
        rows = index.get(key)
        if rows and rows.count == count and rows.sha256 == sha:
            decision.source, decision.source_split, decision.rows = name, src, rows
            decision.fingerprint = replace(decision.fingerprint, sha256=sha)
            return


class _Run:
    """The featurizing part of a run: decode and forward the files to do, committing to the journal as it goes."""

    def __init__(
        self,
        opts: FeaturizeOptions,
        dataset: Dataset,
        backbone,
        journal: Journal,
        device: str,
        precision: str,
        progress: Progress | None,
    ):
        self.opts, self.dataset, self.journal = opts, dataset, journal
        self.backbone, self.device, self.precision = backbone, device, precision
        self.progress = progress
        self.forward = FeatureRunner(
            backbone.model, device, precision, backbone.preprocessing.size, cache_key=backbone.weights_sha256
        )
        self.fingerprints: dict[str, Fingerprint] = {}
        self.pending = {split: SplitRows() for split in dataset.splits}
        self.pending_rows = 0
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
        decoder = ImageDecoder(
            self.backbone.preprocessing,
            views=_views_in(split, self.opts.views),
            device=self.device,
            batch_size=self.opts.batch_size,
            seed=self.opts.seed,
            num_threads=torch.get_num_threads(),
        )
        labels = {f.path: f.label for f in files}
        for batch in decoder.decode((f.path, self._loader(f.path)) for f in files):
            for key, reason in batch.failed:
                self._add_skipped(split, key, reason)
            if batch.keys:
                images = batch.images.flatten(0, 1)
                features = self.forward(images).cpu().numpy()
                self._add_rows(split, batch.keys, labels, features, batch.images.shape[1])
            self.done += len(batch.keys) + len(batch.failed)
            if self.progress:
                self.progress(self.done, total)
            if (
                self.pending_rows >= self.opts.commit_rows
                or time.monotonic() - self.last_commit >= self.opts.commit_seconds
            ):
                self._commit()

    def _loader(self, key: str):
        def load():
            data, fp = read_image_file(self.dataset.root / key)
            self.fingerprints[key] = fp
            return data

        return load

    def _add_rows(self, split: str, keys: list[str], labels: dict, features: np.ndarray, views: int) -> None:
        rows = self.pending[split]
        rows.features.append(features)
        for key in keys:
            fp = self.fingerprints[key]
            for view in range(views):
                for name, value in (
                    ("labels", labels[key]),
                    ("paths", key),
                    ("view", view),
                    ("size", fp.size),
                    ("mtime_ns", fp.mtime_ns),
                    ("ctime_ns", fp.ctime_ns),
                    ("sha256", fp.sha256),
                ):
                    rows.columns[name].append(value)
        self.pending_rows += len(keys) * views

    def _add_skipped(self, split: str, key: str, reason: str) -> None:
        fp = self.fingerprints.get(key) or _safe_stat(self.dataset.root / key)
        for name, value in (
            ("paths", key),
            ("reasons", reason),
            ("size", fp.size),
            ("mtime_ns", fp.mtime_ns),
            ("ctime_ns", fp.ctime_ns),
            ("sha256", fp.sha256),
        ):
            self.pending[split].skipped[name].append(value)
        self.skipped += 1

    def _commit(self) -> None:
        self.journal.commit(self.pending, self.opts.dtype)
        self.pending = {split: SplitRows() for split in self.dataset.splits}
        self.pending_rows = 0
        self.last_commit = time.monotonic()


def _safe_stat(path: Path) -> Fingerprint:
    try:
        return stat_fingerprint(path)
    except OSError:
        return Fingerprint(0, 0)


def _plan(dataset: Dataset, decisions, sources: _Sources, views: int) -> dict[str, SplitPlan]:
    """The new content of every split, in path order: reused and new rows, and the skipped files."""
    plans = {}
    for split, files in dataset.splits.items():
        count = _views_in(split, views) + 1
        fresh = {}
        for name, g in sources.groups(split):
            if name.startswith("new:"):
                for key, rows in split_file_index(g).items():
                    fresh.setdefault(key, (name, rows))
                for key, bad in split_skipped(g).items():
                    fresh.setdefault(key, (name, bad))
        runs: list[RowRun] = []
        columns = {k: [] for k in ROW_COLUMNS}
        skipped = {k: [] for k in SKIPPED_COLUMNS}
        for f in files:
            d = decisions[split][f.path]
            if d.source is None and d.skip_reason is None and f.path in fresh:
                name, found = fresh[f.path]
                if isinstance(found, FileRows):
                    d.source, d.source_split, d.rows = name, split, found
                    d.fingerprint = Fingerprint(found.size, found.mtime_ns, found.sha256, found.ctime_ns)
                else:
                    d.skip_reason = found["reason"]
                    d.fingerprint = Fingerprint(found["size"], found["mtime_ns"], found["sha256"], found["ctime_ns"])
            if d.source is not None:
                last = runs[-1] if runs else None
                if (
                    last
                    and (last.source, last.split) == (d.source, d.source_split)
                    and last.start + last.count == d.rows.start
                ):
                    runs[-1] = RowRun(last.source, last.start, last.count + count, last.split)
                else:
                    runs.append(RowRun(d.source, d.rows.start, count, d.source_split))
                for view in range(count):
                    for name, value in (
                        ("labels", d.file_label),
                        ("paths", f.path),
                        ("view", view),
                        ("size", d.fingerprint.size),
                        ("mtime_ns", d.fingerprint.mtime_ns),
                        ("ctime_ns", d.fingerprint.ctime_ns),
                        ("sha256", d.fingerprint.sha256),
                    ):
                        columns[name].append(value)
            elif d.skip_reason is not None:
                for name, value in (
                    ("paths", f.path),
                    ("reasons", d.skip_reason),
                    ("size", d.fingerprint.size),
                    ("mtime_ns", d.fingerprint.mtime_ns),
                    ("ctime_ns", d.fingerprint.ctime_ns),
                    ("sha256", d.fingerprint.sha256),
                ):
                    skipped[name].append(value)
        plans[split] = SplitPlan(runs, columns, skipped)
    return plans


def _up_to_date(old_set: h5py.Group | None, plans: dict[str, SplitPlan], classes: list[str], rewrite: bool) -> bool:
    """True when the new content equals the old store's byte for byte: then the store is left untouched."""
    import json

    if old_set is None or rewrite or json.loads(old_set.attrs.get("classes", "[]")) != classes:
        return False
    if set(plans) != set(old_set):
        return False
    for split, plan in plans.items():
        old = old_set[split]
        if not old["features"].fletcher32:  # written before checksums: rewritten once, with them
            return False
        n = old["features"].shape[0]
        if plan.runs != ([RowRun("store", 0, n, split)] if n else []):
            return False
        for name in ("labels", "mtime_ns", "ctime_ns"):
            if name not in old or not np.array_equal(
                old[name][()], np.asarray(plan.columns[name], dtype=old[name].dtype)
            ):
                return False
        if sorted(split_skipped(old)) != sorted(plan.skipped["paths"]):
            return False
    return True


def featurize(opts: FeaturizeOptions, progress: Progress | None = None) -> dict:
    """Bring the store's feature set for these settings up to date with the data folder; return a summary.

    Sharded (torchrun ranks, or --num-shards/--shard-id), each process featurizes its share of the missing files
    into its own journal parts; then torchrun's rank 0, or a later plain run, merges every part into the store.
    """
    started = time.perf_counter()
    if opts.dtype not in FEATURE_DTYPES:
        raise PipelineError(f"--dtype {opts.dtype!r} is not one of {', '.join(FEATURE_DTYPES)}")
    for option, value, low, high in (
        ("--views", opts.views, 0, MAX_VIEWS),
        ("--batch-size", opts.batch_size, 1, None),
        ("--commit-every", opts.commit_rows, 1, None),
        ("--seed", opts.seed, 0, SEED_MAX),
        ("--num-shards", opts.num_shards, 1, None),
    ):
        check_range(option, value, low, high)
    check_range("--shard-id", opts.shard_id, 0, opts.num_shards - 1)
    store_path = Path(opts.store)
    if not store_path.parent.exists():
        store_path.parent.mkdir(parents=True, exist_ok=True)
    dataset = scan_dataset(opts.data_dir, opts.valid_pct, opts.seed)
    device = resolve_device(opts.device)
    shard = current_shard(opts.num_shards, opts.shard_id, device)
    precision = resolve_precision(opts.precision, device)
    # A registered backbone's identity is known without building it: an up-to-date store answers at once.
    backbone = None
    known = backbone_identity(opts.backbone, opts.weights, opts.arch)
    if known is None:
        backbone = create_backbone(opts.backbone, opts.weights, opts.arch)
        known = backbone.identity()
    check_memory(
        f"--batch-size {opts.batch_size} x (--views {opts.views} + 1)",
        batch_memory_bytes(opts.batch_size, opts.views, known["preprocessing"]["size"]),
        available_memory(),
        f"{opts.batch_size} images x {opts.views + 1} decoded views",
    )
    identity = set_identity(known, opts.views, opts.seed, precision, opts.dtype)
    job = _Job(opts, dataset, backbone, identity, device, precision, store_path, progress)
    if shard.count == 1:
        with StoreLock(store_path):
            remove_stale_temporaries(store_path)
            return job.run(shard, merge=True, started=started)
    with StoreLock(store_path, shared=True):
        mine = job.run(shard, merge=False, started=started)
    if not shard.distributed:
        return mine
    import torch.distributed as dist

    ranks = [None] * shard.count
    dist.all_gather_object(ranks, {k: mine[k] for k in ("shard", "featurized", "images_per_second")})  # a barrier too
    if shard.index != 0:
        return mine
    with StoreLock(store_path):
        merged = job.run(Shard(), merge=True, started=started)
    featurized = sum(r["featurized"] for r in ranks)
    return {
        **merged,
        "shards": ranks,
        "featurized": featurized,
        "reused": merged["reused"] - featurized,
        "images_per_second": round(sum(r["images_per_second"] or 0 for r in ranks), 1) or None,
    }


class _Job:
    """One featurize invocation's settings, run for one shard with or without merging into the store."""

    def __init__(self, opts, dataset, backbone, identity, device, precision, store_path, progress):
        self.opts, self.dataset, self._backbone, self.identity = opts, dataset, backbone, identity
        self.device, self.precision, self.store_path, self.progress = device, precision, store_path, progress
        self.name = set_name(identity)

    def backbone(self):
        """The backbone, built on first need: a run with nothing to compute never builds it."""
        if self._backbone is None:
            opts = self.opts
            self._backbone = create_backbone(opts.backbone, opts.weights, opts.arch)
            if self._backbone.identity()["weights_sha256"] != self.identity["weights_sha256"]:
                raise PipelineError(f"the weights of {opts.backbone} changed while featurizing; rerun")
        return self._backbone

    def weights_path(self) -> str:
        if self._backbone is not None:
            return self._backbone.weights_path
        return str(REGISTRY[self.opts.backbone].weights_path(self.opts.backbone, self.opts.weights))

    def run(self, shard: Shard, merge: bool, started: float) -> dict:
        opts, dataset, name, store_path = self.opts, self.dataset, self.name, self.store_path
        journal = Journal(store_path, name, shard.index)
        old = open_h5(store_path) if store_path.exists() else None
        parts = []
        try:
            old_set = old[SETS][name] if old is not None and SETS in old and name in old[SETS] else None
            sources = _Sources()
            repairs = []
            if old_set is not None:
                sources.add("store", old_set, newest=False)
                repairs += sources.verify_store(old_set, f"store {store_path}")
            for part in journal.parts():
                opened, note = open_journal_part(part)
                if note:
                    repairs.append(note)
                    continue
                parts.append(opened)
                sources.add(f"part:{part.name}", opened, newest=True)
            rewrite = bool(parts) or bool(sources.damaged)  # parts to merge, or damage to repair
            decisions, todo = _decide(dataset, sources, opts.views)
            if shard.count > 1:  # a file's shard follows from its place in the whole data set, not in what is left
                place = {
                    (split, f.path): i
                    for i, (split, f) in enumerate((split, f) for split, files in dataset.splits.items() for f in files)
                }
                todo = [(split, f) for split, f in todo if place[split, f.path] % shard.count == shard.index]
            reused = sum(1 for split in decisions.values() for d in split.values() if d.source)
            run, interrupted, loop_seconds = None, False, 0.0
            if todo:
                run = _Run(opts, dataset, self.backbone(), journal, self.device, self.precision, self.progress)
                loop_started = time.perf_counter()
                try:
                    with torch_threads(opts.threads or cpu_count() // shard.local_count):
                        run.run(todo)
                except KeyboardInterrupt:
                    interrupted = True  # what was decoded is committed; write the store with it, then stop
                loop_seconds = time.perf_counter() - loop_started
                for part in journal.parts():
                    if f"part:{part.name}" not in sources.files:
                        parts.append(h5py.File(part, "r", locking=False))
                        sources.add(f"new:{part.name}", parts[-1], newest=True)
            computed = run.done - run.skipped if run else 0
            counts = {
                "featurized": computed,
                "reused": reused,
                "seconds": round(time.perf_counter() - started, 3),
                "images_per_second": round(computed / loop_seconds, 1) if computed else None,
                "interrupted": interrupted,
                "set": name,
                "store": str(store_path),
                "device": self.device,
                "precision": self.precision,
                "backbone": self.identity["backbone"],
                "views": opts.views,
            }
            if not merge:
                return {
                    **counts,
                    "shard": shard.label,
                    "merged": False,
                    "up_to_date": False,
                    "notes": repairs + [f"{shard.label}: parts in {journal.dir}; a run without --shard-id merges them"],
                }
            plans = _plan(dataset, decisions, sources, opts.views)
            up_to_date = not todo and _up_to_date(old_set, plans, dataset.classes, rewrite)
            if not up_to_date:
                attrs = {
                    **self.identity,
                    "classes": dataset.classes,
                    "data_dir": str(Path(opts.data_dir).resolve()),
                    "weights_path": self.weights_path(),
                    **{k: v for k, v in dataset.describe().items() if v is not None},
                    "versions": _library_versions(),
                    "device": self.device,
                    "created": old_set.attrs.get("created", now_iso()) if old_set is not None else now_iso(),
                    "updated": now_iso(),
                }
                write_store(
                    store_path, name, attrs, plans, sources.files, self.identity["feature_dim"], opts.dtype, old
                )
        finally:
            for f in parts:
                f.close()
            if old is not None:
                old.close()
        if not up_to_date:
            journal.clear()
        skipped = [
            {"split": s, "path": p, "reason": plan.skipped["reasons"][i]}
            for s, plan in plans.items()
            for i, p in enumerate(plan.skipped["paths"])
        ]
        return {
            **counts,
            "data_dir": str(opts.data_dir),
            "up_to_date": up_to_date,
            "merged": True,
            "images": {s: len(set(p.columns["paths"])) for s, p in plans.items()},
            "rows": {s: len(p.columns["paths"]) for s, p in plans.items()},
            "skipped": skipped,
            "classes": dataset.classes,
            "store_bytes": os.path.getsize(store_path),
            "notes": dataset.notes + repairs,
        }
