"""nerve_ultrasound_segmentation.py and its cleaning step: the Kaggle run-length encoding against train_masks.csv,
the split by subject, contradictory near-duplicates, the minimum-area filter, bad input files named and counted,
and the stages: a quick run of all the cells on the synthetic sample must beat the all-empty baseline and write a
submission; fit resumes and stops on Ctrl-C or a NaN loss; the Predict cell on a user's own frames (any size, 8 or
16 bits, damaged files among them) with the checkpoint's settings, and from the command line.

The script is loaded as a module with the quick-run switch on; the sample is written once per session (conftest).
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from checkpoints import CheckpointError
from data_cleaning import (
    DatasetError,
    find_contradictory_pairs,
    find_near_duplicates,
    frame_signature,
    rle_decode,
    rle_encode,
)

NERVE = "ultrasound-nerve-segmentation"
SHAPE = (420, 580)  # (height, width)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def nerve(load_script):
    """The script as a module, loaded with QUICK=1 as CI runs it (the configuration cell reads it once)."""
    return load_script("nerve_ultrasound_segmentation")


@pytest.fixture
def nerve_copy(sample_root, tmp_path):
    """A private copy of the sample download, to damage."""
    return Path(shutil.copytree(sample_root / NERVE, tmp_path / NERVE))


@pytest.fixture(scope="module")
def trained(nerve, sample_root, tmp_path_factory):
    """The configuration of a short run trained once for this module (8 epochs, seconds): its output_dir holds
    best_model.pt, which finds the sample's nerves (validation Dice above the all-empty baseline). Without a test
    set: these tests are about prediction, and 4 training subjects of the sample's 5 learn it more surely than 3."""
    cfg = replace(nerve.cfg, data_dir=sample_root, output_dir=tmp_path_factory.mktemp("trained"), max_epochs=8)
    cfg = replace(cfg, test_fraction=0)
    history = nerve.fit(cfg, nerve.load_data(cfg), nerve.build_model(cfg))
    assert history.best()["val_dice"] > history.best()["val_dice_all_empty"]
    return cfg


def best_model(cfg) -> Path:
    return cfg.output_dir / "best_model.pt"


def frame_keys(frames) -> set[tuple[int, int]]:
    return {(f["subject"], f["img"]) for f in frames}


def read(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img)


# %% Run-length encoding


def test_encoding_of_every_sample_mask_is_its_train_masks_csv_row(sample_root):
    root = sample_root / NERVE
    table = pd.read_csv(root / "train_masks.csv", keep_default_na=False)
    assert len(table) == 50
    for subject, img, pixels in table.itertuples(index=False):
        mask = read(root / f"train/{subject}_{img}_mask.tif")
        assert rle_encode(mask) == pixels, f"{subject}_{img}"
        np.testing.assert_array_equal(rle_decode(pixels, SHAPE), mask > 0)
    assert 0 < (table["pixels"] == "").sum() < len(table)  # both empty and non-empty masks were compared


def test_submission_round_trip_through_the_csv(nerve, tmp_path):
    rng = np.random.default_rng(0)
    masks = {
        10: np.ones(SHAPE, bool),
        "scan": rng.random(SHAPE) > 0.5,
        1: rng.random(SHAPE) > 0.7,
        2: np.zeros(SHAPE, bool),
    }
    nerve.write_submission({img: rle_encode(mask) for img, mask in masks.items()}, tmp_path / "submission.csv")
    table = pd.read_csv(tmp_path / "submission.csv", dtype=str, keep_default_na=False)
    assert list(table.columns) == ["img", "pixels"] and list(table["img"]) == ["1", "2", "10", "scan"]  # ids in order
    for img, pixels in zip(table["img"], table["pixels"]):
        np.testing.assert_array_equal(rle_decode(pixels, SHAPE), masks[int(img) if img.isdigit() else img])


# %% Split, near-duplicates, minimum area


def test_split_is_by_subject_seeded_and_the_test_subjects_stay_put(nerve):
    subjects = [s for s in range(1, 48) for _ in range(3)]  # 47 subjects, several frames each
    cfg = nerve.Config()
    train, val, test = nerve.split_by_subject(subjects, cfg)
    assert [len(train), len(val), len(test)] == [29, 9, 9]  # round(0.2 x 47) = 9 each, of all subjects
    assert sorted(train + val + test) == list(range(1, 48))  # each subject on one side only
    assert nerve.split_by_subject(subjects, cfg) == (train, val, test)
    # The test subjects depend on split_seed and test_fraction only: a new training seed or val_fraction keeps them.
    for changed in (replace(cfg, seed=3), replace(cfg, val_fraction=0.3)):
        assert nerve.split_by_subject(subjects, changed)[2] == test
    assert nerve.split_by_subject(subjects, replace(cfg, split_seed=1))[2] != test
    assert [len(side) for side in nerve.split_by_subject([7, 7, 3, 9], cfg)] == [1, 1, 1]  # one each, at least
    assert nerve.split_by_subject([7, 3], replace(cfg, test_fraction=0))[2] == []
    with pytest.raises(DatasetError, match="cannot be split"):
        nerve.split_by_subject([4, 4, 5], cfg)


