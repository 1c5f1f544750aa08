"""What a command shows: each command's typed result as lines and tables on the terminal, or as JSON (--json, a
public interface); progress bars and fast.ai's per-epoch table while it works. Results come from the orchestration
modules; nothing here computes one."""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from pipeline.lifecycle import err

# Tables keep their columns when output goes to a file or pipe.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
SKIPPED_SHOWN = 20  # skipped files listed on the terminal; --json lists every one


def say(text: str, console: Console = out) -> None:
    console.print(text, highlight=False)


def note(text: str) -> None:
    err.print(f"[yellow]note:[/] {text}", highlight=False)


def show(result, as_json: bool, render: Callable) -> None:
    """A command's result: as JSON with --json, else as `render` shows it."""
    if as_json:
        print_json(result)
    else:
        render(result)


def print_json(result) -> None:
    """A command's --json: its result's to_json() (a list of them for a leaderboard), as strict JSON, indented on a
    terminal and on one line into a pipe or a file (for the program reading it; as gh does)."""
    from stages.atomic import strict_json

    def plain(value):
        return [plain(v) for v in value] if isinstance(value, list) else getattr(value, "to_json", lambda: value)()

    sys.stdout.write(strict_json(plain(result), indent=2 if sys.stdout.isatty() else None) + "\n")


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


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n} B"


# featurize and the store ----------------------------------------------------------------------------------------
def featurize_shown(result, as_json: bool) -> None:
    """featurize's result; a torchrun rank other than 0 logs a line on stderr (rank 0 reports the whole)."""
    from pipeline.distributed import launched_ranks

    if hasattr(result, "shard") and launched_ranks().distributed:
        say(f"{result.shard}: featurized {result.featurized} images in {result.seconds:.1f} s", err)
    else:
        show(result, as_json, featurized)


def featurized(s) -> None:  # s: pipeline.featurize.FeaturizeResult or ShardResult
    for line in s.notes:
        note(line)
    rate = f", {s.images_per_second} img/s" if s.images_per_second else ""
    if hasattr(s, "shard"):  # a shard's (pipeline.featurize.ShardResult): its partitions wait for a run to map them
        say(f"{s.shard}: featurized {s.featurized} images in {s.seconds:.1f} s{rate}")
        return
    for bad in s.skipped[:SKIPPED_SHOWN]:
        say(f"[yellow]skipped[/] {bad['path']}: {bad['reason']}", err)
    if len(s.skipped) > SKIPPED_SHOWN:
        say(f"[yellow]skipped[/] {len(s.skipped) - SKIPPED_SHOWN} more (all in --json)", err)
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
    out.print(f"store {s.store} ({human_bytes(s.store_bytes)}), set {s.set}: {images}")


def store_described(info) -> None:  # info: store.StoreInfo
    out.print(
        f"{info.path}: {human_bytes(info.size_bytes)}, schema v{info.schema_version}, "
        f"{info.partitions} partition(s), {len(info.sets)} feature set(s)"
    )
    for s in info.sets:
        r, i = s.record, s.record.identity
        pp = i.preprocessing
        out.print(f"\n[bold]{s.name}[/]  backbone {i.backbone} ({i.arch}), weights sha256 {i.weights_sha256[:12]}")
        out.print(f"  preprocessing: resize {pp['resize']}, crop {pp['size']}, mean {pp['mean']}, std {pp['std']}")
        out.print(f"  features: {i.feature_dim} x {i.dtype} ({i.precision}), views {i.views}, seed {i.seed}")
        out.print(f"  classes ({len(r.classes)}): {', '.join(r.classes)}")
        out.print(f"  partitions {s.partitions}: {s.live_rows} live rows, {s.dead_rows} dead")
        for split, c in s.splits.items():
            images = "?" if c.images is None else c.images  # its paths column is damaged: --verify says so
            out.print(f"  {split}: {images} images, {c.rows} rows, {c.skipped} skipped")
        out.print(f"  data: {r.data_dir} ({r.layout}), updated {r.updated}")
    if info.verification is None or any(d.damage for d in info.verification):  # damage: the error says where
        return
    unchecked = [f"{d.set} {d.split}" for d in info.verification if d.unchecked]
    say(
        "verified: every dataset matches its checksum"
        if not unchecked
        else f"verified: no NaN or infinite features; {', '.join(unchecked)} were written before checksums existed "
        "(the next featurize rewrites them with checksums)"
    )


