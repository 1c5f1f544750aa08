"""Image files: find the splits and classes of a data folder, fingerprint files, read and vet their bytes."""

from __future__ import annotations

import hashlib
import io
import operator
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np

from stages.bulk import collector_paused
from stages.errors import PipelineError
from stages.labels import LabelOptions, LabelSource, find_source, label_by_pattern

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
SPLIT_NAMES = ("train", "valid", "test")  # the one list of split names: the store and every command use it
LABELLED_SPLITS = SPLIT_NAMES[:2]  # test/ may hold unlabelled images
# Decoders DALI handles; PIL names them in Image.format.
DECODABLE_FORMATS = frozenset({"JPEG", "PNG", "BMP", "TIFF", "WEBP", "MPO"})
# Refuse images that declare more pixels than this (a decompression bomb): 100 megapixels.
MAX_PIXELS = 100_000_000
UNLABELLED = -1


FileStat = tuple[int, int, int]  # size, mtime_ns, ctime_ns: what a file's rows are kept by (Fingerprint.same_stat)


class ImageFile(NamedTuple):
    """One image of a split: path relative to the data folder (POSIX), label index or UNLABELLED, and the file's
    stat as the scan found it (None where it could not stat it, or where no scan made it). (A named tuple, as
    Fingerprint: a scan makes one per file.)"""

    path: str
    label: int
    stat: FileStat | None = None


@dataclass
class Dataset:
    """The splits of a data folder, each a sorted list of image files, and the class names."""

    root: Path
    classes: list[str]
    splits: dict[str, list[ImageFile]]
    layout: str
    valid_pct: float | None = None
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    label_source: LabelSource | None = None  # None: class folders

    def describe(self) -> dict:
        described = {"layout": self.layout, "valid_pct": self.valid_pct, "split_seed": self.seed}
        return {**described, **(self.label_source.describe() if self.label_source else {})}


class Fingerprint(NamedTuple):
    """What identifies a file's content: size and mtime for a cheap check, a content hash for a sure one. (A named
    tuple: one is made per file on every run, and a frozen dataclass costs ten times as much to make.)"""

    size: int
    mtime_ns: int
    sha256: str = ""
    ctime_ns: int = 0  # changes with any write, even one that restores size and mtime

    def same_stat(self, size: int, mtime_ns: int, ctime_ns: int) -> bool:
        """The cheap check: size, mtime and ctime all as recorded."""
        return (self.size, self.mtime_ns, self.ctime_ns) == (size, mtime_ns, ctime_ns)

    @classmethod
    def of(cls, stat: FileStat) -> Fingerprint:
        """The cheap fingerprint of a file's stat (its content hash not known)."""
        return cls(stat[0], stat[1], "", stat[2])

    def with_sha256(self, sha256: str) -> Fingerprint:
        """The same stat with the content hash known."""
        return Fingerprint(self.size, self.mtime_ns, sha256, self.ctime_ns)


_entry_name = operator.attrgetter("name")


# An image file's name: not hidden, one of IMAGE_EXTENSIONS in any case. Matched over a folder's names joined by
# NUL (no name holds one) in one regular-expression pass: a scan asks once per file.
_IMAGE_NAME = re.compile(
    r"(?<![^\0])[^.\0][^\0]*\.(?:" + "|".join(sorted(e[1:] for e in IMAGE_EXTENSIONS)) + r")(?![^\0])", re.I | re.A
)


def _image_names(names: list[str]) -> list[str]:
    """The names of image files among a folder's file names, in their order: by extension, hidden ones left out."""
    return _IMAGE_NAME.findall("\0".join(names))


# A stat result's FileStat. (An attrgetter makes the tuple without a Python call: a scan asks once per file.)
_file_stat = operator.attrgetter("st_size", "st_mtime_ns", "st_ctime_ns")
_is_symlink = os.DirEntry.is_symlink


def _stat_in(folder: int, name: str) -> FileStat | None:
    """A file's stat, looked up by name in an open folder (following a symlink); None when it cannot be had."""
    try:
        return _file_stat(os.stat(name, dir_fd=folder))
    except OSError:  # gone, or a broken symlink: its decision stats it again and records why
        return None


def _listing(entries: list[os.DirEntry]) -> tuple[list[str], list[str]]:
    """A folder's image file names and the subfolders to visit, each sorted (hidden ones left out)."""
    images = _image_names(sorted(e.name for e in entries if not e.is_dir()))
    return images, sorted(e.name for e in entries if e.is_dir() and e.name[0] != ".")


