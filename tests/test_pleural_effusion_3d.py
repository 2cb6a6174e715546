"""pleural_effusion_3d.py: DICOM series reading checked against MONAI's reader, PleThora masks landing on the fluid
(not its mirror image), bad inputs named, skipped and counted, the preprocessing and its inverse on hand-made
volumes, crops and augmentation, the loss and the validation Dice against MONAI, and the stages: all the cells run
with tiny settings (every output, the predictions in the series' geometry, TensorBoard, the summary), the Predict
cell on a user's CTs (a shuffled extension-less DICOM export and a RAS NIfTI, a damaged slice, a changed cfg, a
checkpoint of another script, the PREDICT= command line), fit resuming
and stopping on Ctrl-C or a non-finite loss, the same seed giving the same run, and the quick run as a subprocess,
which must reach validation Dice 0.5 (the notebook run is in test_notebooks.py).

The script is loaded as a module with the quick-run switch on; the sample is written once per session (conftest).
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from PIL import Image

from checkpoints import CheckpointError
from data_cleaning import DatasetError, Skipped

PLEURAL, PLEURAL_SCRIPT = "pleural_effusion", "pleural_effusion_3d"  # the dataset folder, the script


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pe(load_script):
    """The script as a module, loaded with QUICK=1 as CI runs it (the configuration cell reads it once)."""
    return load_script(PLEURAL_SCRIPT)


@pytest.fixture(scope="module")
def pleural_root(sample_root):
    return sample_root / PLEURAL


@pytest.fixture
def pleural_copy(pleural_root, tmp_path):
    """A private copy of the synthetic download, to damage."""
    return Path(shutil.copytree(pleural_root, tmp_path / PLEURAL))


def series_dir(root: Path, case: str) -> Path:
    (folder,) = (root / "NSCLC-Radiomics" / case).glob("*/*")
    return folder


def mask_path(root: Path, case: str) -> Path:
    return root / "Effusions" / case / f"{case}_effusion_first_reviewer.nii.gz"


# Settings for a run of a few seconds: 4 cases, 16x16x8 crops, a two-level UNet, two epochs.
TINY = dict(max_cases=4, roi_size=(16, 16, 8), samples_per_volume=2, channels=(4, 8), strides=(2,), num_res_units=1,
            max_epochs=2, val_interval=1, sw_batch_size=16)  # fmt: skip


def tiny_config(pe, tmp_path, data_dir, **changes):
    """The quick run (the module is loaded with QUICK=1) made tinier, with its outputs in tmp_path."""
    paths = dict(data_dir=data_dir, output_dir=tmp_path / "output", images_dir=tmp_path / "Images")
    return replace(pe.Config(), **(paths | TINY | changes))


# %% Reading: the series, the masks, and where they meet


def test_series_is_sorted_by_position_in_hu_and_agrees_with_monai(pe, pleural_root):
    from monai.data import MetaTensor
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation

    folder = series_dir(pleural_root, "LUNG1-001")
    hu, affine = pe.read_dicom_series(folder)
    files = sorted(folder.glob("*.dcm"))
    assert hu.shape == (160, 160, len(files)) and hu.dtype == np.float32
    assert nib.aff2axcodes(affine) == ("L", "P", "S")  # RAS affine of DICOM's LPS axes, slices going up
    # Files are numbered from the head down: the first file is the last (highest) slice, in HU.
    first = pydicom.dcmread(files[0])
    np.testing.assert_array_equal(hu[:, :, -1], first.pixel_array.T.astype(np.float32) - 1024)
    x, y, z = first.ImagePositionPatient
    np.testing.assert_allclose(affine @ [0, 0, len(files) - 1, 1], [-x, -y, z, 1], atol=1e-3)  # LPS -> RAS
    # An independent reader: MONAI's PydicomReader, both brought to RAS.
    load = Compose(
        [LoadImage(reader="PydicomReader", image_only=True), EnsureChannelFirst(), Orientation("RAS", labels=None)]
    )
    reference = load(str(folder))
    ours = Orientation("RAS", labels=None)(MetaTensor(torch.from_numpy(hu)[None], affine=torch.from_numpy(affine)))
    np.testing.assert_allclose(ours.affine.numpy(), reference.affine.numpy(), atol=1e-3)
    np.testing.assert_array_equal(ours.numpy(), reference.numpy())


def test_mask_lands_on_the_fluid_not_on_its_mirror_image(pe, pleural_root):
    skipped = Skipped("case")
    cases = pe.find_cases(pleural_root, "first", skipped)
    assert [c["case"] for c in cases] == [f"LUNG1-{n:03d}" for n in range(1, 11)] and not skipped.counts
    for case in cases:
        hu, affine, mask, used = pe.read_case(case)
        assert used == "header"  # the sample's headers describe their voxels: both placements agree
        assert mask.shape == hu.shape and mask.dtype == bool and mask.sum() > 100
        assert abs(hu[mask].mean() - 15) < 10, case["case"]  # the fluid is drawn at +15 HU, noise 20
        assert (hu[mask] > -300).mean() > 0.99  # no lung inside
        stored = np.asanyarray(nib.load(case["mask_path"]).dataobj) > 0.5  # as if it shared the image's grid
        assert hu[stored].mean() < -50 and (stored & mask).sum() < 0.1 * mask.sum(), case["case"]
        assert np.nonzero(mask)[1].mean() > hu.shape[1] / 2  # at the back: larger DICOM rows


def test_a_mask_stored_with_permuted_and_flipped_axes_is_brought_back(pe, pleural_root, tmp_path):
    case = pe.find_cases(pleural_root, "first", Skipped("case"))[0]
    hu, affine, mask, _ = pe.read_case(case)
    # Store the mask as (y, x, z) with z running down, with the affine that keeps every voxel in place.
    ornt = np.array([[1, 1], [0, 1], [2, -1]])
    stored = nib.orientations.apply_orientation(mask.astype(np.float32), ornt)
    stored_affine = affine @ nib.orientations.inv_ornt_aff(ornt, mask.shape)
    path = tmp_path / "permuted.nii.gz"
    nib.save(nib.Nifti1Image(stored, stored_affine), path)
    assert stored.shape == (mask.shape[1], mask.shape[0], mask.shape[2])
    placed, used, why = pe.read_mask(path, affine, hu)
    np.testing.assert_array_equal(placed, mask)
    # The sample is square: read in PleThora's order, the permuted voxels fit too, and land partly on the chest wall's
    # muscle; the header's placement, more of it fluid-like, wins, and the line says so.
    assert used == "header" and why.startswith("mask placed by its header, the one on fluid (voxels at -30 to 70 HU: ")


def copy_ct_headers_onto_masks(pe, root: Path, cases: list[str]) -> None:
    """PleThora's masks as a tool that copies the CT's header would write them: the voxels still in PleThora's RPI
    order, the affine the series' own (so a reader trusting the header mirrors them front to back)."""
    for case in cases:
        _, ct_affine = pe.read_dicom_series(series_dir(root, case))
        img = nib.load(mask_path(root, case))
        nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), ct_affine), mask_path(root, case))


