"""covid_ct_segmentation.py and its input checks in data_cleaning.py: pairing and header checks of the challenge
files (bad inputs named, skipped and counted), a .gz damaged inside named in one line, the split by case, the
submission names, predictions mapped back onto each scan's exact grid (flipped axes included), Dice per case against
MONAI's DiceMetric, the loss against dice.py, and the stages: a quick run of all the cells on the synthetic sample,
started from another directory, must reach validation Dice 0.5 and write a submission with each scan's geometry;
fit resumes and stops on Ctrl-C or a NaN loss; evaluate_best and predict read the best weights back; the Predict
stage on a user's own CTs (NIfTI in any orientation, an oblique one, a DICOM series; damaged files among them),
with the checkpoint's settings whatever `cfg` says, and from the command line (PREDICT=...). The notebook run is in
test_notebooks.py, torchrun in test_distributed.py.

The script is loaded as a module with the quick-run switch on; the sample is written once per session (conftest).
"""

import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from monai.metrics import DiceMetric
from monai.transforms import Compose, Orientationd, Spacingd
from PIL import Image
from test_predict_inputs import write_series

from checkpoints import CheckpointError, History
from data_cleaning import DatasetError, Skipped, check_volume, find_covid_cases, read_dicom_series, save_mask_nifti
from dice import bootstrap_ci, describe_ci, soft_dice_loss

# MONAI's LoadImage warns on every set-up that its GPU DICOM decoder is missing (the script silences it; pytest
# resets warning filters per test).
pytestmark = [pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader"), pytest.mark.usefixtures("one_torch_thread")]
COVID = "COVID-19-20_v2"
TRAIN_IDS = ["0017", "0075", "0175", "0268", "0306", "0507", "0631", "0649"]  # the sample's labelled cases
VAL_IDS = ["0268", "0631"]  # the validation cases of the split with split_seed 0
TEST_IDS = ["0175", "0306"]  # its held-out test cases
TRAIN_SPLIT = ["0017", "0075", "0507", "0649"]  # and its training cases
FLIPPED = {"0175": ("L", "P", "I"), "0306": ("L", "A", "S")}  # slices feet to head, rows flipped
INFER_IDS = ["0041", "0812", "0842"]  # Validation/: the first two are stored LAS


@pytest.fixture(scope="module")
def covid(load_script):
    """The script as a module, loaded with QUICK=1 as CI runs it: its `__main__` cells do not run."""
    return load_script("covid_ct_segmentation")


@pytest.fixture
def covid_copy(sample_root, tmp_path):
    """A private copy of the synthetic download, to damage."""
    return Path(shutil.copytree(sample_root / COVID, tmp_path / "data" / COVID))


def tiny_config(covid, tmp_path, data_dir, **changes):
    """Settings for a run of a few seconds: 6 mm voxels, a tiny network, two epochs."""
    small = dict(
        data_dir=data_dir,
        output_dir=tmp_path / "output",
        images_dir=tmp_path / "Images",
        pixdim=(6.0, 6.0, 6.0),
        roi_size=(48, 48, 16),
        features=(4, 4, 8, 8, 16, 4),
        num_samples=2,
        max_epochs=2,
        val_interval=1,
        tta_flips=True,
        examples=2,
    )
    return replace(covid.cfg, **(small | changes))


def ct_path(root: Path, case_id: str, split: str = "Train", kind: str = "ct") -> Path:
    return root / split / f"volume-covid19-A-{case_id}_{kind}.nii.gz"


def assert_on_the_scans_grid(mask_path: Path, ct_file: Path) -> None:
    """A submitted mask: the scan's shape and affine exactly, uint8 0/1 (read back with nibabel)."""
    ct, mask = nib.load(ct_file), nib.load(mask_path)
    assert mask.shape == ct.shape and mask.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(mask.affine, ct.affine)
    assert set(np.unique(np.asanyarray(mask.dataobj))) <= {0, 1}


# Data: pairing, names, split


def test_cases_are_paired_by_id_and_named_as_the_challenge_expects(covid, sample_root, capsys):
    skipped = Skipped("file")
    cases = find_covid_cases(sample_root / COVID / "Train", skipped)
    assert [c["case"] for c in cases] == TRAIN_IDS and not skipped.counts
    for case in cases:
        assert Path(case["image"]) == ct_path(sample_root / COVID, case["case"])
        assert Path(case["label"]) == ct_path(sample_root / COVID, case["case"], kind="seg")
    unlabelled = find_covid_cases(sample_root / COVID / "Validation", skipped, labelled=False)
    assert [c["case"] for c in unlabelled] == INFER_IDS and all("label" not in c for c in unlabelled)
    assert capsys.readouterr().out == ""  # nothing to report on clean data
    # The baseline cut "volume-covid19-A-0" from its file names: A-0041 -> 041.nii.gz; the same names here.
    for case in unlabelled:
        name = Path(case["image"]).name
        assert covid.submission_name(case["case"]) == name[len("volume-covid19-A-0") : -len("_ct.nii.gz")] + ".nii.gz"
    assert covid.submission_name("0011") == "011.nii.gz" and covid.submission_name("0698") == "698.nii.gz"
    assert covid.submission_name("1234") == "1234.nii.gz"  # unique even past 999, where cutting a prefix is not


def test_split_is_by_case_seeded_and_the_test_cases_stay_when_val_fraction_or_seed_change(covid):
    cases = [{"case": f"{i:04d}"} for i in range(20)]
    ids = lambda group: [c["case"] for c in group]  # noqa: E731
    split = lambda **changes: [ids(side) for side in covid.split_by_case(cases, replace(covid.cfg, **changes))]  # noqa: E731
    train, val, test = split()
    assert (len(train), len(val), len(test)) == (12, 4, 4)  # 20% of the cases each for validation and test
    assert sorted(train + val + test) == ids(cases) and not (set(train) & set(val) or set(val) & set(test))
    assert not set(train) & set(test)  # each case one patient: no patient on two sides
    assert split() == [train, val, test]  # seeded
    assert split(val_fraction=0.4)[2] == test and len(split(val_fraction=0.4)[1]) == 8  # test drawn first
    assert split(seed=5) == [train, val, test]  # the training seed leaves the split alone
    assert split(split_seed=1)[2] != test  # the split's own seed draws another test set
    assert split(test_fraction=0)[2] == [] and len(split(test_fraction=0)[1]) == 4  # no test set asked for
    tiny = replace(covid.cfg, val_fraction=0.01, test_fraction=0.01)
    assert [len(side) for side in covid.split_by_case(cases[:3], tiny)] == [1, 1, 1]  # one on each side at least
    with pytest.raises(DatasetError, match="cannot be split"):
        covid.split_by_case(cases[:2], covid.cfg)


def test_the_samples_split_has_cases_on_all_three_sides(covid, sample_root, tmp_path, capsys):
    data = covid.load_data(tiny_config(covid, tmp_path, sample_root))
    assert [[c["case"] for c in side] for side in (data.train, data.val, data.test)] == [TRAIN_SPLIT, VAL_IDS, TEST_IDS]
    out = capsys.readouterr().out
    assert "Split by case (split_seed 0): validation cases 0268, 0631; test cases 0175, 0306" in out
    assert str(data).endswith("4 train, 2 validation, 2 test cases; 0 files skipped")


# Bad inputs: each named, skipped and counted


def save_like(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, affine), path)