def test_near_duplicates_are_found_within_a_subject_and_different_frames_are_not():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    anatomy = 100 + 60 * np.sin(xx / 45) * np.cos(yy / 35) + 40 * (yy < 150)
    frame = np.clip(anatomy * rng.rayleigh(0.5, SHAPE), 0, 255)  # speckle, rarely clipped
    frames = [
        frame,  # subject 1, img 1
        np.clip(1.2 * frame + rng.integers(-2, 3, SHAPE), 0, 255),  # img 2: the same frame, more gain
        np.roll(frame, 80, axis=1),  # img 3: the probe moved: same subject, another frame
        frame,  # subject 2: identical pixels, but another subject is never compared
    ]
    signatures = np.stack([frame_signature(f) for f in frames])
    pairs = find_near_duplicates(signatures, [1, 1, 1, 2], max_distance=0.15)
    assert [(i, j) for i, j, _ in pairs] == [(0, 1)]
    assert pairs[0][2] < 0.05
    table = pd.DataFrame({"subject": [1, 1, 1, 2], "img": [1, 2, 3, 1], "has_nerve": [False, True, False, True]})
    contradictory = find_contradictory_pairs(table, signatures, 0.15)
    assert contradictory[["subject", "img_with_nerve", "img_empty"]].values.tolist() == [[1, 2, 1]]
    table["has_nerve"] = [True, True, False, True]  # a duplicate with the same labels is no contradiction
    assert find_contradictory_pairs(table, signatures, 0.15).empty


def load(nerve, data_dir, tmp_path, **settings):
    """The Data stage on the download in data_dir/ultrasound-nerve-segmentation: (train frames, validation and test
    frames)."""
    data = nerve.load_data(replace(nerve.cfg, data_dir=data_dir, output_dir=tmp_path / "out", **settings))
    return data.train, data.val + data.test


def test_contradictory_frames_leave_training_by_default_and_stay_when_configured(nerve, sample_root, tmp_path, capsys):
    root = sample_root / NERVE
    cfg = replace(nerve.cfg, data_dir=sample_root, output_dir=tmp_path)
    data = nerve.load_data(cfg)
    train, val = data.train, data.val + data.test
    assert data.root == root and not data.synthetic  # data_dir holds the dataset: used as a real one
    pairs = pd.read_csv(tmp_path / "contradictory_pairs.csv")
    assert len(pairs) >= 2  # the sample plants a near copy with an empty mask in 2-3 subjects
    for subject, with_nerve, empty in pairs[["subject", "img_with_nerve", "img_empty"]].itertuples(index=False):
        assert read(root / f"train/{subject}_{with_nerve}_mask.tif").any()
        assert not read(root / f"train/{subject}_{empty}_mask.tif").any()
    out = capsys.readouterr().out
    assert f"{len(pairs)} pair(s)" in out and "left out of training" in out
    # Each pair's distance printed (as in the CSV), with the warning that the threshold was tuned on the sample.
    printed = re.search(r"their distances: ([\d., ]+) \(duplicate_max_distance 0.15, tuned on the synthetic", out)
    assert printed and printed[1] == ", ".join(f"{d:.3f}" for d in sorted(pairs["distance"]))

    train_all, val_all = load(nerve, sample_root, tmp_path, drop_contradictory=False)
    train_subjects = {f["subject"] for f in train_all}
    expected = {(s, e) for s, e in zip(pairs["subject"], pairs["img_empty"]) if s in train_subjects}
    assert expected  # at least one pair lies in the training subjects
    assert frame_keys(train_all) - frame_keys(train) == expected
    assert frame_keys(train) < frame_keys(train_all)
    assert frame_keys(val) == frame_keys(val_all)  # validation and test keep every frame, as Kaggle scores them
    assert not {f["subject"] for f in val} & train_subjects


def test_min_area_filter_and_its_choice_on_a_constructed_case(nerve):
    truth = torch.zeros(4, 1, *SHAPE, dtype=torch.bool)
    truth[2:, :, 100:140, 200:260] = True  # two frames with a 2,400-pixel nerve, two without
    pred = torch.zeros_like(truth)
    pred[0, :, 10:15, 10:16] = True  # a 30-pixel false alarm on an empty frame
    pred[2, :, 100:140, 200:260] = True  # exact
    pred[3, :, 100:140, 210:270] = True  # shifted by 10 columns: Dice 2 * 2000 / 4800
    assert nerve.apply_min_area(pred, 50)[0].sum() == 0 and nerve.apply_min_area(pred, 50)[2:].sum() == 4800
    assert nerve.apply_min_area(pred, 2401).sum() == 0 and nerve.apply_min_area(pred, 30)[0].sum() == 30

    scores = nerve.MinAreaScores()
    scores.update(pred[:2], truth[:2])  # two batches, as in a validation pass
    scores.update(pred[2:], truth[2:])
    shifted = 2 * 2000 / 4800
    assert scores.dice(0) == pytest.approx((0 + 1 + 1 + shifted) / 4)
    assert scores.dice(50) == pytest.approx((1 + 1 + 1 + shifted) / 4)
    assert scores.dice(3000) == pytest.approx((1 + 1 + 0 + 0) / 4)
    assert scores.all_empty.mean() == pytest.approx(0.5)
    assert [scores.presence_accuracy(n) for n in (0, 50, 3000)] == [0.75, 1.0, 0.5]
    assert nerve.choose_min_area(scores, [3000, 0, 50, 40]) == 40  # 40 and 50 tie: the smaller one


