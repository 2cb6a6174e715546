"""The 2D stand-ins (ultrasound nerve TIFFs, RSNA pneumonia DICOMs, Montgomery PNGs), opened with the real readers.

Each dataset is written once per session by the `sample_root` fixture (conftest.py); only the determinism test
and the JPEG round trip write their own files.
"""

import re
import uuid

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage
from scipy import ndimage

import sample_data
from data_cleaning import rle_decode

NERVE = "ultrasound-nerve-segmentation"
RSNA = "rsna-pneumonia-detection-challenge"
MONTGOMERY = "MontgomerySet"
NERVE_SHAPE = (420, 580)  # (height, width)
RSNA_CLASS_COUNTS = {"Lung Opacity": 12, "No Lung Opacity / Not Normal": 12, "Normal": 12}
MONTGOMERY_NAME = re.compile(r"MCUCXR_(\d{4})_([01])\.png")


def _pixels(path):
    return np.asarray(Image.open(path))


# %% Ultrasound nerve segmentation


@pytest.fixture(scope="module")
def nerve_dir(sample_root):
    return sample_root / NERVE


@pytest.fixture(scope="module")
def nerve_frames(nerve_dir):
    """{(subject, img): (image, mask)} for every training frame, as uint8 arrays."""
    return {
        (subject, img): tuple(_pixels(nerve_dir / f"train/{subject}_{img}{suffix}.tif") for suffix in ("", "_mask"))
        for subject in range(1, 6)
        for img in range(1, 11)
    }


def test_nerve_layout_is_kaggle_train_pairs_test_images_and_two_csvs(nerve_dir):
    train = {f"{s}_{i}{suffix}.tif" for s in range(1, 6) for i in range(1, 11) for suffix in ("", "_mask")}
    assert {p.name for p in (nerve_dir / "train").iterdir()} == train
    assert {p.name for p in (nerve_dir / "test").iterdir()} == {f"{i}.tif" for i in range(1, 7)}
    assert {p.name for p in nerve_dir.iterdir()} == {"train", "test", "train_masks.csv", "sample_submission.csv"}


def test_nerve_tiffs_are_uncompressed_8bit_grayscale_580_by_420(nerve_dir):
    paths = sorted(nerve_dir.glob("*/*.tif"))
    assert len(paths) == 106
    for path in paths:
        with Image.open(path) as img:
            assert (img.format, img.mode, img.size, img.info["compression"]) == ("TIFF", "L", (580, 420), "raw")


