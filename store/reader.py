"""Read a feature store: validate it, list its feature sets, hand out features and per-row columns."""

from __future__ import annotations

import copy
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from stages.errors import PipelineError
from stages.labels import LabelOptions, LabelSource, recorded_options, relabel_stored
from store.locks import hold_shared
from store.partition_file import open_partition_file, partition_id
from store.paths import StorePaths
from store.schema import (
    PARTITION_IDS,
    PARTITIONS,
    READABLE_VERSIONS,
    ROW_COLUMNS,
    SETS,
    SKIPPED,
    SPLITS,
    STR,
    TABLE_OF,
    UNKNOWN_CTIME,
    SetRecord,
)
from store.snapshot import (
    ROW_TABLES,
    SELF,
    SetSnapshot,
    decode_attr,
    mapping_problem,
    partition_rows,
    read_snapshot,
    source_dataset,
)
from store.verify import (
    CheckedDataset,
    check_values,
    length_problems,
    read_or_fail,
    value_problem,
    verify_split,
)


class FileRows(NamedTuple):
    """Where one source file's rows lie in a split, the fingerprint they were computed from and their label. (A named
    tuple: an update makes one per stored file.)"""

    start: int
    count: int
    size: int
    mtime_ns: int
    sha256: str
    ctime_ns: int = UNKNOWN_CTIME
    label: int = -1  # as the source's classes index it


def open_root(path: Path, hold: bool = False, missing: dict[str, str] | None = None) -> h5py.File:
    """Open an existing store read-only, turning every way it can be wrong into one clear error. With hold, the
    reader holds a shared lock on the root it opened, so that the partitions of this snapshot outlive any update
    until it is closed (store.compact.collect_garbage deletes a partition only once no reader holds a root that
    maps it). With `missing` (featurize, repairing), partitions the root maps that are gone or cannot be opened are
    put in it (name: what is wrong) instead of refusing the store: the caller then never reads through the root's
    virtual datasets."""
    if not path.exists():
        raise PipelineError(f"store {path} does not exist; create it with: pipeline featurize DATA_DIR --store {path}")
    if path.is_dir():
        raise PipelineError(f"store {path} is a folder; give the path of an .h5 file")
    if not h5py.is_hdf5(str(path)):
        raise PipelineError(
            f"store {path} is not an HDF5 file; give a store written by pipeline featurize or choose a new --store path"
        )
    while True:
        try:
            f = h5py.File(path, "r", locking=False)
        except OSError as exc:
            raise PipelineError(
                f"store {path} is damaged and cannot be opened ({str(exc).splitlines()[0]}); "
                "move it away and featurize again"
            ) from None
        if not hold or _hold(f, path):
            break
        f.close()  # the root was switched as it was opened: open the new one
    version = f.attrs.get("schema_version")
    if version not in READABLE_VERSIONS:
        f.close()
        raise PipelineError(
            f"store {path} has schema version {version}, this pipeline reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; featurize again into a new --store"
        )
    identity, mapped, gone = _file_identity(os.fstat(f.id.get_vfd_handle())), set(), {}
    own = StorePaths(path) if version == 2 else None
    clean = _known_clean(identity)
    foreign = None if clean else foreign_object(f, own, mapped, gone, recorded_ids(f) if own else None)
    disagree = None if clean or foreign or gone or own is None else mapping_problem(f, read_snapshot(f), own)
    if foreign or (disagree or gone) and missing is None:
        f.close()
        if foreign:
            raise _refused(path, foreign)
        if disagree:
            raise PipelineError(
                f"store {path} is damaged: its root disagrees with itself ({disagree}); run pipeline store repair "
                f"{path} to rewrite it from its segment tables, or pipeline featurize again with the same settings to "
                "rebuild it from its partitions"
            )
        raise lost_partitions(path, own, gone)
    if disagree:
        missing[ROOT] = f"disagrees with itself ({disagree})"
    if gone:
        missing.update(gone)
    if not gone and not disagree:
        _CLEAN_ROOTS.setdefault(identity, [path.parent / name for name in mapped])
    return f


ROOT = ""  # in open_root's `missing`: the root itself cannot be trusted (its partitions are read directly instead)


