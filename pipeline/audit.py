"""audit: likely label errors, near-copies, train/valid leaks and outliers of a feature store, with pictures."""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path

import numpy as np

from stages.atomic import atomic_csv, output_folder, write_json
from stages.audit import (
    ANN_MIN_ROWS,
    NEAR_COPY_COSINE,
    NEIGHBOURS,
    AuditRows,
    CopyGroups,
    check_auditable,
    exact_copies,
    feature_map,
    label_issues,
    multi_label_issues,
    out_of_sample_probabilities,
    outlier_rows,
    similarity_scan,
)
from stages.errors import check_range
from stages.files import read_stored_file
from stages.labels import LabelOptions
from stages.tasks import TASKS
from store import FeatureSet, FeatureStore

AUDIT_JSON = "audit.json"
PICTURES = ("label_issues", "duplicates", "map")


READ_ROWS = 65536  # stored rows read at a time


def read_rows(feature_set: FeatureSet) -> AuditRows:
    """The plain view (view 0) of every image in every split of a feature set."""
    splits = feature_set.splits
    if not splits:
        return AuditRows(np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, str), [], [])
    plains = [np.flatnonzero(feature_set.column(split, "view") == 0) for split in splits]
    stored = [feature_set.features(split) for split in splits]
    # As stored (float16 by default: half the memory), in one array filled block by block (never a second copy of
    # a split); converted to float32 a block at a time where used.
    features = np.empty((sum(map(len, plains)), stored[0].shape[1]), stored[0].dtype)
    at = 0
    for plain, dataset in zip(plains, stored):
        for start in range(0, dataset.shape[0], READ_ROWS):
            block = plain[(plain >= start) & (plain < start + READ_ROWS)]
            if len(block) and block[-1] - block[0] + 1 == len(block):  # a run of stored rows: read into place
                dataset.read_direct(features, np.s_[block[0] : block[-1] + 1], np.s_[at : at + len(block)])
            elif len(block):
                features[at : at + len(block)] = dataset[start : start + READ_ROWS][block - start]
            at += len(block)
    labels, paths, sha256 = [], [], []
    for split, plain in zip(splits, plains):
        labels.append(feature_set.column(split, "labels")[plain])
        stored_paths = feature_set.column(split, "paths")
        paths += [stored_paths[i] for i in plain]
        sha256 += [bytes(h).decode() for h in feature_set.column(split, "sha256")[plain]]
    labels = np.concatenate(labels)
    split_of = np.concatenate([np.full(len(plain), split) for split, plain in zip(splits, plains)])
    task, targets = feature_set.task, None
    if task != "single":  # a row of classes, or a number: an int per image for folds and colours (stages.audit)
        targets = labels
        unlabelled = split_of == "test"
        labels = TASKS[task].strata(np.nan_to_num(targets)) if len(targets) else np.zeros(0, np.int64)
        labels = np.where(unlabelled, -1, labels)
    return AuditRows(features, labels.astype(np.int64), split_of, paths, sha256, targets, task)


@dataclass
class LabelIssue:
    """An image whose given label is likely wrong: what it was given, what the other images suggest, and its label
    quality (lower: likelier wrong)."""

    path: str
    split: str
    given: str
    suggested: str
    score: float


@dataclass
class Duplicate:
    """A pair of copies (the same bytes: exact) or near-copies (features at least as similar as the threshold)."""

    a: str
    b: str
    split_a: str
    split_b: str
    similarity: float
    kind: str  # exact or near
    leak: bool  # one in train, the other in valid or test
    same_label: bool


@dataclass
class CopyMember:
    path: str
    split: str
    label: str


@dataclass
class CopyGroup:
    """Images linked by copies or near-copies, each member once; pairs: the links that joined them."""

    count: int
    kind: str  # exact (every member the same bytes) or near
    leak: bool
    pairs: int
    members: list[CopyMember]


@dataclass
class Outlier:
    """An image far from every other (its distance: 1 - mean cosine to its nearest neighbours)."""

    path: str
    split: str
    label: str
    distance: float


def _columns(finding: type) -> list[str]:
    return [f.name for f in fields(finding)]


# The CSV of each finding and its columns (copy_groups.csv: a row per member, with its group's number and traits).
FINDINGS = {
    "label_issues": _columns(LabelIssue),
    "duplicates": _columns(Duplicate),
    "copy_groups": ["group", "count", "kind", "leak", *_columns(CopyMember)],
    "outliers": _columns(Outlier),
}