def test_bad_inputs_are_named_skipped_and_counted(covid, covid_copy, tmp_path, capsys):
    train = covid_copy / "Train"
    seg = {i: nib.load(ct_path(covid_copy, i, kind="seg")) for i in TRAIN_IDS}
    ct_path(covid_copy, "0017", kind="seg").unlink()
    save_like(ct_path(covid_copy, "0075", kind="seg"), np.asanyarray(seg["0075"].dataobj)[:, :, 1:], seg["0075"].affine)
    shifted = seg["0175"].affine.copy()
    shifted[2, 3] += 2.0  # the mask 2 mm higher than its CT
    save_like(ct_path(covid_copy, "0175", kind="seg"), np.asanyarray(seg["0175"].dataobj), shifted)
    save_like(ct_path(covid_copy, "0268"), np.zeros((96, 96), np.int16), seg["0268"].affine)  # 2D
    save_like(ct_path(covid_copy, "0306", kind="seg"), np.zeros((96, 96, 29, 2), np.uint8), seg["0306"].affine)  # 4D
    whole = ct_path(covid_copy, "0507").read_bytes()
    ct_path(covid_copy, "0507").write_bytes(whole[: len(whole) // 2])  # an interrupted download
    ct_path(covid_copy, "0631", kind="seg").write_bytes(b"not a NIfTI file")
    shutil.copy(ct_path(covid_copy, "0649", kind="seg"), ct_path(covid_copy, "0999", kind="seg"))  # no CT
    (train / "notes.txt").write_text("a stray file")
    # A complete file made of two gzip members (as bgzip writes): its tail holds the last member's size only, and
    # it must not be taken for a truncated one.
    raw = gzip.decompress(ct_path(covid_copy, "0649").read_bytes())
    ct_path(covid_copy, "0649").write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))

    skipped = Skipped("file")
    cases = find_covid_cases(train, skipped)
    out = capsys.readouterr().out
    expected = [
        (train / "notes.txt", "unexpected name"),
        (ct_path(covid_copy, "0017"), "CT without mask"),
        (ct_path(covid_copy, "0075", kind="seg"), "mask shape differs (mask (96, 96, 28), CT (96, 96, 29))"),
        (ct_path(covid_copy, "0175", kind="seg"), "mask affine differs (from the CT's by up to 2 mm)"),
        (ct_path(covid_copy, "0268"), "not 3D (shape (96, 96): expected a 3D volume)"),
        (ct_path(covid_copy, "0306", kind="seg"), "not 3D (shape (96, 96, 29, 2)"),
        (ct_path(covid_copy, "0507"), "truncated"),
        (ct_path(covid_copy, "0631", kind="seg"), "unreadable (not a readable NIfTI file"),
        (ct_path(covid_copy, "0999", kind="seg"), "mask without CT (no volume-covid19-A-0999_ct.nii.gz)"),
    ]
    lines = out.splitlines()
    assert len(lines) == len(expected)
    for path, message in expected:
        assert any(line.startswith(f"Skipped {path}: {message}") for line in lines), (path, out)
    assert [c["case"] for c in cases] == ["0649"]
    assert skipped.counts == {
        "unexpected name": 1, "CT without mask": 1, "mask shape differs": 1, "mask affine differs": 1, "not 3D": 2,
        "truncated": 1, "unreadable": 1, "mask without CT": 1,
    }  # fmt: skip
    assert skipped.summary("Train").startswith("Train: skipped 9 files (2 not 3D, ")

    # The Data stage on that folder: the same skips, counted in `data`; one usable case is too few to split, a
    # single clear error (one line from the command line) before anything trains.
    with pytest.raises(
        DatasetError, match=r"1 usable labelled case\(s\) in .*Train: need 3 at least \(training, validation, test\)"
    ):
        covid.load_data(tiny_config(covid, tmp_path, covid_copy.parent))
    assert f"{train}: 1 usable labelled cases: skipped 9 files (2 not 3D, " in capsys.readouterr().out
    shutil.rmtree(train)
    with pytest.raises(DatasetError, match=r"Train not found: expected Train/ and Validation/ in"):
        covid.load_data(tiny_config(covid, tmp_path, covid_copy.parent))


# Geometry: predictions go back onto each scan's exact grid


def test_predictions_return_to_the_scans_own_grid_for_flipped_cases(covid, sample_root, tmp_path):
    """The true mask, resampled as the network sees its CT and mapped back with to_scan_grid, is the stored mask
    voxel for voxel; written as the Predict cell writes it (save_mask_nifti), it has the CT's shape, affine, qform
    and header codes (nibabel)."""
    cfg = replace(covid.cfg, pixdim=(1.5, 1.5, 2.5))  # finer than the scans: nearest neighbour loses nothing
    transforms = covid.build_transforms(cfg, "val")
    forward = Compose(
        [Orientationd("label", axcodes="RAS", labels=None), Spacingd("label", cfg.pixdim, mode="nearest")]
    )
    for case_id in [*FLIPPED, "0017"]:
        ct = nib.load(ct_path(sample_root / COVID, case_id))
        assert nib.aff2axcodes(ct.affine) == FLIPPED.get(case_id, ("L", "P", "S"))
        item = transforms(
            {"image": str(ct.get_filename()), "label": str(ct_path(sample_root / COVID, case_id, "Train", "seg"))}
        )
        assert nib.aff2axcodes(item["image"].affine.numpy()) == ("R", "A", "S")
        np.testing.assert_allclose(nib.affines.voxel_sizes(item["image"].affine.numpy()), cfg.pixdim, rtol=1e-6)
        resampled = forward({"label": item["label"].clone()})["label"]  # (1, X', Y', Z'), as a prediction would be
        assert resampled.shape == item["image"].shape and resampled.shape[1:] != ct.shape
        back = covid.to_scan_grid(resampled.as_tensor().float(), item["image"], transforms) > 0.5
        stored = np.asanyarray(nib.load(ct_path(sample_root / COVID, case_id, kind="seg")).dataobj) > 0
        assert back.shape == (1, *ct.shape)
        np.testing.assert_array_equal(back[0].numpy(), stored)

        path = tmp_path / covid.submission_name(case_id)
        save_mask_nifti(path, back[0].numpy(), ct.affine)
        written = nib.load(path)
        assert written.shape == ct.shape and written.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(written.affine, ct.affine)
        np.testing.assert_array_equal(written.get_qform(), ct.get_qform())
        for code in ("sform_code", "qform_code"):
            assert written.header[code] == ct.header[code] == 1  # scanner coordinates, as the CT
        np.testing.assert_array_equal(np.asanyarray(written.dataobj), stored)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["017.nii.gz", "175.nii.gz", "306.nii.gz"]  # no leftovers


