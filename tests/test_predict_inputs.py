"""What every Predict cell shares: the user's own files read (DICOM series of any naming and slice order, NIfTI,
radiographs of any bit depth), masks written on the input's grid with their volume, and the trained checkpoint read
back with its own settings, a bad one named in one line (checkpoints.py and data_cleaning.py)."""

import dataclasses
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from checkpoints import BaseConfig, CheckpointError, as_trained, load_best, load_trained, save_checkpoint
from data_cleaning import (
    Unusable,
    ct_inputs,
    expand_inputs,
    read_ct,
    read_dicom_series,
    read_radiograph,
    save_mask_nifti,
    volume_ml,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_series(folder: Path, volume: np.ndarray, row_dir, col_dir, spacing=(0.8, 0.7, 2.5), origin=(-50, 20, 30),
                 names=None, order=None) -> None:  # fmt: skip
    """`volume` (columns, rows, slices) int16 as a DICOM series in `folder`: slice k at origin + k * spacing[2] along
    the normal of (row_dir, col_dir), PixelSpacing (row, column) = (spacing[1], spacing[0]); files named `names`
    (default 1-001.dcm ...) and written in `order` (default: slice order)."""
    folder.mkdir(parents=True)
    row_dir, col_dir = np.asarray(row_dir, float), np.asarray(col_dir, float)
    normal, series = np.cross(row_dir, col_dir), generate_uid()
    for n, k in enumerate(order if order is not None else range(volume.shape[2])):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = CTImageStorage, generate_uid(), series
        ds.Modality, ds.Rows, ds.Columns = "CT", volume.shape[1], volume.shape[0]
        ds.ImageOrientationPatient = [*row_dir, *col_dir]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * spacing[2] * normal]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.PixelData = (volume[:, :, k].T.astype(np.int16) + 1024).astype("<i2").tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
            CTImageStorage,
            ds.SOPInstanceUID,
        )
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(folder / (names[n] if names else f"1-{n + 1:03d}.dcm"), enforce_file_format=True)


def test_a_dicom_series_with_extensionless_shuffled_files_and_an_oblique_plane_reads_onto_its_patient_positions(
    tmp_path,
):
    rng = np.random.default_rng(0)
    volume = rng.integers(-1000, 1000, size=(6, 5, 4)).astype(np.int16)
    angle = np.deg2rad(20)  # a gantry tilted about x: rows run obliquely between y and z
    row_dir, col_dir = [1, 0, 0], [0, np.cos(angle), np.sin(angle)]
    order = [2, 0, 3, 1]
    write_series(tmp_path / "ct", volume, row_dir, col_dir, names=[f"IM{i}" for i in (7, 3, 9, 1)], order=order)
    (tmp_path / "ct" / "DICOMDIR").write_bytes(b"not a slice")  # ignored: the index of a CD, not an image
    hu, affine = read_dicom_series(tmp_path / "ct")
    np.testing.assert_array_equal(hu, volume.astype(np.float32))  # the slices back in position order
    # Each voxel where DICOM's own formula puts it: the slice's position, plus column i times the column spacing
    # along the row direction, plus row j times the row spacing along the column direction (LPS), in RAS.
    normal = np.cross(row_dir, col_dir)
    for i, j, k in [(0, 0, 0), (5, 4, 3), (2, 3, 1)]:
        lps = np.array([-50, 20, 30]) + k * 2.5 * normal + i * 0.8 * np.array(row_dir) + j * 0.7 * np.array(col_dir)
        np.testing.assert_allclose(affine @ [i, j, k, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-6)
    assert ct_inputs(tmp_path / "ct") == [tmp_path / "ct"]  # a folder of slices is one series
    img = read_ct(tmp_path / "ct")
    assert img.shape == volume.shape and np.allclose(img.affine, affine)


def test_a_truncated_slice_is_named_and_a_folder_of_scans_lists_each_series_and_file(tmp_path):
    volume = np.zeros((4, 4, 3), np.int16)
    write_series(tmp_path / "scans" / "patient_a" / "series", volume, [1, 0, 0], [0, 1, 0])
    bad = tmp_path / "scans" / "patient_a" / "series" / "1-002.dcm"
    bad.write_bytes(bad.read_bytes()[:400])
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.int16), np.eye(4)), tmp_path / "scans" / "b.nii.gz")
    (tmp_path / "scans" / "notes.txt").write_text("not a scan")
    found = ct_inputs(tmp_path / "scans")
    assert found == [tmp_path / "scans" / "b.nii.gz", tmp_path / "scans" / "notes.txt",
                     tmp_path / "scans" / "patient_a" / "series"]  # fmt: skip
    with pytest.raises(Unusable) as err:
        read_ct(found[2])
    assert str(bad) in err.value.detail and err.value.problem == "truncated DICOM"
    with pytest.raises(Unusable, match="neither a NIfTI file"):
        read_ct(found[1])
    with pytest.raises(Exception, match="not found"):
        expand_inputs(tmp_path / "missing")


