"""Write small synthetic stand-ins for the five datasets, in the exact layout of the real downloads.

No dataset can be downloaded or committed here, so every pipeline reads the real on-disk format from
`data/<dataset>/` and, when that folder is missing, from `data/sample/<dataset>/`, which this module
writes: the same folder layout, file names, formats, dtypes and header fields as the real download
(see DATASETS.md), fewer and smaller files, deterministic by seed, with a signal a model can learn.

    python sample_data.py              # writes data/sample/ (datasets already there are kept)
    python sample_data.py --overwrite  # writes them again
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
import pandas as pd
from PIL import Image
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from scipy import ndimage

from data_cleaning import DatasetError, rle_encode

REPO_ROOT = Path(__file__).resolve().parent
DATA_DIR = REPO_ROOT / "data"
SAMPLE_DIR = DATA_DIR / "sample"


# %% Shared 2D drawing helpers (nerve ultrasound, RSNA and Montgomery radiographs)


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates as open grids ((H, 1) and (1, W)): shapes broadcast without (H, W) index arrays."""
    return np.arange(height, dtype=np.float32)[:, None], np.arange(width, dtype=np.float32)[None, :]


def _ellipse_r2(yy, xx, center, radii, angle: float = 0.0) -> np.ndarray:
    """Squared normalised radius of an ellipse (center (y, x), radii (ry, rx), rotated by `angle` radians).

    <= 1 inside. Returning the radius rather than a mask lets one call give both a shape and a soft profile.
    """
    # Python floats: a NumPy float64 scalar would promote the float32 grids to float64 (NEP 50).
    (cy, cx), (ry, rx) = map(float, center), map(float, radii)
    dy, dx = yy - cy, xx - cx
    if angle:
        dx, dy = dx * np.cos(angle) + dy * np.sin(angle), dy * np.cos(angle) - dx * np.sin(angle)
    return (dy / ry) ** 2 + (dx / rx) ** 2  # unrotated: an (H, 1) plus a (1, W) term, the cheap common case


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Smooth random field of about unit amplitude: a coarse (cells) grid of normal values, upsampled bilinearly.

    Upsampling a small grid costs the same at any feature size, where a Gaussian filter of a full-size
    image gets slower as the features grow.
    """
    coarse = rng.standard_normal(cells).astype(np.float32)
    field = ndimage.zoom(coarse, (shape[0] / cells[0], shape[1] / cells[1]), order=1, mode="nearest", grid_mode=True)
    return field[: shape[0], : shape[1]]


def _add_blob(rng, image: np.ndarray, center, radii, amplitude: float, patchiness: float = 0.0) -> None:
    """Add, in place, a soft elliptical blob that fades to zero on the ellipse (its bounding box is the ellipse's).

    Only the ellipse's bounding window is computed, so a small lesion on a 1024-px image stays cheap.
    `patchiness` > 0 modulates it with smooth noise, as consolidations and infiltrates are not uniform.
    """
    top, left = max(int(center[0] - radii[0]), 0), max(int(center[1] - radii[1]), 0)
    bottom = min(int(np.ceil(center[0] + radii[0])) + 1, image.shape[0])
    right = min(int(np.ceil(center[1] + radii[1])) + 1, image.shape[1])
    yy, xx = _grid(bottom - top, right - left)
    r2 = _ellipse_r2(yy + top, xx + left, center, radii)
    profile = np.clip(1 - r2, 0, 1) ** 0.6  # flat-topped haze with soft edges
    if patchiness:
        profile *= np.clip(1 + patchiness * _smooth_noise(rng, profile.shape, (5, 5)), 0, None)
    image[top:bottom, left:right] += amplitude * profile


def _radiograph_phantom(rng: np.random.Generator, height: int, width: int, heart_scale: float = 1.0):
    """A frontal chest radiograph: (density in [0, 1], bright = dense, the patient's left lung, right lung).

    Radiograph convention: air (outside the body, in the lungs) is dark; soft tissue, heart and bone are
    bright. The patient faces the viewer, so the patient's left lung is on the image's right side, and
    the heart, which sits left of the midline, cuts into it. Sizes scale with the shorter side, so the
    same code gives an RSNA square, a Montgomery portrait and a landscape (with wider dark margins).
    Lung masks are the exact regions drawn darker; the image edges are softened, the masks are not.
    """
    s = min(height, width)
    yy, xx = _grid(height, width)
    # Python floats keep every image float32 (NumPy float64 scalars would promote them).
    cx = width / 2 + float(rng.normal(0, 0.01 * s))
    cy = 0.47 * height + float(rng.normal(0, 0.01 * s))  # centre of the lungs, a little above the image centre
    lung_ry, lung_rx, lung_dx = (f * s * float(rng.uniform(0.93, 1.07)) for f in (0.31, 0.18, 0.21))

    def lung(side: int) -> np.ndarray:
        # A rounded apex (upper half: an ellipse), a flat base on the diaphragm (lower half: a squarer
        # superellipse), wider below than above: the lungs widen down to the costophrenic angles.
        v = (yy - cy) / lung_ry
        half_width = lung_rx * np.sqrt(np.clip(1 - np.abs(v) ** np.where(v < 0, 2, 5), 0, None)) * (0.85 + 0.15 * v)
        return np.abs(xx - (cx + side * lung_dx)) < half_width

    heart = _ellipse_r2(yy, xx, (cy + 0.19 * s, cx + 0.05 * s), (0.13 * s * heart_scale, 0.17 * s * heart_scale)) <= 1
    right_lung, left_lung = lung(-1) & ~heart, lung(+1) & ~heart
    body = _ellipse_r2(yy, xx, (cy + 0.12 * s, cx), (0.64 * s, 0.47 * s)) <= 1

    density = np.where(body, np.float32(0.6), np.float32(0.06))
    density += 0.25 * np.exp(-(((xx - cx) / (0.06 * s)) ** 2)) * body  # spine and mediastinum
    # Ribs: bright bands that rise from the spine and curve down laterally; only over the chest.
    phase = (yy - 0.35 * np.abs(xx - cx) + 0.9 * (xx - cx) ** 2 / s) / (0.085 * s)
    ribs = np.clip((np.cos(2 * np.pi * phase) - 0.55) / 0.45, 0, 1) * (yy < cy + lung_ry)
    lungs = right_lung | left_lung
    density = np.where(lungs, np.float32(0.22), density) + 0.1 * ribs * body
    density += 0.04 * _smooth_noise(rng, (height, width), (24, 24)) * lungs  # vessel markings
    # Two box filters approximate a Gaussian at a cost independent of its width.
    size = max(3, s // 80)
    density = ndimage.uniform_filter(ndimage.uniform_filter(density, size), size)
    return np.clip(density, 0, 1), left_lung, right_lung


def _random_point(rng: np.random.Generator, region: np.ndarray, rows: slice = slice(None)) -> np.ndarray:
    """A random (y, x) pixel of the boolean `region`, restricted to `rows`."""
    ys, xs = np.nonzero(region[rows])
    i = rng.integers(len(ys))
    return np.array([ys[i] + (rows.start or 0), xs[i]], dtype=float)


# %% Ultrasound nerve segmentation (Kaggle 2016): 8-bit TIFFs, masks, run-length encoded CSV

NERVE_SHAPE = (420, 580)  # (height, width) of every image and mask
NERVE_SUBJECTS, NERVE_FRAMES, NERVE_TEST_FRAMES = 5, 10, 6


def _nerve_subject(rng: np.random.Generator) -> dict:
    """One subject's anatomy: the tissue echo map (fixed across their video) and where their nerve lies."""
    height, width = NERVE_SHAPE
    yy, xx = _grid(height, width)
    tissue = 0.5 + 0.1 * _smooth_noise(rng, NERVE_SHAPE, (5, 7))
    # Fascia: bright wavy bands roughly parallel to the skin, as a linear probe sees them.
    for _ in range(rng.integers(4, 7)):
        depth = rng.uniform(0.05, 0.95) * height
        wave = rng.uniform(5, 25) * np.sin(2 * np.pi * xx / rng.uniform(300, 900) + rng.uniform(0, 2 * np.pi))
        tissue = tissue + rng.uniform(0.3, 0.7) * np.exp(-(((yy - depth - wave) / rng.uniform(3, 8)) ** 2))
    # Muscle fibres: fine texture stretched along the probe's lateral axis.
    fibres = ndimage.gaussian_filter(rng.standard_normal(NERVE_SHAPE, dtype=np.float32), sigma=(1.5, 10))
    tissue += 0.12 * fibres / fibres.std()
    tissue *= np.exp(-0.7 * yy / height)  # attenuation: echoes from deeper tissue come back weaker
    return {
        "tissue": np.clip(tissue, 0.05, None),
        "center": np.array([rng.uniform(0.3, 0.7) * height, rng.uniform(0.25, 0.75) * width]),
        "radii": np.array([rng.uniform(20, 30), rng.uniform(35, 55)]),
        "angle": rng.uniform(-0.3, 0.3),
    }


def _nerve_frame(rng: np.random.Generator, subject: dict, with_nerve: bool) -> tuple[np.ndarray, np.ndarray]:
    """One video frame of `subject`: (8-bit image, boolean nerve mask, empty when `with_nerve` is False).

    The nerve is a dark (hypoechoic) oval with a bright rim (epineurium), jittering around the subject's
    position as the probe moves. Its contrast survives downsampling to 64-96 px, so a small U-Net can learn it.
    """
    yy, xx = _grid(*NERVE_SHAPE)
    echo = subject["tissue"] * rng.uniform(0.9, 1.1)  # gain changes from frame to frame
    mask = np.zeros(NERVE_SHAPE, dtype=bool)
    if with_nerve:
        center = subject["center"] + rng.normal(0, 6, 2)
        r2 = _ellipse_r2(yy, xx, center, subject["radii"] * rng.uniform(0.92, 1.08), subject["angle"])
        mask = r2 <= 1
        contrast = np.where(mask, np.float32(0.35), np.where(r2 <= 1.5, np.float32(1.8), np.float32(1)))
        echo = echo * ndimage.uniform_filter(contrast, 5)
    # Speckle: the magnitude of a correlated complex Gaussian field is Rayleigh distributed, the classic model
    # of fully developed ultrasound speckle; the grain is longer laterally than axially, as in a real probe.
    real, imag = (
        ndimage.gaussian_filter(rng.standard_normal(NERVE_SHAPE, dtype=np.float32), sigma=(0.8, 1.6)) for _ in "ri"
    )
    speckle = np.hypot(real, imag)
    pixels = np.clip(echo * speckle / speckle.mean() * 190, 0, 255).astype(np.uint8)
    return pixels, mask


def _save_tiff(path: Path, pixels: np.ndarray) -> None:
    """An 8-bit grayscale ('L') uncompressed TIFF, as in the Kaggle download."""
    Image.fromarray(pixels.astype(np.uint8)).save(path, format="TIFF", compression="raw")


def write_nerve(out_dir: Path, rng: np.random.Generator) -> None:
    """Ultrasound Nerve Segmentation: `train/<subject>_<img>.tif` + `_mask.tif`, `test/<img>.tif`, two CSVs.

    About half of the frames show the nerve. As in the real data, a few subjects also have a pair of
    near-identical frames that both show the nerve but only one of which is labelled: label noise the
    pipeline must live with (it caps the achievable Dice).
    """
    out_dir = Path(out_dir)
    (out_dir / "train").mkdir(parents=True)
    (out_dir / "test").mkdir()
    contradicting = set(rng.choice(np.arange(1, NERVE_SUBJECTS + 1), size=rng.integers(2, 4), replace=False))
    rows = []
    for subject_id in range(1, NERVE_SUBJECTS + 1):
        subject = _nerve_subject(rng)
        with_nerve = rng.permutation(NERVE_FRAMES) < rng.integers(4, 7)
        frames = [_nerve_frame(rng, subject, bool(show)) for show in with_nerve]
        if subject_id in contradicting:
            # Frame `copy` becomes a near-duplicate of labelled frame `source`, with an empty mask.
            source, copy = rng.choice(np.flatnonzero(with_nerve)), rng.choice(np.flatnonzero(~with_nerve))
            jitter = rng.integers(-2, 3, NERVE_SHAPE)
            frames[copy] = (np.clip(frames[source][0] + jitter, 0, 255).astype(np.uint8), frames[copy][1])
        for img_id, (pixels, mask) in enumerate(frames, start=1):
            _save_tiff(out_dir / "train" / f"{subject_id}_{img_id}.tif", pixels)
            _save_tiff(out_dir / "train" / f"{subject_id}_{img_id}_mask.tif", mask * np.uint8(255))
            rows.append({"subject": subject_id, "img": img_id, "pixels": rle_encode(mask)})
    pd.DataFrame(rows, columns=["subject", "img", "pixels"]).to_csv(out_dir / "train_masks.csv", index=False)

    # Test frames come from subjects unseen in training, and carry no subject id in their names.
    test_subjects = [_nerve_subject(rng) for _ in range(2)]
    for img_id in range(1, NERVE_TEST_FRAMES + 1):
        pixels, _ = _nerve_frame(rng, test_subjects[img_id % 2], bool(rng.random() < 0.5))
        _save_tiff(out_dir / "test" / f"{img_id}.tif", pixels)
    submission = pd.DataFrame({"img": range(1, NERVE_TEST_FRAMES + 1), "pixels": ""})
    submission.to_csv(out_dir / "sample_submission.csv", index=False)


# %% RSNA Pneumonia Detection Challenge (Kaggle 2018): JPEG-compressed DICOMs, boxes in CSV

RSNA_SIZE = 1024
RSNA_CLASSES = {"Lung Opacity": 12, "No Lung Opacity / Not Normal": 12, "Normal": 12}  # train patients per class
RSNA_TEST_PATIENTS = 6
RSNA_UID_ROOT = "1.2.276.0.7230010.3"  # DCMTK's UID root, which the real files carry


def _opacity_box(rng: np.random.Generator, lung: np.ndarray) -> np.ndarray:
    """A box (x, y, width, height) whose inscribed ellipse lies inside `lung`: where the opacity is drawn.

    Sizes follow the real labels (about 150-350 px in the 1024-px image, taller than wide).
    """
    angles = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    width, height = rng.uniform(150, 250), rng.uniform(180, 350)
    lung_ys, lung_xs = np.nonzero(lung)
    while True:
        for i in rng.integers(len(lung_ys), size=20):  # candidate centres
            cy, cx = lung_ys[i], lung_xs[i]
            ys = np.round(cy + height / 2 * np.sin(angles)).astype(int).clip(0, RSNA_SIZE - 1)
            xs = np.round(cx + width / 2 * np.cos(angles)).astype(int).clip(0, RSNA_SIZE - 1)
            if lung[ys, xs].all():
                return np.round([cx - width / 2, cy - height / 2, width, height])
        width, height = 0.9 * width, 0.9 * height  # a small lung: try a smaller opacity


def _rsna_image(rng: np.random.Generator, label: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """A 1024x1024 8-bit chest radiograph of class `label` and its opacity boxes (x, y, width, height).

    'Lung Opacity': one or two bright hazy consolidations, each filling its box. 'No Lung Opacity / Not
    Normal': no box, but an enlarged heart or a small nodule, so "abnormal" does not mean "has a box".
    """
    enlarged_heart = label == "No Lung Opacity / Not Normal" and rng.random() < 0.5
    density, left_lung, right_lung = _radiograph_phantom(rng, RSNA_SIZE, RSNA_SIZE, 1.3 if enlarged_heart else 1.0)
    boxes = []
    if label == "Lung Opacity":
        lungs = [right_lung, left_lung] if rng.random() < 0.5 else [[right_lung, left_lung][rng.integers(2)]]
        for lung in lungs:  # at most one box per lung, so that boxes never overlap
            x, y, w, h = box = _opacity_box(rng, lung)
            _add_blob(rng, density, (y + h / 2, x + w / 2), (h / 2, w / 2), rng.uniform(0.25, 0.35), 0.3)
            boxes.append(box)
    elif label == "No Lung Opacity / Not Normal" and not enlarged_heart:
        nodule = _random_point(rng, right_lung | left_lung)
        _add_blob(rng, density, nodule, np.full(2, rng.uniform(12, 20)), 0.3)
    density = density * rng.uniform(0.9, 1.1) + rng.normal(0, 0.012, density.shape).astype(np.float32)
    return np.clip(density * 255, 0, 255).astype(np.uint8), boxes


def _dicom_uid(kind: int, series: int, instance: int) -> str:
    """A UID shaped like the real files' (`<root>.1.<kind>.8323329.<n>.<time>.<n>`); kind 2 study, 3 series, 4 SOP."""
    return f"{RSNA_UID_ROOT}.1.{kind}.8323329.{series}.1517874{series % 1000:03d}.{instance}"


def _write_jpeg_dicom(path: Path, pixels: np.ndarray, tags: dict) -> None:
    """Save an 8-bit image as a JPEG Baseline compressed Secondary Capture DICOM, as the RSNA files are.

    pydicom cannot encode JPEG, so Pillow encodes the frame and pydicom encapsulates it (undefined
    length, VR OB). `tags` gives the patient- and image-specific attributes, including the three UIDs.
    """
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = tags["SOPInstanceUID"]
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta.ImplementationClassUID = f"{RSNA_UID_ROOT}.0.3.6.0"
    ds.file_meta.ImplementationVersionName = "OFFIS_DCMTK_360"

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.StudyDate = "19010101"  # the challenge anonymised every date to this
    ds.AccessionNumber = ""
    ds.Modality = "CR"
    ds.ConversionType = "WSD"  # workstation: the images were converted, not acquired, as DICOM
    ds.ReferringPhysicianName = ""
    ds.PatientBirthDate = ""
    ds.BodyPartExamined = "CHEST"
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    for keyword, value in tags.items():
        if keyword != "PatientAge":
            setattr(ds, keyword, value)
    # The real files store the age as '51', which is not a valid Age String ('051Y'): write it as they do,
    # with validation off for this one element, instead of a warning per file.
    ds[0x00101010] = DataElement(0x00101010, "AS", tags["PatientAge"], validation_mode=0)
    ds.SeriesDescription = f"view: {tags['ViewPosition']}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [0.139, 0.139]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)


def _write_rsna_patients(rng: np.random.Generator, folder: Path, labels: list[str]) -> list[tuple[str, str, list]]:
    """Write one DICOM per entry of `labels` (a class name each) into `folder`; return (patientId, class, boxes)."""
    folder.mkdir(parents=True)
    # Distinct study numbers guarantee distinct UIDs across patients.
    study_numbers = rng.choice(np.arange(1000, 40000), size=len(labels), replace=False)
    patients = []
    for label, number in zip(labels, study_numbers):
        patient_id = str(uuid.UUID(bytes=rng.bytes(16), version=4))  # real ids are random UUIDs too
        pixels, boxes = _rsna_image(rng, label)
        instance = int(rng.integers(100000, 999999))
        view = str(rng.choice(["PA", "AP"]))
        tags = {
            "PatientID": patient_id,
            "PatientName": patient_id,
            "PatientSex": str(rng.choice(["M", "F"])),
            "PatientAge": str(rng.integers(18, 86)),
            "ViewPosition": view,
            "StudyTime": f"{rng.integers(24):02d}{rng.integers(60):02d}{rng.integers(60):02d}.{rng.integers(100):02d}",
            "StudyInstanceUID": _dicom_uid(2, number, instance + 2),
            "SeriesInstanceUID": _dicom_uid(3, number, instance + 1),
            "SOPInstanceUID": _dicom_uid(4, number, instance),
        }
        _write_jpeg_dicom(folder / f"{patient_id}.dcm", pixels, tags)
        patients.append((patient_id, label, boxes))
    return patients


def write_rsna(out_dir: Path, rng: np.random.Generator) -> None:
    """RSNA Pneumonia Detection: `stage_2_train_images/`, `stage_2_test_images/` and the three CSVs.

    Labels: one row per box for positives (Target 1), one row with an empty box for negatives (Target 0);
    `stage_2_detailed_class_info.csv` repeats the class on every label row of the patient, as the real file.
    """
    out_dir = Path(out_dir)
    labels = list(rng.permutation([label for label, count in RSNA_CLASSES.items() for _ in range(count)]))
    train = _write_rsna_patients(rng, out_dir / "stage_2_train_images", labels)
    test_labels = list(rng.choice(list(RSNA_CLASSES), size=RSNA_TEST_PATIENTS))
    test = _write_rsna_patients(rng, out_dir / "stage_2_test_images", test_labels)

    rows = []
    for patient_id, _, boxes in train:
        for x, y, w, h in boxes or [[np.nan] * 4]:
            rows.append({"patientId": patient_id, "x": x, "y": y, "width": w, "height": h, "Target": int(bool(boxes))})
    label_rows = pd.DataFrame(rows, columns=["patientId", "x", "y", "width", "height", "Target"])
    label_rows.to_csv(out_dir / "stage_2_train_labels.csv", index=False)
    classes = {patient_id: label for patient_id, label, _ in train}
    class_info = pd.DataFrame({"patientId": label_rows["patientId"], "class": label_rows["patientId"].map(classes)})
    class_info.to_csv(out_dir / "stage_2_detailed_class_info.csv", index=False)
    submission = pd.DataFrame({"patientId": [p for p, _, _ in test], "PredictionString": "0.5 0 0 100 100"})
    submission.to_csv(out_dir / "stage_2_sample_submission.csv", index=False)


# %% Montgomery County chest X-ray set (NLM): 12-bit PNGs, clinical readings, left and right lung masks

MONTGOMERY_IMAGES = 12
MONTGOMERY_PORTRAIT = (489, 402)  # (height, width): the real 4892x4020 scaled down by 10; landscape swaps them


def _upper_third(lung: np.ndarray) -> slice:
    """The rows of the top third of a lung mask: where tuberculosis usually settles (upper lobes, apices)."""
    rows = np.flatnonzero(lung.any(axis=1))
    return slice(rows[0], rows[0] + (rows[-1] - rows[0]) // 3 + 1)


def _montgomery_case(rng: np.random.Generator, height: int, width: int, tb: bool):
    """One radiograph: (12-bit uint16 image, patient's left lung mask, right lung mask, finding text).

    Tuberculosis cases get patchy infiltrates in the upper lobes, sometimes with a cavity, its usual look.
    The lung masks stay the lung fields, lesions included, as in the manual masks of the real set.
    """
    density, left_lung, right_lung = _radiograph_phantom(rng, height, width)
    finding = "normal"
    if tb:
        sides = [("right", right_lung), ("left", left_lung)]
        sides = sides if rng.random() < 0.4 else [sides[rng.integers(2)]]
        cavity = rng.random() < 0.4
        s = min(height, width)
        for _, lung in sides:
            for _ in range(rng.integers(1, 4)):
                center = _random_point(rng, lung, _upper_third(lung))
                _add_blob(rng, density, center, s * rng.uniform(0.04, 0.08, 2), rng.uniform(0.15, 0.25), 0.4)
        if cavity:
            center = _random_point(rng, sides[0][1], _upper_third(sides[0][1]))
            _add_blob(rng, density, center, np.full(2, 0.035 * s), 0.25)  # thick wall ...
            _add_blob(rng, density, center, np.full(2, 0.02 * s), -0.35)  # ... around air
        where = "bilateral upper lobe infiltrates" if len(sides) == 2 else f"{sides[0][0]} upper lobe infiltrate"
        finding = f"{where}{' with cavitation' if cavity else ''}, consistent with tuberculosis"
    counts = 4095 * (0.04 + 0.86 * density) + rng.normal(0, 25, density.shape)
    return np.clip(counts, 0, 4095).astype(np.uint16), left_lung, right_lung, finding


def write_montgomery(out_dir: Path, rng: np.random.Generator) -> None:
    """Montgomery County set: `CXR_png/`, `ClinicalReadings/`, `ManualMask/leftMask/` and `ManualMask/rightMask/`.

    Images are 16-bit PNGs holding 12-bit values, portrait and landscape mixed; `_0` is normal, `_1`
    tuberculosis. `leftMask` is the patient's left lung, on the image's right side.
    """
    out_dir = Path(out_dir)
    for folder in ["CXR_png", "ClinicalReadings", "ManualMask/leftMask", "ManualMask/rightMask"]:
        (out_dir / folder).mkdir(parents=True)
    numbers = np.sort(rng.choice(np.arange(1, 105), size=MONTGOMERY_IMAGES, replace=False))  # ids have gaps
    tb = rng.permutation(MONTGOMERY_IMAGES) < MONTGOMERY_IMAGES // 2
    landscape = rng.permutation(MONTGOMERY_IMAGES) < MONTGOMERY_IMAGES // 3
    for number, has_tb, wide in zip(numbers, tb, landscape):
        stem = f"MCUCXR_{number:04d}_{int(has_tb)}"
        height, width = MONTGOMERY_PORTRAIT[::-1] if wide else MONTGOMERY_PORTRAIT
        pixels, left_lung, right_lung, finding = _montgomery_case(rng, height, width, bool(has_tb))
        Image.fromarray(pixels).save(out_dir / "CXR_png" / f"{stem}.png")  # uint16 -> mode "I;16"
        Image.fromarray(left_lung * np.uint8(255)).save(out_dir / "ManualMask" / "leftMask" / f"{stem}.png")
        Image.fromarray(right_lung * np.uint8(255)).save(out_dir / "ManualMask" / "rightMask" / f"{stem}.png")
        reading = f"Patient's Sex: {rng.choice(['M', 'F'])}\nPatient's Age: {rng.integers(18, 80):03d}Y\n{finding}\n"
        (out_dir / "ClinicalReadings" / f"{stem}.txt").write_text(reading)


# %% Shared CT helpers (COVID-19-20 and pleural effusion)
# Both CT datasets start from one chest phantom in Hounsfield units. Its array axes follow DICOM's patient axes
# (LPS): x (column) runs to the patient's left, y (row) to the back, z (slice) up to the head, so an axial DICOM
# slice is `volume[:, :, k].T` and the NIfTI (RAS) affine of the array has axis codes ('L', 'P', 'S').

# Typical CT numbers (HU) of the tissues in the phantom.
AIR_HU = -1000
FAT_HU = -100
SOFT_TISSUE_HU = 40
LUNG_HU = -850
BONE_HU = 400
GROUND_GLASS_HU = -300  # COVID-19 ground-glass opacity: partly filled air spaces, between lung and soft tissue
EFFUSION_HU = 15  # pleural fluid: transudates are about 0-20 HU
NOISE_HU = 20  # standard deviation of the scanner noise, well below the lesion and fluid contrasts (>500 HU)

COVID_CASES = {"Train": 8, "Validation": 3}
COVID_MATRIX = 96  # the real scans are 512 x 512 at ~0.7 mm: same field of view at ~3.6 mm, 30x fewer voxels
PLEURAL_CASES = 10
PLEURAL_MATRIX = 160  # NSCLC-Radiomics is 512 x 512 at ~1 mm; 160 x 160 at ~2.4 mm keeps the files small
PLEURAL_SECOND_REVIEWER = 3  # PleThora has a second reviewer's mask for only part of the cases
DICOM_RESCALE_INTERCEPT = -1024  # stored unsigned: HU = raw - 1024, as most scanners write CT


def _grid_mm(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[np.ndarray, ...]:
    """Voxel centres in mm as broadcastable (x, y, z) arrays: x, y from the in-plane centre, z from the lowest slice."""
    x, y, z = (np.arange(n, dtype=np.float32) * step for n, step in zip(shape, spacing))
    return (x - x[-1] / 2)[:, None, None], (y - y[-1] / 2)[None, :, None], z[None, None, :]


def _ct_phantom(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A noiseless chest CT (float32 HU, LPS axes as in the module docstring) and its lung mask.

    Sizes are drawn in mm, so the anatomy stays the same whatever the voxel spacing: an elliptical body
    (adult chest about 28 x 20 cm) with a fat rim, a spine at the back and two lungs that narrow toward the apex
    and stop at the diaphragm, above the soft tissue of the liver in the lowest slices.
    """
    x, y, z = _grid_mm(shape, spacing)
    height = z / z.max()  # 0 at the lowest slice, 1 at the top
    half_width, half_depth = rng.uniform(130, 150), rng.uniform(95, 110)
    body = (x / half_width) ** 2 + (y / half_depth) ** 2  # <= 1 inside the body, the same on every slice
    hu = np.select([body <= 0.93**2, body <= 1], [SOFT_TISSUE_HU, FAT_HU], AIR_HU).astype(np.float32)
    spine = x**2 + (y - 0.72 * half_depth) ** 2 <= (0.15 * half_depth) ** 2  # y > 0 is posterior in LPS
    hu[spine] = BONE_HU
    hu = np.repeat(hu, shape[2], axis=2)

    # Lungs placed relative to the body so that they always stay inside it, on either side of the mediastinum.
    taper = np.sqrt(np.clip((1.2 - height) / 0.7, 0, 1))  # full cross-section at the base, ~half at the apex
    lungs = np.zeros(shape, dtype=bool)
    for side in (-1, 1):  # patient's right (x < 0), then left
        centre_x = side * half_width * rng.uniform(0.48, 0.52)
        centre_y = half_depth * rng.uniform(0.03, 0.07)
        semi_x, semi_y = half_width * rng.uniform(0.34, 0.37), half_depth * rng.uniform(0.65, 0.7)
        lungs |= ((x - centre_x) / semi_x) ** 2 + ((y - centre_y) / semi_y) ** 2 <= taper**2
    lungs &= height >= rng.uniform(0.08, 0.16)  # the diaphragm
    hu[lungs] = LUNG_HU
    return hu, lungs


def _add_lesions(
    hu: np.ndarray, lungs: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator
) -> np.ndarray:
    """Paint 1-4 ground-glass blobs into `hu`, clipped to the lungs as in COVID-19 pneumonia; returns their mask."""
    x, y, z = _grid_mm(hu.shape, spacing)
    lesions = np.zeros(hu.shape, dtype=bool)
    lung_voxels = np.flatnonzero(lungs)
    for _ in range(rng.integers(1, 5)):
        # Centred on a lung voxel, so that every lesion has at least that voxel and seg is never empty.
        i, j, k = np.unravel_index(rng.choice(lung_voxels), hu.shape)
        radius, half_height = rng.uniform(8, 20), rng.uniform(6, 14)  # mm
        blob = ((x - x[i, 0, 0]) ** 2 + (y - y[0, j, 0]) ** 2) / radius**2 + (z - z[0, 0, k]) ** 2 / half_height**2 <= 1
        blob &= lungs & ~lesions  # inside the lungs only; overlapping blobs keep the first one's HU
        hu[blob] = GROUND_GLASS_HU + rng.uniform(-40, 40)
        lesions |= blob
    return lesions


def _add_effusion(
    hu: np.ndarray, lungs: np.ndarray, spacing: tuple[float, float, float], rng: np.random.Generator
) -> np.ndarray:
    """Replace the dependent base of one or both lungs with fluid in `hu`; returns the effusion mask.

    In a supine patient the fluid settles at the back (largest y, i.e. largest DICOM row) of the lowest slices,
    deepest at the base and thinning upward: a posterior crescent, so the mask is far from symmetric under a y flip.
    """
    x, y, z = _grid_mm(hu.shape, spacing)
    height = z / z.max()
    effusion = np.zeros(hu.shape, dtype=bool)
    for side in [(-1,), (1,), (-1, 1)][rng.integers(3)]:  # right, left or both lungs
        lung = lungs & (np.sign(x) == side)
        back = np.broadcast_to(y, hu.shape)[lung].max()  # the most posterior point of this lung, in mm
        top, depth = rng.uniform(0.35, 0.6), rng.uniform(30, 60)  # fluid height (fraction of z), depth (mm)
        surface = back - depth * np.clip((top - height) / top, 0, None)  # y of the fluid surface on each slice
        effusion |= lung & (y > surface)
    hu[effusion] = EFFUSION_HU
    return effusion


def _add_noise(hu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scanner noise, rounded to int16 HU and clipped to the 12-bit range that CT scanners store."""
    noisy = hu + NOISE_HU * rng.standard_normal(hu.shape, dtype=np.float32)
    return np.clip(np.rint(noisy), -1024, 3071).astype(np.int16)


def _scanner_corner(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator
) -> tuple[float, float, float]:
    """DICOM position (LPS, mm) of the first voxel's centre: the field of view centred near the patient's axis,
    at a table height that differs per scan, so that origins differ between cases as in real data."""
    x0, y0 = (-(n - 1) / 2 * step + rng.uniform(-15, 15) for n, step in zip(shape[:2], spacing[:2]))
    return round(x0, 3), round(y0, 3), round(rng.uniform(-450, -100), 1)


def _ras_affine(spacing: tuple[float, float, float], corner: tuple[float, float, float]) -> np.ndarray:
    """The NIfTI affine (RAS mm) of an array with LPS axes (x=column, y=row, z=slice upward) whose first voxel is
    at DICOM position `corner`: DICOM's x and y point the other way from NIfTI's, hence the signs."""
    (sx, sy, sz), (x0, y0, z0) = spacing, corner
    return np.array([[-sx, 0, 0, -x0], [0, -sy, 0, -y0], [0, 0, sz, z0], [0, 0, 0, 1]], dtype=np.float64)


def _flip(array: np.ndarray, affine: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """`array` flipped along `axes` and the affine that keeps every voxel at the same world position."""
    ornt = np.array([[axis, -1 if axis in axes else 1] for axis in range(array.ndim)])
    flipped_affine = affine @ nib.orientations.inv_ornt_aff(ornt, array.shape)
    return nib.orientations.apply_orientation(array, ornt), flipped_affine


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Save with both sform and qform set (code 1, scanner) and mm units, as scanner converters write them."""
    img = nib.Nifti1Image(array, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.set_data_dtype(array.dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


# %% COVID-19-20 (Grand Challenge 2020): NIfTI CT volumes and lesion masks


def write_covid(out: Path, rng: np.random.Generator) -> None:
    """COVID-19-20: `Train/volume-covid19-A-XXXX_ct.nii.gz` + `_seg.nii.gz` pairs and unlabelled `Validation/` CTs.

    CT int16 HU with ground-glass lesions in the lungs (validation cases too), seg uint8 0/1 on the same grid.
    Spacing, slice count, origin and orientation differ per case, as in the challenge data, where some volumes
    were converted with a flipped axis (dcm2niix's LAS, or feet-to-head slices), so a pipeline must reorient.
    """
    n_cases = sum(COVID_CASES.values())
    ids = rng.choice(np.arange(1, 1000), size=n_cases, replace=False)  # 4-digit ids with gaps, like A-0003, A-0011
    splits = rng.permutation(np.repeat(list(COVID_CASES), list(COVID_CASES.values())))
    for index, (case_id, split) in enumerate(sorted(zip(ids, splits))):
        shape = (COVID_MATRIX, COVID_MATRIX, int(rng.integers(24, 33)))
        pixel = round(rng.uniform(3.3, 3.9), 3)
        spacing = (pixel, pixel, float(rng.choice([4.0, 5.0, 5.0, 6.0])))
        hu, lungs = _ct_phantom(shape, spacing, rng)
        seg = _add_lesions(hu, lungs, spacing, rng).astype(np.uint8)
        ct = _add_noise(hu, rng)
        affine = _ras_affine(spacing, _scanner_corner(shape, spacing, rng))
        flip_axes = [(), (1,), (), (2,)][index % 4]  # LPS, LAS (rows flipped), LPS, LPI (slices flipped)
        stem = out / split / f"volume-covid19-A-{case_id:04d}"
        ct_flipped, flipped_affine = _flip(ct, affine, flip_axes)
        _save_nifti(stem.with_name(stem.name + "_ct.nii.gz"), ct_flipped, flipped_affine)
        if split == "Train":
            _save_nifti(stem.with_name(stem.name + "_seg.nii.gz"), _flip(seg, affine, flip_axes)[0], flipped_affine)


# %% Pleural effusion: NSCLC-Radiomics DICOM series (TCIA) and PleThora NIfTI masks


def _write_ct_series(
    folder: Path,
    patient: str,
    ct: np.ndarray,
    spacing: tuple[float, float, float],
    corner: tuple[float, float, float],
    rng: np.random.Generator,
) -> None:
    """Write `ct` (int16 HU, LPS axes) as one axial DICOM series, in TCIA's folder layout under `folder`.

    TCIA names folders `<study date>-<description>-<last 5 digits of the study UID>/<series number>.000000-
    <description>-<last 5 digits of the series UID>/` and files `1-<instance number>.dcm`. Instances are numbered
    from the head down, as the scanner acquired them, so file order is decreasing z: a reader must sort the slices
    by ImagePositionPatient, never by file name.
    """
    token = rng.bytes(16).hex()  # seeds every UID of the series: same rng, same UIDs
    study_uid, series_uid, frame_uid = (
        generate_uid(entropy_srcs=[token, part]) for part in ("study", "series", "frame")
    )
    study_date = datetime.date(2004, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 6 * 365)))
    series_number = int(rng.integers(0, 4))
    series_dir = (
        folder / f"{study_date:%m-%d-%Y}-StudyID-NA-{study_uid[-5:]}" / f"{series_number}.000000-NA-{series_uid[-5:]}"
    )
    series_dir.mkdir(parents=True)
    common = _ct_series_tags(patient, ct.shape, spacing, (study_uid, series_uid, frame_uid), study_date, series_number)
    (x0, y0, z0), sz = corner, spacing[2]
    for number, k in enumerate(range(ct.shape[2] - 1, -1, -1), start=1):  # instance 1 is the top slice
        ds = Dataset()
        ds.update(common)
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[token, "image", str(k)])
        ds.InstanceNumber = number
        ds.ImagePositionPatient = [x0, y0, round(z0 + k * sz, 3)]
        ds.SliceLocation = ds.ImagePositionPatient[2]
        ds.PixelData = (ct[:, :, k].T.astype(np.int32) - DICOM_RESCALE_INTERCEPT).astype("<u2").tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(series_dir / f"1-{number:03d}.dcm", enforce_file_format=True)


def _ct_series_tags(patient: str, shape: tuple[int, int, int], spacing: tuple[float, float, float], uids: tuple,
                    study_date: datetime.date, series_number: int) -> dict:  # fmt: skip
    """The tags every slice of a synthetic CT series shares, as TCIA's NSCLC-Radiomics series carry them."""
    (sx, sy, sz), (study_uid, series_uid, frame_uid) = spacing, uids
    return {
        "SOPClassUID": CTImageStorage,
        "StudyInstanceUID": study_uid,
        "SeriesInstanceUID": series_uid,
        "FrameOfReferenceUID": frame_uid,
        "Modality": "CT",
        "Manufacturer": "SYNTHETIC (sample_data.py)",  # nobody should take these images for a patient's
        "PatientID": patient,
        "PatientName": patient,
        "PatientPosition": "HFS",  # head first supine: what makes IOP [1,0,0,0,1,0] and posterior = larger row
        "BodyPartExamined": "CHEST",
        "StudyDate": f"{study_date:%Y%m%d}",
        "StudyTime": "120000",
        "StudyID": "",
        "SeriesNumber": series_number,
        "ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"],
        "KVP": 120,
        "SliceThickness": sz,
        "PixelSpacing": [sy, sx],  # DICOM order: row spacing (between rows, along y), then column spacing
        "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
        "Rows": shape[1],
        "Columns": shape[0],
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "BitsAllocated": 16,
        "BitsStored": 16,
        "HighBit": 15,
        "PixelRepresentation": 0,
        "RescaleIntercept": DICOM_RESCALE_INTERCEPT,
        "RescaleSlope": 1,
        "RescaleType": "HU",
    }


def _dilate_in_plane(mask: np.ndarray) -> np.ndarray:
    """One-voxel dilation within each slice (4-neighbourhood): a second reviewer's slightly wider outline."""
    cross = ndimage.generate_binary_structure(2, 1)[:, :, None]  # in-plane neighbours only, none across slices
    return ndimage.binary_dilation(mask, structure=cross)


def write_pleural(out: Path, rng: np.random.Generator) -> None:
    """Pleural effusion: NSCLC-Radiomics CT series `NSCLC-Radiomics/LUNG1-xxx/<study>/<series>/1-NNN.dcm` and
    PleThora masks `Effusions/LUNG1-xxx/LUNG1-xxx_effusion_first_reviewer.nii.gz` (`_second_reviewer` for some).

    The CT is raw uint16 with rescale intercept -1024. PleThora stores its masks as float in RPI orientation while
    the series is RAI (ITK's "from" codes; nibabel's "to" codes: LAS mask, LPS series): relative to the image array
    the mask's rows run the other way, and its affine says so. Both affines map a mask voxel and its fluid voxel to
    the same world point, so only a pipeline that reorients the mask through the affines finds the fluid.
    """
    second_reviewed = set(rng.choice(np.arange(1, PLEURAL_CASES + 1), size=PLEURAL_SECOND_REVIEWER, replace=False))
    for case in range(1, PLEURAL_CASES + 1):
        patient = f"LUNG1-{case:03d}"
        shape = (PLEURAL_MATRIX, PLEURAL_MATRIX, int(rng.integers(24, 33)))
        pixel = round(rng.uniform(2.3, 2.5), 3)
        spacing = (pixel, pixel, 3.0)
        hu, lungs = _ct_phantom(shape, spacing, rng)
        effusion = _add_effusion(hu, lungs, spacing, rng)
        corner = _scanner_corner(shape, spacing, rng)
        _write_ct_series(out / "NSCLC-Radiomics" / patient, patient, _add_noise(hu, rng), spacing, corner, rng)

        # The series' own NIfTI affine (LPS) flipped along y gives the mask's RPI/LAS storage.
        masks = {"first": effusion}
        if case in second_reviewed:
            # The second reviewer outlines the same fluid one voxel wider or narrower.
            masks["second"] = _dilate_in_plane(effusion) if rng.random() < 0.5 else ~_dilate_in_plane(~effusion)
        for reviewer, mask in masks.items():
            stored, stored_affine = _flip(mask.astype(np.float32), _ras_affine(spacing, corner), axes=(1,))
            _save_nifti(
                out / "Effusions" / patient / f"{patient}_effusion_{reviewer}_reviewer.nii.gz", stored, stored_affine
            )


# %% Writing, and choosing between the real data and the sample

# Folder name under data/ (as the download unzips) -> the function that writes its stand-in.
WRITERS: dict[str, Callable[[Path, np.random.Generator], None]] = {
    "COVID-19-20_v2": write_covid,
    "ultrasound-nerve-segmentation": write_nerve,
    "rsna-pneumonia-detection-challenge": write_rsna,
    "MontgomerySet": write_montgomery,
    "pleural_effusion": write_pleural,
}


def write_dataset(name: str, root: Path = SAMPLE_DIR, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the stand-in of dataset `name` to `root/name` and return that folder.

    The files go to a hidden temporary folder first and are renamed into place at the end, so an
    interrupted run never leaves a half-written dataset that a pipeline would later take as complete.
    """
    if name not in WRITERS:
        raise ValueError(f"Unknown dataset {name!r}: expected one of {', '.join(WRITERS)}")
    root = Path(root)
    target = root / name
    if target.exists() and not overwrite:
        return target
    partial = root / f".{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    # One independent stream per dataset: regenerating one dataset never changes another.
    rng = np.random.default_rng([seed, list(WRITERS).index(name)])
    WRITERS[name](partial, rng)
    if target.exists():
        shutil.rmtree(target)
    os.replace(partial, target)
    return target


def write_all(root: Path = SAMPLE_DIR, seed: int = 0, overwrite: bool = False) -> dict[str, Path]:
    """Write the stand-ins of all five datasets under `root`."""
    return {name: write_dataset(name, root, seed, overwrite) for name in WRITERS}


class FoundDataset(NamedTuple):
    """Where a script reads its dataset from, and whether that is the synthetic stand-in."""

    root: Path
    synthetic: bool


def find_dataset(name: str, data_dir: Path = DATA_DIR, say: bool = True) -> FoundDataset:
    """The real dataset `data_dir/name` when it is there, else its synthetic stand-in (written if missing).

    Prints which one it is, so that nobody mistakes a score on synthetic data for a real result (`say=False`: a
    second look, by a Predict cell, after the Data cell said it).
    """
    if not Path(data_dir).is_dir():  # the repository's data/ is always there: another folder asked for must be too
        raise DatasetError(
            f"{data_dir} (data_dir) is not a folder: give the folder that holds {name}/, or leave "
            "data_dir as it is for the repository's data/ (the synthetic sample when empty)"
        )
    real = Path(data_dir) / name
    if real.is_dir() and any(real.iterdir()):
        if say:
            print(f"Using the real dataset in {real}")
        return FoundDataset(real, synthetic=False)
    sample = write_dataset(name, Path(data_dir) / "sample")
    missing = "is empty" if real.is_dir() else "not found"
    if say:
        print(f"{real} {missing}: using the SYNTHETIC sample in {sample} (README.md says where the real data goes)")
    return FoundDataset(sample, synthetic=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=SAMPLE_DIR, help="where to write (default: data/sample)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="write datasets again even if present")
    args = parser.parse_args()
    for name, path in write_all(args.root, args.seed, args.overwrite).items():
        print(f"{name:38s} {path}")