class IntensityWindow(torch.nn.Module):
    """A stand-in network: 'lesion' wherever the scaled CT lies in a band around ground glass (-300 HU -> 0.47).

    It finds the lesions and, falsely, partial-volume voxels at the edges of the lungs: a Dice well between 0 and 1.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where((x > 0.40) & (x < 0.52), 8.0, -8.0)


def test_dice_per_case_matches_monai_on_the_scans_grid(covid, sample_root):
    cfg = replace(covid.cfg, roi_size=(48, 48, 16))
    transforms = covid.build_transforms(cfg, "val")
    cases = find_covid_cases(sample_root / COVID / "Train", Skipped("file"))[:4]
    val_ds = [transforms(dict(case)) for case in cases]
    dice, predictions = covid.score_cases(IntensityWindow(), val_ds, transforms, cfg, keep=4)
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    intersection, total = [], []  # per case, for the global Dice
    for case, pred in zip(cases, predictions, strict=True):
        seg = torch.from_numpy(np.asanyarray(nib.load(case["label"]).dataobj) > 0)[None, None]  # read independently
        assert pred.shape == seg.shape[1:] and pred.dtype == torch.bool
        metric(pred[None].float(), seg.float())
        intersection.append((pred[None] & seg).sum().item())
        total.append(pred.sum().item() + seg.sum().item())
    expected = metric.aggregate().flatten().double()
    np.testing.assert_allclose(dice.per_image().numpy(), expected.numpy(), rtol=1e-6)  # MONAI sums in float32
    assert 0.01 < expected.min() and expected.max() < 0.9  # neither nothing found nor a perfect overlap
    assert dice.mean() == pytest.approx(expected.mean().item())
    assert dice.global_dice() == pytest.approx(2 * sum(intersection) / sum(total))
    # The Train stage's row holds those two scores (here of the first two cases); the predictions of the first
    # `keep` cases only are kept.
    row = covid.evaluate(IntensityWindow(), val_ds[:2], transforms, cfg)
    assert row == pytest.approx(
        {"val_dice": expected[:2].mean().item(), "val_global_dice": 2 * sum(intersection[:2]) / sum(total[:2])}
    )
    assert len(covid.score_cases(IntensityWindow(), val_ds[:2], transforms, cfg, keep=1)[1]) == 1


# Transforms, model and loss


def test_training_crops_keep_image_and_mask_together(covid, sample_root):
    """Crops centred on lesions only (neg=0), every augmentation applied: each crop has lesion voxels, and they lie on
    ground glass in the image, so the mask moved with the CT through reorientation, resampling, affine and flips."""
    cfg = replace(covid.cfg, pos_neg=(1.0, 0.0), affine_prob=1.0, flip_prob=1.0, num_samples=4)
    transforms = covid.build_transforms(cfg, "train")
    transforms.set_random_state(seed=0)
    for case in find_covid_cases(sample_root / COVID / "Train", Skipped("file"))[:3]:
        crops = transforms(dict(case))
        assert len(crops) == 4
        for crop in crops:
            img, seg = crop["image"], crop["label"]
            assert type(img) is torch.Tensor and img.shape == seg.shape == (1, *cfg.roi_size)
            assert set(seg.unique().tolist()) == {0.0, 1.0}  # nearest neighbour: still binary
            assert -0.1 < img.min() and img.max() < 1.1  # the HU window's 0..1, plus noise of std 0.01
            # Ground glass (-300 HU) is 0.47 after the window, soft tissue 0.69, lung 0.10; partial volume at 4 mm
            # pulls the lesion's edge toward the lung around it, which stays darker.
            lesion = seg > 0
            around = (F.max_pool3d(lesion[None].float(), 3, stride=1, padding=1)[0] > 0) & ~lesion
            assert 0.3 < img[lesion].mean() < 0.55 and img[lesion].mean() > img[around].mean() + 0.05


def test_model_starts_near_the_lesion_prior_and_the_loss_is_dice_plus_bce(covid):
    cfg = covid.cfg
    model = covid.build_model(cfg).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 1, *cfg.roi_size))
    assert logits.shape == (2, 1, *cfg.roi_size)
    assert torch.sigmoid(logits).mean() < 0.05  # starts from "no lesion", not from a coin toss
    target = (torch.rand(3, 1, 16, 16, 8) > 0.9).float()
    target[1] = 0  # an empty crop: counted in the batch's Dice, not as a Dice of its own
    logits = torch.randn(3, 1, 16, 16, 8)
    expected = soft_dice_loss(logits, target, batch=True) + F.binary_cross_entropy_with_logits(logits, target)
    assert covid.build_loss()(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


# The stages


@pytest.mark.slow
def test_quick_run_of_the_cells_from_another_directory_reaches_the_dice_bar(
    sample_root, tmp_path, run_cells, monkeypatch, capfd
):
    """All the cells as `QUICK=1 python covid_ct_segmentation.py` runs them, started from another directory: the
    paths resolve against the script's folder (data/, output/, Images/ there), validation Dice reaches 0.5, and the
    submission has one mask per Validation/ scan with that scan's geometry."""
    root = tmp_path / "cells"  # run_cells runs the script from there: its ROOT
    (root / "data" / "sample").mkdir(parents=True)
    (root / "data" / "sample" / COVID).symlink_to(sample_root / COVID)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cells = run_cells("covid_ct_segmentation", quick=True)
    cfg, data, batch, history, per_case = (cells[name] for name in ("cfg", "data", "batch", "history", "per_case"))
    out, err = capfd.readouterr()
    assert cfg.quick and cfg.max_epochs == 14 and cfg.pixdim == (4.0, 4.0, 5.0)  # the quick run's settings
    assert "nvImageCodec" not in out + err  # MONAI's DICOM-decoder noise is silenced
    assert "Configuration: QUICK run, with " in out and str(data) in out
    assert f"using the SYNTHETIC sample in {root / 'data' / 'sample' / COVID}" in out
    assert data.synthetic and [c["case"] for c in data.val] == VAL_IDS and len(data.train) == 4
    assert [c["case"] for c in data.test] == TEST_IDS
    assert batch["image"].shape == (cfg.batch_size * cfg.num_samples, 1, *cfg.roi_size)
    assert batch["image"].dtype == torch.float32 and set(batch["label"].unique().tolist()) <= {0, 1}
    assert batch["label"].flatten(1).any(1).any()  # lesion-centred crops: some lesion in the batch
    assert isinstance(cells["model"], torch.nn.Module)

    assert len(history) == cfg.max_epochs
    table = pd.read_csv(root / "output" / "covid_ct_segmentation" / "history.csv")
    assert set(table.columns) == {"epoch", "train_loss", "val_dice", "val_global_dice", "lr", "seconds"}
    assert table.dropna()["epoch"].tolist() == [4, 8, 12, 14]  # every val_interval epochs, and the last
    best = history.best()
    assert best["val_dice"] == table["val_dice"].max() >= 0.5
    output = root / "output" / "covid_ct_segmentation"
    checkpoint = torch.load(output / "best_model.pt", weights_only=True)
    assert checkpoint["epoch"] == best["epoch"] and checkpoint["metric"] == pytest.approx(best["val_dice"])
    assert checkpoint["config"]["pixdim"] == (4.0, 4.0, 5.0) and checkpoint["config"]["quick"]
    cells["build_model"](cfg).load_state_dict(checkpoint["model"])  # strict: every weight is there

    # Evaluate: the best weights read back score every validation case as the best epoch did, then the test cases.
    val_per_case = pd.read_csv(output / "val_per_case.csv", dtype={"case": str})
    assert list(val_per_case.columns) == ["case", "dice"]  # no test-time augmentation in a quick run
    assert val_per_case["case"].tolist() == VAL_IDS and val_per_case["dice"].mean() == pytest.approx(best["val_dice"])
    assert list(per_case.columns) == ["case", "dice"] and per_case["case"].tolist() == TEST_IDS
    pd.testing.assert_frame_equal(pd.read_csv(output / "test_per_case.csv", dtype={"case": str}), per_case)
    assert per_case.attrs == {"scored": "test", "tta_flips": False, "val_dice": pytest.approx(best["val_dice"]),
                              "tta_compared": False}  # fmt: skip
    assert f"Test Dice {describe_ci(per_case['dice'], unit='cases')} per case" in out
    assert {p.name for p in output.iterdir()} == {
        "best_model.pt", "last_checkpoint.pt", "history.csv", "dice_per_epoch.png", "batch.png", "val_per_case.csv",
        "test_per_case.csv", "val_predictions.png", "predictions", "skipped.csv",
    }  # fmt: skip
    for name in ("dice_per_epoch.png", "batch.png", "val_predictions.png"):
        with Image.open(output / name) as figure:
            assert figure.format == "PNG" and figure.width > 200, name
    picture = root / "Images" / "covid_ct_segmentation_predictions.png"  # the sample was used: README picture
    assert picture.read_bytes() == (output / "val_predictions.png").read_bytes()
    summary = out[out.index("\nSummary (") :]
    assert "QUICK run" in summary and f"data:    SYNTHETIC sample {root / 'data' / 'sample' / COVID}" in summary
    headline = f"test Dice {describe_ci(per_case['dice'], unit='cases')} on each scan's grid, no flip TTA"
    assert f"best:    epoch {best['epoch']} of 14, {headline}" in summary
    assert f"; validation Dice {best['val_dice']:.4f} (mean over cases" in summary  # after the test figure
    assert f"outputs: {output}/" in summary and "predictions/ (3 masks and predictions.csv)" in summary
    assert f"picture: {picture}" in summary

    submission = ["041.nii.gz", "812.nii.gz", "842.nii.gz"]
    assert [p.name for p in cells["predictions"]] == [*submission, "predictions.csv"]
    assert sorted(p.name for p in (output / "predictions").iterdir()) == [*submission, "predictions.csv", "skipped.csv"]
    for case_id in INFER_IDS:
        assert_on_the_scans_grid(output / "predictions" / f"{case_id[1:]}.nii.gz",
                                 ct_path(sample_root / COVID, case_id, "Validation"))  # fmt: skip
    assert not any(elsewhere.iterdir())  # nothing written to the working directory


