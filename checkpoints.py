"""Checkpoints that survive a kill, and resuming from them: shared by the five scripts.

Every file a script rewrites while it trains (checkpoints, history, plots, submissions) is written to a temporary
file in the same folder and renamed over the old one: a rename within a folder is atomic, so a crash, a kill or
a full disk at any moment leaves the previous file whole, and a viewer never reads half a file.

Each script keeps two checkpoints in its output folder: the best epoch by its validation metric (its own name,
e.g. `best_model.pt`), and `last_checkpoint.pt`, rewritten after every epoch with everything needed to go on
(weights, optimizer, scheduler, gradient scaler, history, configuration). `resume=True` in a script's
configuration continues from it up to `max_epochs`; the best metric so far is read from the best checkpoint
itself, since a kill may fall between the two saves of an epoch.

Training stops early on Ctrl-C and on a loss that is not finite (`EpochLoss` finds it), with one line
(`stop_message`) saying what is kept.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

LAST_CHECKPOINT = "last_checkpoint.pt"


def save_atomically(path: str | Path, write: Callable[[Path], object]) -> None:
    """`write(temporary path)` in `path`'s folder, then rename it over `path`."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    write(partial)
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
    state |= {"epoch": epoch, "history": history, "config": config_dict(cfg)}
    save_checkpoint(state, Path(output_dir) / LAST_CHECKPOINT)


def resume(output_dir: str | Path, device: torch.device, **parts) -> tuple[int, list[dict]]:
    """Load `last_checkpoint.pt` into each part; return (the first epoch still to train, the history so far).

    Without the file, says so and returns (1, []). A checkpoint of another network or optimizer than the parts
    given is one clear error, not PyTorch's list of missing keys.
    """
    path = Path(output_dir) / LAST_CHECKPOINT
    if not path.is_file():
        print(f"resume=True but {path} does not exist: starting at epoch 1")
        return 1, []
    state = torch.load(path, map_location=device, weights_only=True)
    try:
        for name, part in parts.items():
            part.load_state_dict(state[name])
    except (RuntimeError, ValueError, KeyError) as err:
        detail = str(err).strip().splitlines()[0][:200]
        raise ValueError(f"{path} was written with another configuration than this one: {detail}") from None
    print(f"Resuming from {path}: {state['epoch']} epoch(s) done")
    return state["epoch"] + 1, state["history"]


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
