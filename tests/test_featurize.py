"""`pipeline featurize` as a user runs it: the store's content, the cache rules, bad files, sets and the lock."""

import json
import os
import shutil

import h5py
import numpy as np
import pytest
from conftest import imported_modules, make_images, one_line_error, png_bomb, run_cli, run_json

from store.locks import StoreLock
from store.paths import StorePaths

FAST = ("--batch-size", "8", "--precision", "fp32")


def featurize(data, store, *extra):
    return run_json("featurize", data, "--store", store, *FAST, *extra)


def only_set(store):
    f = h5py.File(store, "r")
    (name,) = list(f["sets"])
    return f, f["sets"][name]


@pytest.mark.slow
def test_store_reads_with_plain_h5py(small_set, tmp_path):
    store = tmp_path / "s.h5"
    summary = featurize(small_set, store, "--views", "2")
    assert summary["featurized"] == 21 and summary["images"] == {"train": 15, "valid": 6}
    assert summary["rows"] == {"train": 45, "valid": 6} and not summary["skipped"]
    with h5py.File(store, "r") as f:
        assert f.attrs["schema_version"] == 2
        group = f["sets"][summary["set"]]
        assert json.loads(group.attrs["classes"]) == ["a", "b", "c"]
        assert group.attrs["backbone"] == "efficientnet_lite0" and len(group.attrs["weights_sha256"]) == 64
        assert json.loads(group.attrs["preprocessing"])["size"] == 224
        assert group.attrs["views"] == 2 and group.attrs["precision"] == "fp32"
        train = group["train"]
        assert train["features"].shape == (45, 1280) and train["features"].dtype == np.float16
        paths = [p.decode() for p in train["paths"][()]]
        assert paths[:3] == ["train/a/a_000.jpg"] * 3 and paths == sorted(paths)
        assert list(train["view"][:6]) == [0, 1, 2, 0, 1, 2]
        assert list(train["labels"][()]) == [0] * 15 + [1] * 15 + [2] * 15
        assert all(len(h) == 64 for h in train["sha256"][()])
        assert list(group["valid"]["view"][()]) == [0] * 6
        features = train["features"][()].astype(np.float32)
        assert np.isfinite(features).all() and not np.allclose(features[0], features[1])


@pytest.mark.slow
def test_cache_hit_append_remove_change_touch(small_set, tmp_path):
    store = tmp_path / "s.h5"
    first = featurize(small_set, store)
    f, group = only_set(store)
    before = {p.decode(): row for p, row in zip(group["train"]["paths"][()], group["train"]["features"][()])}
    f.close()
    stamp = os.stat(store).st_mtime_ns

    again = featurize(small_set, store)
    assert again["up_to_date"] and again["featurized"] == 0 and os.stat(store).st_mtime_ns == stamp

    make_images(tmp_path / "more", {"train": {"a": 1}}, seed=9)
    shutil.move(tmp_path / "more/train/a/a_000.jpg", small_set / "train/a/new.jpg")
    (small_set / "train/b/b_001.jpg").unlink()
    make_images(tmp_path / "other", {"train": {"x": 1}}, seed=3)
    shutil.copy(tmp_path / "other/train/x/x_000.jpg", small_set / "train/c/c_002.jpg")  # changed content
    touched = small_set / "train/a/a_003.jpg"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))

    third = featurize(small_set, store)
    assert third["featurized"] == 2 and third["reused"] == first["featurized"] - 2
    assert third["images"]["train"] == 15
    f, group = only_set(store)
    with f:
        after = {p.decode(): row for p, row in zip(group["train"]["paths"][()], group["train"]["features"][()])}
        mtimes = dict(zip([p.decode() for p in group["train"]["paths"][()]], group["train"]["mtime_ns"][()]))
    assert "train/b/b_001.jpg" not in after and "train/a/new.jpg" in after
    assert not np.array_equal(after["train/c/c_002.jpg"], before["train/c/c_002.jpg"])
    assert np.array_equal(after["train/a/a_003.jpg"], before["train/a/a_003.jpg"])
    assert mtimes["train/a/a_003.jpg"] == touched.stat().st_mtime_ns
    for path in set(before) & set(after) - {"train/c/c_002.jpg"}:
        assert np.array_equal(after[path], before[path])
    assert featurize(small_set, store)["up_to_date"]


