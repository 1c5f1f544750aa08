"""pipeline audit: planted label flips, re-encoded copies across splits and errors, on real stores."""

import csv
import hashlib
import json

import numpy as np
import pytest
from conftest import make_images, one_line_error, run_cli, run_json, shared_dataset
from PIL import Image, ImageOps

from bench.synthetic import separable_features, write_feature_store
from pipeline.audit import read_rows
from stages.audit import PAIRS_PER_GROUP, CopyGroups, approximate_scan, exact_copies, exact_scan, outlier_rows
from store.reader import FeatureStore

pytestmark = pytest.mark.slow  # every test here runs the CLI on images or kills processes


def folder_digest(root):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_similarity_scan_in_blocks_equals_the_full_matrix():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    x[250] = x[10] * 3 + 0.01  # a scaled near-copy
    x[299] = x[0]
    groups, nearest = exact_scan(x, threshold=0.9, neighbours=3, block_bytes=4 * 300 * 7)  # 7-row blocks
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    full = z @ z.T
    np.fill_diagonal(full, -np.inf)
    expected = {(i, j) for i, j in zip(*np.nonzero(full >= 0.9)) if i < j}
    found = [g for g in groups.groups()]
    assert {(a, b) for g in found for a, b, _ in g.pairs} == expected and (10, 250) in expected and (0, 299) in expected
    assert sorted(tuple(g.members) for g in found) == sorted(tuple(sorted(p)) for p in expected)
    np.testing.assert_allclose(nearest, np.sort(full, 1)[:, -3:].mean(1), rtol=1e-5)
    far, fence = outlier_rows(np.r_[np.full(99, 0.9), 0.1])
    assert list(far) == [99] and fence == pytest.approx(0.1)  # no spread among the rest: the fence sits on them


def test_the_approximate_scan_finds_the_exact_scans_pairs_and_neighbours():
    """faiss proposes the candidates, their exact cosine decides: on clustered rows with planted near-copies, the
    same pairs as the exact scan and nearly the same neighbour similarities."""
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(2)
    centres = rng.normal(size=(20, 256)).astype(np.float32)
    x = centres[rng.integers(0, 20, 4000)] + rng.normal(size=(4000, 256)).astype(np.float32)
    for i in range(0, 200, 2):  # 100 planted near-copies
        x[4000 - 1 - i] = x[i] + 0.05 * rng.normal(size=256).astype(np.float32)
    given = x.copy()
    exact, exact_nearest = exact_scan(x, threshold=0.95, neighbours=5)
    approximate, nearest = approximate_scan(faiss, x, threshold=0.95, neighbours=5, groups=CopyGroups(len(x)))
    assert np.array_equal(x, given)  # rows are normalized a block at a time in copies, never in place
    pairs = {(a, b) for g in exact.groups() for a, b, _ in g.pairs}
    assert len(pairs) == 100 and {(a, b) for g in approximate.groups() for a, b, _ in g.pairs} == pairs
    gap = exact_nearest - nearest  # >= 0: a neighbour missed is replaced by a farther one
    assert gap.min() > -1e-5 and np.median(gap) < 1e-5 and gap.max() < 0.02, (np.median(gap), gap.max())
    assert list(outlier_rows(nearest)[0]) == list(outlier_rows(exact_nearest)[0])


def test_the_audit_reads_the_plain_view_of_every_split_as_stored(tmp_path):
    """Augmented rows are skipped, the plain ones read in stored order into one array of the stored dtype."""
    train, valid = separable_features(300, classes=3, views=2), separable_features(90, classes=3)
    path = write_feature_store(tmp_path / "s.h5", train, valid, classes=("x", "y", "z"), views=2)
    with FeatureStore(path) as store:
        rows = read_rows(store.feature_set(None))
    expected = np.concatenate([train[0][train[2] == 0], valid[0]])
    assert rows.features.dtype == np.float16 and np.array_equal(rows.features, expected)
    assert list(rows.labels) == [*train[1][train[2] == 0], *valid[1]]
    assert list(rows.splits[[0, -1]]) == ["train", "valid"]


