"""Every bad input gets a clear one-line answer; a full disk, a reader beside a writer, hostile files lose nothing."""

import json
import os
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, content, copy_store, make_images, one_line_error, png_bomb, run_cli, run_json, stored

from store.paths import StorePaths

pytestmark = pytest.mark.slow  # every test here runs the CLI on images or kills processes


def featurize_error(data, store, *args):
    return run_cli("featurize", data, "--store", store, *args, check=False)


def test_bad_data_folders(tmp_path):
    store = tmp_path / "s.h5"
    one_line_error(featurize_error(tmp_path / "missing", store), "missing does not exist")
    (tmp_path / "empty").mkdir()
    one_line_error(featurize_error(tmp_path / "empty", store), "neither train/ valid/ split folders nor class folders")
    (tmp_path / "noclass" / "train").mkdir(parents=True)
    one_line_error(featurize_error(tmp_path / "noclass", store), "train has no class folders")
    one = make_images(tmp_path / "one", {"train": {"a": 2}})
    one_line_error(featurize_error(one, store), "only one class")
    differ = make_images(tmp_path / "differ", {"train": {"a": 1, "b": 1}, "valid": {"a": 1, "c": 1}})
    one_line_error(featurize_error(differ, store), "other class folders", "b, c")
    hollow = make_images(tmp_path / "hollow", {"train": {"a": 1, "b": 1}})
    (hollow / "train" / "c").mkdir()
    one_line_error(featurize_error(hollow, store), "class folder(s) c", "no training images")
    one_line_error(featurize_error(one, store, "--valid-pct", "2"), "--valid-pct 2.0 is out of range")
    assert not store.exists()


def test_odd_names_symlink_loops_and_a_png_bomb_still_featurize(tmp_path):
    data = make_images(tmp_path / "data", {"train": {"a": 2, "b": 2}})
    (data / "train/a/a_000.jpg").rename(data / "train/a/with space é ü.jpg")
    (data / "train/b/loop").symlink_to(data / "train/b")
    (data / "train/a/bomb.png").write_bytes(png_bomb(30_000, 30_000))
    summary = run_json("featurize", data, "--store", tmp_path / "s.h5")
    assert summary["images"] == {"train": 4}
    assert [s["path"] for s in summary["skipped"]] == ["train/a/bomb.png"]
    with h5py.File(tmp_path / "s.h5") as f:
        (name,) = list(f["sets"])
        assert "train/a/with space é ü.jpg" in [p.decode() for p in f["sets"][name]["train/paths"][()]]


def test_bad_stores(small_set, trained, tmp_path):
    not_h5 = tmp_path / "notes.h5"
    not_h5.write_text("hello")
    one_line_error(featurize_error(small_set, not_h5), "is not an HDF5 file")
    one_line_error(run_cli("train-head", "--store", not_h5, check=False), "is not an HDF5 file")
    good = tmp_path / "good.h5"
    good.write_bytes(trained[1].read_bytes())
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    one_line_error(run_cli("store", "info", truncated, check=False), "is damaged")
    with h5py.File(good, "a") as f:
        f.attrs["schema_version"] = 99
    one_line_error(run_cli("train-head", "--store", good, check=False), "schema version 99")
    one_line_error(featurize_error(small_set, "/sys/store.h5"), "choose a --store in a writable folder")
    one_line_error(featurize_error(small_set, tmp_path), "is a folder")


