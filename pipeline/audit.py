"""audit: likely label errors, near-copies, train/valid leaks and outliers of a feature store, with pictures."""

from __future__ import annotations

import csv
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from stages.atomic import atomic_output, write_json
from stages.audit import (
    NEAR_COPY_COSINE,
    NEIGHBOURS,
    AuditRows,
    check_auditable,
    exact_copies,
    feature_map,
    label_issues,
    out_of_sample_probabilities,
    outlier_rows,
    similarity_scan,
)
from stages.errors import check_range
from store.reader import FeatureSet, FeatureStore


def read_rows(fs: FeatureSet) -> AuditRows:
    """The plain view (view 0) of every image in every split of a feature set."""
    parts = []
    for split in fs.splits:
        plain = np.flatnonzero(fs.column(split, "view") == 0)
        features = fs.features(split)[()][plain] if len(plain) else np.zeros((0, fs.features(split).shape[1]))
        paths = fs.column(split, "paths")
        parts.append(
            (
                features.astype(np.float32),
                fs.column(split, "labels")[plain],
                np.full(len(plain), split),
                [paths[i] for i in plain],
                [bytes(h).decode() for h in fs.column(split, "sha256")[plain]],
            )
        )
    if not parts:
        return AuditRows(np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros(0, str), [], [])
    return AuditRows(
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]).astype(np.int64),
        np.concatenate([p[2] for p in parts]),
        [x for p in parts for x in p[3]],
        [x for p in parts for x in p[4]],
    )


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
) -> dict:
    """Audit one feature set of a store; write audit.json, a CSV per finding and three PNGs into out."""
    for option, value, low, high in (
        ("--threshold", threshold, 1e-6, 1.0),
        ("--folds", folds, 2, 100),
        ("--neighbours", neighbours, 1, 1000),
        ("--pictures", pictures, 0, 1000),
    ):
        check_range(option, value, low, high)
    started = time.perf_counter()
    with FeatureStore(store_path) as store:
        fs = store.feature_set(set_name)
        rows, classes, data_dir = read_rows(fs), fs.classes, fs.attrs.get("data_dir")
    where = f"store {store_path} set {fs.name}"
    check_auditable(rows, classes, where)
    probabilities = out_of_sample_probabilities(rows, len(classes), folds, seed)
    issues = [
        {
            "path": rows.paths[r],
            "split": str(rows.splits[r]),
            "given": classes[rows.labels[r]],
            "suggested": classes[s],
            "score": round(q, 6),
        }
        for r, s, q in label_issues(rows.labels, probabilities)
    ]
    near, nearest = similarity_scan(rows.features, threshold, neighbours)
    exact = exact_copies(rows.sha256)
    exact_set = set(exact)

    def pair(a: int, b: int, similarity: float, kind: str) -> dict:
        splits = {str(rows.splits[a]), str(rows.splits[b])}
        return {
            "a": rows.paths[a],
            "b": rows.paths[b],
            "split_a": str(rows.splits[a]),
            "split_b": str(rows.splits[b]),
            "similarity": round(similarity, 6),
            "kind": kind,
            "leak": "train" in splits and len(splits) > 1,
            "same_label": bool(rows.labels[a] == rows.labels[b]),
        }

    duplicates = [pair(a, b, 1.0, "exact") for a, b in exact] + [
        pair(a, b, s, "near") for a, b, s in near if (a, b) not in exact_set
    ]
    far, fence = outlier_rows(nearest)
    outliers = [
        {
            "path": rows.paths[r],
            "split": str(rows.splits[r]),
            "label": classes[rows.labels[r]] if rows.labels[r] >= 0 else None,
            "distance": round(float(1 - nearest[r]), 6),
        }
        for r in far
    ]
    out = Path(out) if out is not None else default_out()
    out.mkdir(parents=True, exist_ok=True)
    files = _write_findings(out, issues, duplicates, outliers)
    files.update(_draw(out, rows, classes, data_dir, issues, duplicates, outliers, pictures))
    result = {
        "store": str(store_path),
        "set": fs.name,
        "data_dir": data_dir,
        "images": len(rows),
        "labelled": int((rows.labels >= 0).sum()),
        "classes": classes,
        "threshold": threshold,
        "outlier_fence": round(fence, 6),
        "label_issues": issues,
        "duplicates": duplicates,
        "outliers": outliers,
        "leaks": sum(d["leak"] for d in duplicates),
        "seconds": round(time.perf_counter() - started, 2),
        "out": str(out),
        "files": files,
    }
    write_json(out / "audit.json", result)
    return result


def _write_csv(path: Path, records: list[dict], columns: list[str]) -> None:
    with atomic_output(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def _write_findings(out: Path, issues: list[dict], duplicates: list[dict], outliers: list[dict]) -> dict:
    tables = {
        "label_issues.csv": (issues, ["path", "split", "given", "suggested", "score"]),
        "duplicates.csv": (duplicates, ["a", "b", "split_a", "split_b", "similarity", "kind", "leak", "same_label"]),
        "outliers.csv": (outliers, ["path", "split", "label", "distance"]),
    }
    for name, (records, columns) in tables.items():
        _write_csv(out / name, records, columns)
    return {name.split(".")[0] + "_csv": str(out / name) for name in tables}


def _draw(
    out: Path,
    rows: AuditRows,
    classes: list[str],
    data_dir: str | None,
    issues: list[dict],
    duplicates: list[dict],
    outliers: list[dict],
    pictures: int,
) -> dict:
    from pipeline.plots import plot_feature_map, plot_image_grid

    root = Path(data_dir) if data_dir else Path(".")
    label_items = [
        (root / i["path"], f"{i['given']} -> {i['suggested']} ({i['score']:.3f})\n{Path(i['path']).name}")
        for i in issues[:pictures]
    ]
    copy_items = [
        (
            root / d[side],
            f"{d['kind']} {d['similarity']:.3f}{' LEAK' if d['leak'] else ''}\n"
            f"{d['split_' + side]}/{Path(d[side]).name}",
        )
        for d in duplicates[:pictures]
        for side in "ab"
    ]
    index = {p: i for i, p in enumerate(rows.paths)}
    marks = {
        "label issue": [index[i["path"]] for i in issues],
        "duplicate": sorted({index[d[side]] for d in duplicates for side in "ab"}),
        "outlier": [index[o["path"]] for o in outliers],
    }
    with atomic_output(out / "label_issues.png") as tmp:
        plot_image_grid(
            label_items, tmp, f"{len(issues)} likely label issues (given -> suggested, label quality)", columns=4
        )
    with atomic_output(out / "duplicates.png") as tmp:
        plot_image_grid(copy_items, tmp, f"{len(duplicates)} copies and near-copies (pairs side by side)", columns=4)
    with atomic_output(out / "map.png") as tmp:
        plot_feature_map(feature_map(rows.features), rows.labels, classes, marks, tmp)
    return {name: str(out / f"{name}.png") for name in ("label_issues", "duplicates", "map")}