# %% Bad input


def damage_corrupt(root):
    path = root / "train/1_2.tif"
    path.write_bytes(path.read_bytes()[:5000])  # truncated
    return path, "unreadable", (1, 2)


def damage_mask_without_image(root):
    (root / "train/2_3.tif").unlink()
    return root / "train/2_3_mask.tif", "mask without image", (2, 3)


def damage_image_without_mask(root):
    (root / "train/4_6_mask.tif").unlink()
    return root / "train/4_6.tif", "image without mask", (4, 6)


def damage_other_size(root):
    path = root / "train/3_5.tif"
    Image.fromarray(np.zeros((400, 600), np.uint8)).save(path, format="TIFF")
    return path, "wrong size", (3, 5)


def damage_csv_row(root):
    table = pd.read_csv(root / "train_masks.csv", keep_default_na=False)
    row = table.index[table["pixels"] != ""][0]  # a frame with a nerve
    subject, img = table.loc[row, ["subject", "img"]]
    table.loc[row, "pixels"] = "1 10"
    table.to_csv(root / "train_masks.csv", index=False)
    return root / f"train/{subject}_{img}_mask.tif", "disagrees with train_masks.csv", (subject, img)


@pytest.mark.parametrize(
    "damage",
    [damage_corrupt, damage_mask_without_image, damage_image_without_mask, damage_other_size, damage_csv_row],
)
def test_each_bad_input_is_named_skipped_and_counted(nerve, nerve_copy, tmp_path, capsys, damage):
    path, kind, key = damage(nerve_copy)
    train, val = load(nerve, nerve_copy.parent, tmp_path, drop_contradictory=False)
    out = capsys.readouterr().out
    assert f"Skipped {path}: {kind}" in out
    assert f"skipped 1 file (1 {kind})" in out
    assert key not in frame_keys(train + val)
    assert len(train) + len(val) == 49  # every other frame is used


def test_missing_csv_is_said_and_the_mask_files_are_used(nerve, nerve_copy, tmp_path, capsys):
    (nerve_copy / "train_masks.csv").unlink()
    train, val = load(nerve, nerve_copy.parent, tmp_path, drop_contradictory=False)
    assert "train_masks.csv not found" in capsys.readouterr().out
    assert len(train) + len(val) == 50


def test_nothing_usable_is_one_clear_error(nerve, nerve_copy, tmp_path):
    for path in (nerve_copy / "train").glob("*_mask.tif"):
        path.unlink()
    with pytest.raises(DatasetError, match=r"Found 0 image/mask pairs .* expected <subject>_<img>.tif"):
        load(nerve, nerve_copy.parent, tmp_path)


def test_bad_or_missing_test_frames_are_named_and_predicted_empty(nerve, trained, nerve_copy, tmp_path, capsys):
    corrupt, missing = nerve_copy / "test/2.tif", nerve_copy / "test/5.tif"
    corrupt.write_bytes(b"not a TIFF")
    missing.unlink()  # still listed in sample_submission.csv
    cfg = replace(trained, data_dir=nerve_copy.parent, output_dir=tmp_path / "out", checkpoint=best_model(trained))
    written = nerve.predict(cfg)  # inputs None: the dataset's test/ folder, as Run All predicts it
    out = capsys.readouterr().out
    assert f"Skipped {corrupt}: unreadable" in out and f"Skipped {missing}: missing" in out
    assert "skipped 2 files (" in out
    rows = pd.read_csv(tmp_path / "out/predictions/submission.csv", keep_default_na=False)
    assert list(rows["img"]) == [1, 2, 3, 4, 5, 6]  # a complete submission all the same
    assert rows.loc[rows["img"].isin([2, 5]), "pixels"].tolist() == ["", ""]
    assert sorted(p.name for p in written) == ["1_mask.png", "3_mask.png", "4_mask.png", "6_mask.png", "submission.csv"]

    nerve.predict(replace(cfg, max_test_images=3))  # a smoke test: the first frames only, said so
    assert "Predicting the first 3 test frames only (max_test_images)" in capsys.readouterr().out
    rows = pd.read_csv(tmp_path / "out/predictions/submission.csv", keep_default_na=False)
    assert list(rows["img"]) == [1, 2, 3]