def test_options_out_of_range_elsewhere(trained, tmp_path):
    data, store, head = trained
    one_line_error(run_cli("predict", head, data, "--top-k", "0", check=False), "--top-k 0")
    one_line_error(run_cli("predict", head, tmp_path / "nothing.jpg", check=False), "does not exist")
    one_line_error(run_cli("train-head", "--store", store, "--set", "nope", check=False), "no feature set 'nope'")
    one_line_error(run_cli("finetune", data, "--head", head, "--lr-mult", "0.5", check=False), "--lr-mult 0.5")
    proc = run_cli("--debug", "predict", head, data, "--top-k", "0", check=False)
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def limited_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_full_disk_gives_a_clear_error_and_keeps_committed_work(small_set, tmp_path):
    store = tmp_path / "s.h5"
    first = run_json("featurize", small_set, "--store", store)
    before = store.read_bytes()
    make_images(small_set / "train", {"": {"a": 6}}, seed=4)  # adds train/a/a_000.. with new content
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "featurize", str(small_set), "--store", str(store)],
        cwd=REPO,
        capture_output=True,
        text=True,
        preexec_fn=limited_file_size(len(before) + 70_000),
    )
    one_line_error(proc, "no space left writing", "committed is kept")
    assert store.read_bytes() == before
    again = run_json("featurize", small_set, "--store", store)
    assert again["images"]["train"] == first["images"]["train"] + 1  # a_000..a_004 changed, a_005 is new
    assert again["featurized"] == 0 and again["reused"] == 22  # the six were committed as a partition


def test_a_reader_sees_only_committed_snapshots(small_set, tmp_path):
    store = tmp_path / "s.h5"
    run_json("featurize", small_set, "--store", store)
    make_images(small_set, {"train": {"a": 12, "b": 12, "c": 12}}, seed=8)  # more images in the same folders
    for path in small_set.rglob("*.jpg"):
        os.utime(path)  # touched: hashes are checked, new files featurized
    writer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipeline",
            "featurize",
            str(small_set),
            "--store",
            str(store),
            "--batch-size",
            "4",
            "--commit-every",
            "4",
        ],
        cwd=REPO,
        stderr=subprocess.PIPE,
    )
    seen, errors = set(), []

    def read_until_done():
        while writer.poll() is None:
            try:
                with h5py.File(store, "r", locking=False) as f:
                    for name in f["sets"]:
                        g = f["sets"][name]["train"]
                        n = g["features"].shape[0]
                        assert n == len(g["paths"]) == len(g["labels"]) == len(g["sha256"])
                        seen.add(n)
            except Exception as exc:  # recorded: the assertion below fails on any inconsistent read
                errors.append(repr(exc))

    reader = threading.Thread(target=read_until_done)
    reader.start()
    writer.wait(timeout=300)
    reader.join()
    assert writer.returncode == 0 and not errors, errors[:3]
    assert seen


def test_hostile_files_run_no_code(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"weight": Payload()}))
    one_line_error(
        run_cli(
            "featurize", tmp_path, "--store", tmp_path / "s.h5", "--weights", evil, "--arch", "resnet18", check=False
        )
    )
    from stages.errors import PipelineError
    from stages.finetune import read_checkpoint

    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "checkpoint.pt").write_bytes(evil.read_bytes())
    with pytest.raises(PipelineError, match="is damaged"):
        read_checkpoint(tmp_path / "ft")
    assert not marker.exists()


def test_store_paths_cannot_escape_the_data_folder(small_set, tmp_path):
    store = tmp_path / "s.h5"
    run_json("featurize", small_set, "--store", store)
    secret = tmp_path / "secret.jpg"
    secret.write_bytes((small_set / "train/a/a_000.jpg").read_bytes())
    partition, dataset = stored(store, "train/paths")
    with h5py.File(partition, "a") as f:
        f[dataset][0] = "../secret.jpg"
    again = run_json("featurize", small_set, "--store", store)
    with h5py.File(store) as f:
        assert "../secret.jpg" not in [p.decode() for p in f["sets"][again["set"]]["train/paths"][()]]
    assert again["images"]["train"] == 15