def _refused(path: Path, foreign: str) -> PipelineError:
    """The error for a root that maps other files than its own partitions: a pair copied or renamed by hand (the
    partitions it names lie in another store's folder) is said so, with the commands that do it right."""
    if OTHER_STORE in foreign:
        other = foreign.rsplit(OTHER_STORE, 1)[1]
        return PipelineError(
            f"store {path} maps the partitions of another store ({other}/): it was copied or renamed by hand; copy "
            f"or move a store with pipeline store copy|move SRC DST, or make this copy's root map its own "
            f"partitions with pipeline store repair {path}"
        )
    return PipelineError(
        f"store {path} is refused: {foreign}, so reading it could open other files; give a store written by "
        "pipeline featurize"
    )


def recorded_ids(f: h5py.File) -> dict[str, str]:
    """The identity the root recorded for each partition it maps (none in roots written before it was recorded)."""
    ids: dict[str, str] = {}
    for name in f[SETS] if SETS in f else []:
        ids.update(decode_attr(f[SETS][name].attrs.get(PARTITION_IDS, "{}")))
    return ids


def lost_partitions(path: Path, own: StorePaths, gone: dict[str, str], feature_set: str | None = None) -> PipelineError:
    """The error for a root mapping partitions that are gone or unreadable (name: why), and how to repair it."""
    first, more = min(gone), len(gone) - 1
    whose, settings = (f" (feature set {feature_set})", "that set's") if feature_set else ("", "the same")
    also = f" (and {more} more)" if more else ""
    return PipelineError(
        f"store {path} is damaged: {own.parts.name}/{first}{whose} {gone[first]}{also}; run pipeline featurize again "
        f"with {settings} settings and --store to compute its rows again (the rest is kept), or put the file back"
    )


# Files this process found holding nothing foreign, by identity: a root or partition is replaced by a new file, never
# changed in place (and any change in place moves its ctime), so one check per file and process suffices. An update
# opens its root three times, and every partition is mapped by each new root. A root stays known clean only while
# every partition it maps does.
_CLEAN: dict[tuple, str] = {}  # partitions, with their identity (store.partition_file)
_CLEAN_ROOTS: dict[tuple, list[Path]] = {}  # root: the partitions it maps


def _file_identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _known_clean(root: tuple) -> bool:
    try:
        return root in _CLEAN_ROOTS and all(_file_identity(os.lstat(p)) in _CLEAN for p in _CLEAN_ROOTS[root])
    except OSError:
        return False


def trust_written_root(path: Path, partitions: dict[Path, str]) -> None:
    """A root this process has just written over partitions it wrote or checked (with their identities), under the
    writer's lock: known clean while none of them changes."""
    _CLEAN.update({_file_identity(os.lstat(p)): pid for p, pid in partitions.items()})
    _CLEAN_ROOTS[_file_identity(os.stat(path))] = list(partitions)


def _hold(f: h5py.File, path: Path) -> bool:
    """A shared lock on the very file h5py opened; False when it is no longer the store's root (switched)."""
    fd = f.id.get_vfd_handle()
    hold_shared(fd)  # as long as h5py keeps this file open
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def foreign_object(
    group: h5py.Group,
    own: StorePaths | None = None,
    checked: set[str] | None = None,
    gone: dict[str, str] | None = None,
    ids: dict[str, str] | None = None,
) -> str | None:
    """The first object under a group that would make a reader open another file, described, or None: an external
    or soft link, a dataset whose bytes are stored in external files, or a virtual dataset, unless `own` (a root's
    paths) is given and it maps only that store's own partitions, each a regular file holding nothing foreign
    itself (own partitions missing or not HDF5, or not the partition `ids` recorded, are put in `gone`, with why).
    Links are inspected, never followed."""
    checked = set() if checked is None else checked  # partitions found clean, shared by the whole walk
    gone = {} if gone is None else gone
    for name in group:
        link = group.get(name, getlink=True)
        where = f"{group.name.rstrip('/')}/{name}"
        if not isinstance(link, h5py.HardLink):
            return f"{where} is {'an external' if isinstance(link, h5py.ExternalLink) else 'a soft'} link"
        item = group[name]
        if isinstance(item, h5py.Group):
            found = foreign_object(item, own, checked, gone, ids)
            if found:
                return found
        elif item.external:
            return f"{where} keeps its bytes in external files"
        elif item.is_virtual:
            if own is None:
                return f"{where} is a virtual dataset"
            dcpl = item.id.get_create_plist()  # the source file names only (h5py's virtual_sources() builds
            for i in range(dcpl.get_virtual_count()):  # a selection per mapping: slow for a thousand segments)
                file_name = dcpl.get_virtual_filename(i)
                problem = _foreign_source(file_name, own, checked, gone, ids or {})
                if problem:
                    return f"{where} is a virtual dataset of {file_name}, {problem}"
    return None


