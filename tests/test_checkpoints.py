"""checkpoints.py: atomic writes, the last-epoch checkpoint, resuming from it, the line said on an early stop, and
the epoch's training loss read one step late (EpochLoss)."""

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from checkpoints import (
    LAST_CHECKPOINT,
    EpochLoss,
    best_so_far,
    config_dict,
    resume,
    save_atomically,
    save_checkpoint,
    save_history,
    save_last,
    stop_message,
)


@dataclass
class TinyConfig:
    output_dir: Path = Path("out")
    lr: float = 0.1


def test_a_write_that_fails_midway_leaves_the_previous_file_whole(tmp_path):
    path = tmp_path / "history.csv"
    save_atomically(path, lambda partial: partial.write_text("epoch\n1\n"))

    def crash(partial):
        partial.write_text("epo")  # half written...
        raise OSError("disk full")  # ...then the failure

    with pytest.raises(OSError, match="disk full"):
        save_atomically(path, crash)
    assert path.read_text() == "epoch\n1\n"
    save_history([{"epoch": 1, "val_dice": 0.5}, {"epoch": 2, "val_dice": 0.25}], path)
    assert path.read_text() == "epoch,val_dice\n1,0.5\n2,0.25\n"


def test_save_last_then_resume_restores_every_part_and_the_history(tmp_path, capsys):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()  # the optimizer now has moments to restore
    history = [{"epoch": 1, "val_dice": 0.5}, {"epoch": 2, "val_dice": 0.6}]
    save_last(tmp_path, 2, history, TinyConfig(output_dir=tmp_path), model=model, optimizer=optimizer)
    state = torch.load(tmp_path / LAST_CHECKPOINT, weights_only=True)
    assert state["config"] == {"output_dir": str(tmp_path), "lr": 0.1} and state["epoch"] == 2

    fresh = torch.nn.Linear(3, 1)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.1)
    first_epoch, restored = resume(tmp_path, torch.device("cpu"), model=fresh, optimizer=fresh_optimizer)
    assert (first_epoch, restored) == (3, history)
    assert f"Resuming from {tmp_path / LAST_CHECKPOINT}: 2 epoch(s) done" in capsys.readouterr().out
    torch.testing.assert_close(fresh.state_dict(), model.state_dict())
    moments = fresh_optimizer.state_dict()["state"][0]["exp_avg"]
    torch.testing.assert_close(moments, optimizer.state_dict()["state"][0]["exp_avg"])

    with pytest.raises(ValueError, match=f"{LAST_CHECKPOINT} was written with another configuration than this one"):
        resume(tmp_path, torch.device("cpu"), model=torch.nn.Linear(4, 1))
    assert resume(tmp_path / "elsewhere", torch.device("cpu"), model=fresh) == (1, [])
    assert "does not exist: starting at epoch 1" in capsys.readouterr().out


def test_best_so_far_and_the_stop_lines(tmp_path):
    best_path = tmp_path / "best_model.pt"
    assert best_so_far(best_path) == (-math.inf, 0)
    assert stop_message(FloatingPointError("Loss is nan at epoch 1, batch 0"), tmp_path, [], best_path) == (
        "Loss is nan at epoch 1, batch 0. Kept: no checkpoint yet"
    )
    save_checkpoint({"metric": 0.75, "epoch": 3}, best_path)
    assert best_so_far(best_path) == (0.75, 3)
    history = [{"epoch": e} for e in (1, 2, 3, 4)]
    assert stop_message(FloatingPointError("Loss is inf at epoch 5, batch 2"), tmp_path, history, best_path) == (
        f"Loss is inf at epoch 5, batch 2. Kept: {best_path} (epoch 3)"
    )
    assert stop_message(KeyboardInterrupt(), tmp_path, history, best_path) == (
        f"Interrupted during epoch 5: {tmp_path / LAST_CHECKPOINT} holds epoch 4; "
        "run again with resume=True to go on from there"
    )
    assert config_dict(TinyConfig()) == {"output_dir": "out", "lr": 0.1}


def test_epoch_loss_is_the_mean_per_sample_read_one_step_late():
    losses = EpochLoss(epoch=2, lr=0.01)
    losses.add(0, torch.tensor(1.0), 4)
    assert losses.count == 0 and losses.pending is not None  # not read yet: the GPU may still be computing it
    losses.add(1, torch.tensor(4.0), 2)
    assert losses.count == 4  # step 0 read when step 1 came
    assert losses.mean() == pytest.approx((1.0 * 4 + 4.0 * 2) / 6)
    assert math.isnan(EpochLoss(epoch=1, lr=0.1).mean())  # no step at all


def test_epoch_loss_stops_at_a_loss_that_is_not_finite_naming_its_own_batch():
    losses = EpochLoss(epoch=3, lr=0.01)
    losses.add(0, torch.tensor(0.5), 2)
    losses.add(1, torch.tensor(float("nan")), 2)  # found when the next step comes, named as batch 1
    with pytest.raises(FloatingPointError) as caught:
        losses.add(2, torch.tensor(0.4), 2)
    assert str(caught.value) == "Loss is nan at epoch 3, batch 1: stopping (try a lower lr than 0.01, or amp=False)"
    last = EpochLoss(epoch=1, lr=0.005)
    names = ("train_loss", "loss_classifier", "loss_box_reg")
    last.add(0, torch.tensor([float("inf"), 0.25, float("inf")]), 1, names=names)  # the last step: found by mean()
    with pytest.raises(FloatingPointError, match=r"^Loss is inf at epoch 1, batch 0 \(loss_classifier 0.25, "
                       r"loss_box_reg inf\): stopping \(try a lower lr than 0.005, or amp=False\)$"):  # fmt: skip
        last.means()


def test_epoch_loss_means_each_term_by_name():
    losses = EpochLoss(epoch=1, lr=0.01)
    names = ("train_loss", "loss_classifier")
    losses.add(0, torch.tensor([3.0, 1.0]), 1, names=names)
    losses.add(1, torch.tensor([5.0, 2.0]), 1, names=names)
    assert losses.means() == {"train_loss": 4.0, "loss_classifier": 1.5}
