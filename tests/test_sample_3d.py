"""The 3D stand-ins (COVID-19-20 NIfTI, NSCLC-Radiomics DICOM + PleThora masks), opened with the real readers.

Each dataset is written once per session by the `sample_root` fixture (conftest.py); only the determinism test
writes its own copies.
"""

import re

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_rescale
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

COVID = "COVID-19-20_v2"
PLEURAL = "pleural_effusion"
CT_NAME = re.compile(r"volume-covid19-A-(\d{4})_ct\.nii\.gz")
STUDY_DIR = re.compile(r"\d{2}-\d{2}-\d{4}-StudyID-NA-(\d{5})")
SERIES_DIR = re.compile(r"(\d+)\.000000-NA-(\d{5})")


@pytest.fixture(scope="module")
def covid_dir(sample_root):
    return sample_root / COVID


@pytest.fixture(scope="module")
def pleural_dir(sample_root):
    return sample_root / PLEURAL


@pytest.fixture(scope="module")
def covid_cases(covid_dir):
    """{(split, case id): (ct image, seg image or None)} for every case."""
    cases = {}
    for ct_path in sorted(covid_dir.glob("*/*_ct.nii.gz")):
        seg_path = ct_path.with_name(ct_path.name.replace("_ct.", "_seg."))
        case_id = CT_NAME.fullmatch(ct_path.name).group(1)
        cases[ct_path.parent.name, case_id] = (nib.load(ct_path), nib.load(seg_path) if seg_path.exists() else None)
    return cases


def _shell(mask):
    """The voxels next to `mask` (6-neighbourhood) but not in it; the volumes' borders are air, so roll is safe."""
    grown = mask.copy()
    for axis in range(3):
        for shift in (-1, 1):
            grown |= np.roll(mask, shift, axis=axis)
    return grown & ~mask