OTHER_STORE = "the partitions of "


def _foreign_source(
    file_name: str, own: StorePaths, checked: set[str], gone: dict[str, str], ids: dict[str, str]
) -> str | None:
    """Why a virtual dataset's source file is not one of the store's own partitions, or None (an own partition
    that is missing, cannot be opened or is not the one the root recorded is put in `gone`, with why)."""
    if file_name in checked:
        return None
    folder, _, name = file_name.partition("/")
    if folder != own.parts.name or not StorePaths.is_partition_name(name):
        if folder.endswith(".parts") and "/" not in name and StorePaths.is_partition_name(name):
            return OTHER_STORE + folder
        return "not a partition of this store"
    path = own.parts / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        gone[name] = "is missing"
        return None
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    known = _CLEAN.get(_file_identity(st))
    if known is not None and known == ids.get(name, known):
        checked.add(file_name)
        return None
    try:
        with open_partition_file(path) as f:
            inside, opened, pid = foreign_object(f), os.fstat(f.id.get_vfd_handle()), partition_id(f)
    except OSError as exc:  # truncated or overwritten: damaged, as a missing one is
        gone[name] = f"cannot be opened ({str(exc).splitlines()[0][:80]})"
        return None
    if inside:
        return f"whose {inside}"
    if not stat.S_ISREG(opened.st_mode):
        return "not a regular file"
    if ids.get(name, pid) != pid:
        gone[name] = "is not the partition this root mapped (another store's, put in its place)"
        return None
    checked.add(file_name)
    _CLEAN[_file_identity(opened)] = pid
    return None


def split_file_index(group: h5py.Group) -> dict[str, FileRows]:
    """Per source file of a split group (of a root or a partition): its rows and fingerprint."""
    paths = decode_strings(group["paths"][()])
    sizes, mtimes, hashes = group["size"][()], group["mtime_ns"][()], group["sha256"][()]
    ctimes, labels = _ctimes(group, len(paths)), group["labels"][()]
    index: dict[str, FileRows] = {}
    for row, path in enumerate(paths):
        prev = index.get(path)
        if prev is not None:
            index[path] = prev._replace(count=prev.count + 1)
        else:
            index[path] = FileRows(
                row, 1, int(sizes[row]), int(mtimes[row]), hashes[row].decode(), int(ctimes[row]), int(labels[row])
            )
    return index


def split_skipped(group: h5py.Group) -> dict[str, dict]:
    """Files of a split group that could not be featurized: path to reason and fingerprint."""
    if SKIPPED not in group:
        return {}
    g = group[SKIPPED]
    paths, reasons = decode_strings(g["paths"][()]), decode_strings(g["reasons"][()])
    return {
        p: {"reason": r, "size": int(s), "mtime_ns": int(m), "ctime_ns": int(c), "sha256": h.decode(), "row": row}
        for row, (p, r, s, m, c, h) in enumerate(
            zip(paths, reasons, g["size"][()], g["mtime_ns"][()], _ctimes(g, len(paths)), g["sha256"][()])
        )
    }


def stat_columns(group: h5py.Group) -> tuple[np.ndarray, np.ndarray]:
    """A split group's (or its skipped table's) paths per row, and their size, mtime_ns and ctime_ns columns as one
    (3, rows) array: what a rerun compares column against column."""
    paths = np.asarray(decode_strings(group["paths"][()]), dtype=object)
    return paths, np.stack([group["size"][()], group["mtime_ns"][()], _ctimes(group, len(paths))]).astype(np.int64)


def _ctimes(group: h5py.Group, n: int) -> np.ndarray:
    """The ctime_ns column, or UNKNOWN_CTIME for stores written before it existed."""
    return group["ctime_ns"][()] if "ctime_ns" in group else np.full(n, UNKNOWN_CTIME, np.int64)


