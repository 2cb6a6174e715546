"""pneumonia_detection.py: grouping and splitting by patient, DICOM reading, the RSNA metric and COCO mAP against
hand-computed cases, bad inputs, the COCO-weights switch, the submission format, and the stages: fit resumes and
stops on Ctrl-C or a NaN loss, evaluate_best and predict reload the best epoch with its score threshold, the script
runs from another directory, and a quick run of all the cells learns to find the opacities. Prediction on a user's
own files: DICOM, PNG and JPEG of any size, boxes in each file's own pixels, bad files skipped, the checkpoint's
settings whatever cfg says, a bad checkpoint in one line, and the PREDICT= command line."""

import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, SecondaryCaptureImageStorage, generate_uid
from torchvision.ops.misc import FrozenBatchNorm2d

from checkpoints import CheckpointError, config_dict
from data_cleaning import DatasetError, Skipped, read_radiograph

RSNA = "rsna-pneumonia-detection-challenge"
LOSSES = ["train_loss", "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"]
METRICS = ["val_rsna", "score_threshold", "val_map", "val_map50", "val_rsna_predict_nothing"]
PER_CASE = ["patient_id", "class", "true_boxes", "predicted_boxes", "rsna_precision"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def det(load_script):
    """The script loaded as a module with QUICK=0 (the defaults meant for the real dataset): its `__main__` cells
    do not run."""
    return load_script("pneumonia_detection", quick=False)


@pytest.fixture
def rsna_copy(sample_root, tmp_path):
    """A private copy of the synthetic RSNA download, to damage."""
    return Path(shutil.copytree(sample_root / RSNA, tmp_path / RSNA))


def tiny_config(det, tmp_path, data_dir, **changes):
    """Settings for a run of a few seconds: 64 px, few patients, a couple of steps."""
    small = dict(
        data_dir=data_dir,
        output_dir=tmp_path / "output",
        images_dir=tmp_path / "Images",
        patients_per_class=4,
        image_size=64,
        rpn_proposals_train=100,
        rpn_proposals_test=50,
        box_batch_size_per_image=32,
        batch_size=2,
        max_epochs=2,
        max_steps_per_epoch=2,
        examples=2,
    )
    return replace(det.Config(), **(small | changes))


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **tags) -> Path:
    """A small uncompressed 16-bit grayscale DICOM with extra `tags` (RescaleSlope, ...)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# Data: one radiograph per patient, sampling and splitting by patient


def test_a_patients_rows_are_gathered_wherever_they_stand_in_the_csv(det, tmp_path):
    """read_patients against pandas' own grouping on a table whose patients' rows are interleaved, with a patient
    missing from the class CSV and a negative row beside a box."""
    labels = pd.DataFrame({"patientId": ["b", "a", "c", "b", "a", "b"], "x": [1, None, 5, 2, 3, 9],
                           "y": [1, None, 5, 2, 3, 9], "width": [4, None, 1, 4, 2, 1],
                           "height": [4, None, 1, 4, 2, 1], "Target": [1, 0, 1, 1, 1, 1]})  # fmt: skip
    labels.to_csv(tmp_path / det.LABELS_CSV, index=False)
    pd.DataFrame({"patientId": ["a", "b"], "class": ["Lung Opacity", "Normal"]}).to_csv(tmp_path / det.CLASSES_CSV)
    patients = det.read_patients(tmp_path)
    assert [(p["patient_id"], p["class"]) for p in patients] == [("a", "Lung Opacity"), ("b", "Normal"),
                                                                 ("c", "unknown")]  # fmt: skip
    for patient, (_, rows) in zip(patients, labels.groupby("patientId"), strict=True):
        rows = rows[rows["Target"] == 1]
        expected = np.c_[rows[["x", "y"]], rows[["x", "y"]].to_numpy() + rows[["width", "height"]].to_numpy()]
        assert patient["boxes"].shape == (len(rows), 4)
        np.testing.assert_array_equal(patient["boxes"], expected)


def test_label_rows_are_grouped_by_patient(det, sample_root):
    labels = pd.read_csv(sample_root / RSNA / "stage_2_train_labels.csv")
    patients = det.read_patients(sample_root / RSNA)
    ids = [p["patient_id"] for p in patients]
    assert len(ids) == len(set(ids)) == labels["patientId"].nunique() == 36
    rows_per_patient = labels.groupby("patientId").size()
    two_boxes = rows_per_patient[rows_per_patient == 2].index[0]  # the sample has patients with two boxes
    patient = next(p for p in patients if p["patient_id"] == two_boxes)
    rows = labels[labels["patientId"] == two_boxes]
    expected = np.c_[rows[["x", "y"]], rows[["x", "y"]].to_numpy() + rows[["width", "height"]].to_numpy()]
    np.testing.assert_allclose(patient["boxes"], expected)  # x1, y1, x2, y2
    assert patient["class"] == "Lung Opacity" and patient["path"].is_file()
    negatives = [p for p in patients if p["class"] != "Lung Opacity"]
    assert len(negatives) == 24 and all(p["boxes"].shape == (0, 4) for p in negatives)


def test_negatives_are_empty_targets_and_flips_move_the_boxes(det):
    image = torch.zeros(1, 64, 64, dtype=torch.uint8)
    image[0, 10:20, 5:15] = 255
    positive = {"image": image, "target_boxes": torch.tensor([[5.0, 10.0, 15.0, 20.0]])}
    negative = {"image": image, "target_boxes": torch.zeros(0, 4)}
    flipped = det.DetectionDataset([positive, negative], det.build_transforms(det.Config(hflip=1.0), train=True))
    img, target = flipped[0]
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32 and img.max() == 1.0
    assert target["boxes"].tolist() == [[49.0, 10.0, 59.0, 20.0]]  # mirrored: x -> 64 - x
    assert img[0, 15, 50:59].min() == 1.0 and img[0, 15, 6:14].max() == 0.0  # the pixels moved with it
    assert target["labels"].tolist() == [1]
    _, empty = flipped[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["labels"].dtype == torch.int64
    img, target = det.DetectionDataset([positive], det.build_transforms(det.Config(), train=False))[0]
    assert target["boxes"].tolist() == [[5.0, 10.0, 15.0, 20.0]]  # validation: never flipped


def make_patients(per_class: int) -> list[dict]:
    return [
        {"patient_id": f"{k}-{i:02d}", "class": name, "boxes": np.zeros((i % 3, 4))}
        for k, name in enumerate(("Lung Opacity", "No Lung Opacity / Not Normal", "Normal"))
        for i in range(per_class)
    ]


def test_sampling_draws_patients_per_class_and_the_split_is_disjoint_and_seeded(det):
    patients = make_patients(20)
    sampled = det.sample_patients(patients, 10, seed=0)
    counts = pd.Series([p["class"] for p in sampled]).value_counts()
    assert counts.to_dict() == {"Lung Opacity": 10, "No Lung Opacity / Not Normal": 10, "Normal": 10}
    ids = lambda group: [p["patient_id"] for p in group]  # noqa: E731
    assert ids(sampled) == ids(det.sample_patients(patients, 10, seed=0))  # seeded
    assert ids(sampled) != ids(det.sample_patients(patients, 10, seed=1))
    assert len(det.sample_patients(patients, None, seed=0)) == 60 == len(det.sample_patients(patients, 50, seed=0))

    train, val, test = det.split_by_patient(sampled, 0.2, 0.2, seed=0)
    assert sorted(ids(train) + ids(val) + ids(test)) == sorted(ids(sampled))  # each patient on one side only
    for side in (val, test):
        assert pd.Series([p["class"] for p in side]).value_counts().tolist() == [2, 2, 2]  # 20% of each class
    assert [ids(side) for side in det.split_by_patient(sampled, 0.2, 0.2, seed=0)] == [ids(train), ids(val), ids(test)]
    assert ids(det.split_by_patient(sampled, 0.2, 0.2, seed=1)[2]) != ids(test)
    assert ids(det.split_by_patient(sampled, 0.3, 0.2, seed=0)[2]) == ids(test)  # drawn first: it stays
    # A class with fewer patients than sides (here one "unknown" patient) trains whole.
    lone = {"patient_id": "9-00", "class": "unknown", "boxes": np.zeros((0, 4))}
    train, val, test = det.split_by_patient([*sampled, lone], 0.2, 0.2, seed=0)
    assert "9-00" in ids(train) and len(val) == len(test) == 6


def real_mix(n: int) -> list[dict]:
    """n patients at the challenge's class mix: 22.5% Lung Opacity (with boxes), 29% Normal, 48.5% No Lung
    Opacity / Not Normal (DATASETS.md: 6,012, 8,851 and 11,821 of 26,684)."""
    counts = {"Lung Opacity": round(0.225 * n), "Normal": round(0.29 * n)}
    counts["No Lung Opacity / Not Normal"] = n - sum(counts.values())
    return [
        {"patient_id": f"{name[:4]}-{i:04d}", "class": name, "boxes": np.ones((1 + i % 2 if name[0] == "L" else 0, 4))}
        for name, count in counts.items()
        for i in range(count)
    ]


def test_validation_keeps_the_datas_class_mix_and_training_is_capped_per_class(det):
    patients = real_mix(2000)
    share = lambda group: np.mean([len(p["boxes"]) > 0 for p in group])  # noqa: E731
    ids = lambda group: {p["patient_id"] for p in group}  # noqa: E731
    assert share(patients) == 0.225
    for per_class, n_train, n_held in ((100, 300, 100), (None, 1200, 400)):
        cfg = det.Config(patients_per_class=per_class, val_fraction=0.2, test_fraction=0.2, split_seed=0)
        train, val, test = det.choose_patients(patients, cfg)
        assert len(train) == n_train, len(train)
        for side in (val, test):  # each a fifth of the data's patients, or as many as a third of training's
            assert abs(len(side) - n_held) <= 1, (len(side), n_held)
            assert abs(share(side) - 0.225) < 0.02, share(side)  # not the third a draw of 100 per class would give
        assert len(ids(train) | ids(val) | ids(test)) == len(train) + len(val) + len(test)  # never two sides
        if per_class is not None:  # training balanced, capped per class
            assert pd.Series([p["class"] for p in train]).value_counts().tolist() == [100, 100, 100]
        again = det.choose_patients(patients, cfg)
        assert [ids(part) for part in again] == [ids(train), ids(val), ids(test)]  # seeded
        assert ids(det.choose_patients(patients, replace(cfg, split_seed=1))[2]) != ids(test)
        assert ids(det.choose_patients(patients, replace(cfg, seed=1))[2]) == ids(test)  # seed: training's sample
    # Validation and test are held out before the cap: a larger cap adds training patients, never one of theirs.
    _, val, test = det.split_by_patient(patients, 0.2, 0.2, seed=0)
    assert all(ids(det.choose_patients(patients, det.Config(patients_per_class=n))[0]).isdisjoint(ids(val + test))
               for n in (50, 300))  # fmt: skip


def test_class_names_are_read_stripped_and_patients_without_a_class_named(det, rsna_copy, capsys):
    classes = pd.read_csv(rsna_copy / "stage_2_detailed_class_info.csv")
    classes["class"] = " " + classes["class"] + "  "  # as an edited CSV may have them
    missing = sorted(classes["patientId"].unique())[:7]
    classes[~classes["patientId"].isin(missing)].to_csv(rsna_copy / "stage_2_detailed_class_info.csv", index=False)
    patients = det.read_patients(rsna_copy)
    out = capsys.readouterr().out
    names = {p["patient_id"]: p["class"] for p in patients}
    assert len(names) == 36 and {names[i] for i in missing} == {"unknown"}
    assert set(names.values()) == {"Lung Opacity", "Normal", "No Lung Opacity / Not Normal", "unknown"}
    lines = [line for line in out.splitlines() if "not in stage_2_detailed_class_info.csv" in line]
    assert lines == [
        "7 patients of stage_2_train_labels.csv not in stage_2_detailed_class_info.csv, kept with class 'unknown': "
        + ", ".join(missing[:5]) + ", ..."
    ]  # fmt: skip


def test_bad_label_csvs_and_the_sample_submission_are_one_data_problem_before_training(
    det, rsna_copy, tmp_path, capsys
):
    """Each CSV the run needs is read in the Data stage and checked: one line naming the file, the column and the first
    bad row, never a KeyError or ValueError from pandas, and never after hours of training (the sample submission)."""
    cfg = tiny_config(det, tmp_path, rsna_copy.parent)
    labels_path, classes_path = rsna_copy / "stage_2_train_labels.csv", rsna_copy / "stage_2_detailed_class_info.csv"
    submission_path = rsna_copy / "stage_2_sample_submission.csv"
    labels, submission = pd.read_csv(labels_path, dtype=str), pd.read_csv(submission_path, dtype=str)
    (rsna_copy / "stage_2_test_images" / f"{submission['patientId'][0]}.dcm").unlink()
    det.load_data(cfg)
    n = len(submission)
    assert (
        f"Test radiographs for the submission: {n - 1} in {rsna_copy / 'stage_2_test_images'}, "
        f"stage_2_sample_submission.csv lists {n}, 1 of them missing (to be listed with no box)"
    ) in capsys.readouterr().out
    labels_csv, no_id = r"stage_2_train_labels.csv \(one row per box\)", "has no column patientId"
    cases = [
        (labels_path, labels.drop(columns="Target"), f"{labels_csv} has no column Target"),
        (labels_path, labels.assign(x=labels["x"].where(labels["x"].isna(), "abc")),
         rf"{labels_csv}: column x, row \d+: 'abc' is not a number"),
        (classes_path, pd.DataFrame({"garbage": ["a", "b"]}), f"stage_2_detailed_class_info.csv .* {no_id}"),
        (submission_path, submission.drop(columns="patientId"), f"stage_2_sample_submission.csv .* {no_id}"),
    ]  # fmt: skip
    for path, table, message in cases:
        original = path.read_bytes()
        table.to_csv(path, index=False)
        with pytest.raises(DatasetError, match=message):
            det.load_data(cfg)
        path.write_bytes(original)
    assert not (cfg.output_dir / "history.csv").exists()


def test_the_disk_cache_decodes_once_rebuilds_a_touched_dicom_and_gives_what_decoding_gives(det, rsna_copy, tmp_path):
    """The Data stage decodes every radiograph once into data/cache/pneumonia_detection/; the next run decodes none;
    a changed DICOM (its size or modification time) is decoded again, alone; a new image_size builds new entries;
    and the cached arrays are exactly those decoded without the cache."""
    cfg = tiny_config(det, tmp_path, rsna_copy.parent)
    cache = det.radiograph_cache(cfg)
    assert cache.folder == rsna_copy.parent / "cache" / "pneumonia_detection"  # beside the download, not in it
    patients = det.read_patients(rsna_copy)[:6]
    first = det.load_patients(patients, 64, Skipped("patient"), cache=cache)
    assert (cache.built, cache.read) == (6, 0)
    again = det.radiograph_cache(cfg)
    second = det.load_patients(patients, 64, Skipped("patient"), cache=again)
    assert (again.built, again.read) == (0, 6)  # nothing decoded
    plain = det.load_patients(patients, 64, Skipped("patient"))  # no cache: decoded here
    for items in (second, plain):
        assert [i["patient_id"] for i in items] == [i["patient_id"] for i in first]
        for item, reference in zip(items, first):
            assert torch.equal(item["image"], reference["image"]) and item["image"].dtype == torch.uint8
            np.testing.assert_array_equal(item["scale"], reference["scale"])
            assert torch.equal(item["target_boxes"], reference["target_boxes"])
    touched = patients[2]["path"]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    third = det.radiograph_cache(cfg)
    det.load_patients(patients, 64, Skipped("patient"), cache=third)
    assert (third.built, third.read) == (1, 5)  # the touched file alone
    larger = det.radiograph_cache(replace(cfg, image_size=96))
    items = det.load_patients(patients, 96, Skipped("patient"), cache=larger)
    assert (larger.built, larger.read) == (6, 0) and items[0]["image"].shape == (1, 96, 96)
    assert det.radiograph_cache(replace(cfg, cache=False)) is None


# DICOM reading


def test_read_dicom_applies_rescale_and_inverts_monochrome1(det, tmp_path):
    stored = np.array([[0, 100], [200, 4000]])
    path = write_dicom(tmp_path / "ct.dcm", stored, RescaleSlope="2", RescaleIntercept="-1024")
    np.testing.assert_array_equal(read_radiograph(path)[0], stored * 2 - 1024)
    path = write_dicom(tmp_path / "mono1.dcm", stored, "MONOCHROME1")
    inverted = read_radiograph(path)[0]
    np.testing.assert_array_equal(inverted, 4000 - stored)  # same range, reversed: the dense pixel is bright
    assert det.to_uint8(inverted, 2)[0, 0, 0] == 255 and det.to_uint8(inverted, 2)[0, 1, 1] == 0


def test_sample_radiographs_decode_as_the_real_ones(det, sample_root):
    patient = det.read_patients(sample_root / RSNA)[0]
    pixels, spacing = read_radiograph(patient["path"])  # JPEG Baseline, through pydicom's Pillow plugin
    assert pixels.shape == (1024, 1024) and 0 <= pixels.min() and pixels.max() <= 255 and pixels.std() > 10
    assert spacing == (0.139, 0.139)  # as the challenge's DICOMs
    item = det.load_patients([patient], 128, Skipped("patient"))[0]
    assert item["image"].shape == (1, 128, 128) and item["image"].dtype == torch.uint8
    np.testing.assert_allclose(item["target_boxes"].numpy(), patient["boxes"] / 8, rtol=1e-6)
    np.testing.assert_allclose(det.to_original(item["target_boxes"].numpy(), item["scale"]), patient["boxes"])


# Bad inputs: each named, skipped and counted


def test_bad_inputs_are_named_skipped_and_counted(det, rsna_copy, capsys):
    patients = det.read_patients(rsna_copy)
    bad = [p["patient_id"] for p in patients if p["class"] == "Lung Opacity"][:6]
    images = rsna_copy / "stage_2_train_images"
    (images / f"{bad[0]}.dcm").unlink()
    ds = pydicom.dcmread(images / f"{bad[1]}.dcm")
    del ds.PixelData
    ds.save_as(images / f"{bad[1]}.dcm")
    ds = pydicom.dcmread(images / f"{bad[2]}.dcm")
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless  # a JPEG-LS file: no decoder is installed for it
    ds.save_as(images / f"{bad[2]}.dcm")
    (images / f"{bad[3]}.dcm").write_bytes(b"not a DICOM file")
    labels = pd.read_csv(rsna_copy / "stage_2_train_labels.csv")
    labels.loc[labels["patientId"] == bad[4], "x"] = 950.0  # with a width of 150 px or more: past the edge
    labels.loc[labels["patientId"] == bad[5], "width"] = np.nan  # a box without a width
    labels.to_csv(rsna_copy / "stage_2_train_labels.csv", index=False)

    skipped = Skipped("patient")
    items = det.load_patients(det.read_patients(rsna_copy), 64, skipped)
    out = capsys.readouterr().out
    problems = [
        "missing DICOM",
        "truncated DICOM",  # its PixelData element removed: the file ends before the pixels its header announces
        "no decoder",
        "unreadable DICOM",
        "box outside the image",
        "invalid box",
    ]
    for patient_id, problem in zip(bad, problems):
        line = next(line for line in out.splitlines() if patient_id in line)
        assert line.startswith(f"Skipped patient {patient_id}: {problem}"), line
    assert "JPEG-LS" in out  # says which compression lacks a decoder
    assert len(items) == 30 and not {i["patient_id"] for i in items} & set(bad)
    assert skipped.counts == dict.fromkeys(problems, 1)
    assert skipped.summary("train").startswith("train: skipped 6 patients")


def test_no_usable_patient_is_one_clear_error(det, rsna_copy, tmp_path):
    for path in (rsna_copy / "stage_2_train_images").glob("*.dcm"):
        path.unlink()
    with pytest.raises(DatasetError, match=r"0 usable patients of 18 drawn.*stage_2_train_images/<patientId>\.dcm"):
        det.load_data(tiny_config(det, tmp_path, rsna_copy.parent))
    (rsna_copy / "stage_2_train_labels.csv").unlink()
    with pytest.raises(DatasetError, match="stage_2_train_labels.csv not found"):
        det.load_data(tiny_config(det, tmp_path, rsna_copy.parent))


# The challenge metric and COCO mAP


def test_rsna_metric_hand_computed_cases(det):
    precision = det.rsna_image_precision
    box, other = [100, 100, 300, 400], [600, 100, 800, 400]
    assert precision([box], [0.9], [box]) == 1.0  # perfect
    assert precision([box], [0.9], [box, other]) == 0.5  # one of two found: TP 1, FN 1 at every threshold
    assert precision([box, other], [0.9, 0.8], [box]) == 0.5  # one false positive: TP 1, FP 1
    assert precision([box], [0.9], []) == 0.0  # any box on a negative radiograph
    assert precision([], [], []) is None  # neither: the image does not count
    assert precision([], [], [box]) == 0.0
    # IoU exactly 0.6 (a box 60% as tall, inside the true one) plus a false positive: hits above 0.40, 0.45, 0.50,
    # 0.55 only (a hit needs IoU > t) -> precision 1/2 at 4 thresholds, 0/3 at the other 4: mean 0.25.
    shorter = [100, 100, 300, 280]
    assert precision([shorter, other], [0.9, 0.8], [box]) == pytest.approx(0.25)
    # Two boxes on one true box: only one is a hit.
    assert precision([box, box], [0.5, 0.9], [box]) == 0.5
    # Order matters: the most confident box takes the true box it overlaps most, B (IoU 0.67; A: 0.43), so the
    # second box, which is B exactly, finds nothing left: 1 hit, 1 miss, 1 false positive at every threshold but
    # 0.70 and 0.75, where the first box misses and the second takes B: 1/3 everywhere. Taken least confident
    # first, or to the first true box above the threshold, it would score more.
    true_a, true_b = [0, 0, 10, 10], [6, 0, 16, 10]
    assert precision([[4, 0, 14, 10], true_b], [0.9, 0.8], [true_a, true_b]) == pytest.approx(1 / 3)

    empty = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0)}
    perfect, missed = {"boxes": np.array([box]), "scores": np.array([0.9])}, empty
    fp = {"boxes": np.array([other]), "scores": np.array([0.3])}
    truths = [np.array([box]), np.array([box]), np.zeros((0, 4)), np.zeros((0, 4))]
    # perfect 1, missed 0, a false positive 0, and an empty negative left out: (1 + 0 + 0) / 3
    assert det.rsna_metric([perfect, missed, fp, empty], truths) == pytest.approx(1 / 3)
    assert det.rsna_metric([perfect, missed, fp, empty], truths, min_score=0.5) == pytest.approx(1 / 2)  # fp dropped
    assert det.rsna_metric([empty] * 4, truths) == 0.0  # predicting nothing
    assert np.isnan(det.rsna_metric([empty, empty], [np.zeros((0, 4))] * 2))  # no image counts
    # The score threshold is chosen to keep the true box and drop the false positive.
    threshold, value = det.choose_score_threshold([perfect, missed, fp, empty], truths, (0.1, 0.2, 0.5, 0.95))
    assert (threshold, value) == (0.5, pytest.approx(1 / 2))


def test_coco_map_is_one_on_perfect_predictions(det):
    truths = [np.array([[100, 100, 300, 400], [600, 100, 800, 400]]), np.zeros((0, 4)), np.array([[50, 60, 250, 300]])]
    perfect = [{"boxes": t, "scores": np.linspace(0.9, 0.8, len(t))} for t in truths]
    assert det.coco_map(perfect, truths) == (pytest.approx(1.0), pytest.approx(1.0))
    shifted = [{"boxes": t + [30, 0, 30, 0], "scores": np.full(len(t), 0.9)} for t in truths]  # IoU 0.74-0.8
    coco, coco50 = det.coco_map(shifted, truths)
    assert coco < 0.6 and coco50 == pytest.approx(1.0)
    no_predictions = [{"boxes": np.zeros((0, 4)), "scores": np.zeros(0)} for _ in truths]
    assert det.coco_map(no_predictions, truths) == (0.0, 0.0)


# The model: COCO weights from the cache, or from scratch


def test_without_cached_weights_it_trains_from_scratch(det, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))
    cfg = det.Config(image_size=64)
    model = det.build_model(cfg)
    expected = tmp_path / "hub" / "checkpoints" / "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"
    assert det.coco_weights(cfg) is None and capsys.readouterr().out == ""  # said once, in the Model cell's line
    n = sum(p.numel() for p in model.parameters())
    assert det.describe_model(cfg, model) == (
        f"fasterrcnn_resnet50_fpn: {n:,} of {n:,} parameters trained, from scratch, all layers trainable: "
        f"COCO weights not found in {expected} (weights=<file> for a copy downloaded elsewhere)"
    )
    assert all(p.requires_grad for p in model.parameters())
    assert isinstance(model.backbone.body.bn1, torch.nn.BatchNorm2d)  # learns its statistics, unlike frozen BN
    assert model.roi_heads.box_predictor.cls_score.out_features == 2
    assert model.transform.min_size == (64,) and model.transform.max_size == 64  # no upsampling to 800 px
    with pytest.raises(ValueError, match="pretrained must be 'auto' or 'none', not 'coco'"):
        det.build_model(replace(cfg, pretrained="coco"))


def test_cached_coco_weights_are_loaded_and_layers_frozen_as_configured(det, tmp_path, monkeypatch):
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))
    coco = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).state_dict()
    path = det.cached_weights_path("fasterrcnn_resnet50_fpn")
    path.parent.mkdir(parents=True)
    torch.save(coco, path)

    cfg = det.Config(image_size=64, trainable_backbone_layers=3)
    model = det.build_model(cfg)
    assert det.coco_weights(cfg) == path and det.describe_model(cfg, model).endswith(f"from the COCO weights in {path}")
    parameters = dict(model.named_parameters())
    for name in ("backbone.body.layer4.0.conv1.weight", "rpn.head.cls_logits.weight"):
        torch.testing.assert_close(parameters[name], coco[name])
    assert model.roi_heads.box_predictor.cls_score.out_features == 2  # COCO's 91 classes replaced
    # Three trainable ResNet stages counted from the top: layer4, layer3, layer2; the stem and layer1 frozen.
    frozen = {name for name, p in parameters.items() if not p.requires_grad}
    assert frozen == {name for name in parameters if name.startswith(("backbone.body.conv1", "backbone.body.layer1"))}

    model = det.build_model(det.Config(image_size=64, train_predictor_only=True))
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"roi_heads.box_predictor.{layer}.{kind}" for layer in ("cls_score", "bbox_pred")
                       for kind in ("weight", "bias")}  # fmt: skip

    cfg = det.Config(image_size=64, pretrained="none")
    assert det.coco_weights(cfg) is None  # weights present, but from scratch asked for
    assert det.describe_model(cfg, det.build_model(cfg)).endswith(
        "from scratch, all layers trainable (pretrained='none')"
    )


def test_a_weights_file_is_loaded_as_torchvision_loads_its_coco_weights(det, tmp_path, monkeypatch):
    """weights=<file> (torchvision's COCO file, downloaded elsewhere) is used before the torch cache, and gives the
    network torchvision's builder gives from its cache: the same weights, the same frozen layers and batch norm."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights, fasterrcnn_resnet50_fpn

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))  # an empty cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))
    coco = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()  # random, COCO-shaped
    torch.save(coco, tmp_path / "downloaded.pth")
    cfg = det.Config(image_size=64, weights=tmp_path / "downloaded.pth")
    assert det.coco_weights(cfg) == tmp_path / "downloaded.pth"
    model = det.build_model(cfg)
    assert det.describe_model(cfg, model).endswith(f"from the COCO weights in {tmp_path / 'downloaded.pth'}")
    state = model.state_dict()
    backbone = [key for key in coco if key.startswith("backbone.") and not key.endswith("num_batches_tracked")]
    assert len(backbone) > 200 and all(torch.equal(state[key], coco[key]) for key in backbone)  # the file's weights

    cache = det.cached_weights_path("fasterrcnn_resnet50_fpn")  # torchvision's own loading, from its cache
    cache.parent.mkdir(parents=True)
    torch.save(coco, cache)
    reference = fasterrcnn_resnet50_fpn(weights=FasterRCNN_ResNet50_FPN_Weights.COCO_V1, trainable_backbone_layers=3)
    ours = dict(model.named_modules())
    for name, module in reference.named_modules():
        if not name.startswith("roi_heads.box_predictor"):  # ours predicts 2 classes, COCO's 91
            assert type(ours[name]) is type(module), name
            assert getattr(ours[name], "eps", None) == getattr(module, "eps", None), name
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, parameter in reference.named_parameters():
        if not name.startswith("roi_heads.box_predictor"):
            assert grads[name] == parameter.requires_grad, name
            assert torch.equal(state[name], parameter.detach()), name