class _ImageWalker:
    """Finds image files below the folders of one scan, visiting each real directory and each real file once. For
    the store (for_store) it stats each file it finds (a scan is the one pass over the folder a rerun makes) and
    leaves out, with a note, files whose path is not UTF-8 (a store keeps its paths in UTF-8).

    A symlinked folder is not followed when it leads back into a folder the scan owns (a class folder or test/),
    to one of their ancestors (a loop), or to a folder already visited: its images would otherwise be stored
    again, under the wrong class. Hidden folders are skipped like hidden files.
    """

    def __init__(self, owned: list[Path], for_store: bool = True):
        self.owned = [os.path.realpath(p) for p in owned]
        self.for_store = for_store
        self.visited: dict[str, str] = {}  # real folder: the path it was first walked by
        # Real path: the path it was found by, for files outside the owned folders. A file inside them can be
        # reached by one path only: a symlink into an owned folder is refused.
        self.outside: dict[str, str] = {}
        self.notes: list[str] = []

    def _refuse(self, link: str) -> str | None:
        target = os.path.realpath(link)
        for owned in self.owned:
            if target == owned or target.startswith(owned + os.sep):
                return f"it leads to {target}, which is scanned by its own path"
            if owned.startswith(target + os.sep):
                return f"it leads to {target}, a folder above the images (a loop)"
        return f"it leads to {target}, already scanned" if target in self.visited else None

    def _owned(self, real: str) -> bool:
        return any(real == owned or real.startswith(owned + os.sep) for owned in self.owned)

    def walk(self, folder: Path, relative: str, label: int) -> list[ImageFile]:
        """All image files below a folder, recursively, sorted by path: each named `relative` + its path below
        the folder, with `label` and its stat."""
        found: list[ImageFile] = []
        stack = [(str(folder), relative)]
        while stack:  # depth first, each folder's entries in name order (which copy of a file is kept)
            dirpath, name = stack.pop()
            real_dir = os.path.realpath(dirpath)
            if real_dir in self.visited:  # an owned folder reached again (valid/ a symlink to train/): stored once
                stack += self._again(dirpath, self.visited[real_dir], name)
                continue
            self.visited[real_dir] = dirpath
            try:  # listed by descriptor: a file's stat is then looked up by name in it, not by its whole path
                fd = os.open(dirpath, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                with os.scandir(fd) as it:
                    entries = list(it)
                folder_files = _FolderFiles(dirpath, name, real_dir, fd, label, self.for_store)
                if any(map(_is_symlink, entries)) or not self._owned(real_dir):
                    found += self._files_one_by_one(folder_files, sorted(entries, key=_entry_name), stack)
                else:
                    images, subfolders = _listing(entries)
                    found += self._images(folder_files, images)
                    stack += [folder_files.below(n) for n in reversed(subfolders)]
            finally:
                os.close(fd)
        found.sort()
        return found

    def _again(self, dirpath: str, first: str, name: str) -> list[tuple[str, str]]:
        """A folder walked before by another path: a note for each of its images; its subfolders to visit."""
        try:
            with os.scandir(dirpath) as it:
                images, subfolders = _listing(list(it))
        except OSError:
            return []
        here, there = os.path.join(dirpath, ""), os.path.join(first, "")
        self.notes += [f"{here}{n} is the file {there}{n} reached by another path; stored once" for n in images]
        return [(here + n, f"{name}/{n}") for n in reversed(subfolders)]

    def _files_one_by_one(self, folder: _FolderFiles, entries: list, stack: list) -> list[ImageFile]:
        """A folder's images where symlinks are, or where its files can also be reached by another path: entry by
        entry in name order (which copy of a file is kept, and why the others are not)."""
        names, subfolders = [], []
        for entry in entries:
            name, path = entry.name, folder.prefix + entry.name
            if entry.is_dir():
                reason = self._refuse(path) if entry.is_symlink() else None
                if reason:
                    self.notes.append(f"symlinked folder {path} skipped: {reason}")
                elif name[0] != ".":
                    subfolders.append(folder.below(name))
                continue
            if not _image_names([name]):
                continue
            real = os.path.realpath(path) if entry.is_symlink() else folder.inside + name
            if self._owned(real):
                if entry.is_symlink():
                    self.notes.append(f"symlink {path} skipped: it leads to {real}, which is scanned by its own path")
                    continue
            elif real in self.outside:
                self.notes.append(f"{path} is the file {self.outside[real]} reached by another path; stored once")
                continue
            else:
                self.outside[real] = path
            names.append(name)
        stack += reversed(subfolders)
        return self._images(folder, names)

    def _images(self, folder: _FolderFiles, names: list[str]) -> list[ImageFile]:
        """A folder's image files as ImageFiles; for the store, less those whose path is not UTF-8 (noted)."""
        if self.for_store and not _utf8(folder.relative + "".join(names)):  # one check a folder: such names are rare
            bad = set(names) if not _utf8(folder.relative) else {n for n in names if not _utf8(n)}
            self.notes += [
                f"{_shown(folder.prefix + n)} skipped: its path is not UTF-8, which a store keeps paths in; rename it"
                for n in names
                if n in bad
            ]
            names = [n for n in names if n not in bad]
        return folder.images(names)


@dataclass
class _FolderFiles:
    """One folder of a walk, open as a descriptor: its images become ImageFiles."""

    path: str
    relative: str  # the name its files are stored under, up to their own
    real: str
    fd: int
    label: int
    for_store: bool = True  # each file's stat taken

    @property
    def prefix(self) -> str:
        return os.path.join(self.path, "")

    @property
    def inside(self) -> str:
        return os.path.join(self.real, "")

    def below(self, name: str) -> tuple[str, str]:
        """A subfolder to visit: its path and its stored name."""
        return self.prefix + name, f"{self.relative}/{name}"

    def images(self, names: list[str]) -> list[ImageFile]:
        """These files of the folder as ImageFiles, each with its stat (one per file, by name in the folder)."""
        prefix, label = f"{self.relative}/", self.label
        if not self.for_store:
            return [ImageFile(prefix + n, label) for n in names]
        try:
            stats = [os.stat(n, dir_fd=self.fd) for n in names]
        except OSError:  # one of them is gone since the listing, or a broken symlink: file by file
            return [ImageFile(prefix + n, label, _stat_in(self.fd, n)) for n in names]
        return [ImageFile(prefix + n, label, _file_stat(st)) for n, st in zip(names, stats)]


def find_images(folder: Path) -> list[Path]:
    """All image files below one folder (symlinked folders and files followed once), sorted."""
    return [Path(f.path) for f in _ImageWalker([folder], for_store=False).walk(folder, str(folder), UNLABELLED)]


def class_folders(split_dir: Path) -> list[str]:
    """The class folder names of a split folder, sorted; hidden folders are not classes."""
    names = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    for name in names:
        if not _utf8(name):
            raise PipelineError(
                f"class folder {_shown(str(split_dir / name))} has a name that is not UTF-8 (class names are kept in "
                "UTF-8); rename it"
            )
    return names


def _utf8(text: str) -> bool:
    """True when a name read from the file system is UTF-8 (Python keeps other bytes as lone surrogates)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _shown(path: str) -> str:
    """A path as a message can print it: bytes that are not UTF-8 as \\x escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _labelled(root: Path, split_dir: Path, classes: list[str], walker: _ImageWalker) -> list[ImageFile]:
    files = []
    for label, name in enumerate(classes):
        folder = split_dir / name
        if folder.is_dir():
            files += walker.walk(folder, folder.relative_to(root).as_posix(), label)
    return sorted(files)  # by path: paths are unique


def _split_rank(seed: int, path: str) -> bytes:
    return hashlib.blake2b(f"{seed}:{path}".encode(), digest_size=8).digest()


def _holdout(files: list[ImageFile], valid_pct: float, seed: int) -> tuple[list[ImageFile], list[ImageFile]]:
    """Stratified, seeded split: per class, the files whose hash of (seed, path) ranks lowest go to valid.

    Ranking by a per-file hash keeps each file's split stable when other files come and go.
    """
    train, valid = [], []
    for label in sorted({f.label for f in files}):
        members = sorted((f for f in files if f.label == label), key=lambda f: _split_rank(seed, f.path))
        n_valid = int(round(len(members) * valid_pct))
        valid += members[:n_valid]
        train += members[n_valid:]
    return sorted(train, key=lambda f: f.path), sorted(valid, key=lambda f: f.path)


LAYOUTS = (
    "DATA/train/CLASS/*.jpg and DATA/valid/CLASS/*.jpg (split folders of class folders)",
    "DATA/CLASS/*.jpg (class folders, split with --valid-pct)",
    "a metadata.csv in DATA (file_name,label columns)",
    "--labels FILE (CSV, TSV, Parquet or JSON Lines: path,label[,split])",
    "--label-pattern REGEX (the label in each file name)",
)


def scan_dataset(
    root: str | Path, valid_pct: float | None = None, seed: int = 0, labels: LabelOptions | None = None
) -> Dataset:
    """Find splits (train/valid/test of class folders), or one labelled folder split by --valid-pct, or images
    labelled by a label source (a table, a metadata.csv in the folder, a pattern in the file names)."""
    root = Path(root)
    if not root.is_dir():
        raise PipelineError(f"data folder {root} does not exist; give a folder of train/ and valid/ class folders")
    if valid_pct is not None and not 0 < valid_pct < 1:
        raise PipelineError(f"--valid-pct {valid_pct} is out of range; give a fraction between 0 and 1, such as 0.2")
    source = find_source(root, labels or LabelOptions())
    with collector_paused():  # a file is a few tuples and strings
        if source is not None:
            return _scan_labelled(root, source, valid_pct, seed)
        return _scan_dataset(root, valid_pct, seed)


def _scan_labelled(root: Path, source: LabelSource, valid_pct: float | None, seed: int) -> Dataset:
    """Every image below the data folder, labelled by the source; its split from the source's split column, else
    its top folder (train/, valid/, test/), else --valid-pct, else train."""
    walker = _ImageWalker([root])
    found = [f._replace(path=f.path[1:]) for f in walker.walk(root, "", UNLABELLED)]  # "/a.jpg" -> "a.jpg"
    paths = [f.path for f in found]
    where = f"{source.origin}" if source.kind != "pattern" else f"--label-pattern {source.origin!r}"
    if source.matched_by_name:
        source.labels = label_by_pattern(source.origin, [p for p in paths if not p.startswith("test/")])
    else:
        listed = set(source.labels)
        missing = sorted(listed - set(paths))
        if missing:
            raise PipelineError(
                f"{where}: {len(missing)} of its {len(listed)} paths are not images in {root} (such as "
                f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); paths are relative to the data folder"
            )
    unlabelled = [p for p in paths if p not in source.labels and not p.startswith("test/")]
    if unlabelled:
        raise PipelineError(
            f"{where}: {len(unlabelled)} images in {root} have no label (such as "
            f"{', '.join(unlabelled[:3])}{', ...' if len(unlabelled) > 3 else ''}); label them or move them out"
        )
    # Several labels or a number per image stay in their table (recorded, digest and all, and read again by every
    # head command): the store's labels column holds one class index per row, -1 here.
    classes = source.classes if source.task != "single" else sorted({source.labels[p] for p in source.labels})
    index = {name: i for i, name in enumerate(classes)} if source.task == "single" else {}
    splits: dict[str, list[ImageFile]] = {}
    for f in found:
        top = f.path.split("/", 1)[0] if "/" in f.path else ""
        split = source.splits.get(f.path) or (top if top in SPLIT_NAMES else "train")
        label = index.get(source.labels[f.path], UNLABELLED) if f.path in source.labels else UNLABELLED
        splits.setdefault(split, []).append(f._replace(label=label))
    layout = source.kind
    if valid_pct is not None:
        if "valid" in splits:
            raise PipelineError(f"{where} already gives images a valid split; drop --valid-pct")
        splits["train"], splits["valid"] = _holdout(splits.get("train", []), valid_pct, seed)
        layout += "+holdout"
    splits = {s: sorted(splits[s]) for s in SPLIT_NAMES if s in splits}
    return _checked(root, classes, splits, layout, valid_pct, seed, walker.notes, source)