def test_a_mask_with_the_cts_header_is_placed_by_plethoras_convention_and_trains_the_same(
    pe, pleural_root, pleural_copy, tmp_path, capsys
):
    cases = [f"LUNG1-{n:03d}" for n in range(1, 5)]
    copy_ct_headers_onto_masks(pe, pleural_copy, cases)
    right = {c["case"]: c for c in pe.find_cases(pleural_root, "first", Skipped("case"))}
    copied = {c["case"]: c for c in pe.find_cases(pleural_copy, "first", Skipped("case"))}
    capsys.readouterr()
    for case in cases[:2]:
        hu, _, truth, _ = pe.read_case(right[case])
        _, _, placed, used = pe.read_case(copied[case])
        line = capsys.readouterr().out.strip()
        assert used == "plethora" and np.array_equal(placed, truth), case
        assert re.fullmatch(rf"{case}: mask placed by PleThora's RPI convention \(rows reversed\), the one on fluid "
                            r"\(voxels at -30 to 70 HU: \d+% placed by its header, 9\d% placed by PleThora's RPI "
                            r"convention \(rows reversed\)\)", line), line  # fmt: skip
        _, _, mirrored, _ = pe.read_case(copied[case], "header")  # trusting the header: over the lung
        assert hu[mirrored].mean() < -100 and not (mirrored & truth).any()  # lung and fat, in front
        np.testing.assert_array_equal(pe.read_case(right[case], "plethora")[2], truth)  # the convention holds
    # The same labels on the network's grid, so the same training: cached tensors identical.
    a, b = (pe.load_data(tiny_config(pe, tmp_path / name, root.parent)) for name, root in
            (("a", pleural_root), ("b", pleural_copy)))  # fmt: skip
    for group in ("train", "val"):
        assert [i["case"] for i in getattr(a, group)] == [i["case"] for i in getattr(b, group)]
        for x, y in zip(getattr(a, group), getattr(b, group)):
            assert torch.equal(x["label"], y["label"]) and torch.equal(x["image"], y["image"])


# %% Bad inputs: each named, skipped and counted


def damage_missing_slice(root):
    files = sorted(series_dir(root, "LUNG1-002").glob("*.dcm"))
    files[len(files) // 2].unlink()  # a slice from the middle: a 6 mm gap where the others are 3 mm apart
    return "LUNG1-002", "missing slice", "6.00 mm between the slices"


def damage_mixed_series(root):
    intruder = sorted(series_dir(root, "LUNG1-004").glob("*.dcm"))[5]
    shutil.copy(intruder, series_dir(root, "LUNG1-003") / "1-999.dcm")
    return "LUNG1-003", "mixed series", "holds 2 SeriesInstanceUIDs"


def damage_mask_shape(root):
    img = nib.load(mask_path(root, "LUNG1-005"))
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj)[:, :, 1:], img.affine), mask_path(root, "LUNG1-005"))
    return "LUNG1-005", "mask shape mismatch", "once reoriented (LAS -> LPS)"


def damage_no_mask(root):
    mask_path(root, "LUNG1-006").unlink()
    return "LUNG1-006", "no mask", "LUNG1-006_effusion_first_reviewer.nii.gz not found"


def damage_mask_geometry(root):
    img = nib.load(mask_path(root, "LUNG1-007"))
    shifted = img.affine.copy()
    shifted[2, 3] += 9.0  # three slices higher
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), shifted), mask_path(root, "LUNG1-007"))
    return "LUNG1-007", "mask geometry mismatch", "9.0 mm off the series"


def damage_mask_over_air(root):
    img = nib.load(mask_path(root, "LUNG1-010"))
    over_air = np.zeros(img.shape, np.float32)
    over_air[:8, :8, :4] = 1.0  # a corner of the field of view, outside the body, and its mirror corner as well
    nib.save(nib.Nifti1Image(over_air, img.affine), mask_path(root, "LUNG1-010"))
    return "LUNG1-010", "mask not on fluid", "-30 to 70 HU: 0% placed by its header, 0% placed by PleThora's RPI"


def damage_no_ct_series(root):
    shutil.rmtree(root / "NSCLC-Radiomics" / "LUNG1-009")  # the mask is there, the CT is not
    return "LUNG1-009", "no CT series", "has no patient folder"


def damage_unreadable_dicom(root):
    (sorted(series_dir(root, "LUNG1-008").glob("*.dcm"))[3]).write_bytes(b"not a DICOM file")
    return "LUNG1-008", "unreadable DICOM", "1-004.dcm"


@pytest.mark.parametrize(
    "damage",
    [
        damage_missing_slice,
        damage_mixed_series,
        damage_mask_shape,
        damage_no_mask,
        damage_mask_geometry,
        damage_mask_over_air,
        damage_no_ct_series,
        damage_unreadable_dicom,
    ],
)
def test_each_bad_input_is_named_skipped_and_counted(pe, pleural_copy, capsys, damage):
    case, problem, detail = damage(pleural_copy)
    skipped = Skipped("case")
    # A header that places the mask 9 mm off is rejected when the header is trusted; "auto" would place the mask by
    # PleThora's convention, on the fluid, and say so.
    cfg = replace(pe.cfg, mask_orientation="header" if damage is damage_mask_geometry else "auto",
                  cache_dir=pleural_copy.parent / "cache")  # fmt: skip
    items = pe.load_cases(pe.find_cases(pleural_copy, "first", skipped), cfg, skipped)
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.startswith("Skipped")]
    assert line.startswith(f"Skipped case {case}: {problem}: ") and detail in line, line
    assert skipped.counts == {problem: 1}
    assert skipped.summary("sample") == f"sample: skipped 1 case (1 {problem})"
    assert sorted(i["case"] for i in items) == [f"LUNG1-{n:03d}" for n in range(1, 11) if f"LUNG1-{n:03d}" != case]
    if damage is damage_mask_geometry:  # by the data: the convention puts the voxels on the fluid, and one line says so
        (item,) = pe.load_cases([c for c in pe.find_cases(pleural_copy, "first", skipped) if c["case"] == case],
                                replace(cfg, mask_orientation="auto"), skipped)  # fmt: skip
        assert item["mask_orientation"] == "plethora" and "its header: LUNG1-007" in capsys.readouterr().out


def test_the_data_stage_counts_the_skipped_cases_lists_them_and_splits_the_others(pe, pleural_copy, tmp_path):
    damaged = [damage(pleural_copy)[0] for damage in (damage_missing_slice, damage_no_mask)]
    cfg = tiny_config(pe, tmp_path, pleural_copy.parent, max_cases=None)
    data = pe.load_data(cfg)
    assert data.root == pleural_copy and not data.synthetic  # data_dir holds the dataset: used as a real one
    assert data.skipped.counts == {"missing slice": 1, "no mask": 1}
    listed = pd.read_csv(cfg.output_dir / "skipped_cases.csv")
    assert list(listed.columns) == ["case", "problem", "detail"] and sorted(listed["case"]) == damaged
    names = {group: {item["case"] for item in getattr(data, group)} for group in ("train", "val", "test")}
    assert [len(names[group]) for group in ("train", "val", "test")] == [4, 2, 2]  # of 8: round(0.2 x 8) = 2
    assert set.union(*names.values()) == {f"LUNG1-{n:03d}" for n in range(1, 11)} - set(damaged)
    assert sum(map(len, names.values())) == 8  # no case on two sides
    assert str(data) == f"real dataset {pleural_copy}: 4 train, 2 validation, 2 test cases; 2 cases skipped"
    for item in data.train + data.val + data.test:  # cached on the network's grid, image and label alike
        assert item["image"].dtype == torch.float16 and item["label"].dtype == torch.uint8
        assert item["image"].shape == item["label"].shape and item["label"].any()