def test_fit_resumes_stops_on_ctrl_c_or_nan_and_the_best_weights_segment_on_the_scans_grid(
    covid, covid_copy, tmp_path, monkeypatch, capsys
):
    """One epoch, then `resume=True` up to two; Ctrl-C and a NaN loss stop with one line; evaluate_best and predict
    read best_model.pt back: scores as the best epoch, flip TTA, one mask per usable Validation/ scan (a truncated
    one named and skipped) with the scan's geometry, whatever voxel size `cfg` says now."""
    truncated = ct_path(covid_copy, INFER_IDS[2], "Validation")
    truncated.write_bytes(truncated.read_bytes()[:-5000])  # a scan to segment, interrupted while downloaded
    cfg = tiny_config(covid, tmp_path, covid_copy.parent, max_epochs=1)
    data = covid.load_data(cfg)
    assert f"Using the real dataset in {covid_copy}" in capsys.readouterr().out and not data.synthetic
    first = covid.fit(cfg, data, covid.build_model(cfg))
    cfg = replace(cfg, max_epochs=2, resume=True)
    history = covid.fit(cfg, data, covid.build_model(cfg))
    assert "1 epoch(s) done" in capsys.readouterr().out
    assert [row["epoch"] for row in history] == [1, 2] and history[0] == first[0]
    table = pd.read_csv(cfg.output_dir / "history.csv")
    assert list(table.columns) == ["epoch", "train_loss", "val_dice", "val_global_dice", "lr", "seconds"]
    np.testing.assert_allclose(table["val_dice"], [row["val_dice"] for row in history])
    best_path, last = cfg.output_dir / "best_model.pt", cfg.output_dir / "last_checkpoint.pt"
    checkpoint = torch.load(best_path, weights_only=True)
    assert {"model", "config", "epoch", "metric", "metric_name", "metrics"} <= set(checkpoint)
    best = history.best()
    assert best == max(history, key=lambda row: row["val_dice"])
    assert checkpoint["epoch"] == best["epoch"] and checkpoint["metric"] == best["val_dice"]
    assert checkpoint["config"]["pixdim"] == (6.0, 6.0, 6.0) and checkpoint["config"]["quick"]
    assert {"model", "optimizer", "epoch", "history"} <= set(torch.load(last, weights_only=True))
    kept = best_path.read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(covid, "train_one_epoch", interrupted)
    stopped = covid.fit(replace(cfg, max_epochs=3), data, covid.build_model(cfg))
    assert stopped == history
    message = f"Interrupted during epoch 3: {last} holds epoch 2; run again with resume=True"
    assert message in capsys.readouterr().out and stopped.stopped.startswith(message)
    assert best_path.read_bytes() == kept and torch.load(last, weights_only=True)["epoch"] == 2
    with pytest.raises(SystemExit) as ended:  # the Train cell ends the run there: no evaluation, no submission
        covid.end_if_stopped(stopped)
    assert ended.value.code == 130
    monkeypatch.undo()
    monkeypatch.setattr(covid, "build_loss", lambda: lambda logits, seg: (logits * float("nan")).mean())
    fresh = replace(cfg, output_dir=tmp_path / "nan", resume=False)
    stopped = covid.fit(fresh, data, covid.build_model(cfg))
    out = capsys.readouterr().out
    assert stopped == []
    assert "Loss is nan at epoch 1, batch 0: stopping (try a lower lr than 0.01, or amp=False). " in out
    assert out.rstrip().endswith("Kept: no checkpoint yet")
    with pytest.raises(SystemExit) as ended:
        covid.end_if_stopped(stopped)
    assert ended.value.code == 1

    per_case = covid.evaluate_best(cfg, data)
    val_per_case = pd.read_csv(cfg.output_dir / "val_per_case.csv", dtype={"case": str})
    assert list(val_per_case.columns) == ["case", "dice", "dice_tta"] and val_per_case["case"].tolist() == VAL_IDS
    assert val_per_case["dice"].mean() == pytest.approx(best["val_dice"])  # the checkpoint scores as it did
    out = capsys.readouterr().out
    flips = val_per_case["dice_tta"].mean() > val_per_case["dice"].mean()
    chosen = val_per_case["dice_tta" if flips else "dice"].mean()
    assert f"Best epoch {best['epoch']}: validation Dice {chosen:.4f}" in out
    assert (f"Flip test-time augmentation: validation Dice {val_per_case['dice_tta'].mean():.4f} with flips, "
            f"{val_per_case['dice'].mean():.4f} without: {'used' if flips else 'not used'}") in out  # fmt: skip
    assert per_case["case"].tolist() == TEST_IDS and per_case.attrs["tta_flips"] == flips
    pd.testing.assert_frame_equal(pd.read_csv(cfg.output_dir / "test_per_case.csv", dtype={"case": str}), per_case)
    saved = torch.load(best_path, weights_only=True)
    assert saved["choices"] == {"tta_flips": flips, "chosen_on": "validation"} and saved["epoch"] == best["epoch"]
    with Image.open(cfg.output_dir / "val_predictions.png") as figure:
        assert figure.format == "PNG" and figure.width > 2 * 200  # two cases side by side
    assert covid.readme_pictures(cfg, data, {"val_predictions.png": "x.png"}) == [] and not cfg.images_dir.exists()

    # One mask per usable Validation/ scan, NNN.nii.gz, with the scan's shape and affine (two are stored LAS).
    written = covid.predict(cfg, data.root / "Validation")
    out = capsys.readouterr().out
    assert f"Skipped {truncated}: truncated" in out and "skipped 1 file (1 truncated)" in out
    assert [p.name for p in written] == ["041.nii.gz", "812.nii.gz", "predictions.csv"]
    assert sorted(p.name for p in (cfg.output_dir / "predictions").iterdir()) == [
        *(p.name for p in written),
        "skipped.csv",
    ]
    listed = pd.read_csv(cfg.output_dir / "predictions" / "skipped.csv")  # the whole list behind the capped lines
    assert listed["file"].tolist() == [str(truncated)] and listed["problem"].tolist() == ["truncated"]
    # The summary counts the scans the Predict cell skipped (its data line counts the labelled Train/ files only).
    assert (
        covid.predicted(cfg, written) == "predictions/ (2 masks and predictions.csv; 1 scan skipped, listed in "
        "predictions/skipped.csv)"
    )
    masks = []
    for case_id, path in zip(INFER_IDS, written[:-1]):
        assert nib.aff2axcodes(nib.load(ct_path(covid_copy, case_id, "Validation")).affine) == ("L", "A", "S")
        assert_on_the_scans_grid(path, ct_path(covid_copy, case_id, "Validation"))
        masks.append(np.asanyarray(nib.load(path).dataobj))
    # The network reads scans prepared as it was trained (from its checkpoint), whatever the configuration now.
    other = replace(cfg, pixdim=(1.25, 1.25, 5.0), hu_window=(-500.0, 500.0), output_dir=tmp_path / "other",
                    checkpoint=best_path)  # fmt: skip
    for path, mask in zip(covid.predict(other, data.root / "Validation")[:-1], masks, strict=True):
        np.testing.assert_array_equal(np.asanyarray(nib.load(path).dataobj), mask)