def test_a_missing_or_unfit_weights_file_is_one_line(det, tmp_path, monkeypatch):
    from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    with pytest.raises(DatasetError, match=r"^weights=\S+nowhere.pth not found: give torchvision's COCO file for "
                       r"fasterrcnn_resnet50_fpn \(fasterrcnn_resnet50_fpn_coco-258fb6c6.pth\)"):  # fmt: skip
        det.build_model(det.Config(image_size=64, weights=tmp_path / "nowhere.pth"))
    (tmp_path / "text.pth").write_text("not weights")
    with pytest.raises(DatasetError, match=r"text.pth: not a readable PyTorch weights file \(UnpicklingError\)$"):
        det.build_model(det.Config(image_size=64, weights=tmp_path / "text.pth"))
    torch.save(fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None).state_dict(), tmp_path / "v2.pth")
    with pytest.raises(DatasetError, match=r"v2.pth: not the COCO weights of fasterrcnn_resnet50_fpn \(\d+ of"):
        det.build_model(det.Config(image_size=64, weights=tmp_path / "v2.pth"))
    with pytest.raises(ValueError, match="ask for opposite starts"):
        det.build_model(det.Config(image_size=64, weights=tmp_path / "v2.pth", pretrained="none"))


# The submission


class FixedDetector(torch.nn.Module):
    """Stands in for the trained model: the same two boxes (in network pixels) on every radiograph."""

    def forward(self, images):
        boxes = torch.tensor([[8.0, 4.0, 24.0, 36.0], [40.0, 8.0, 56.0, 30.0]])
        return [{"boxes": boxes, "scores": torch.tensor([0.9, 0.3]), "labels": torch.ones(2)} for _ in images]