def test_train_masks_csv_rows_without_files_are_reported(nerve, nerve_copy, tmp_path, capsys):
    table = pd.read_csv(nerve_copy / "train_masks.csv", keep_default_na=False)
    extra = pd.DataFrame({"subject": [9], "img": [1], "pixels": [""]})
    pd.concat([table, extra]).to_csv(nerve_copy / "train_masks.csv", index=False)
    train, val = load(nerve, nerve_copy.parent, tmp_path)
    assert "train_masks.csv has 1 row(s) without an image/mask pair" in capsys.readouterr().out
    assert 9 not in {f["subject"] for f in train + val}


def test_a_16_bit_training_frame_is_read_as_its_8_bit_self(nerve, nerve_copy, tmp_path):
    path = nerve_copy / "train/1_3.tif"
    eight = read(path)
    Image.fromarray(eight.astype(np.uint16) * 257).save(path, format="TIFF")  # the same frame, 16 bits (0..65535)
    assert Image.open(path).mode.startswith("I;16")
    train, _ = load(nerve, nerve_copy.parent, tmp_path, drop_contradictory=False)
    (frame,) = [f for f in train if (f["subject"], f["img"]) == (1, 3)]
    # Read as 8-bit, a 16-bit frame is all but white; scaled by its type's range it is the 8-bit frame exactly.
    assert torch.equal(frame["image"], nerve.resize(eight, nerve.cfg.image_size))
    Image.fromarray(eight.astype(np.float32)).save(path, format="TIFF")  # 32-bit floats: no range to scale by
    train, _ = load(nerve, nerve_copy.parent, tmp_path, drop_contradictory=False)
    assert (1, 3) not in frame_keys(train)
    assert "unsupported pixels" in pd.read_csv(tmp_path / "out" / "skipped.csv")["problem"].tolist()


def test_the_csvs_and_the_test_folder_are_checked_before_training(nerve, nerve_copy, tmp_path, capsys):
    """Every file the run will need is read in the Data stage: a broken CSV stops it there, in one line naming the
    file, the column and the row, never after hours of training (or with a KeyError)."""
    submission = nerve_copy / "sample_submission.csv"
    listed = pd.read_csv(submission, keep_default_na=False)
    (nerve_copy / "test/5.tif").unlink()
    load(nerve, nerve_copy.parent, tmp_path)
    assert (
        f"Test frames for the submission: 5 in {nerve_copy / 'test'}, sample_submission.csv lists 6, 1 of them "
        "missing (to be predicted empty and named)" in capsys.readouterr().out
    )
    listed.rename(columns={"img": "image"}).to_csv(submission, index=False)
    with pytest.raises(
        DatasetError, match=r"sample_submission.csv \(the frames a submission lists\) has no column img"
    ):
        load(nerve, nerve_copy.parent, tmp_path)
    listed.to_csv(submission, index=False)
    masks = nerve_copy / "train_masks.csv"
    table = pd.read_csv(masks, keep_default_na=False, dtype=str)
    bad = table.copy()
    bad.loc[3, "subject"] = "one"
    bad.to_csv(masks, index=False)
    with pytest.raises(DatasetError, match=r"train_masks.csv .*: column subject, row 5: 'one' is not a number"):
        load(nerve, nerve_copy.parent, tmp_path)
    table.drop(columns="pixels").to_csv(masks, index=False)
    with pytest.raises(DatasetError, match=r"train_masks.csv .* has no column pixels \(it has: subject, img\)"):
        load(nerve, nerve_copy.parent, tmp_path)


def test_an_invalid_run_length_names_its_csv_row_and_the_skips_are_listed(nerve, nerve_copy, tmp_path, capsys):
    masks = nerve_copy / "train_masks.csv"
    table = pd.read_csv(masks, keep_default_na=False, dtype=str)
    row = int(table.index[table["pixels"] != ""][0])
    subject, img = table.loc[row, ["subject", "img"]]
    table.loc[row, "pixels"] = "5 10 20"  # an odd number of values: no (start, length) pairs
    table.to_csv(masks, index=False)
    train, val = load(nerve, nerve_copy.parent, tmp_path)
    assert f"Skipped train_masks.csv row {row + 2}: invalid run-length ({subject}_{img}: " in capsys.readouterr().out
    assert (int(subject), int(img)) not in frame_keys(train + val)
    listed = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert listed.to_dict("records")[0]["file"] == f"train_masks.csv row {row + 2}" and len(listed) == 1


