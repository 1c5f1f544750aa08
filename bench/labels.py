"""python -m bench labels: rows keyed by content, at scale. A store of N images (1e5 and 1e6; synthetic features
in the real schema, over real files whose bytes and stats the rows record), then 1% of them relabelled (moved to
the other class folder), 1% renamed, and 1% relabelled by editing a labels CSV, each brought up to date by
`pipeline featurize` as a user runs it: nothing is decoded, and no feature byte is written. The reference is what
the store did before rows were keyed by content: decode and forward those images again, at the featurize rate
measured in the same run on generated photos."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np

from bench.harness import SHARED, Row, alternate, pipeline_cmd, run_json_command

DIM = 1280
BLOCK = 65536
SHARE = 0.01


def write_data_and_store(tmp: Path, n: int) -> tuple[Path, Path]:
    """n small files under train/a and train/b (distinct bytes each), and a store whose rows are theirs: the
    feature set featurize would make of them with its defaults, written through the store's transaction."""
    from stages.backbones import DEFAULT_BACKBONE, create_backbone, resolve_precision
    from stages.files import content_sha256
    from store import FeatureSetIdentity, FileRecord, Store

    data, store = tmp / "data", tmp / "s.h5"
    identity = FeatureSetIdentity.of(
        create_backbone(DEFAULT_BACKBONE),  # its identity, from the registry: nothing built
        views=0,
        seed=0,
        augmentation=None,
        precision=resolve_precision("auto", "cpu"),
        dtype="float16",
    )
    attrs = {**identity.to_dict(), "data_dir": str(data.resolve()), "layout": "splits", "split_seed": 0}
    rng = np.random.default_rng(0)
    with Store(store).transaction(identity.name, ["a", "b"], attrs) as tx:
        for start in range(0, n, BLOCK):
            records = []
            for i in range(start, min(n, start + BLOCK)):
                label, path = i % 2, f"train/{'ab'[i % 2]}/{i:07d}.jpg"
                body = i.to_bytes(8, "little") * 4
                (data / path).parent.mkdir(parents=True, exist_ok=True)
                (data / path).write_bytes(body)
                st = os.stat(data / path)
                fingerprint = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, content_sha256(body))
                records.append(FileRecord(path, label, *fingerprint))
            records.sort(key=lambda r: r.paths)
            features = rng.standard_normal((len(records), DIM), dtype=np.float32).astype(np.float16)
            tx.add("train", features, records)
        tx.commit()
    return data, store


def featurize_rate(tmp: Path) -> float:
    """Images per second of a first featurize of generated photos (decode and forward, the loop alone)."""
    from pipeline.demo import make_demo_images

    data = make_demo_images(tmp / "photos")
    summary, _ = run_json_command(pipeline_cmd("featurize", data, "--store", tmp / "photos.h5"))
    return summary["images_per_second"]


def bring_up_to_date(data: Path, store: Path, table: Path | None = None) -> tuple[dict, int]:
    """featurize's summary, and the bytes it wrote: every file of the store that is new or changed (partitions,
    compaction's included, and the root)."""
    before = _files(store)
    labels = ("--labels", table) if table else ()
    summary, _ = run_json_command(pipeline_cmd("featurize", data, "--store", store, *labels))
    written = sum(size for name, (size, stamp) in _files(store).items() if before.get(name, (None, None))[1] != stamp)
    return summary, written


def _write_table(path: Path, labels: dict[str, str]) -> None:
    path.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in labels.items()))


def _files(store: Path) -> dict[str, tuple[int, int]]:
    parts = store.with_name(store.name + ".parts")
    paths = [store, *(parts.iterdir() if parts.is_dir() else [])]
    return {p.name: (p.stat().st_size, p.stat().st_ino) for p in paths if p.is_file()}


