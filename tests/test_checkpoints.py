"""checkpoints.py: atomic writes, the last-epoch checkpoint, resuming from it, and the line said on an early stop."""

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from checkpoints import (
    LAST_CHECKPOINT,
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
