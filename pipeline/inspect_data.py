"""inspect: what a data folder holds, what is wrong with it, and a contact sheet of samples per class."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.plots import plot_contact_sheet
from stages.atomic import output_folder
from stages.files import BadImage, content_sha256, scan_dataset, vet_image_bytes
from stages.labels import LabelOptions

SAMPLES_PER_CLASS = 8
SAMPLES_PNG = "samples.png"


@dataclass
class SplitCounts:
    images: int  # readable ones
    classes: dict[str, int]  # images per class (a multi-label image counts for each of its classes)
    balance: float | None  # rarest class over commonest


@dataclass
class Spread:
    min: int
    median: float
    max: int


@dataclass
class Unreadable:
    split: str
    path: str
    reason: str


@dataclass
class SameFile:
    """Files of the same bytes; a leak when they are in more than one split."""

    paths: list[str]
    splits: list[str]


@dataclass
class InspectReport:
    """What a data folder holds (inspect --json): counts per split and class, sizes, formats and modes, the files
    that cannot be read, groups of identical files and the leaks among them, and the contact sheet."""

    data_dir: str
    layout: str
    classes: list[str]
    splits: dict[str, SplitCounts]
    width: Spread | None
    height: Spread | None
    formats: dict[str, int]
    modes: dict[str, int]
    unreadable: list[Unreadable]
    duplicates: list[SameFile]
    leaks: list[SameFile]
    contact_sheet: str
    notes: list[str]

    def to_json(self) -> dict:
        return asdict(self)


def _header(data: bytes) -> tuple[str, int, int, str]:
    """Format, width, height and mode from the header alone."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.format, image.size[0], image.size[1], image.mode


def default_out(data_dir: Path, root: Path = Path("runs")) -> Path:
    return root / f"inspect-{data_dir.resolve().name}"


def inspect_folder(
    data_dir: Path, out: Path, valid_pct: float | None = None, seed: int = 0, labels: LabelOptions | None = None
) -> InspectReport:
    """Counts, balance, sizes and formats per split and class; unreadable files; duplicates and leaks; a sheet."""
    with output_folder(out, (SAMPLES_PNG,), "an inspection") as staging:
        return _inspect(data_dir, out, staging, valid_pct, seed, labels)


def _inspect(
    data_dir: Path, out: Path, staging: Path, valid_pct: float | None, seed: int, labels: LabelOptions | None = None
) -> InspectReport:
    dataset = scan_dataset(data_dir, valid_pct, seed, labels)
    source = dataset.label_source
    task = source.task if source is not None else "single"

    def classes_of(f) -> list[str]:  # each class an image counts for: its one, its tags, or the number's column
        if task == "multi":
            return list(source.labels.get(f.path, ())) or ["(no class)"]
        if task == "numeric":
            return dataset.classes if f.path in source.labels else ["(unlabelled)"]
        return [dataset.classes[f.label] if f.label >= 0 else "(unlabelled)"]

    by_hash: dict[str, list[tuple[str, str]]] = defaultdict(list)
    splits, unreadable = {}, []
    widths, heights, formats, modes = [], [], Counter(), Counter()
    for split, files in dataset.splits.items():
        counts = Counter()
        for f in files:
            data = (dataset.root / f.path).read_bytes()
            try:
                vet_image_bytes(data)
                fmt, width, height, mode = _header(data)
                if fmt == "JPEG" and not data.rstrip(b"\0").endswith(b"\xff\xd9"):
                    raise BadImage("truncated JPEG (no end-of-image marker)")
            except BadImage as exc:
                unreadable.append(Unreadable(split, f.path, str(exc)))
                continue
            by_hash[content_sha256(data)].append((split, f.path))
            counts.update(classes_of(f))
            widths.append(width)
            heights.append(height)
            formats[fmt] += 1
            modes[mode] += 1
        splits[split] = SplitCounts(
            images=len(files) - sum(1 for u in unreadable if u.split == split),
            classes=dict(sorted(counts.items())),
            balance=round(min(counts.values()) / max(counts.values()), 3) if counts else None,
        )
    duplicates = [
        SameFile([p for _, p in group], sorted({s for s, _ in group})) for group in by_hash.values() if len(group) > 1
    ]
    leaks = [d for d in duplicates if len(d.splits) > 1]
    samples = {}
    first = "train" if "train" in dataset.splits else next(iter(dataset.splits))
    for name in dataset.classes or ["(unlabelled)"]:
        members = [dataset.root / f.path for f in dataset.splits[first] if name in classes_of(f)]
        samples[name] = members[:: max(1, len(members) // SAMPLES_PER_CLASS)][:SAMPLES_PER_CLASS]
    plot_contact_sheet(samples, staging / SAMPLES_PNG, SAMPLES_PER_CLASS)

    def spread(values) -> Spread | None:
        return Spread(min(values), statistics.median(values), max(values)) if values else None

    return InspectReport(
        data_dir=str(data_dir),
        layout=dataset.layout,
        classes=dataset.classes,
        splits=splits,
        width=spread(widths),
        height=spread(heights),
        formats=dict(formats),
        modes=dict(modes),
        unreadable=unreadable,
        duplicates=duplicates,
        leaks=leaks,
        contact_sheet=str(out / SAMPLES_PNG),
        notes=dataset.notes,
    )
