"""covid_ct_segmentation.py: pairing and header checks of the challenge files (bad inputs named, skipped and
counted), the split by case, the submission names, predictions mapped back onto each scan's exact grid (flipped
axes included), Dice per case against MONAI's DiceMetric, the loss against dice.py, and runs of the script: a tiny
one in-process and the real quick run as a subprocess, which must reach validation Dice 0.5 (the notebook run is
in test_notebooks.py).

The script is loaded as a module with the quick-run switch on; the sample is written once per session (conftest).
"""

import gzip
import re
import shutil
import subprocess
import sys
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

from data_cleaning import DatasetError, Skipped
from dice import soft_dice_loss

# MONAI's LoadImage warns on every set-up that its GPU DICOM decoder is missing (the script silences it; pytest
# resets warning filters per test).
pytestmark = [pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader"), pytest.mark.usefixtures("one_torch_thread")]
COVID = "COVID-19-20_v2"
TRAIN_IDS = ["0017", "0075", "0175", "0268", "0306", "0507", "0631", "0649"]  # the sample's labelled cases (seed 0)
FLIPPED = {"0175": ("L", "P", "I"), "0306": ("L", "A", "S")}  # slices feet to head, rows flipped
INFER_IDS = ["0041", "0812", "0842"]  # Validation/: the first two are stored LAS


@pytest.fixture(scope="module")
def covid(load_script):
    """The script as a module, loaded with QUICK=1 as CI runs it: its `__main__` cell does not run."""
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
    return replace(covid.Config(), **(small | changes))


def ct_path(root: Path, case_id: str, split: str = "Train", kind: str = "ct") -> Path:
    return root / split / f"volume-covid19-A-{case_id}_{kind}.nii.gz"


# Data: pairing, names, split


def test_cases_are_paired_by_id_and_named_as_the_challenge_expects(covid, sample_root, capsys):
    skipped = Skipped("file")
    cases = covid.find_cases(sample_root / COVID / "Train", skipped)
    assert [c["case"] for c in cases] == TRAIN_IDS and not skipped.counts
    for case in cases:
        assert Path(case["image"]) == ct_path(sample_root / COVID, case["case"])
        assert Path(case["label"]) == ct_path(sample_root / COVID, case["case"], kind="seg")
    unlabelled = covid.find_cases(sample_root / COVID / "Validation", skipped, labelled=False)
    assert [c["case"] for c in unlabelled] == INFER_IDS and all("label" not in c for c in unlabelled)
    assert capsys.readouterr().out == ""  # nothing to report on clean data
    # The baseline cut "volume-covid19-A-0" from its file names: A-0041 -> 041.nii.gz; the same names here.
    for case in unlabelled:
        name = Path(case["image"]).name
        assert covid.submission_name(case["case"]) == name[len("volume-covid19-A-0") : -len("_ct.nii.gz")] + ".nii.gz"
    assert covid.submission_name("0011") == "011.nii.gz" and covid.submission_name("0698") == "698.nii.gz"
    assert covid.submission_name("1234") == "1234.nii.gz"  # unique even past 999, where cutting a prefix is not


def test_split_is_by_case_seeded_and_never_empty(covid):
    cases = [{"case": f"{i:04d}"} for i in range(20)]
    ids = lambda group: [c["case"] for c in group]  # noqa: E731
    train, val = covid.split_by_case(cases, 0.2, seed=0)
    assert len(val) == 4 and sorted(ids(train) + ids(val)) == ids(cases) and not set(ids(train)) & set(ids(val))
    assert ids(covid.split_by_case(cases, 0.2, seed=0)[1]) == ids(val)
    assert ids(covid.split_by_case(cases, 0.2, seed=1)[1]) != ids(val)
    assert [len(g) for g in covid.split_by_case(cases[:2], 0.01, seed=0)] == [1, 1]  # one on each side at least
    with pytest.raises(DatasetError, match="at least 2"):
        covid.split_by_case(cases[:1], 0.2, seed=0)


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
    cases = covid.find_cases(train, skipped)
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

    # One usable case is too few to split: a single clear error (one line from the Run cell), before any training.
    with pytest.raises(DatasetError, match=r"1 usable labelled case\(s\) in .*Train: need 2 at least"):
        covid.main(tiny_config(covid, tmp_path, covid_copy.parent))
    shutil.rmtree(train)
    with pytest.raises(DatasetError, match=r"Train not found: expected Train/ and Validation/ in"):
        covid.main(tiny_config(covid, tmp_path, covid_copy.parent))


# Geometry: predictions go back onto each scan's exact grid


def test_predictions_return_to_the_scans_own_grid_for_flipped_cases(covid, sample_root, tmp_path):
    """The true mask, resampled as the network sees its CT and mapped back with to_scan_grid, is the stored mask
    voxel for voxel; written with write_mask, it has the CT's shape, affine and header codes (nibabel)."""
    cfg = replace(covid.Config(), pixdim=(1.5, 1.5, 2.5))  # finer than the scans: nearest neighbour loses nothing
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
        covid.write_mask(back[0].numpy(), ct, path)
        written = nib.load(path)
        assert written.shape == ct.shape and written.get_data_dtype() == np.uint8
        np.testing.assert_array_equal(written.affine, ct.affine)
        np.testing.assert_array_equal(written.get_qform(), ct.get_qform())
        for code in ("sform_code", "qform_code"):
            assert written.header[code] == ct.header[code] == 1  # scanner coordinates, as the CT
        np.testing.assert_array_equal(np.asanyarray(written.dataobj), stored)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["017.nii.gz", "175.nii.gz", "306.nii.gz"]  # no leftovers
    with pytest.raises(ValueError, match="does not match its scan"):
        covid.write_mask(stored[1:], ct, tmp_path / "bad.nii.gz")


class IntensityWindow(torch.nn.Module):
    """A stand-in network: 'lesion' wherever the scaled CT lies in a band around ground glass (-300 HU -> 0.47).

    It finds the lesions and, falsely, partial-volume voxels at the edges of the lungs: a Dice well between 0 and 1.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where((x > 0.40) & (x < 0.52), 8.0, -8.0)


def test_dice_per_case_matches_monai_on_the_scans_grid(covid, sample_root):
    cfg = replace(covid.Config(), roi_size=(48, 48, 16))
    transforms = covid.build_transforms(cfg, "val")
    cases = covid.find_cases(sample_root / COVID / "Train", Skipped("file"))[:4]
    val_ds = [transforms(dict(case)) for case in cases]
    dice, predictions = covid.evaluate(IntensityWindow(), val_ds, transforms, torch.device("cpu"), cfg)
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    intersection = total = 0
    for case, pred in zip(cases, predictions):
        seg = torch.from_numpy(np.asanyarray(nib.load(case["label"]).dataobj) > 0)[None, None]  # read independently
        assert pred.shape == seg.shape[1:] and pred.dtype == torch.bool
        metric(pred[None].float(), seg.float())
        intersection += (pred[None] & seg).sum().item()
        total += pred.sum().item() + seg.sum().item()
    expected = metric.aggregate().flatten().double()
    np.testing.assert_allclose(dice.per_image().numpy(), expected.numpy(), rtol=1e-6)  # MONAI sums in float32
    assert 0.01 < expected.min() and expected.max() < 0.9  # neither nothing found nor a perfect overlap
    assert dice.mean() == pytest.approx(expected.mean().item())
    assert dice.global_dice() == pytest.approx(2 * intersection / total)


# Transforms, model and loss


def test_training_crops_keep_image_and_mask_together(covid, sample_root):
    """Crops centred on lesions only (neg=0), every augmentation applied: each crop has lesion voxels, and they lie on
    ground glass in the image, so the mask moved with the CT through reorientation, resampling, affine and flips."""
    cfg = replace(covid.Config(), pos_neg=(1.0, 0.0), affine_prob=1.0, flip_prob=1.0, num_samples=4)
    transforms = covid.build_transforms(cfg, "train")
    transforms.set_random_state(seed=0)
    for case in covid.find_cases(sample_root / COVID / "Train", Skipped("file"))[:3]:
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
    cfg = covid.Config()
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


# Runs of the script


def test_tiny_run_resumes_and_writes_every_output_with_the_scans_geometry(covid, covid_copy, tmp_path, capsys):
    """One epoch, then `resume=True` up to two: every output, and one mask per Validation/ scan with its geometry."""
    whole = ct_path(covid_copy, INFER_IDS[2], "Validation").read_bytes()
    ct_path(covid_copy, INFER_IDS[2], "Validation").write_bytes(whole[:-5000])  # a truncated scan to segment
    cfg = tiny_config(covid, tmp_path, covid_copy.parent, max_epochs=1)
    first = covid.main(replace(cfg, tta_flips=False, max_infer_cases=0))  # the first run's end kept short
    capsys.readouterr()
    history = covid.main(replace(cfg, max_epochs=2, resume=True))
    out = capsys.readouterr().out
    assert f"Using the real dataset in {covid_copy}" in out and "Resuming from" in out
    assert [row["epoch"] for row in history] == [1, 2] and history[0] == first[0]
    summary = out[out.index("\nSummary (") :]
    assert "QUICK run" in summary and "data:    real dataset" in summary and "best:    epoch" in summary
    table = pd.read_csv(cfg.output_dir / "history.csv")
    assert list(table.columns) == ["epoch", "train_loss", "val_dice", "val_global_dice", "seconds"]
    np.testing.assert_allclose(table["val_dice"], [row["val_dice"] for row in history])

    checkpoint = torch.load(cfg.output_dir / "best_model.pt", weights_only=True)
    assert {"model", "optimizer", "epoch", "config", "metric", "metric_name"} <= set(checkpoint)
    best = max(history, key=lambda row: row["val_dice"])
    assert checkpoint["epoch"] == best["epoch"] and checkpoint["metric"] == best["val_dice"]
    assert checkpoint["config"]["pixdim"] == (6.0, 6.0, 6.0) and checkpoint["config"]["quick"]
    assert torch.load(cfg.output_dir / "last_checkpoint.pt", weights_only=True)["epoch"] == 2
    per_case = pd.read_csv(cfg.output_dir / "val_dice_per_case.csv", dtype={"case": str})
    assert list(per_case.columns) == ["case", "dice", "dice_tta"] and len(per_case) == 2
    assert per_case["dice"].mean() == pytest.approx(best["val_dice"])  # the checkpoint scores as it did
    for name in ("dice_per_epoch.png", "val_predictions.png"):
        with Image.open(cfg.output_dir / name) as img:
            assert img.format == "PNG" and img.width > 200
    assert not cfg.images_dir.exists()  # pictures of real patients never go to the README's folder

    # One mask per usable Validation/ scan, NNN.nii.gz, with the scan's shape and affine (two are stored LAS).
    truncated = ct_path(covid_copy, INFER_IDS[2], "Validation")
    assert f"Skipped {truncated}: truncated" in out and "skipped 1 file (1 truncated)" in out
    written = sorted(p.name for p in (cfg.output_dir / "submission").iterdir())
    assert written == ["041.nii.gz", "812.nii.gz"]
    for case_id in INFER_IDS[:2]:
        ct = nib.load(ct_path(covid_copy, case_id, "Validation"))
        mask = nib.load(cfg.output_dir / "submission" / covid.submission_name(case_id))
        assert mask.shape == ct.shape and nib.aff2axcodes(ct.affine) == ("L", "A", "S")
        np.testing.assert_array_equal(mask.affine, ct.affine)
        assert mask.get_data_dtype() == np.uint8 and set(np.unique(np.asanyarray(mask.dataobj))) <= {0, 1}


def test_a_loss_that_is_not_finite_stops_training_with_one_line(covid, covid_copy, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(covid, "build_loss", lambda: lambda logits, seg: (logits * float("nan")).mean())
    history = covid.main(tiny_config(covid, tmp_path, covid_copy.parent))
    out = capsys.readouterr().out
    assert history == []
    assert "Loss is nan at epoch 1, batch 0: stopping (try a lower lr than 0.01, or amp=False). " in out
    assert out.rstrip().endswith("Kept: no checkpoint yet") and "Summary" not in out


def test_ctrl_c_stops_with_one_line_and_the_last_epoch_on_disk(covid, covid_copy, tmp_path, monkeypatch, capsys):
    cfg = tiny_config(covid, tmp_path, covid_copy.parent, max_epochs=1, tta_flips=False, max_infer_cases=0)
    covid.main(cfg)
    best = (cfg.output_dir / "best_model.pt").read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(covid, "train_one_epoch", interrupted)
    capsys.readouterr()
    assert len(covid.main(replace(cfg, max_epochs=3, resume=True))) == 1
    last = cfg.output_dir / "last_checkpoint.pt"
    out = capsys.readouterr().out
    assert f"Interrupted during epoch 2: {last} holds epoch 1; run again with resume=True" in out
    assert "Summary" not in out and (cfg.output_dir / "best_model.pt").read_bytes() == best
    assert torch.load(last, weights_only=True)["epoch"] == 1


def test_same_seed_same_split_and_same_first_epoch_on_the_cpu(covid, sample_root, tmp_path, capsys):
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        cfg = tiny_config(covid, tmp_path / name, sample_root, max_epochs=1, seed=seed, tta_flips=False)
        cfg = replace(cfg, max_infer_cases=0)
        history = covid.main(cfg)
        split = re.search(r"Split by case \(seed \d\): (.*) at", capsys.readouterr().out).group(1)
        runs.append((split, history[0]))
    (split_a, first_a), (split_b, first_b), (_, other) = runs
    assert split_a == split_b and first_a["train_loss"] == first_b["train_loss"]  # bitwise
    assert first_a["val_dice"] == first_b["val_dice"] and other["train_loss"] != first_a["train_loss"]


@pytest.mark.slow
def test_quick_run_from_another_directory_reaches_the_dice_bar(sample_root, tmp_path, monkeypatch, repo_copy):
    """`QUICK=1 python path/to/covid_ct_segmentation.py` as it is (about a minute on one CPU thread), started from
    another directory: paths resolve against the script's folder, and validation Dice reaches 0.5."""
    repo = repo_copy("covid_ct_segmentation.py", {f"sample/{COVID}": sample_root / COVID})
    monkeypatch.setenv("QUICK", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = subprocess.run(
        [sys.executable, str(repo / "covid_ct_segmentation.py")], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"using the SYNTHETIC sample in {repo / 'data' / 'sample' / COVID}" in result.stdout
    assert "nvImageCodec" not in result.stdout + result.stderr  # MONAI's DICOM-decoder noise is silenced
    output = repo / "output" / "covid_ct_segmentation"
    assert {p.name for p in output.iterdir()} == {
        "best_model.pt", "last_checkpoint.pt", "history.csv", "dice_per_epoch.png", "val_dice_per_case.csv",
        "val_predictions.png", "submission",
    }  # fmt: skip
    assert sorted(p.name for p in (output / "submission").iterdir()) == ["041.nii.gz", "812.nii.gz", "842.nii.gz"]
    summary = result.stdout[result.stdout.index("\nSummary (") :]
    assert "QUICK run" in summary and "data:    SYNTHETIC sample" in summary and f"outputs: {output}/" in summary
    picture = repo / "Images" / "covid_ct_segmentation_predictions.png"
    assert f"picture: {picture}" in summary and picture.read_bytes() == (output / "val_predictions.png").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # nothing written to the working directory
    history = pd.read_csv(output / "history.csv")
    assert history["val_dice"].max() >= 0.5
    per_case = pd.read_csv(output / "val_dice_per_case.csv")
    assert list(per_case.columns) == ["case", "dice"]  # no test-time augmentation in a quick run
    assert per_case["dice"].mean() == pytest.approx(history["val_dice"].max())


def damage_inside(path: Path) -> None:
    """0xFF bytes over the second half of the deflate stream (all ones: codes and block types deflate has not): the
    NIfTI header (at the start) and the gzip trailer (CRC and length, the last 8 bytes) stay intact, so the file
    passes find_cases' cheap checks."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:-8] = b"\xff" * (len(data) - 8 - middle)
    path.write_bytes(bytes(data))


def test_a_gz_damaged_inside_stops_training_in_one_line_and_is_skipped_when_segmenting(
    covid, covid_copy, tmp_path, capsys
):
    damaged = ct_path(covid_copy, TRAIN_IDS[0])
    damage_inside(damaged)
    covid.check_volume(damaged)  # header and length pass: only decompressing the voxels finds it
    with pytest.raises(Exception):  # noqa: B017 - the raw failure, deep in zlib or gzip, whatever its kind
        np.asanyarray(nib.load(damaged).dataobj)
    cfg = tiny_config(covid, tmp_path, covid_copy.parent, max_epochs=1)
    with pytest.raises(DatasetError) as caught:
        covid.main(cfg)
    message = str(caught.value)
    assert message.startswith(f"{damaged} cannot be decompressed or decoded (")  # the CT alone: its mask is fine
    assert message.endswith("replace it, or move its case (_ct and _seg) out of Train/") and "\n" not in message

    # Segmenting a folder: the damaged scan is named, skipped and counted; the others are segmented.
    damage_inside(ct_path(covid_copy, INFER_IDS[1], "Validation"))
    model = covid.build_model(cfg)
    out_dir = tmp_path / "masks"
    out_dir.mkdir()
    capsys.readouterr()
    written = covid.predict_folder(model, covid_copy / "Validation", covid.build_transforms(cfg, "infer"),
                                   torch.device("cpu"), replace(cfg, tta_flips=False), out_dir)  # fmt: skip
    out = capsys.readouterr().out
    assert sorted(p.name for p in written) == ["041.nii.gz", "842.nii.gz"]
    damaged_scan = ct_path(covid_copy, INFER_IDS[1], "Validation")
    assert f"Skipped {damaged_scan}: unreadable (cannot be decompressed or decoded (" in out
    assert "skipped 1 file (1 unreadable)" in out