def compacted(result) -> None:  # result: store.CompactResult
    say(
        f"compacted {len(result.rewritten)} partition(s) into {len(result.written)} ({result.rows_copied} rows "
        f"copied); {len(result.deleted)} partition(s) deleted in {result.seconds:.1f} s"
    )


def relocated(result) -> None:  # result: store.RelocateResult
    verb = "moved" if result.moved else "copied"
    say(f"{verb} {result.source} to {result.store}: {result.partitions} partition(s), {result.linked} hard-linked")


def repaired(result) -> None:  # result: store.RepairResult
    say(f"rewrote the root of {result.store}: {result.partitions} partition(s) mapped")


# heads -------------------------------------------------------------------------------------------------------------
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


class HeadProgress:
    """train-head while it works: a line naming each run of a grid, then its epoch table (logreg: its strengths)."""

    def __init__(self, runs: int, auto_lr: bool, score: str, as_json: bool):
        self.console = err if as_json else out  # --json keeps stdout for the JSON
        self.runs, self.named = runs, runs > 1 or auto_lr
        self.epochs = EpochTable(self.console, score=score)
        self.strengths = EpochTable(self.console, EpochTable.STRENGTHS, score=score)

    def on_run(self, i: int, cfg) -> None:  # cfg: stages.settings.TrainConfig
        if self.named:
            settings = (
                f"l2 {'auto' if cfg.l2 is None else f'{cfg.l2:g}'}"
                if cfg.head == "logreg"
                else f"lr {cfg.lr:g} wd {cfg.wd:g} epochs {cfg.epochs}"
            )
            say(f"\n[bold]run {i + 1}/{self.runs}[/]: {cfg.head} {settings} views {cfg.views}", self.console)
        (self.strengths if cfg.head == "logreg" else self.epochs).header()


def leaderboard(rows: list, title: str | None) -> None:  # rows: stages.rundir.RunSummary
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


def heads_trained(board: list, store: Path) -> None:  # board: pipeline.train_head.HeadRun, best first
    if len(board) > 1:
        leaderboard(board, f"{len(board)} runs on {store}")
        return
    from stages.tasks import TASKS

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
    say(
        f"valid {TASKS[b.task].primary} {figure}, {loss_name} {loss}; {chosen}{temperature}head, config.json, "
        f"metrics.json, curves.png in {b.run}"
    )


def lr_found(result) -> None:  # result: stages.head.LrFindResult
    say(
        f"suggested lr: {result.suggestion:.2e} (lowest held-out loss over {len(result.lrs)} rates, "
        f"{result.epochs} epoch(s) each; what --lr auto uses); plot {result.plot}"
    )


def runs_listed(rows: list, root: Path, store: Path | None) -> None:  # rows: stages.rundir.ListedRun
    if not rows:
        out.print(f"no runs under {root}" + (f" for {store}" if store else ""))
    for data in dict.fromkeys(r.data for r in rows):  # a board per data set: only its runs compare
        group = [r for r in rows if r.data == data]
        labels = f", labels {group[0].labels}" if group[0].labels else ""
        where = f"{group[0].store or '(unrecorded store)'} set {group[0].set}{labels}"
        say(f"{len(group)} run{'s' * (len(group) > 1)} on {where}")
        leaderboard(group, None)


def finetuned(result) -> None:  # result: pipeline.finetune.FinetuneResult
    before = result.before or {}
    kept = result.kept_epoch
    kept_note = "" if kept is None else " (the starting model: no epoch beat it)" if kept < 0 else f" (epoch {kept})"
    calibrated = (
        f"temperature {result.temperature:.3f} fitted on {result.calibration_images} held-out train images; "
        if result.calibration_images
        else ""
    )
    say(
        f"valid accuracy {before.get('accuracy', float('nan')):.4f} before, {result.accuracy:.4f} after{kept_note}; "
        f"{calibrated}{result.train_images_per_second:.1f} img/s; weights, config.json, metrics.json, curves.png in "
        f"{result.run}"
    )


