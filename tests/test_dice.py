"""dice.py against MONAI's DiceMetric and DiceLoss, and against cases worked out by hand."""

import math
import sys

import numpy as np
import pytest
import torch
from monai.losses import DiceLoss
from monai.metrics import DiceMetric
from PIL import Image

from dice import (
    DiceAccumulator,
    SoftDiceLoss,
    dice_per_image,
    global_dice,
    log_epoch,
    mean_dice,
    plot_dice_history,
    soft_dice_loss,
    tensorboard_writer,
)


def masks(*rows):
    """A batch (B, 1, 1, N) of 1-D masks written as strings such as '0110'."""
    return torch.tensor([[[[int(c) for c in row]]] for row in rows], dtype=torch.uint8)


# Hand-computed cases: (prediction, truth, Dice with empty="one", Dice with empty="skip").
HAND_CASES = {
    "empty/empty": ("0000", "0000", 1.0, math.nan),
    "empty prediction, full truth": ("0000", "1111", 0.0, 0.0),
    "full prediction, empty truth": ("1111", "0000", 0.0, math.nan),
    "one-pixel overlap of one-pixel masks": ("0100", "0100", 1.0, 1.0),
    "one-pixel overlap, 2 vs 1 pixels": ("0110", "0100", 2 / 3, 2 / 3),
    "one-pixel overlap, 2 vs 3 pixels": ("1100", "0111", 2 / 5, 2 / 5),
    "disjoint": ("1000", "0001", 0.0, 0.0),
}


@pytest.mark.parametrize("case", HAND_CASES)
def test_hand_computed_cases(case):
    pred, truth, expected_one, expected_skip = HAND_CASES[case]
    one = dice_per_image(masks(pred), masks(truth), empty="one").item()
    skip = dice_per_image(masks(pred), masks(truth), empty="skip").item()
    assert one == pytest.approx(expected_one)
    assert (math.isnan(skip) and math.isnan(expected_skip)) or skip == pytest.approx(expected_skip)


def test_mean_dice_of_a_batch_follows_the_convention():
    pred, truth = masks("0000", "0110", "1111"), masks("0000", "0100", "0000")
    assert mean_dice(pred, truth, empty="one") == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert mean_dice(pred, truth, empty="skip") == pytest.approx(2 / 3)  # both empty-truth images left out


def test_unknown_convention_and_shape_mismatch_are_refused():
    with pytest.raises(ValueError, match="empty must be one of"):
        dice_per_image(masks("01"), masks("01"), empty="zero")
    with pytest.raises(ValueError, match="differ in shape"):
        dice_per_image(masks("01"), masks("011"))


