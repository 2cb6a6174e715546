"""Dice: the metric and the loss of the segmentation pipelines, the Dice-per-epoch plot, the optional
TensorBoard log of the same history, and how a stage cell shows its figures and tables (`show`).

Dice = 2 |P n T| / (|P| + |T|) for a predicted mask P and a true mask T. It is undefined when both are
empty, and how a pipeline scores those images changes its figure a lot (about 60% of the nerve
ultrasound masks are empty), so the convention is always explicit here:

- `empty="one"`: an image whose truth is empty scores 1 if the prediction is empty too, else 0. This is
  the Kaggle nerve-segmentation metric, and MONAI's `DiceMetric(ignore_empty=False)`.
- `empty="skip"`: images whose truth is empty are left out of the mean (NaN per image). This is MONAI's
  default `DiceMetric(ignore_empty=True)`; it cannot see false positives on empty images.

`global_dice` sums intersections and volumes over a whole set before dividing, as nnU-Net's online
"pseudo Dice" during training does: large and small cases then weigh by their volume, and empty cases
cannot make it undefined. Results are reported as the mean over cases (nnU-Net's validation summary,
the challenges' leaderboards), with the pooled figure beside it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

import distributed

EMPTY_CONVENTIONS = ("one", "skip")


def _dice_terms(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: |P n T|, |P| + |T| and |T|, as float64, for binary masks shaped (B, ...)."""
    if pred.shape != target.shape:
        raise ValueError(f"Prediction and truth differ in shape: {tuple(pred.shape)} vs {tuple(target.shape)}")
    pred = pred.reshape(pred.shape[0], -1).bool()
    target = target.reshape(target.shape[0], -1).bool()
    intersection = (pred & target).sum(1, dtype=torch.float64)
    truth = target.sum(1, dtype=torch.float64)
    return intersection, pred.sum(1, dtype=torch.float64) + truth, truth


def _per_image(intersection: torch.Tensor, total: torch.Tensor, truth: torch.Tensor, empty: str) -> torch.Tensor:
    if empty not in EMPTY_CONVENTIONS:
        raise ValueError(f"empty must be one of {EMPTY_CONVENTIONS}, not {empty!r}")
    dice = 2 * intersection / total.clamp(min=1)
    if empty == "one":
        return torch.where(total > 0, dice, torch.ones_like(dice))  # nothing to find, nothing found
    return torch.where(truth > 0, dice, torch.full_like(dice, math.nan))


def dice_per_image(pred: torch.Tensor, target: torch.Tensor, empty: str = "one") -> torch.Tensor:
    """Dice of each image of a batch of binary masks (B, ...) -> float64 (B,); see the module for `empty`.

    Threshold first (`logits > 0`): Dice of soft values is a loss, not this metric.
    """
    return _per_image(*_dice_terms(pred, target), empty)


def mean_dice(pred: torch.Tensor, target: torch.Tensor, empty: str = "one") -> float:
    """Mean over the images of a batch of their Dice; skipped images (NaN) are left out."""
    return torch.nanmean(dice_per_image(pred, target, empty)).item()


