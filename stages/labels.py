"""Label sources: where an image's label comes from when it is not its class folder.

- a table (`--labels FILE`: CSV, TSV, Parquet or JSON Lines) with a path column (`path` or `file_name`, relative to
  the data folder) and a `label` column, optionally a `split` (train, valid, test) or `is_valid` column: Kaggle's
  `labels.csv`, fastai's `from_csv`/`from_df`;
- a `metadata.csv` (or `metadata.jsonl`) in the data folder, picked up as Hugging Face's `imagefolder` does;
- a pattern (`--label-pattern REGEX`): the label is the first group the regular expression finds in the file name,
  fastai's `from_name_re` (`cat.1001.jpg`, `Abyssinian_12.jpg`).

A source answers one question, path -> (label, split or None), for the images a scan finds; every way the answer
can be wrong is one error with counts and examples, never a silent drop. Its task (stages.tasks) follows from its
labels: several per image (a list, or `--label-delim`) make a multi-label task, numbers that are not all whole
make a numeric one (whole numbers are class names, as Kaggle's 0/1 columns are, unless `--task numeric`), anything
else one class per image.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from stages.errors import PipelineError

PATH_COLUMNS = ("path", "file_name")
LABEL_COLUMN = "label"
METADATA_NAMES = ("metadata.csv", "metadata.jsonl")
TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
SPLIT_VALUES = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid", "test": "test"}
TRUE_VALUES = {"true", "1", "yes", "t", "y"}
FALSE_VALUES = {"false", "0", "no", "f", "n", ""}
EXAMPLES = 3
TASK_KINDS = ("single", "multi", "numeric")  # stages.tasks.TASKS, named here: reading labels needs no torch


@dataclass(frozen=True)
class LabelOptions:
    """What a command was told about labels: a table, a pattern, the delimiter of several labels in one cell."""

    table: Path | None = None
    pattern: str | None = None
    delimiter: str | None = None
    recorded: str | None = None  # the digest of the labelling a run recorded: the source must still give it
    task: str | None = None  # single, multi or numeric; None: as the labels say

    @property
    def given(self) -> bool:
        return self.table is not None or self.pattern is not None


@dataclass
class LabelSource:
    """Labels by image path (relative to the data folder, POSIX), with the split a table assigns, and what they came
    from: `kind` (table, metadata, pattern), `origin` (the file or the pattern) and a digest of the labelling."""

    kind: str
    origin: str
    labels: dict[str, str | tuple[str, ...] | float]  # a class name; the classes of a multi-label task; a number
    splits: dict[str, str] = field(default_factory=dict)
    task: str = "single"
    delimiter: str | None = None  # of several labels in one cell, as the table was read

    @property
    def classes(self) -> list[str]:
        """The classes its labels name (numeric: the one value it predicts, `label`)."""
        if self.task == "numeric":
            return [LABEL_COLUMN]
        if self.task == "multi":
            return sorted({c for tags in self.labels.values() for c in tags})
        return sorted(set(self.labels.values()))

    @property
    def matched_by_name(self) -> bool:
        """A pattern: every image is labelled by its own name (the labels are found once the images are)."""
        return self.kind == "pattern"

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for path in sorted(self.labels):
            h.update(f"{path}\0{self.labels[path]}\0{self.splits.get(path, '')}\n".encode())
        return h.hexdigest()[:16]

    def targets(self, paths: list[str]) -> np.ndarray:
        """The labels of these images as a head learns them: 0/1 rows of `classes` (multi-label), values
        (numeric, NaN without one), class indices (-1 without one)."""
        if self.task == "numeric":
            return np.asarray([self.labels.get(p, np.nan) for p in paths], np.float32)
        index = {c: i for i, c in enumerate(self.classes)}
        if self.task == "multi":
            rows = np.zeros((len(paths), len(index)), np.float32)
            for row, path in enumerate(paths):
                rows[row, [index[c] for c in self.labels.get(path, ())]] = 1
            return rows
        return np.asarray([index.get(self.labels.get(p), -1) for p in paths], np.int64)

    def describe(self) -> dict:
        described = {"label_source": self.kind, "label_origin": self.origin, "label_digest": self.digest}
        if self.task != "single":
            described["task"] = self.task
        if self.delimiter:
            described["delim"] = self.delimiter
        return described


def recorded_options(labels: dict | None) -> LabelOptions | None:
    """The label source a run recorded (RunConfig.labels), as options: what labels its images as it was trained
    (finetune's data folder, the refit of its head). None: class folders, or the store's labels as they are."""
    if not labels or labels.get("label_source") in (None, "folders"):
        return None
    task, digest = labels.get("task"), labels.get("label_digest")
    if labels["label_source"] == "pattern":
        return LabelOptions(pattern=labels["label_origin"], recorded=digest)
    return LabelOptions(table=Path(labels["label_origin"]), recorded=digest, task=task, delimiter=labels.get("delim"))


def check_recorded(source: LabelSource, options: LabelOptions) -> LabelSource:
    """A table a run recorded must still say what it said then: an edited one would silently train other labels."""
    if options.recorded and source.kind != "pattern" and source.digest != options.recorded:
        raise PipelineError(
            f"{source.origin} changed since the run was trained on it (labelling {options.recorded}, now "
            f"{source.digest}); train the head again on it, or restore the table"
        )
    return source


def find_source(root: Path, options: LabelOptions) -> LabelSource | None:
    """The label source for a data folder: the one given, else a metadata file in it, else None (class folders)."""
    if options.table is not None and options.pattern is not None:
        raise PipelineError("give --labels FILE or --label-pattern REGEX, not both")
    if options.pattern is not None:
        return LabelSource("pattern", options.pattern, {})
    if options.table is not None:
        return check_recorded(read_table(Path(options.table), options.delimiter, "table", options.task), options)
    for name in METADATA_NAMES:
        if (root / name).is_file():
            return read_table(root / name, options.delimiter, "metadata", options.task)
    return None


def label_by_pattern(pattern: str, paths: list[str]) -> dict[str, str]:
    """The first group of `pattern` found in each file name; an error naming the files it does not match."""
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise PipelineError(f"--label-pattern {pattern!r} is not a regular expression ({exc})") from None
    if regex.groups < 1:
        raise PipelineError(
            f"--label-pattern {pattern!r} has no group; mark the label with parentheses, such as '^([a-z]+)\\.\\d+'"
        )
    labels, missed = {}, []
    for path in paths:
        found = regex.search(PurePosixPath(path).name)
        if found is None or not found.group(1):
            missed.append(path)
        else:
            labels[path] = found.group(1)
    if missed:
        raise PipelineError(
            f"--label-pattern {pattern!r} finds no label in {len(missed)} of {len(paths)} file names "
            f"(such as {_examples(missed)}); fix the pattern or move those files out of the data folder"
        )
    return labels


def read_table(path: Path, delimiter: str | None, kind: str, task: str | None = None) -> LabelSource:
    """A label table read and checked: one row per image, a path and a label (or several, or a number) each."""
    if task not in (None, *TASK_KINDS):
        raise PipelineError(f"--task {task!r} is not one of {', '.join(TASK_KINDS)}")
    if not path.is_file():
        raise PipelineError(f"--labels {path} does not exist; give a CSV, TSV, Parquet or JSON Lines file")
    form = TABLE_SUFFIXES.get(path.suffix.lower())
    if form is None:
        raise PipelineError(
            f"--labels {path}: unknown table format {path.suffix!r}; give a .csv, .tsv, .parquet or .jsonl file"
        )
    rows = _read_rows(path, form)
    if not rows:
        raise PipelineError(f"{path} holds no rows; give one row per image with a path and a label")
    columns = set(rows[0])
    path_column = next((c for c in PATH_COLUMNS if c in columns), None)
    if path_column is None or LABEL_COLUMN not in columns:
        wanted = "a path column (path or file_name)" if path_column is None else "a label column (label)"
        raise PipelineError(f"{path} has no {wanted}; its columns: {', '.join(sorted(map(str, columns)))}")
    labels: dict[str, str | tuple[str, ...]] = {}
    splits: dict[str, str] = {}
    empty, conflicting, bad_split = [], [], []
    numeric, text, several, whole = 0, 0, task == "multi" or bool(delimiter), True
    for row in rows:
        image = _relative(str(row[path_column]))
        value = row[LABEL_COLUMN]
        if isinstance(value, list):
            several = True
            label = tuple(sorted({str(v).strip() for v in value} - {""}))
        elif several:
            parts = str(value).split(delimiter) if delimiter else [str(value)]
            label = tuple(sorted({v.strip() for v in parts} - {""})) if value is not None else ()
        else:
            label = "" if value is None else str(value).strip()
        if not label and not (several and value is not None and task == "multi"):  # an empty tag set is a label
            empty.append(image)
            continue
        if isinstance(label, str):
            number = _number(label)
            numeric, text = (numeric + 1, text) if number is not None else (numeric, text + 1)
            whole = whole and number is not None and float(number).is_integer()
        if labels.setdefault(image, label) != label:
            conflicting.append(image)
        split = _split_of(row)
        if split is not None:
            if split not in ("train", "valid", "test"):
                bad_split.append(f"{image}: {split}")
            else:
                splits[image] = split
    where = f"--labels {path}" if kind == "table" else str(path)
    if several:  # lists and single values together: a single value is a set of one
        labels = {p: v if isinstance(v, tuple) else (v,) for p, v in labels.items()}
    if empty:
        raise PipelineError(
            f"{where}: {len(empty)} images have an empty label (such as {_examples(empty)}); label them"
        )
    if conflicting:
        raise PipelineError(
            f"{where}: {len(set(conflicting))} images are listed twice with different labels (such as "
            f"{_examples(conflicting)}); keep one row per image"
        )
    if numeric and text and (task == "numeric" or not several):
        raise PipelineError(
            f"{where}: the label column mixes numbers ({numeric} rows) with text ({text} rows); give class names "
            "only, or numbers only for a numeric target"
        )
    if task == "numeric" and (several or text):
        raise PipelineError(f"{where}: --task numeric needs one number per image; its labels are not numbers")
    if task == "single" and several:
        raise PipelineError(f"{where}: --task single needs one label per image; some carry several")
    if bad_split:
        raise PipelineError(
            f"{where}: split values must be train, valid or test ({len(bad_split)} are not, such as "
            f"{_examples(bad_split)})"
        )
    kind_of = "multi" if several else "numeric" if task == "numeric" or (numeric and not text and not whole) else None
    if kind_of == "numeric":
        labels = {p: float(v) for p, v in labels.items()}
    return LabelSource(kind, str(path.resolve()), labels, splits, kind_of or "single", delimiter)


def _read_rows(path: Path, form: str) -> list[dict]:
    try:
        if form in ("csv", "tsv"):
            with path.open(newline="", encoding="utf-8-sig") as f:
                return list(csv.DictReader(f, delimiter="," if form == "csv" else "\t"))
        if form == "jsonl":
            with path.open(encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise PipelineError(f"reading {path} needs pyarrow: pip install pyarrow (or give a CSV)") from None
        return pq.read_table(path).to_pylist()
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error, ValueError) as exc:
        raise PipelineError(f"{path} cannot be read as {form.upper()} ({str(exc)[:80]})") from None
    except OSError as exc:
        raise PipelineError(f"{path} cannot be read ({str(exc).splitlines()[0][:80]})") from None


def _split_of(row: dict) -> str | None:
    if row.get("split") not in (None, ""):
        value = str(row["split"]).strip().lower()
        return SPLIT_VALUES.get(value, value)
    if "is_valid" in row and row["is_valid"] is not None:
        value = str(row["is_valid"]).strip().lower()
        if value in TRUE_VALUES:
            return "valid"
        if value in FALSE_VALUES:
            return "train"
        return f"is_valid={value}"
    return None


def _relative(path: str) -> str:
    """A table's path as the store keeps paths: relative to the data folder, POSIX separators, no './'."""
    if "\\" not in path and "//" not in path and "/." not in path and not path.startswith(".") and path[-1:] != "/":
        return path  # already so (a million rows: no Path object each)
    return PurePosixPath(path.replace("\\", "/")).as_posix().removeprefix("./")


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _examples(items: list[str]) -> str:
    shown = ", ".join(map(str, items[:EXAMPLES]))
    return shown + (", ..." if len(items) > EXAMPLES else "")


def relabel_stored(options: LabelOptions, paths: dict[str, list[str]]) -> LabelSource:
    """Another labelling of images already in a store (train-head --labels: no featurize): the source read and
    checked against the stored paths of each split. Every train and valid image must get a label (test ones may
    not), every path of a table must be a stored image, and a table's split must be the stored one."""
    if options.pattern is not None:
        source = LabelSource("pattern", options.pattern, {})
        source.labels = label_by_pattern(options.pattern, [p for s, ps in paths.items() if s != "test" for p in ps])
    elif options.table is not None:
        source = check_recorded(read_table(Path(options.table), options.delimiter, "table", options.task), options)
    else:
        raise ValueError("no label source given")
    where = f"--labels {source.origin}" if source.kind == "table" else f"--label-pattern {source.origin!r}"
    split_of = {p: s for s, ps in paths.items() for p in ps}
    unknown = sorted(set(source.labels) - set(split_of))
    if unknown:
        raise PipelineError(
            f"{where}: {len(unknown)} of its paths are not images of the store (such as {_examples(unknown)}); "
            "featurize them first, or give paths relative to the data folder the store was made from"
        )
    missing = sorted(p for p, s in split_of.items() if s != "test" and p not in source.labels)
    if missing:
        raise PipelineError(
            f"{where} labels {len(split_of) - len(missing)} of the store's {len(split_of)} train and valid images "
            f"(no label: {_examples(missing)}); label every one"
        )
    moved = sorted(p for p, s in source.splits.items() if split_of[p] != s)
    if moved:
        raise PipelineError(
            f"{where} puts {len(moved)} images in another split than the store holds them in (such as "
            f"{_examples(moved)}); featurize with this table to move them"
        )
    return source