def test_missing_test_frames_are_capped_at_ten_lines_and_all_counted(nerve, trained, nerve_copy, tmp_path, capsys):
    """A full sample_submission.csv (5,508 ids) with a few frames present printed one line per missing frame."""
    ids = pd.DataFrame({"img": range(1, 51), "pixels": ""})
    ids.to_csv(nerve_copy / "sample_submission.csv", index=False)  # 50 listed, 6 present
    cfg = replace(trained, data_dir=nerve_copy.parent, output_dir=tmp_path / "out", checkpoint=best_model(trained))
    nerve.predict(cfg)
    out = capsys.readouterr().out
    assert out.count(": missing (listed in sample_submission.csv; predicted empty)") == 10
    assert "(further files skipped for this reason are not printed)" in out and "skipped 44 files (44 missing)" in out
    rows = pd.read_csv(tmp_path / "out/predictions/submission.csv", keep_default_na=False)
    assert list(rows["img"]) == list(range(1, 51))  # a complete submission all the same


def test_the_disk_cache_decodes_once_rebuilds_a_touched_frame_and_gives_what_decoding_gives(nerve, nerve_copy, tmp_path,
                                                                                              capsys):  # fmt: skip
    """The Data stage decodes every frame once into data/cache/nerve_ultrasound_segmentation/; the next run decodes
    none; a touched frame is decoded again, alone; and the frames are exactly those decoded without the cache."""
    cfg = replace(nerve.cfg, data_dir=nerve_copy.parent, output_dir=tmp_path / "out", drop_contradictory=False)
    first = nerve.load_data(cfg)
    assert (
        f"Disk cache {nerve_copy.parent / 'cache' / 'nerve_ultrasound_segmentation'}: 0 frames read back, 50 "
        "decoded and written" in capsys.readouterr().out
    )
    second = nerve.load_data(cfg)
    assert ": 50 frames read back, 0 decoded and written" in capsys.readouterr().out
    plain = nerve.load_data(replace(cfg, cache=False))
    assert "Disk cache" not in capsys.readouterr().out
    for data in (second, plain):
        for side in ("train", "val", "test"):
            for frame, reference in zip(getattr(data, side), getattr(first, side), strict=True):
                assert (frame["subject"], frame["img"], frame["has_nerve"]) == (reference["subject"], reference["img"],
                                                                              reference["has_nerve"])  # fmt: skip
                assert torch.equal(frame["image"], reference["image"]) and torch.equal(
                    frame["label"], reference["label"]
                )
                np.testing.assert_array_equal(frame["signature"], reference["signature"])
                if "full_label" in reference:
                    assert torch.equal(frame["full_label"], reference["full_label"])
    touched = nerve_copy / "train/2_4_mask.tif"
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    nerve.load_data(cfg)
    assert ": 49 frames read back, 1 decoded and written" in capsys.readouterr().out


# %% The stages