def test_same_seed_same_split_and_same_first_epoch_on_the_cpu(covid, sample_root, tmp_path):
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        cfg = tiny_config(covid, tmp_path / name, sample_root, max_epochs=1, seed=seed, tta_flips=False)
        data = covid.load_data(cfg)
        history = covid.fit(cfg, data, covid.build_model(cfg))
        runs.append(([c["case"] for c in data.val], history[0]))
    (split_a, first_a), (split_b, first_b), (split_c, other) = runs
    assert split_a == split_b == split_c == VAL_IDS  # the training seed does not move the split (split_seed does)
    assert first_a["train_loss"] == first_b["train_loss"]  # bitwise
    assert first_a["val_dice"] == first_b["val_dice"] and other["train_loss"] != first_a["train_loss"]


def damage_inside(path: Path) -> None:
    """0xFF bytes over the second half of the deflate stream (all ones: codes and block types deflate has not): the
    NIfTI header (at the start) and the gzip trailer (CRC and length, the last 8 bytes) stay intact, so the file
    passes find_covid_cases' cheap checks."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:-8] = b"\xff" * (len(data) - 8 - middle)
    path.write_bytes(bytes(data))


def test_a_gz_damaged_inside_stops_training_in_one_line_and_is_skipped_when_segmenting(
    covid, covid_copy, tmp_path, capsys, trained
):
    damaged = ct_path(covid_copy, TRAIN_IDS[0])
    damage_inside(damaged)
    check_volume(damaged)  # header and length pass: only decompressing the voxels finds it
    with pytest.raises(Exception):  # noqa: B017 - the raw failure, deep in zlib or gzip, whatever its kind
        np.asanyarray(nib.load(damaged).dataobj)
    cfg = tiny_config(covid, tmp_path, covid_copy.parent, max_epochs=1)
    data = covid.load_data(cfg)
    assert data.train[0]["case"] == TRAIN_IDS[0]  # passed the header checks, in the first training batch
    # The Transforms cell's batch reads it first, then fit's cache: the same one line from both.
    for stage in (lambda: covid.preview_batch(cfg, data), lambda: covid.fit(cfg, data, covid.build_model(cfg))):
        with pytest.raises(DatasetError) as caught:
            stage()
        message = str(caught.value)
        assert message.startswith(f"{damaged} cannot be decompressed or decoded (")  # the CT alone: its mask is fine
        assert message.endswith("replace it, or move its case (_ct and _seg) out of Train/") and "\n" not in message

    # Segmenting a folder: the damaged scan is named, skipped and counted; the others are segmented.
    damage_inside(ct_path(covid_copy, INFER_IDS[1], "Validation"))
    capsys.readouterr()
    out_dir = tmp_path / "masks"
    written = covid.predict(replace(trained, output_dir=out_dir), covid_copy / "Validation")
    out = capsys.readouterr().out
    assert [p.name for p in written] == ["041.nii.gz", "842.nii.gz", "predictions.csv"]
    assert sorted(p.name for p in (out_dir / "predictions").iterdir()) == [p.name for p in written] + ["skipped.csv"]
    damaged_scan = ct_path(covid_copy, INFER_IDS[1], "Validation")
    assert f"Skipped {damaged_scan}: unreadable ({damaged_scan} cannot be decoded (" in out
    assert "Segmented 2 of 3 CTs into " in out and "skipped 1 file (1 unreadable)" in out


def test_the_disk_cache_preprocesses_each_case_once_rebuilds_what_changed_and_trains_as_without_it(
    covid, covid_copy, tmp_path, capsys
):
    """fit's loaders preprocess every case once into data/cache/covid_ct_segmentation/ (MONAI's PersistentDataset);
    the next run preprocesses none; a touched CT is preprocessed again, alone, and another window every case; a
    damaged entry is rebuilt with one line; the cases and the first batch are those of MONAI's CacheDataset."""
    from monai.utils import first

    cfg = tiny_config(covid, tmp_path, covid_copy.parent)
    data = covid.load_data(cfg)
    folder = covid_copy.parent / "cache" / "covid_ct_segmentation"
    capsys.readouterr()
    covid.build_loaders(cfg, data)
    out = capsys.readouterr().out
    assert f"Disk cache {folder}: 0 train cases read back, 4 preprocessed and written" in out
    assert f"Disk cache {folder}: 0 val cases read back, 4 preprocessed and written" in out  # validation and test
    loader, val_ds, _ = covid.build_loaders(cfg, data)
    out = capsys.readouterr().out
    assert ": 4 train cases read back, 0 preprocessed" in out and ": 4 val cases read back, 0 preprocessed" in out
    plain_loader, plain_val, _ = covid.build_loaders(replace(cfg, cache=False), data)
    assert "Disk cache" not in capsys.readouterr().out
    for item, reference in zip(val_ds, plain_val, strict=True):
        for key in ("image", "label"):
            assert torch.equal(item[key].as_tensor(), reference[key].as_tensor())
            assert torch.equal(item[key].affine, reference[key].affine)
        assert len(item["image"].applied_operations) == len(reference["image"].applied_operations)  # Invertd's
    batch, plain = first(loader), first(plain_loader)  # the same crops and augmentation from the same seeds
    assert torch.equal(batch["image"], plain["image"]) and torch.equal(batch["label"], plain["label"])

    touched = Path(data.train[0]["image"])
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    for leftover in ("tmpkilled", "tmpbuilding"):  # MONAI's temporary folders: of a build killed an hour ago, of one
        (folder / leftover).mkdir()  # running now
        (folder / leftover / "half.pt").write_bytes(b"half an entry")
    os.utime(folder / "tmpkilled", (time.time() - 3600,) * 2)
    covid.build_loaders(cfg, data)
    assert not (folder / "tmpkilled").exists() and (folder / "tmpbuilding" / "half.pt").is_file()
    out = capsys.readouterr().out
    assert ": 3 train cases read back, 1 preprocessed" in out and ": 4 val cases read back, 0 preprocessed" in out
    entry = val_ds.entry(val_ds.data[0])
    entry.write_bytes(entry.read_bytes()[:1000])  # cut short, as a full disk would leave it
    _, val_ds, _ = covid.build_loaders(cfg, data)
    assert torch.equal(val_ds[0]["image"].as_tensor(), plain_val[0]["image"].as_tensor())
    assert f"Cache entry {entry} cannot be read" in capsys.readouterr().out
    covid.build_loaders(replace(cfg, hu_window=(-900.0, 400.0)), data)  # another window: new entries
    out = capsys.readouterr().out
    assert ": 0 train cases read back, 4 preprocessed" in out and ": 0 val cases read back, 4 preprocessed" in out