def test_a_mask_is_written_on_its_ct_grid_with_its_volume_in_ml(tmp_path):
    affine = np.array([[0, -0.7, 0, 10], [0.8, 0, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]], float)  # axes permuted
    mask = np.zeros((6, 5, 4), bool)
    mask[1:4, 2:5, 1:3] = True  # 18 voxels
    save_mask_nifti(tmp_path / "m.nii.gz", mask, affine)
    img = nib.load(tmp_path / "m.nii.gz")
    assert img.get_data_dtype() == np.uint8 and img.shape == mask.shape
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), mask.astype(np.uint8))
    np.testing.assert_allclose(img.affine, affine)
    np.testing.assert_allclose(img.get_qform(), affine, atol=1e-5)
    assert volume_ml(mask, affine) == pytest.approx(18 * 0.8 * 0.7 * 2.5 / 1000)


def test_radiographs_of_any_bit_depth_and_dicom_with_its_spacing(tmp_path):
    pixels = (np.arange(30 * 40).reshape(30, 40) % 4096).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "a16.png")
    read, spacing = read_radiograph(tmp_path / "a16.png")
    np.testing.assert_array_equal(read, pixels.astype(np.float32))
    assert spacing is None  # a PNG says nothing of its pixels' size
    Image.fromarray((pixels // 16).astype(np.uint8)).save(tmp_path / "a8.jpg", quality=95)
    assert read_radiograph(tmp_path / "a8.jpg")[0].shape == (30, 40)

    ds = Dataset()
    ds.Rows, ds.Columns, ds.PixelSpacing = 30, 40, [0.2, 0.3]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"  # bright = air: inverted on reading
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
    ds.save_as(tmp_path / "film", enforce_file_format=True)  # no extension: DICOM by its content
    read, spacing = read_radiograph(tmp_path / "film")
    np.testing.assert_array_equal(read, pixels.max() + pixels.min() - pixels.astype(np.float32))
    assert spacing == (0.2, 0.3)
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(Unusable, match="unreadable image"):
        read_radiograph(tmp_path / "x.png")
    truncated = tmp_path / "film.dcm"
    truncated.write_bytes((tmp_path / "film").read_bytes()[:300])
    with pytest.raises(Unusable) as err:
        read_radiograph(truncated)
    assert str(truncated) in err.value.detail


@dataclass
class NetConfig(BaseConfig):
    output_dir: Path = Path("out")
    checkpoint: Path | None = None
    width: int = 4  # the network's shape
    image_size: int = 32  # how inputs are prepared
    threshold: float = 0.5
    quick: bool = False
    AS_TRAINED: ClassVar[tuple[str, ...]] = ("image_size", "threshold")


def build(cfg: NetConfig) -> torch.nn.Module:
    return torch.nn.Linear(cfg.width, 1)


def saved_run(tmp_path: Path, cfg: NetConfig) -> Path:
    torch.manual_seed(0)
    model = build(cfg)
    state = {"model": model.state_dict(), "config": dataclasses.asdict(cfg), "epoch": 3, "metric": 0.75,
             "metric_name": "val_dice"}  # fmt: skip
    state["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in state["config"].items()}
    save_checkpoint(state, tmp_path / "best_model.pt")
    return tmp_path / "best_model.pt"


def test_prediction_takes_the_network_and_preparation_from_the_checkpoint_whatever_cfg_says(tmp_path, capsys):
    path = saved_run(tmp_path, NetConfig(output_dir=tmp_path, width=6, image_size=64, threshold=0.3))
    now = NetConfig(output_dir=tmp_path / "elsewhere", checkpoint=str(path), image_size=16, threshold=0.9)
    assert isinstance(now.checkpoint, Path)  # text to a path, for `Path | None` fields too
    model, trained, checkpoint = load_trained(now, build, torch.device("cpu"))
    assert model.in_features == 6 and not model.training  # the trained shape, in eval mode
    assert (trained.image_size, trained.threshold) == (64, 0.3)  # the trained preparation and threshold
    assert trained.output_dir == tmp_path / "elsewhere"  # where to write: still cfg's
    assert f"Predicting with {path} (epoch 3, val_dice 0.7500)" in capsys.readouterr().out
    assert as_trained(NetConfig(), {"config": {"image_size": [8, 8], "threshold": 0.1}}).image_size == (8, 8)


def test_a_missing_unreadable_foreign_or_misfitting_checkpoint_is_one_line_naming_it(tmp_path):
    cpu = torch.device("cpu")
    with pytest.raises(CheckpointError, match="not found: train first"):
        load_trained(NetConfig(output_dir=tmp_path), build, cpu)
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=r"garbage\.pt cannot be read as a checkpoint"):
        load_trained(NetConfig(checkpoint=tmp_path / "garbage.pt"), build, cpu)
    torch.save({"model": {}, "config": {"patients_per_class": 3, "score_thresholds": (0.5,)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt was written by another script"):
        load_trained(NetConfig(checkpoint=tmp_path / "other.pt"), build, cpu)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a best_model.pt"):
        load_trained(NetConfig(checkpoint=tmp_path / "list.pt"), build, cpu)
    path = saved_run(tmp_path, NetConfig(output_dir=tmp_path))
    state = torch.load(path, weights_only=True)
    state["model"]["weight"] = torch.zeros(1, 9)  # weights of another shape than its configuration's
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="do not fit the network of its own configuration"):
        load_best(NetConfig(output_dir=tmp_path), build, cpu)


def test_predict_only_runs_the_predict_stage_of_a_script_and_nothing_else(tmp_path):
    script = tmp_path / "tiny.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from checkpoints import PREDICT, predict_only
        from data_cleaning import one_line_data_problems
        print("cell: configuration")
        inputs = PREDICT
        class cfg:
            predict_inputs = PREDICT
        if __name__ == "__main__":
            one_line_data_problems()
            if PREDICT:
                predict_only(__file__)
        if __name__ == "__main__":
            print("cell: train")
        def predict(cfg, inputs):
            print("predicting", inputs)
            if inputs == "bad":
                from checkpoints import CheckpointError
                raise CheckpointError("x.pt cannot be read")
            return [] if inputs == "none" else ["a"]
    """))  # fmt: skip

    def run(predict: str | None) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/bin:/bin"} | ({"PREDICT": predict} if predict else {})
        return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)

    trained = run(None)
    assert trained.returncode == 0 and "cell: train" in trained.stdout
    predicted = run("scans")
    assert predicted.returncode == 0 and "predicting scans" in predicted.stdout
    assert "cell: train" not in predicted.stdout
    assert run("none").returncode == 1  # nothing could be predicted
    bad = run("bad")
    assert bad.returncode == 1 and bad.stderr == "Checkpoint problem: x.pt cannot be read\n"
