"""The `pipeline` command: thin wrappers that parse options and call stages/ and store/."""
from __future__ import annotations

import json
import signal
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from stages.errors import PipelineError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="Transfer learning for image classification: featurize once with a frozen backbone, "
                       "then train heads on the cached features in seconds.")
store_app = typer.Typer(no_args_is_help=True, help="Look inside a feature store.")
app.add_typer(store_app, name="store")
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)
DEBUG = False


@contextmanager
def progress_bar(description: str, unit: str = "img"):
    """A rich progress bar on stderr with rate and ETA; yields a callback (done, total)."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task(description, total=None, rate="")

        def update(done: int, total: int) -> None:
            elapsed = bar.tasks[0].elapsed or 0
            rate = f"{done / elapsed:.1f} {unit}/s" if elapsed > 0 else ""
            bar.update(task, completed=done, total=total, rate=rate)

        yield update


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


@app.command(epilog="Examples:\n\n"
             "    pipeline featurize data/dogscats --store runs/dogscats.h5\n\n"
             "    pipeline featurize data/photos --valid-pct 0.2 --seed 0 --store runs/photos.h5 --views 4\n\n"
             "    pipeline featurize data/dogscats --store runs/ft.h5 --weights runs/ft-a/backbone.safetensors")
def featurize(
    data_dir: Path = typer.Argument(..., help="Folder of train/ valid/ [test/] class folders, or one folder of class folders."),
    store: Path = typer.Option(..., "--store", "-s", help="HDF5 feature store to create or update."),
    backbone: str = typer.Option("efficientnet_lite0", help="Registered backbone (efficientnet_lite0/1/2)."),
    weights: Optional[Path] = typer.Option(None, help="Local state_dict (.pth/.safetensors) instead of packaged weights."),
    arch: Optional[str] = typer.Option(None, help="timm or torchvision architecture for --weights."),
    views: int = typer.Option(0, help="Augmented views stored per training image, besides the plain view 0."),
    seed: int = typer.Option(0, help="Seed for augmented views and for --valid-pct."),
    valid_pct: Optional[float] = typer.Option(None, help="Hold out this fraction of a labelled folder as valid."),
    dtype: str = typer.Option("float16", help="Stored feature dtype: float16 or float32."),
    precision: str = typer.Option("auto", help="Forward precision: auto (bf16 where measured faster), fp32, bf16."),
    device: str = typer.Option("auto", help="auto, cpu or cuda (GPU decode and forward)."),
    batch_size: int = typer.Option(32, help="Images per batch."),
    commit_every: int = typer.Option(2048, help="Commit to the journal after this many feature rows (a kill loses "
                                                "at most this much work)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Decode images with DALI, run the frozen backbone once, stream features into the store (only what changed)."""
    from pipeline.featurize import FeaturizeOptions, featurize as run_featurize

    opts = FeaturizeOptions(data_dir=data_dir, store=store, backbone=backbone, weights=weights, arch=arch, views=views,
                            seed=seed, valid_pct=valid_pct, dtype=dtype, precision=precision, device=device,
                            batch_size=batch_size, commit_rows=commit_every)
    with progress_bar("featurize") as update:
        summary = run_featurize(opts, progress=update)
    if as_json:
        _print_json(summary)
    else:
        _print_featurize_summary(summary)
    if summary["interrupted"]:
        err.print(f"interrupted: committed work is in {summary['store']}; rerun the same command to continue")
        raise typer.Exit(130)


def _print_featurize_summary(s: dict) -> None:
    for note in s["notes"]:
        err.print(f"[yellow]note:[/] {note}")
    for bad in s["skipped"]:
        err.print(f"[yellow]skipped[/] {bad['path']}: {bad['reason']}", highlight=False)
    images = ", ".join(f"{split} {n}" for split, n in s["images"].items())
    if s["up_to_date"]:
        out.print(f"up to date: {s['store']} ({s['set']}: {images}) in {s['seconds']:.1f} s, nothing decoded")
        return
    rate = f", {s['images_per_second']} img/s" if s["images_per_second"] else ""
    out.print(f"featurized {s['featurized']} images, reused {s['reused']}, skipped {len(s['skipped'])} "
              f"in {s['seconds']:.1f} s{rate} ({s['backbone']}, {s['device']}, {s['precision']})")
    out.print(f"store {s['store']} ({_human_bytes(s['store_bytes'])}), set {s['set']}: {images}")


@store_app.command("info", epilog="Example:\n\n    pipeline store info runs/dogscats.h5 --json")
def store_info(
    store: Path = typer.Argument(..., help="Feature store file."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
):
    """Show the feature sets of a store: backbone, weights, preprocessing, splits, counts, classes, size."""
    from store.reader import FeatureStore

    with FeatureStore(store) as fs:
        info = fs.info()
    if as_json:
        _print_json(info)
        return
    out.print(f"{info['path']}: {_human_bytes(info['size_bytes'])}, schema v{info['schema_version']}, "
              f"{len(info['sets'])} feature set(s)")
    for s in info["sets"]:
        pp = s["preprocessing"]
        out.print(f"\n[bold]{s['name']}[/]  backbone {s['backbone']} ({s['arch']}), weights sha256 {s['weights_sha256'][:12]}")
        out.print(f"  preprocessing: resize {pp['resize']}, crop {pp['size']}, mean {pp['mean']}, std {pp['std']}")
        out.print(f"  features: {s['feature_dim']} x {s['dtype']} ({s['precision']}), views {s['views']}, seed {s['seed']}")
        out.print(f"  classes ({len(s['classes'])}): {', '.join(s['classes'])}")
        for split, c in s["splits"].items():
            out.print(f"  {split}: {c['images']} images, {c['rows']} rows, {c['skipped']} skipped")
        out.print(f"  data: {s['data_dir']} ({s['layout']}), updated {s['updated']}")


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


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    """Entry point: one-line errors without traceback unless --debug is given anywhere on the command line."""
    global DEBUG
    if "--debug" in sys.argv[1:]:
        DEBUG = True
        sys.argv.remove("--debug")
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = app(standalone_mode=False)  # returns the exit code of typer.Exit and --help
    except PipelineError as exc:
        if DEBUG:
            traceback.print_exc()
        err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # usage errors (typer's click exceptions show themselves) and the unexpected
        if hasattr(exc, "show") and hasattr(exc, "exit_code"):
            exc.show()
            sys.exit(exc.exit_code)
        if type(exc).__name__ == "Abort":
            sys.exit(130)
        if DEBUG:
            raise
        err.print(f"[red]error:[/] {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                  highlight=False, soft_wrap=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