def random_batch(seed, shape=(6, 1, 12, 10, 4), empty_images=(1, 4)):
    """Random binary masks, some images with empty truth and one with an empty prediction as well."""
    gen = torch.Generator().manual_seed(seed)
    pred = (torch.rand(shape, generator=gen) > 0.6).float()
    truth = (torch.rand(shape, generator=gen) > 0.7).float()
    truth[list(empty_images)] = 0
    pred[empty_images[0]] = 0
    return pred, truth


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("empty, ignore_empty", [("one", False), ("skip", True)])
def test_per_image_dice_matches_monai(seed, empty, ignore_empty):
    pred, truth = random_batch(seed)
    ours = dice_per_image(pred, truth, empty=empty)
    theirs = DiceMetric(include_background=True, reduction="none", ignore_empty=ignore_empty)(pred, truth)[:, 0]
    np.testing.assert_allclose(ours.numpy(), theirs.double().numpy(), rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("empty, ignore_empty", [("one", False), ("skip", True)])
def test_accumulator_over_batches_matches_monai_aggregate(empty, ignore_empty):
    metric = DiceMetric(include_background=True, reduction="mean", ignore_empty=ignore_empty)
    acc = DiceAccumulator(empty=empty)
    batches = [random_batch(seed) for seed in range(4)]
    for pred, truth in batches:
        metric(pred, truth)
        acc.update(pred, truth)
    assert acc.mean() == pytest.approx(metric.aggregate().item(), rel=1e-6)
    assert len(acc.per_image()) == sum(len(p) for p, _ in batches)
    # Global Dice: every image of every batch taken as one single image, which MONAI scores directly.
    whole_pred = torch.cat([p for p, _ in batches]).reshape(1, 1, -1)
    whole_truth = torch.cat([t for _, t in batches]).reshape(1, 1, -1)
    reference = DiceMetric(include_background=True)(whole_pred, whole_truth).item()
    assert acc.global_dice() == pytest.approx(reference, rel=1e-6)
    assert global_dice(torch.cat([p for p, _ in batches]), torch.cat([t for _, t in batches])) == pytest.approx(
        reference, rel=1e-6
    )


def test_global_dice_weighs_images_by_volume_unlike_the_mean():
    # A big, well-found case and a small, missed one: the mean says 0.5, the set as a whole is mostly right.
    pred, truth = masks("11111111", "00000000"), masks("11111111", "00000001")
    assert mean_dice(pred, truth) == pytest.approx(0.5)
    assert global_dice(pred, truth) == pytest.approx(2 * 8 / (8 + 9))
    assert global_dice(masks("0000"), masks("0000")) == 1.0


def test_accumulator_before_any_update_is_nan():
    acc = DiceAccumulator()
    assert math.isnan(acc.mean()) and math.isnan(acc.global_dice())


@pytest.mark.parametrize("batch", [False, True])
def test_soft_dice_loss_matches_monai(batch):
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 2, 16, 16, 3, generator=gen) * 3
    target = (torch.rand(4, 2, 16, 16, 3, generator=gen) > 0.8).float()
    target[0] = 0  # an image with nothing to find
    reference = DiceLoss(sigmoid=True, batch=batch)(logits, target)
    assert soft_dice_loss(logits, target, batch=batch).item() == pytest.approx(reference.item(), rel=1e-5)
    assert SoftDiceLoss(batch=batch)(logits, target).item() == pytest.approx(reference.item(), rel=1e-5)


def test_soft_dice_loss_is_float32_under_autocast_and_has_gradients():
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn(2, 1, 32, 32, generator=gen) * 2).bfloat16().requires_grad_()
    target = (torch.rand(2, 1, 32, 32, generator=gen) > 0.5).float()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = soft_dice_loss(logits * 1.0, target)
    assert loss.dtype == torch.float32
    reference = DiceLoss(sigmoid=True)(logits.detach().float(), target)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_soft_dice_loss_is_lower_for_better_logits():
    target = masks("0011110000").float()
    good = (target * 2 - 1) * 5  # confident and right
    bad = -good
    assert soft_dice_loss(good, target) < 0.05 < 0.95 < soft_dice_loss(bad, target)


def test_plot_dice_history_writes_a_png_and_marks_the_best_epoch(tmp_path):
    path = tmp_path / "plots" / "dice.png"
    best = plot_dice_history([0.2, 0.5, 0.45, 0.7, 0.7, 0.6], path)
    assert best == 4  # the first epoch to reach the best value
    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 200 and img.height > 150
    assert not list(path.parent.glob(".*partial"))  # the temporary file was renamed into place
    # Validation every other epoch, with a NaN for an epoch that could not be scored.
    assert plot_dice_history([0.3, math.nan, 0.8], path, epochs=[2, 4, 6]) == 6
    assert plot_dice_history([], path) is None
    with pytest.raises(ValueError, match="3 Dice values for 2 epochs"):
        plot_dice_history([0.1, 0.2, 0.3], path, epochs=[1, 2])


def test_plot_dice_history_draws_the_values_it_was_given(tmp_path):
    plot_dice_history([0.1, 0.2, 0.3], tmp_path / "a.png")
    plot_dice_history([0.9, 0.2, 0.3], tmp_path / "b.png")
    a, b = (np.asarray(Image.open(tmp_path / name).convert("L")) for name in ("a.png", "b.png"))
    assert a.shape == b.shape and (a != b).any()
    plot_dice_history([0.1, 0.2, 0.3], tmp_path / "c.png", ylabel="RSNA metric")  # another metric's name
    c = np.asarray(Image.open(tmp_path / "c.png").convert("L"))
    assert c.shape != a.shape or (c != a).any()