# Predict: the user's own CTs, with the trained model


@pytest.fixture(scope="module")
def trained_once(covid, sample_root, tmp_path_factory, one_torch_thread):
    """The tiny configuration and its best_model.pt, trained once for this module (8 epochs at 6 mm, about 10 s on
    a CPU; it finds some lesion)."""
    # No test set here (test_fraction 0): the 6 training cases of 8 find lesion in 8 epochs; the 4 left beside a
    # test set do not (measured: validation Dice 0.000 at epochs 4 and 8), and these tests need a network that does.
    cfg = tiny_config(covid, tmp_path_factory.mktemp("covid_trained"), sample_root, max_epochs=8, val_interval=4,
                      tta_flips=False, test_fraction=0.0)  # fmt: skip
    covid.fit(cfg, covid.load_data(cfg), covid.build_model(cfg))
    return replace(cfg, checkpoint=cfg.output_dir / "best_model.pt")


@pytest.fixture
def trained(trained_once, tmp_path):
    """That configuration, its `checkpoint` the module's best_model.pt, writing to this test's own output_dir."""
    return replace(trained_once, output_dir=tmp_path / "output")


def full_masks(cases: list[dict], folder: Path) -> list[dict]:
    """The cases with their masks replaced by all-lesion ones on the same grid: other labels for those scans (any
    voxel predicted scores above 0)."""
    folder.mkdir()
    swapped = []
    for case in cases:
        seg = nib.load(case["label"])
        path = folder / Path(case["label"]).name
        nib.save(nib.Nifti1Image(np.ones(seg.shape, np.uint8), seg.affine), path)
        swapped.append(case | {"label": str(path)})
    return swapped