def test_the_disk_cache_reads_each_series_once_rebuilds_what_changed_and_gives_what_reading_gives(
    pe, pleural_copy, tmp_path, capsys
):
    """The Data stage reads every series once into data/cache/pleural_effusion_3d/; the next run reads none; a
    touched slice prepares its case again, alone, and another setting every case; the cases are exactly those read
    without the cache."""
    cfg = tiny_config(pe, tmp_path, pleural_copy.parent, max_cases=None)
    folder = pleural_copy.parent / "cache" / "pleural_effusion_3d"
    first = pe.load_data(cfg)
    assert f"Disk cache {folder}: 0 cases read back, 10 read and prepared" in capsys.readouterr().out
    second = pe.load_data(cfg)
    assert ": 10 cases read back, 0 read and prepared" in capsys.readouterr().out
    plain = pe.load_data(replace(cfg, cache=False))
    assert "Disk cache" not in capsys.readouterr().out
    for data in (second, plain):
        for side in ("train", "val", "test"):
            for item, reference in zip(getattr(data, side), getattr(first, side), strict=True):
                assert (item["case"], item["mask_orientation"]) == (reference["case"], reference["mask_orientation"])
                assert torch.equal(item["image"], reference["image"]) and torch.equal(item["label"], reference["label"])
                assert item["image"].dtype == torch.float16 and item["label"].dtype == torch.uint8
    touched = sorted(series_dir(pleural_copy, "LUNG1-003").glob("*.dcm"))[4]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    pe.load_data(cfg)
    assert ": 9 cases read back, 1 read and prepared" in capsys.readouterr().out
    pe.load_data(replace(cfg, crop_margin=2))  # another preparation: new entries, the old ones never read
    assert ": 0 cases read back, 10 read and prepared" in capsys.readouterr().out


def test_a_run_killed_while_it_builds_the_cache_leaves_nothing_wrong_for_the_next(pe, pleural_copy, tmp_path, capsys):
    """kill -9 of the Data stage (and of its workers) while it writes the disk cache: the next run reads back the
    entries that were complete, prepares the others, and its cases are exactly those read without the cache."""
    import signal

    folder = pleural_copy.parent / "cache" / "pleural_effusion_3d"
    repo = Path(__file__).resolve().parents[1]
    code = (
        "import os, sys, importlib.util\n"
        f"sys.path.insert(0, {str(repo)!r})\n"
        "os.environ['QUICK'] = '1'\n"
        f"spec = importlib.util.spec_from_file_location('{PLEURAL_SCRIPT}', {str(repo / (PLEURAL_SCRIPT + '.py'))!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m; spec.loader.exec_module(m)\n"
        "from dataclasses import replace\n"
        f"m.load_data(replace(m.cfg, data_dir=m.Path({str(pleural_copy.parent)!r}), max_cases=None,\n"
        f"                    output_dir=m.Path({str(tmp_path / 'killed')!r})))\n"
    )
    run = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(folder.rglob("*.arrays")) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(run.pid, signal.SIGKILL)  # the process and its forked workers, at once
    run.wait()
    complete = list(folder.rglob("*.arrays"))  # complete entries (a partial one is .<name>.arrays.partial)
    assert len(complete) < 10  # killed while building: some cases never reached the cache

    cfg = tiny_config(pe, tmp_path, pleural_copy.parent, max_cases=None)
    capsys.readouterr()
    data = pe.load_data(cfg)
    read_back = int(
        re.search(r"Disk cache .*: (\d+) cases read back, (\d+) read and prepared", capsys.readouterr().out)[1]
    )
    assert read_back <= len(complete)
    plain = pe.load_data(replace(cfg, cache=False))
    for side in ("train", "val", "test"):
        for item, reference in zip(getattr(data, side), getattr(plain, side), strict=True):
            assert item["case"] == reference["case"]
            assert torch.equal(item["image"], reference["image"]) and torch.equal(item["label"], reference["label"])


def test_nothing_usable_is_one_clear_error(pe, pleural_copy, tmp_path):
    for path in (pleural_copy / "Effusions").rglob("*.nii.gz"):
        path.unlink()
    no_masks = r"0 usable case\(s\) in .*pleural_effusion: need 3 at least \(training, validation, test\)"
    with pytest.raises(DatasetError, match=no_masks):
        pe.load_data(tiny_config(pe, tmp_path, pleural_copy.parent))
    shutil.rmtree(pleural_copy / "Effusions")
    with pytest.raises(DatasetError, match=r"Effusions not found: expected NSCLC-Radiomics/LUNG1-xxx"):
        pe.load_data(tiny_config(pe, tmp_path, pleural_copy.parent))


# %% Preprocessing and its inverse


def test_window_is_soft_tissue_and_not_inverted(pe):
    hu = np.array([-1000.0, -850, -160, -100, 0, 15, 40, 240, 1000], dtype=np.float32)
    np.testing.assert_allclose(
        pe.window_hu(hu, pe.Config().hu_window), [0, 0, 0, 0.15, 0.4, 0.4375, 0.5, 1, 1], atol=1e-6
    )  # air and lung 0, fat < fluid < muscle, bone 1


def test_halving_cropping_and_back_keep_the_geometry(pe):
    cfg = pe.Config(in_plane_factor=2, crop_margin=1, body_threshold_hu=-500)
    hu = np.full((41, 30, 6), -1000, np.float32)  # odd width: one column left over by the halving
    hu[10:30, 8:24, :] = 40  # the body
    prep = pe.preprocess(hu, cfg)
    assert prep["grid_shape"] == (20, 15, 6) and prep["crop"] == (4, 16, 3, 13, 0, 6)  # body: 5..14, 4..11 halved
    assert prep["image"].shape == (1, 12, 10, 6) and prep["image"].dtype == torch.float16
    assert prep["image"][0, 1:-1, 1:-1].min() == 0.5 and prep["image"][0, 0].max() == 0  # the margin is air

    mask = np.zeros(hu.shape, bool)
    mask[13:19, 10:16, 2:4] = True
    label = pe.downsample_mask(mask, prep, cfg)
    # Blocks x 12-13 and 18-19 hold half the fluid (a tie: background), 14-17 all of it; y 10-15 are whole blocks.
    assert label.dtype == torch.uint8 and set(label.unique().tolist()) == {0, 1} and label.sum() == 2 * 3 * 2
    share = mask[:40, :30].reshape(20, 2, 15, 2, 6).mean(axis=(1, 3))[4:16, 3:13]  # the image's block mean
    np.testing.assert_array_equal(label[0].numpy(), share > 0.5)

    # Back to the series' grid: a voxel of the network's grid is the centre of a 2x2 block.
    prob = torch.zeros(prep["image"].shape[1:])
    prob[3, 4, 2] = 1.0  # grid voxel (7, 7, 2) after the crop offset: block x 14-15, y 14-15
    full = pe.to_original_grid(prob, prep, hu.shape, cfg)
    assert full.shape == hu.shape and full.max() == pytest.approx(0.5625)  # (3/4)^2 on each of the four
    assert set(zip(*np.nonzero((full == full.max()).numpy())[:2])) == {(14, 14), (14, 15), (15, 14), (15, 15)}
    # A whole mask down and up again.
    prob = pe.downsample_mask(mask, prep, cfg)[0].float()
    back = pe.to_original_grid(prob, prep, hu.shape, cfg).numpy() > 0.5
    # The box's x edges cut blocks in half: those halves are lost (ties are background), nothing lands outside it.
    assert 2 * (back & mask).sum() / (back.sum() + mask.sum()) >= 0.8 and not (back & ~mask).any()


