"""checkpoints.py: the configuration (full recipe, quick run), atomic writes, the last-epoch checkpoint, resuming from
it, the line said on an early stop, the epoch's training loss read one step late (EpochLoss), and the epoch loop's
bookkeeping (TrainingRun)."""

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import pandas as pd
import pytest
import torch

from checkpoints import (
    BEST_MODEL,
    LAST_CHECKPOINT,
    BaseConfig,
    EpochLoss,
    TrainingRun,
    best_so_far,
    config_dict,
    end_if_stopped,
    load_best,
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


# %% The configuration


@dataclass
class RecipeConfig(BaseConfig):
    output_dir: Path = Path("out")
    lr: float = 1e-3
    max_epochs: int = 100
    flips: bool = True
    resume: bool = False
    tensorboard: bool = False
    quick: bool = False

    QUICK_RUN: ClassVar[dict] = dict(max_epochs=3, flips=False)


def test_the_quick_run_replaces_the_defaults_and_explicit_settings_win():
    assert (RecipeConfig().max_epochs, RecipeConfig().flips) == (100, True)  # the full recipe
    quick = RecipeConfig(quick=True)
    assert (quick.max_epochs, quick.flips, quick.lr) == (3, False, 1e-3)
    assert RecipeConfig(quick=True, max_epochs=7).max_epochs == 7
    assert RecipeConfig(quick=True, flips=True).flips  # even when the explicit value is the full recipe's default
    assert RecipeConfig(Path("o"), 0.1, 50, quick=True).max_epochs == 50  # positional arguments are explicit too
    assert replace(quick, lr=0.5) == RecipeConfig(quick=True, lr=0.5)  # replace keeps the quick values
    assert replace(quick, quick=False).max_epochs == 3  # and changes only what it names
    assert RecipeConfig(output_dir="elsewhere").output_dir == Path("elsewhere")
    assert RecipeConfig.from_dict({**config_dict(quick), "gone": 1}) == quick  # a setting no longer known: left out
    assert quick.changes() == {"max_epochs": 3, "flips": False}
    assert quick.describe() == "Configuration: QUICK run, with max_epochs=3, flips=False"
    assert RecipeConfig().describe() == "Configuration: the full recipe"


def test_a_quick_run_naming_an_unknown_setting_is_refused():
    @dataclass
    class Wrong(BaseConfig):
        quick: bool = False
        QUICK_RUN: ClassVar[dict] = dict(epochs=3)

    with pytest.raises(TypeError, match="QUICK_RUN sets settings that Config does not have: epochs"):
        Wrong()


# %% The epoch loop's bookkeeping


def train(cfg, metrics: list[dict], fail_at: int | None = None, error=KeyboardInterrupt):
    """A TrainingRun over a tiny model, each epoch reporting the next of `metrics`; `error` raised at `fail_at`."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    with TrainingRun(cfg, "val_dice", model=model, optimizer=optimizer) as run:
        for epoch in run.epochs():
            if epoch == fail_at:
                raise error
            model.weight.data += 1  # the weights of each epoch differ
            run.end_epoch(train_loss=1.0 / epoch, **metrics[epoch - 1])
    return run.history, model


def test_training_run_keeps_the_best_epoch_skips_unvalidated_ones_and_writes_every_file(tmp_path, capsys):
    cfg = RecipeConfig(output_dir=tmp_path, max_epochs=4)
    metrics = [{}, {"val_dice": 0.5}, {"val_dice": float("nan")}, {"val_dice": 0.25}]
    history, model = train(cfg, metrics)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4] and history.best_epoch == 2 and history.best_metric == 0.5
    assert history.best()["val_dice"] == 0.5 and math.isnan(history[0]["val_dice"])  # every row has every column
    assert [list(row) for row in history] == [["epoch", "train_loss", "val_dice", "lr", "seconds"]] * 4  # one order
    assert history.stopped is None and history[0]["lr"] == 1e-3 and history[0]["seconds"] >= 0
    best = torch.load(tmp_path / BEST_MODEL, weights_only=True)
    assert (best["epoch"], best["metric"], best["metric_name"]) == (2, 0.5, "val_dice") and best["metrics"][
        "epoch"
    ] == 2
    assert best["config"] == config_dict(cfg) and torch.allclose(best["model"]["weight"], model.weight.data - 2)
    assert torch.load(tmp_path / LAST_CHECKPOINT, weights_only=True)["epoch"] == 4
    assert pd.read_csv(tmp_path / "history.csv")["epoch"].tolist() == [1, 2, 3, 4]
    assert (tmp_path / "dice_per_epoch.png").is_file()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert lines[1].startswith("epoch   2/4  train_loss 0.5000  val_dice 0.5000") and lines[1].endswith("*best*")
    assert "val_dice" not in lines[0] and "*best*" not in lines[3]  # not validated, and not better
    reloaded, checkpoint = load_best(cfg, lambda c: torch.nn.Linear(2, 1), torch.device("cpu"))
    assert checkpoint["epoch"] == 2 and torch.allclose(reloaded.weight.data, model.weight.data - 2)


def test_training_run_resumes_and_stops_on_ctrl_c_or_a_nan_with_one_line(tmp_path, capsys):
    cfg = RecipeConfig(output_dir=tmp_path, max_epochs=2)
    metrics = [{"val_dice": 0.1 * epoch} for epoch in range(1, 6)]
    first, _ = train(cfg, metrics)
    stopped, _ = train(replace(cfg, max_epochs=5, resume=True), metrics, fail_at=4)
    assert [row["epoch"] for row in stopped] == [1, 2, 3] and stopped[:2] == first  # went on from epoch 3
    assert stopped.best_epoch == 3 and stopped.exit_status == 130
    assert stopped.stopped == (f"Interrupted during epoch 4: {tmp_path / LAST_CHECKPOINT} holds epoch 3; "
                               "run again with resume=True to go on from there")  # fmt: skip
    assert stopped.stopped in capsys.readouterr().out
    with pytest.raises(SystemExit) as ended:
        end_if_stopped(stopped)
    assert ended.value.code == 130
    nan, _ = train(replace(cfg, max_epochs=5, resume=True), metrics, 4, FloatingPointError("Loss is nan"))
    assert nan.stopped == f"Loss is nan. Kept: {tmp_path / BEST_MODEL} (epoch 3)" and nan.exit_status == 1
    end_if_stopped(first)  # a run that finished goes on to the next cell
    unscored, _ = train(replace(cfg, output_dir=tmp_path / "nan"), [{"val_dice": float("nan")}] * 2)
    with pytest.raises(SystemExit) as ended:  # no best epoch: nothing to evaluate
        end_if_stopped(unscored)
    assert ended.value.code == 1 and "No epoch of 2 gave a finite val_dice" in capsys.readouterr().out
    with pytest.raises(ValueError, match="another error"):  # any other error is not a stop: it goes through
        train(replace(cfg, output_dir=tmp_path / "other"), metrics, 1, ValueError("another error"))


@pytest.mark.parametrize("schedule", ["cosine", "step", "poly"])
def test_resuming_with_more_epochs_follows_the_schedule_of_a_fresh_run_that_long(tmp_path, schedule):
    def learning_rates(cfg) -> list[float]:
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        scheduler = {
            "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.max_epochs),
            "step": lambda: torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.max_epochs // 2, gamma=0.1),
            "poly": lambda: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: (1 - e / cfg.max_epochs) ** 0.9),
        }[schedule]()
        with TrainingRun(cfg, "val_dice", model=model, optimizer=optimizer, scheduler=scheduler) as run:
            for epoch in run.epochs():
                model(torch.ones(1, 2)).sum().backward()
                optimizer.step()
                scheduler.step()
                run.end_epoch(val_dice=0.1 * epoch)
        return [row["lr"] for row in run.history]

    fresh = learning_rates(RecipeConfig(output_dir=tmp_path / "fresh", max_epochs=4, lr=0.003))
    learning_rates(RecipeConfig(output_dir=tmp_path / "resumed", max_epochs=2, lr=0.003))
    resumed = learning_rates(RecipeConfig(output_dir=tmp_path / "resumed", max_epochs=4, lr=0.003, resume=True))
    assert resumed[2:] == pytest.approx(fresh[2:], abs=1e-12)  # epochs 3 and 4 as in a 4-epoch run
    assert len(set(fresh)) > 1  # the schedule moves: the comparison means something


def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_previous_checkpoint(tmp_path):
    """OSError(ENOSPC) from any write, and torch.save's own RuntimeError when the disk fills, each end as one
    OutputError naming the file and the full disk; the .partial file is removed and the previous file kept."""
    import errno

    from checkpoints import OutputError

    path = tmp_path / BEST_MODEL
    save_checkpoint({"epoch": 1}, path)

    def fill(partial):
        partial.write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(
        OutputError, match=f"could not write {path}: the disk is full .*; the previous {BEST_MODEL} is kept"
    ):
        save_atomically(path, fill)
    with pytest.raises(OutputError, match="the disk is full"), pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "save", lambda *args: (_ for _ in ()).throw(
            RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                         "data/0: file write failed")))  # fmt: skip
        save_checkpoint({"epoch": 2}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [BEST_MODEL]  # no .best_model.pt.partial left behind
    with pytest.raises(OSError, match="Permission denied") as other:  # other failures keep their own message
        save_atomically(path, lambda partial: (_ for _ in ()).throw(PermissionError("Permission denied")))
    assert not isinstance(other.value, OutputError)


def test_a_file_where_output_dir_should_be_is_one_output_error_naming_it(tmp_path):
    from checkpoints import OutputError
    from dice import save_figure

    in_the_way = tmp_path / "output"
    in_the_way.write_text("not a folder")
    cfg = RecipeConfig(output_dir=in_the_way / "lung", max_epochs=1)
    with pytest.raises(OutputError, match=f"{in_the_way} is a file, where the folder {in_the_way / 'lung'} is needed"):
        train(cfg, [{"val_dice": 0.5}])
    with pytest.raises(OutputError, match=f"{in_the_way} is a file"):
        save_figure(__import__("matplotlib.figure").figure.Figure(), in_the_way / "batch.png")
    assert in_the_way.read_text() == "not a folder"


def test_a_fresh_run_moves_the_earlier_run_to_previous_and_a_resume_does_not(tmp_path, capsys):
    """The earlier run's model, history and evaluations go to previous/<time>/, whole; what the Data and Transforms
    cells already wrote for this run (batch.png) is copied there and stays; a resume moves nothing."""
    cfg = RecipeConfig(output_dir=tmp_path, max_epochs=2)
    metrics = [{"val_dice": 0.9}, {"val_dice": 0.95}]
    train(cfg, metrics)
    (tmp_path / "val_per_case.csv").write_text("case,dice\na,0.95\n")
    (tmp_path / "predictions").mkdir()
    (tmp_path / "predictions" / "a_mask.png").write_bytes(b"png")
    (tmp_path / "batch.png").write_bytes(b"this run's batch")
    earlier = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    train(replace(cfg, max_epochs=1), [{"val_dice": 0.5}])  # a 1-epoch try, worse
    (previous,) = (tmp_path / "previous").iterdir()
    assert {p.relative_to(previous): p.read_bytes() for p in previous.rglob("*") if p.is_file()} == earlier
    assert torch.load(previous / BEST_MODEL, weights_only=True)["metric"] == 0.95  # the 2-epoch model, kept
    assert torch.load(tmp_path / BEST_MODEL, weights_only=True)["metric"] == 0.5
    assert (tmp_path / "batch.png").read_bytes() == b"this run's batch"
    assert not (tmp_path / "val_per_case.csv").exists() and not (tmp_path / "predictions").exists()
    assert f"An earlier run's outputs in {tmp_path} were moved to {previous}" in capsys.readouterr().out
    train(replace(cfg, resume=True), metrics)  # goes on from the 1-epoch run: nothing moved
    assert len(list((tmp_path / "previous").iterdir())) == 1 and "moved" not in capsys.readouterr().out
    train(cfg, metrics)  # a second fresh run: a second folder, the first untouched
    assert len(list((tmp_path / "previous").iterdir())) == 2


def test_readme_pictures_are_rewritten_only_when_asked(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import checkpoints
    from data_cleaning import Data

    cfg = SimpleNamespace(output_dir=tmp_path / "out", images_dir=tmp_path / "Images")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "val.png").write_bytes(b"new picture")
    sample = Data(tmp_path, True, [], [])
    monkeypatch.setattr(checkpoints, "README_PICTURES", False)
    assert checkpoints.readme_pictures(cfg, sample, {"val.png": "x_val.png"}) == [] and not cfg.images_dir.exists()
    monkeypatch.setattr(checkpoints, "README_PICTURES", True)
    assert checkpoints.readme_pictures(cfg, sample, {"val.png": "x_val.png"}) == [cfg.images_dir / "x_val.png"]
    assert (cfg.images_dir / "x_val.png").read_bytes() == b"new picture"
    real = Data(tmp_path, False, [], [])  # never pictures of a real dataset, even when asked
    assert checkpoints.readme_pictures(cfg, real, {"val.png": "y_val.png"}) == []