def global_dice(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Dice of a whole set at once: 2 sum|P n T| / sum(|P| + |T|); 1.0 when there is nothing anywhere."""
    intersection, total, _ = _dice_terms(pred, target)
    return _global(intersection.sum().item(), total.sum().item())


def _global(intersection: float, total: float) -> float:
    return 2 * intersection / total if total > 0 else 1.0


class DiceAccumulator:
    """Collects Dice over the batches of one validation pass; read `mean()` and `global_dice()` at the end.

    acc = DiceAccumulator(empty="one")
    for batch in val_loader:
        acc.update(model(img) > 0, seg)
    history.append({"val_dice": acc.mean(), "val_global_dice": acc.global_dice()})
    """

    def __init__(self, empty: str = "one"):
        if empty not in EMPTY_CONVENTIONS:
            raise ValueError(f"empty must be one of {EMPTY_CONVENTIONS}, not {empty!r}")
        self.empty = empty
        self._terms: list[torch.Tensor] = []  # one (3, B) tensor per batch, kept on the CPU

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self._terms.append(torch.stack(_dice_terms(pred, target)).cpu())

    @classmethod
    def merge(cls, parts: list[DiceAccumulator]) -> DiceAccumulator:
        """One accumulator holding the images of all `parts`, in order: e.g. the shares of the validation set that
        several processes scored (distributed.gather_dice). Its mean() and global_dice() are those of the whole
        set, since each image keeps its own 3 numbers (|P n T|, |P| + |T|, |T|), not a running average."""
        if not parts:
            raise ValueError("nothing to merge")
        conventions = {part.empty for part in parts}
        if len(conventions) > 1:
            raise ValueError(f"cannot merge accumulators of different empty conventions: {sorted(conventions)}")
        merged = cls(empty=parts[0].empty)
        for part in parts:
            merged._terms.extend(part._terms)
        return merged

    def per_image(self) -> torch.Tensor:
        """Dice of every image seen so far, in order (NaN for skipped ones)."""
        if not self._terms:
            return torch.empty(0, dtype=torch.float64)
        return _per_image(*torch.cat(self._terms, dim=1), self.empty)

    def mean(self) -> float:
        """Mean per-image Dice (skipped images left out); NaN before any update or if all were skipped."""
        scores = self.per_image()
        return torch.nanmean(scores).item() if scores.numel() else math.nan

    def global_dice(self) -> float:
        if not self._terms:
            return math.nan
        intersection, total, _ = torch.cat(self._terms, dim=1).sum(dim=1)
        return _global(intersection.item(), total.item())


# %% Uncertainty: a held-out score with its 95% bootstrap interval
# A test set of 20-40 cases gives a mean that moves by several points with the cases drawn; a score without its
# interval cannot say whether one model beats another. The percentile bootstrap (Efron & Tibshirani 1993) redraws
# the cases with replacement and reads the interval off the redrawn means. Where several images come from one
# patient (nerve frames of one subject) they are not independent: whole patients are redrawn (a cluster
# bootstrap), which widens the interval as it should. scipy.stats.bootstrap does the plain case (tests compare
# with it) but has no clusters.


def bootstrap_ci(
    values: Sequence[float],
    groups: Sequence | None = None,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` (NaN left out) and its percentile bootstrap interval.

    `groups` (one label per value, e.g. the patient) makes each draw take whole groups; the statistic stays the
    mean over values, as the challenges' per-image means are. low and high are NaN with fewer than 2 groups."""
    values = np.asarray(values, dtype=np.float64)
    labels = np.arange(len(values)) if groups is None else np.asarray(groups)
    if len(labels) != len(values):
        raise ValueError(f"{len(values)} values but {len(labels)} group labels")
    keep = ~np.isnan(values)
    values, labels = values[keep], labels[keep]
    mean = float(values.mean()) if len(values) else math.nan
    _, index = np.unique(labels, return_inverse=True)
    n = int(index.max()) + 1 if len(index) else 0
    if n < 2:
        return mean, math.nan, math.nan
    sums = np.bincount(index, weights=values, minlength=n)  # per group: drawing a group draws all its values
    counts = np.bincount(index, minlength=n).astype(np.float64)
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, resamples, 1000):  # 1,000 redraws at a time: 5,000 nerve frames x 10,000 would be 400 MB
        draws = rng.integers(0, n, size=(min(1000, resamples - start), n))
        means.append(sums[draws].sum(axis=1) / counts[draws].sum(axis=1))
    low, high = np.quantile(np.concatenate(means), [(1 - confidence) / 2, (1 + confidence) / 2])
    return mean, float(low), float(high)


def describe_ci(values: Sequence[float], groups: Sequence | None = None, unit: str = "cases", digits: int = 4) -> str:
    """A held-out score as the summaries and the README give it: "0.8123 (95% CI 0.7801-0.8420, 40 cases)"."""
    mean, low, high = bootstrap_ci(values, groups)
    n = int(np.sum(~np.isnan(np.asarray(values, dtype=np.float64))))
    if groups is not None:
        k = len(set(np.asarray(groups)[~np.isnan(np.asarray(values, dtype=np.float64))]))
        unit += f" of {k} patient{'' if k == 1 else 's'}"
    if math.isnan(low):
        return f"{mean:.{digits}f} ({n} {unit.removesuffix('s') if n == 1 else unit}: too few for an interval)"
    return f"{mean:.{digits}f} (95% CI {low:.{digits}f}-{high:.{digits}f}, {n} {unit})"


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    smooth: float = 1e-5,
    batch: bool = False,
) -> torch.Tensor:
    """1 - soft Dice of sigmoid(logits) against binary targets, both (B, C, *spatial); mean over (B, C).

    Computed in float32 even inside an autocast (AMP) region: sums over a whole volume in float16 or
    bfloat16 lose the small lesions this loss is meant to see. `batch=True` sums over the batch too
    (each image then weighs by its volume, and images with empty truth do not each add a loss of ~1).
    Same definition as `monai.losses.DiceLoss(sigmoid=True, smooth_nr=smooth, smooth_dr=smooth, batch=batch)`.
    """
    if logits.shape != target.shape:
        raise ValueError(f"Logits and target differ in shape: {tuple(logits.shape)} vs {tuple(target.shape)}")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        prob = torch.sigmoid(logits.float())
        target = target.float()
        dims = tuple(range(2, logits.ndim))
        if batch:
            dims = (0, *dims)
        intersection = (prob * target).sum(dims)
        denominator = prob.sum(dims) + target.sum(dims)
        return (1 - (2 * intersection + smooth) / (denominator + smooth)).mean()