class FeatureSet:
    """One feature set of a store: features of one backbone, weights, preprocessing and views. In a version-2
    store its splits are virtual datasets over partitions: features and fixed-size columns are verified as they
    are read (their chunks' checksums), string columns by the digest each partition keeps of its own."""

    def __init__(self, group: h5py.Group, paths: StorePaths | None = None, snapshot: SetSnapshot | None = None):
        self.group, self.paths, self.snapshot = group, paths, snapshot
        self.name = group.name.rsplit("/", 1)[-1]
        self.attrs = {k: decode_attr(v) for k, v in group.attrs.items() if k not in (PARTITIONS, PARTITION_IDS)}
        self.record = SetRecord.from_attrs(self.attrs)
        self.identity = self.record.identity
        self.classes: list[str] = self.record.classes
        self._verified: set[tuple] = set()
        self._relabelled: LabelSource | None = None  # another labelling of its stored paths
        self._labelling: dict | None = None  # and what it came from
        self.task: str = self.record.task  # stages.tasks: what its labels columns give

    @property
    def labelling(self) -> dict:
        """Which labelling its labels columns give: label_source (folders, table, metadata, pattern), label_origin
        and, for a source other than folders, label_digest."""
        return dict(self._labelling) if self._labelling is not None else self.record.labelling

    def with_labels(self, options: LabelOptions | None) -> FeatureSet:
        """The set under the labelling `options` give (a table or a pattern over its stored paths: train-head,
        lr-find and audit --labels), checked against what it holds; itself when none is given."""
        if options is None or not options.given:
            if self.task == "single":
                return self
            options = recorded_options(self.labelling)  # several labels or numbers: their table, as recorded
        source = relabel_stored(options, {split: list(self.column(split, "paths")) for split in self.splits})
        other = self.relabelled(source)
        other._labelling = source.describe()
        return other

    def relabelled(self, source: LabelSource) -> FeatureSet:
        """The same rows under another labelling (stages.labels.LabelSource over its stored paths; test images may
        have none): what `labels` columns give from then on (class indices, 0/1 rows of classes, or values). The
        stored labels are not touched."""
        other = copy.copy(self)
        other.classes, other._relabelled, other.task = source.classes, source, source.task
        return other

    @property
    def splits(self) -> list[str]:
        return [name for name in SPLITS if name in self.group]

    def features(self, split: str) -> CheckedDataset:
        """The split's features; a read of a damaged chunk is an error, never numbers."""
        return CheckedDataset(self._split(split)["features"], self.where)

    def rows(self, split: str, rows: np.ndarray, in_memory: bool, block_rows: int = 65536):
        """Rows of a split to train on, with their labels (stages.head.Rows): loaded whole (one verified read) or
        streamed (store.rows.StoredRows). torch is imported here, on first use: reading a store needs none."""
        from stages.head import TensorRows
        from store.rows import StoredRows

        features, labels = self.features(split), self.column(split, "labels")
        if in_memory:
            chunk_rows = features.chunks[0] if features.chunks else 1024
            return TensorRows(
                features[()], labels, rows, name=features.name, chunk_rows=chunk_rows, block_rows=block_rows
            )
        return StoredRows(features, labels, rows, block_rows)

    def column(self, split: str, name: str) -> np.ndarray:
        """A per-row column; labels and view numbers out of range are an error, never used."""
        if ROW_COLUMNS.get(name) is STR:
            self._verify_strings(split, name)
        if name == "labels" and self._relabelled is not None:
            labels = self._relabelled.targets(self.column(split, "paths"))
            return labels.astype(np.int32) if self.task == "single" else labels
        values = read_or_fail(self._split(split)[name], self.where)
        if name in ("labels", "view"):
            views, unlabelled = self.identity.views, self.record.task != "single"
            problem = value_problem(name, values, split, len(self.classes), views, unlabelled)
            if problem:
                raise PipelineError(
                    f"{self.where} is damaged: set {self.name} {split}/{problem}; featurize again to rewrite it "
                    "(pipeline store info --verify lists what is wrong)"
                )
        return decode_strings(values)

    @property
    def where(self) -> str:
        return f"store {self.group.file.filename}"

    def fingerprints(self, split: str) -> dict[str, tuple]:
        """Per table of a split (rows, and skipped files): each row's path and its (size, mtime_ns, ctime_ns)
        columns, as an up-to-date featurize compares them with the files'."""
        group = self._split(split)
        found = {"rows": stat_columns(group)}
        if SKIPPED in group:
            found["skipped"] = stat_columns(group[SKIPPED])
        return found

    def skipped(self, split: str) -> dict[str, dict]:
        """Files of a split that could not be featurized: path to reason and fingerprint."""
        return split_skipped(self.group[split]) if split in self.group else {}

    def _verify_strings(self, split: str, name: str) -> None:
        """A string column of a version-2 split: each partition it comes from checked against its digest, once."""
        if self.snapshot is None:
            return
        for segment in getattr(self.snapshot, TABLE_OF[name]).get(split, []):
            key = (segment.partition, segment.split, name)
            if key in self._verified:
                continue
            prefix = self.snapshot.prefixes[segment.partition]
            with open_partition_file(self.paths.parts / segment.partition) as f:
                read_or_fail(f[source_dataset(prefix, segment.split, name)], f"{self.where} partition {f.filename}")
            self._verified.add(key)

    def _split(self, split: str) -> h5py.Group:
        if split not in self.group:
            raise PipelineError(f"feature set {self.name} has no {split!r} split (it has: {', '.join(self.splits)})")
        group = self.group[split]
        problems = length_problems(group)
        if problems:
            raise PipelineError(
                f"{self.where} is damaged: set {self.name} {split}/{problems[0]}; featurize into a new --store"
            )
        return group


