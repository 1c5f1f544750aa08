"""Data folder layouts, the --valid-pct split, and header vetting of bad files."""

import gc
import os
import shutil
import weakref

import pytest
from conftest import make_images, png_bomb

from stages.bulk import collector_paused
from stages.errors import PipelineError
from stages.files import UNLABELLED, BadImage, find_images, read_image_file, scan_dataset


def test_split_layout_with_unlabelled_test(tmp_path):
    root = make_images(tmp_path, {"train": {"cats": 3, "dogs": 4}, "valid": {"cats": 2, "dogs": 1}})
    make_images(tmp_path / "test", {"": {"unsorted": 3}})
    ds = scan_dataset(root)
    assert ds.classes == ["cats", "dogs"]
    assert [len(ds.splits[s]) for s in ("train", "valid", "test")] == [7, 3, 3]
    assert {f.label for f in ds.splits["train"]} == {0, 1}
    assert all(f.label == UNLABELLED for f in ds.splits["test"])
    assert ds.splits["train"][0].path == "train/cats/cats_000.jpg"


def test_single_folder_valid_pct_is_stratified_deterministic_and_stable(tmp_path):
    root = make_images(tmp_path / "data", {"": {"a": 10, "b": 20}})
    ds = scan_dataset(root, valid_pct=0.2, seed=0)
    assert ds.layout == "classes" and ds.describe() == {"layout": "classes", "valid_pct": 0.2, "split_seed": 0}
    assert sorted(f.label for f in ds.splits["valid"]) == [0, 0] + [1] * 4
    assert scan_dataset(root, valid_pct=0.2, seed=0).splits == ds.splits
    assert scan_dataset(root, valid_pct=0.2, seed=1).splits["valid"] != ds.splits["valid"]
    # A new file does not move the others: each file's split depends on its own hash.
    make_images(tmp_path / "x", {"": {"a": 1}}, seed=5)
    (tmp_path / "x" / "a" / "a_000.jpg").rename(root / "a" / "new.jpg")
    again = scan_dataset(root, valid_pct=0.2, seed=0)
    moved = set(f.path for f in ds.splits["valid"]) - set(f.path for f in again.splits["valid"])
    assert len(moved) <= 1


def test_single_folder_without_valid_pct_goes_to_train(tmp_path):
    ds = scan_dataset(make_images(tmp_path, {"": {"a": 2, "b": 2}}))
    assert list(ds.splits) == ["train"] and len(ds.splits["train"]) == 4 and ds.notes


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"train": {"a": 2}, "valid": {"a": 1}}, "only one class"),
        ({"train": {"a": 2, "b": 2}, "valid": {"a": 1, "c": 1}}, "other class folders"),
    ],
)
def test_bad_layouts(tmp_path, layout, message):
    with pytest.raises(PipelineError, match=message):
        scan_dataset(make_images(tmp_path, layout))


def test_missing_folder_and_empty_class(tmp_path):
    with pytest.raises(PipelineError, match="does not exist"):
        scan_dataset(tmp_path / "nope")
    root = make_images(tmp_path, {"train": {"a": 2, "b": 2}})
    (root / "train" / "empty").mkdir()
    with pytest.raises(PipelineError, match="empty.*no training images"):
        scan_dataset(root)


def test_valid_pct_with_existing_valid_is_refused(tmp_path):
    root = make_images(tmp_path, {"train": {"a": 2, "b": 2}, "valid": {"a": 1, "b": 1}})
    with pytest.raises(PipelineError, match="already has valid"):
        scan_dataset(root, valid_pct=0.2)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"hello, I am text", "not an image"),
        (png_bomb(100_000, 100_000), "decompression bomb"),
        (png_bomb(12_000, 10_000), "exceeds the 100000000-pixel limit"),
    ],
)
def test_header_vetting(tmp_path, content, reason):
    path = tmp_path / "x.png"
    path.write_bytes(content)
    with pytest.raises(BadImage, match=reason):
        read_image_file(path)