def size_rows(n: int, tmp: Path, rate: float) -> list[Row]:
    data, store = write_data_and_store(tmp, n)
    first, _ = bring_up_to_date(data, store)
    assert first["up_to_date"], "the synthetic store is not what featurize would make of its files"
    label = f"{n:.0e}".replace("e+0", "e")
    k = int(n * SHARE)
    rows = []
    moved = sorted((data / "train" / "a").iterdir())[:k]
    for path in moved:  # relabelled: to the other class folder
        path.rename(data / "train" / "b" / path.name)
    relabel, relabel_bytes = bring_up_to_date(data, store)
    assert relabel["featurized"] == 0 and relabel["reused_by_content"] == k, relabel
    renamed = sorted((data / "train" / "b").iterdir())[:k]
    for path in renamed:
        path.rename(path.with_name("renamed-" + path.name))
    rename, rename_bytes = bring_up_to_date(data, store)
    assert rename["featurized"] == 0 and rename["reused_by_content"] == k, rename
    table = tmp / "labels.csv"  # the same labels as a table, then 1% of them edited
    files = sorted(str(p.relative_to(data)) for p in (data / "train").rglob("*.jpg"))
    labels = {path: path.split("/")[1] for path in files}
    _write_table(table, labels)
    assert bring_up_to_date(data, store, table)[0]["featurized"] == 0
    for path in files[:: len(files) // k][:k]:
        labels[path] = "b" if labels[path] == "a" else "a"
    _write_table(table, labels)
    edit, edit_bytes = bring_up_to_date(data, store, table)
    assert edit["featurized"] == 0 and edit["reused"] == n, edit
    runs = (("relabel (class folder moves)", relabel, relabel_bytes), ("rename", rename, rename_bytes))
    for what, summary, written in (*runs, ("relabel (a CSV edited)", edit, edit_bytes)):
        rows.append(
            Row(
                f"{label} images: {what} {k:,} (1%) then featurize, s",
                summary["seconds"],
                k / rate,
                "s",
                higher_is_better=False,
                note=f"nothing decoded; reference: decode and forward them at {rate:.0f} img/s",
            )
        )
        rows.append(
            Row(
                f"{label} images: bytes the {what} wrote / the store's",
                written / summary["store_bytes"],
                None,
                "x",
                higher_is_better=False,
                note=f"{written / 1e6:.1f} MB of {summary['store_bytes'] / 1e9:.2f} GB: overlay and root, no feature",
            )
        )
    shutil.rmtree(data)
    shutil.rmtree(store.with_name(store.name + ".parts"))
    store.unlink()
    return rows


def bench_labels_rows(quick: bool, tmp: Path) -> list[Row]:
    started = time.perf_counter()
    rate = featurize_rate(tmp)
    rows = []
    for n in (10_000,) if quick else (100_000, 1_000_000):
        rows += size_rows(n, tmp, rate)
    rows += task_rows(quick, tmp)
    print(f"labels: {time.perf_counter() - started:.0f} s", flush=True)
    return rows


# Multi-label and numeric heads against scikit-learn on the same cached features ---------------------------------
def composite_photos(
    tmp: Path, train: int, valid: int, seed: int = 0, source: Path = SHARED / "flowers5"
) -> tuple[Path, dict, dict]:
    """flowers5 photos composed two (of two classes) or one to a square picture, tagged with the classes they show,
    and scored by their mean brightness: a multi-label and a numeric task from real photos. Returns the folder
    (train/ and valid/ of flat images), the tags and the scores by path."""
    from PIL import Image

    from stages.files import find_images

    classes = sorted(p.name for p in (source / "train").iterdir())
    rng = np.random.default_rng(seed)
    data, tags, scores = tmp / "composites", {}, {}
    for split, count in (("train", train), ("valid", valid)):
        pools = {c: find_images(source / split / c) for c in classes}
        (data / split).mkdir(parents=True)
        for i in range(count):
            shown = sorted(rng.choice(classes, size=int(rng.integers(1, 3)), replace=False))
            canvas = Image.new("RGB", (256, 256))
            for j, name in enumerate(shown):
                photo = Image.open(pools[name][int(rng.integers(len(pools[name])))]).convert("RGB")
                canvas.paste(photo.resize((256 // len(shown), 256)), (j * 256 // len(shown), 0))
            path = f"{split}/{i:05d}.jpg"
            canvas.save(data / path, quality=90)
            tags[path] = " ".join(shown)
            scores[path] = round(float(np.asarray(canvas.convert("L"), np.float32).mean() / 255), 5)
    return data, tags, scores


def task_rows(quick: bool, tmp: Path) -> list[Row]:
    """The default head of a multi-label and of a numeric task against scikit-learn on the same cached features
    (one-vs-rest logistic regression, RidgeCV), each whole-process, alternated: valid score and seconds."""
    import sys

    if not (SHARED / "flowers5").is_dir():
        return [Row("multi-label and numeric heads", None, note="../shared/data/flowers5 absent: not measured")]
    train, valid = (240, 80) if quick else (1200, 400)
    data, tags, scores = composite_photos(tmp, train, valid)
    tables = {"multi": tmp / "tags.csv", "numeric": tmp / "scores.csv"}
    _write_table(tables["multi"], tags)
    _write_table(tables["numeric"], scores)
    store = tmp / "composites.h5"
    run_json_command(
        pipeline_cmd("featurize", data, "--store", store, "--labels", tables["multi"], "--label-delim", " ")
    )
    rows = []
    for task, figure in (("multi", "mAP"), ("numeric", "R²")):
        ours_args = ("train-head", "--store", store, "--labels", tables[task], "--out", tmp / f"head-{task}")
        ours_args += ("--label-delim", " ") if task == "multi" else ()
        found: dict[str, float] = {}

        def ours(args=ours_args, found=found) -> float:
            [run], seconds = run_json_command(pipeline_cmd(*args, "--overwrite"))
            found["ours"] = run["score"]
            return seconds

        def reference(task=task, found=found) -> float:
            result, seconds = run_json_command(
                [sys.executable, "-m", "bench.sklearn_heads", str(store), str(tables[task]), task]
            )
            found["reference"] = result["score"]
            return seconds

        ours_s, reference_s, pairs = alternate(ours, reference, 2)
        name = "one-vs-rest LogisticRegression" if task == "multi" else "RidgeCV"
        what = f"{train} composites of flowers5 photos ({'their classes' if task == 'multi' else 'their brightness'})"
        rows.append(
            Row(
                f"{task} head: valid {figure}",
                found["ours"],
                found["reference"],
                note=f"{what}; reference: scikit-learn {name}",
            )
        )
        rows.append(
            Row(
                f"{task} head: seconds, whole process",
                ours_s,
                reference_s,
                "s",
                higher_is_better=False,
                note="median of 2 alternated; both read the store's features (ours: train-head's default logreg)",
                pairs=pairs,
            )
        )
    return rows