@dataclass
class SplitInfo:
    rows: int
    images: int | None  # None: its paths column is damaged (store info --verify says so)
    skipped: int


@dataclass
class SetInfo:
    """A feature set as store info shows it: its record (identity and origin), counts per split, and its rows in
    partitions, live (mapped) and dead (left for compaction to reclaim)."""

    name: str
    record: SetRecord
    splits: dict[str, SplitInfo]
    partitions: int
    live_rows: int
    dead_rows: int

    def to_json(self) -> dict:
        r = self.record
        made_from = ("data_dir", "layout", "valid_pct", "split_seed", "created", "updated", "versions")
        return {
            "name": self.name,
            **r.identity.to_dict(),
            "classes": r.classes,
            "splits": {split: asdict(c) for split, c in self.splits.items()},
            "partitions": self.partitions,
            "live_rows": self.live_rows,
            "dead_rows": self.dead_rows,
            **{k: getattr(r, k) for k in made_from},
        }


@dataclass
class SplitCheck:
    """A split that --verify found damaged, or could not check (written before checksums existed)."""

    set: str
    split: str
    damage: str | None
    unchecked: bool = False


@dataclass
class StoreInfo:
    """What a store holds (store info --json): its sets, version and size on disk (the root and its partitions);
    with --verify, what failed the check of every byte."""

    path: str
    size_bytes: int
    schema_version: int
    partitions: int
    sets: list[SetInfo]
    verification: list[SplitCheck] | None = None

    def to_json(self) -> dict:
        found = {k: getattr(self, k) for k in ("path", "size_bytes", "schema_version", "partitions")}
        found["sets"] = [s.to_json() for s in self.sets]
        if self.verification is not None:
            found["verification"] = [asdict(c) for c in self.verification]
        return found


