"""What every script does around its recipe: the configuration, the epoch loop's bookkeeping, checkpoints that
survive a kill, resuming, and how training stops. Shared by the five scripts.

- `BaseConfig`: a script's `Config` dataclass holds the full recipe as its defaults, and the quick run as one dict
  of overrides below them (`QUICK_RUN`), applied by `Config(quick=True)` exactly as by `QUICK=1`.
- `TrainingRun`: the epoch loop's bookkeeping behind one `with` and one call per epoch, so that the loop reads
  like the recipe: the best checkpoint (`best_model.pt`, by the script's validation metric) and the last one
  (`last_checkpoint.pt`, everything needed to go on), the history (`history.csv`) and its plot, TensorBoard,
  resuming (`resume=True`), process 0 alone writing under torchrun, and the stop on Ctrl-C or on a loss that is
  not finite (`EpochLoss` finds it), with one line (`stop_message`) saying what is kept.
- Every file a script rewrites while it trains (checkpoints, history, plots, submissions) is written to a
  temporary file in the same folder and renamed over the old one: a rename within a folder is atomic, so a crash,
  a kill or a full disk at any moment leaves the previous file whole, and a viewer never reads half a file. The
  best metric so far is read from the best checkpoint itself, since a kill may fall between the two saves of an
  epoch.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import random
import runpy
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

import distributed
from dice import log_epoch, plot_dice_history, tensorboard_writer

BEST_MODEL = "best_model.pt"  # the weights of the best epoch by the validation metric, with their configuration
LAST_CHECKPOINT = "last_checkpoint.pt"  # everything after the last epoch done, to go on from (resume=True)
PREDICT = os.environ.get("PREDICT") or None  # PREDICT=<folder or file> python <script>.py: predict, no training
CHECKPOINT = os.environ.get("CHECKPOINT") or None  # ... with these weights (default: output_dir/best_model.pt)
RESUME = os.environ.get("RESUME", "0") == "1"  # RESUME=1 python <script>.py: go on from last_checkpoint.pt
README_PICTURES = os.environ.get("README_PICTURES", "0") == "1"  # README_PICTURES=1: rewrite the README's pictures
PREVIOUS = "previous"  # output_dir/previous/<time>/: an earlier run's outputs, moved there by a fresh run


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, another script's, or (resuming) another network's.
    From the command line it ends the run in one line, `Checkpoint problem: <message>` (one_line_data_problems)."""


class OutputError(OSError):
    """An output that cannot be written: the disk is full, or a plain file stands where output_dir (or a folder
    in it) should be. From the command line it ends the run in one line, `Output problem: <message>`."""


# %% The configuration
PATH_TYPES = (Path, Path | None, "Path", "Path | None")  # fields whose text values become paths


class BaseConfig:
    """The base of every script's `Config` dataclass: defaults that are the full recipe, and the quick run.

    `QUICK_RUN`, a class attribute, holds the quick run's settings. With `quick=True` (the default when `QUICK=1` is
    in the environment) they replace the defaults, except for the settings given explicitly, which always win:
    `Config(quick=True, max_epochs=5)` is the quick run with 5 epochs. `dataclasses.replace` gives every setting
    explicitly, so it changes what it names and nothing else. Fields typed `Path` also take strings.
    """

    QUICK_RUN: ClassVar[dict] = {}
    AS_TRAINED: ClassVar[tuple[str, ...]] = ()  # settings prediction takes from the checkpoint (`as_trained`)

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        self._given = set(names[: len(args)]) | set(kwargs)  # what the caller set: the quick run leaves it alone
        return self

    def __post_init__(self) -> None:
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(self.QUICK_RUN) - names)
        if unknown:
            raise TypeError(f"QUICK_RUN sets settings that Config does not have: {', '.join(unknown)}")
        if self.quick:
            for name, value in self.QUICK_RUN.items():
                if name not in getattr(self, "_given", ()):
                    setattr(self, name, value)
        for f in dataclasses.fields(self):
            if f.type in PATH_TYPES and isinstance(getattr(self, f.name), str):
                setattr(self, f.name, Path(getattr(self, f.name)))

    @classmethod
    def from_dict(cls, saved: dict):
        """The configuration saved in a checkpoint (`config_dict`), as this script's `Config`; settings this version
        of the script no longer has are left out, new ones take their defaults."""
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{name: value for name, value in saved.items() if name in names})

    def changes(self) -> dict:
        """The settings that differ from the full recipe's defaults, by name."""
        changed = {}
        for f in dataclasses.fields(self):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if f.name != "quick" and getattr(self, f.name) != default:
                changed[f.name] = getattr(self, f.name)
        return changed

    def describe(self) -> str:
        """One line: quick run or full recipe, and every setting that differs from the full recipe."""
        changed = ", ".join(f"{k}={str(v) if isinstance(v, Path) else repr(v)}" for k, v in self.changes().items())
        kind = "QUICK run" if self.quick else "the full recipe"
        return f"Configuration: {kind}" + (f", with {changed}" if changed else "")


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's random generators (the CPU's and every GPU's), from one seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# %% Files that survive a kill