def test_copies_are_grouped_each_image_once_and_pairs_stay_few():
    """500 near-identical rows are one group of 500 listed once, with at most PAIRS_PER_GROUP of its 124,750 pairs;
    two tight clusters bridged by one row above the threshold are one group (joined through the bridge)."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=64).astype(np.float32)
    copies = base + 0.01 * rng.normal(size=(500, 64)).astype(np.float32)
    others = rng.normal(size=(200, 64)).astype(np.float32)
    a, b = rng.normal(size=64), rng.normal(size=64)
    bridge = np.stack([a, a + 0.01, (a + b) / np.linalg.norm(a + b) * np.linalg.norm(a), b, b + 0.01])
    x = np.concatenate([copies, others, bridge.astype(np.float32)])
    groups = CopyGroups(len(x))
    exact_copies(["same", "same", "same"] + [f"h{i}" for i in range(len(x) - 3)], groups)
    groups, _ = exact_scan(x, threshold=0.65, groups=groups, block_bytes=4 * len(x) * 64)
    found = groups.groups()
    assert [len(g.members) for g in found] == [500, 5]
    assert found[0].members == list(range(500)) and found[1].members == list(range(700, 705))
    assert len(found[0].pairs) == PAIRS_PER_GROUP and found[0].linked_pairs >= 500 * 499 // 2
    assert [s for _, _, s in found[0].pairs] == sorted((s for _, _, s in found[0].pairs), reverse=True)


def test_audit_writes_findings_pictures_and_never_touches_the_data(trained, tmp_path):
    data, store, _ = trained
    before = folder_digest(data)
    result = run_json("audit", "--store", store, "--out", tmp_path / "audit")
    assert folder_digest(data) == before
    assert result["images"] == result["labelled"] == 36 and result["classes"] == ["a", "b", "c"]
    for key in ("label_issues", "duplicates", "outliers"):
        assert isinstance(result[key], list)
        with open(tmp_path / "audit" / f"{key}.csv") as f:
            assert len(list(csv.DictReader(f))) == len(result[key])
    for name in ("label_issues", "duplicates", "map"):
        assert Image.open(tmp_path / "audit" / f"{name}.png").size[0] > 300
    assert json.loads((tmp_path / "audit" / "audit.json").read_text())["images"] == 36
    for issue in result["label_issues"]:
        assert set(issue) == {"path", "split", "given", "suggested", "score"} and (data / issue["path"]).is_file()


def test_audit_errors_are_one_line(tmp_path):
    unlabelled = make_images(tmp_path / "u", {"test": {"x": 4}})
    run_json("featurize", unlabelled, "--store", tmp_path / "u.h5")
    one_line_error(
        run_cli("audit", "--store", tmp_path / "u.h5", "--out", tmp_path / "o", check=False),
        "u.h5",
        "no labelled train images",
    )
    lonely = make_images(tmp_path / "l", {"train": {"a": 4, "b": 1}})
    run_json("featurize", lonely, "--store", tmp_path / "l.h5")
    one_line_error(
        run_cli("audit", "--store", tmp_path / "l.h5", "--out", tmp_path / "o", check=False),
        "class b has 1 train image",
    )
    one_line_error(run_cli("audit", "--store", tmp_path / "l.h5", "--threshold", "1.5", check=False), "--threshold")
    one_line_error(run_cli("audit", "--store", tmp_path / "missing.h5", check=False), "missing.h5")
    assert not (tmp_path / "o").exists()


@pytest.mark.shared_data
def test_audit_finds_flipped_labels_and_planted_copies_in_real_photos(tmp_path):
    """Real dogscats photos: 6 labels flipped, 4 train photos re-encoded (JPEG 75, 0.9x) into valid."""
    source = shared_dataset("dogscats")
    data = tmp_path / "data"
    flipped, planted = [], []
    for split, count in (("train", 120), ("valid", 40)):
        for cls, other in (("cats", "dogs"), ("dogs", "cats")):
            for n, path in enumerate(sorted((source / split / cls).iterdir())[:count]):
                flip = split == "train" and n < 3
                target = data / split / (other if flip else cls) / path.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
                if flip:
                    flipped.append(target.relative_to(data).as_posix())
                elif split == "train" and n in (10, 11):
                    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
                    copy = data / "valid" / cls / f"copy-{path.name}"
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    image.resize((int(image.width * 0.9), int(image.height * 0.9)), Image.BICUBIC).save(
                        copy, quality=75
                    )
                    planted.append((target.relative_to(data).as_posix(), copy.relative_to(data).as_posix()))
    run_json("featurize", data, "--store", tmp_path / "s.h5")
    result = run_json("audit", "--store", tmp_path / "s.h5", "--out", tmp_path / "audit")
    ranked = [i["path"] for i in result["label_issues"]]
    assert set(flipped) <= set(ranked[:10]), (flipped, ranked[:10])
    for issue in result["label_issues"]:
        if issue["path"] in flipped:
            assert issue["suggested"] != issue["given"]
    found = {(d["a"], d["b"]): d for d in result["duplicates"]}
    for train_path, copy_path in planted:
        pair = found.get((train_path, copy_path)) or found.get((copy_path, train_path))
        assert pair and pair["kind"] == "near" and pair["leak"], (train_path, copy_path)
    unplanted = [d for d in result["duplicates"] if "copy-" not in d["a"] + d["b"]]
    assert not unplanted, unplanted  # different photos of similar cats are not copies