def test_quick_run_of_the_cells_learns_and_writes_checkpoint_plots_history_and_submission(
    sample_root, tmp_path, run_cells, capsys
):
    data_dir = tmp_path / "data"  # no real download there: the script must say it uses the sample
    (data_dir / "sample").mkdir(parents=True)
    (data_dir / "sample" / NERVE).symlink_to(sample_root / NERVE)
    out_dir, images_dir = tmp_path / "out", tmp_path / "Images"
    cells = run_cells("nerve_ultrasound_segmentation", data_dir=data_dir, output_dir=out_dir, images_dir=images_dir,
                      quick=True, tensorboard=True)  # fmt: skip
    cfg, data, batch, history, per_case = (cells[name] for name in ("cfg", "data", "batch", "history", "per_case"))
    out = capsys.readouterr().out
    assert cfg.quick and cfg.max_epochs == 20 and cfg.image_size == (64, 96)  # the quick run's settings
    assert "Configuration: QUICK run, with " in out and "SYNTHETIC" in out and "all-empty baseline" in out
    # 5 subjects of 10 frames: 3 for training (a contradictory frame left out), 1 for validation, 1 for test.
    assert data.synthetic and [len(data.train), len(data.val), len(data.test)] == [29, 10, 10]
    assert not {f["subject"] for f in data.train} & {f["subject"] for f in data.val + data.test}
    assert batch["image"].shape == (cfg.batch_size, 1, *cfg.image_size) and batch["image"].dtype == torch.uint8
    assert set(batch["label"].unique().tolist()) <= {0, 1}  # masks stay binary through resizing and flips
    assert isinstance(cells["model"], torch.nn.Module)

    assert len(history) == cfg.max_epochs
    best = history.best()
    assert best == max(history, key=lambda row: row["val_dice"])
    baseline = best["val_dice_all_empty"]
    assert 0 < baseline < 1
    assert best["val_dice"] > baseline + 0.15, (best["val_dice"], baseline)  # learnt, not just "no nerve"
    assert best["presence_accuracy"] > 0.7

    table = pd.read_csv(out_dir / "history.csv")
    assert list(table.columns[:5]) == ["epoch", "train_loss", "val_loss", "val_dice", "val_dice_no_filter"]
    assert {"min_area", "presence_accuracy", "val_dice_all_empty", "lr", "seconds"} <= set(table.columns)
    np.testing.assert_allclose(table["val_dice"], [row["val_dice"] for row in history])

    checkpoint = torch.load(out_dir / "best_model.pt", weights_only=True)
    assert {"model", "config", "epoch", "metric", "metrics"} <= set(checkpoint)
    assert checkpoint["epoch"] == best["epoch"] and checkpoint["metric"] == pytest.approx(best["val_dice"])
    assert checkpoint["metrics"]["min_area"] == best["min_area"] in cfg.min_area_candidates
    assert checkpoint["config"]["image_size"] == cfg.image_size
    cells["build_model"](cfg).load_state_dict(checkpoint["model"])  # strict: every weight is there

    # Evaluate: the best weights read back score every validation frame as the best epoch did; then the test
    # frames, once, with the min area validation chose: test_per_case.csv, the cell's per_case.
    val_per_case = pd.read_csv(out_dir / "val_per_case.csv")
    assert list(val_per_case.columns) == ["subject", "img", "has_nerve", "predicted_area", "dice"]
    assert len(val_per_case) == len(data.val)
    assert val_per_case["dice"].mean() == pytest.approx(best["val_dice"], abs=1e-9)
    pd.testing.assert_frame_equal(pd.read_csv(out_dir / "test_per_case.csv"), per_case)
    assert list(zip(per_case["subject"], per_case["img"])) == [(f["subject"], f["img"]) for f in data.test]
    for table in (val_per_case, per_case):  # the filter was applied to both
        assert ((table["predicted_area"] == 0) | (table["predicted_area"] >= best["min_area"])).all()
    # Scored as Kaggle does: the test frames' own masks at 420x580, an empty prediction on an empty mask scoring 1.
    for area, frame, score in zip(per_case["predicted_area"], data.test, per_case["dice"]):
        if not area:
            assert score == (0.0 if frame["has_nerve"] else 1.0)
        elif not frame["has_nerve"]:
            assert score == 0.0  # a false alarm on an empty frame

    for name in ("dice_per_epoch.png", "batch.png", "val_predictions.png"):
        with Image.open(out_dir / name) as figure:
            assert figure.format == "PNG", name
    with Image.open(out_dir / "val_predictions.png") as figure:
        assert figure.width > 4 * 200  # four frames side by side
    picture = images_dir / "nerve_ultrasound_segmentation_predictions.png"  # the sample was used: README picture
    assert picture.read_bytes() == (out_dir / "val_predictions.png").read_bytes()
    assert len(list((out_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    summary = out[out.index("\nSummary (") :]
    assert f"data:    SYNTHETIC sample {data_dir / 'sample' / NERVE}" in summary
    test = f"test Dice {per_case['dice'].mean():.4f} ({len(per_case)} frames of 1 patient: too few for an interval)"
    assert f"best:    epoch {best['epoch']} of {cfg.max_epochs}, {test} (Kaggle metric" in summary  # the result
    assert f"validation Dice {best['val_dice']:.4f} (Kaggle metric" in summary
    assert f"outputs: {out_dir}/" in summary and f"picture: {picture}" in summary

    assert "predictions/ (<name>_mask.png, submission.csv)" in summary
    submission = pd.read_csv(out_dir / "predictions/submission.csv", keep_default_na=False)
    assert list(submission.columns) == ["img", "pixels"] and list(submission["img"]) == [1, 2, 3, 4, 5, 6]
    assert cells["predictions"] == [out_dir / f"predictions/{i}_mask.png" for i in range(1, 7)] + [
        out_dir / "predictions/submission.csv"
    ]
    areas = [rle_decode(pixels, SHAPE).sum() for pixels in submission["pixels"]]
    assert all(area == 0 or area >= best["min_area"] for area in areas)  # the filter was applied
    assert any(areas)  # the sample's test frames show a nerve about half the time


def test_fit_resumes_and_ctrl_c_or_a_nan_loss_stop_with_one_line(nerve, sample_root, tmp_path, monkeypatch, capsys):
    cfg = replace(nerve.cfg, data_dir=sample_root, output_dir=tmp_path / "out", max_epochs=2)
    data = nerve.load_data(cfg)
    first = nerve.fit(cfg, data, nerve.build_model(cfg))
    history = nerve.fit(replace(cfg, max_epochs=3, resume=True), data, nerve.build_model(cfg))
    assert "2 epoch(s) done" in capsys.readouterr().out
    assert [row["epoch"] for row in history] == [1, 2, 3] and history[:2] == first
    assert pd.read_csv(cfg.output_dir / "history.csv")["epoch"].tolist() == [1, 2, 3]
    best = cfg.output_dir / "best_model.pt"
    kept = best.read_bytes()

    def stop(error):
        def train_one_epoch(*args, **kwargs):
            raise error

        return train_one_epoch

    monkeypatch.setattr(nerve, "train_one_epoch", stop(KeyboardInterrupt()))
    stopped = nerve.fit(replace(cfg, max_epochs=5, resume=True), data, nerve.build_model(cfg))
    assert stopped == history
    last = cfg.output_dir / "last_checkpoint.pt"
    message = f"Interrupted during epoch 4: {last} holds epoch 3; run again with resume=True"
    assert message in capsys.readouterr().out and stopped.stopped.startswith(message)
    with pytest.raises(SystemExit) as ended:  # the Train cell ends the run there: no evaluation, no submission
        nerve.end_if_stopped(stopped)
    assert ended.value.code == 130
    monkeypatch.setattr(nerve, "train_one_epoch", stop(FloatingPointError("Loss is nan at epoch 4, batch 0")))
    stopped = nerve.fit(replace(cfg, max_epochs=5, resume=True), data, nerve.build_model(cfg))
    best_epoch = torch.load(best, weights_only=True)["epoch"]
    assert f"Loss is nan at epoch 4, batch 0. Kept: {best} (epoch {best_epoch})" in capsys.readouterr().out
    assert best.read_bytes() == kept and torch.load(last, weights_only=True)["epoch"] == 3
    with pytest.raises(SystemExit) as ended:
        nerve.end_if_stopped(stopped)
    assert ended.value.code == 1


def test_same_seed_same_split_and_same_first_epoch_on_the_cpu(nerve, sample_root, tmp_path):
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        cfg = replace(nerve.cfg, data_dir=sample_root, output_dir=tmp_path / name, max_epochs=1, seed=seed)
        data = nerve.load_data(cfg)
        history = nerve.fit(cfg, data, nerve.build_model(cfg))
        runs.append(([(f["subject"], f["img"]) for f in data.train + data.val + data.test], history[0]))
    (split_a, first_a), (split_b, first_b), (split_c, other) = runs
    assert split_a == split_b and first_a["train_loss"] == first_b["train_loss"]  # bitwise
    assert first_a["val_dice_no_filter"] == first_b["val_dice_no_filter"]
    assert split_c == split_a  # the split is split_seed's: a new training seed keeps it
    assert other["train_loss"] != first_a["train_loss"]  # the seed reaches the weights and the shuffling


# %% Predict: the user's own frames


OWN_OUTPUTS = ["1_mask.png", "5_mask.png", "deep_mask.png", "small_mask.png", "submission.csv"]  # of own_frames


def own_frames(sample_root, folder: Path) -> Path:
    """A folder of frames as a user brings them: two Kaggle test frames (<img>.tif), one of them again as a 16-bit
    PNG, and a frame at half the size."""
    folder.mkdir()
    test = sample_root / NERVE / "test"
    for name in ("1.tif", "5.tif"):
        shutil.copy(test / name, folder / name)
    Image.fromarray(read(test / "5.tif").astype(np.uint16) * 257).save(folder / "deep.png")  # 255 -> 65535
    Image.fromarray(read(test / "1.tif")).resize((290, 210), Image.Resampling.BILINEAR).save(folder / "small.png")
    return folder


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_predict_on_own_frames_writes_masks_at_their_size_and_a_matching_submission(
    nerve, trained, sample_root, tmp_path, capsys
):
    folder = own_frames(sample_root, tmp_path / "frames")
    cfg = replace(trained, output_dir=tmp_path / "out", checkpoint=best_model(trained))
    written = nerve.predict(cfg, folder)
    out = capsys.readouterr().out
    predictions = tmp_path / "out/predictions"
    assert written == [predictions / name for name in OWN_OUTPUTS]
    assert f"Predicting with {best_model(trained)} (epoch " in out and "image_size=(64, 96), threshold=0.5" in out
    assert f"Predicted 4 frame(s) of 4 file(s) into {predictions}: no file skipped" in out
    inputs = {"1_mask.png": "1.tif", "5_mask.png": "5.tif", "deep_mask.png": "deep.png", "small_mask.png": "small.png"}
    masks = {}
    for name, source in inputs.items():
        with Image.open(predictions / name) as png, Image.open(folder / source) as frame:
            assert png.format == "PNG" and png.mode == "L" and png.size == frame.size, name  # the input's own size
            masks[name] = np.asarray(png)
        assert set(np.unique(masks[name])) <= {0, 255}, name
    np.testing.assert_array_equal(masks["deep_mask.png"], masks["5_mask.png"])  # 16 bits: the same frame, same mask
    assert masks["1_mask.png"].any() or masks["5_mask.png"].any()  # nerves found: the masks say something

    # The submission, decoded independently, is the masks; a Kaggle name gives its number, another its name.
    table = pd.read_csv(predictions / "submission.csv", dtype=str, keep_default_na=False)
    assert list(table.columns) == ["img", "pixels"] and list(table["img"]) == ["1", "5", "deep", "small"]
    for img, pixels in zip(table["img"], table["pixels"]):
        mask = masks[f"{img}_mask.png"]
        np.testing.assert_array_equal(rle_decode(pixels, mask.shape), mask > 0)

    # A 420x580 frame gets the mask the Evaluate cell scores; the min area scales with the pixel count.
    model, checkpoint = nerve.load_best(trained, nerve.build_model, nerve.DEVICE)
    min_area = checkpoint["metrics"]["min_area"]
    frame = nerve.resize(read(folder / "1.tif"), trained.image_size)
    np.testing.assert_array_equal(nerve.predict_masks(model, [frame], trained, min_area)[0, 0].numpy(),
                                  masks["1_mask.png"] > 0)  # fmt: skip
    small_area = (masks["small_mask.png"] > 0).sum()
    assert small_area == 0 or small_area >= round(min_area * 210 * 290 / (420 * 580))


def test_damaged_own_frames_are_named_skipped_and_counted_and_no_input_changes(
    nerve, trained, sample_root, tmp_path, capsys
):
    folder = own_frames(sample_root, tmp_path / "frames")
    cut, text = folder / "cut.tif", folder / "x.png"
    cut.write_bytes((sample_root / NERVE / "test/2.tif").read_bytes()[:5000])  # a truncated TIFF
    text.write_text("not an image\n")  # a text file named .png
    shutil.copy(sample_root / NERVE / "train/1_2_mask.tif", folder / "1_2_mask.tif")  # a label, not a frame
    before = hashes(folder)
    cfg = replace(trained, output_dir=tmp_path / "out", checkpoint=best_model(trained))
    written = nerve.predict(cfg, folder)
    out = capsys.readouterr().out
    assert f"Skipped {cut}: unreadable (not a readable TIFF or PNG:" in out
    assert f"Skipped {text}: unreadable (not a readable TIFF or PNG:" in out
    assert f"Skipped {folder / '1_2_mask.tif'}: a mask (" in out
    assert "Predicted 4 frame(s) of 7 file(s) into" in out and "skipped 3 files (2 unreadable, 1 a mask)" in out
    assert [p.name for p in written] == OWN_OUTPUTS
    table = pd.read_csv(tmp_path / "out/predictions/submission.csv", dtype=str, keep_default_na=False)
    assert list(table["img"]) == ["1", "5", "deep", "small"]  # no row for what was not predicted
    assert hashes(folder) == before  # the user's files are only read


def test_prediction_uses_the_checkpoint_settings_whatever_cfg_says(nerve, trained, sample_root, tmp_path, capsys):
    folder = own_frames(sample_root, tmp_path / "frames")
    outputs = []
    for name, changes in (("same", {}), ("changed", {"image_size": (128, 176), "threshold": 0.9, "quick": False})):
        cfg = replace(trained, output_dir=tmp_path / name, checkpoint=best_model(trained), **changes)
        outputs.append({p.name: p.read_bytes() for p in nerve.predict(cfg, [folder / "5.tif", folder / "small.png"])})
    assert outputs[0] == outputs[1] and len(outputs[0]) == 3  # byte for byte
    out = capsys.readouterr().out
    assert out.count("a QUICK run): image_size=(64, 96), threshold=0.5, quick=True") == 2


def test_a_bad_or_foreign_checkpoint_is_one_clear_error(nerve, trained, sample_root, tmp_path):
    garbage, foreign = tmp_path / "garbage.pt", tmp_path / "foreign.pt"
    garbage.write_bytes(b"not a checkpoint" * 10)
    torch.save({"model": {}, "config": {"foo": 1}, "epoch": 1, "metric": 0.0, "metric_name": "x"}, foreign)
    folder = own_frames(sample_root, tmp_path / "frames")
    for path, message in ((garbage, "cannot be read as a checkpoint"), (foreign, "was written by another script")):
        cfg = replace(trained, output_dir=tmp_path / "out", checkpoint=path)
        with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}.*{message}"):
            nerve.predict(cfg, folder)
    assert not (tmp_path / "out").exists()  # nothing written


def test_predict_from_the_command_line_trains_nothing(trained, sample_root, tmp_path, repo_copy):
    repo = repo_copy("nerve_ultrasound_segmentation.py", {f"sample/{NERVE}": sample_root / NERVE})
    out_dir = repo / "output/nerve_ultrasound_segmentation"
    out_dir.mkdir(parents=True)
    shutil.copy(best_model(trained), out_dir / "best_model.pt")
    folder = own_frames(sample_root, tmp_path / "frames")
    env = {**os.environ, "QUICK": "1", "OMP_NUM_THREADS": "1", "PREDICT": str(folder)}
    env.pop("CHECKPOINT", None)
    command = [sys.executable, "nerve_ultrasound_segmentation.py"]
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Predicting with {out_dir / 'best_model.pt'}" in result.stdout
    assert not re.search(r"^epoch ", result.stdout, flags=re.M) and "Training on" not in result.stdout  # no training
    assert not (out_dir / "history.csv").exists() and "Split by subject" not in result.stdout  # no training data read
    assert sorted(p.name for p in (out_dir / "predictions").iterdir()) == OWN_OUTPUTS

    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    env["CHECKPOINT"] = str(tmp_path / "garbage.pt")
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Checkpoint problem: {tmp_path / 'garbage.pt'} cannot be read")
    assert "Traceback" not in result.stderr
