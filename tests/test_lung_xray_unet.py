"""lung_xray_unet.py and its step in data_cleaning.py: preparation, bad inputs, the U-Net, the losses, and quick runs
(as a function and as a script; as a notebook: test_notebooks.py) that must learn the synthetic Montgomery lungs."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data_cleaning
import sample_data
from dice import mean_dice

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "lung_xray_unet.py"


@pytest.fixture(scope="module")
def lx(load_script):
    """The script as a module, loaded with QUICK=1: its `cfg` is then the quick run's configuration."""
    return load_script("lung_xray_unet")


@pytest.fixture(scope="module")
def download(tmp_path_factory) -> Path:
    """The synthetic Montgomery set as downloaded: `<tmp>/MontgomerySet/` (12 films, 16-bit PNGs with 12-bit values)."""
    return sample_data.write_dataset("MontgomerySet", tmp_path_factory.mktemp("data"))


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its content hash and modification time: any rewrite changes it."""
    return {
        str(path.relative_to(folder)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def names_in(folder: Path) -> list[str]:
    return sorted(path.stem for path in folder.glob("*.png"))


def expected_mask(download: Path, name: str, size: int = 512) -> np.ndarray:
    """Reference for a prepared mask: left | right lung from the download, nearest-neighbour resize, 0/255."""
    left, right = (
        np.asarray(Image.open(download / "ManualMask" / side / f"{name}.png")) > 0 for side in ("leftMask", "rightMask")
    )
    union = Image.fromarray((left | right).astype(np.uint8) * np.uint8(255))
    return np.asarray(union.resize((size, size), Image.Resampling.NEAREST))


def assert_masks_paired_by_name(prepared: Path, download: Path) -> None:
    for mask_file in prepared.glob("*/mask/*.png"):
        np.testing.assert_array_equal(np.asarray(Image.open(mask_file)), expected_mask(download, mask_file.stem))


# %% Configuration and paths


def test_quick_switch_and_paths_resolve_against_the_repository(lx):
    assert lx.cfg.quick and lx.cfg.image_size < lx.Config.__dataclass_fields__["prepared_size"].default
    assert lx.ROOT == REPO_ROOT
    assert lx.Config().data_dir == REPO_ROOT / "data"
    assert lx.Config().output_dir == REPO_ROOT / "output" / "lung_xray_unet"


# %% Preparation (data_cleaning.prepare_lung_segmentation)


def test_preparation_unions_both_lungs_resizes_and_splits_by_name(download):
    before = snapshot(download)
    prepared = data_cleaning.prepare_lung_segmentation(download)
    assert prepared == download.parent / "segmentation"  # beside the download, never inside it
    train, test = names_in(prepared / "train" / "image"), names_in(prepared / "test" / "image")
    assert sorted(train + test) == names_in(download / "CXR_png") and not set(train) & set(test)
    assert len(test) == round(0.25 * 12)
    for split, names in (("train", train), ("test", test)):
        assert names_in(prepared / split / "mask") == names
        for name in names:
            image = np.asarray(Image.open(prepared / split / "image" / f"{name}.png"))
            assert image.shape == (512, 512) and image.dtype == np.uint16 and image.max() > 60000  # full range
    assert_masks_paired_by_name(prepared, download)  # both lungs, nearest neighbour (0/255 only), right film
    assert snapshot(download) == before


def test_preparation_is_idempotent_seeded_and_redone_for_other_settings(download, tmp_path, capsys):
    prepared = data_cleaning.prepare_lung_segmentation(download)
    before = snapshot(prepared)
    capsys.readouterr()
    assert data_cleaning.prepare_lung_segmentation(download) == prepared
    assert "Reusing the prepared cases" in capsys.readouterr().out
    assert snapshot(prepared) == before  # nothing rewritten

    same = data_cleaning.prepare_lung_segmentation(download, tmp_path / "same", seed=0)
    other = data_cleaning.prepare_lung_segmentation(download, tmp_path / "other", seed=1)
    assert names_in(same / "test" / "image") == names_in(prepared / "test" / "image")
    assert names_in(other / "test" / "image") != names_in(prepared / "test" / "image")

    smaller = data_cleaning.prepare_lung_segmentation(download, tmp_path / "same", size=128, seed=0)
    assert "prepared with other settings" in capsys.readouterr().out
    assert Image.open(next((smaller / "train" / "image").glob("*.png"))).size == (128, 128)

    (tmp_path / "foreign").mkdir()  # not written by the preparation (no manifest): never overwritten
    with pytest.raises(FileExistsError, match="has no prepared.json"):
        data_cleaning.prepare_lung_segmentation(download, tmp_path / "foreign")


def test_8_bit_12_bit_and_16_bit_pngs_give_the_same_normalised_image(tmp_path):
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 250, 60)[:, None] * np.linspace(0.3, 1, 50)[None, :]
    eight_bit = (ramp + rng.integers(0, 5, ramp.shape)).astype(np.uint8)
    stored = {
        "8-bit": eight_bit,
        "12-bit": eight_bit.astype(np.uint16) * 16,
        "16-bit": eight_bit.astype(np.uint16) * 257,
    }
    images = {}
    for name, pixels in stored.items():
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
        images[name] = data_cleaning.to_unit_range(data_cleaning.read_gray(tmp_path / f"{name}.png"))
    for name, image in images.items():
        assert image.dtype == np.float32 and image.min() == 0 and image.max() == 1, name  # 12-bit is not dark
        np.testing.assert_allclose(image, images["8-bit"], atol=1e-6, err_msg=name)


def test_shenzhen_films_join_when_asked_8_bit_rgb_and_all(lx, download, tmp_path):
    shutil.copytree(download, tmp_path / "MontgomerySet")
    shenzhen = tmp_path / "ChinaSet_AllFiles"
    (shenzhen / "CXR_png").mkdir(parents=True)
    (shenzhen / "masks").mkdir()  # the separate mask download, put anywhere below the Shenzhen folder
    montgomery_names = names_in(download / "CXR_png")[:3]
    for number, name in enumerate(montgomery_names, 1):
        twelve_bit = np.asarray(Image.open(download / "CXR_png" / f"{name}.png"))
        film = Image.fromarray((twelve_bit // 16).astype(np.uint8)).convert("RGB")
        film.save(shenzhen / "CXR_png" / f"CHNCXR_{number:04d}_0.png")
        union = Image.fromarray(expected_mask(download, name)).resize(film.size, Image.Resampling.NEAREST)
        union.save(shenzhen / "masks" / f"CHNCXR_{number:04d}_0_mask.png")

    prepared = lx.prepare_data(replace(lx.cfg, data_dir=tmp_path, include_shenzhen=True))
    cases = pd.read_csv(prepared / "cases.csv")
    assert sorted(cases["source"].value_counts().items()) == [("Montgomery", 12), ("Shenzhen", 3)]
    for number, name in enumerate(montgomery_names, 1):  # the same film, 8-bit RGB or 12-bit gray: the same input
        as_8_bit, as_12_bit = (data_cleaning.read_gray(next(prepared.glob(f"*/image/{stem}.png"))) / 65535
                               for stem in (f"CHNCXR_{number:04d}_0", name))  # fmt: skip
        assert np.abs(as_8_bit - as_12_bit).mean() < 0.01


def test_shenzhen_asked_for_but_missing_is_a_clear_error(lx, download, tmp_path):
    with pytest.raises(data_cleaning.DatasetError, match="ChinaSet_AllFiles/CXR_png is missing"):
        data_cleaning.prepare_lung_segmentation(download, tmp_path / "seg", shenzhen_dir=tmp_path / "ChinaSet_AllFiles")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:2000])


def write_small_mask(path: Path) -> None:
    Image.fromarray(np.full((80, 100), 255, np.uint8)).save(path)


BAD_INPUTS = {
    "image without mask": lambda folder, name: (folder / "ManualMask" / "rightMask" / f"{name}.png").unlink(),
    "mask without image": lambda folder, name: (folder / "CXR_png" / f"{name}.png").unlink(),
    "unreadable PNG": lambda folder, name: truncate(folder / "CXR_png" / f"{name}.png"),
    "mask of another size": lambda folder, name: write_small_mask(folder / "ManualMask" / "leftMask" / f"{name}.png"),
}


@pytest.mark.parametrize("problem", BAD_INPUTS)
def test_a_bad_case_is_named_skipped_and_counted(problem, download, tmp_path, capsys):
    broken = tmp_path / "MontgomerySet"
    shutil.copytree(download, broken)
    name = names_in(broken / "CXR_png")[4]
    BAD_INPUTS[problem](broken, name)

    prepared = data_cleaning.prepare_lung_segmentation(broken)
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if name in line][0].startswith(f"Skipped case {name}: {problem}: ")
    assert f"skipped 1 case (1 {problem})" in out
    manifest = json.loads((prepared / "prepared.json").read_text())
    assert manifest["skipped"] == {problem: 1} and manifest["train"] + manifest["test"] == 11
    assert not list(prepared.rglob(f"{name}.png"))
    assert_masks_paired_by_name(prepared, broken)  # the films after the gap keep their own masks


def test_no_usable_case_is_one_clear_error(tmp_path, capsys):
    empty = tmp_path / "MontgomerySet"
    (empty / "CXR_png").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(empty / "CXR_png" / "MCUCXR_0001_0.png")
    expected = "expected CXR_png/<name>.png with ManualMask/leftMask/<name>.png"
    with pytest.raises(data_cleaning.DatasetError, match=expected):
        data_cleaning.prepare_lung_segmentation(empty)
    assert "Skipped case MCUCXR_0001_0: image without mask: CXR_png/MCUCXR_0001_0.png has no" in capsys.readouterr().out
    assert sorted(path.name for path in tmp_path.iterdir()) == ["MontgomerySet"]  # nothing half-written left


# %% Model and loss


@pytest.mark.parametrize(
    "depth, up_mode, norm, out_channels, size",
    [(2, "transpose", "batch", 1, (32, 32)), (3, "bilinear", "instance", 2, (45, 61)),
     (4, "transpose", "none", 1, (50, 37)), (5, "bilinear", "batch", 2, (64, 80))],
)  # fmt: skip
def test_unet_gives_the_input_size_for_any_configuration(lx, depth, up_mode, norm, out_channels, size):
    model = lx.UNet(1, out_channels, depth, 4, up_mode, norm).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 1, *size)).shape == (2, out_channels, *size)
    assert model.down[-1][0].out_channels == 4 * 2 ** (depth - 1)  # channels double at every level
    with pytest.raises(ValueError, match="up_mode"):
        lx.UNet(up_mode="nearest")


def test_both_heads_compute_dice_plus_cross_entropy_of_their_probabilities(lx):
    torch.manual_seed(0)
    logits, seg = torch.randn(3, 2, 16, 16), (torch.rand(3, 1, 16, 16) > 0.6).float()

    def soft_dice(prob, target):  # reference, per image and channel, then the mean
        dims = (2, 3)
        return (1 - (2 * (prob * target).sum(dims) + 1e-5) / (prob.sum(dims) + target.sum(dims) + 1e-5)).mean()

    one_hot = torch.cat([1 - seg, seg], 1)
    softmax = soft_dice(logits.softmax(1), one_hot) + F.cross_entropy(logits, seg[:, 0].long())
    assert lx.LungLoss("softmax_dice")(logits, seg).item() == pytest.approx(softmax.item(), rel=1e-5)
    sigmoid = soft_dice(logits[:, :1].sigmoid(), seg) + F.binary_cross_entropy_with_logits(logits[:, :1], seg)
    assert lx.LungLoss("dice_bce")(logits[:, :1], seg).item() == pytest.approx(sigmoid.item(), rel=1e-5)
    # Either head gives the same lung probability: softmax's lung channel, the sigmoid of the single logit.
    torch.testing.assert_close(torch.sigmoid(lx.lung_logit(logits)), logits.softmax(1)[:, 1:])


@pytest.mark.parametrize("loss", ["dice_bce", "softmax_dice"])
def test_both_losses_are_finite_and_decrease_on_one_batch(lx, download, loss):
    cfg = replace(lx.cfg, loss=loss)
    train, _, _ = lx.split_cases(data_cleaning.prepare_lung_segmentation(download), cfg)
    img, seg = lx.load_cases(train[:2], cfg.image_size)
    torch.manual_seed(0)
    model, loss_fn = lx.build_model(cfg), lx.LungLoss(loss)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        value = loss_fn(model(img), seg)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert model.head.out_channels == {"dice_bce": 1, "softmax_dice": 2}[loss]
    assert np.isfinite(losses).all() and losses[-1] < 0.7 * losses[0]


def tiny_films(value: float | None = None) -> torch.utils.data.DataLoader:
    """Four 32-px films with random masks (or filled with `value`), two per batch: an epoch of milliseconds."""
    generator = torch.Generator().manual_seed(0)
    img = torch.rand(4, 1, 32, 32, generator=generator) if value is None else torch.full((4, 1, 32, 32), value)
    seg = (torch.rand(4, 1, 32, 32, generator=generator) > 0.5).float()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(img, seg), batch_size=2)


def test_resume_goes_on_and_a_non_finite_loss_stops_keeping_the_best(lx, tmp_path, monkeypatch, capsys):
    plotted = []
    monkeypatch.setattr(lx, "plot_dice_history", lambda dice, path, **kw: plotted.append(list(dice)))
    cfg = replace(lx.cfg, output_dir=tmp_path, max_epochs=2)
    first = lx.Trainer(cfg, lx.build_model(cfg), tiny_films(), tiny_films()).fit()
    assert [row["epoch"] for row in first] == [1, 2]

    resumed = lx.Trainer(replace(cfg, max_epochs=4, resume=True), lx.build_model(cfg), tiny_films(), tiny_films())
    history = resumed.fit()
    assert "Resuming from" in capsys.readouterr().out and resumed.stopped is None
    assert [row["epoch"] for row in history] == [1, 2, 3, 4] and history[:2] == first
    assert pd.read_csv(tmp_path / "history.csv")["epoch"].tolist() == [1, 2, 3, 4]
    assert len(plotted[-1]) == 4  # the plot covers every epoch, those before the resume too
    last = torch.load(tmp_path / "last_checkpoint.pt", weights_only=True)
    assert last["epoch"] == 4 and {"model", "optimizer", "scheduler", "scaler", "history"} <= set(last)

    best_before = (tmp_path / "best_model.pt").read_bytes()
    best_epoch = torch.load(tmp_path / "best_model.pt", weights_only=True)["epoch"]
    nan = lx.Trainer(replace(cfg, max_epochs=6, resume=True), lx.build_model(cfg), tiny_films(float("nan")), None)
    assert nan.fit() == history  # stopped in epoch 5: nothing added
    out = capsys.readouterr().out
    assert f"Loss is nan at epoch 5, batch 0: stopping (try a lower lr than {cfg.lr}, or amp=False)" in out
    assert f"Kept: {tmp_path / 'best_model.pt'} (epoch {best_epoch})" in out and nan.stopped
    assert (tmp_path / "best_model.pt").read_bytes() == best_before
    assert torch.load(tmp_path / "last_checkpoint.pt", weights_only=True)["epoch"] == 4


def test_ctrl_c_stops_with_one_line_and_the_last_epoch_on_disk(lx, tmp_path, monkeypatch, capsys):
    cfg = replace(lx.cfg, output_dir=tmp_path, max_epochs=5)
    trainer = lx.Trainer(cfg, lx.build_model(cfg), tiny_films(), tiny_films())
    train_one_epoch = trainer.train_one_epoch

    def interrupted_in_epoch_3(epoch):
        if epoch == 3:
            raise KeyboardInterrupt
        return train_one_epoch(epoch)

    monkeypatch.setattr(trainer, "train_one_epoch", interrupted_in_epoch_3)
    assert len(trainer.fit()) == 2
    last = tmp_path / "last_checkpoint.pt"
    assert capsys.readouterr().out.endswith(
        f"Interrupted during epoch 3: {last} holds epoch 2; run again with resume=True to go on from there\n"
    )
    assert torch.load(last, weights_only=True)["epoch"] == 2


def test_resume_with_another_network_is_one_clear_error(lx, tmp_path):
    cfg = replace(lx.cfg, output_dir=tmp_path, max_epochs=1)
    lx.Trainer(cfg, lx.build_model(cfg), tiny_films(), tiny_films()).fit()
    wider = replace(cfg, start_filters=2 * cfg.start_filters, resume=True, max_epochs=2)
    with pytest.raises(ValueError, match="last_checkpoint.pt was written with another configuration than this one"):
        lx.Trainer(wider, lx.build_model(wider), tiny_films(), tiny_films()).fit()


KILLED_RUN = """
import importlib.util, sys
from dataclasses import replace
sys.path.insert(0, {tests!r})
spec = importlib.util.spec_from_file_location("lung_xray_unet", {script!r})
lx = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lx)
from test_lung_xray_unet import tiny_films
cfg = replace(lx.cfg, output_dir={out!r}, max_epochs=10_000, resume=True)
lx.Trainer(cfg, lx.build_model(cfg), tiny_films(), tiny_films()).fit()
"""


def test_a_kill_at_any_moment_leaves_loadable_checkpoints_and_resume_goes_on(tmp_path):
    code = KILLED_RUN.format(tests=str(REPO_ROOT / "tests"), script=str(SCRIPT), out=str(tmp_path))
    last_path, rng, epochs = tmp_path / "last_checkpoint.pt", np.random.default_rng(0), [0]
    for _ in range(3):
        before = last_path.stat().st_mtime_ns if last_path.exists() else 0
        process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not last_path.exists() or last_path.stat().st_mtime_ns == before:  # until this run ends an epoch
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no epoch ended within 2 minutes"
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.5))  # then somewhere in an epoch, a save or a plot
        process.kill()  # SIGKILL: no handler runs, nothing is cleaned up
        process.wait()
        last = torch.load(last_path, weights_only=True)
        best = torch.load(tmp_path / "best_model.pt", weights_only=True)
        assert len(last["history"]) == last["epoch"] > epochs[-1]  # each run went on from the one before
        assert 1 <= best["epoch"] <= last["epoch"] + 1  # best is saved before last in an epoch
        logged = pd.read_csv(tmp_path / "history.csv")["epoch"].tolist()
        assert logged == list(range(1, len(logged) + 1)) and len(logged) - last["epoch"] in (0, 1)
        epochs.append(last["epoch"])


def test_same_seed_same_split_and_same_first_epoch_on_the_cpu(lx, download, tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = replace(lx.cfg, data_dir=download.parent, output_dir=tmp_path / name, max_epochs=1)
        history = lx.main(cfg)
        runs.append((lx.split_cases(download.parent / "segmentation", cfg), history[0]))
    (split_a, first_a), (split_b, first_b) = runs
    assert split_a == split_b
    assert first_a["train_loss"] == first_b["train_loss"] and first_a["val_dice"] == first_b["val_dice"]  # bitwise
    other = lx.main(replace(cfg, output_dir=tmp_path / "c", max_epochs=1, seed=1))
    assert other[0]["train_loss"] != first_a["train_loss"]  # the seed does reach the weights and the shuffling


# %% Quick runs


@pytest.fixture(scope="module")
def quick_run(lx, download, tmp_path_factory):
    """main() with the quick configuration on the synthetic set: (cfg, history, download before the run)."""
    before = snapshot(download)
    cfg = replace(lx.cfg, data_dir=download.parent, output_dir=tmp_path_factory.mktemp("output"), tensorboard=True)
    cfg = replace(cfg, images_dir=tmp_path_factory.mktemp("images") / "Images")
    return cfg, lx.main(cfg), before


def test_quick_run_learns_the_lungs(quick_run, download):
    cfg, _, _ = quick_run
    test_dice = pd.read_csv(cfg.output_dir / "test_dice.csv")
    assert test_dice["dice"].mean() >= 0.85
    # Better by far than masks that do not look at the film: everything, or the mean lung shape of the train set
    # (the synthetic lungs vary little, so the mean shape alone already scores about 0.87).
    prepared = download.parent / "segmentation"
    mean_shape = np.mean([np.asarray(Image.open(path)) > 0 for path in (prepared / "train" / "mask").glob("*.png")], 0)
    mean_shape = Image.fromarray((mean_shape > 0.5).astype(np.uint8) * np.uint8(255))
    baseline = []
    for case in test_dice.itertuples():
        masks = [download / "ManualMask" / side / f"{case.name}.png" for side in ("leftMask", "rightMask")]
        truth = torch.from_numpy(data_cleaning.read_lung_mask(masks, (case.height, case.width)))[None]
        predicted = np.asarray(Image.open(cfg.output_dir / "predicted_masks" / f"{case.name}.png")) > 0
        assert case.dice == pytest.approx(mean_dice(torch.from_numpy(predicted)[None], truth))  # at the original size
        shape = np.asarray(mean_shape.resize((case.width, case.height), Image.Resampling.NEAREST)) > 0
        baseline.append(mean_dice(torch.from_numpy(shape)[None], truth))
        assert case.dice > max(baseline[-1], mean_dice(torch.ones_like(truth), truth) + 0.3), case.name
    assert test_dice["dice"].mean() > np.mean(baseline) + 0.05


def test_quick_run_writes_history_plot_masks_and_figure(quick_run, download):
    cfg, history, before = quick_run
    assert [row["epoch"] for row in history] == list(range(1, cfg.max_epochs + 1))
    csv = pd.read_csv(cfg.output_dir / "history.csv")
    assert list(csv.columns) == ["epoch", "train_loss", "val_loss", "val_dice", "val_mean_dice", "lr", "seconds"]
    np.testing.assert_allclose(csv["val_dice"], [row["val_dice"] for row in history])
    for figure in ("dice_per_epoch.png", "test_predictions.png"):
        assert Image.open(cfg.output_dir / figure).size[0] > 300
    cases = pd.read_csv(download.parent / "segmentation" / "cases.csv")
    test_cases = cases[cases["split"] == "test"]
    assert names_in(cfg.output_dir / "predicted_masks") == sorted(test_cases["name"])
    for case in test_cases.itertuples():
        original = Image.open(download / "CXR_png" / f"{case.name}.png")
        predicted = Image.open(cfg.output_dir / "predicted_masks" / f"{case.name}.png")
        assert predicted.size == original.size and set(np.unique(np.asarray(predicted))) == {0, 255}
    assert snapshot(download) == before  # the run only read the download
    assert not cfg.images_dir.exists()  # pictures of a "real" dataset are not copied to the README's folder
    assert len(list((cfg.output_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_best_checkpoint_holds_config_epoch_metric_and_reproduces_the_masks(lx, quick_run):
    cfg, history, _ = quick_run
    checkpoint = torch.load(cfg.output_dir / "best_model.pt", weights_only=True)
    best = max(history, key=lambda row: row["val_dice"])
    assert checkpoint["epoch"] == best["epoch"] and checkpoint["metric"] == pytest.approx(best["val_dice"])
    assert checkpoint["config"] == lx.config_dict(cfg) and {"model", "optimizer", "scheduler"} <= set(checkpoint)
    inferencer = lx.Inferencer(cfg.output_dir / "best_model.pt")
    _, _, test = lx.split_cases(cfg.data_dir / "segmentation", cfg)
    saved = np.asarray(Image.open(cfg.output_dir / "predicted_masks" / f"{test[0]['name']}.png")) > 0
    np.testing.assert_array_equal(inferencer.predict(test[0]), saved)


def test_script_runs_as_a_user_runs_it(tmp_path):
    env = {**os.environ, "QUICK": "1", "DATA_DIR": str(tmp_path / "data"), "OUTPUT_DIR": str(tmp_path / "out")}
    env["IMAGES_DIR"] = str(tmp_path / "Images")
    result = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "using the SYNTHETIC sample" in result.stdout and "(QUICK run)" in result.stdout
    assert float(re.search(r"Test Dice (\d\.\d+)", result.stdout).group(1)) >= 0.85
    assert (tmp_path / "data" / "sample" / "segmentation" / "prepared.json").exists()  # beside the sample it used
    assert not (tmp_path / "data" / "segmentation").exists()
    for output in ("best_model.pt", "history.csv", "dice_per_epoch.png", "test_predictions.png", "test_dice.csv"):
        assert (tmp_path / "out" / output).is_file(), output
    # The synthetic sample was used: its figures are the README's pictures; the summary says where everything went.
    for name in ("test_predictions.png", "dice_per_epoch.png"):
        assert (tmp_path / "Images" / f"lung_xray_unet_{name}").read_bytes() == (tmp_path / "out" / name).read_bytes()
    summary = result.stdout[result.stdout.index("\nSummary (") :]
    assert "data:    SYNTHETIC sample" in summary and f"outputs: {tmp_path / 'out'}/" in summary
    assert f"picture: {tmp_path / 'Images' / 'lung_xray_unet_dice_per_epoch.png'}" in summary