# data, predictions, evaluation -------------------------------------------------------------------------------------
def inspected(report) -> None:  # report: pipeline.inspect_data.InspectReport
    table = Table(title=f"{report.data_dir} ({report.layout})")
    table.add_column("split")
    names = report.classes or ["(unlabelled)"]
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("total", justify="right")
    table.add_column("balance", justify="right")
    for split, counts in report.splits.items():
        cells = [str(counts.classes.get(c, 0)) for c in names]
        table.add_row(split, *cells, str(counts.images), str(counts.balance))
    out.print(table)
    w, h = report.width, report.height
    if w:
        say(
            f"sizes: width {w.min}-{w.max} (median {w.median}), height {h.min}-{h.max} (median {h.median}); "
            f"formats {report.formats}; modes {report.modes}"
        )
    for bad in report.unreadable:
        say(f"[yellow]unreadable[/] {bad.path}: {bad.reason}", err)
    for same in report.duplicates:
        kind = "[red]leak[/] (same file in " + " and ".join(same.splits) + ")" if len(same.splits) > 1 else "duplicate"
        say(f"{kind}: {', '.join(same.paths)}", err)
    say(
        f"{len(report.unreadable)} unreadable, {len(report.duplicates)} duplicate groups, {len(report.leaks)} leaks; "
        f"samples: {report.contact_sheet}"
    )


def predicted(result, top_k: int, tta: bool, out_file: Path | None) -> None:  # pipeline.evaluate.PredictResult
    if result.precision_note:
        note(result.precision_note)
    if out_file is None:
        _prediction_table(result, top_k, tta)
    elif result.errors:  # every input is in the file: the terminal says how many could not be read
        count = f"{len(result.errors)} file{'s' * (len(result.errors) > 1)}"
        say(f"{count} could not be read: the reasons are in {out_file}", err)
    unfamiliar = f", {result.unfamiliar} unlike the training images (unfamiliar)" if result.unfamiliar else ""
    speed = f" ({result.images_per_second} img/s)" if result.images_per_second else ""
    say(
        f"{len(result.predictions)} images in {result.seconds:.1f} s{speed}{unfamiliar}"
        + (f"; every input in {result.out}" if result.out else "")
    )


def _prediction_table(result, top_k: int, tta: bool) -> None:
    """predict's table: a row per image, then a line per file that could not be read."""
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
        for column in columns + shown_set:
            table.add_column(column, justify="right" if column.endswith(("probability", "familiarity")) else "left")
        for r in result.predictions:
            top = ", ".join(f"{c} {p:.3f}" for c, p in r["top_k"]) if top_k > 1 else f"{r['probability']:.4f}"
            extra = (r["tta_class"], f"{r['tta_probability']:.4f}") if tta else ()
            chosen = (" ".join(r["set"]),) if shown_set else ()
            table.add_row(r["path"], r["class"], top, *extra, *_familiar_cell(r), *chosen)
    out.print(table)
    for e in result.errors:
        say(f"[yellow]unreadable[/] {e['path']}: {e['error']}", err)


def _familiar_cell(row: dict) -> tuple[str, ...]:
    """An image's familiarity, marked when it is under the model's threshold (stages.familiarity)."""
    if "familiarity" not in row:
        return ()
    return (f"{row['familiarity']:.3f}" + (" unfamiliar" if row["unfamiliar"] else ""),)


def _task_cell(row: dict, prefix: str) -> str:
    """A multi-label prediction's labels with their probabilities, or a numeric one's value."""
    if f"{prefix}value" in row:
        return f"{row[f'{prefix}value']:.4g}"
    probabilities = row[f"{prefix}probabilities"]
    return ", ".join(f"{c} {probabilities[c]:.3f}" for c in row[f"{prefix}labels"]) or "(none)"


def evaluated(result, tta: bool, cached: bool) -> None:  # pipeline.evaluate.EvaluateResult or TaskEvaluateResult
    if not hasattr(result, "precision_note"):  # a multi-label or numeric head
        _task_evaluated(result)
        return
    if result.precision_note:
        note(result.precision_note)
    m = result.metrics
    say(
        f"accuracy {m.accuracy:.4f}, log loss {m.log_loss:.4f}, calibration error {m.ece:.4f} "
        f"(ECE, {m.ece_bins} bins) on {m.images} images"
        f"{' with TTA' if tta else ''}{' from cached features' if cached else ''} in {result.seconds:.1f} s"
    )
    table = Table()
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, c in m.per_class.items():
        figures = [f"{c[k]:.4f}" if c[k] is not None else "undefined" for k in ("precision", "recall", "f1")]
        table.add_row(name, *figures, str(c["support"]))
    out.print(table)
    for pair in m.most_confused[:5]:
        say(f"most confused: {pair['true']} taken for {pair['predicted']} {pair['count']} times")
    if result.familiarity:
        _familiarity(result.familiarity)
    for row in result.coverage or ():
        say(
            f"prediction sets at {row['coverage']:.0%} coverage: {row['empirical']:.1%} hold the true class, "
            f"{row['mean_size']:.2f} classes on average"
        )
    selective = result.selective
    say(
        f"answering the most confident 90% / 95%: accuracy {selective['accuracy_at_90']:.4f} / "
        f"{selective['accuracy_at_95']:.4f} (risk_coverage.png)"
    )
    say(
        f"plots: {result.confusion_png}, {result.reliability_png}, {result.top_losses_png}; "
        f"metrics: {result.metrics_json}; every image: {result.predictions_csv}"
    )