def test_the_test_cases_choose_nothing_and_are_scored_once_into_test_per_case(
    covid, trained, tmp_path, monkeypatch, capsys
):
    """Validation alone chooses flip TTA: the test cases are scored once, with the choice made, and other labels
    for them change their score but neither the choice nor anything validation wrote. test_per_case.csv holds one
    row per test case, its mean is the printed and summarised headline, and the interval holds it."""
    # The module's network, trained without a test set: evaluated here with the sample's test set, as a run with one
    # would evaluate (what chooses what is under test here, not the score).
    cfg = replace(trained, tta_flips=True, checkpoint=None, test_fraction=0.2)
    cfg.output_dir.mkdir(parents=True)
    shutil.copy(trained.checkpoint, cfg.output_dir / "best_model.pt")
    data = covid.load_data(cfg)
    calls, score_cases = [], covid.score_cases

    def spy(model, ds, transforms, cfg, tta=False, keep=0):
        calls.append(([ds[i]["case"] for i in range(len(ds))], tta))
        return score_cases(model, ds, transforms, cfg, tta, keep)

    monkeypatch.setattr(covid, "score_cases", spy)
    capsys.readouterr()
    first = covid.evaluate_best(cfg, data)
    out = capsys.readouterr().out
    flips = first.attrs["tta_flips"]
    assert calls == [(VAL_IDS, False), (VAL_IDS, True), (TEST_IDS, flips)]  # the test cases once, never compared
    val_table = pd.read_csv(cfg.output_dir / "val_per_case.csv", dtype={"case": str})
    assert flips == (val_table["dice_tta"].mean() > val_table["dice"].mean())
    table = pd.read_csv(cfg.output_dir / "test_per_case.csv", dtype={"case": str})
    assert list(table.columns) == ["case", "dice"] and table["case"].tolist() == TEST_IDS
    mean, low, high = bootstrap_ci(table["dice"])
    assert mean == pytest.approx(first["dice"].mean()) and low <= mean <= high
    assert f"Test Dice {describe_ci(table['dice'], unit='cases')} per case on each scan's grid (global " in out
    history = History([{"epoch": 8, "val_dice": 0.5, "val_global_dice": 0.6}])
    history.best_epoch = 8
    summary = covid.best_scores(history, first)
    assert summary.startswith(f"test Dice {describe_ci(table['dice'], unit='cases')} on each scan's grid, flip TTA ")
    assert summary.endswith("; validation Dice 0.5000 (mean over cases on each scan's grid; global 0.6000; it chose "
                            "the epoch)")  # fmt: skip

    kept = {name: (cfg.output_dir / name).read_bytes() for name in ("val_per_case.csv", "val_predictions.png")}
    choice = torch.load(cfg.output_dir / "best_model.pt", weights_only=True)["choices"]
    calls.clear()
    # Another test set: a scan the network finds lesion in (a training case: predict's tests), with other labels.
    second = covid.evaluate_best(cfg, replace(data, test=full_masks(data.train[:1], tmp_path / "other")))
    assert calls == [(VAL_IDS, False), (VAL_IDS, True), (TRAIN_SPLIT[:1], flips)]
    assert second.attrs == first.attrs  # the same choice, the same validation Dice
    assert torch.load(cfg.output_dir / "best_model.pt", weights_only=True)["choices"] == choice
    assert {name: (cfg.output_dir / name).read_bytes() for name in kept} == kept
    assert 0 < second["dice"][0] and second["dice"].mean() != first["dice"].mean()  # the test score saw them
    assert pd.read_csv(cfg.output_dir / "test_per_case.csv")["dice"].tolist() == second["dice"].tolist()

    no_test = covid.evaluate_best(cfg, replace(data, test=[]))  # test_fraction 0: validation's, said so
    assert no_test["case"].tolist() == VAL_IDS and no_test.attrs["scored"] == "validation"
    assert "No test set (test_fraction 0)" in capsys.readouterr().out
    assert "no test set (test_fraction 0): this score chose the model" in covid.best_scores(history, no_test)


def test_predict_uses_the_flip_choice_saved_with_the_weights_else_the_configuration(
    covid, trained, user_cts, tmp_path, monkeypatch, capsys
):
    checkpoint = torch.load(trained.checkpoint, weights_only=True)
    used, predict_probability = [], covid.predict_probability

    def spy(model, image, cfg, tta=False):
        used.append(tta)
        return predict_probability(model, image, cfg, tta)

    monkeypatch.setattr(covid, "predict_probability", spy)
    inputs = [user_cts[0] / "lps.nii.gz"]
    for choices, tta_flips, expected, line in (
        ({"tta_flips": False, "chosen_on": "validation"}, True, False, "Flip test-time augmentation off, as chosen "
         "by the Evaluate cell (validation)"),
        ({"tta_flips": True, "chosen_on": "validation"}, False, True, "Flip test-time augmentation on, as chosen by "
         "the Evaluate cell (validation)"),
        (None, True, True, "No flip TTA choice in the checkpoint (the Evaluate cell makes it on validation): "
         "tta_flips=True, from the configuration"),
    ):  # fmt: skip
        path = tmp_path / "best_model.pt"
        torch.save(checkpoint | ({"choices": choices} if choices else {}), path)
        used.clear()
        assert covid.predict(replace(trained, checkpoint=path, tta_flips=tta_flips), inputs)
        assert used == [expected] and line in capsys.readouterr().out


def rotation_about_z(degrees: float) -> np.ndarray:
    turn = np.eye(4)
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    turn[:2, :2] = [[c, -s], [s, c]]
    return turn


@pytest.fixture
def user_cts(sample_root, tmp_path) -> tuple[Path, nib.Nifti1Image]:
    """A folder of a user's CTs, all of one labelled sample scan (stored LPS): `lps.nii.gz` as stored, `oblique.nii`
    (uncompressed) with its affine turned 20 degrees about z, and `series/`, its DICOM series in shuffled file order
    with extension-less names. Returns (the folder, the scan)."""
    ct = nib.load(ct_path(sample_root / COVID, TRAIN_IDS[0]))
    assert nib.aff2axcodes(ct.affine) == ("L", "P", "S")
    folder = tmp_path / "my_scans"
    folder.mkdir()
    shutil.copy(ct.get_filename(), folder / "lps.nii.gz")
    hu = np.asanyarray(ct.dataobj)
    nib.save(nib.Nifti1Image(hu, rotation_about_z(20) @ ct.affine), folder / "oblique.nii")
    order = np.random.default_rng(0).permutation(hu.shape[2])
    write_series(folder / "series", hu, (1, 0, 0), (0, 1, 0), spacing=tuple(nib.affines.voxel_sizes(ct.affine)),
                 names=[f"IM{n:04d}" for n in range(hu.shape[2])], order=order)  # fmt: skip
    return folder, ct


def file_hashes(folder: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_predict_writes_a_mask_on_each_cts_own_grid_for_nifti_oblique_and_dicom_inputs(
    covid, trained, user_cts, capsys
):
    folder, ct = user_cts
    written = covid.predict(trained, folder)
    out = capsys.readouterr().out
    assert f"Predicting with {trained.checkpoint} (epoch 8, val_dice " in out and ", a QUICK run)" in out
    out_dir = trained.output_dir / "predictions"
    names = ["lps_lesions.nii.gz", "oblique_lesions.nii.gz", "series_lesions.nii.gz"]
    assert written == [out_dir / name for name in [*names, "predictions.csv"]]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        [*(p.name for p in written), "skipped.csv"]
    )  # no temporary
    assert f"Segmented 3 of 3 CTs into {out_dir} (masks, predictions.csv): no file skipped" in out
    hu, series_affine = read_dicom_series(folder / "series")
    expected_affines = [ct.affine, rotation_about_z(20) @ ct.affine, series_affine]
    table = pd.read_csv(written[-1])
    assert list(table.columns) == ["input", "mask", "lesion_ml", "voxels", "shape"]
    assert table["input"].tolist() == [str(folder / name) for name in ("lps.nii.gz", "oblique.nii", "series")]
    masks = []
    for row, path, affine in zip(table.itertuples(), written[:-1], expected_affines, strict=True):
        mask = nib.load(path)
        assert mask.shape == ct.shape == hu.shape and mask.get_data_dtype() == np.uint8
        # The input's affine as NIfTI stores it (float32): exactly, for the NIfTI inputs read back from their files.
        np.testing.assert_allclose(mask.affine, affine, rtol=0, atol=1e-5)
        assert mask.header["sform_code"] == mask.header["qform_code"] == 1
        data = np.asanyarray(mask.dataobj)
        assert set(np.unique(data)) <= {0, 1}
        voxel_mm3 = np.prod(nib.affines.voxel_sizes(mask.affine))  # recomputed from the file, not by volume_ml
        assert row.mask == path.name and row.voxels == data.sum() and row.shape == "x".join(map(str, ct.shape))
        assert row.lesion_ml == pytest.approx(data.sum() * voxel_mm3 / 1000, rel=1e-5)
        masks.append(data)
    np.testing.assert_array_equal(nib.load(written[0]).affine, ct.affine)
    np.testing.assert_array_equal(nib.load(written[1]).affine, nib.load(folder / "oblique.nii").affine)
    assert masks[0].sum() > 0  # the trained model finds some lesion: the volumes above are not all 0
    # A scan turned in scanner space is resampled along its own axes (MONAI's Spacingd keeps the rotation): the same
    # voxels, the same mask.
    np.testing.assert_array_equal(masks[1], masks[0])


