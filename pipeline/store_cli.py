"""`pipeline store`: the store subcommands' options and results (pipeline/cli.py adds them to the command line;
their work is pipeline/store_tools.py's and the store's own)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline import render
from pipeline.lifecycle import on_interrupt

store_app = typer.Typer(
    no_args_is_help=True, help="Look inside a feature store: describe, check, compact, copy, move, repair."
)


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
    render.show(info, as_json, render.store_described)
    check_undamaged(store, info)


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
        render.show(compact_store(store, dead_share), as_json, render.compacted)


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

    render.show(Store(source).copy(target), as_json, render.relocated)


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

    render.show(Store(source).move(target), as_json, render.relocated)


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

    render.show(Store(store).repair(), as_json, render.repaired)