@dataclass
class AuditResult:
    """An audit's findings (as audit.json and its CSVs hold them): likely label issues, most likely first; copy
    groups, largest first, and a few pairs of each; outliers, farthest first; and where it all went."""

    store: str
    set: str
    data_dir: str | None
    images: int
    labelled: int
    classes: list[str]
    threshold: float
    outlier_fence: float
    label_issues: list[LabelIssue]
    duplicates: list[Duplicate]
    copy_groups: list[CopyGroup]
    outliers: list[Outlier]
    leaks: int
    leak_groups: int
    similarity_search: str  # exact, or approximate (a faiss index, from ANN_MIN_ROWS rows)
    step_seconds: dict[str, float]  # read, label_issues (k-fold logreg and confident learning), similarity
    notes: list[str]
    seconds: float
    out: str
    files: dict[str, str]

    def to_json(self) -> dict:
        return asdict(self)


def default_out(root: Path = Path("runs")) -> Path:
    return root / f"audit-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def audit(
    store_path: Path,
    set_name: str | None = None,
    out: Path | None = None,
    threshold: float = NEAR_COPY_COSINE,
    neighbours: int = NEIGHBOURS,
    folds: int = 5,
    pictures: int = 24,
    seed: int = 0,
    labels: LabelOptions | None = None,
) -> AuditResult:
    """Audit one feature set of a store (under another labelling of its images with `labels`); write audit.json, a
    CSV per finding and three PNGs into out."""
    for option, value, low, high in (
        ("--threshold", threshold, 1e-6, 1.0),
        ("--folds", folds, 2, 100),
        ("--neighbours", neighbours, 1, 1000),
        ("--pictures", pictures, 0, 1000),
    ):
        check_range(option, value, low, high)
    started = time.perf_counter()
    out = Path(out) if out is not None else default_out()
    # Held from the start (a second audit into the same folder is refused at once), published whole at the end (an
    # interrupted audit leaves no partial folder).
    with output_folder(out, (AUDIT_JSON,), "an audit") as staging:
        with FeatureStore(store_path) as store:
            feature_set = store.feature_set(set_name).with_labels(labels)
            rows, classes, data_dir = read_rows(feature_set), feature_set.classes, feature_set.record.data_dir
        check_auditable(rows, classes, f"store {store_path} set {feature_set.name}")
        steps = {"read": time.perf_counter() - started}
        issues = _label_issues(rows, classes, folds, seed)
        steps["label_issues"] = time.perf_counter() - started - sum(steps.values())
        groups = CopyGroups(len(rows))
        exact_copies(rows.sha256, groups)
        _, nearest, search = similarity_scan(rows.features, threshold, neighbours, groups=groups)
        steps["similarity"] = time.perf_counter() - started - sum(steps.values())
        duplicates, copy_groups = _copies(rows, classes, groups)
        far, fence = outlier_rows(nearest)
        outliers = [
            Outlier(rows.paths[r], str(rows.splits[r]), rows.label_name(r, classes), round(float(1 - nearest[r]), 6))
            for r in far
        ]
        members = [
            {"group": g, **asdict(group), **asdict(m)} for g, group in enumerate(copy_groups) for m in group.members
        ]
        for name, records in (
            ("label_issues", [asdict(i) for i in issues]),
            ("duplicates", [asdict(d) for d in duplicates]),
            ("copy_groups", members),
            ("outliers", [asdict(o) for o in outliers]),
        ):
            _write_csv(staging / f"{name}.csv", records, FINDINGS[name])
        notes = _draw(staging, rows, classes, data_dir, issues, duplicates, outliers, pictures)
        if search == "exact" and len(rows) >= ANN_MIN_ROWS:
            notes.append(
                f"near-copies and outliers by an exact scan of {len(rows):,} rows (its time grows as their square): "
                "pip install -e '.[audit]' for the approximate index"
            )
        result = AuditResult(
            store=str(store_path),
            set=feature_set.name,
            data_dir=data_dir,
            images=len(rows),
            labelled=int((rows.labels >= 0).sum()),
            classes=classes,
            threshold=threshold,
            outlier_fence=round(fence, 6),
            label_issues=issues,
            duplicates=duplicates,
            copy_groups=copy_groups,
            outliers=outliers,
            leaks=sum(d.leak for d in duplicates),
            leak_groups=sum(g.leak for g in copy_groups),
            similarity_search=search,
            step_seconds={k: round(v, 3) for k, v in steps.items()},
            notes=notes,
            seconds=round(time.perf_counter() - started, 2),
            out=str(out),
            files={
                **{f"{name}_csv": str(out / f"{name}.csv") for name in FINDINGS},
                **{name: str(out / f"{name}.png") for name in PICTURES},
            },
        )
        write_json(staging / AUDIT_JSON, result.to_json())
    return result


