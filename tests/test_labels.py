"""Labels from sources other than class folders: a table, a metadata.csv in the data folder, a pattern in the file
names; each bad label input one line with counts and examples; a relabelling decodes nothing."""

import json
import shutil

import h5py
import numpy as np
import pytest
from conftest import make_images, one_line_error, run_cli, run_json, shared_dataset

from stages.errors import PipelineError
from stages.files import scan_dataset
from stages.labels import LabelOptions

FAST = ("--batch-size", "8", "--precision", "fp32")


@pytest.fixture
def flat(tmp_path):
    """One flat folder of 12 images named CLASS_NNN.jpg (4 classes a..d... three each), no class folders."""
    make_images(tmp_path / "gen", {"": {"disk": 4, "stripe": 4, "check": 4}})
    folder = tmp_path / "flat"
    folder.mkdir()
    for path in (tmp_path / "gen").rglob("*.jpg"):
        shutil.move(path, folder / path.name)
    return folder


def write_csv(path, rows, header=("path", "label")):
    path.write_text("\n".join([",".join(header)] + [",".join(map(str, r)) for r in rows]) + "\n")
    return path


def names(folder):
    return sorted(p.name for p in folder.glob("*.jpg"))


def test_a_pattern_a_table_and_a_metadata_csv_label_the_same_images_alike(flat, tmp_path):
    by_pattern = scan_dataset(flat, 0.25, 0, LabelOptions(pattern=r"^([a-z]+)_\d+"))
    table = write_csv(tmp_path / "labels.csv", [(n, n.split("_")[0]) for n in names(flat)])
    by_table = scan_dataset(flat, 0.25, 0, LabelOptions(table=table))
    write_csv(flat / "metadata.csv", [(n, n.split("_")[0]) for n in names(flat)], header=("file_name", "label"))
    by_metadata = scan_dataset(flat, 0.25, 0)
    for dataset, layout in ((by_pattern, "pattern"), (by_table, "table"), (by_metadata, "metadata")):
        assert dataset.classes == ["check", "disk", "stripe"] and dataset.layout == f"{layout}+holdout"
        assert {s: [(f.path, f.label) for f in files] for s, files in dataset.splits.items()} == {
            s: [(f.path, f.label) for f in files] for s, files in by_pattern.splits.items()
        }
        assert len(dataset.splits["valid"]) == 3  # a quarter of each class
    assert by_table.describe()["label_source"] == "table" and by_metadata.describe()["label_digest"]


def test_a_tables_split_column_and_its_formats(flat, tmp_path):
    rows = [(n, n.split("_")[0], "valid" if n.endswith("000.jpg") else "train") for n in names(flat)]
    csv = write_csv(tmp_path / "l.csv", rows, header=("path", "label", "split"))
    tsv = tmp_path / "l.tsv"
    tsv.write_text(csv.read_text().replace(",", "\t"))
    jsonl = tmp_path / "l.jsonl"
    lines = [json.dumps({"file_name": n, "label": c, "is_valid": s == "valid"}) for n, c, s in rows]
    jsonl.write_text("\n".join(lines) + "\n")
    for table in (csv, tsv, jsonl):
        dataset = scan_dataset(flat, labels=LabelOptions(table=table))
        assert [f.path for f in dataset.splits["valid"]] == ["check_000.jpg", "disk_000.jpg", "stripe_000.jpg"]
        assert len(dataset.splits["train"]) == 9
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "l.parquet"
    pq.write_table(pa.table({"path": [r[0] for r in rows], "label": [r[1] for r in rows]}), parquet)
    assert scan_dataset(flat, labels=LabelOptions(table=parquet)).classes == ["check", "disk", "stripe"]


@pytest.mark.parametrize(
    "rows, others, fragments",
    [
        ([("nowhere.jpg", "disk")], True, ["1 of its", "not images", "nowhere.jpg"]),
        ([("disk_000.jpg", "disk")], False, ["11 images", "have no label"]),  # the table labels one of them
        ([("disk_000.jpg", "")], True, ["empty label", "disk_000.jpg"]),
        ([("disk_000.jpg", "disk"), ("disk_000.jpg", "check")], True, ["listed twice with different labels"]),
        ([("disk_000.jpg", "3"), ("disk_001.jpg", "disk")], True, ["mixes numbers", "with text"]),
        ([("disk_000.jpg", "disk outdoor")], True, ["--task single needs one label per image"]),
        ([("disk_000.jpg", "tall")], True, ["--task numeric needs one number per image"]),
    ],
)
def test_bad_label_input_is_one_error_with_counts_and_examples(flat, tmp_path, rows, others, fragments):
    labelled = {r[0] for r in rows}
    rest = [(n, n.split("_")[0]) for n in names(flat) if n not in labelled and others]
    table = write_csv(tmp_path / "l.csv", rows + rest)
    task = "single" if "single" in fragments[0] else "numeric" if "numeric" in fragments[0] else None
    with pytest.raises(PipelineError) as error:
        scan_dataset(flat, labels=LabelOptions(table=table, delimiter=" " if task else None, task=task))
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))


def test_a_pattern_that_misses_and_a_folder_with_no_layout_say_what_to_do(flat, tmp_path):
    with pytest.raises(PipelineError, match="finds no label in 12 of 12"):
        scan_dataset(flat, labels=LabelOptions(pattern=r"^(x)"))
    with pytest.raises(PipelineError, match="has no group"):
        scan_dataset(flat, labels=LabelOptions(pattern=r"^[a-z]+"))
    with pytest.raises(PipelineError) as error:
        scan_dataset(flat)
    for layout in ("class folders", "metadata.csv", "--labels FILE", "--label-pattern REGEX", "split folders"):
        assert layout in str(error.value)