def test_boxes_come_back_in_each_inputs_own_pixels_best_first(det, sample_root, tmp_path, capsys):
    test_dir = sample_root / RSNA / "stage_2_test_images"
    first = sorted(test_dir.glob("*.dcm"))[0]
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(first, folder / first.name)
    Image.new("L", (600, 800), 40).save(folder / "tall.png")  # 600 wide, 800 high: x and y scale apart
    (folder / "broken.dcm").write_bytes(b"truncated")
    cfg = tiny_config(det, tmp_path, sample_root)  # 64 px
    skipped = Skipped("file")
    rows, pictures = det.predict_files(FixedDetector(), sorted(folder.iterdir()), cfg, 0.5, tmp_path / "out", skipped)
    assert f"Skipped {folder / 'broken.dcm'}: unreadable DICOM" in capsys.readouterr().out
    assert set(rows) == {first.stem, "tall"} and skipped.counts == {"unreadable DICOM": 1}
    assert [p.name for p in pictures] == [f"{first.stem}_boxes.png", "tall_boxes.png"]
    # One box kept (the 0.3 one is under 0.5): 64 px -> 1024 px: x 8 -> 128, y 4 -> 64, width 16 -> 256, height
    # 32 -> 512; -> 600 x 800 px: x 8 -> 75, y 4 -> 50, width 16 -> 150, height 32 -> 400.
    assert rows[first.stem] == "0.9000 128.0 64.0 256.0 512.0"
    assert rows["tall"] == "0.9000 75.0 50.0 150.0 400.0"
    assert det.prediction_string({"boxes": np.zeros((0, 4)), "scores": np.zeros(0)}) == ""