def _label_issues(rows: AuditRows, classes: list[str], folds: int, seed: int) -> list[LabelIssue]:
    """Likely label errors by confident learning on out-of-sample probabilities: one class each (cleanlab), or
    classes of their own per image (cleanlab's multi-label support). A numeric target has none listed here."""
    if rows.task == "numeric":
        return []
    probabilities = out_of_sample_probabilities(rows, len(classes), folds, seed)
    if rows.task == "multi":
        labelled = np.flatnonzero(rows.labels >= 0)
        found = multi_label_issues(labelled, rows.targets, probabilities)
        return [
            LabelIssue(
                rows.paths[r],
                str(rows.splits[r]),
                rows.label_name(r, classes),
                " ".join(c for c, on in zip(classes, suggested) if on),
                round(q, 6),
            )
            for r, suggested, q in found
        ]
    return [
        LabelIssue(rows.paths[r], str(rows.splits[r]), classes[rows.labels[r]], classes[s], round(q, 6))
        for r, s, q in label_issues(rows.labels, probabilities)
    ]


def _copies(rows: AuditRows, classes: list[str], groups: CopyGroups) -> tuple[list[Duplicate], list[CopyGroup]]:
    """The listed pairs (a few per group, most similar first) and the groups, each member once, largest first."""

    def split(r: int) -> str:
        return str(rows.splits[r])

    def leak(rs) -> bool:
        splits = {split(r) for r in rs}
        return "train" in splits and len(splits) > 1

    duplicates, copy_groups = [], []
    for group in groups.groups():
        for a, b, similarity in group.pairs:
            exact = rows.sha256[a] == rows.sha256[b]
            duplicates.append(
                Duplicate(
                    a=rows.paths[a],
                    b=rows.paths[b],
                    split_a=split(a),
                    split_b=split(b),
                    similarity=1.0 if exact else round(similarity, 6),
                    kind="exact" if exact else "near",
                    leak=leak((a, b)),
                    same_label=rows.label_name(a, classes) == rows.label_name(b, classes),
                )
            )
        copy_groups.append(
            CopyGroup(
                count=len(group.members),
                kind="exact" if len({rows.sha256[r] for r in group.members}) == 1 else "near",
                leak=leak(group.members),
                pairs=group.linked_pairs,
                members=[CopyMember(rows.paths[r], split(r), rows.label_name(r, classes)) for r in group.members],
            )
        )
    return duplicates, copy_groups


def _write_csv(path: Path, records: list[dict], columns: list[str]) -> None:
    with atomic_csv(path) as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def _draw(
    out: Path,
    rows: AuditRows,
    classes: list[str],
    data_dir: str | None,
    issues: list[LabelIssue],
    duplicates: list[Duplicate],
    outliers: list[Outlier],
    pictures: int,
) -> list[str]:
    """The three PNGs; returns notes on stored paths that were not drawn (outside the data folder, not a file)."""
    from pipeline.plots import plot_feature_map, plot_image_grid

    refused: list[str] = []

    def image(stored: str) -> bytes | None:
        data = read_stored_file(data_dir, stored) if data_dir else None
        if data is None:
            refused.append(stored)
        return data

    label_items = [
        (image(i.path), f"{i.given} -> {i.suggested} ({i.score:.3f})\n{Path(i.path).name}") for i in issues[:pictures]
    ]
    copy_items = [
        (image(path), f"{d.kind} {d.similarity:.3f}{' LEAK' if d.leak else ''}\n{split}/{Path(path).name}")
        for d in duplicates[:pictures]
        for path, split in ((d.a, d.split_a), (d.b, d.split_b))
    ]
    index = {p: i for i, p in enumerate(rows.paths)}
    marks = {
        "label issue": [index[i.path] for i in issues],
        "duplicate": sorted({index[path] for d in duplicates for path in (d.a, d.b)}),
        "outlier": [index[o.path] for o in outliers],
    }
    plot_image_grid(
        label_items,
        out / "label_issues.png",
        f"{len(issues)} likely label issues (given -> suggested, label quality)",
        columns=4,
    )
    plot_image_grid(copy_items, out / "duplicates.png", "copies and near-copies (pairs side by side)", columns=4)
    groups = classes if rows.task != "numeric" else [f"{classes[0]} quintile {q + 1}" for q in range(5)]
    plot_feature_map(feature_map(rows.features), rows.labels, groups, marks, out / "map.png")
    if not data_dir:
        return ["pictures drawn without their images: the store records no data folder"] if refused else []
    return [f"{p} not drawn: not a regular file inside the data folder {data_dir}" for p in dict.fromkeys(refused)]