def _read_series(series_dir):
    """(HU volume with axes x=column, y=row, z, its RAS affine, datasets in file-name order), built the way a
    pipeline must: slices sorted by ImagePositionPatient along the slice normal, rescaled to HU."""
    datasets = [pydicom.dcmread(f) for f in sorted(series_dir.glob("*.dcm"))]
    row_dir, col_dir = np.array(datasets[0].ImageOrientationPatient, dtype=float).reshape(2, 3)
    normal = np.cross(row_dir, col_dir)
    ordered = sorted(datasets, key=lambda ds: float(np.dot(normal, ds.ImagePositionPatient)))
    volume = np.stack([apply_rescale(ds.pixel_array, ds).T for ds in ordered], axis=-1)
    first, last = (np.array(ds.ImagePositionPatient, dtype=float) for ds in (ordered[0], ordered[-1]))
    row_spacing, col_spacing = (float(s) for s in ordered[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # along a row = from one column to the next
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = (last - first) / (len(ordered) - 1)
    lps[:3, 3] = first
    return volume, np.diag([-1, -1, 1, 1]) @ lps, datasets


@pytest.fixture(scope="module")
def pleural_cases(pleural_dir):
    """{patient: (HU volume, series RAS affine, datasets in file order, {reviewer: mask image})}."""
    cases = {}
    for patient_dir in sorted((pleural_dir / "NSCLC-Radiomics").iterdir()):
        (series_dir,) = patient_dir.glob("*/*")
        mask_paths = {
            r: pleural_dir / "Effusions" / patient_dir.name / f"{patient_dir.name}_effusion_{r}_reviewer.nii.gz"
            for r in ("first", "second")
        }
        masks = {reviewer: nib.load(path) for reviewer, path in mask_paths.items() if path.exists()}
        cases[patient_dir.name] = (*_read_series(series_dir), masks)
    return cases


# %% COVID-19-20


def test_covid_layout_has_labelled_train_and_unlabelled_validation_cases(covid_dir, covid_cases):
    assert sorted(p.name for p in covid_dir.iterdir()) == ["Train", "Validation"]
    train = [case_id for split, case_id in covid_cases if split == "Train"]
    validation = [case_id for split, case_id in covid_cases if split == "Validation"]
    assert len(train) == 8 and len(validation) == 3 and not set(train) & set(validation)
    assert all(covid_cases["Train", case_id][1] is not None for case_id in train)
    assert not list((covid_dir / "Validation").glob("*_seg.nii.gz"))
    assert len(list(covid_dir.rglob("*.nii.gz"))) == 8 * 2 + 3  # nothing else
    numbers = sorted(int(case_id) for case_id in train + validation)
    assert max(np.diff(numbers)) > 1  # ids with gaps, like the real set


def test_covid_ct_headers_are_int16_hu_in_mm_with_geometry_differing_per_case(covid_cases):
    affines, orientations = [], set()
    for ct, _ in covid_cases.values():
        header = ct.header
        assert ct.get_data_dtype() == np.int16
        assert int(header["sform_code"]) == 1 and int(header["qform_code"]) == 1
        np.testing.assert_allclose(ct.get_qform(), ct.get_sform(), atol=1e-3)
        assert header.get_xyzt_units() == ("mm", "sec")
        assert ct.shape[:2] == (96, 96) and 24 <= ct.shape[2] <= 32
        sx, sy, sz = header.get_zooms()
        assert 3.3 <= sx == sy <= 3.9 and 4 <= sz <= 6
        hu = np.asanyarray(ct.dataobj)
        assert hu.dtype == np.int16 and -1024 <= hu.min() < -950 and 300 < hu.max() <= 3071
        affines.append(ct.affine)
        orientations.add(nib.aff2axcodes(ct.affine))
    assert len({tuple(np.round(affine, 2).ravel()) for affine in affines}) == len(affines)
    assert {("L", "P", "S"), ("L", "A", "S"), ("L", "P", "I")} <= orientations


def test_covid_seg_is_binary_uint8_on_the_ct_grid(covid_cases):
    for (split, _), (ct, seg) in covid_cases.items():
        if split == "Validation":
            continue
        assert seg.get_data_dtype() == np.uint8 and seg.shape == ct.shape
        np.testing.assert_array_equal(seg.affine, ct.affine)
        values = np.asanyarray(seg.dataobj)
        assert set(np.unique(values)) == {0, 1}


def test_covid_lesions_are_ground_glass_inside_the_lungs(covid_cases):
    for (_, case_id), (ct, seg) in covid_cases.items():
        hu = np.asanyarray(ct.dataobj)
        # -400..-200 HU is 5 noise sigmas (20 HU) away from lung (-850), fat (-100), soft tissue (40) and air.
        ground_glass = (hu > -400) & (hu < -200)
        if seg is None:
            assert ground_glass.sum() > 10, f"validation case {case_id} has no lesion"
            continue
        lesion = np.asanyarray(seg.dataobj).astype(bool)
        # The label is exactly the lesion, so a model can learn it: nothing lesion-like is left outside it...
        assert not (ground_glass & ~lesion).any()
        # ...and every labelled voxel is ground glass.
        assert -360 < hu[lesion].mean() < -240 and -450 < hu[lesion].min() and hu[lesion].max() < -150
        # Around the lesions is lung: they lie inside the lungs, not in soft tissue.
        assert -910 < np.median(hu[_shell(lesion)]) < -790
        assert (hu < -750).sum() > 0.1 * hu.size  # lungs fill a good part of the volume


def test_covid_flipped_cases_keep_the_anatomy_in_place(covid_cases):
    """The orientation differs per case but the patient does not: in RAS the spine is behind the body's centre."""
    for ct, _ in covid_cases.values():
        canonical = nib.as_closest_canonical(ct)
        hu = np.asanyarray(canonical.dataobj)
        spine_y = np.nonzero(hu > 250)[1].mean()
        body_y = np.nonzero(hu > -500)[1].mean()
        assert spine_y < body_y - 5  # RAS: a smaller y index is more posterior
        # Lungs stop at the diaphragm: the lowest slice (inferior) has less lung than the middle one.
        lung_area = (hu < -750).sum(axis=(0, 1)) - (hu < -950).sum(axis=(0, 1))
        assert lung_area[0] < lung_area[hu.shape[2] // 2]


# %% Pleural effusion


def test_pleural_layout_is_tcia_series_plus_plethora_masks(pleural_dir, pleural_cases):
    assert sorted(p.name for p in pleural_dir.iterdir()) == ["Effusions", "NSCLC-Radiomics"]
    patients = [f"LUNG1-{n:03d}" for n in range(1, 11)]
    assert list(pleural_cases) == patients
    assert sorted(p.name for p in (pleural_dir / "Effusions").iterdir()) == patients
    for patient, (_, _, datasets, masks) in pleural_cases.items():
        (study_dir,) = (pleural_dir / "NSCLC-Radiomics" / patient).iterdir()
        (series_dir,) = study_dir.iterdir()
        study_match, series_match = STUDY_DIR.fullmatch(study_dir.name), SERIES_DIR.fullmatch(series_dir.name)
        assert study_match and series_match
        assert study_match.group(1) == datasets[0].StudyInstanceUID[-5:]  # TCIA: last digits of the UIDs
        assert series_match.group(2) == datasets[0].SeriesInstanceUID[-5:]
        assert int(series_match.group(1)) == datasets[0].SeriesNumber
        names = sorted(p.name for p in series_dir.iterdir())
        assert names == [f"1-{n:03d}.dcm" for n in range(1, len(names) + 1)] and 24 <= len(names) <= 32
        assert "first" in masks
    n_second = sum("second" in masks for *_, masks in pleural_cases.values())
    assert 0 < n_second < 10


def test_pleural_dicom_tags_are_those_of_a_ct_image(pleural_cases):
    for patient, (_, _, datasets, _) in pleural_cases.items():
        for number, ds in enumerate(datasets, start=1):
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
            assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
            assert ds.Modality == "CT" and ds.PatientID == patient and str(ds.PatientName) == patient
            assert re.fullmatch(r"20\d{6}", ds.StudyDate) and ds.InstanceNumber == number
            assert list(ds.ImageOrientationPatient) == [1, 0, 0, 0, 1, 0]
            assert ds.Rows == ds.Columns == 160 and ds.SamplesPerPixel == 1
            assert ds.PhotometricInterpretation == "MONOCHROME2"
            assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 16, 15, 0)
            assert (ds.RescaleIntercept, ds.RescaleSlope) == (-1024, 1)
            assert ds.pixel_array.dtype == np.uint16
            assert 2.3 <= ds.PixelSpacing[0] == ds.PixelSpacing[1] <= 2.5 and ds.SliceThickness == 3
            assert len(ds.ImagePositionPatient) == 3
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "StudyDate"):
            assert len({ds.data_element(keyword).value for ds in datasets}) == 1, keyword
        assert len({ds.SOPInstanceUID for ds in datasets}) == len(datasets)
    all_series = {datasets[0].SeriesInstanceUID for _, _, datasets, _ in pleural_cases.values()}
    assert len(all_series) == 10


def test_pleural_slices_must_be_sorted_by_position_not_file_name(pleural_cases):
    for _, (_, _, datasets, _) in pleural_cases.items():
        z = np.array([float(ds.ImagePositionPatient[2]) for ds in datasets])
        assert (np.diff(z) < 0).all()  # file order runs head to feet
        np.testing.assert_allclose(np.diff(np.sort(z)), float(datasets[0].SliceThickness), atol=1e-3)


def test_pleural_hu_after_rescale_is_chest_ct(pleural_cases):
    for volume, *_ in pleural_cases.values():
        assert -1024 <= volume.min() < -950 and 300 < volume.max() <= 3071
        assert -1050 < np.median(volume[:5, :5]) < -950  # the corners are air
        assert (np.abs(volume + 850) < 100).sum() > 0.05 * volume.size  # lungs
        assert (np.abs(volume - 40) < 60).sum() > 0.1 * volume.size  # soft tissue


def test_pleural_masks_are_float_las_while_the_series_is_lps(pleural_cases):
    for volume, affine, _, masks in pleural_cases.values():
        assert nib.aff2axcodes(affine) == ("L", "P", "S")
        for mask in masks.values():
            assert mask.get_data_dtype() == np.float32 and mask.shape == volume.shape
            assert set(np.unique(mask.get_fdata())) == {0.0, 1.0}
            assert nib.aff2axcodes(mask.affine) == ("L", "A", "S")
            assert int(mask.header["sform_code"]) == 1 and int(mask.header["qform_code"]) == 1


def test_pleural_mask_lands_on_fluid_only_when_reoriented_through_the_affines(pleural_cases):
    for patient, (volume, affine, _, masks) in pleural_cases.items():
        mask = masks["first"]
        ornt = nib.orientations.ornt_transform(
            nib.orientations.io_orientation(mask.affine), nib.orientations.io_orientation(affine)
        )
        aligned = nib.orientations.apply_orientation(mask.get_fdata(), ornt).astype(bool)
        # After reorientation the mask's voxels sit at the same world points as the image's.
        reoriented_affine = mask.affine @ nib.orientations.inv_ornt_aff(ornt, mask.shape)
        np.testing.assert_allclose(reoriented_affine, affine, atol=1e-3)
        assert abs(volume[aligned].mean() - 15) < 30, patient
        assert (volume[aligned] > -300).mean() > 0.99  # no lung inside the effusion
        naive = mask.get_fdata().astype(bool)  # the array as stored, as if it shared the image's grid
        # Read naively, the mask marks the front of the chest: mostly chest wall (40 HU, hard to tell from fluid
        # by HU alone), but with lung in it and no overlap with the fluid.
        assert volume[naive].mean() < 15 - 65, patient
        assert (volume[naive] < -500).mean() > 0.05 and (naive & aligned).sum() < 0.1 * aligned.sum()
        # The fluid is dependent: at the back of the chest (larger rows) and in the lower half of the slices.
        rows, slices = np.nonzero(aligned)[1], np.nonzero(aligned)[2]
        assert rows.mean() > volume.shape[1] / 2 and slices.mean() < volume.shape[2] / 2


def test_pleural_monai_loading_and_orientation_put_the_mask_on_the_fluid(pleural_dir):
    """The route a MONAI pipeline takes: load the series folder and the mask, bring both to one orientation."""
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation

    load = Compose(
        [LoadImage(reader="PydicomReader", image_only=True), EnsureChannelFirst(), Orientation("RAS", labels=None)]
    )
    (series_dir,) = (pleural_dir / "NSCLC-Radiomics" / "LUNG1-001").glob("*/*")
    img = load(str(series_dir))
    mask = load(str(pleural_dir / "Effusions" / "LUNG1-001" / "LUNG1-001_effusion_first_reviewer.nii.gz"))
    assert img.shape == mask.shape
    np.testing.assert_allclose(img.affine, mask.affine, atol=1e-3)
    assert abs(float(img[mask > 0.5].mean()) - 15) < 30


def test_pleural_second_reviewer_differs_slightly_from_the_first(pleural_cases):
    for *_, masks in pleural_cases.values():
        if "second" not in masks:
            continue
        first, second = (masks[reviewer].get_fdata().astype(bool) for reviewer in ("first", "second"))
        np.testing.assert_array_equal(masks["second"].affine, masks["first"].affine)
        dice = 2 * (first & second).sum() / (first.sum() + second.sum())
        assert 0.6 < dice < 1


# %% Both