def test_a_damaged_or_foreign_file_among_the_inputs_is_named_and_skipped_and_no_input_changes(
    covid, trained, user_cts, sample_root, capsys
):
    folder, ct = user_cts
    whole = (folder / "lps.nii.gz").read_bytes()
    (folder / "cut.nii.gz").write_bytes(whole[: len(whole) // 2])  # a download interrupted
    (folder / "notes.nii.gz").write_text("not a scan, renamed")
    shutil.copy(ct_path(sample_root / COVID, TRAIN_IDS[0], kind="seg"), folder / "a_mask.nii.gz")  # 0/1, not HU
    (folder / "report.pdf").write_bytes(b"%PDF-1.4")
    before = file_hashes(folder)
    written = covid.predict(trained, folder)
    out = capsys.readouterr().out
    assert [p.name for p in written] == [
        "lps_lesions.nii.gz", "oblique_lesions.nii.gz", "series_lesions.nii.gz", "predictions.csv"
    ]  # fmt: skip
    lines = [line for line in out.splitlines() if line.startswith("Skipped ")]
    assert lines == [
        f"Skipped {folder / 'a_mask.nii.gz'}: not a CT in HU ({folder / 'a_mask.nii.gz'}: nothing below -625 HU, no "
        "lung or air (a mask? a CT stored without its rescaling?))",
        f"Skipped {folder / 'cut.nii.gz'}: truncated ({folder / 'cut.nii.gz'}: the gzip data ends before the volume "
        "does)",
        lines[2],
        f"Skipped {folder / 'report.pdf'}: not a CT ({folder / 'report.pdf'} is neither a NIfTI file (.nii, .nii.gz) "
        "nor a folder of DICOM files)",
    ]
    assert lines[2].startswith(f"Skipped {folder / 'notes.nii.gz'}: unreadable (") and "\n" not in lines[2]
    assert "Segmented 3 of 7 CTs into " in out and "skipped 4 files (" in out
    assert "Traceback" not in out
    assert file_hashes(folder) == before  # the user's files are only read


def test_predict_prepares_scans_as_the_checkpoint_says_whatever_cfg_says_now(covid, trained, user_cts, capsys):
    folder, _ = user_cts
    inputs = [folder / "lps.nii.gz", folder / "series"]  # a list of inputs: a file and a series folder
    first = covid.predict(trained, inputs)
    other = replace(trained, pixdim=(3.0, 3.0, 3.0), hu_window=(-500.0, 200.0), roi_size=(32, 32, 32),
                    threshold=0.9, output_dir=trained.output_dir.parent / "other")  # fmt: skip
    second = covid.predict(other, inputs)
    assert "pixdim=(6.0, 6.0, 6.0), hu_window=(-1000.0, 500.0), roi_size=(48, 48, 16), threshold=0.5" in (
        capsys.readouterr().out
    )
    assert [p.name for p in second] == [p.name for p in first] == [
        "lps_lesions.nii.gz", "series_lesions.nii.gz", "predictions.csv"
    ]  # fmt: skip
    for a, b in zip(first[:-1], second[:-1], strict=True):
        assert np.array_equal(np.asanyarray(nib.load(a).dataobj), np.asanyarray(nib.load(b).dataobj))
        np.testing.assert_array_equal(nib.load(a).affine, nib.load(b).affine)
    assert first[-1].read_text().replace(str(trained.output_dir), "") == second[-1].read_text().replace(
        str(other.output_dir), ""
    )


def test_a_garbage_or_foreign_checkpoint_is_one_error_naming_it(covid, trained, tmp_path, user_cts):
    garbage, foreign = tmp_path / "garbage.pt", tmp_path / "other_script.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    torch.save({"model": {}, "config": {"foo": 1}, "epoch": 1, "metric": 0.0, "metric_name": "x"}, foreign)
    for path, words in ((garbage, "cannot be read as a checkpoint"), (foreign, "was written by another script")):
        with pytest.raises(CheckpointError) as caught:
            covid.predict(replace(trained, checkpoint=path), user_cts[0])
        assert str(caught.value).startswith(f"{path} {words}") and "\n" not in str(caught.value)
    assert not (trained.output_dir / "predictions").exists() or not any((trained.output_dir / "predictions").iterdir())


def test_the_command_line_predicts_a_folder_without_training(covid, trained, user_cts, repo_copy, tmp_path):
    repo = repo_copy("covid_ct_segmentation.py")
    output = repo / "output" / "covid_ct_segmentation"
    output.mkdir(parents=True)
    shutil.copy(trained.checkpoint, output / "best_model.pt")
    folder = user_cts[0]
    env = {k: v for k, v in os.environ.items() if k not in ("PREDICT", "CHECKPOINT", "QUICK")}

    def run(**variables) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "covid_ct_segmentation.py"], cwd=repo, env=env | variables,
                              capture_output=True, text=True, timeout=600)  # fmt: skip

    result = run(PREDICT=str(folder), OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr
    assert f"Predicting with {output / 'best_model.pt'} (epoch 8" in result.stdout
    assert "Segmented 3 of 3 CTs into " in result.stdout
    assert "epoch " not in result.stdout.replace("(epoch 8", "") and not (output / "history.csv").exists()
    assert sorted(p.name for p in (output / "predictions").iterdir()) == [
        "lps_lesions.nii.gz", "oblique_lesions.nii.gz", "predictions.csv", "series_lesions.nii.gz", "skipped.csv"
    ]  # fmt: skip
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    result = run(PREDICT=str(folder), CHECKPOINT=str(garbage), OMP_NUM_THREADS="1")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    problems = [line for line in result.stderr.splitlines() if line.startswith("Checkpoint problem: ")]
    assert len(problems) == 1 and str(garbage) in problems[0]