def test_a_sphere_halved_and_put_back_stays_in_place(pe):
    """An 8 mm sphere at 1 mm voxels, down to the network's grid and back: labels and predictions on the blocks'
    centres. Taking one voxel of each block (as before) puts them half a voxel off, which costs Dice."""
    cfg = pe.Config(in_plane_factor=2, crop_margin=0)
    hu = np.full((64, 64, 40), 40.0, np.float32)  # all body: no crop
    x, y, z = np.ogrid[:64, :64, :40]
    centre = (31.3, 32.6, 19.8)
    sphere = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= 8**2
    prep = pe.preprocess(hu, cfg)
    dice = lambda a, b: 2 * (a & b).sum() / (a.sum() + b.sum())  # noqa: E731
    back = lambda small: pe.to_original_grid(torch.as_tensor(small).float(), prep, hu.shape, cfg).numpy() > 0.5  # noqa: E731
    # The fluid's share of each block, as the image's block mean, back through to_original_grid: as good as a
    # calibrated probability can be; half a voxel off would cap it near 0.93.
    share = sphere.reshape(32, 2, 32, 2, 40).mean(axis=(1, 3))
    assert dice(back(share), sphere) >= 0.98
    # The training labels (share > 0.5) put back: centred on the sphere, as good as a binary 2x2 grid allows.
    label = back(pe.downsample_mask(sphere, prep, cfg)[0])
    assert dice(label, sphere) >= 0.93
    np.testing.assert_allclose(np.argwhere(label).mean(axis=0), np.argwhere(sphere).mean(axis=0), atol=0.1)
    nearest = back(sphere[1::2, 1::2])  # one voxel of each block: the old labels, half a voxel toward smaller x, y
    offset = np.argwhere(nearest).mean(axis=0) - np.argwhere(sphere).mean(axis=0)
    assert (
        dice(nearest, sphere) < min(0.925, dice(label, sphere)) and (offset[:2] < -0.4).all() and abs(offset[2]) < 0.1
    )


def test_split_is_by_case_seeded_six_two_two_and_the_test_cases_stay_put(pe):
    items = [{"case": f"LUNG1-{n:03d}"} for n in range(1, 11)]
    cfg = pe.Config()
    train, val, test = pe.split_by_case(items, cfg)
    names = lambda group: sorted(i["case"] for i in group)  # noqa: E731
    assert [len(train), len(val), len(test)] == [6, 2, 2]
    assert sorted(names(train) + names(val) + names(test)) == names(items)  # each case on one side only
    assert [names(side) for side in pe.split_by_case(items, cfg)] == [names(train), names(val), names(test)]
    # The test cases depend on split_seed and test_fraction only: a new training seed or val_fraction keeps them.
    for changed in (replace(cfg, seed=5), replace(cfg, val_fraction=0.4)):
        assert names(pe.split_by_case(items, changed)[2]) == names(test)
    assert any(names(pe.split_by_case(items, replace(cfg, split_seed=s))[2]) != names(test) for s in (1, 2))
    assert [len(side) for side in pe.split_by_case(items[:3], cfg)] == [1, 1, 1]
    assert [len(side) for side in pe.split_by_case(items, replace(cfg, test_fraction=0))] == [8, 2, 0]
    with pytest.raises(DatasetError, match="cannot be split"):
        pe.split_by_case(items[:2], cfg)


def test_too_few_cases_for_the_three_sides_is_one_clear_error(pe, sample_root, tmp_path):
    with pytest.raises(DatasetError, match=r"2 usable case\(s\) in .*pleural_effusion: need 3 at least"):
        pe.load_data(tiny_config(pe, tmp_path, sample_root, max_cases=2))


# %% Crops, augmentation, loss, validation Dice


def test_positive_crops_hold_fluid_and_augmentation_moves_image_and_label_together(pe):
    label = torch.zeros(1, 40, 40, 12, dtype=torch.uint8)
    label[0, 5:9, 30:36, 2:5] = 1
    image = torch.rand(1, 40, 40, 12).half() * 0.5
    image[label.bool()] = 0.75  # the fluid has a value nothing else has
    cfg = pe.Config(roi_size=(16, 16, 8), samples_per_volume=6, pos_neg_ratio=(1.0, 0.0), flip_prob=1.0,
                    flip_axes=(0, 1, 2))  # fmt: skip
    transforms = pe.build_transforms(replace(cfg, rot90_prob=1.0))  # seeded with cfg.seed
    crops = transforms({"image": image, "label": label})
    assert len(crops) == 6
    for crop in crops:
        assert crop["image"].shape == crop["label"].shape == (1, 16, 16, 8)
        assert crop["label"].sum() > 0  # pos=1, neg=0: every crop is centred on fluid
        assert torch.equal(crop["label"].bool(), crop["image"] == 0.75)  # moved together
    again = pe.build_transforms(replace(cfg, rot90_prob=1.0))({"image": image, "label": label})
    assert all(torch.equal(a["label"], b["label"]) for a, b in zip(crops, again))  # the same seed, the same crops
    with pytest.raises(ValueError, match="square in-plane roi_size"):
        pe.build_transforms(replace(cfg, roi_size=(16, 8, 8), rot90_prob=0.5))


def test_by_default_crops_are_flipped_left_right_only_and_never_turned(pe):
    # A crop as large as the volume is the volume: with every flip drawn, only x (left-right) is reversed.
    image = torch.arange(16 * 16 * 8, dtype=torch.float32).reshape(1, 16, 16, 8)
    label = torch.ones(1, 16, 16, 8, dtype=torch.uint8)
    cfg = pe.Config(roi_size=(16, 16, 8), samples_per_volume=4, pos_neg_ratio=(1.0, 0.0), flip_prob=1.0)
    assert cfg.flip_axes == (0,) and cfg.rot90_prob == 0.0
    for crop in pe.build_transforms(cfg)({"image": image, "label": label}):
        assert torch.equal(crop["image"], torch.flip(image, dims=[1]))  # dims: channel, x, y, z