def test_soak_handles_threads_and_memory_stay_flat(tmp_path):
    """featurize, train-head and evaluate in a loop, in one process: nothing accumulates."""
    import resource

    from pipeline.evaluate import evaluate
    from pipeline.featurize import FeaturizeOptions, featurize
    from pipeline.train_head import load_cached_features, train_grid
    from stages.settings import TrainConfig
    from store.reader import FeatureStore

    data = make_images(tmp_path / "data", {"train": {"a": 6, "b": 6}, "valid": {"a": 3, "b": 3}})
    rounds, marks = 4, []
    for round_ in range(rounds):
        make_images(tmp_path / "new", {"train": {"a": 1}}, seed=100 + round_)
        (tmp_path / "new/train/a/a_000.jpg").replace(data / f"train/a/new_{round_}.jpg")
        featurize(FeaturizeOptions(data_dir=data, store=tmp_path / "s.h5", batch_size=8))
        with FeatureStore(tmp_path / "s.h5") as fs:
            train_grid(load_cached_features(fs), [TrainConfig(epochs=2)], tmp_path / "head", overwrite=True)
        evaluate(tmp_path / "head", data / "valid", tmp_path / "eval", store=tmp_path / "s.h5")
        rss = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
        marks.append((len(os.listdir("/proc/self/fd")), threading.active_count(), rss))
        print(f"round {round_}: fds {marks[-1][0]}, threads {marks[-1][1]}, rss {rss / 2**20:.0f} MB")
    first, last = marks[1], marks[-1]  # round 0 warms caches (imports, the traced model)
    assert last[0] <= first[0] and last[1] <= first[1]
    assert last[2] - first[2] < 64 * 2**20, marks


def test_non_finite_features_stop_train_head_and_lr_find(trained, tmp_path):

    _, store, _ = trained
    damaged = copy_store(store, tmp_path / "damaged")
    partition, dataset = stored(damaged, "train/features")
    with h5py.File(partition, "r+") as f:
        f[dataset][3, :5] = float("nan")
    for command in (["train-head"], ["lr-find", "--head", "linear"]):
        proc = run_cli(*command, "--store", damaged, "--out", tmp_path / "run", check=False)
        one_line_error(proc, "NaN or infinite", "featurize into a new --store")
    assert not (tmp_path / "run").exists()


def test_a_diverging_head_is_an_error_and_json_stays_strict(trained, tmp_path):
    import json

    _, store, _ = trained
    proc = run_cli(
        "train-head",
        "--store",
        store,
        "--head",
        "linear",
        "--lr",
        "1e30",
        "--no-calibrate",
        "--out",
        tmp_path / "run",
        check=False,
    )
    one_line_error(proc, "non-finite", "lower --lr")
    assert not (tmp_path / "run").exists()
    found = run_cli(
        "lr-find",
        "--store",
        store,
        "--head",
        "linear",
        "--end-lr",
        "1e30",
        "--num-lrs",
        "8",
        "--out",
        tmp_path / "lr",
        "--json",
    )

    def refuse(constant):
        raise AssertionError(f"{constant} in JSON")

    result = json.loads(found.stdout, parse_constant=refuse)
    assert None in result["held_out_loss"] or max(result["held_out_loss"]) > 1  # the diverged rates are there
    for path in (tmp_path / "lr").glob("*.json"):
        json.loads(path.read_text(), parse_constant=refuse)


def _first_chunk(store, dataset: str) -> tuple[Path, int]:
    """The partition file holding a store dataset's first rows, and the offset of its first chunk in it."""
    partition, name = stored(store, dataset)
    with h5py.File(partition) as f:
        return partition, f[name].id.get_chunk_info(0).byte_offset


def _features(store):
    """Each split's features, rows by (path, view): the order rows lie in is the store's history."""
    _, splits = content(store)
    return {split: columns["features"] for split, columns in splits.items()}


def _scribble(path, offset: int, size: int = 64) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(os.urandom(size))


def test_damaged_store_bytes_never_become_numbers(trained, tmp_path):

    import numpy as np

    data, store, _ = trained
    clean = _features(store)
    damaged = copy_store(store, tmp_path / "damaged")
    partition, offset = _first_chunk(damaged, "train/features")
    _scribble(partition, offset + 8)
    one_line_error(
        run_cli("train-head", "--store", damaged, "--out", tmp_path / "h", check=False),
        str(damaged),
        "damaged",
        "featurize again",
    )
    for target in ("valid/labels", "train/sha256"):
        partition, offset = _first_chunk(damaged, target)
        _scribble(partition, offset + 8, 4)  # inside these small chunks
    described = run_cli("store", "info", damaged, "--verify", check=False)
    one_line_error(
        described, str(damaged), "damaged", "train: feature rows", "column sha256", "valid: partition", "column labels"
    )
    assert "verified" not in described.stdout  # its description, then the error: never a clean bill beside it
    repaired = run_json("featurize", data, "--store", damaged, "--verify")
    assert sum("failed verification" in note for note in repaired["notes"]) == 2 and repaired["featurized"] == 36
    run_cli("store", "info", damaged, "--verify")
    for split, values in _features(damaged).items():
        np.testing.assert_array_equal(values, clean[split])