# The stages


def box_scores(submission: pd.DataFrame) -> list[float]:
    """The confidence of every box of a submission ("conf x y width height ..." per radiograph)."""
    return [float(value) for string in submission["PredictionString"] for value in string.split()[::5]]


def assert_per_case_is_the_best_epoch(per_case: pd.DataFrame, data, best: dict, out_dir: Path) -> None:
    """val_per_case.csv: one row per validation radiograph, NaN exactly where a radiograph does not count (no true
    box, no box kept), and the mean over the others the best epoch's validation RSNA metric. test_per_case.csv, the
    Evaluate cell's `per_case`: the same per test radiograph, with the threshold validation chose."""
    val_per_case = pd.read_csv(out_dir / "val_per_case.csv")
    pd.testing.assert_frame_equal(pd.read_csv(out_dir / "test_per_case.csv"), per_case)
    for table, items in ((val_per_case, data.val), (per_case, data.test)):
        assert list(table.columns) == PER_CASE and table["patient_id"].tolist() == [i["patient_id"] for i in items]
        assert table["true_boxes"].tolist() == [len(item["boxes"]) for item in items]
        skipped = (table["true_boxes"] == 0) & (table["predicted_boxes"] == 0)
        assert table["rsna_precision"].isna().tolist() == skipped.tolist()
    assert val_per_case["rsna_precision"].mean() == pytest.approx(best["val_rsna"], abs=1e-9)  # pandas skips NaN