def test_loss_is_monai_dice_and_weighted_bce_mixed_as_configured(pe):
    from monai.losses import DiceLoss

    torch.manual_seed(0)
    logits = torch.randn(3, 1, 8, 8, 4)
    target = (torch.rand(3, 1, 8, 8, 4) > 0.8).float()
    dice = DiceLoss(sigmoid=True, batch=True, smooth_nr=1e-5, smooth_dr=1e-5)(logits, target)
    p = torch.sigmoid(logits)
    bce = -(3 * target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()  # pos_weight 3, by hand
    assert pe.DiceBCELoss(0.0, 3.0)(logits, target).item() == pytest.approx(dice.item(), rel=1e-5)
    assert pe.DiceBCELoss(1.0, 3.0)(logits, target).item() == pytest.approx(bce.item(), rel=1e-5)
    assert pe.DiceBCELoss(0.3, 3.0)(logits, target).item() == pytest.approx((0.7 * dice + 0.3 * bce).item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"bce_weight must be in \[0, 1\]"):
        pe.DiceBCELoss(1.5)


class Threshold(torch.nn.Module):
    """A voxel-wise 'model': logit = 20 (x - 0.5), so the prediction is exactly `image > 0.5`."""

    def forward(self, x):
        return 20 * (x - 0.5)


def test_sliding_window_validation_dice_agrees_with_monai(pe):
    from monai.metrics import DiceMetric

    rng = np.random.default_rng(0)
    items, preds, truths = [], [], []
    for shape in [(30, 22, 11), (12, 10, 5)]:  # one larger than a window, one smaller (padded)
        truth = torch.from_numpy(rng.random(shape) > 0.7)
        noisy = truth ^ torch.from_numpy(rng.random(shape) > 0.9)  # 10% of the voxels wrong
        image = torch.where(noisy, 0.8, 0.2).half()[None]
        items.append({"image": image, "label": truth[None].to(torch.uint8)})
        preds.append(noisy)
        truths.append(truth)
    cfg = pe.Config(roi_size=(16, 16, 8), sw_batch_size=3, sw_overlap=0.75)
    for item, pred in zip(items, preds):  # gaussian blending of a voxel-wise model changes nothing
        assert torch.equal(pe.predict_logits(Threshold(), item["image"], cfg).cpu() > 0, pred)
    scores = pe.evaluate(Threshold(), items, pe.DiceBCELoss(), cfg)
    metric = DiceMetric(include_background=True, reduction="mean")
    for pred, truth in zip(preds, truths):
        metric(pred[None, None].float(), truth[None, None].float())
    assert scores["val_dice"] == pytest.approx(metric.aggregate().item(), rel=1e-6)
    intersection = sum((p & t).sum().item() for p, t in zip(preds, truths))
    total = sum(p.sum().item() + t.sum().item() for p, t in zip(preds, truths))
    assert scores["val_global_dice"] == pytest.approx(2 * intersection / total)
    # cfg.threshold is the probability above which a voxel is fluid: the fluid's is sigmoid(6) = 0.9975 here.
    assert pe.evaluate(Threshold(), items, pe.DiceBCELoss(), replace(cfg, threshold=0.999))["val_dice"] == 0


# %% The stages


def test_the_cells_run_with_tiny_settings_and_write_every_output_in_the_series_geometry(
    pleural_root, tmp_path, run_cells, capsys
):
    data_dir = tmp_path / "data"  # no real download there: the script must say it uses the sample
    (data_dir / "sample").mkdir(parents=True)
    (data_dir / "sample" / PLEURAL).symlink_to(pleural_root)
    out_dir, images_dir = tmp_path / "out", tmp_path / "Images"
    cells = run_cells(PLEURAL_SCRIPT, data_dir=data_dir, output_dir=out_dir, images_dir=images_dir, quick=True,
                      tensorboard=True, **TINY)  # fmt: skip
    cfg, data, batch, history, per_case = (cells[name] for name in ("cfg", "data", "batch", "history", "per_case"))
    out = capsys.readouterr().out
    assert "Configuration: QUICK run, with " in out and "SYNTHETIC" in out and "Using the first 4 of 10 cases" in out
    assert data.synthetic and [len(data.train), len(data.val), len(data.test)] == [2, 1, 1]
    assert not data.skipped.counts
    # The batch: batch_size cases x samples_per_volume crops, as the network gets them; masks stay binary.
    assert batch["image"].shape == batch["label"].shape == (2 * 2, 1, *cfg.roi_size)
    assert batch["image"].dtype == torch.float16 and set(batch["label"].unique().tolist()) <= {0, 1}
    assert isinstance(cells["model"], torch.nn.Module)

    table = pd.read_csv(out_dir / "history.csv")
    columns = ["epoch", "train_loss", "val_loss", "val_dice", "val_global_dice", "lr", "seconds"]
    assert list(table.columns) == columns and list(table["epoch"]) == [1, 2]
    np.testing.assert_allclose(table["val_dice"], [row["val_dice"] for row in history])
    np.testing.assert_allclose(table["lr"], [cfg.lr, cfg.lr * 0.5**cfg.lr_power])  # the poly decay
    checkpoint = torch.load(out_dir / "best_model.pt", weights_only=True)
    assert {"model", "config", "epoch", "metric", "metric_name", "metrics"} <= set(checkpoint)
    best = history.best()
    assert best == max(history, key=lambda row: row["val_dice"]) and checkpoint["metric_name"] == "val_dice"
    assert checkpoint["epoch"] == best["epoch"] and checkpoint["metric"] == best["val_dice"]
    assert checkpoint["config"]["roi_size"] == (16, 16, 8)
    cells["build_model"](cfg).load_state_dict(checkpoint["model"])  # strict: every weight is there
    assert torch.load(out_dir / "last_checkpoint.pt", weights_only=True)["epoch"] == 2
    assert len(list((out_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1

    # Evaluate: the validation case's prediction, NIfTI in the series' geometry, scored in val_per_case.csv; then
    # the test case, scored once in test_per_case.csv, which the cell leaves as per_case: the result.
    val_per_case = pd.read_csv(out_dir / "val_per_case.csv")
    assert list(per_case.columns) == list(val_per_case.columns) == ["case", "dice", "true_ml", "predicted_ml", "shape"]
    pd.testing.assert_frame_equal(pd.read_csv(out_dir / "test_per_case.csv"), per_case)
    assert list(per_case["case"]) == [data.test[0]["case"]] and list(val_per_case["case"]) == [data.val[0]["case"]]
    assert not (out_dir / "val_predictions" / f"{data.test[0]['case']}_effusion_predicted.nii.gz").exists()
    (val_case,) = val_per_case.itertuples()
    pred_img = nib.load(out_dir / "val_predictions" / f"{val_case.case}_effusion_predicted.nii.gz")
    hu, affine = cells["read_dicom_series"](series_dir(pleural_root, val_case.case))
    assert pred_img.shape == hu.shape and pred_img.get_data_dtype() == np.uint8
    assert val_case.shape == "x".join(map(str, hu.shape))
    np.testing.assert_allclose(pred_img.affine, affine, atol=1e-4)
    assert int(pred_img.header["sform_code"]) == 1 and int(pred_img.header["qform_code"]) == 1
    pred = np.asanyarray(pred_img.dataobj).astype(bool)
    truth, _, _ = cells["read_mask"](mask_path(pleural_root, val_case.case), affine, hu)
    expected = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    assert val_case.dice == pytest.approx(expected)
    assert val_case.true_ml == pytest.approx(truth.sum() * abs(np.linalg.det(affine[:3, :3])) / 1000)

    # The test case scored as the validation case is: its mask read as the Data cell placed it, at full resolution.
    (test_case,) = per_case.itertuples()
    test_hu, test_affine = cells["read_dicom_series"](series_dir(pleural_root, test_case.case))
    test_truth, _, _ = cells["read_mask"](mask_path(pleural_root, test_case.case), test_affine, test_hu)
    assert test_case.true_ml == pytest.approx(test_truth.sum() * abs(np.linalg.det(test_affine[:3, :3])) / 1000)

    # Predict, on the sample's one test patient (every patient of the sample has a mask), never trained on nor used
    # to choose the model: the same mask as the one the test case was scored with.
    predicted = pd.read_csv(out_dir / "predictions" / "predictions.csv")
    assert cells["predictions"] == [out_dir / "predictions" / f"{test_case.case}_effusion.nii.gz",
                                    out_dir / "predictions" / "predictions.csv"]  # fmt: skip
    test_pred = np.asanyarray(nib.load(cells["predictions"][0]).dataobj).astype(bool)
    expected = 2 * (test_pred & test_truth).sum() / (test_pred.sum() + test_truth.sum())
    assert test_case.dice == pytest.approx(expected)
    assert list(predicted["effusion_ml"]) == pytest.approx([test_case.predicted_ml])

    for name in ("batch.png", "dice_per_epoch.png", "val_predictions.png"):
        with Image.open(out_dir / name) as img:
            assert img.format == "PNG" and img.width > 200, name
    picture = images_dir / "pleural_effusion_3d_predictions.png"  # the sample was used: the README's picture
    assert picture.read_bytes() == (out_dir / "val_predictions.png").read_bytes()
    assert pd.read_csv(out_dir / "skipped_cases.csv").empty

    summary = out[out.index("\nSummary (") :]
    assert summary.startswith("\nSummary (QUICK run, 2 epochs, ")
    assert f"data:    SYNTHETIC sample {data_dir / 'sample' / PLEURAL}: 2 train, 1 validation, 1 test cases" in summary
    one = "(1 case: too few for an interval)"  # the tiny run's one test case
    assert f"best:    epoch {best['epoch']} of 2, test Dice {test_case.dice:.4f} {one}" in summary
    assert f"({test_case.case} {test_case.dice:.4f} (" in summary  # at full resolution, with its volumes
    assert f"validation Dice {best['val_dice']:.4f} (mean over cases on the network's grid" in summary
    assert f"outputs: {out_dir}/ best_model.pt, last_checkpoint.pt" in summary
    assert summary.rstrip().endswith(f"picture: {picture}")


def test_fit_resumes_and_ctrl_c_or_a_nan_loss_stop_with_one_line(pe, sample_root, tmp_path, monkeypatch, capsys):
    cfg = tiny_config(pe, tmp_path, sample_root, max_cases=3, max_epochs=1)
    data = pe.load_data(cfg)
    first = pe.fit(cfg, data, pe.build_model(cfg))
    history = pe.fit(replace(cfg, max_epochs=2, resume=True), data, pe.build_model(cfg))
    assert "1 epoch(s) done" in capsys.readouterr().out
    assert [row["epoch"] for row in history] == [1, 2] and history[:1] == first
    assert pd.read_csv(cfg.output_dir / "history.csv")["epoch"].tolist() == [1, 2]
    # The first run's poly decay ended at lr 0; the resumed one follows the decay of its own 2 epochs.
    assert history[1]["lr"] == pytest.approx(cfg.lr * 0.5**cfg.lr_power)
    best, last = cfg.output_dir / "best_model.pt", cfg.output_dir / "last_checkpoint.pt"
    kept = best.read_bytes()

    def stop(error):
        def train_one_epoch(*args, **kwargs):
            raise error

        return train_one_epoch

    monkeypatch.setattr(pe, "train_one_epoch", stop(KeyboardInterrupt()))
    stopped = pe.fit(replace(cfg, max_epochs=4, resume=True), data, pe.build_model(cfg))
    assert stopped == history
    message = f"Interrupted during epoch 3: {last} holds epoch 2; run again with resume=True"
    assert message in capsys.readouterr().out and stopped.stopped.startswith(message)
    with pytest.raises(SystemExit) as ended:  # the Train cell ends the run there: no predictions from it
        pe.end_if_stopped(stopped)
    assert ended.value.code == 130
    monkeypatch.setattr(pe, "train_one_epoch", stop(FloatingPointError("Loss is nan at epoch 3, batch 0")))
    stopped = pe.fit(replace(cfg, max_epochs=4, resume=True), data, pe.build_model(cfg))
    best_epoch = torch.load(best, weights_only=True)["epoch"]
    assert f"Loss is nan at epoch 3, batch 0. Kept: {best} (epoch {best_epoch})" in capsys.readouterr().out
    assert best.read_bytes() == kept and torch.load(last, weights_only=True)["epoch"] == 2
    with pytest.raises(SystemExit) as ended:
        pe.end_if_stopped(stopped)
    assert ended.value.code == 1


class NaNModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.weight * torch.nan


def test_a_loss_that_is_not_finite_is_one_error_naming_epoch_batch_and_lr(pe):
    model = NaNModel().to(pe.DEVICE)
    batch = {"image": torch.rand(2, 1, 8, 8, 4), "label": torch.zeros(2, 1, 8, 8, 4)}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cfg = pe.Config()
    message = rf"^Loss is nan at epoch 3, batch 0: stopping \(try a lower lr than {cfg.lr}, or amp=False\)"
    steps = []
    optimizer.step = lambda original=optimizer.step: steps.append(original())  # counts the steps taken
    with pytest.raises(FloatingPointError, match=message):
        pe.train_one_epoch(model, [batch] * 3, pe.DiceBCELoss(), optimizer, scaler, cfg, 3)
    # The loss is read one step late (checkpoints.EpochLoss: no step waits for the GPU), so batch 0's step has been
    # taken (on a NaN gradient: the weights in memory are lost, never saved) when the stop comes, during batch 1
    # before its own step; batch 2 is never reached; the error names batch 0, where the loss went wrong.
    assert len(steps) == 1


def test_same_seed_same_first_epoch_on_the_cpu_and_the_split_is_split_seeds(pe, sample_root, tmp_path):
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        cfg = tiny_config(pe, tmp_path / name, sample_root, max_epochs=1, seed=seed)
        data = pe.load_data(cfg)
        history = pe.fit(cfg, data, pe.build_model(cfg))
        runs.append(([item["case"] for item in data.val], history[0]))
    (split_a, first_a), (split_b, first_b), (split_c, other) = runs
    assert split_a == split_b == split_c  # the split is split_seed's: a new training seed keeps it
    assert first_a["train_loss"] == first_b["train_loss"] and first_a["val_dice"] == first_b["val_dice"]  # bitwise
    assert other["train_loss"] != first_a["train_loss"]  # the seed does reach the weights, crops and shuffling


# %% Predict: the trained model on a user's own CTs


@pytest.fixture(scope="module")
def trained(pe, sample_root, tmp_path_factory):
    """A tiny model trained once for this module (seconds): its configuration, output_dir holding best_model.pt.
    Trained this little it predicts about its initial 0.12 everywhere; its threshold (saved with it) sits just under,
    so that its masks mark part of each body, not nothing: a prediction that settings could change."""
    cfg = tiny_config(pe, tmp_path_factory.mktemp("trained"), sample_root, threshold=0.12)
    pe.fit(cfg, pe.load_data(cfg), pe.build_model(cfg))
    return cfg


RAS_STORAGE = np.array([[0, -1], [1, -1], [2, 1]])  # the series' LPS voxel order with x and y reversed: RAS


def users_folder(pe, root: Path, folder: Path) -> Path:
    """CTs as a user brings them: LUNG1-005's series exported with extension-less file names in shuffled order, and
    LUNG1-006's as a NIfTI stored RAS (x and y the other way from the series, its affine saying so)."""
    files = sorted(series_dir(root, "LUNG1-005").glob("*.dcm"))
    export = folder / "export"
    export.mkdir(parents=True)
    for path, n in zip(files, np.random.default_rng(0).permutation(len(files))):
        shutil.copy(path, export / f"IM{n:04d}")  # no extension, numbered in no order
    hu, affine = pe.read_dicom_series(series_dir(root, "LUNG1-006"))
    stored = nib.orientations.apply_orientation(hu, RAS_STORAGE).astype(np.int16)
    ras = nib.Nifti1Image(stored, affine @ nib.orientations.inv_ornt_aff(RAS_STORAGE, hu.shape))
    nib.save(ras, folder / "chest.nii.gz")
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    return folder


def masks_of(paths: list[Path]) -> dict[str, nib.Nifti1Image]:
    return {path.name: nib.load(path) for path in paths if path.name.endswith(".nii.gz")}


def test_predict_writes_each_mask_on_its_inputs_grid_with_its_volume(pe, trained, pleural_root, tmp_path, capsys):
    folder = users_folder(pe, pleural_root, tmp_path / "ct")
    predictions = pe.predict(trained, folder)
    out = capsys.readouterr().out
    assert f"Predicting with {trained.output_dir / 'best_model.pt'} (epoch 2, val_dice " in out
    out_dir = trained.output_dir / "predictions"
    names = ["chest_effusion.nii.gz", "LUNG1-005_effusion.nii.gz", "predictions.csv"]  # the folder's entries by name
    assert predictions == [out_dir / name for name in names]
    assert f"Predicted 2 of 2 CTs into {out_dir} (masks, predictions.csv): no file skipped" in out
    masks = masks_of(predictions)
    # Each mask on its input's voxel grid: the series as read_dicom_series reads it, the NIfTI as stored.
    series = nib.Nifti1Image(*pe.read_dicom_series(series_dir(pleural_root, "LUNG1-005")))
    nifti = nib.load(folder / "chest.nii.gz")
    for name, source in (("LUNG1-005_effusion.nii.gz", series), ("chest_effusion.nii.gz", nifti)):
        mask = masks[name]
        assert mask.shape == source.shape and mask.get_data_dtype() == np.uint8, name
        np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
        assert int(mask.header["sform_code"]) == int(mask.header["qform_code"]) == 1
        values = np.asanyarray(mask.dataobj)
        assert set(np.unique(values)) == {0, 1} and values.mean() < 0.9, name  # binary, neither empty nor full
    table = pd.read_csv(out_dir / "predictions.csv")
    assert list(table.columns) == ["input", "mask", "effusion_ml", "voxels", "shape"]
    assert list(table["input"]) == [str(folder / "chest.nii.gz"), str(folder / "export")]
    for row in table.itertuples():  # the volumes of the masks as written, recomputed from the files
        mask = masks[row.mask]
        voxels = int(np.asanyarray(mask.dataobj).sum())
        assert row.voxels == voxels and row.shape == "x".join(map(str, mask.shape))
        ml = voxels * abs(np.linalg.det(mask.affine[:3, :3])) / 1000
        assert row.effusion_ml == pytest.approx(ml, rel=1e-6)  # the file keeps its affine in float32

    # The same CTs as TCIA ships them: the same masks, voxel for voxel (the shuffled export read in slice order,
    # the RAS NIfTI turned into the series' order for the network and its mask turned back).
    again = replace(trained, output_dir=tmp_path / "again", checkpoint=trained.output_dir / "best_model.pt")
    originals = masks_of(
        pe.predict(again, [series_dir(pleural_root, "LUNG1-005"), series_dir(pleural_root, "LUNG1-006")])
    )
    assert sorted(originals) == ["LUNG1-005_effusion.nii.gz", "LUNG1-006_effusion.nii.gz"]
    np.testing.assert_array_equal(
        masks["LUNG1-005_effusion.nii.gz"].dataobj, originals["LUNG1-005_effusion.nii.gz"].dataobj
    )
    np.testing.assert_array_equal(
        masks["chest_effusion.nii.gz"].dataobj,
        nib.orientations.apply_orientation(np.asanyarray(originals["LUNG1-006_effusion.nii.gz"].dataobj), RAS_STORAGE),
    )


def test_by_default_predict_takes_the_patients_without_a_mask(pe, trained, pleural_copy, capsys):
    """A download as TCIA and PleThora give it: the patients PleThora did not outline are the ones to predict."""
    for case in ("LUNG1-006", "LUNG1-009"):
        shutil.rmtree(pleural_copy / "Effusions" / case)
    predictions = pe.predict(replace(trained, data_dir=pleural_copy.parent), None)
    assert "Predicting the 2 patients of " in capsys.readouterr().out
    names = [p.name for p in predictions]
    assert names == ["LUNG1-006_effusion.nii.gz", "LUNG1-009_effusion.nii.gz", "predictions.csv"]


def file_hashes(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_damaged_input_is_named_skipped_and_counted_and_no_input_changes(pe, trained, pleural_root, tmp_path, capsys):
    folder = tmp_path / "ct"
    for case in ("LUNG1-007", "LUNG1-008"):
        shutil.copytree(series_dir(pleural_root, case), folder / case)
    cut = sorted((folder / "LUNG1-008").glob("*.dcm"))[4]
    cut.write_bytes(cut.read_bytes()[:2000])  # a slice cut short in its pixels, as an interrupted copy leaves it
    (folder / "notes.nii.gz").write_text("not a CT")  # a text file with an image's name
    before = file_hashes(folder)
    predictions = pe.predict(trained, folder)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("Skipped")]
    assert len(lines) == 2, out
    assert lines[0].startswith(f"Skipped {folder / 'LUNG1-008'}: ") and str(cut) in lines[0], lines[0]
    assert lines[1].startswith(f"Skipped {folder / 'notes.nii.gz'}: unreadable ("), lines[1]
    assert [p.name for p in predictions] == ["LUNG1-007_effusion.nii.gz", "predictions.csv"]
    assert "Predicted 1 of 3 CTs into " in out and "(masks, predictions.csv): skipped 2 files (" in out
    assert file_hashes(folder) == before  # the user's files are only read


def test_prediction_uses_the_checkpoints_settings_whatever_cfg_says(pe, trained, pleural_root, tmp_path, capsys):
    inputs = [series_dir(pleural_root, "LUNG1-009")]
    plain = masks_of(pe.predict(trained, inputs))
    changed = replace(trained, in_plane_factor=1, hu_window=(-1000.0, 1000.0), roi_size=(32, 32, 16), threshold=0.9,
                      output_dir=tmp_path / "changed", checkpoint=trained.output_dir / "best_model.pt")  # fmt: skip
    other = masks_of(pe.predict(changed, inputs))
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Predicting with")][-1]
    assert "in_plane_factor=2, hu_window=(-160.0, 240.0), " in said and "roi_size=(16, 16, 8)" in said
    mask = np.asanyarray(plain["LUNG1-009_effusion.nii.gz"].dataobj)
    assert 0 < mask.sum() < mask.size
    np.testing.assert_array_equal(np.asanyarray(other["LUNG1-009_effusion.nii.gz"].dataobj), mask)
    pd.testing.assert_frame_equal(
        pd.read_csv(trained.output_dir / "predictions" / "predictions.csv"),
        pd.read_csv(tmp_path / "changed" / "predictions" / "predictions.csv"),
    )


def test_a_checkpoint_that_is_not_this_scripts_is_one_clear_error(pe, trained, pleural_root, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00 not a checkpoint" * 10)
    foreign = tmp_path / "other_script" / "best_model.pt"
    foreign.parent.mkdir()
    torch.save({"model": {}, "config": {"foo": 1}, "epoch": 1, "metric": 0.0, "metric_name": "x"}, foreign)
    for path in (garbage, foreign, tmp_path / "missing.pt"):
        with pytest.raises(CheckpointError, match=re.escape(str(path))):
            pe.predict(replace(trained, checkpoint=path), [series_dir(pleural_root, "LUNG1-001")])


def test_predict_from_the_command_line_trains_nothing(trained, pleural_root, repo_copy, tmp_path):
    """`PREDICT=<folder> python pleural_effusion_3d.py`: the Predict cell alone with output/'s best_model.pt."""
    repo = repo_copy(f"{PLEURAL_SCRIPT}.py")
    output = repo / "output" / PLEURAL_SCRIPT
    output.mkdir(parents=True)
    shutil.copy(trained.output_dir / "best_model.pt", output / "best_model.pt")
    folder = Path(shutil.copytree(series_dir(pleural_root, "LUNG1-010"), tmp_path / "my scans" / "LUNG1-010"))
    env = {**os.environ, "PREDICT": str(folder.parent), "OMP_NUM_THREADS": "1", "QUICK": "0"}
    script = [sys.executable, str(repo / f"{PLEURAL_SCRIPT}.py")]
    result = subprocess.run(script, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"Predicting with {output / 'best_model.pt'} (epoch 2" in result.stdout
    assert not re.search(r"^epoch ", result.stdout, re.M) and not (output / "history.csv").exists()  # no training
    assert sorted(p.name for p in (output / "predictions").iterdir()) == [
        "LUNG1-010_effusion.nii.gz",
        "predictions.csv",
        "skipped.csv",
    ]

    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    result = subprocess.run(
        script, cwd=tmp_path, env={**env, "CHECKPOINT": str(garbage)}, capture_output=True, text=True
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith(f"Checkpoint problem: {garbage} cannot be read as a checkpoint"), line


@pytest.mark.slow
def test_quick_run_from_another_directory_reaches_dice_one_half(pleural_root, tmp_path, monkeypatch, repo_copy):
    """`QUICK=1 python path/to/pleural_effusion_3d.py` as it is, from another folder (about 40 s on one CPU
    thread): paths resolve against the script's folder, and validation Dice reaches the issue's bar of 0.5."""
    repo = repo_copy(f"{PLEURAL_SCRIPT}.py", {f"sample/{PLEURAL}": pleural_root})
    monkeypatch.setenv("QUICK", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    start = time.time()
    result = subprocess.run([sys.executable, str(repo / f"{PLEURAL_SCRIPT}.py")], cwd=tmp_path, capture_output=True,
                            text=True)  # fmt: skip
    seconds = time.time() - start
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"using the SYNTHETIC sample in {repo / 'data' / 'sample' / PLEURAL}" in result.stdout
    assert "Configuration: QUICK run" in result.stdout and "no case skipped" in result.stdout
    output = repo / "output" / PLEURAL_SCRIPT
    history = pd.read_csv(output / "history.csv")
    assert len(history) == 30 and history["val_dice"].max() >= 0.5, history[["epoch", "val_dice"]].dropna()
    assert history["val_dice"].notna().tolist() == [epoch % 2 == 0 for epoch in range(1, 31)]  # val_interval 2
    assert len(pd.read_csv(output / "val_per_case.csv")) == 2
    per_case = pd.read_csv(output / "test_per_case.csv")  # the held-out test cases: the result
    assert len(per_case) == 2 and per_case["dice"].mean() >= 0.5  # at full resolution too
    assert {p.name for p in output.iterdir()} == {
        "best_model.pt", "last_checkpoint.pt", "history.csv", "dice_per_epoch.png", "batch.png", "val_per_case.csv",
        "test_per_case.csv", "val_predictions.png", "skipped_cases.csv", "val_predictions", "predictions",
    }  # fmt: skip
    assert len(list((output / "val_predictions").glob("LUNG1-*_effusion_predicted.nii.gz"))) == 2
    # Predict: the sample has no patient without a mask, so the two test patients, as a user's CTs.
    assert "predicting the 2 test patients of the trained model's split (split_seed 0)" in result.stdout
    predicted = pd.read_csv(output / "predictions" / "predictions.csv")
    assert sorted(predicted["mask"]) == sorted(f"{case}_effusion.nii.gz" for case in per_case["case"])
    np.testing.assert_allclose(
        predicted.sort_values("mask")["effusion_ml"], per_case.sort_values("case")["predicted_ml"]
    )
    picture = repo / "Images" / "pleural_effusion_3d_predictions.png"
    assert list((repo / "Images").iterdir()) == [picture]
    assert picture.read_bytes() == (output / "val_predictions.png").read_bytes()
    summary = result.stdout[result.stdout.index("\nSummary (") :]
    assert summary.startswith("\nSummary (QUICK run, 30 epochs") and "data:    SYNTHETIC sample" in summary
    assert f"test Dice {per_case['dice'].mean():.4f} (95% CI " in summary and f"picture: {picture}" in summary
    assert f"validation Dice {history['val_dice'].max():.4f}" in summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # nothing written to the working directory
    assert seconds < 150, f"the quick run took {seconds:.0f} s"  # 90 s is the bar on a quiet machine