def test_damaged_store_metadata_is_a_clear_error(trained, tmp_path):

    _, store, _ = trained
    damaged = copy_store(store, tmp_path / "damaged")
    _scribble(damaged, 0, 512)  # the root's superblock
    one_line_error(run_cli("store", "info", damaged, "--verify", check=False), str(damaged))


def test_damaged_partitions_are_set_aside_and_redone(trained, tmp_path):
    import numpy as np

    data, store, _ = trained
    clean = _features(store)
    run_json(
        "featurize",
        data,
        "--store",
        tmp_path / "s.h5",
        "--num-shards",
        "2",
        "--shard-id",
        "0",
        "--commit-every",
        "2",
        "--batch-size",
        "2",
    )
    parts = [StorePaths.of(tmp_path / "s.h5").parts / p for p in StorePaths.of(tmp_path / "s.h5").partitions()]
    assert len(parts) >= 4
    os.truncate(parts[0], parts[0].stat().st_size // 2)
    parts[1].write_bytes(b"junk!")
    with h5py.File(parts[2]) as f:
        split = [s for s in f if isinstance(f[s], h5py.Group)][0]
        offset = f[f"{split}/features"].id.get_chunk_info(0).byte_offset
    _scribble(parts[2], offset + 8)
    result = run_json("featurize", data, "--store", tmp_path / "s.h5")
    for part in parts[:3]:
        assert any(part.name in note and "set aside" in note for note in result["notes"]), (part, result["notes"])
        assert (part.parent / (part.name + ".damaged")).exists()
    assert not any(parts[3].name in note for note in result["notes"])
    for split, values in _features(tmp_path / "s.h5").items():
        np.testing.assert_array_equal(values, clean[split])


def test_every_option_is_bounded_before_work_starts(trained, tmp_path):
    data, store, head = trained
    s = tmp_path / "s.h5"
    for args, fragments in (
        (("--views", "256"), ("--views 256", "from 0 to 255")),
        (("--views", "200"), ("needs about", "GB", "--views")),
        (("--batch-size", "100000000"), ("--batch-size", "needs about", "GB")),
        (("--seed", "99999999999999999999"), ("--seed", "from 0 to 9223372036854775807")),
        (("--seed", "-1"), ("--seed -1",)),
        (("--num-shards", "2", "--shard-id", "2"), ("--shard-id 2", "from 0 to 1")),
    ):
        one_line_error(run_cli("featurize", data, "--store", s, *args, check=False), *fragments)
    assert not s.exists()
    for args, fragment in (
        (("--folds", "1"), "--folds 1"),
        (("--seed", "-5"), "--seed -5"),
        (("--head", "linear", "--epochs", "0"), "--epochs 0"),
    ):
        one_line_error(run_cli("train-head", "--store", store, *args, "--out", tmp_path / "h", check=False), fragment)
    one_line_error(run_cli("lr-find", "--store", store, "--num-lrs", "1", check=False), "--num-lrs 1", "from 2")
    one_line_error(
        run_cli("finetune", data, "--head", head, "--batch-size", "5000", check=False),
        "--batch-size 5000",
        "from 1 to 4096",
    )


def test_a_store_given_through_a_symlink_is_written_and_locked_as_its_target(small_set, tmp_path):
    real = tmp_path / "real" / "s.h5"
    real.parent.mkdir()
    run_json("featurize", small_set, "--store", real)
    link = tmp_path / "link.h5"
    link.symlink_to(real)
    make_images(tmp_path / "more", {"train": {"a": 1}}, seed=7)
    (tmp_path / "more/train/a/a_000.jpg").rename(small_set / "train/a/new.jpg")
    summary = run_json("featurize", small_set, "--store", link)
    assert summary["featurized"] == 1 and link.is_symlink() and link.resolve() == real
    assert run_json("store", "info", real)["sets"][0]["splits"]["train"]["images"] == 16
    from store.locks import StoreLock

    with StoreLock(StorePaths.of(real)):  # a featurize through the real path holds the lock the link's would take
        one_line_error(run_cli("featurize", small_set, "--store", link, check=False), "being written by another")


def _with_labels(store, tmp_path, labels):
    copy = copy_store(store, tmp_path / "labels")
    partition, dataset = stored(copy, "train/labels")
    with h5py.File(partition, "r+") as f:
        f[dataset][: len(labels)] = labels
    return copy


def test_labels_outside_the_classes_are_damage_not_an_index_error(trained, tmp_path):
    _, store, _ = trained
    bad = _with_labels(store, tmp_path, [7, -5])
    one_line_error(run_cli("store", "info", bad, "--verify", check=False), "labels holds -5, 7, outside the 3 classes")
    for command in (("train-head",), ("train-head", "--head", "linear"), ("audit",), ("lr-find",)):
        proc = run_cli(*command, "--store", bad, "--out", tmp_path / "out", check=False)
        one_line_error(proc, str(bad), "is damaged", "labels holds -5, 7")
    assert not (tmp_path / "out").exists()


def _crafted(trained_store, tmp_path, craft):
    """A copy of a store whose root is crafted to point elsewhere."""
    copy = copy_store(trained_store, tmp_path / f"crafted-{craft.__name__}")
    with h5py.File(copy, "r+") as f:
        [name] = list(f["sets"])
        craft(f, f[f"sets/{name}/train"])
    return copy


def test_stores_that_point_at_other_files_are_refused(trained, small_set, tmp_path):
    import numpy as np

    _, store, _ = trained
    secret = tmp_path / "secret.h5"
    with h5py.File(secret, "w") as f:
        f["x"] = np.zeros((36, 1280), np.float16)
    (tmp_path / "raw.bin").write_bytes(b"\0" * 36 * 4)

    def external_link(f, train):
        del train["labels"]
        train["labels"] = h5py.ExternalLink(str(secret), "/x")

    def external_storage(f, train):
        del train["labels"]
        train.create_dataset("labels", (36,), np.int32, external=[(str(tmp_path / "raw.bin"), 0, 36 * 4)])

    def virtual(f, train, source=str(secret)):
        layout = h5py.VirtualLayout((24, 1280), np.float16)
        layout[:] = h5py.VirtualSource(source, "x", shape=(36, 1280))[:24]
        del train["features"]
        train.create_virtual_dataset("features", layout)

    def virtual_passwd(f, train):
        virtual(f, train, "/etc/passwd")

    fifo = store.with_name(store.name + ".parts") / "x.1796000000000000000-1-0.h5"  # a partition's name, a FIFO

    def virtual_fifo(f, train):
        os.mkfifo(Path(f.filename).with_name(fifo.parent.name) / fifo.name)
        virtual(f, train, f"{fifo.parent.name}/{fifo.name}")

    for craft, what in (
        (external_link, "external link"),
        (external_storage, "external files"),
        (virtual, "a virtual dataset of"),
        (virtual_passwd, "/etc/passwd, not a partition of this store"),
        (virtual_fifo, "not a regular file"),
    ):
        crafted = _crafted(store, tmp_path, craft)
        for command in (("store", "info", crafted, "--verify"), ("train-head", "--store", crafted)):
            one_line_error(run_cli(*command, check=False), str(crafted), "is refused", what)
        one_line_error(run_cli("featurize", small_set, "--store", crafted, check=False), "is refused", what)


def test_a_store_found_clean_once_is_checked_again_when_a_file_of_it_changes(trained, tmp_path):
    """Readers remember the roots and partitions they found clean (by inode and times): a root or a partition
    changed in place afterwards is checked again and refused."""
    from stages.errors import PipelineError
    from store.reader import open_root

    _, store, _ = trained
    for target in ("root", "partition"):
        copy = copy_store(store, tmp_path / target)
        open_root(copy).close()  # clean: remembered
        paths = StorePaths.of(copy)
        changed = paths.store if target == "root" else paths.parts / paths.partitions()[0]
        with h5py.File(changed, "r+") as f:
            f["elsewhere"] = h5py.ExternalLink("/etc/passwd", "/x")
        with pytest.raises(PipelineError, match="is refused.*external link"):
            open_root(copy)


def test_stored_paths_that_leave_the_data_folder_or_are_no_file_are_never_opened(trained, tmp_path):
    import os

    data, store, _ = trained
    copy = copy_store(store, tmp_path / "copy")
    fifo = data / "train" / "a" / "fifo.jpg"
    os.mkfifo(fifo)
    (tmp_path / "private.jpg").write_bytes((data / "train" / "a" / "a_003.jpg").read_bytes())
    link = data / "train" / "a" / "link.jpg"
    link.symlink_to(tmp_path / "private.jpg")  # inside the data folder by name, outside by target
    try:
        partition, dataset = stored(copy, "train/paths")
        with h5py.File(partition, "r+") as f:
            group = f[dataset.rsplit("/", 1)[0]]
            values = [p.decode() for p in group["paths"][()]]
            values[:4] = ["train/a/fifo.jpg", "../../outside.jpg", "/etc/passwd", "train/a/link.jpg"]
            del group["paths"]
            from store.schema import STR
            from store.verify import create_checked

            create_checked(group, "paths", np.asarray(values, dtype=object), STR)
            hashes = group["sha256"]
            hashes[:4] = [hashes[4]] * 4  # exact copies of row 4: a group whose pairs the audit draws
        proc = run_cli("audit", "--store", copy, "--out", tmp_path / "audit", "--json", check=False, timeout=300)
        assert proc.returncode == 0, proc.stderr
        notes = json.loads(proc.stdout)["notes"]
        for refused in ("train/a/fifo.jpg", "../../outside.jpg", "/etc/passwd", "train/a/link.jpg"):
            assert any(note.startswith(f"{refused} not drawn") for note in notes), notes
        one_line_error(run_cli("store", "info", copy, "--verify", check=False), "paths holds a path outside")
    finally:
        fifo.unlink()
        link.unlink()


def test_non_finite_features_are_damage_featurize_recomputes(trained, tmp_path):
    """NaN written with a valid checksum (h5py recomputes Fletcher-32 on write): verification still calls the row
    damaged, and featurize recomputes that image alone."""

    import numpy as np

    data, store, _ = trained
    clean = _features(store)
    copy = copy_store(store, tmp_path / "copy")
    partition, dataset = stored(copy, "train/features")
    with h5py.File(partition, "r+") as f:
        f[dataset][5, :3] = [np.nan, np.inf, -np.inf]
    one_line_error(run_cli("store", "info", copy, "--verify", check=False), "damaged", "feature rows 5-5")
    repaired = run_json("featurize", data, "--store", copy, "--verify")
    assert repaired["featurized"] == 1 and any("failed verification" in n for n in repaired["notes"])
    np.testing.assert_array_equal(_features(copy)["train"], clean["train"])


def test_a_string_column_that_no_longer_matches_its_digest_is_damage(trained, tmp_path):
    """Strings take no checksum filter: each string column carries the sha256 of its values. One value changed
    behind the store's back (a valid HDF5 write) is damage to every reader and to --verify; featurize redoes the
    split."""

    data, store, _ = trained
    copy = copy_store(store, tmp_path / "copy")
    partition, dataset = stored(copy, "train/paths")
    with h5py.File(partition, "r+") as f:
        f[dataset][0] = "train/a/elsewhere.jpg"
    one_line_error(run_cli("store", "info", copy, "--verify", check=False), "damaged", "train: column paths")
    one_line_error(
        run_cli("train-head", "--store", copy, "--out", tmp_path / "h", check=False),
        "paths does not match its checksum",
    )
    repaired = run_json("featurize", data, "--store", copy, "--verify")
    assert repaired["featurized"] == 24 and any("failed verification" in n for n in repaired["notes"])
    run_cli("store", "info", copy, "--verify")