def make_folder(folder: str | Path) -> Path:
    """`folder` and its parents, made where missing; a plain file in the way is an OutputError naming it."""
    folder = Path(folder)
    if folder.is_dir():  # a stat: far cheaper than mkdir's failing call, which costs 0.25 ms on some disks
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        in_the_way = next(part for part in [folder, *folder.parents] if part.exists() and not part.is_dir())
        raise OutputError(f"{in_the_way} is a file, where the folder {folder} is needed: move the file away, or "
                          "choose another output_dir") from None  # fmt: skip
    return folder


def disk_is_full(err: BaseException) -> bool:
    """True for a write that failed for want of space: OSError ENOSPC / EDQUOT, or torch.save's RuntimeError (its
    zip writer reports only "file write failed")."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(err, RuntimeError) and ("file write failed" in str(err) or "No space left" in str(err))


def save_atomically(path: str | Path, write: Callable[[Path], object]) -> None:
    """`write(temporary path)` in `path`'s folder (made if missing), then rename it over `path`. A write that fails
    removes its temporary file and leaves `path` as it was; a full disk is one OutputError naming the file."""
    path = Path(path)
    make_folder(path.parent)
    partial = path.with_name(f".{path.name}.partial")
    try:
        write(partial)
    except BaseException as err:  # Ctrl-C during a save too: no .partial left behind
        partial.unlink(missing_ok=True)
        if disk_is_full(err):
            free = shutil.disk_usage(path.parent).free / 2**20
            kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
            advice = "free some space (or choose another output_dir) and run again; resume=True goes on"
            raise OutputError(
                f"could not write {path}: the disk is full ({free:.0f} MiB free); {kept}; {advice}"
            ) from None
        raise
    os.replace(partial, path)


def save_checkpoint(state: dict, path: str | Path) -> None:
    """torch.save, atomically."""
    save_atomically(path, lambda partial: torch.save(state, partial))


def save_history(history: list[dict], path: str | Path) -> None:
    """The history (one dict per epoch) as a CSV with one column per key, atomically."""
    save_atomically(path, lambda partial: pd.DataFrame(history).to_csv(partial, index=False))


def config_dict(cfg) -> dict:
    """A dataclass configuration as plain values (paths as text), so that torch.load(weights_only=True) reads it."""
    return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(cfg).items()}


def save_last(output_dir: str | Path, epoch: int, history: list[dict], cfg, **parts) -> None:
    """`last_checkpoint.pt`: the state of each part (model=, optimizer=, scheduler=, scaler=...) after `epoch`."""
    state = {name: part.state_dict() for name, part in parts.items()}
    state |= {"epoch": epoch, "history": [dict(row) for row in history], "config": config_dict(cfg)}
    save_checkpoint(state, Path(output_dir) / LAST_CHECKPOINT)


def resume(output_dir: str | Path, device: torch.device, **parts) -> tuple[int, list[dict]]:
    """Load `last_checkpoint.pt` into each part; return (the first epoch still to train, the history so far).

    Without the file, says so and returns (1, []). A checkpoint of another network or optimizer than the parts
    given is one clear error (CheckpointError), not PyTorch's list of missing keys. A `scheduler` part is not
    loaded but fast-forwarded (`fast_forward`): its saved state would bring back the first run's schedule.
    """
    path = Path(output_dir) / LAST_CHECKPOINT
    if not path.is_file():
        print(f"resume=True but {path} does not exist: starting at epoch 1")
        return 1, []
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        for name, part in parts.items():
            if name != "scheduler":
                part.load_state_dict(state[name])
    except (RuntimeError, ValueError, KeyError, EOFError, OSError) as err:
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} was written with another configuration than this one: {detail}") from None
    if "scheduler" in parts:
        fast_forward(parts["scheduler"], state["epoch"])
    print(f"Resuming from {path}: {state['epoch']} epoch(s) done")
    return state["epoch"] + 1, state["history"]


def fast_forward(scheduler, epochs: int) -> None:
    """Set `scheduler` (built with this run's settings) and its optimizer's learning rates to where they are after
    `epochs` epochs of this run's schedule, one step per epoch. Resuming with another `max_epochs` (or lr) then
    follows the schedule a fresh run of that length would: a cosine's saved state would keep the first run's T_max
    (0.003, 0.0015, 0.0, then back up to 0.0015, measured)."""
    for group, base_lr in zip(scheduler.optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = group["initial_lr"] = base_lr
    scheduler.last_epoch = 0
    with warnings.catch_warnings():  # stepping before any optimizer.step() is the point here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(epochs):
            scheduler.step()


def best_so_far(path: str | Path) -> tuple[float, int]:
    """(metric, epoch) of the best checkpoint at `path`, or (-inf, 0) when there is none yet."""
    path = Path(path)
    if not path.is_file():
        return -math.inf, 0
    best = torch.load(path, map_location="cpu", weights_only=True)
    return float(best["metric"]), int(best["epoch"])


def stop_message(err: BaseException, output_dir: str | Path, history: list[dict], best_path: str | Path) -> str:
    """The one line said when training stops early: Ctrl-C (KeyboardInterrupt) or a loss that is not finite."""
    done = history[-1]["epoch"] if history else 0
    if isinstance(err, KeyboardInterrupt):
        return (
            f"Interrupted during epoch {done + 1}: {Path(output_dir) / LAST_CHECKPOINT} holds epoch {done}; "
            "run again with resume=True to go on from there"
        )
    _, best_epoch = best_so_far(best_path)
    return f"{err}. Kept: {f'{best_path} (epoch {best_epoch})' if best_epoch else 'no checkpoint yet'}"


# %% How training stops


class EpochLoss:
    """The mean training loss of an epoch, read back from the GPU one step late, and the stop at a loss that is not
    finite, with the epoch and batch it happened at.

    Reading a loss on the CPU (`.item()`, `if not torch.isfinite(loss)`) waits for the GPU to finish the step. Done
    at the end of each step, it leaves the GPU idle while the CPU prepares and queues the next one, which for small
    networks is much of the step. Read after the next step is queued, it costs nothing: the GPU has work meanwhile.
    So `add(step, ...)` checks the step before it, and `mean()` the last one. A loss that is not finite still stops
    training, named by its own batch; one more step has run by then, on weights already lost, and nothing of the
    epoch is saved. On the CPU the lag changes nothing but where the error is raised.

        losses = EpochLoss(epoch, cfg.lr, bar)
        for step, batch in enumerate(bar):
            ...
            losses.add(step, distributed.average(loss.detach()), len(img))  # under torchrun, all stop alike
            ...backward, optimizer step...
        return losses.mean()
    """

    def __init__(self, epoch: int, lr: float, bar=None):
        self.epoch, self.lr, self.bar = epoch, lr, bar
        self.names: tuple[str, ...] = ("loss",)
        self.sums: list[float] = []
        self.count = 0
        self.pending: tuple[int, torch.Tensor, int] | None = None

    def add(self, step: int, values: torch.Tensor, n: int, names: tuple[str, ...] | None = None) -> None:
        """Step `step`'s loss (a scalar), or the loss and its terms (a vector, with their `names`), the mean over
        `n` samples; checks the step before."""
        self.check()
        if names is not None:
            self.names = tuple(names)
        self.pending = (step, values.detach(), n)

    def check(self) -> None:
        """Read the pending step's loss (the one wait for the GPU), stop if it is not finite, else count it."""
        if self.pending is None:
            return
        (step, values, n), self.pending = self.pending, None
        values = values.float().reshape(-1).tolist()
        if not math.isfinite(values[0]):
            terms = ", ".join(f"{name} {value:.4g}" for name, value in zip(self.names[1:], values[1:]))
            raise FloatingPointError(
                f"Loss is {values[0]} at epoch {self.epoch}, batch {step}{f' ({terms})' if terms else ''}: stopping "
                f"(try a lower lr than {self.lr}, or amp=False)"
            )
        self.sums = [total + value * n for total, value in zip(self.sums or [0.0] * len(values), values)]
        self.count += n
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{values[0]:.3f}")

    def means(self) -> dict[str, float]:
        """The mean per sample of the loss and of each term, by name, over the steps added (the last one checked)."""
        self.check()
        return {name: total / max(self.count, 1) for name, total in zip(self.names, self.sums)}

    def mean(self) -> float:
        """The mean loss per sample over the steps added (NaN if none); checks the last one."""
        return self.means().get(self.names[0], math.nan)


# %% The epoch loop's bookkeeping


class History(list):
    """The history of a training run: one dict per epoch, as in history.csv. Also says which epoch was best (by
    the validation metric, resumed runs included) and, if training stopped early, why (`stopped`, the line said)."""

    metric: str = ""
    best_epoch: int = 0  # 0: no epoch validated yet
    best_metric: float = -math.inf
    stopped: str | None = None
    exit_status: int = 0  # what a stopped run ends with from the command line: 130 after Ctrl-C, 1 after a NaN

    def best(self) -> dict:
        """The history row of the best epoch."""
        return next(row for row in self if row["epoch"] == self.best_epoch)


class TrainingRun:
    """Everything an epoch loop does besides the recipe, behind one `with` and one call per epoch:

        with TrainingRun(cfg, "val_dice", model=model, optimizer=optimizer, scaler=scaler) as run:
            for epoch in run.epochs(train_loader):
                train_loss = train_one_epoch(train_model, train_loader, ...)
                run.end_epoch(train_loss=train_loss, **evaluate(model, val_loader, ...))
        history = run.history

    - `resume=True` in `cfg`: every part (model=, optimizer=, scheduler=, scaler=, the names of last_checkpoint.pt)
      is loaded from `output_dir/last_checkpoint.pt` and the epochs go on from there up to `max_epochs`; without it a
      run starts at epoch 1.
    - `epochs(loader)` yields the epochs still to train; under torchrun it deals `loader`'s shards anew each epoch.
    - `end_epoch(**metrics)` records the epoch's row (its number, the metrics, the learning rate it trained with,
      its seconds), prints it on one line, and in process 0 only: `best_model.pt` when `metric` improved (the
      model's weights, the configuration, the epoch, the metric, the whole row: a threshold chosen on validation
      is there), `history.csv`, the metric's plot, TensorBoard (`tensorboard=True`), `last_checkpoint.pt`. An
      epoch without `metric` (not validated) or with NaN is never the best.
    - Ctrl-C (Interrupt in a notebook) or a loss that is not finite (FloatingPointError, from EpochLoss) ends the
      `with` block with one line saying what is kept; `history.stopped` holds it. Any other error goes through.
    """

    def __init__(self, cfg, metric: str, *, plot: str = "dice_per_epoch.png", title: str = "", ylabel: str = "Dice",
                 **parts):  # fmt: skip
        self.cfg, self.metric, self.parts = cfg, metric, parts
        self.plot, self.title, self.ylabel = plot, title or f"Validation {ylabel} per epoch", ylabel
        self.output_dir = Path(cfg.output_dir)
        self.best_path = self.output_dir / BEST_MODEL
        self.history = History()
        self.history.metric = metric
        self.first_epoch, self.writer = 1, None

    def __enter__(self) -> TrainingRun:
        make_folder(self.output_dir)
        if not self.cfg.resume and distributed.is_main():
            keep_previous_run(self.output_dir)  # a fresh run never overwrites an earlier one's model
        if self.cfg.resume:
            device = next(self.parts["model"].parameters()).device
            self.first_epoch, history = resume(self.output_dir, device, **self.parts)
            self.history.extend(history)
            self.history.best_metric, self.history.best_epoch = best_so_far(self.best_path)
        self.writer = tensorboard_writer(
            self.cfg.tensorboard and distributed.is_main(), self.output_dir / "tensorboard"
        )
        return self

    def epochs(self, loader=None) -> Iterator[int]:
        for epoch in range(self.first_epoch, self.cfg.max_epochs + 1):
            if loader is not None:
                distributed.set_epoch(loader, epoch)  # under torchrun: new shards for this epoch
            optimizer = self.parts.get("optimizer")
            self.epoch, self.lr = epoch, optimizer.param_groups[0]["lr"] if optimizer is not None else None
            self.start = time.perf_counter()
            yield epoch

    def end_epoch(self, **metrics) -> dict:
        row = {"epoch": self.epoch, **metrics}
        if self.lr is not None:
            row["lr"] = self.lr
        row["seconds"] = time.perf_counter() - self.start
        self.history.append(row)
        columns = list(dict.fromkeys(key for other in self.history for key in other))
        columns.sort(key=lambda key: key in ("lr", "seconds"))  # those two last, the metrics in the order they came
        for other in self.history:  # every row with every column, in one order (NaN where an epoch did not validate)
            ordered = {key: other.get(key, math.nan) for key in columns}
            other.clear()
            other.update(ordered)
        value = float(row.get(self.metric, math.nan))
        is_best = not math.isnan(value) and value > self.history.best_metric  # the same in every process
        if is_best:
            self.history.best_metric, self.history.best_epoch = value, self.epoch
        if distributed.is_main():  # one process writes; the others hold the same weights and history
            self.save(row, is_best)
        print(epoch_line(row, self.cfg.max_epochs) + ("  *best*" if is_best else ""))
        return row

    def save(self, row: dict, is_best: bool) -> None:
        if is_best:
            best = {"model": self.parts["model"].state_dict(), "config": config_dict(self.cfg), "epoch": self.epoch}
            best |= {"metric": row[self.metric], "metric_name": self.metric, "metrics": row}
            save_checkpoint(best, self.best_path)
        save_history(self.history, self.output_dir / "history.csv")
        values = [row.get(self.metric, math.nan) for row in self.history]
        plot_dice_history(values, self.output_dir / self.plot, [row["epoch"] for row in self.history], self.title,
                          label=f"validation {self.ylabel}", ylabel=self.ylabel)  # fmt: skip
        log_epoch(self.writer, {key: value for key, value in row.items() if not _is_nan(value)}, self.epoch)
        save_last(self.output_dir, self.epoch, self.history, self.cfg, **self.parts)

    def __exit__(self, kind, err, trace) -> bool:
        if self.writer is not None:
            self.writer.close()
        if isinstance(err, (KeyboardInterrupt, FloatingPointError)):
            self.history.stopped = stop_message(err, self.output_dir, self.history, self.best_path)
            self.history.exit_status = 130 if isinstance(err, KeyboardInterrupt) else 1
            print(self.history.stopped)
            return True  # handled: the epoch under way is dropped, the checkpoints on disk are kept
        return False


# What the Data and Transforms cells write before training: they describe this run's data (re-run or not), so a
# fresh run copies them with the earlier run's outputs and leaves them in place.
BEFORE_TRAINING = ("batch.png", "contradictory_pairs.csv", "skipped_cases.csv", "skipped.csv")


def keep_previous_run(output_dir: Path) -> Path | None:
    """A fresh run (not a resume) in an output_dir that holds an earlier run's model moves that run's outputs to
    output_dir/previous/<time>/ and says so in one line: a 2-epoch try must not replace a 20-epoch best_model.pt
    without a word. Returns the folder they went to (None if there was no earlier run)."""
    if not any((output_dir / name).exists() for name in (BEST_MODEL, LAST_CHECKPOINT, "history.csv")):
        return None
    ended = max((output_dir / name).stat().st_mtime for name in (BEST_MODEL, LAST_CHECKPOINT, "history.csv")
                if (output_dir / name).exists())  # fmt: skip
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(ended))  # when that run saved its last epoch
    target = output_dir / PREVIOUS / stamp
    for n in range(2, 100):
        if not target.exists():
            break
        target = output_dir / PREVIOUS / f"{stamp}_{n}"
    make_folder(target)
    for entry in sorted(output_dir.iterdir()):
        if entry.name == PREVIOUS or entry.name.endswith(".partial"):
            continue
        if entry.name in BEFORE_TRAINING:
            shutil.copy2(entry, target / entry.name)
        else:
            os.replace(entry, target / entry.name)  # within one folder tree: a rename, nothing copied
    print(f"An earlier run's outputs in {output_dir} were moved to {target} (this is a fresh run; resume=True would "
          "have gone on from it)")  # fmt: skip
    return target


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def epoch_line(row: dict, max_epochs: int) -> str:
    """`epoch   3/20  train_loss 0.4521  val_dice 0.8123 ...  1.2 s`: every number of a history row but its
    learning rate, NaN (not validated) left out."""
    values = []
    for key, value in row.items():
        if key in ("epoch", "lr", "seconds") or _is_nan(value) or not isinstance(value, (int, float)):
            continue
        values.append(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}")
    return f"epoch {row['epoch']:3d}/{max_epochs}  " + "  ".join(values) + f"  {row['seconds']:.1f} s"