def _familiarity(familiar) -> None:  # familiar: pipeline.evaluate.FamiliarityReport
    """evaluate's familiarity lines: how many evaluated images were flagged, and with --ood how well it separates."""
    say(
        f"familiarity: {familiar.unfamiliar} images ({familiar.unfamiliar_share:.1%}) under the threshold "
        f"{familiar.threshold:.3f} that {familiar.pass_share:.0%} of held-out training images pass"
    )
    ood = familiar.ood
    if ood:
        score, top = ood.familiarity, ood.top_probability
        say(
            f"against {ood.images} images of {ood.folder}: familiarity AUROC {score.auroc:.4f}, FPR95 "
            f"{score.fpr95:.4f} (top probability: {top.auroc:.4f}, {top.fpr95:.4f}); "
            f"{ood.confident:.1%} of them get p >= 0.9, {ood.confident_unflagged:.1%} of them unflagged"
        )


def _task_evaluated(result) -> None:  # result: pipeline.evaluate.TaskEvaluateResult
    m = result.metrics
    if result.task == "numeric":
        say(f"R² {m['r2']:.4f}, MAE {m['mae']:.4g}, RMSE {m['rmse']:.4g} on {result.images} images")
    else:
        say(
            f"mAP {m['map']:.4f}, micro F1 {m['micro_f1']:.4f}, macro F1 {m['macro_f1']:.4f}, subset accuracy "
            f"{m['subset_accuracy']:.4f} on {result.images} images"
        )
        for name, ap in m["per_class_ap"].items():
            shown = "no positive" if ap is None else f"AP {ap:.4f}"
            say(f"  {name}: {shown}, threshold {m['thresholds'][name]:.3f}")
        for row in m.get("coverage", ()):
            say(
                f"prediction sets at {row['coverage']:.0%} coverage: each class in the set of {row['empirical']:.1%} "
                f"of the images carrying it (lowest class {row['lowest_class']:.1%}), {row['mean_size']:.2f} "
                "classes on average"
            )
    say(f"plot: {result.plot_png}; metrics: {result.metrics_json}")


def audited(result) -> None:  # result: pipeline.audit.AuditResult
    copied = sum(g.count for g in result.copy_groups)
    say(
        f"{result.images} images ({result.labelled} labelled) of set {result.set} in {result.seconds:.1f} s: "
        f"{len(result.label_issues)} likely label issues, {len(result.copy_groups)} groups of copies or near-copies "
        f"({copied} images; {result.leak_groups} across train and valid/test), {len(result.outliers)} outliers"
    )
    table = Table(title="most likely label issues")
    for column in ("path", "given", "suggested", "label quality"):
        table.add_column(column, justify="right" if column == "label quality" else "left")
    for issue in result.label_issues[:10]:
        table.add_row(issue.path, issue.given, issue.suggested, f"{issue.score:.4f}")
    if result.label_issues:
        out.print(table)
    for g in result.copy_groups[:5]:
        paths = ", ".join(m.path for m in g.members[:3]) + (" ..." if g.count > 3 else "")
        say(f"{g.kind} copies ({g.count}){' (leak)' if g.leak else ''}: {paths}")
    for line in result.notes:
        note(line)
    say(
        f"pictures: {result.files['label_issues']}, {result.files['duplicates']}, {result.files['map']}; "
        f"CSVs and audit.json in {result.out}"
    )


def exported(result) -> None:  # result: pipeline.export.ExportResult
    say(
        f"wrote {result.out} ({human_bytes(result.bytes)}, {result.format}) in {result.seconds:.1f} s: "
        f"input {result.input}, output {result.output}; classes {', '.join(result.classes)}"
    )
    if result.precision_note:
        note(result.precision_note)
