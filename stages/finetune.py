"""Fine-tune: the backbone and a trained head as one model, trained end to end on live DALI-augmented images."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stages.atomic import atomic_output
from stages.backbones import Backbone
from stages.decode import Augmentation, ImageDecoder
from stages.errors import PipelineError
from stages.familiarity import Familiarity, familiarity_of
from stages.files import read_image_file
from stages.head import SINGLE, Head, make_scheduler, settle
from stages.ranks import Ranks
from stages.rundir import CHECKPOINT
from stages.settings import FinetuneConfig
from stages.tasks import Task

# Training images a fine-tuned model's familiarity reference is made of (a seeded sample; each is decoded and run
# through the fine-tuned backbone once more: about 40 s on 2 cores for this many).
FAMILIARITY_IMAGES = 4000


class FullModel(nn.Module):
    """Images to logits: the backbone's pooled features into the head (its standardization included)."""

    def __init__(self, backbone: nn.Module, head: Head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def layer_groups(model: FullModel) -> list[list[nn.Parameter]]:
    """Earliest first: the backbone's parameters in forward order split in two (stem and early blocks; later
    blocks), then the head."""
    body = list(model.backbone.body.parameters())
    half = len(body) // 2
    return [body[:half], body[half:], list(model.head.parameters())]


def group_learning_rates(lr: float, lr_mult: float, groups: int = 3) -> list[float]:
    """The head gets lr; earlier groups get geometrically less, down to lr / lr_mult for the earliest."""
    return [lr / lr_mult ** ((groups - 1 - i) / (groups - 1)) for i in range(groups)]


def trainable_groups(epoch: int, unfreeze: str, groups: int = 3) -> int:
    """How many groups (counted from the head back) train in an epoch: all; all but the earliest (late); or one
    more per epoch (gradual)."""
    if unfreeze == "late":
        return groups - 1
    return groups if unfreeze == "all" else min(groups, epoch + 1)


def set_trainable(groups: list[list[nn.Parameter]], count: int) -> None:
    for i, params in enumerate(groups):
        for p in params:
            p.requires_grad_(i >= len(groups) - count)


def freeze_batchnorm_statistics(model: nn.Module) -> None:
    """Keep every batch norm of the backbone in eval mode, so its running statistics never change."""
    for module in model.backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


class Diverged(Exception):
    """A training step's loss was not finite; the weights were not updated with it."""


def train_one_epoch(
    forward: nn.Module,
    optimizer,
    scheduler,
    batches,
    labels_of: Callable,
    params: list,
    clip: float,
    autocast,
    ranks: Ranks,
    label_smoothing: float = 0.0,
    task: Task = SINGLE,
) -> Iterator[float | None]:
    """The training steps of one epoch over decoded batches of augmented views; yields each step's loss (averaged
    over ranks; the task's, stages.tasks), None for a batch in which nothing decoded. Raises Diverged before
    applying a non-finite loss."""
    for batch in batches:
        loss_value = None
        if batch.keys:
            x = batch.images[:, 0].contiguous(memory_format=torch.channels_last)
            with autocast():
                out, y = forward(x).float(), labels_of(batch.keys)
                smoothed = task.name == "single" and label_smoothing
                loss = F.cross_entropy(out, y, label_smoothing=label_smoothing) if smoothed else task.loss(out, y)
            if not torch.isfinite(loss):
                raise Diverged(loss.item())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # under DDP the gradients arrive averaged over ranks: the global batch's
            nn.utils.clip_grad_norm_([p for p in params if p.requires_grad], clip)
            optimizer.step()
            loss_value = ranks.all_reduce([loss.item()])[0] / ranks.world
        scheduler.step()
        yield loss_value


@torch.no_grad()
def plain_logits(model: nn.Module, batches, labels_of: Callable, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's logits and the labels of decoded batches of the plain view (None when nothing decoded)."""
    model.eval()
    logits, labels = [], []
    for batch in batches:
        if batch.keys:
            labels.append(labels_of(batch.keys))
            with autocast():
                logits.append(model(batch.images[:, 0].contiguous(memory_format=torch.channels_last)).float())
    return (torch.cat(logits), torch.cat(labels)) if logits else (None, None)


def evaluate(model: nn.Module, batches, labels_of: Callable, autocast, ranks: Ranks) -> dict:
    """Loss and accuracy on decoded batches of the plain view, summed over ranks (another task: its loss and its
    primary figure, in one process)."""
    logits, y = plain_logits(model, batches, labels_of, autocast)
    task = model.head.task
    if task.name != "single":
        if logits is None:
            return {"valid_loss": math.nan, task.primary: math.nan}
        outputs = task.activation(logits).cpu().numpy()
        figures = task.metrics(outputs, y.cpu().numpy(), model.head.decision_thresholds())
        return {"valid_loss": task.loss(logits, y).item(), task.primary: figures[task.primary]}
    loss, correct, seen = 0.0, 0, 0
    if logits is not None:
        loss = F.cross_entropy(logits, y, reduction="sum").item()
        correct, seen = (logits.argmax(1) == y).sum().item(), len(y)
    loss, correct, seen = ranks.all_reduce([loss, correct, seen])
    return {"valid_loss": loss / max(1, seen), "accuracy": correct / max(1, seen)}


def save_checkpoint(path: Path, state: dict) -> Path:
    """Write a checkpoint (tensors and plain values) atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        torch.save(state, tmp)
    return path


class Finetuner:
    """A fine-tuning run: the model and optimizer, the epochs (train_one_epoch, evaluate), the best epoch kept,
    and a checkpoint at every epoch end and on Ctrl-C, from which a stopped run resumes exactly."""

    def __init__(
        self, backbone: Backbone, head: Head, cfg: FinetuneConfig, device: str, out: Path, ranks: Ranks = Ranks()
    ):
        cfg.validate()
        if cfg.batch_size % ranks.world:
            raise PipelineError(
                f"--batch-size {cfg.batch_size} is the global batch: give a multiple of the {ranks.world} ranks"
            )
        torch.manual_seed(cfg.seed)  # dropout draws: the same seed gives the same run
        self.cfg, self.device, self.out, self.ranks = cfg, device, out, ranks
        self.preprocessing = backbone.preprocessing
        self.model = FullModel(backbone.model.requires_grad_(True), head).to(device, memory_format=torch.channels_last)
        self.model.backbone.classifier.requires_grad_(False)  # the ImageNet classifier is carried, never used
        self.groups = layer_groups(self.model)
        rates = group_learning_rates(cfg.lr, cfg.lr_mult, len(self.groups))
        self.optimizer = torch.optim.AdamW(
            [{"params": g, "lr": r} for g, r in zip(self.groups, rates)], weight_decay=cfg.wd
        )
        self.scheduler = None
        self.epoch, self.step = 0, 0
        self.before: dict | None = None  # valid metrics before any training step
        self.history: list[dict] = []
        self.step_losses: list[float] = []
        self.best: dict | None = None  # with keep_best: the best epoch's metrics and weights
        self.forward = self.model  # under torchrun, a DistributedDataParallel wrapper of it
        self._wrapped_for = None  # the trainable groups the DDP wrapper was built for

    # Data --------------------------------------------------------------------------------------------
    def _batches(self, files: list[str], order, train: bool, epoch: int = 0):
        preprocessing = self.preprocessing
        if train and self.cfg.train_size:
            preprocessing = replace(
                preprocessing,
                size=self.cfg.train_size,
                resize=round(self.cfg.train_size * preprocessing.resize / preprocessing.size),
            )
        decoder = ImageDecoder(
            preprocessing,
            views=1 if train else 0,
            plain=not train,
            device=self.device,
            batch_size=self.cfg.batch_size // self.ranks.world,
            seed=self.cfg.seed,
            num_threads=1,
            augmentation=Augmentation(scale=(self.cfg.crop_area, 1.0)),
        )
        items = ((files[i], (lambda path=files[i]: read_image_file(Path(path))[0])) for i in order)
        return decoder.decode(items, epoch=epoch)

    def _labels_of(self, files: list[str], labels: np.ndarray) -> Callable:
        index = {f: i for i, f in enumerate(files)}
        return lambda keys: torch.as_tensor(labels[[index[k] for k in keys]], device=self.device)

    def epoch_order(self, files: list[str], epoch: int) -> list[int]:
        """The shuffled order of an epoch, from (seed, epoch) alone: a resumed run sees the same order."""
        return list(np.random.default_rng([self.cfg.seed, epoch]).permutation(len(files)))

    # Training ----------------------------------------------------------------------------------------
    def autocast(self):
        """The precision context of the forward pass: bf16 autocast when the run is bf16."""
        return torch.autocast(
            torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"
        )

    def _train_mode(self, epoch: int) -> None:
        trainable = trainable_groups(epoch, self.cfg.unfreeze, len(self.groups))
        set_trainable(self.groups, trainable)
        self.model.train()
        if not self.cfg.train_bn:
            freeze_batchnorm_statistics(self.model)
        if self.ranks.world > 1 and self._wrapped_for != trainable:
            # DDP registers the parameters that train when it is built: rebuilt when gradual unfreezing adds some.
            from torch.nn.parallel import DistributedDataParallel

            self.forward, self._wrapped_for = DistributedDataParallel(self.model), trainable

    def evaluate(self, files: list[str], labels: np.ndarray) -> dict:
        """Valid loss and accuracy on the plain view (each rank a strided share of the files)."""
        batches = self._batches(files, range(self.ranks.rank, len(files), self.ranks.world), train=False)
        return evaluate(self.model, batches, self._labels_of(files, labels), self.autocast, self.ranks)

    @torch.no_grad()
    def calibrate(
        self, files: list[str], labels: np.ndarray, train_files: list[str]
    ) -> tuple[float | list[float] | None, Familiarity | None]:
        """From one pass over images neither the head nor fine-tuning trained on (plain view, this process alone):
        the head's temperature, fitted on its logits, and the fine-tuned backbone's familiarity (stages.familiarity),
        its threshold from their features, its reference the features of a seeded sample of training images. (None,
        None), the temperature unchanged, when none of them decoded."""
        head = self.model.head
        kept = head.temperature.clone()
        head.temperature.fill_(1.0)
        held, logits, y = self._plain_pass(files, self._labels_of(files, labels))
        if logits is None:
            head.temperature.copy_(kept)
            return None, None
        settle(head, logits.cpu(), y.cpu())  # the temperature (and a multi-label head's thresholds)
        rng = np.random.default_rng(self.cfg.seed)
        sample = np.sort(rng.choice(len(train_files), min(FAMILIARITY_IMAGES, len(train_files)), replace=False))
        reference, _, _ = self._plain_pass([train_files[i] for i in sample])
        return head.temperature.tolist(), familiarity_of(reference, held) if reference is not None else None

    def _plain_pass(self, files: list[str], labels_of: Callable | None = None) -> tuple:
        """The backbone's features of the files' plain views (float32, on the CPU) and, given labels_of, the head's
        logits and the labels of the same images: (None, None, None) when nothing decoded."""
        self.model.eval()
        features, logits, labels = [], [], []
        for batch in self._batches(files, range(len(files)), train=False):
            if batch.keys:
                with self.autocast():
                    found = self.model.backbone(batch.images[:, 0].contiguous(memory_format=torch.channels_last))
                    if labels_of is not None:
                        logits.append(self.model.head(found).float())
                        labels.append(labels_of(batch.keys))
                features.append(found.float().cpu())
        if not features:
            return None, None, None
        return torch.cat(features), torch.cat(logits) if logits else None, torch.cat(labels) if labels else None

    def fit(
        self,
        train: tuple[list[str], np.ndarray],
        valid: tuple[list[str], np.ndarray] | None,
        on_epoch: Callable[[dict], None] | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> None:
        """Train from the current epoch and step to cfg.epochs, checkpointing at every epoch end and on Ctrl-C."""
        files, labels = train
        steps_per_epoch = math.ceil(len(files) / self.cfg.batch_size)
        if self.scheduler is None:
            self.scheduler = make_scheduler(self.optimizer, "onecycle", self.cfg.lr, steps_per_epoch * self.cfg.epochs)
        labels_of = self._labels_of(files, labels)
        params = [p for g in self.groups for p in g]
        while self.epoch < self.cfg.epochs:
            started = time.perf_counter()
            self._train_mode(self.epoch)
            order = self.ranks.share(self.epoch_order(files, self.epoch), self.cfg.batch_size, self.step)
            batches = self._batches(files, order, train=True, epoch=self.epoch)
            try:
                for loss in train_one_epoch(
                    self.forward,
                    self.optimizer,
                    self.scheduler,
                    batches,
                    labels_of,
                    params,
                    self.cfg.clip,
                    self.autocast,
                    self.ranks,
                    self.cfg.label_smoothing,
                    self.model.head.task,
                ):
                    if loss is not None:
                        self.step_losses.append(loss)
                    self.step += 1
                    if on_step:
                        on_step(self.step, steps_per_epoch)
            except Diverged as exc:  # the weights are about to be lost: keep the last checkpoint instead
                raise PipelineError(
                    f"fine-tuning diverged at epoch {self.epoch + 1}, step {self.step + 1} (loss {exc.args[0]}); "
                    f"lower --lr, or --resume {self.out} from the last epoch's checkpoint"
                ) from None
            except KeyboardInterrupt:
                self.save_checkpoint()
                raise
            row = {
                "epoch": self.epoch,
                "train_loss": float(np.mean(self.step_losses[-steps_per_epoch:])) if self.step_losses else float("nan"),
            }
            if valid is not None:
                row.update(self.evaluate(*valid))
            row["time"] = time.perf_counter() - started
            self.history.append(row)
            if self.cfg.keep_best and valid is not None:
                self.remember_if_best(self.epoch, row)
            self.epoch, self.step = self.epoch + 1, 0
            self.save_checkpoint()
            if on_epoch:
                on_epoch(row)

    def remember_if_best(self, epoch: int, metrics: dict) -> None:
        """Keep a copy of the weights when their valid accuracy (or the task's figure) is the best so far (ties:
        lower valid loss); epoch -1 is the model fine-tuning starts from."""
        best, primary = self.best, self.model.head.task.primary
        loss = metrics["valid_loss"] if math.isfinite(metrics["valid_loss"]) else float("inf")  # diverged: worst
        score = metrics[primary] if math.isfinite(metrics[primary]) else -math.inf
        if best is None or (score, -loss) > (best[primary], -best["valid_loss"]):
            self.best = {
                "epoch": epoch,
                primary: score,
                "valid_loss": loss,
                "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            }

    def restore_best(self) -> dict | None:
        """Load the kept weights (keep_best) and return their epoch and metrics; None without keep_best."""
        if self.best is None:
            return None
        self.model.load_state_dict(self.best["model"])
        return {k: v for k, v in self.best.items() if k != "model"}

    # Checkpoints -------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Model, optimizer, scheduler, position and RNG state (written by rank 0 alone)."""
        path = self.out / CHECKPOINT
        if self.ranks.rank != 0:
            return path
        return save_checkpoint(
            path,
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "epoch": self.epoch,
                "step": self.step,
                "torch_rng": torch.get_rng_state(),
                "history": self.history,
                "step_losses": self.step_losses,
                "before": self.before,
                "best": self.best,
                "config": self.cfg.to_dict(),
                "world_size": self.ranks.world,
            },
        )

    def restore(self, state: dict, steps_per_epoch: int) -> None:
        """Continue from a checkpoint written with this run's settings (see read_checkpoint)."""
        if state.get("world_size", 1) != self.ranks.world:
            raise PipelineError(
                f"the checkpoint was written by {state.get('world_size', 1)} processes; "
                f"resume with the same number (not {self.ranks.world})"
            )
        self.model.load_state_dict(state["model"])
        self.scheduler = make_scheduler(self.optimizer, "onecycle", self.cfg.lr, steps_per_epoch * self.cfg.epochs)
        self.scheduler.load_state_dict(state["scheduler"])
        # After the scheduler: building it resets each group's lr to the schedule's start.
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.history, self.step_losses = state["history"], state["step_losses"]
        self.before = state.get("before")
        self.best = state.get("best")


def read_checkpoint(directory: Path) -> dict:
    """A fine-tuning checkpoint (tensors and plain values only: loaded with weights_only=True)."""
    path = directory / CHECKPOINT
    if not path.is_file():
        raise PipelineError(f"{directory} has no {CHECKPOINT}; give a directory written by pipeline finetune")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PipelineError(
            f"{path} is damaged ({str(exc).splitlines()[0][:100]}); start again without --resume"
        ) from None