@pytest.mark.slow
def test_other_settings_make_a_separate_set(small_set, tmp_path):
    store = tmp_path / "s.h5"
    a = featurize(small_set, store)
    b = featurize(small_set, store, "--dtype", "float32")
    assert a["set"] != b["set"] and b["featurized"] == 21
    info = run_json("store", "info", store)
    assert sorted(s["name"] for s in info["sets"]) == sorted([a["set"], b["set"]])
    assert {s["dtype"] for s in info["sets"]} == {"float16", "float32"}
    assert all(s["splits"]["train"]["images"] == 15 for s in info["sets"])
    assert featurize(small_set, store)["up_to_date"]
    text = run_cli("store", "info", store).stdout
    assert a["set"] in text and "train: 15 images" in text


@pytest.mark.slow
def test_bad_files_are_skipped_recorded_and_not_retried(small_set, tmp_path):
    good = (small_set / "train/a/a_000.jpg").read_bytes()
    (small_set / "train/a/zero.jpg").write_bytes(b"")
    (small_set / "train/b/truncated.jpg").write_bytes(good[: len(good) * 2 // 3])
    (small_set / "train/c/notes.jpg").write_text("not an image")
    (small_set / "valid/a/bomb.png").write_bytes(png_bomb(20_000, 20_000))
    (small_set / "valid/b/gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    store = tmp_path / "s.h5"
    summary = featurize(small_set, store)
    reasons = {s["path"]: s["reason"] for s in summary["skipped"]}
    assert set(reasons) == {"train/a/zero.jpg", "train/b/truncated.jpg", "train/c/notes.jpg", "valid/a/bomb.png"} | {
        "valid/b/gone.jpg"
    }
    assert reasons["valid/b/gone.jpg"].startswith("cannot read")
    assert summary["featurized"] == 21 and summary["images"] == {"train": 15, "valid": 6}
    f, group = only_set(store)
    with f:
        assert sorted(p.decode() for p in group["train"]["skipped"]["paths"][()]) == sorted(
            r for r in reasons if r.startswith("train")
        )
    stamp = os.stat(store).st_mtime_ns
    again = featurize(small_set, store)  # the same report, nothing retried, the root not switched
    assert again["up_to_date"] and again["featurized"] == 0 and again["reused"] == summary["featurized"]
    assert [again[k] for k in ("images", "rows", "skipped")] == [summary[k] for k in ("images", "rows", "skipped")]
    assert os.stat(store).st_mtime_ns == stamp
    text = run_cli("featurize", small_set, "--store", store, *FAST).stderr
    assert "skipped train/a/zero.jpg: empty file" in text


@pytest.mark.slow
def test_second_writer_gets_a_clear_error(small_set, tmp_path):
    store = tmp_path / "s.h5"
    with StoreLock(StorePaths.of(store)):
        proc = run_cli("featurize", small_set, "--store", store, check=False)
    assert proc.returncode == 1
    assert "being written by another featurize" in proc.stderr and "Traceback" not in proc.stderr
    assert not store.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (("--views", "-1"), "--views -1 is out of range"),
        (("--dtype", "int8"), "--dtype 'int8'"),
        (("--precision", "fp8"), "--precision 'fp8'"),
        (("--device", "tpu"), "--device 'tpu'"),
        (("--backbone", "resnet"), "unknown backbone 'resnet'"),
    ],
)
def test_bad_options_give_one_line_errors(small_set, tmp_path, args, message):
    one_line_error(run_cli("featurize", small_set, "--store", tmp_path / "s.h5", *args, check=False), message)


@pytest.mark.slow
def test_valid_pct_split_is_recorded(tmp_path):
    data = make_images(tmp_path / "data", {"": {"a": 5, "b": 5}})
    summary = featurize(data, tmp_path / "s.h5", "--valid-pct", "0.2", "--seed", "3")
    assert summary["images"] == {"train": 8, "valid": 2}
    f, group = only_set(tmp_path / "s.h5")
    with f:
        assert group.attrs["layout"] == "classes" and group.attrs["valid_pct"] == 0.2 and group.attrs["split_seed"] == 3


@pytest.mark.slow
def test_unlabelled_test_split(small_set, tmp_path):
    make_images(small_set / "test", {"": {"loose": 2}})
    summary = featurize(small_set, tmp_path / "s.h5")
    assert summary["images"]["test"] == 2
    f, group = only_set(tmp_path / "s.h5")
    with f:
        assert list(group["test"]["labels"][()]) == [-1, -1]


@pytest.mark.slow
def test_changing_valid_pct_reuses_every_unchanged_row(tmp_path):
    data = make_images(tmp_path / "data", {"": {"a": 10, "b": 10}})
    featurize(data, tmp_path / "s.h5", "--valid-pct", "0.2")
    moved = featurize(data, tmp_path / "s.h5", "--valid-pct", "0.4")
    assert moved["images"] == {"train": 12, "valid": 8} and moved["featurized"] == 0 and moved["reused"] == 20
    fresh = featurize(data, tmp_path / "fresh.h5", "--valid-pct", "0.4")
    assert fresh["featurized"] == 20
    for store in ("s.h5", "fresh.h5"):  # the same rows (in the order the store's history put them: compared by path)
        f, group = only_set(tmp_path / store)
        with f:
            rows = {
                split: dict(zip(group[split]["paths"].asstr()[()], group[split]["features"][()])) for split in group
            }
        if store == "s.h5":
            reused = rows
    for split, by_path in rows.items():
        assert sorted(reused[split]) == sorted(by_path)
        for path, features in by_path.items():
            np.testing.assert_array_equal(reused[split][path], features)


@pytest.mark.slow
def test_a_file_swapped_with_its_size_and_mtime_restored_is_recomputed(small_set, tmp_path):
    featurize(small_set, tmp_path / "s.h5")
    target = small_set / "train" / "a" / "a_000.jpg"
    st = target.stat()
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    target.write_bytes(bytes(data))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as before; ctime cannot be restored
    again = featurize(small_set, tmp_path / "s.h5")
    assert again["featurized"] + len(again["skipped"]) == 1 and again["reused"] == 20


@pytest.mark.slow
def test_an_up_to_date_store_answers_without_building_the_backbone(small_set, tmp_path):
    """The identity comes from the registry and the weights' remembered hash: no timm, no DALI, nothing decoded."""
    store = tmp_path / "s.h5"
    featurize(small_set, store)
    modules = imported_modules("featurize", small_set, "--store", store, *FAST)
    assert "h5py" in modules and not {"timm", "nvidia", "torchvision", "matplotlib", "ray", "faiss"} & modules
    # New images: the backbone's frozen trace, cached by the first run, is loaded; the model is never built.
    make_images(tmp_path / "more", {"train": {"a": 1}}, seed=5)
    (tmp_path / "more" / "train" / "a" / "a_000.jpg").rename(small_set / "train" / "a" / "new.jpg")
    modules = imported_modules("featurize", small_set, "--store", store, *FAST)
    assert not {"timm", "torchvision"} & modules
    f, features = only_set(store)
    with f:
        assert "train/a/new.jpg" in [p.decode() for p in features["train"]["paths"][()]]


@pytest.mark.slow
def test_commands_that_need_no_model_import_no_torch(small_set, tmp_path):
    store = tmp_path / "s.h5"
    featurize(small_set, store)
    for args in (
        ("runs", "--dir", tmp_path),
        ("store", "info", store),
        ("--help",),
        ("featurize", "--help"),
        ("inspect", small_set, "--out", tmp_path / "inspect"),
    ):
        modules = imported_modules(*args)
        assert not {"torch", "timm", "nvidia"} & modules, (args, {"torch", "timm", "nvidia"} & modules)


def test_the_row_record_is_the_schemas_column_list():
    """A store column is a schema entry and a FileRecord field: the record writes exactly the schema's columns."""
    import dataclasses

    from store.schema import ROW_COLUMNS, SKIPPED_COLUMNS, FileRecord

    record = FileRecord("train/a/x.jpg", 1, 10, 20, 30, "ab" * 32)
    columns, skipped = {k: [] for k in ROW_COLUMNS}, {k: [] for k in SKIPPED_COLUMNS}
    record.add_rows(columns, 3)
    record.add_skipped(skipped, "cannot decode")
    assert (
        columns["view"] == [0, 1, 2] and columns["paths"] == ["train/a/x.jpg"] * 3 and columns["ctime_ns"] == [30] * 3
    )
    assert skipped == {
        "paths": ["train/a/x.jpg"],
        "reasons": ["cannot decode"],
        "size": [10],
        "mtime_ns": [20],
        "ctime_ns": [30],
        "sha256": ["ab" * 32],
    }
    fields = {f.name for f in dataclasses.fields(FileRecord)}
    assert fields == (set(ROW_COLUMNS) - {"view"}) | (set(SKIPPED_COLUMNS) - {"reasons"})


def test_moved_renamed_copied_or_relabelled_photos_are_never_decoded_again(small_set, tmp_path):
    """Rows are keyed by content: the same bytes under another path, class folder or split reuse their features
    (written anew under the new path and label), and the store then equals a fresh featurize."""
    from conftest import assert_same_content, content

    store = tmp_path / "s.h5"
    featurize(small_set, store)
    train, valid = small_set / "train", small_set / "valid"
    (train / "a" / "a_000.jpg").rename(train / "b" / "a_000.jpg")  # relabelled (moved to another class folder)
    (train / "a" / "a_001.jpg").rename(train / "a" / "renamed.jpg")  # renamed
    shutil.copy2(train / "c" / "c_000.jpg", train / "c" / "copy.jpg")  # copied
    (valid / "b" / "b_000.jpg").rename(train / "b" / "from-valid.jpg")  # moved between splits
    parts = store.with_name("s.h5.parts")
    before = set(os.listdir(parts))
    moved = featurize(small_set, store)
    assert moved["featurized"] == 0 and moved["reused_by_content"] == 4 and moved["reused"] == 22
    featurize(small_set, tmp_path / "fresh.h5")
    assert_same_content(content(store), content(tmp_path / "fresh.h5"))
    [overlay] = set(os.listdir(parts)) - before - {n for n in os.listdir(parts) if n.startswith("retired-")}
    with h5py.File(parts / overlay, "r") as f:  # no feature byte written: locations and labels only
        assert overlay.endswith("o.h5") and not [g for g in f.values() if "features" in g]
        assert sorted(f["train/paths"].asstr()[()])[:2] == ["train/a/renamed.jpg", "train/b/a_000.jpg"]
    lost = tmp_path / "lost.h5"  # a root lost with its overlays: rebuilt from the feature partitions, nothing decoded
    shutil.copytree(parts, tmp_path / "lost.h5.parts")
    rebuilt = featurize(small_set, lost)
    assert rebuilt["featurized"] == 0 and rebuilt["reused_by_content"] == 4
    assert_same_content(content(lost), content(tmp_path / "fresh.h5"))
    assert overlay not in os.listdir(tmp_path / "lost.h5.parts")  # no root can map it again: gone
    (train / "c" / "c_004.jpg").unlink()  # a dead row: compaction rewrites the rows, with their overlays folded in
    featurize(small_set, store)
    compacted = run_json("store", "compact", store, "--dead-share", "0")
    assert overlay in compacted["deleted"] and overlay not in compacted["rewritten"]
    featurize(small_set, tmp_path / "fresh2.h5")
    assert_same_content(content(store), content(tmp_path / "fresh2.h5"))
    (train / "b" / "a_000.jpg").rename(train / "a" / "a_000.jpg")  # and back: still nothing decoded
    back = featurize(small_set, store)
    assert back["featurized"] == 0 and back["reused_by_content"] == 1
    assert featurize(small_set, store)["up_to_date"]