def test_symlinks_are_followed_once_and_never_into_another_class(tmp_path):
    data = make_images(tmp_path / "data", {"train": {"a": 3, "b": 3}, "valid": {"a": 2, "b": 2}})
    make_images(tmp_path / "data" / "train" / "a" / ".hidden", {"": {"x": 2}})
    make_images(tmp_path / "elsewhere", {"": {"extra": 2}})
    (data / "train" / "b" / "loop").symlink_to("..")  # the split folder: every class again, as b
    (data / "train" / "a" / "up").symlink_to("../../..")  # above the data folder
    (data / "train" / "a" / "into-b").symlink_to("../b")
    (data / "train" / "a" / "b-file.jpg").symlink_to("../b/b_000.jpg")
    (data / "train" / "b" / "outside").symlink_to(tmp_path / "elsewhere" / "extra")  # followed, once
    (data / "train" / "b" / "outside-again").symlink_to(tmp_path / "elsewhere" / "extra")
    ds = scan_dataset(data)
    train = {f.path: f.label for f in ds.splits["train"]}
    assert sorted(train) == sorted(
        [f"train/a/a_{i:03d}.jpg" for i in range(3)]
        + [f"train/b/b_{i:03d}.jpg" for i in range(3)]
        + [f"train/b/outside/extra_{i:03d}.jpg" for i in range(2)]
    )
    assert all(label == (0 if path.startswith("train/a/") else 1) for path, label in train.items())
    assert len(ds.splits["valid"]) == 4 and not set(train) & {f.path for f in ds.splits["valid"]}
    notes = " ".join(ds.notes)
    for name in ("loop", "up", "into-b", "b-file.jpg", "outside-again"):
        assert f"/{name}" in notes, (name, ds.notes)


def test_a_scan_records_each_files_stat_as_the_file_is_found(tmp_path):
    data = make_images(tmp_path / "data", {"train": {"a": 2, "b": 2}})
    make_images(tmp_path / "elsewhere", {"": {"extra": 1}})
    (data / "train" / "b" / "linked.jpg").symlink_to(tmp_path / "elsewhere" / "extra" / "extra_000.jpg")
    (data / "train" / "b" / "broken.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (data / "train" / "a" / "a_001.jpg").write_bytes(b"changed")
    files = {f.path: f.stat for f in scan_dataset(data).splits["train"]}
    assert set(files) == {"train/a/a_000.jpg", "train/a/a_001.jpg", "train/b/b_000.jpg", "train/b/b_001.jpg"} | {
        "train/b/linked.jpg",
        "train/b/broken.jpg",
    }
    for path, found in files.items():
        if path == "train/b/broken.jpg":
            assert found is None  # listed, and its decision says why it cannot be read
            continue
        st = (data / path).stat()  # a symlink's: its target's
        assert found == (st.st_size, st.st_mtime_ns, st.st_ctime_ns), path
    assert files["train/a/a_001.jpg"][0] == len(b"changed")


class _Node:
    pass


def test_the_collector_paused_over_a_scan_comes_back_and_still_frees_cycles():
    was = gc.isenabled()
    gc.enable()
    try:
        with collector_paused():
            assert not gc.isenabled()
            node = _Node()
            node.itself = node  # a cycle: only the collector frees it
            freed = weakref.ref(node)
            del node
        assert gc.isenabled() and gc.get_freeze_count() == 0  # nothing left in the permanent generation
        gc.collect()
        assert freed() is None
    finally:
        (gc.enable if was else gc.disable)()


def test_names_a_store_cannot_keep_are_left_out_with_a_note_and_a_class_folder_so_named_is_refused(tmp_path):
    data = make_images(tmp_path / "data", {"train": {"a": 2, "b": 2}})
    odd = os.fsdecode(b"\xff\xfe.jpg")  # bytes that are not UTF-8: Python names them with lone surrogates
    shutil.copy(data / "train" / "a" / "a_000.jpg", data / "train" / "a" / odd)
    (data / "train" / "b" / odd[:1]).mkdir()
    shutil.copy(data / "train" / "b" / "b_000.jpg", data / "train" / "b" / odd[:1] / "inside.jpg")
    ds = scan_dataset(data)
    paths = [f.path for split in ds.splits.values() for f in split]
    assert len(paths) == 4 and all(p.isascii() for p in paths)
    skipped = [n for n in ds.notes if "not UTF-8" in n]
    assert len(skipped) == 2 and any("train/a/\\xff\\xfe.jpg" in n for n in skipped), ds.notes
    assert str(find_images(data / "train" / "a")[-1]).endswith(odd)  # predict keeps it
    (data / "train" / odd[:2]).mkdir()
    with pytest.raises(PipelineError, match=r"class folder .*train/\\xff\\xfe has a name that is not UTF-8"):
        scan_dataset(data)