def _checked(root, classes, splits, layout, valid_pct, seed, notes, source=None) -> Dataset:
    """The dataset, once it holds images and every class has training images (at least two classes)."""
    if not any(splits.values()):
        raise PipelineError(f"{root} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    if classes and "train" in splits and (source is None or source.task == "single"):
        present = {f.label for f in splits["train"]}
        empty = [c for i, c in enumerate(classes) if i not in present]
        if empty:
            what = "class folder(s)" if source is None else "class(es)"
            raise PipelineError(
                f"{what} {', '.join(empty[:5])} in {root} have no training images; add images or remove the class"
            )
        if len(classes) < 2:
            raise PipelineError(f"{root} has only one class ({classes[0]}); a classifier needs at least two classes")
    return Dataset(
        root=root,
        classes=classes,
        splits=splits,
        layout=layout,
        valid_pct=valid_pct,
        seed=seed,
        notes=notes,
        label_source=source,
    )


def _scan_dataset(root: Path, valid_pct: float | None, seed: int) -> Dataset:
    present = [s for s in SPLIT_NAMES if (root / s).is_dir()]
    notes = []
    if present:
        labelled = [s for s in LABELLED_SPLITS if s in present]
        if not labelled:
            classes = []
        else:
            classes = class_folders(root / labelled[0])
            if not classes:
                raise PipelineError(
                    f"{root / labelled[0]} has no class folders; put each class's images in "
                    f"{root / labelled[0]}/CLASS_NAME/"
                )
            for other in labelled[1:]:
                other_classes = class_folders(root / other)
                if other_classes != classes:
                    extra = sorted(set(other_classes) ^ set(classes))
                    raise PipelineError(
                        f"{root / other} has other class folders than {root / labelled[0]} "
                        f"(differ: {', '.join(extra)}); give both splits the same classes"
                    )
        walker = _ImageWalker(
            [root / s / c for s in labelled for c in classes] + ([root / "test"] if "test" in present else [])
        )
        splits = {s: _labelled(root, root / s, classes, walker) for s in labelled}
        if "test" in present:
            splits["test"] = walker.walk(root / "test", "test", UNLABELLED)
        layout = "splits"
        if valid_pct is not None:
            if "valid" in splits:
                raise PipelineError(f"{root} already has valid/; drop --valid-pct or remove valid/")
            if "train" in splits:
                splits["train"], splits["valid"] = _holdout(splits["train"], valid_pct, seed)
                layout = "splits+holdout"
    else:
        classes = class_folders(root)
        if not classes:
            raise PipelineError(
                f"{root} has neither train/ valid/ split folders nor class folders nor a label source; lay it out as "
                f"one of: {'; '.join(LAYOUTS)}"
            )
        walker = _ImageWalker([root / c for c in classes])
        everything = _labelled(root, root, classes, walker)
        if valid_pct is None:
            splits = {"train": everything}
            notes.append(f"{root} has no split folders: all images go to train; pass --valid-pct 0.2 for a valid split")
        else:
            train, valid = _holdout(everything, valid_pct, seed)
            splits = {"train": train, "valid": valid}
        layout = "classes"
    notes += walker.notes
    return _checked(root, classes, splits, layout, valid_pct, seed, notes)


def stat_fingerprint(path: str | Path) -> Fingerprint:
    """Size and mtime of a file, without reading it."""
    return Fingerprint.of(_file_stat(os.stat(path)))


def content_sha256(data: bytes) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(data).hexdigest()


class BadImage(Exception):
    """A file that cannot become an image; the message is the reason recorded in the store."""


def vet_image_bytes(data: bytes, max_pixels: int = MAX_PIXELS) -> None:
    """Reject empty, non-image, unsupported and oversized files by their header, before any decode."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height) = image.format, image.size
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised header)") from None
    except Image.DecompressionBombError:
        raise BadImage(f"declares more than {max_pixels} pixels (decompression bomb)") from None
    except Exception as exc:
        raise BadImage(f"unreadable image header: {exc}") from None
    if fmt not in DECODABLE_FORMATS:
        raise BadImage(f"unsupported format {fmt}")
    if width * height > max_pixels:
        raise BadImage(f"{width}x{height} exceeds the {max_pixels}-pixel limit (decompression bomb)")


def read_image_file(path: Path) -> tuple[np.ndarray, Fingerprint]:
    """Read a file's bytes once: the encoded array for the decoder and the file's full fingerprint."""
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise BadImage(f"cannot read: {exc.strerror or exc}") from None
    fingerprint = Fingerprint(st.st_size, st.st_mtime_ns, content_sha256(data), st.st_ctime_ns)
    vet_image_bytes(data)
    return np.frombuffer(data, dtype=np.uint8), fingerprint


def read_stored_file(root: str | Path, stored: str) -> bytes | None:
    """The bytes of a file a store records (its path relative to the data folder), or None when that path is not
    one to open: it leaves the data folder (absolute, '..', or a symlink that points out) or is not a regular file.
    A FIFO, a device or a folder is never opened (reading a FIFO would wait for ever)."""
    relative = PurePosixPath(stored)
    if not stored or relative.is_absolute() or ".." in relative.parts:
        return None
    base = Path(root).resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)