class FeatureStore:
    """A read-only view of one snapshot of a store, held until closed (`with FeatureStore(path) as store:`): an
    update that commits, switches the root or compacts meanwhile changes nothing this reader reads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.paths = StorePaths.of(path)  # the root's own path: its partitions are found beside it
        self.file = open_root(self.paths.store, hold=True)
        self.snapshot = read_snapshot(self.file)

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    @property
    def set_names(self) -> list[str]:
        return sorted(self.file[SETS]) if SETS in self.file else []

    def feature_set(self, name: str | None = None, **identity) -> FeatureSet:
        """The named set; else the only set, or the most recently updated one matching the given identity fields."""
        if name is not None:
            if name not in self.set_names:
                raise PipelineError(
                    f"store {self.path} has no feature set {name!r} (it has: {', '.join(self.set_names) or 'none'})"
                )
            return self._set(name)
        sets = [self._set(n) for n in self.set_names]
        sets = [s for s in sets if all(s.attrs.get(k) == v for k, v in identity.items() if v is not None)]
        if not sets:
            wanted = ", ".join(f"{k}={v}" for k, v in identity.items() if v is not None)
            raise PipelineError(
                f"store {self.path} holds no feature set"
                + (f" with {wanted}" if wanted else "")
                + f"; featurize into it first (sets: {', '.join(self.set_names) or 'none'})"
            )
        return max(sets, key=lambda s: s.record.updated or "")

    def _set(self, name: str) -> FeatureSet:
        snapshot = self.snapshot.sets[name] if self.snapshot.version == 2 else None
        return FeatureSet(self.file[SETS][name], self.paths, snapshot)

    def info(self) -> StoreInfo:
        """What the store holds: each set's record, splits with counts, partitions with their live and dead rows;
        the store's version and size on disk (the root and its partitions)."""
        sets = []
        for name in self.set_names:
            feature_set = self._set(name)
            splits = {}
            for split in feature_set.splits:
                try:
                    images = len(set(feature_set.column(split, "paths")))
                except PipelineError:  # a damaged column: --verify says which
                    images = None
                rows = feature_set.features(split).shape[0]
                splits[split] = SplitInfo(rows, images, len(feature_set.skipped(split)))
            sets.append(SetInfo(name, feature_set.record, splits, **self._partitions(name)))
        return StoreInfo(
            path=str(self.path),
            size_bytes=store_bytes(self.paths),
            schema_version=self.snapshot.version,
            partitions=len(self.snapshot.partitions() - {SELF}),
            sets=sets,
        )

    def _partitions(self, name: str) -> dict:
        """A set's partitions and its rows in them, live (mapped) and dead (left for compaction to reclaim)."""
        snap = self.snapshot.sets[name]
        live = snap.live_rows()
        total = {p: partition_rows(self.paths, snap, p) for p in live} if self.snapshot.version == 2 else live
        return {
            "partitions": len(live),
            "live_rows": sum(live.values()),
            "dead_rows": sum(total.values()) - sum(live.values()),
        }


def store_bytes(paths: StorePaths) -> int:
    """What a store takes on disk: its root and every file in its partitions folder (dead rows and partitions a
    reader still holds included)."""
    parts = sum(e.stat().st_size for e in os.scandir(paths.parts) if e.is_file()) if paths.parts.is_dir() else 0
    return os.path.getsize(paths.store) + parts


def verify_store(store: FeatureStore) -> list[SplitCheck]:
    """Every set and split read and checked byte by byte (in a version-2 store: every partition a set maps, and the
    values its splits give); returns what failed. Splits written before checksums existed
    are checked for non-finite values only, and listed as unchecked."""
    failed = []
    for name in store.set_names:
        group = store.file[SETS][name]
        feature_set = store._set(name)
        views = feature_set.identity.views
        snap = store.snapshot.sets[name]
        for split in [s for s in SPLITS if s in group]:
            if store.snapshot.version == 1 and not group[split]["features"].fletcher32:
                failed.append(SplitCheck(name, split, None, unchecked=True))
            try:
                if store.snapshot.version == 1:
                    damage = verify_split(group[split]).describe()
                else:
                    damage = _verify_partitions(store.paths, snap, split)
                unlabelled = feature_set.task != "single"
                problems = check_values(group[split], split, len(feature_set.classes), views, unlabelled)
                damage = ", ".join(filter(None, [damage, *problems]))
            except (OSError, KeyError) as exc:  # its metadata itself is unreadable
                damage = f"unreadable ({str(exc).splitlines()[0][:80]})"
            if damage:
                failed.append(SplitCheck(name, split, damage))
    return failed


def _verify_partitions(paths: StorePaths, snap: SetSnapshot, split: str) -> str:
    """The damage of every partition a split maps (their whole split groups, dead rows included), described."""
    found = []
    tables = (*ROW_TABLES, "skipped")
    for partition, source in sorted({(s.partition, s.split) for t in tables for s in getattr(snap, t).get(split, [])}):
        prefix = snap.prefixes[partition]
        with open_partition_file(paths.parts / partition) as f:
            damage = verify_split(f[source_dataset(prefix, source, "").rstrip("/")])
        if damage:
            found.append(f"partition {partition} {source}: {damage.describe()}")
    return "; ".join(found)


def decode_strings(values: np.ndarray) -> np.ndarray | list:
    """A string column as str: h5py returns variable-length strings as bytes."""
    if values.dtype.kind == "O":
        try:
            return list(map(bytes.decode, values))  # a loop in C: a rerun decodes a million paths
        except TypeError:  # some are str already
            return [v.decode() if isinstance(v, bytes) else v for v in values]
    return values