@pytest.mark.slow
def test_featurize_from_a_table_then_relabel_by_editing_it_decodes_nothing(flat, tmp_path):
    table = write_csv(tmp_path / "labels.csv", [(n, n.split("_")[0]) for n in names(flat)])
    store = tmp_path / "s.h5"
    first = run_json("featurize", flat, "--store", store, "--labels", table, "--valid-pct", "0.25", *FAST)
    assert first["featurized"] == 12 and first["classes"] == ["check", "disk", "stripe"]
    relabelled = [(n, "stripe" if n == "disk_001.jpg" else n.split("_")[0]) for n in names(flat)]
    write_csv(table, relabelled)
    parts = tmp_path / "s.h5.parts"
    before = {p.name for p in parts.iterdir()}
    again = run_json("featurize", flat, "--store", store, "--labels", table, "--valid-pct", "0.25", *FAST)
    assert again["featurized"] == 0 and not again["up_to_date"]
    [overlay] = [p for p in parts.iterdir() if p.name not in before and not p.name.startswith("retired-")]
    with h5py.File(overlay, "r") as f:  # the one label written, nothing else: no feature byte, no location
        written = {split: {k: len(v) for k, v in g.items() if isinstance(v, h5py.Dataset)} for split, g in f.items()}
        assert {k: v for split in written.values() for k, v in split.items() if v} == {"labels": 1}
    with h5py.File(store, "r") as f:
        s = f["sets"][next(iter(f["sets"]))]
        stored = {
            p.decode(): int(label)
            for split in ("train", "valid")
            for p, label in zip(s[f"{split}/paths"][()], s[f"{split}/labels"][()])
        }
        assert json.loads(s.attrs["classes"])[stored["disk_001.jpg"]] == "stripe"
        assert s.attrs["label_source"] == "table"
    assert run_json("featurize", flat, "--store", store, "--labels", table, "--valid-pct", "0.25", *FAST)["up_to_date"]
    proc = run_cli("featurize", flat, "--store", store, "--label-pattern", "(", check=False)
    one_line_error(proc, "--label-pattern", "is not a regular expression")
    # Another task on the same cache, no featurize: which images show a shape with an even number
    parity = write_csv(tmp_path / "parity.csv", [(n, ("odd", "even")[int(n[-5]) % 2 == 0]) for n in names(flat)])
    [run] = run_json("train-head", "--store", store, "--labels", parity, "--out", tmp_path / "parity", *FAST[:2])
    config = json.loads((tmp_path / "parity" / "config.json").read_text())
    assert config["classes"] == ["even", "odd"] and config["labels"]["label_source"] == "table"
    assert config["labels"]["label_origin"] == str(parity)
    evaluated = run_json("evaluate", tmp_path / "parity", "--store", store, "--labels", parity, "--out", tmp_path / "e")
    assert evaluated["accuracy"] == pytest.approx(run["accuracy"]) and evaluated["images"] == 3
    proc = run_cli("evaluate", tmp_path / "parity", "--store", store, "--out", tmp_path / "e2", check=False)
    one_line_error(proc, "classes the run does not know", "--labels")
    audited = run_json("audit", "--store", store, "--labels", parity, "--out", tmp_path / "audit")
    assert audited["classes"] == ["even", "odd"]
    listed = {r["run"]: r["labels"] for r in run_json("runs", "--dir", tmp_path)}
    assert listed[str(tmp_path / "parity")].startswith("table@")
    # fine-tuning follows the labelling its head learnt (the table it recorded), and refuses one edited since
    finetune = ("finetune", flat, "--head", tmp_path / "parity", "--epochs", "1", "--batch-size", "4")
    tuned = run_json(*finetune, "--out", tmp_path / "ft")
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["classes"] == ["even", "odd"] and tuned["history"]
    write_csv(parity, [(n, "odd") for n in names(flat)])
    one_line_error(run_cli(*finetune, "--out", tmp_path / "ft2", check=False), "changed since the run was trained")
    part = write_csv(tmp_path / "part.csv", [(n, "odd") for n in names(flat)[:3]])
    proc = run_cli("train-head", "--store", store, "--labels", part, "--out", tmp_path / "part", check=False)
    one_line_error(proc, "labels 3 of the store's 12", "label every one")


@pytest.mark.slow
@pytest.mark.shared_data
def test_real_photos_labelled_by_their_names_train_a_head(tmp_path):
    """dogs-vs-cats as Kaggle ships it: one folder, the label in each name (cat.4001.jpg)."""
    source = shared_dataset("dogscats") / "valid"
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted(source.rglob("*.jpg"))[::10]:  # 100 photos, both classes
        shutil.copy(path, flat / path.name)
    store = tmp_path / "s.h5"
    done = run_json("featurize", flat, "--store", store, "--label-pattern", r"^(cat|dog)\.", "--valid-pct", "0.3")
    assert done["classes"] == ["cat", "dog"] and done["featurized"] == 100
    [run] = run_json("train-head", "--store", store, "--out", tmp_path / "head")
    assert run["accuracy"] >= 0.9
    evaluated = run_json("evaluate", tmp_path / "head", "--store", store, "--out", tmp_path / "eval")
    assert evaluated["accuracy"] == pytest.approx(run["accuracy"]) and evaluated["images"] == 30
    table = write_csv(tmp_path / "labels.csv", [(p.name, p.name.split(".")[0]) for p in sorted(flat.glob("*.jpg"))])
    same = run_json("featurize", flat, "--store", store, "--labels", table, "--valid-pct", "0.3")
    assert same["featurized"] == 0 and np.sum(list(same["images"].values())) == 100