def test_tensorboard_log_holds_every_number_of_the_history(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    writer = tensorboard_writer(True, tmp_path / "tb")
    log_epoch(writer, {"epoch": 1, "train_loss": 0.5, "val_dice": 0.25, "note": "text", "quick": True}, 1)
    log_epoch(writer, {"epoch": 2, "train_loss": 0.4, "val_dice": 0.75, "note": "text", "quick": True}, 2)
    writer.close()
    events = event_accumulator.EventAccumulator(str(tmp_path / "tb"))  # TensorBoard's own reader
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["train_loss", "val_dice"]  # numbers only, the epoch is the step
    assert [(e.step, e.value) for e in events.Scalars("val_dice")] == [(1, 0.25), (2, 0.75)]
    log_epoch(None, {"val_dice": 1.0}, 3)  # off: nothing to do, no error
    assert tensorboard_writer(False, tmp_path / "off") is None and not (tmp_path / "off").exists()


def test_tensorboard_asked_for_but_missing_is_one_line_and_no_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as without the package
    assert tensorboard_writer(True, tmp_path / "tb") is None
    assert capsys.readouterr().out == (
        "tensorboard=True but the tensorboard package is not installed (pip install tensorboard): not logging\n"
    )
    assert not (tmp_path / "tb").exists()


def test_save_figure_writes_a_png_and_show_names_it_or_prints_the_table_on_a_terminal(tmp_path, capsys):
    import pandas as pd
    from matplotlib.figure import Figure

    from dice import save_figure, show

    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "new" / "figure.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(path.parent.glob("*.partial"))
    show(path)
    show(pd.DataFrame({"case": ["a", "b"], "dice": [0.5, 0.25]}))
    out = capsys.readouterr().out
    assert f"Figure: {path}" in out and "dice" in out and "0.25" in out  # not in a notebook: said, not drawn


def test_bootstrap_interval_matches_scipy_and_the_normal_approximation():
    """The plain percentile bootstrap against scipy.stats.bootstrap (an independent implementation) and, for 400
    normal values, against mean +- 1.96 s / sqrt(n)."""
    import numpy as np
    from scipy.stats import bootstrap

    from dice import bootstrap_ci

    rng = np.random.default_rng(1)
    values = rng.beta(5, 2, size=60)  # skewed, as Dice scores are
    mean, low, high = bootstrap_ci(values, resamples=20_000)
    ref = bootstrap((values,), np.mean, method="percentile", n_resamples=20_000, random_state=2).confidence_interval
    assert mean == pytest.approx(values.mean())
    assert low == pytest.approx(ref.low, abs=0.004) and high == pytest.approx(ref.high, abs=0.004)
    normal = rng.normal(0.8, 0.1, size=400)
    half = 1.96 * normal.std(ddof=1) / np.sqrt(len(normal))
    _, low, high = bootstrap_ci(normal)
    assert (high - low) / 2 == pytest.approx(half, rel=0.08)
    assert low < normal.mean() < high


def test_bootstrap_by_patient_redraws_whole_patients():
    """Each value repeated 3 times within its own patient gives exactly the interval of the values alone (same
    draws of patients); counted as 3 independent images instead, the interval is narrower, wrongly."""
    import numpy as np

    from dice import bootstrap_ci, describe_ci

    values = np.random.default_rng(3).uniform(0.3, 1.0, size=15)
    alone = bootstrap_ci(values, seed=5)
    tripled = np.repeat(values, 3)
    patients = np.repeat(np.arange(15), 3)
    assert bootstrap_ci(tripled, groups=patients, seed=5) == pytest.approx(alone)
    _, low, high = bootstrap_ci(tripled, seed=5)
    assert high - low < 0.75 * (alone[2] - alone[1])
    assert bootstrap_ci([0.5, float("nan"), 0.7], resamples=100)[0] == pytest.approx(0.6)  # NaN (skipped) left out
    assert "too few for an interval" in describe_ci([0.9]) and "1 case:" in describe_ci([0.9])
    assert "45 frames of 15 patients" in describe_ci(tripled, patients, unit="frames")
    with pytest.raises(ValueError, match="group labels"):
        bootstrap_ci([0.1, 0.2], groups=[1])