class SoftDiceLoss(torch.nn.Module):
    """`soft_dice_loss` as a module, to sit beside `torch.nn.BCEWithLogitsLoss` in a model's loss."""

    def __init__(self, smooth: float = 1e-5, batch: bool = False):
        super().__init__()
        self.smooth, self.batch = smooth, batch

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return soft_dice_loss(logits, target, self.smooth, self.batch)


def plot_dice_history(
    dice: Sequence[float],
    path: str | Path,
    epochs: Sequence[int] | None = None,
    title: str = "Validation Dice per epoch",
    label: str = "validation Dice",
    ylabel: str = "Dice",
) -> int | None:
    """Write the Dice-per-epoch curve to the PNG `path`, best epoch marked; return that epoch (None if none).

    `epochs` defaults to 1, 2, ...; pass them when validation runs every few epochs. NaN values (epochs
    not validated) are left out. `ylabel` names another metric in 0..1 (pneumonia_detection's RSNA metric).
    The file is replaced atomically, so a viewer that reloads it during training never reads half a PNG.
    Uses a bare `Figure`, not pyplot: no window, no global state, any backend.
    """
    epochs = list(range(1, len(dice) + 1)) if epochs is None else list(epochs)
    if len(epochs) != len(dice):
        raise ValueError(f"{len(dice)} Dice values for {len(epochs)} epochs")
    points = [(e, float(d)) for e, d in zip(epochs, dice) if not math.isnan(float(d))]
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    best_epoch = None
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
        best_epoch, best = max(points, key=lambda p: p[1])  # the first epoch reaching the best value
        ax.plot([best_epoch], [best], marker="*", markersize=14, color="tab:red", linestyle="none",
                label=f"best {best:.4f} (epoch {best_epoch})")  # fmt: skip
        ax.legend(loc="lower right")
    ax.set(xlabel="epoch", ylabel=ylabel, title=title, ylim=(0, 1))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return best_epoch


def tensorboard_writer(enabled: bool, log_dir: str | Path):
    """A `torch.utils.tensorboard.SummaryWriter` writing to `log_dir` when `enabled`, else None.

    TensorBoard is optional (`pip install tensorboard`): asked for but not installed, this says so in one line
    and returns None, and the run goes on with its CSV history and PNG plot. Log one epoch with
    `log_epoch(writer, row, epoch)`; view with `tensorboard --logdir output`.
    """
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch imports it lazily; it needs the tensorboard package
        print("tensorboard=True but the tensorboard package is not installed (pip install tensorboard): not logging")
        return None
    return SummaryWriter(log_dir=str(log_dir))


def log_epoch(writer, row: dict, epoch: int) -> None:
    """Every number of one history row as a TensorBoard scalar at step `epoch` (nothing when `writer` is None)."""
    if writer is None:
        return
    for key, value in row.items():
        if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
            writer.add_scalar(key, value, epoch)
    writer.flush()  # visible in TensorBoard while training goes on


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write a matplotlib Figure to the PNG `path` (its folder made if missing), atomically: a viewer that reloads
    the file never reads half a PNG. Under torchrun, process 0 alone writes (its figure stands for all)."""
    path = Path(path)
    if not distributed.is_main():
        return path
    from checkpoints import save_atomically  # here: checkpoints imports this module

    save_atomically(path, lambda partial: fig.savefig(partial, format="png", bbox_inches="tight"))
    return path


def in_notebook() -> bool:
    """True in a Jupyter kernel, VS Code's Interactive window included; False from the command line."""
    ipython = sys.modules.get("IPython")  # never imported here: a kernel has it loaded already
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def show(item) -> None:
    """Show what a stage cell leaves to look at: a PNG (its path) inline in a notebook, named on a terminal; a
    table (a pandas DataFrame) rendered in a notebook, printed on a terminal (pandas shortens long ones)."""
    if isinstance(item, (str, Path)):
        if in_notebook():
            from IPython.display import Image, display

            display(Image(filename=str(item)))
        else:
            print(f"Figure: {item}")
    elif in_notebook():
        from IPython.display import display

        display(item)
    else:
        print(item)