def end_if_stopped(history: History) -> None:
    """A run that stopped early ends here, before the stages that would evaluate or predict with it: from the
    command line with exit status 130 after Ctrl-C (as a shell's own Ctrl-C), 1 after a loss that was not finite,
    so that `python a.py && python b.py` stops too; in a notebook, Run All stops at this cell (SystemExit) and the
    kernel keeps everything. The checkpoints are on disk: `resume=True` goes on. A run none of whose epochs gave a
    finite validation metric has no best epoch to evaluate: it ends here too, saying so."""
    if history.stopped:
        raise SystemExit(history.exit_status)
    if not history.best_epoch:
        print(f"No epoch of {len(history)} gave a finite {history.metric}: no best model to evaluate or predict with")
        raise SystemExit(1)


def read_checkpoint(path: str | Path, cfg, device: torch.device) -> dict:
    """The best-model checkpoint at `path`, checked to be one of this script's: it holds weights and the
    configuration they were trained with, and that configuration has this script's settings. Raises
    CheckpointError with one line saying what is wrong, never a traceback from inside torch.load."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{path} not found: train first (the Train cell), or set checkpoint= to a best_model.pt")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # torch raises several kinds on a damaged file, a zip of something else, a pickle
        problem = f"not a file torch.save wrote, or a damaged one ({type(err).__name__})"
        raise CheckpointError(f"{path} cannot be read as a checkpoint: {problem}") from None
    if not isinstance(checkpoint, dict) or not {"model", "config"} <= checkpoint.keys():
        raise CheckpointError(f"{path} is not a best_model.pt of these scripts (no weights with their configuration)")
    names = {f.name for f in dataclasses.fields(type(cfg))}
    lacking = sorted(name for name in type(cfg).AS_TRAINED if name not in checkpoint["config"])
    foreign = sorted(set(checkpoint["config"]) - names)
    if lacking or len(foreign) > len(names) // 4:  # a few settings renamed since: still this script
        raise CheckpointError(
            f"{path} was written by another script: it lacks {', '.join(lacking[:4]) or 'none of'} this script's "
            f"settings and has {', '.join(foreign[:4]) or 'no'} other ones"
        )
    return checkpoint


def load_best(cfg, build_model: Callable, device: torch.device, path: str | Path | None = None):
    """(the model of `path` (default: output_dir/best_model.pt) in eval mode on `device`, the checkpoint). The
    network is built with the configuration it was trained with, saved beside its weights, whatever `cfg` says now."""
    path = Path(path) if path is not None else Path(cfg.output_dir) / BEST_MODEL
    checkpoint = read_checkpoint(path, cfg, device)
    model = build_model(type(cfg).from_dict(checkpoint["config"])).to(device)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        detail = str(err).strip().splitlines()[0][:160]
        message = f"{path}: its weights do not fit the network of its own configuration ({detail})"
        raise CheckpointError(message) from None
    return model.eval(), checkpoint


def as_trained(cfg, checkpoint: dict):
    """`cfg` with the settings the checkpoint's network was trained with for those in `AS_TRAINED` (voxel size,
    window, image size, threshold...): a network has only learnt to read inputs prepared as in its training, whatever
    `cfg` says now (a Predict cell run in a fresh kernel, or after an inline edit)."""
    saved = checkpoint["config"]
    return dataclasses.replace(cfg, **{name: _as_tuples(saved[name]) for name in cfg.AS_TRAINED})


def _as_tuples(value):
    """Lists (as a configuration may come back from a file) as the tuples the Config fields hold."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def load_trained(cfg, build_model: Callable, device: torch.device):
    """What a Predict cell needs: (the trained model in eval mode, `cfg` with the settings it was trained with
    (`as_trained`), the checkpoint). The weights are `cfg.checkpoint` where set, else output_dir/best_model.pt."""
    path = getattr(cfg, "checkpoint", None) or Path(cfg.output_dir) / BEST_MODEL
    model, checkpoint = load_best(cfg, build_model, device, path)
    trained = as_trained(cfg, checkpoint)
    settings = ", ".join(f"{name}={getattr(trained, name)!r}" for name in cfg.AS_TRAINED)
    print(f"Predicting with {path} (epoch {checkpoint['epoch']}, {checkpoint['metric_name']} "
          f"{checkpoint['metric']:.4f}{', a QUICK run' if trained.quick else ''}): {settings}")  # fmt: skip
    return model, trained, checkpoint