def test_nerve_masks_are_0_255_and_train_masks_csv_decodes_to_them(nerve_dir, nerve_frames):
    csv = pd.read_csv(nerve_dir / "train_masks.csv")
    assert list(csv.columns) == ["subject", "img", "pixels"]
    assert sorted(zip(csv["subject"], csv["img"])) == sorted(nerve_frames)
    for subject, img, rle in csv.itertuples(index=False):
        mask = nerve_frames[subject, img][1]
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(rle_decode(rle, NERVE_SHAPE), mask // 255)
        assert pd.isna(rle) == (not mask.any())  # an empty mask is an empty cell, not "0 0"


def test_nerve_sample_submission_lists_each_test_image_with_empty_pixels(nerve_dir):
    submission = pd.read_csv(nerve_dir / "sample_submission.csv")
    assert list(submission.columns) == ["img", "pixels"]
    assert sorted(submission["img"]) == list(range(1, 7))
    assert submission["pixels"].isna().all()


def test_nerve_masks_are_empty_in_about_half_the_frames_of_every_subject(nerve_frames):
    empty = {key: not mask.any() for key, (_, mask) in nerve_frames.items()}
    assert 0.3 <= np.mean(list(empty.values())) <= 0.7
    for subject in range(1, 6):
        assert 0 < sum(empty[subject, img] for img in range(1, 11)) < 10


def test_nerve_is_a_dark_oval_with_a_bright_rim_still_visible_at_96_px(nerve_frames):
    for image, mask in nerve_frames.values():
        if not mask.any():
            continue
        nerve = mask > 0
        rim = ndimage.binary_dilation(nerve, iterations=6) & ~nerve
        around = ndimage.binary_dilation(nerve, iterations=30) & ~ndimage.binary_dilation(nerve, iterations=10)
        assert image[nerve].mean() < 0.5 * image[rim].mean()
        assert image[rim].mean() > image[around].mean()
        # What a model trained at 96x70 px sees: the nerve stays clearly darker than the tissue around it.
        small = np.asarray(Image.fromarray(image).resize((96, 70), Image.BILINEAR), dtype=float)
        small_nerve = np.asarray(Image.fromarray(mask).resize((96, 70), Image.NEAREST)) > 0
        small_around = ndimage.binary_dilation(small_nerve, iterations=4) & ~small_nerve
        assert small[small_nerve].mean() < 0.7 * small[small_around].mean()


def test_nerve_has_near_duplicate_frames_with_contradicting_masks(nerve_frames):
    contradicting, distances = 0, []
    for subject in range(1, 6):
        for a in range(1, 11):
            for b in range(a + 1, 11):
                (image_a, mask_a), (image_b, mask_b) = nerve_frames[subject, a], nerve_frames[subject, b]
                distance = np.abs(image_a.astype(float) - image_b).mean()
                distances.append(distance)
                if distance < 3:  # the same picture up to a grey level or two
                    assert mask_a.any() != mask_b.any()  # ... labelled once with a nerve, once without
                    contradicting += 1
    assert 2 <= contradicting <= 5
    assert np.median(distances) > 20  # other frames differ in speckle and nerve position: not duplicates


# %% RSNA pneumonia detection


@pytest.fixture(scope="module")
def rsna_dir(sample_root):
    return sample_root / RSNA


@pytest.fixture(scope="module")
def rsna_labels(rsna_dir):
    return pd.read_csv(rsna_dir / "stage_2_train_labels.csv")


@pytest.fixture(scope="module")
def rsna_dicoms(rsna_dir):
    """{path: dataset} for every train and test DICOM."""
    return {path: pydicom.dcmread(path) for path in sorted(rsna_dir.glob("stage_2_*_images/*.dcm"))}


def test_rsna_layout_has_uuid_named_dicoms_and_three_csvs(rsna_dir):
    csvs = {"stage_2_train_labels.csv", "stage_2_detailed_class_info.csv", "stage_2_sample_submission.csv"}
    assert {p.name for p in rsna_dir.iterdir()} == csvs | {"stage_2_train_images", "stage_2_test_images"}
    train, test = (sorted(rsna_dir.glob(f"stage_2_{split}_images/*")) for split in ("train", "test"))
    assert (len(train), len(test)) == (36, 6)
    for path in train + test:
        assert path.suffix == ".dcm" and str(uuid.UUID(path.stem)) == path.stem


def test_rsna_labels_have_one_row_per_box_and_an_empty_box_for_negatives(rsna_dir, rsna_labels):
    assert list(rsna_labels.columns) == ["patientId", "x", "y", "width", "height", "Target"]
    assert set(rsna_labels["patientId"]) == {p.stem for p in (rsna_dir / "stage_2_train_images").iterdir()}
    box = rsna_labels[["x", "y", "width", "height"]]
    negative = rsna_labels["Target"] == 0
    assert set(rsna_labels["Target"]) == {0, 1}
    assert box[negative].isna().all().all() and box[~negative].notna().all().all()
    rows_per_patient = rsna_labels.groupby("patientId").size()
    assert rows_per_patient[rsna_labels.loc[negative, "patientId"]].eq(1).all()  # negatives: exactly one row
    assert rows_per_patient.max() == 2  # some patients have two boxes, which is still one image
    assert rsna_labels.loc[~negative, "patientId"].nunique() == 12


def test_rsna_detailed_class_info_repeats_each_label_row(rsna_dir, rsna_labels):
    class_info = pd.read_csv(rsna_dir / "stage_2_detailed_class_info.csv")
    assert list(class_info.columns) == ["patientId", "class"]
    assert class_info["patientId"].tolist() == rsna_labels["patientId"].tolist()
    assert (class_info["class"] == "Lung Opacity").tolist() == (rsna_labels["Target"] == 1).tolist()
    assert class_info.drop_duplicates()["class"].value_counts().to_dict() == RSNA_CLASS_COUNTS


def test_rsna_sample_submission_lists_the_test_patients(rsna_dir):
    submission = pd.read_csv(rsna_dir / "stage_2_sample_submission.csv")
    assert list(submission.columns) == ["patientId", "PredictionString"]
    assert set(submission["patientId"]) == {p.stem for p in (rsna_dir / "stage_2_test_images").iterdir()}
    assert len(submission) == 6 and (submission["PredictionString"] == "0.5 0 0 100 100").all()


def test_rsna_dicoms_are_jpeg_compressed_secondary_capture_chest_radiographs(rsna_dicoms):
    expected = {
        "SOPClassUID": SecondaryCaptureImageStorage,
        "Modality": "CR",
        "ConversionType": "WSD",
        "BodyPartExamined": "CHEST",
        "StudyDate": "19010101",
        "PhotometricInterpretation": "MONOCHROME2",
        "SamplesPerPixel": 1,
        "Rows": 1024,
        "Columns": 1024,
        "BitsAllocated": 8,
        "BitsStored": 8,
        "HighBit": 7,
        "PixelRepresentation": 0,
        "PixelSpacing": [0.139, 0.139],
        "LossyImageCompression": "01",
        "LossyImageCompressionMethod": "ISO_10918_1",
    }
    uids = []
    for path, ds in rsna_dicoms.items():
        assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert {key: ds[key].value for key in expected} == expected
        assert ds.PatientID == str(ds.PatientName) == path.stem
        assert ds.PatientSex in {"M", "F"} and ds.PatientAge.isdigit()  # '51', as the real files store it
        assert ds.ViewPosition in {"AP", "PA"} and ds.SeriesDescription == f"view: {ds.ViewPosition}"
        assert re.fullmatch(r"\d{6}\.\d{2}", ds.StudyTime)
        assert ds["PixelData"].VR == "OB" and ds["PixelData"].is_undefined_length  # encapsulated
        pixels = ds.pixel_array
        assert pixels.shape == (1024, 1024) and pixels.dtype == np.uint8
        uids += [ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID]
    assert len(set(uids)) == len(uids) == 3 * 42
    assert all(pydicom.uid.UID(uid).is_valid for uid in uids)


def test_rsna_boxes_are_plausible_and_cover_an_opacity(rsna_dir, rsna_labels):
    class_info = pd.read_csv(rsna_dir / "stage_2_detailed_class_info.csv").drop_duplicates()

    def image(patient_id):
        return pydicom.dcmread(rsna_dir / f"stage_2_train_images/{patient_id}.dcm").pixel_array.astype(float)

    # The same place in the average normal radiograph: dark lung, which the opacity must brighten.
    normal = np.mean([image(p) for p in class_info.loc[class_info["class"] == "Normal", "patientId"]], axis=0)
    for patient_id, boxes in rsna_labels[rsna_labels["Target"] == 1].groupby("patientId"):
        pixels = image(patient_id)
        for x, y, w, h in boxes[["x", "y", "width", "height"]].astype(int).itertuples(index=False):
            assert x >= 0 and y >= 0 and x + w <= 1024 and y + h <= 1024
            assert 100 <= w <= 350 and 150 <= h <= 350
            assert pixels[y : y + h, x : x + w].mean() > normal[y : y + h, x : x + w].mean() + 10
        if len(boxes) == 2:  # one per lung: on both sides of the midline
            centres = boxes["x"] + boxes["width"] / 2
            assert centres.min() < 512 < centres.max()


def test_rsna_jpeg_dicom_decodes_to_the_written_image_within_jpeg_error(tmp_path):
    rng = np.random.default_rng(0)
    density, _, _ = sample_data._radiograph_phantom(rng, 1024, 1024)
    source = (density * 255).astype(np.uint8)
    uid = "1.2.276.0.7230010.3.1.4.1"
    tags = {"PatientID": "x", "PatientAge": "51", "ViewPosition": "PA"}
    tags |= {"StudyInstanceUID": uid + ".2", "SeriesInstanceUID": uid + ".3", "SOPInstanceUID": uid + ".4"}
    sample_data._write_jpeg_dicom(tmp_path / "x.dcm", source, tags)
    decoded = pydicom.dcmread(tmp_path / "x.dcm").pixel_array.astype(float)
    error = np.abs(decoded - source)
    assert error.mean() < 1.5 and error.max() <= 20


# %% Montgomery County chest X-rays


@pytest.fixture(scope="module")
def montgomery_dir(sample_root):
    return sample_root / MONTGOMERY


@pytest.fixture(scope="module")
def montgomery_cases(montgomery_dir):
    """{file name: (image, patient's left lung mask, right lung mask)} as read from the PNGs."""
    folders = ("CXR_png", "ManualMask/leftMask", "ManualMask/rightMask")
    return {
        path.name: tuple(_pixels(montgomery_dir / folder / path.name) for folder in folders)
        for path in sorted((montgomery_dir / "CXR_png").iterdir())
    }


def test_montgomery_layout_pairs_images_masks_and_readings_by_name(montgomery_dir, montgomery_cases):
    names = set(montgomery_cases)
    assert len(names) == 12 and all(MONTGOMERY_NAME.fullmatch(name) for name in names)
    for folder in ("ManualMask/leftMask", "ManualMask/rightMask"):
        assert {p.name for p in (montgomery_dir / folder).iterdir()} == names
    assert {p.name for p in (montgomery_dir / "ClinicalReadings").iterdir()} == {n[:-4] + ".txt" for n in names}
    tb = [MONTGOMERY_NAME.fullmatch(name).group(2) == "1" for name in names]
    assert 3 <= sum(tb) <= 9
    assert len({MONTGOMERY_NAME.fullmatch(name).group(1) for name in names}) == 12  # one image per id


def test_montgomery_images_are_16bit_png_with_12bit_values_in_both_orientations(montgomery_dir):
    sizes = set()
    for path in (montgomery_dir / "CXR_png").iterdir():
        header = path.read_bytes()[:26]
        assert header[:8] == b"\x89PNG\r\n\x1a\n" and (header[24], header[25]) == (16, 0)  # 16-bit grayscale
        with Image.open(path) as img:
            assert img.mode == "I;16"
            pixels = np.asarray(img)
            sizes.add(img.size)
        assert pixels.dtype == np.uint16 and 255 < pixels.max() <= 4095
    assert sizes == {(402, 489), (489, 402)}  # (width, height): portrait and landscape


def test_montgomery_masks_are_binary_lungs_with_the_patients_left_on_the_image_right(montgomery_cases):
    for image, left, right in montgomery_cases.values():
        for mask in (left, right):
            assert mask.shape == image.shape and mask.dtype == np.uint8
            assert set(np.unique(mask)) == {0, 255}
        assert not (left & right).any()
        width = image.shape[1]
        assert np.nonzero(right)[1].mean() < width / 2 < np.nonzero(left)[1].mean()


def test_montgomery_lungs_are_darker_than_their_surroundings_at_128_px(montgomery_cases):
    for image, left, right in montgomery_cases.values():
        # As the pipeline sees them: resized to 128x128, masks by nearest neighbour.
        small = np.asarray(Image.fromarray(image).resize((128, 128), Image.BILINEAR), dtype=float)
        lungs = np.asarray(Image.fromarray(left | right).resize((128, 128), Image.NEAREST)) > 0
        ring = ndimage.binary_dilation(lungs, iterations=4) & ~lungs
        assert small[lungs].mean() < 0.7 * small[ring].mean()


def test_montgomery_clinical_readings_give_sex_age_and_the_finding(montgomery_dir):
    for path in (montgomery_dir / "ClinicalReadings").iterdir():
        sex, age, finding = path.read_text().splitlines()
        assert re.fullmatch(r"Patient's Sex: [MF]", sex) and re.fullmatch(r"Patient's Age: \d{3}Y", age)
        assert (finding == "normal") == path.stem.endswith("_0")
        assert path.stem.endswith("_0") or "tuberculosis" in finding


# %% All three
