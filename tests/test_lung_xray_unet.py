"""lung_xray_unet.py and its step in data_cleaning.py: preparation, bad inputs, the U-Net, the losses, and the
stages: load_data, the Trainer (resume, Ctrl-C, NaN, a kill at any moment, determinism) and a quick run of all the
cells (as `python lung_xray_unet.py` runs them; as a notebook: test_notebooks.py) that must learn the synthetic
Montgomery lungs, at each film's original size, better than a mask that does not look at the film."""

import hashlib
import json
import os
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
from checkpoints import config_dict
from dice import bootstrap_ci, mean_dice

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "lung_xray_unet.py"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lx(load_script):
    """The script as a module, loaded with QUICK=1: its `cfg` is then the quick run's configuration."""
    return load_script("lung_xray_unet")


@pytest.fixture(scope="module")
def download(tmp_path_factory) -> Path:
    """The synthetic Montgomery set as downloaded (12 films, 16-bit PNGs with 12-bit values), where the script looks
    for its sample: `<tmp>/data/sample/MontgomerySet/`. With data_dir=<tmp>/data a script uses it as the sample;
    with data_dir=<tmp>/data/sample, as a real download. Both prepare it into `<tmp>/data/sample/segmentation/`."""
    return sample_data.write_dataset("MontgomerySet", tmp_path_factory.mktemp("data") / "sample")


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its content hash and modification time: any rewrite changes it."""
    return {
        str(path.relative_to(folder)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


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


def test_the_disk_cache_decodes_each_film_once_and_a_touched_film_alone_again(download, tmp_path, capsys):
    """With a cache_dir, a second preparation (a changed film makes one) decodes only the films that changed, and
    writes exactly the PNGs a preparation without the cache writes."""
    copy = Path(shutil.copytree(download, tmp_path / "sample" / "MontgomerySet"))
    plain = data_cleaning.prepare_lung_segmentation(copy, tmp_path / "plain")
    capsys.readouterr()
    cached = data_cleaning.prepare_lung_segmentation(copy, tmp_path / "cached", cache_dir=tmp_path / "cache")
    assert f"Disk cache {tmp_path / 'cache'}: 0 films read back, 12 decoded and written" in capsys.readouterr().out
    contents = {name: digest for name, (digest, _) in snapshot(plain).items() if name.endswith(".png")}
    assert {name: digest for name, (digest, _) in snapshot(cached).items() if name.endswith(".png")} == contents
    touched = sorted((copy / "ManualMask" / "leftMask").glob("*.png"))[3]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    again = data_cleaning.prepare_lung_segmentation(copy, tmp_path / "cached", cache_dir=tmp_path / "cache")
    out = capsys.readouterr().out
    assert "prepared from other files" in out and ": 11 films read back, 1 decoded and written" in out
    assert {name: digest for name, (digest, _) in snapshot(again).items() if name.endswith(".png")} == contents


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

    data = lx.load_data(replace(lx.cfg, data_dir=tmp_path, output_dir=tmp_path / "out", include_shenzhen=True))
    prepared = tmp_path / "segmentation"
    cases = pd.read_csv(prepared / "cases.csv")
    assert sorted(cases["source"].value_counts().items()) == [("Montgomery", 12), ("Shenzhen", 3)]
    assert len(data.train) + len(data.val) + len(data.test) == 15
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
def test_a_bad_case_is_named_skipped_and_counted(lx, problem, download, tmp_path, capsys):
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
    cfg = replace(lx.cfg, data_dir=tmp_path, output_dir=tmp_path / "out")
    data = lx.load_data(cfg)  # the Data stage counts it too, from prepared.json, and lists it in skipped.csv
    assert data.skipped.counts == {problem: 1} and str(data).endswith("films; 1 case skipped")
    assert name not in {case["name"] for case in data.train + data.val + data.test}
    listed = pd.read_csv(cfg.output_dir / "skipped.csv")
    assert listed["case"].tolist() == [name] and listed["problem"].tolist() == [problem]


def test_a_film_restored_after_a_failed_read_is_prepared_again_and_used(lx, download, tmp_path, capsys):
    """The prepared folder notices a changed download (a file's size or modification time): restoring a truncated
    film redoes the preparation, says why, and the film is then used; an unchanged download is reused."""
    broken = tmp_path / "MontgomerySet"
    shutil.copytree(download, broken)
    name = names_in(broken / "CXR_png")[4]
    film = broken / "CXR_png" / f"{name}.png"
    truncate(film)
    cfg = replace(lx.cfg, data_dir=tmp_path, output_dir=tmp_path / "out")
    assert lx.load_data(cfg).skipped.counts == {"unreadable PNG": 1}
    shutil.copy2(download / "CXR_png" / f"{name}.png", film)  # the user downloads the film again
    capsys.readouterr()
    data = lx.load_data(cfg)
    assert "was prepared from other files (a film or mask added, removed or changed since)" in capsys.readouterr().out
    assert data.skipped.counts.total() == 0 and name in {case["name"] for case in data.train + data.val + data.test}
    lx.load_data(cfg)
    assert "Reusing the prepared cases" in capsys.readouterr().out


def test_masks_are_binarised_at_half_their_range_not_above_zero():
    """A mask saved as JPEG carries faint values off the lung and dips inside it: half the range keeps the lung,
    `> 0` would mark the whole background. 0/1 and 16-bit masks are halved by their own range."""
    rng = np.random.default_rng(0)
    truth = np.zeros((64, 64), bool)
    truth[16:48, 10:30] = True
    noisy = np.clip(truth * 255.0 + rng.normal(0, 12, truth.shape), 0, 255).round()
    assert (noisy[~truth] > 0).mean() > 0.3  # what `> 0` would call lung
    np.testing.assert_array_equal(data_cleaning.binary_mask(noisy), truth)
    np.testing.assert_array_equal(data_cleaning.binary_mask(truth.astype(np.float32)), truth)  # 0/1
    np.testing.assert_array_equal(data_cleaning.binary_mask(truth * 65535.0), truth)  # 16-bit
    assert not data_cleaning.binary_mask(np.zeros((4, 4))).any()


def test_resume_from_the_command_line_and_a_file_in_place_of_output_dir(tmp_path):
    """RESUME=1 sets cfg.resume; OUTPUT_DIR naming a plain file ends the run with one `Output problem:` line
    naming it, exit status 1, the file untouched."""
    for value, expected in (("1", "True"), ("0", "False")):  # importing the script runs no cell: only its Config
        check = [sys.executable, "-c", "import lung_xray_unet as script; print(script.cfg.resume)"]
        run = subprocess.run(check, cwd=REPO_ROOT, env={**os.environ, "RESUME": value}, capture_output=True, text=True)
        assert run.stdout.strip() == expected, run.stderr
    in_the_way = tmp_path / "output"
    in_the_way.write_text("keep me")
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "IMAGES_DIR", "RESUME")}
    env |= {"OUTPUT_DIR": str(in_the_way / "lung"), "QUICK": "1", "OMP_NUM_THREADS": "1",
            "DATA_DIR": str(tmp_path / "data"), "IMAGES_DIR": str(tmp_path / "Images")}  # fmt: skip
    (tmp_path / "data").mkdir()
    result = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"Output problem: {in_the_way} is a file, where the folder {in_the_way / 'lung'} is needed: move the file "
        "away, or choose another output_dir"
    ]
    assert in_the_way.read_text() == "keep me"


def test_no_usable_case_is_one_clear_error(lx, tmp_path, capsys):
    empty = tmp_path / "MontgomerySet"
    (empty / "CXR_png").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(empty / "CXR_png" / "MCUCXR_0001_0.png")
    expected = "expected CXR_png/<name>.png with ManualMask/leftMask/<name>.png"
    with pytest.raises(data_cleaning.DatasetError, match=expected):
        lx.load_data(replace(lx.cfg, data_dir=tmp_path))
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
    cfg = replace(lx.cfg, data_dir=download.parent, loss=loss)
    films = lx.load_data(cfg).train[:2]
    img, seg = torch.stack([film["film"] for film in films]), torch.stack([film["lungs"] for film in films])
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


# %% The stages: data, training (resume, Ctrl-C, NaN, kill), a quick run of all the cells


def test_data_stage_splits_by_patient_and_decodes_the_films_at_the_network_size(lx, download, tmp_path, capsys):
    cfg = replace(lx.cfg, data_dir=download.parent, output_dir=tmp_path)
    data = lx.load_data(cfg)
    assert data.root == download and not data.synthetic  # data_dir holds the dataset: used as a real one
    assert "Using the real dataset in" in capsys.readouterr().out
    assert (len(data.train), len(data.val), len(data.test)) == (7, 2, 3)  # 12 films: 9 train+validation, 3 test
    assert str(data) == f"real dataset {download}: 7 train, 2 validation, 3 test films; 0 cases skipped"
    names = [[case["name"] for case in split] for split in (data.train, data.val, data.test)]
    assert len(set(sum(names, []))) == 12  # one film per patient: disjoint by film is disjoint by patient
    prepared = download.parent / "segmentation"
    assert sorted(names[2]) == names_in(prepared / "test" / "image")  # the prepared test split is the test set
    for case in data.train + data.val:
        assert case["film"].shape == case["lungs"].shape == (1, cfg.image_size, cfg.image_size)
        assert 0 <= case["film"].min() < case["film"].max() <= 1 and set(case["lungs"].unique().tolist()) == {0, 1}
        # The prepared PNGs shrunk by Pillow (antialiased bilinear, nearest neighbour): the same film and lungs.
        size = (cfg.image_size, cfg.image_size)
        film = Image.fromarray(read_png(case["image"]) / np.float32(65535)).resize(size, Image.Resampling.BILINEAR)
        assert np.abs(case["film"][0].numpy() - np.asarray(film)).mean() < 0.01
        lungs = np.asarray(Image.fromarray(read_png(case["seg"])).resize(size, Image.Resampling.NEAREST)) > 0
        assert mean_dice(case["lungs"].bool(), torch.from_numpy(lungs)[None]) > 0.97
    assert "film" not in data.test[0]  # read by the Inferencer, at the size its network was trained at
    assert [p.name for p in tmp_path.iterdir()] == ["skipped.csv"]  # the Data stage's one output: no case skipped
    assert pd.read_csv(tmp_path / "skipped.csv").empty


def tiny_data(value: float | None = None) -> data_cleaning.Data:
    """Four 32-px films with random masks (or filled with `value`) to train on and the same four to validate on,
    two per batch (the quick run's batch_size): an epoch of milliseconds."""
    generator = torch.Generator().manual_seed(0)
    img = torch.rand(4, 1, 32, 32, generator=generator) if value is None else torch.full((4, 1, 32, 32), value)
    seg = (torch.rand(4, 1, 32, 32, generator=generator) > 0.5).float()
    films = [{"name": f"film {i}", "film": img[i], "lungs": seg[i]} for i in range(4)]
    return data_cleaning.Data(Path("tiny"), True, train=films, val=films, unit="films")


def test_resume_goes_on_and_a_non_finite_loss_stops_keeping_the_best(lx, tmp_path, monkeypatch, capsys):
    import checkpoints

    plotted = []
    monkeypatch.setattr(checkpoints, "plot_dice_history", lambda dice, path, *a, **kw: plotted.append(list(dice)))
    cfg = replace(lx.cfg, output_dir=tmp_path, max_epochs=2)
    first = lx.Trainer(cfg, tiny_data(), lx.build_model(cfg)).fit()
    assert [row["epoch"] for row in first] == [1, 2]
    assert list(first[0]) == ["epoch", "train_loss", "val_loss", "val_dice", "val_mean_dice", "lr", "seconds"]

    history = lx.Trainer(replace(cfg, max_epochs=4, resume=True), tiny_data(), lx.build_model(cfg)).fit()
    assert "Resuming from" in capsys.readouterr().out and history.stopped is None
    assert [row["epoch"] for row in history] == [1, 2, 3, 4] and history[:2] == first
    assert pd.read_csv(tmp_path / "history.csv")["epoch"].tolist() == [1, 2, 3, 4]
    assert len(plotted[-1]) == 4  # the plot covers every epoch, those before the resume too
    last = torch.load(tmp_path / "last_checkpoint.pt", weights_only=True)
    assert last["epoch"] == 4 and {"model", "optimizer", "scheduler", "scaler", "history"} <= set(last)
    assert history[2]["lr"] != cfg.lr  # the cosine schedule went on from where it was, not from the start

    best_before = (tmp_path / "best_model.pt").read_bytes()
    best_epoch = torch.load(tmp_path / "best_model.pt", weights_only=True)["epoch"]
    stopped = lx.Trainer(replace(cfg, max_epochs=6, resume=True), tiny_data(float("nan")), lx.build_model(cfg)).fit()
    assert stopped == history  # stopped in epoch 5: nothing added
    out = capsys.readouterr().out
    assert f"Loss is nan at epoch 5, batch 0: stopping (try a lower lr than {cfg.lr}, or amp=False)" in out
    assert f"Kept: {tmp_path / 'best_model.pt'} (epoch {best_epoch})" in out and stopped.stopped
    assert (tmp_path / "best_model.pt").read_bytes() == best_before
    assert torch.load(tmp_path / "last_checkpoint.pt", weights_only=True)["epoch"] == 4
    with pytest.raises(SystemExit) as ended:  # the Train cell ends the run there: no test films segmented
        lx.end_if_stopped(stopped)
    assert ended.value.code == 1


def test_ctrl_c_stops_with_one_line_and_the_last_epoch_on_disk(lx, tmp_path, monkeypatch, capsys):
    cfg = replace(lx.cfg, output_dir=tmp_path, max_epochs=5)
    trainer = lx.Trainer(cfg, tiny_data(), lx.build_model(cfg))
    train_one_epoch = trainer.train_one_epoch

    def interrupted_in_epoch_3(epoch):
        if epoch == 3:
            raise KeyboardInterrupt
        return train_one_epoch(epoch)

    monkeypatch.setattr(trainer, "train_one_epoch", interrupted_in_epoch_3)
    history = trainer.fit()
    assert len(history) == 2
    last = tmp_path / "last_checkpoint.pt"
    assert capsys.readouterr().out.endswith(
        f"Interrupted during epoch 3: {last} holds epoch 2; run again with resume=True to go on from there\n"
    )
    assert torch.load(last, weights_only=True)["epoch"] == 2
    with pytest.raises(SystemExit) as ended:
        lx.end_if_stopped(history)
    assert ended.value.code == 130


def test_resume_with_another_network_is_one_clear_error(lx, tmp_path):
    cfg = replace(lx.cfg, output_dir=tmp_path, max_epochs=1)
    lx.Trainer(cfg, tiny_data(), lx.build_model(cfg)).fit()
    wider = replace(cfg, start_filters=2 * cfg.start_filters, resume=True, max_epochs=2)
    with pytest.raises(ValueError, match="last_checkpoint.pt was written with another configuration than this one"):
        lx.Trainer(wider, tiny_data(), lx.build_model(wider)).fit()


KILLED_RUN = """
import importlib.util, sys
from dataclasses import replace
sys.path.insert(0, {tests!r})
spec = importlib.util.spec_from_file_location("lung_xray_unet", {script!r})
lx = importlib.util.module_from_spec(spec)
sys.modules["lung_xray_unet"] = lx
spec.loader.exec_module(lx)
from test_lung_xray_unet import tiny_data
cfg = replace(lx.cfg, output_dir={out!r}, max_epochs=10_000, resume=True)
lx.Trainer(cfg, tiny_data(), lx.build_model(cfg)).fit()
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
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        cfg = replace(lx.cfg, data_dir=download.parent, output_dir=tmp_path / name, max_epochs=1, seed=seed)
        cfg = replace(cfg, images_dir=tmp_path / "Images")
        data = lx.load_data(cfg)
        history = lx.Trainer(cfg, data, lx.build_model(cfg)).fit()
        runs.append(([[case["name"] for case in split] for split in (data.train, data.val, data.test)], history[0]))
    (split_a, first_a), (split_b, first_b), (split_c, other) = runs
    assert split_a == split_b == split_c  # the split has its own seed (split_seed): a new seed keeps the test set
    assert first_a["train_loss"] == first_b["train_loss"] and first_a["val_dice"] == first_b["val_dice"]  # bitwise
    assert other["train_loss"] != first_a["train_loss"]  # the seed does reach the weights and the augmentation
    # A run on a real dataset (data_dir holds MontgomerySet) never copies its pictures to the README's folder.
    assert not data.synthetic and lx.readme_pictures(cfg, data, lx.PICTURES) == [] and not cfg.images_dir.exists()


def assert_learns_the_lungs(per_case: pd.DataFrame, download: Path, masks_dir: Path) -> None:
    """Every test film's Dice, at its original size, against an independent reference, and better by far than
    masks that do not look at the film: everything, or the mean lung shape of the training films (the synthetic
    lungs vary little, so the mean shape alone already scores about 0.87)."""
    assert per_case["dice"].mean() >= 0.85
    prepared = download.parent / "segmentation"
    mean_shape = np.mean([read_png(path) > 0 for path in (prepared / "train" / "mask").glob("*.png")], 0)
    mean_shape = Image.fromarray((mean_shape > 0.5).astype(np.uint8) * np.uint8(255))
    baseline = []
    for case in per_case.itertuples():
        masks = [download / "ManualMask" / side / f"{case.name}.png" for side in ("leftMask", "rightMask")]
        truth = torch.from_numpy(data_cleaning.read_lung_mask(masks, (case.height, case.width)))[None]
        predicted = read_png(masks_dir / f"{case.name}_mask.png") > 0
        assert case.dice == pytest.approx(mean_dice(torch.from_numpy(predicted)[None], truth))  # at the original size
        shape = np.asarray(mean_shape.resize((case.width, case.height), Image.Resampling.NEAREST)) > 0
        baseline.append(mean_dice(torch.from_numpy(shape)[None], truth))
        assert case.dice > max(baseline[-1], mean_dice(torch.ones_like(truth), truth) + 0.3), case.name
    assert per_case["dice"].mean() > np.mean(baseline) + 0.05


def assert_writes_history_checkpoint_masks_and_figures(cells: dict, download: Path) -> None:
    cfg, history, per_case = cells["cfg"], cells["history"], cells["per_case"]
    out = cfg.output_dir
    assert [row["epoch"] for row in history] == list(range(1, cfg.max_epochs + 1))
    csv = pd.read_csv(out / "history.csv")
    assert list(csv.columns) == ["epoch", "train_loss", "val_loss", "val_dice", "val_mean_dice", "lr", "seconds"]
    np.testing.assert_allclose(csv["val_dice"], [row["val_dice"] for row in history])
    assert csv["lr"].iloc[0] == cfg.lr and csv["lr"].is_monotonic_decreasing  # cosine-annealed
    best = history.best()
    assert best == max(history, key=lambda row: row["val_dice"])
    checkpoint = torch.load(out / "best_model.pt", weights_only=True)
    assert checkpoint["epoch"] == best["epoch"] and checkpoint["metric"] == pytest.approx(best["val_dice"])
    assert checkpoint["config"] == config_dict(cfg) and checkpoint["metrics"] == best
    cells["build_model"](cfg).load_state_dict(checkpoint["model"])  # strict: every weight is there
    assert set(torch.load(out / "last_checkpoint.pt", weights_only=True)) >= {"model", "optimizer", "scheduler"}
    pd.testing.assert_frame_equal(pd.read_csv(out / "test_per_case.csv"), per_case)
    assert list(per_case.columns) == ["name", "height", "width", "dice"]
    cases = pd.read_csv(download.parent / "segmentation" / "cases.csv")
    test_cases = cases[cases["split"] == "test"]
    # The Predict cell's default: the test films as downloaded, never trained on, each mask at its film's size.
    masks = [out / "predictions" / f"{name}_mask.png" for name in sorted(test_cases["name"])]
    assert cells["predictions"] == [*masks, out / "predictions" / "predictions.csv"]
    assert sorted(per_case["name"]) == sorted(test_cases["name"])
    for case in test_cases.itertuples():
        original = Image.open(download / "CXR_png" / f"{case.name}.png")
        predicted = Image.open(out / "predictions" / f"{case.name}_mask.png")
        assert predicted.size == original.size and set(np.unique(np.asarray(predicted))) == {0, 255}
    # The Inferencer, built from the checkpoint alone, gives the masks written: the original film prepared on the fly
    # is the prepared case, bit for bit.
    test = cells["data"].test
    saved = read_png(out / "predictions" / f"{test[0]['name']}_mask.png") > 0
    np.testing.assert_array_equal(cells["Inferencer"](cfg).predict(test[0]), saved)
    for figure in ("dice_per_epoch.png", "test_predictions.png", "batch.png"):
        with Image.open(out / figure) as image:
            assert image.format == "PNG" and image.width > 300, figure
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_quick_run_of_the_cells_learns_the_lungs_and_writes_every_output(download, tmp_path, run_cells, capsys):
    before = snapshot(download)
    data_dir, out_dir, images_dir = download.parent.parent, tmp_path / "out", tmp_path / "Images"
    cells = run_cells("lung_xray_unet", data_dir=data_dir, output_dir=out_dir, images_dir=images_dir, quick=True,
                      tensorboard=True)  # fmt: skip
    cfg, data, batch, history, per_case = (cells[name] for name in ("cfg", "data", "batch", "history", "per_case"))
    out = capsys.readouterr().out
    assert cfg.quick and (cfg.image_size, cfg.depth, cfg.max_epochs) == (64, 3, 20)  # the quick run's settings
    assert "Configuration: QUICK run, with " in out and f"using the SYNTHETIC sample in {download}" in out
    assert data.synthetic and (len(data.train), len(data.val), len(data.test)) == (7, 2, 3)
    img, seg = batch  # augmented, as the network gets it
    assert img.shape == seg.shape == (cfg.batch_size, 1, cfg.image_size, cfg.image_size) and img.dtype == torch.float32
    assert set(seg.unique().tolist()) == {0, 1}  # the mask stays binary through rotation, zoom and shift
    assert isinstance(cells["model"], torch.nn.Module)
    assert f"Training on {cells['DEVICE'].type}: 7 films, 4 steps per epoch" in out

    assert_learns_the_lungs(per_case, download, out_dir / "predictions")
    assert_writes_history_checkpoint_masks_and_figures(cells, download)
    assert snapshot(download) == before  # the run only read the download
    assert (download.parent / "segmentation" / "prepared.json").exists()  # prepared beside the sample it used
    assert not (data_dir / "segmentation").exists()

    # The synthetic sample was used: its figures are the README's pictures; the summary says where everything went.
    pictures = [images_dir / f"lung_xray_unet_{name}" for name in ("test_predictions.png", "dice_per_epoch.png")]
    for picture in pictures:
        assert picture.read_bytes() == (out_dir / picture.name.removeprefix("lung_xray_unet_")).read_bytes()
    summary = out[out.index("\nSummary (") :]
    best = history.best()
    assert f"data:    SYNTHETIC sample {download}: 7 train, 2 validation, 3 test films" in summary
    # The result is the test films' mean Dice (as published, each film once) with its bootstrap interval, computed
    # here from test_per_case.csv; validation's pooled Dice, which chose the epoch, comes after it.
    mean, low, high = bootstrap_ci(pd.read_csv(out_dir / "test_per_case.csv")["dice"])
    assert low <= mean <= high and mean == pytest.approx(per_case["dice"].mean())
    best_line = f"best:    epoch {best['epoch']} of {cfg.max_epochs}, test Dice {mean:.4f} (95% CI {low:.4f}-{high:.4f}"
    assert f"{best_line}, 3 films) at their original size; validation Dice {best['val_dice']:.4f} (pooled" in summary
    assert f"outputs: {out_dir}/" in summary and all(f"picture: {picture}" in summary for picture in pictures)


# %% Predict: the trained network on a user's own films (PNG, JPEG, DICOM of any size and bit depth)


@pytest.fixture(scope="module")
def trained(lx, download, tmp_path_factory):
    """A quick run trained once for this module (a few seconds): its configuration, output_dir holding best_model.pt."""
    out = tmp_path_factory.mktemp("trained")
    cfg = replace(lx.cfg, data_dir=download.parent, output_dir=out, images_dir=out / "Images")
    lx.Trainer(cfg, lx.load_data(cfg), lx.build_model(cfg)).fit()
    return cfg


def write_chest_dicom(path: Path, pixels: np.ndarray, spacing: tuple[float, float]) -> None:
    """An uncompressed 16-bit MONOCHROME2 radiograph (Computed Radiography) with its PixelSpacing (row, column)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality, ds.BodyPartExamined = "CR", "CHEST"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = list(spacing)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def truth_of(download: Path, name: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """The union of a download film's lung masks, bool, at its own size or resized (width, height) as its film was."""
    masks = [download / "ManualMask" / side / f"{name}.png" for side in ("leftMask", "rightMask")]
    truth = data_cleaning.read_lung_mask(masks, read_png(download / "CXR_png" / f"{name}.png").shape)
    if size is None:
        return truth
    return np.asarray(Image.fromarray(truth.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0


def user_folder(folder: Path, download: Path) -> dict:
    """A user's folder: film A as a 16-bit PNG of another size (600x500) and as an 8-bit JPEG, film B as a DICOM
    with PixelSpacing. Returns {file name: (download film, (width, height) or None, pixel spacing or None)}."""
    folder.mkdir()
    a, b = names_in(download / "CXR_png")[:2]
    film = Image.fromarray(read_png(download / "CXR_png" / f"{a}.png").astype(np.float32))  # 12-bit values
    stretched = np.asarray(film.resize((600, 500), Image.Resampling.BICUBIC)).clip(0, 4095)
    Image.fromarray((stretched * 16).astype(np.uint16)).save(folder / "film_a_16bit.png")  # 16 bits, 0..65535
    Image.fromarray((stretched / 16).astype(np.uint8)).save(folder / "film_a.jpg", quality=95)
    write_chest_dicom(folder / "film_b.dcm", read_png(download / "CXR_png" / f"{b}.png"), (0.5, 0.4))
    return {
        "film_a_16bit.png": (a, (600, 500), None),
        "film_a.jpg": (a, (600, 500), None),
        "film_b.dcm": (b, None, (0.5, 0.4)),
    }


def test_predict_on_a_folder_of_png_jpeg_and_dicom_films_at_their_own_size(lx, trained, download, tmp_path, capsys):
    films = user_folder(tmp_path / "mine", download)
    written = lx.predict(trained, tmp_path / "mine")
    out = trained.output_dir / "predictions"
    assert written == [out / f"{Path(name).stem}_mask.png" for name in sorted(films)] + [out / "predictions.csv"]
    assert f"Predicted 3 lung mask(s) in {out} (predictions.csv): no file skipped" in capsys.readouterr().out
    table = pd.read_csv(out / "predictions.csv")
    assert list(table.columns) == ["input", "mask", "height", "width", "lung_area_px", "lung_area_cm2"]
    masks = {}
    for row in table.itertuples():
        name, size, spacing = films[Path(row.input).name]
        assert Path(row.input) == tmp_path / "mine" / Path(row.input).name
        with Image.open(out / row.mask) as png:
            assert png.mode == "L" and png.format == "PNG"
            mask = np.asarray(png)
        truth = truth_of(download, name, size)
        assert mask.shape == truth.shape == (row.height, row.width)  # the film's own size, not the network's
        assert set(np.unique(mask)) == {0, 255} and row.lung_area_px == (mask > 0).sum()
        if spacing:  # a DICOM's pixel spacing gives the area in cm2: pixels x mm2 per pixel / 100
            assert row.lung_area_cm2 == pytest.approx((mask > 0).sum() * spacing[0] * spacing[1] / 100)
        else:
            assert np.isnan(row.lung_area_cm2)
        assert mean_dice(torch.from_numpy(mask > 0)[None], torch.from_numpy(truth)[None]) > 0.85, row.mask
        masks[Path(row.input).name] = torch.from_numpy(mask > 0)[None]
    # The same film as 16-bit PNG and 8-bit JPEG: the same lungs (percentile normalisation, not bit depth).
    assert mean_dice(masks["film_a_16bit.png"], masks["film_a.jpg"]) > 0.95


def test_a_damaged_file_is_named_and_skipped_and_no_input_is_modified(lx, trained, download, tmp_path, capsys):
    user_folder(tmp_path / "mine", download)
    damaged = tmp_path / "mine" / "damaged.png"
    damaged.write_bytes((tmp_path / "mine" / "film_a_16bit.png").read_bytes()[:3000])  # a download cut short
    (tmp_path / "mine" / "notes.txt").write_text("not a film")
    before = snapshot(tmp_path / "mine")
    written = lx.predict(trained, tmp_path / "mine")
    printed = capsys.readouterr().out.splitlines()
    for bad in (damaged, tmp_path / "mine" / "notes.txt"):
        assert len([line for line in printed if line.startswith(f"Skipped {bad}: unreadable image (")]) == 1
    assert printed[-1].endswith("predictions.csv): skipped 2 files (2 unreadable image)")
    assert [path.name for path in written] == ["film_a_mask.png", "film_a_16bit_mask.png", "film_b_mask.png",
                                               "predictions.csv"]  # fmt: skip
    assert len(pd.read_csv(written[-1])) == 3
    assert snapshot(tmp_path / "mine") == before  # the user's files only read


def test_the_checkpoints_preparation_wins_over_an_edited_configuration(lx, trained, download, tmp_path):
    user_folder(tmp_path / "mine", download)
    weights = trained.output_dir / "best_model.pt"
    first = lx.predict(replace(trained, output_dir=tmp_path / "as_trained", checkpoint=weights), tmp_path / "mine")
    edited = replace(trained, output_dir=tmp_path / "edited", checkpoint=weights, image_size=128, prepared_size=256,
                     threshold=0.9, depth=4, start_filters=4)  # fmt: skip
    second = lx.predict(edited, tmp_path / "mine")
    assert [path.name for path in first] == [path.name for path in second]
    for a, b in zip(first[:-1], second[:-1]):
        np.testing.assert_array_equal(read_png(a), read_png(b))
    pd.testing.assert_frame_equal(pd.read_csv(first[-1]), pd.read_csv(second[-1]))


def test_a_foreign_or_damaged_checkpoint_is_one_clear_error(lx, trained, tmp_path):
    from checkpoints import CheckpointError

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}, "config": {"foo": 1}, "epoch": 1, "metric": 0.0, "metric_name": "x"}, foreign)
    for path, says in ((garbage, "cannot be read as a checkpoint"), (foreign, "was written by another script")):
        with pytest.raises(CheckpointError, match=f"{path}.*{says}|{says}.*{path}"):
            lx.predict(replace(trained, checkpoint=path), [])


def test_default_inputs_are_the_held_out_test_films_as_downloaded(lx, trained, download):
    """Without inputs: the test films of the prepared split, from the download, each mask what the Inferencer gives
    for its prepared case (the film prepared on the fly as the preparation did), at the film's size."""
    written = lx.predict(trained)
    cases = pd.read_csv(download.parent / "segmentation" / "cases.csv")
    test = sorted(cases.loc[cases["split"] == "test", "name"])
    assert [path.name for path in written] == [f"{name}_mask.png" for name in test] + ["predictions.csv"]
    assert pd.read_csv(written[-1])["input"].tolist() == [str(download / "CXR_png" / f"{name}.png") for name in test]
    inferencer = lx.Inferencer(trained)
    for case, path in zip(lx.split_cases(download.parent / "segmentation", trained)[2], written):
        np.testing.assert_array_equal(read_png(path) > 0, inferencer.predict(case))


def test_predict_from_the_command_line_trains_nothing_and_a_bad_checkpoint_is_one_line(trained, download, repo_copy,
                                                                                        tmp_path):  # fmt: skip
    repo = repo_copy("lung_xray_unet.py")
    (repo / "output" / "lung_xray_unet").mkdir(parents=True)
    shutil.copy(trained.output_dir / "best_model.pt", repo / "output" / "lung_xray_unet" / "best_model.pt")
    user_folder(tmp_path / "mine", download)
    env = {k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "OUTPUT_DIR", "IMAGES_DIR")}
    env |= {"PREDICT": str(tmp_path / "mine"), "OMP_NUM_THREADS": "1", "QUICK": "0"}
    run = subprocess.run([sys.executable, str(repo / "lung_xray_unet.py")], env=env, capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Predicted 3 lung mask(s)" in run.stdout and "epoch" not in run.stdout.replace("(epoch ", "")
    out = repo / "output" / "lung_xray_unet"
    assert sorted(p.name for p in out.iterdir()) == ["best_model.pt", "predictions"]  # no history.csv, no training
    assert [p.name for p in (repo / "data").iterdir()] == ["README.md"]  # no data looked for, no sample written

    env["CHECKPOINT"] = str(tmp_path / "mine" / "film_a.jpg")
    run = subprocess.run([sys.executable, str(repo / "lung_xray_unet.py")], env=env, capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)  # fmt: skip
    assert run.returncode == 1 and "Traceback" not in run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith(f"Checkpoint problem: {tmp_path / 'mine' / 'film_a.jpg'} cannot be read as a checkpoint")