def test_fit_resumes_then_evaluate_best_and_predict_use_the_best_epoch(det, sample_root, tmp_path, capsys):
    cfg = tiny_config(det, tmp_path, sample_root, max_epochs=1, tensorboard=True)
    data = det.load_data(cfg)
    # 4 per class to training; validation and test each a third as many, one per class.
    assert not data.synthetic and [len(data.train), len(data.val), len(data.test)] == [12, 3, 3]
    assert len({i["patient_id"] for i in data.train + data.val + data.test}) == 18
    first = det.fit(cfg, data, det.build_model(cfg))
    history = det.fit(replace(cfg, max_epochs=2, resume=True), data, det.build_model(cfg))
    out = capsys.readouterr().out
    assert "1 epoch(s) done" in out and f"Training on {det.DEVICE.type}: 12 radiographs, 2 steps per epoch" in out
    assert [row["epoch"] for row in history] == [1, 2] and history[:1] == first
    assert history[1]["train_loss"] < history[0]["train_loss"]  # it learns something in four steps
    table = pd.read_csv(cfg.output_dir / "history.csv")
    assert list(table.columns) == ["epoch", *LOSSES, *METRICS, "lr", "seconds"] and len(table) == 2
    np.testing.assert_allclose(table["train_loss"], [row["train_loss"] for row in history])
    assert (table["val_rsna_predict_nothing"] == 0).all()  # the validation set has opacities
    np.testing.assert_allclose(table["train_loss"], [r["loss_classifier"] + r["loss_box_reg"] + r["loss_objectness"]
                                                     + r["loss_rpn_box_reg"] for r in history])  # fmt: skip

    checkpoint = torch.load(cfg.output_dir / "best_model.pt", weights_only=True)
    best = history.best()
    assert best == max(history, key=lambda row: row["val_rsna"])  # the first of equals
    assert checkpoint["epoch"] == best["epoch"] and checkpoint["metric"] == best["val_rsna"]
    assert checkpoint["metrics"]["score_threshold"] == best["score_threshold"] in cfg.score_thresholds
    assert checkpoint["config"]["image_size"] == 64 and checkpoint["metric_name"] == "val_rsna"
    det.build_model(cfg).load_state_dict(checkpoint["model"])  # strict: every weight is there
    assert len(list((cfg.output_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per run
    with Image.open(cfg.output_dir / "rsna_metric_per_epoch.png") as img:
        assert img.format == "PNG" and img.width > 100

    # Another configuration now (a user's edit): the best model is built as it was saved, not as cfg says.
    later = replace(cfg, image_size=128, rpn_proposals_test=300)
    per_case = det.evaluate_best(later, data)
    assert_per_case_is_the_best_epoch(per_case, data, best, cfg.output_dir)
    with Image.open(cfg.output_dir / "val_predictions.png") as img:
        assert img.format == "PNG" and img.width > 2 * 150  # two radiographs side by side
    out = capsys.readouterr().out
    assert f"Best epoch {best['epoch']}: validation RSNA metric" in out
    assert f"Test RSNA metric {per_case['rsna_precision'].mean():.4f} (" in out and "of 3 radiographs" in out
    predictions = det.predict(later, data.root / "stage_2_test_images")
    assert predictions[-1] == cfg.output_dir / "predictions" / "predictions.csv"
    written = pd.read_csv(predictions[-1], keep_default_na=False)
    assert written["patientId"].tolist() == sorted(p.stem for p in (data.root / "stage_2_test_images").glob("*.dcm"))
    assert all(score >= best["score_threshold"] for score in box_scores(written))  # the best epoch's threshold


def test_ctrl_c_or_a_nan_loss_stop_with_one_line_and_keep_checkpoints(det, sample_root, tmp_path, monkeypatch, capsys):
    cfg = tiny_config(det, tmp_path, sample_root, max_epochs=1)
    data = det.load_data(cfg)
    history = det.fit(cfg, data, det.build_model(cfg))
    best, last = cfg.output_dir / "best_model.pt", cfg.output_dir / "last_checkpoint.pt"
    kept = best.read_bytes()
    nan = "Loss is nan at epoch 2, batch 0"
    for error, line, status in (
        (KeyboardInterrupt(), f"Interrupted during epoch 2: {last} holds epoch 1; run again with resume=True", 130),
        (FloatingPointError(nan), f"{nan}. Kept: {best} (epoch 1)", 1),
    ):

        def stopped(*args, error=error, **kwargs):
            raise error

        monkeypatch.setattr(det, "train_one_epoch", stopped)
        capsys.readouterr()
        stopped_history = det.fit(replace(cfg, max_epochs=3, resume=True), data, det.build_model(cfg))
        assert stopped_history == history and stopped_history.stopped.startswith(line)
        assert line in capsys.readouterr().out
        assert best.read_bytes() == kept and torch.load(last, weights_only=True)["epoch"] == 1
        with pytest.raises(SystemExit) as ended:  # the Train cell ends the run there: no evaluation, no submission
            det.end_if_stopped(stopped_history)
        assert ended.value.code == status


def test_same_seed_same_split_and_same_first_epoch_on_the_cpu(det, sample_root, tmp_path):
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        cfg = tiny_config(det, tmp_path / name, sample_root, max_epochs=1, seed=seed)
        data = det.load_data(cfg)
        history = det.fit(cfg, data, det.build_model(cfg))
        runs.append(([[item["patient_id"] for item in part] for part in (data.train, data.val, data.test)], history[0]))
    (split_a, first_a), (split_b, first_b), (split_c, other) = runs
    assert split_a == split_b and split_c[1:] == split_a[1:]  # the split is split_seed's; seed draws training's cap
    assert split_c[0] != split_a[0]
    assert first_a["train_loss"] == first_b["train_loss"] and other["train_loss"] != first_a["train_loss"]  # bitwise


# A tiny run, written as a user edits the configuration cell: `cfg = Config(...)` inline.
TINY = "max_epochs=1, max_steps_per_epoch=2, patients_per_class=3, image_size=64, examples=2"


def test_runs_as_a_script_from_another_directory(sample_root, tmp_path, monkeypatch, repo_copy):
    """`QUICK=1 python path/to/pneumonia_detection.py`: paths resolve against the script's folder, not the cwd."""
    repo = repo_copy("pneumonia_detection.py", {f"sample/{RSNA}": sample_root / RSNA})
    script = repo / "pneumonia_detection.py"
    assert script.read_text().count("\ncfg = Config()\n") == 1
    script.write_text(script.read_text().replace("\ncfg = Config()\n", f"\ncfg = Config({TINY})\n"))
    monkeypatch.setenv("QUICK", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no COCO weights there: from scratch
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"using the SYNTHETIC sample in {repo / 'data' / 'sample' / RSNA}" in result.stdout
    assert "Configuration: QUICK run, with " in result.stdout and "COCO weights" in result.stdout
    output = repo / "output" / "pneumonia_detection"
    assert "  data:    SYNTHETIC sample" in result.stdout  # the closing summary
    assert "\nFROM SCRATCH: no COCO weights, scores not comparable with the leaderboard\n" in result.stdout
    assert (
        "validation 3 radiographs, 1 with opacity (33.3%), test 3 radiographs, 1 with opacity (33.3%) (of all 36 "
        "labelled patients: 33.3%)" in result.stdout
    )
    assert {p.name for p in output.iterdir()} == {
        "best_model.pt", "last_checkpoint.pt", "history.csv", "rsna_metric_per_epoch.png", "batch.png",
        "skipped.csv", "val_per_case.csv", "test_per_case.csv", "val_predictions.png", "predictions",
    }  # fmt: skip
    assert (output / "predictions" / "predictions.csv").is_file()
    picture = repo / "Images" / "pneumonia_detection_predictions.png"
    assert list((repo / "Images").iterdir()) == [picture]
    assert picture.read_bytes() == (output / "val_predictions.png").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # nothing written to the working directory


@pytest.mark.slow
def test_quick_run_of_the_cells_learns_to_find_the_opacities(sample_root, tmp_path, run_cells, capsys):
    """All the cells with QUICK=1's settings, as `QUICK=1 python pneumonia_detection.py` runs them (about 2.5 min on
    2 CPU cores): the validation RSNA metric beats predicting nothing (0), and every cell leaves its result."""
    data_dir = tmp_path / "data"  # no real download there: the script must say it uses the sample
    (data_dir / "sample").mkdir(parents=True)
    (data_dir / "sample" / RSNA).symlink_to(sample_root / RSNA)
    out_dir, images_dir = tmp_path / "out", tmp_path / "Images"
    cells = run_cells("pneumonia_detection", data_dir=data_dir, output_dir=out_dir, images_dir=images_dir, quick=True)
    cfg, data, batch, history, per_case = (cells[name] for name in ("cfg", "data", "batch", "history", "per_case"))
    out = capsys.readouterr().out
    assert cfg.quick and cfg.max_epochs == 10 and cfg.image_size == 128  # the quick run's settings
    assert "Configuration: QUICK run, with " in out and "COCO weights" in out
    # All 36 patients: 2 per class validated, 2 per class tested.
    assert data.synthetic and [len(data.train), len(data.val), len(data.test)] == [24, 6, 6]
    images, targets = batch
    assert len(images) == cfg.batch_size and images[0].shape == (3, 128, 128) and images[0].dtype == torch.float32
    assert all(t["labels"].tolist() == [1] * len(t["boxes"]) for t in targets) and isinstance(
        cells["model"], torch.nn.Module
    )

    assert len(history) == cfg.max_epochs and [row["lr"] for row in history] == [cfg.lr] * 10  # no drop: step_size 10
    best = history.best()
    assert all(row["val_rsna_predict_nothing"] == 0 for row in history)
    assert best["val_rsna"] > 0.1, best  # learnt: predicting nothing scores 0
    assert best == max(history, key=lambda row: row["val_rsna"])
    checkpoint = torch.load(out_dir / "best_model.pt", weights_only=True)
    assert checkpoint["epoch"] == best["epoch"] and checkpoint["metrics"]["score_threshold"] == best["score_threshold"]
    assert_per_case_is_the_best_epoch(per_case, data, best, out_dir)
    assert not math.isnan(per_case["rsna_precision"].max())

    for name in ("rsna_metric_per_epoch.png", "batch.png", "val_predictions.png"):
        with Image.open(out_dir / name) as figure:
            assert figure.format == "PNG", name
    picture = images_dir / "pneumonia_detection_predictions.png"  # the sample was used: the README's picture
    assert (
        list(images_dir.iterdir()) == [picture]
        and picture.read_bytes() == (out_dir / "val_predictions.png").read_bytes()
    )
    summary = out[out.index("\nSummary (") :]
    counts = "24 train, 6 validation, 6 test radiographs"
    assert f"data:    SYNTHETIC sample {data_dir / 'sample' / RSNA}: {counts}" in summary
    test = f"test RSNA metric {per_case['rsna_precision'].mean():.4f} (95% CI "
    assert f"best:    epoch {best['epoch']} of 10, {test}" in summary  # the result
    assert f"validation RSNA metric {best['val_rsna']:.4f} at score" in summary
    assert f"outputs: {out_dir}/" in summary and f"picture: {picture}" in summary

    submission = pd.read_csv(out_dir / "predictions" / "predictions.csv", keep_default_na=False)
    assert len(submission) == 6 and submission["patientId"].is_unique and (submission["PredictionString"] != "").any()
    assert all(score >= best["score_threshold"] for score in box_scores(submission))


# Predict: the user's own radiographs with the trained model


@pytest.fixture(scope="module")
def trained(det, sample_root, tmp_path_factory):
    """The configuration of a tiny run trained once for this module's prediction tests (a few seconds), with
    cfg.checkpoint a copy of its best_model.pt whose box classifier is biased towards "opacity" (after two steps it
    favours the background by about 10): the network then finds boxes of varied scores, kept from 0.6 up (the
    copy's score threshold)."""
    tmp_path = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(det, tmp_path, sample_root, max_epochs=1)
    det.fit(cfg, det.load_data(cfg), det.build_model(cfg))
    checkpoint = torch.load(cfg.output_dir / "best_model.pt", weights_only=True)
    checkpoint["model"]["roi_heads.box_predictor.cls_score.bias"] += torch.tensor([0.0, 12.0])  # ~ -10 before
    checkpoint["metrics"]["score_threshold"] = 0.6
    torch.save(checkpoint, tmp_path / "finds_boxes.pt")
    return replace(cfg, checkpoint=tmp_path / "finds_boxes.pt")


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def user_folder(sample_root: Path, folder: Path) -> Path:
    """A user's radiographs: a challenge DICOM, the same one without its extension (DICOM by content), its pixels as
    a PNG, and a non-square PNG (600 wide, 800 high) and a JPEG (700 wide, 500 high) cut from it."""
    folder.mkdir()
    dicom = sorted((sample_root / RSNA / "stage_2_test_images").glob("*.dcm"))[0]
    shutil.copy(dicom, folder / "chest.dcm")
    shutil.copy(dicom, folder / "1.2.840.99")  # a PACS export: a UID for a name, no extension
    pixels = read_radiograph(dicom)[0].astype(np.uint8)  # 8-bit, as the challenge's
    Image.fromarray(pixels).save(folder / "chest8.png")
    Image.fromarray(pixels[100:900, 300:900]).save(folder / "tall.png")
    Image.fromarray(pixels[200:700, 100:800]).save(folder / "wide.jpg", quality=95)
    return folder


def read_boxes(string: str) -> tuple[np.ndarray, np.ndarray]:
    """(scores (n,), boxes (n, 4) x, y, width, height) of a PredictionString."""
    values = np.array(string.split(), dtype=np.float64).reshape(-1, 5)
    return values[:, 0], values[:, 1:]


def expected_boxes(det, checkpoint_path: Path, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The boxes recomputed without the Predict cell: Pillow's pixels, stretched and resized to the checkpoint's size
    by hand, the checkpoint's network, boxes scaled back by width and height, kept above its score threshold."""
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    size = checkpoint["config"]["image_size"]
    model = det.build_model(det.Config.from_dict(checkpoint["config"]))
    model.load_state_dict(checkpoint["model"])
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    unit = torch.from_numpy((pixels - pixels.min()) / (pixels.max() - pixels.min()))[None, None]
    small = torch.nn.functional.interpolate(unit, size=(size, size), mode="bilinear", antialias=True)
    image = ((small[0] * 255).round().clamp(0, 255).to(torch.uint8).float() / 255).expand(3, -1, -1)
    with torch.no_grad():
        out = model.eval()([image])[0]
    keep = out["scores"].numpy() >= checkpoint["metrics"]["score_threshold"]
    height, width = pixels.shape
    boxes = out["boxes"].numpy()[keep] * np.array([width, height, width, height]) / size
    return out["scores"].numpy()[keep], np.c_[boxes[:, :2], boxes[:, 2:] - boxes[:, :2]]


def test_predict_on_dicom_png_and_jpeg_of_any_size(det, trained, sample_root, tmp_path, capsys):
    folder = user_folder(sample_root, tmp_path / "mine")
    written = det.predict(trained, folder)
    out = capsys.readouterr().out
    predictions = trained.output_dir / "predictions"
    assert f"Predicting with {trained.checkpoint} (epoch 1, val_rsna" in out and "image_size=64" in out
    assert f"Predicted 5 of 5 radiographs into {predictions} (5 with boxes of score >= 0.60" in out
    assert "no file skipped" in out
    names = ["1.2.840.99", "chest", "chest8", "tall", "wide"]  # patientId: the file's name without its extension
    assert written == [predictions / f"{name}_boxes.png" for name in names] + [predictions / "predictions.csv"]
    for picture in written[:-1]:
        with Image.open(picture) as img:
            assert img.format == "PNG" and img.width > 300
    table = pd.read_csv(written[-1], keep_default_na=False, dtype=str)
    assert list(table.columns) == ["patientId", "PredictionString"] and table["patientId"].tolist() == names
    strings = dict(zip(table["patientId"], table["PredictionString"]))
    assert strings["1.2.840.99"] == strings["chest"] == strings["chest8"]  # the same radiograph: DICOM or PNG
    for name, path, (height, width) in [("tall", "tall.png", (800, 600)), ("wide", "wide.jpg", (500, 700))]:
        scores, boxes = read_boxes(strings[name])
        assert len(scores) > 2 and (np.diff(scores) <= 0).all() and (scores >= 0.6).all()  # best first
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] > 0).all()  # within the input's own width and height
        assert (boxes[:, 0] + boxes[:, 2] <= width + 0.1).all() and (boxes[:, 1] + boxes[:, 3] <= height + 0.1).all()
        want_scores, want_boxes = expected_boxes(det, trained.checkpoint, folder / path)
        np.testing.assert_allclose(scores, want_scores, atol=6e-5)
        np.testing.assert_allclose(boxes, want_boxes, atol=0.06)  # written with one decimal


def test_by_default_the_challenges_test_folder_every_patient_listed(det, trained, rsna_copy, tmp_path, capsys):
    test_dir = rsna_copy / "stage_2_test_images"
    broken = sorted(test_dir.glob("*.dcm"))[0]
    broken.write_bytes(broken.read_bytes()[:1000])
    cfg = replace(trained, data_dir=rsna_copy.parent, output_dir=tmp_path / "out", prediction_pictures=2)
    written = det.predict(cfg, cfg.predict_inputs)  # None: stage_2_test_images/, in Kaggle's submission format
    out = capsys.readouterr().out
    assert cfg.predict_inputs is None and f"Skipped {broken}: " in out
    assert "1 patient of stage_2_sample_submission.csv not predicted: listed with no box" in out
    assert "Pictures of the first 2 of 5 radiographs only (prediction_pictures)" in out and len(written) == 3
    table = pd.read_csv(cfg.output_dir / "predictions" / "predictions.csv", keep_default_na=False)
    listed = pd.read_csv(rsna_copy / "stage_2_sample_submission.csv")["patientId"]
    assert table["patientId"].tolist() == sorted(listed) == sorted(p.stem for p in test_dir.glob("*.dcm"))
    strings = dict(zip(table["patientId"], table["PredictionString"]))
    assert strings.pop(broken.stem) == "" and all(strings.values())  # a row each: the broken one with no box
    for string in strings.values():
        _, boxes = read_boxes(string)
        assert (boxes[:, 0] + boxes[:, 2] <= 1024.1).all() and (boxes[:, 1] + boxes[:, 3] <= 1024.1).all()


def test_damaged_files_are_named_skipped_and_inputs_never_changed(det, trained, sample_root, tmp_path, capsys):
    folder = user_folder(sample_root, tmp_path / "mine")
    whole = (folder / "chest.dcm").read_bytes()
    (folder / "cut.dcm").write_bytes(whole[: len(whole) // 2])  # a download cut short
    (folder / "notes.png").write_text("not an image: a text file renamed")
    shutil.copy(folder / "wide.jpg", folder / "wide.jpeg")  # a second "wide": one row per patientId
    before = digests(folder)
    written = det.predict(trained, folder)
    out = capsys.readouterr().out
    assert digests(folder) == before  # only read
    skipped = [line for line in out.splitlines() if line.startswith("Skipped ")]
    assert len(skipped) == 3 and all(line.count("\n") == 0 for line in skipped)
    assert f"Skipped {folder / 'cut.dcm'}: truncated DICOM ({folder / 'cut.dcm'} ends after" in out
    assert f"Skipped {folder / 'notes.png'}: unreadable image" in out
    assert f"Skipped {folder / 'wide.jpg'}: same name (a file named wide was predicted already" in out
    assert "Warning" not in capsys.readouterr().err  # pydicom's warnings on the cut file: the one line says it
    assert re.search(r"Predicted 5 of 8 radiographs .*: skipped 3 files \(1 \w+.*, 1 .*, 1 .*\)$", out, re.M), out
    table = pd.read_csv(written[-1], keep_default_na=False)
    assert table["patientId"].tolist() == ["1.2.840.99", "chest", "chest8", "tall", "wide"]  # the others predicted


def test_predict_takes_the_checkpoints_settings_whatever_cfg_says(det, trained, sample_root, tmp_path):
    folder = user_folder(sample_root, tmp_path / "mine")
    first = det.predict(trained, folder)
    other = replace(trained, output_dir=tmp_path / "other", image_size=128, rpn_proposals_test=300,
                    score_thresholds=(0.9,), pretrained="auto", model="fasterrcnn_resnet50_fpn_v2")  # fmt: skip
    second = det.predict(other, folder)
    assert [p.name for p in second] == [p.name for p in first]
    assert second[-1].read_bytes() == first[-1].read_bytes()  # the same boxes, to the byte


def test_a_model_trained_from_coco_weights_predicts_without_them(det, tmp_path, monkeypatch):
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("tried to download"))
    coco = det.cached_weights_path("fasterrcnn_resnet50_fpn")
    coco.parent.mkdir(parents=True)
    torch.save(fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).state_dict(), coco)
    cfg = det.Config(image_size=64, output_dir=tmp_path)
    model = det.build_model(cfg)  # from COCO: its ResNet's batch norm frozen
    checkpoint = {"model": model.state_dict(), "config": config_dict(cfg), "epoch": 1, "metric": 0.1}
    checkpoint |= {"metric_name": "val_rsna", "metrics": {"score_threshold": 0.5}}
    torch.save(checkpoint, tmp_path / "best_model.pt")
    coco.unlink()  # another machine: no COCO weights in its cache
    loaded, _, _ = det.load_trained(cfg, det.build_trained_model, det.DEVICE)  # strict: every weight fits
    assert det.coco_weights(cfg) is None and isinstance(loaded.backbone.body.bn1, FrozenBatchNorm2d)
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model.eval()([image])[0], loaded([image])[0]
    assert len(want["scores"]) > 10
    for key in ("boxes", "scores"):
        assert torch.equal(got[key], want[key])  # the network as trained, to the bit


def test_a_garbage_or_foreign_checkpoint_is_one_error_naming_it(det, trained, sample_root, tmp_path):
    folder = user_folder(sample_root, tmp_path / "mine")
    garbage, foreign = tmp_path / "garbage.pt", tmp_path / "other_script.pt"
    garbage.write_bytes(b"these are not weights")
    torch.save({"model": {}, "config": {"foo": 1}, "epoch": 1, "metric": 0.0, "metric_name": "x"}, foreign)
    for path, words in ((garbage, "cannot be read as a checkpoint"), (foreign, "was written by another script")):
        with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}.*{words}"):
            det.predict(replace(trained, checkpoint=path), folder)


def test_predict_from_the_command_line_trains_nothing(trained, sample_root, tmp_path, monkeypatch, repo_copy):
    """`PREDICT=<folder> python pneumonia_detection.py`, with a best_model.pt from an earlier run: it predicts and
    exits, no data loaded, no epoch; a garbage CHECKPOINT= is one line, status 1, no traceback."""
    repo = repo_copy("pneumonia_detection.py")
    output = repo / "output" / "pneumonia_detection"
    output.mkdir(parents=True)
    shutil.copy(trained.checkpoint, output / "best_model.pt")
    folder = user_folder(sample_root, tmp_path / "mine")
    monkeypatch.setenv("PREDICT", str(folder))
    monkeypatch.delenv("CHECKPOINT", raising=False)
    monkeypatch.setenv("QUICK", "1")
    script = [sys.executable, str(repo / "pneumonia_detection.py")]
    result = subprocess.run(script, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"Predicting with {output / 'best_model.pt'} (epoch 1" in result.stdout and "image_size=64" in result.stdout
    assert "epoch " not in result.stdout.replace("(epoch 1", "") and "labelled patients" not in result.stdout
    assert sorted(p.name for p in output.iterdir()) == ["best_model.pt", "predictions"]  # no history.csv, no plot
    assert (output / "predictions" / "predictions.csv").is_file()

    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    monkeypatch.setenv("CHECKPOINT", str(tmp_path / "garbage.pt"))
    result = subprocess.run(script, cwd=tmp_path, capture_output=True, text=True)
    printed = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in printed, printed[-3000:]
    problems = [line for line in printed.splitlines() if line.startswith("Checkpoint problem:")]
    assert len(problems) == 1 and str(tmp_path / "garbage.pt") in problems[0], printed[-3000:]