def predict_only(script: str | Path) -> None:
    """`PREDICT=<folder or file> python <script>.py`: the script's Predict cell alone, with the trained model, then
    exit. The script is run again as a module (`runpy`): that defines every stage and runs no cell's guard, as a
    fresh kernel running Imports, Configuration and Predict would; its `cfg` reads PREDICT (and CHECKPOINT) from
    the environment. Exit status 1 when nothing could be predicted."""
    stages = runpy.run_path(str(script), run_name="predict_only")
    written = stages["predict"](stages["cfg"], stages["cfg"].predict_inputs)
    sys.exit(0 if written or not distributed.is_main() else 1)  # under torchrun process 0 alone predicts


def run_summary(cfg, data, history: History, best: str, outputs: list[str], pictures=()) -> str:
    """The lines a script ends with: the data it used (real or synthetic, counts), the best epoch, every output."""
    seconds = sum(row["seconds"] for row in history)
    lines = [
        f"\nSummary ({'QUICK run, ' if cfg.quick else ''}{len(history)} epochs, {seconds:.0f} s of training)",
        f"  data:    {data}",
        f"  best:    epoch {history.best_epoch} of {len(history)}, {best}",
        f"  outputs: {Path(cfg.output_dir)}/ {', '.join(outputs)}",
    ]
    return "\n".join(lines + [f"  picture: {picture}" for picture in pictures])


def readme_pictures(cfg, data, names: dict[str, str]) -> list[Path]:
    """Copy figures of output_dir to images_dir for the README ({output name: picture name}), from a run on the
    synthetic sample only: pictures of real patients never land in a folder of the repository. Process 0 only, and
    only with README_PICTURES=1 (or checkpoints.README_PICTURES = True): the pictures are tracked files, and a quick
    run must leave `git status` clean."""
    if not data.synthetic or not distributed.is_main() or not README_PICTURES:
        return []
    make_folder(cfg.images_dir)
    pictures = [Path(cfg.images_dir) / picture for picture in names.values()]
    for name, picture in zip(names, pictures):
        figure = (Path(cfg.output_dir) / name).read_bytes()
        save_atomically(picture, lambda partial: partial.write_bytes(figure))  # noqa: B023 (called at once)
    return pictures
