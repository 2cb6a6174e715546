"""Pleural effusion segmentation on chest CT: NSCLC-Radiomics DICOM series and PleThora masks, with a MONAI 3D U-Net.

Outlines the fluid that collects between the lung and the chest wall: reads each CT series with pydicom (slices
sorted by position, Hounsfield units, the affine from the DICOM geometry), places the PleThora mask on the image's
grid (by its header or by PleThora's documented voxel order, whichever puts it on fluid), windows, halves in-plane
(image and mask by the same 2x2 blocks), crops the body, and keeps every case so prepared on disk (read back on the
next run, nothing decoded) and in memory; splits by case with a
seed into training, validation and test, trains a MONAI UNet 3D on random crops (half centred on fluid, flipped
left-right) with Dice + weighted BCE, validates with gaussian-blended sliding windows, keeps the epoch with the best
validation Dice, and writes the validation predictions as NIfTI in each series' geometry; scores the held-out test
cases once at full resolution (the result, with a 95% bootstrap interval); then predicts the effusion, and its
volume in mL, on CTs nobody outlined (a NIfTI file or a DICOM series folder), each mask on its CT's own voxel grid.
Data: NSCLC-Radiomics (Aerts et al. 2014) https://www.cancerimagingarchive.net/collection/nsclc-radiomics/ and
PleThora (Kiser et al. 2020) https://doi.org/10.7937/tcia.2020.6c7y-gq39.

Data: `data/pleural_effusion/` holding `NSCLC-Radiomics/LUNG1-xxx/<study>/<series>/1-001.dcm ...` as TCIA's
downloader writes it, and `Effusions/LUNG1-xxx/LUNG1-xxx_effusion_first_reviewer.nii.gz` from PleThora. Without
it the synthetic stand-in under `data/sample/` is used (written when missing), and the script says so.
Outputs: `output/pleural_effusion_3d/`: `best_model.pt`, `last_checkpoint.pt`, `history.csv`, `dice_per_epoch.png`,
`batch.png`, `skipped_cases.csv`, `val_per_case.csv`, `test_per_case.csv` (Dice and volumes per held-out test case:
the result), `val_predictions/<case>_effusion_predicted.nii.gz`,
`val_predictions.png` (true and predicted outlines; copied to `Images/` for the README when the synthetic sample
was used), `predictions/<name>_effusion.nii.gz` and `predictions/predictions.csv` (input, mask, effusion_ml, voxels,
shape) from the Predict cell.

Run: `python pleural_effusion_3d.py` (`QUICK=1` for a short first try), or cell by cell in VS Code or Jupyter,
each cell leaving its result to look at: `cfg`, `data`, `batch`, `model`, `history`, `per_case`, `predictions`.
Edit the configuration inline (`cfg = Config(max_epochs=200)`) and run the cells below again; after Ctrl-C,
`Config(resume=True)` goes on. Predict only, with the trained model and no training:
`PREDICT=<folder> python pleural_effusion_3d.py` (a NIfTI CT, a DICOM series folder, or a folder of such;
`CHECKPOINT=<best_model.pt>` for other weights). On several GPUs: `torchrun --nproc_per_node=4
pleural_effusion_3d.py` (README: several GPUs and machines).
"""

# %% Imports
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from monai.data import DataLoader, Dataset
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet
from monai.transforms import Compose, EnsureTyped, RandCropByPosNegLabeld, RandFlipd, RandRotate90d, SpatialPadd
from monai.utils import first
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from tqdm import tqdm

import distributed
from checkpoints import (
    CHECKPOINT,
    PREDICT,
    RESUME,
    BaseConfig,
    EpochLoss,
    History,
    TrainingRun,
    end_if_stopped,
    load_best,
    load_trained,
    make_folder,
    predict_only,
    readme_pictures,
    run_summary,
    save_atomically,
    seed_everything,
)
from data_cleaning import (
    Data,
    DatasetError,
    DiskCache,
    Skipped,
    Unusable,
    ct_inputs,
    is_dicom,
    mask_name,
    one_line_data_problems,
    prepare_cached,
    read_dicom_series,
    save_mask_nifti,
    segment_cts,
    split_groups,
)
from dice import DiceAccumulator, describe_ci, save_figure, show, soft_dice_loss
from precision import autocast, grad_scaler
from sample_data import find_dataset

# %% Configuration
# The repository root, whether run as a file (from any directory) or in a notebook kernel (no __file__).
ROOT = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
QUICK = os.environ.get("QUICK", "0") == "1"  # the collection's quick-run switch (README): read here, once
DEVICE = distributed.device()  # picked once: the GPU if any (under torchrun, this process's own), else the CPU


@dataclass
class Config(BaseConfig):
    data_dir: Path = ROOT / "data"  # holds pleural_effusion/ (NSCLC-Radiomics/ and Effusions/); else data/sample/
    output_dir: Path = ROOT / "output" / "pleural_effusion_3d"  # weights, history, plots, predictions
    images_dir: Path = ROOT / "Images"  # the README's pictures: val_predictions.png is copied there, from runs on
    # the synthetic sample only (pictures of real patients never land in a folder of the repository)
    seed: int = 0  # the initial weights, the crops and the augmentation
    split_seed: int = 0  # which cases are validation and test: kept apart from `seed`, so a new seed keeps the test set
    reviewer: str = "first"  # PleThora mask to learn: "first" outlined every case, "second" only some
    mask_orientation: str = "auto"  # where a mask's voxels go: "header" (its affine), "plethora" (PleThora's RPI
    # voxel order, whatever the header says), "auto": the one of the two under which the mask covers fluid (read_mask)
    max_cases: int | None = None  # the first N cases with a mask (the original used 10); None: all (78 in PleThora)
    cache: bool = True  # keep each case read and prepared on disk (cache_dir): the next run reads it back
    cache_dir: Path | None = None  # None: <data_dir>/cache/pleural_effusion_3d/ (beside the download)
    val_fraction: float = 0.2  # of cases, drawn with `split_seed`, to choose the epoch (the original: 8 train / 2
    # validation of 10 cases, and its validation Dice was its result)
    test_fraction: float = 0.2  # of cases, held out and scored once at the end: the result. 10 cases -> 6 train / 2
    # validation / 2 test (0: no test set, and the only score is validation's, which chose the model: optimistic)
    hu_window: tuple[float, float] = (-160.0, 240.0)  # HU mapped to 0..1, clipped: the soft-tissue window (W 400,
    # L 40), see `window_hu`
    in_plane_factor: int = 2  # in-plane downsampling: 512 x 512 -> 256 x 256 (the sample's 160 -> 80); 1: none
    body_threshold_hu: float = -500.0  # foreground crop: the box around voxels denser than this (air is -1000)
    crop_margin: int = 4  # voxels (after downsampling) kept around the body's box
    roi_size: tuple[int, int, int] = (96, 96, 48)  # training crop, (x, y, z) as MONAI orders NIfTI axes: the
    # original's 48x96x96 (D x H x W)
    samples_per_volume: int = 4  # random crops per case and epoch
    pos_neg_ratio: tuple[float, float] = (1.0, 1.0)  # crops centred on fluid : elsewhere (RandCropByPosNegLabeld)
    flip_axes: tuple[int, ...] = (0,)  # axes flipped: 0 = x, the patient's left-right (the array is x to the left,
    # y to the back, z up); 1 (front-back) and 2 (head-foot) would show fluid where gravity never puts it
    flip_prob: float = 0.25  # probability of a flip, for each of flip_axes (MONAI's tutorials 0.1, nnU-Net 0.5)
    rot90_prob: float = 0.0  # probability of 1-3 in-plane quarter turns (needs a square in-plane roi_size); off: a
    # quarter turn moves the back, where the fluid settles, to a side or the front
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)  # UNet features per level
    strides: tuple[int, ...] = (2, 2, 2, 2)  # roi_size must divide by their product
    num_res_units: int = 2  # residual units per block, as MONAI's spleen tutorial
    initial_logit: float = -2.0  # output bias at the start: logit(0.12), a guess at the fluid share of a real crop
    # (the sample's effusions are small: about 1% of its crops)
    bce_weight: float = 0.5  # loss = (1 - bce_weight) x Dice + bce_weight x BCE; 0.5: the original's Dice + BCE,
    # halved, the same balance (and AdamW's steps do not depend on the loss's scale)
    pos_weight: float = 3.0  # BCE weight of fluid voxels, as the original: see DiceBCELoss
    lr: float = 1e-3  # AdamW
    weight_decay: float = 1e-4  # AdamW's decoupled weight decay
    lr_power: float = 0.9  # lr x (1 - epoch / max_epochs) ** lr_power: nnU-Net's "poly" decay to 0; 0 keeps lr fixed
    max_epochs: int = 300  # an epoch is `samples_per_volume` crops of every training case
    batch_size: int = 2  # cases per step: batch_size x samples_per_volume crops
    val_interval: int = 5  # epochs between validations (MONAI's name; also the last epoch): sliding windows cost time
    sw_batch_size: int = 4  # windows per forward pass in sliding-window inference
    sw_overlap: float = 0.75  # overlap of neighbouring windows, as the original; gaussian blending
    threshold: float = 0.5  # effusion probability above which a voxel is fluid
    num_workers: int = 4 if DEVICE.type == "cuda" else 0  # background crops and augmentation feed a GPU; on a CPU
    # they would compete with the model for the same cores
    amp: bool = True  # mixed precision on CUDA (bfloat16 where supported, else float16); ignored on the CPU
    predict_inputs: Path | None = PREDICT  # the Predict cell's input: a NIfTI CT, a DICOM series folder, or a folder
    # of such (None: the download's patients without a PleThora mask; the sample's test patients)
    checkpoint: Path | None = CHECKPOINT  # the weights the Predict cell uses (None: output_dir/best_model.pt)
    tensorboard: bool = False  # also log the history to output_dir/tensorboard (needs `pip install tensorboard`)
    resume: bool = RESUME  # go on from output_dir/last_checkpoint.pt (written after every epoch) up to max_epochs;
    # RESUME=1 python pleural_effusion_3d.py from the command line
    quick: bool = QUICK  # the quick run below; recorded in the checkpoint: a quick model is not a result
    # Read by prediction from the checkpoint, whatever cfg says now: the network learnt CTs halved, windowed and
    # cropped as in its training, and its validation Dice was measured with these windows, overlap and threshold.
    AS_TRAINED: ClassVar[tuple[str, ...]] = (
        "in_plane_factor", "hu_window", "body_threshold_hu", "crop_margin", "roi_size", "sw_overlap", "threshold"
    )  # fmt: skip

    # The quick run (QUICK=1, or Config(quick=True)): a first try in about half a minute on a CPU. These replace the
    # defaults above; a setting given explicitly, as in Config(quick=True, max_epochs=5), wins.
    QUICK_RUN: ClassVar[dict] = dict(
        roi_size=(48, 48, 16),  # the sample's bodies are about 68x50x28 once halved: 96x96x48 is larger than a body
        channels=(8, 16, 32, 64),  # a smaller UNet of 4 levels for the smaller crops
        strides=(2, 2, 2),  # roi_size must divide by their product, 8
        lr=1e-2,  # 120 steps in all, so large ones
        max_epochs=30,  # validation Dice about 0.8 on the sample by then
        val_interval=2,  # the sample's 2 validation volumes are small: validate every other epoch
        num_workers=0,  # 4 steps per epoch: worker processes would cost more to start than they save
    )


cfg = Config()
if __name__ == "__main__":
    distributed.setup()  # under torchrun: join the other processes (README: several GPUs); else nothing
    one_line_data_problems()  # from the command line, a data folder unlike the README's is one line
    print(cfg.describe())
    if PREDICT:  # PREDICT=<folder or file> python pleural_effusion_3d.py: predict, no training (README)
        predict_only(__file__)

# %% Data
CT_DIR, MASK_DIR = "NSCLC-Radiomics", "Effusions"  # the two folders under data/pleural_effusion/


def find_cases(root: Path, reviewer: str, skipped: Skipped) -> list[dict]:
    """The cases of `root` that have both a patient folder and a mask, sorted by name:
    {"case", "patient_dir", "mask_path"}. The others are skipped (named and counted) without reading a file."""
    ct_root, mask_root = root / CT_DIR, root / MASK_DIR
    for folder in (ct_root, mask_root):
        if not folder.is_dir():
            raise DatasetError(
                f"{folder} not found: expected {CT_DIR}/LUNG1-xxx/<study>/<series>/*.dcm and "
                f"{MASK_DIR}/LUNG1-xxx/LUNG1-xxx_effusion_{reviewer}_reviewer.nii.gz in {root} (README.md)"
            )
    patients = {p.name: p for p in ct_root.iterdir() if p.is_dir()}
    cases = []
    for name in sorted(patients.keys() | {p.name for p in mask_root.iterdir() if p.is_dir()}):
        mask_path = plethora_mask(mask_root, name, reviewer)
        if name not in patients:
            skipped.skip(name, "no CT series", f"{mask_root / name} has no patient folder in {ct_root}")
        elif not mask_path.is_file():
            skipped.skip(name, "no mask", f"{mask_path} not found")
        else:
            cases.append({"case": name, "patient_dir": patients[name], "mask_path": mask_path})
    return cases


def plethora_mask(mask_root: Path, patient: str, reviewer: str) -> Path:
    """Where PleThora keeps the mask of `patient` outlined by `reviewer` ("first" or "second")."""
    return mask_root / patient / f"{patient}_effusion_{reviewer}_reviewer.nii.gz"


def find_ct_series(patient_dir: Path) -> Path:
    """The one folder below `patient_dir` that holds CT images. TCIA nests them in UID-named study and series
    folders, beside the RTSTRUCT (and SEG) series of the same patient, which are left alone."""
    folders = sorted({path.parent for path in patient_dir.rglob("*.dcm")})
    ct_folders = []
    for folder in folders:
        for path in sorted(folder.glob("*.dcm")):
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
            except Exception as err:  # pydicom raises several kinds on a damaged or non-DICOM file
                raise Unusable("unreadable DICOM", f"{path}: {err}") from err
            if header.get("Modality") == "CT":
                ct_folders.append(folder)
                break
    if not ct_folders:
        raise Unusable("no CT series", f"no folder of CT DICOM files below {patient_dir}")
    if len(ct_folders) > 1:
        names = ", ".join(str(f.relative_to(patient_dir)) for f in ct_folders)
        raise Unusable("several CT series", f"{len(ct_folders)} below {patient_dir} ({names}): keep one")
    return ct_folders[0]


# HU of the voxels under a mask on its fluid: an effusion is 0-30 HU (transudates 0-20, exudates more, blood up to
# about 70), and scanner noise spreads them by 10-20 HU; its mirror image front to back lies mostly over lung (-850)
# or chest-wall fat (-100). Muscle (40-60 HU) is inside this range too: HU alone cannot tell it from fluid.
FLUID_HU = (-30.0, 70.0)


def load_mask_voxels(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """The NIfTI mask in `path` and its voxels (3D; PleThora stores 0.0 / 1.0 floats). Raises Unusable for a file
    that nibabel cannot read, a mask that is not 3D, or one that marks no voxel."""
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises several kinds on damaged files
        raise Unusable("unreadable mask", f"{path}: {err}") from err
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise Unusable("mask shape mismatch", f"{path.name} has shape {data.shape}, not 3D")
    if not (data > 0.5).any():
        raise Unusable("empty mask", f"{path.name} marks no voxel")
    return img, data


def mask_by_header(img: nib.Nifti1Image, data: np.ndarray, affine: np.ndarray, shape: tuple) -> np.ndarray:
    """The mask placed by its own affine: the orientation transform between the two affines flips (or permutes) its
    axes onto the image's; then the shapes, and the world positions of the corners (to half a voxel), must agree."""
    name = Path(img.get_filename()).name
    ornt = ornt_transform(io_orientation(img.affine), io_orientation(affine))
    aligned = apply_orientation(data, ornt)
    codes = f"{''.join(nib.aff2axcodes(img.affine))} -> {''.join(nib.aff2axcodes(affine))}"
    if aligned.shape != tuple(shape):
        raise Unusable(
            "mask shape mismatch", f"{name} is {aligned.shape} once reoriented ({codes}), the series {shape}"
        )
    aligned_affine = img.affine @ inv_ornt_aff(ornt, data.shape)
    corners = np.array([[i, j, k, 1] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    offset = np.abs((aligned_affine - affine) @ corners.T).max()
    voxel = np.linalg.norm(affine[:3, :3], axis=0).min()
    if offset > voxel / 2:  # half a voxel off: the mask's voxels no longer sit on the image's
        raise Unusable("mask geometry mismatch", f"{name} is {offset:.1f} mm off the series once reoriented")
    return aligned > 0.5


def mask_by_plethora(data: np.ndarray, path: Path, shape: tuple) -> np.ndarray:
    """The mask placed by PleThora's documented voxel order, whatever its header says: RPI (ITK's codes), dcm2niix's
    order of the series, i.e. the series' columns, rows and slices with the rows reversed."""
    if data.shape != tuple(shape):
        raise Unusable("mask shape mismatch", f"{path.name} is {data.shape}, the series {shape}")
    return np.ascontiguousarray(data[:, ::-1, :]) > 0.5


def read_mask(path: Path, affine: np.ndarray, hu: np.ndarray, orientation: str = "auto") -> tuple[np.ndarray, str, str]:
    """The mask in `path` as bool on the grid of the series `hu` (X, Y, Z) and `affine`, placed by its header, by
    PleThora's convention (`mask_by_plethora`), or, with "auto", by the one of the two under which it covers fluid:
    (mask, the placement used, a line saying why, or "" where there is nothing to say).

    PleThora's release note: its masks "use the RPI orientation, but the original DICOM files are oriented using the
    RAI convention", and header-reading viewers misplace them: a header may not describe the voxel order. Placed by a
    wrong one, a mask lands mirrored front to back, over the lung. "auto" takes the placement with the larger share
    of its voxels in FLUID_HU (a share, not a median: a mirror image half on lung and half on muscle has a median
    anywhere between); a mask with less than half its voxels there either way covers no fluid: Unusable."""
    img, data = load_mask_voxels(path)
    if orientation == "header":
        return mask_by_header(img, data, affine, hu.shape), "header", ""
    if orientation == "plethora":
        return mask_by_plethora(data, path, hu.shape), "plethora", ""
    if orientation != "auto":
        raise ValueError(f'mask_orientation must be "auto", "header" or "plethora", not {orientation!r}')
    placements, errors = {}, {}
    for name, place in (("header", lambda: mask_by_header(img, data, affine, hu.shape)),
                        ("plethora", lambda: mask_by_plethora(data, path, hu.shape))):  # fmt: skip
        try:
            placements[name] = place()
        except Unusable as err:
            errors[name] = err
    if not placements:
        raise errors["header"]  # its reasons name the orientations and the positions
    share = {name: float(np.mean((hu[mask] >= FLUID_HU[0]) & (hu[mask] <= FLUID_HU[1]))) for name, mask in
             placements.items()}  # fmt: skip
    said = {"header": "its header", "plethora": "PleThora's RPI convention (rows reversed)"}
    where = f"voxels at {FLUID_HU[0]:.0f} to {FLUID_HU[1]:.0f} HU: " + ", ".join(
        f"{share[n]:.0%} placed by {said[n]}" for n in placements
    )
    used = max(placements, key=lambda n: (share[n], n == "header"))  # a tie: the header, as any reader would
    if share[used] < 0.5:
        raise Unusable("mask not on fluid", f"{path.name}: {where} (lung is -850, an effusion 0-30)")
    if len(placements) == 2 and np.array_equal(*placements.values()):
        return placements[used], used, ""  # header and convention agree: nothing to say
    why = "; ".join(f"{said[n]}: {err.detail}" for n, err in errors.items()) or where
    return placements[used], used, f"mask placed by {said[used]}, the one on fluid ({why})"


def read_case(case: dict, orientation: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(HU (X, Y, Z), RAS affine, effusion mask bool (X, Y, Z), the mask's placement used) of a case found by
    `find_cases`; `orientation` as `read_mask`'s. Where header and convention differ, one line says which was used."""
    hu, affine = read_dicom_series(find_ct_series(case["patient_dir"]))
    mask, used, why = read_mask(case["mask_path"], affine, hu, orientation)
    if why:
        print(f"{case['case']}: {why}")
    return hu, affine, mask, used


def window_hu(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """HU -> 0..1 through the window (low, high), clipped; denser is brighter.

    Pleural fluid is 0-30 HU (transudates 0-20, exudates and blood more), between fat (-100) and the muscle of
    the chest wall and diaphragm (40-60) it lies against; the lung around it is -850, bone 400 and more. The soft-
    tissue (mediastinal) window, W 400 L 40 (-160..240 HU), is the one radiologists read effusions in: it keeps
    fat, fluid and muscle apart in the middle of 0..1, clips lung and air to 0 (the fluid's edge against the lung
    stays sharp) and bone to 1.
    """
    low, high = window
    return np.clip((hu - low) / (high - low), 0, 1)


def prepare_volume(hu: np.ndarray, factor: int, body_threshold_hu: float, margin: int, window) -> dict:
    """`preprocess` in NumPy (what the disk cache's forked workers run, torch's threads do not survive a fork):
    the same result as NumPy arrays, "crop" and "grid_shape" as tuples."""
    gx, gy, gz = hu.shape[0] // factor, hu.shape[1] // factor, hu.shape[2]  # leftover columns or rows dropped
    blocks = hu[: gx * factor, : gy * factor].reshape(gx, factor, gy, factor, gz)
    small = blocks.mean(axis=(1, 3), dtype=np.float32)  # (X // f, Y // f, Z)
    body = small > body_threshold_hu  # on the HU, before windowing: the lungs are inside the body's box
    crop = []
    for axis in range(3):
        present = np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))
        low, high = (present[0], present[-1] + 1) if present.size else (0, small.shape[axis])
        crop += [max(int(low) - margin, 0), min(int(high) + margin, small.shape[axis])]
    x0, x1, y0, y1, z0, z1 = crop
    image = window_hu(small[x0:x1, y0:y1, z0:z1], window)
    return {"image": image[None].astype(np.float16), "crop": tuple(crop), "grid_shape": tuple(small.shape)}


def preprocess(hu: np.ndarray, cfg: Config) -> dict:
    """The network's input of an HU volume (X, Y, Z), and the geometry to map a prediction back.

    In-plane block mean by `in_plane_factor` (a 2x2 mean is also the antialiasing filter), then the box around
    the body (plus a margin), windowed: {"image" (1, x, y, z) float16 in 0..1, "crop" (x0, x1, y0, y1, z0, z1) on
    the downsampled grid, "grid_shape" of that grid}. float16 halves the cache: 0.0005 steps, 0.2 HU.
    """
    prep = prepare_volume(hu, cfg.in_plane_factor, cfg.body_threshold_hu, cfg.crop_margin, cfg.hu_window)
    return prep | {"image": torch.from_numpy(prep["image"])}


def block_mask(mask: np.ndarray, geometry: dict, factor: int) -> np.ndarray:
    """`downsample_mask` in NumPy, (1, x, y, z) uint8 (what the disk cache's workers run)."""
    f, (gx, gy, gz) = factor, geometry["grid_shape"]
    x0, x1, y0, y1, z0, z1 = geometry["crop"]
    blocks = mask[: gx * f, : gy * f].reshape(gx, f, gy, f, gz)  # leftover columns or rows dropped, as the image's
    small = 2 * blocks.sum(axis=(1, 3), dtype=np.int32) > f * f  # share of fluid > 0.5, in integers: no rounding
    return np.ascontiguousarray(small[x0:x1, y0:y1, z0:z1])[None].astype(np.uint8)


def downsample_mask(mask: np.ndarray, geometry: dict, cfg: Config) -> torch.Tensor:
    """The mask (X, Y, Z) on the network's grid of `geometry` (`preprocess`'s crop and grid_shape), (1, x, y, z)
    uint8: fluid where more than half of the f x f block is.

    The same blocks as the image's mean, so a label voxel sits where its image voxel does, at the block's centre
    (taking one voxel of each block would put the labels half an original voxel off, 0.4 mm at 0.8 mm pixels).
    A 2x2 block half fluid (a tie) is background: counted as fluid, every edge of the effusion grows by half a
    block, and the predictions put back at full resolution with it (quick run, measured: full-resolution Dice 0.786
    and 64 / 45 mL predicted for 44 / 30 mL, against 0.860 and 52 / 33 mL with ties as background).
    """
    return torch.from_numpy(block_mask(mask, geometry, cfg.in_plane_factor))


def to_original_grid(prob: torch.Tensor, geometry: dict, shape: tuple[int, int, int], cfg: Config) -> torch.Tensor:
    """A probability volume on the network's grid (x, y, z) back on the series' grid `shape`: 0 outside the body
    crop, upsampled in-plane by linear interpolation on the block centres, where the block mean put them: with
    align_corners=False, grid voxel i sits at series voxel f * i + (f - 1) / 2, the centre of its block."""
    f, (gx, gy, gz) = cfg.in_plane_factor, geometry["grid_shape"]
    x0, x1, y0, y1, z0, z1 = geometry["crop"]
    grid = torch.zeros(1, 1, gx, gy, gz)
    grid[0, 0, x0:x1, y0:y1, z0:z1] = prob.float().cpu()
    if f > 1:
        grid = F.interpolate(grid, size=(gx * f, gy * f, gz), mode="trilinear", align_corners=False)
    # Columns or rows left over when a side does not divide by f: the nearest computed ones are repeated.
    grid = F.pad(grid, (0, 0, 0, shape[1] - gy * f, 0, shape[0] - gx * f), mode="replicate")
    return grid[0, 0]


# What the preparation of a case depends on besides its files and the Config fields of `preparation`: in the cache's
# key, so that a change of the code below is a new entry, never a stale one read back.
PREPARATION = {"block mean": "NumPy float32", "mask": "2x2 majority, ties background", "version": 1}
PREPARED = ("image", "label", "crop", "grid_shape", "placement", "note")  # the arrays of a cache entry


def preparation(cfg: Config) -> dict:
    """The Config fields a case's preparation depends on (the cache's key has them): plain values, so that the
    forked workers of the disk cache get them without the Config."""
    return {"in_plane_factor": cfg.in_plane_factor, "body_threshold_hu": cfg.body_threshold_hu,
            "crop_margin": cfg.crop_margin, "hu_window": tuple(cfg.hu_window),
            "mask_orientation": cfg.mask_orientation}  # fmt: skip


def prepare_case(job: tuple[dict, dict]) -> dict[str, np.ndarray]:
    """The deterministic part of a case's preparation, what the disk cache keeps: (case, `preparation`) -> {"image"
    (1, x, y, z) float16 and "label" uint8 on the network's grid, the "crop" and "grid_shape" to map a prediction
    back, the mask's "placement" used and the "note" read_case would print}. The series is read with pydicom, the
    mask placed as `read_mask` does (so it runs in a forked worker: NumPy, no torch). Raises Unusable."""
    case, settings = job
    hu, affine = read_dicom_series(find_ct_series(case["patient_dir"]))
    mask, used, why = read_mask(case["mask_path"], affine, hu, settings["mask_orientation"])
    factor = settings["in_plane_factor"]
    prep = prepare_volume(hu, factor, settings["body_threshold_hu"], settings["crop_margin"], settings["hu_window"])
    return {"image": prep["image"], "label": block_mask(mask, prep, factor), "crop": np.array(prep["crop"]),
            "grid_shape": np.array(prep["grid_shape"]), "placement": np.array(used), "note": np.array(why)}  # fmt: skip


def load_cases(cases: list[dict], cfg: Config, skipped: Skipped) -> list[dict]:
    """Read and prepare every case once (`prepare_case`), kept in memory (about 15 MB per real case); bad inputs
    are named, skipped and counted. Each item is the case's dict plus "image" and "label" on the network's grid.

    With `cache` (the default), each case's preparation is also kept on disk, in
    <data_dir>/cache/pleural_effusion_3d/ (or `cache_dir`), keyed by the settings of `preparation` and the path,
    size and modification time of every file of the patient's folder and of the mask: the next run reads it back
    (reading a real series takes seconds), and a changed setting or file prepares its cases again, alone. The first
    run prepares the cases on every core; under torchrun process 0 does, and the others read its entries.
    """
    jobs = [(case, preparation(cfg)) for case in cases]
    if cfg.cache:
        folder = cfg.cache_dir or Path(cfg.data_dir) / "cache" / "pleural_effusion_3d"
        cache = DiskCache(folder, preparation(cfg) | PREPARATION, PREPARED)
        with distributed.main_first():  # under torchrun process 0 reads the series into the cache, the others then
            # read its entries
            done = prepare_cached(jobs, lambda job: [job[0]["patient_dir"], job[0]["mask_path"]], prepare_case, cache,
                                  skipped, desc="reading CT series", name_of=lambda job: job[0]["case"])  # fmt: skip
        print(f"Disk cache {cache.folder}: {cache.read} cases read back, {cache.built} read and prepared")
    else:
        done = []
        for job in tqdm(jobs, desc="reading CT series", leave=False, disable=None):
            try:
                done.append((job, prepare_case(job)))
            except Unusable as err:
                skipped.skip(job[0]["case"], err)
    items = []
    for (case, _), arrays in done:
        if str(arrays["note"]):  # where header and convention differ, one line says which placement was used
            print(f"{case['case']}: {arrays['note']}")
        # The mask's placement is kept: evaluate_best reads the case again the same way, without a second line.
        items.append({**case, "mask_orientation": str(arrays["placement"]),
                      "image": torch.from_numpy(np.array(arrays["image"])),  # read from the cache into memory
                      "label": torch.from_numpy(np.array(arrays["label"]))})  # fmt: skip
    return items


def split_by_case(items: list[dict], cfg: Config) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test) cases, drawn by data_cleaning.split_groups with `split_seed`: the test cases first
    (they stay when val_fraction or seed change), at least one on each side asked for, in the order of `items`.

    A case is one patient's scan, so no patient is on two sides; seeded, so that a run can be repeated."""
    sides = split_groups([item["case"] for item in items], cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    return tuple([item for item in items if item["case"] in side] for side in sides)


def load_data(cfg: Config) -> Data:
    """The cases of the download (or of the sample) that have a CT series and a mask, each read and preprocessed
    once (kept on disk for the next run, `load_cases`) and kept in memory, bad ones named, skipped and counted
    (skipped_cases.csv), split by case."""
    with distributed.main_first():  # process 0 writes the synthetic sample if missing, the others then read it
        root, synthetic = find_dataset("pleural_effusion", cfg.data_dir)
    # A full NSCLC-Radiomics download has 422 patients, of whom PleThora outlined 78: the other 344 are "no mask".
    # So only the first 10 of each kind are printed; all are kept in skipped_cases.csv.
    skipped = Skipped("case", print_limit=10)
    cases = find_cases(root, cfg.reviewer, skipped)
    if cfg.max_cases is not None and len(cases) > cfg.max_cases:
        print(f"Using the first {cfg.max_cases} of {len(cases)} cases with a mask (max_cases)")
        cases = cases[: cfg.max_cases]
    items = load_cases(cases, cfg, skipped)
    print(skipped.summary(f"{root}: {len(items)} cases usable"))
    if distributed.is_main():  # under torchrun every process read the same cases: one writes
        table = pd.DataFrame(skipped.rows, columns=["case", "problem", "detail"])
        make_folder(cfg.output_dir)  # a file in its place: one Output problem line
        save_atomically(cfg.output_dir / "skipped_cases.csv", lambda path: table.to_csv(path, index=False))
    needed = 1 + (cfg.val_fraction > 0) + (cfg.test_fraction > 0)  # a case for each side asked for
    if len(items) < needed:
        raise DatasetError(f"{len(items)} usable case(s) in {root}: need {needed} at least (training, validation, "
                           "test), each a CT series with its PleThora mask")  # fmt: skip
    train, val, test = split_by_case(items, cfg)
    shapes = ", ".join(f"{i['case']} {tuple(i['image'].shape[1:])}" for i in items[:3])
    more = ", ..." if len(items) > 3 else ""
    print(f"Split by case (split_seed {cfg.split_seed}): {len(train)} train, {len(val)} validation "
          f"({', '.join(i['case'] for i in val)}), {len(test)} test ({', '.join(i['case'] for i in test)}); "
          f"network grid (x, y, z) {shapes}{more}")  # fmt: skip
    return Data(root, synthetic, train, val, test, unit="cases", skipped=skipped)


if __name__ == "__main__":
    data = load_data(cfg)
    print(data)

# %% Transforms
# The volumes are cached on the network's grid, so the transforms only crop and augment. Crops: half centred on a
# fluid voxel, half on any other voxel (the original's pos/neg crops): effusions fill about 1% of a chest CT, and
# uniform crops would mostly show none. Flips left-right only (`flip_axes`), where the original flipped every axis
# and turned in-plane: a supine patient's fluid settles at the back of the chest, on either side, so a mirrored left
# and right is a plausible chest, while a front-back or head-foot flip, or a quarter turn, shows fluid where gravity
# never puts it and teaches the network to look for it there.


def build_transforms(cfg: Config) -> Compose:
    """The training crops and their augmentation, seeded; plain tensors out."""
    keys = ["image", "label"]
    if cfg.rot90_prob > 0 and cfg.roi_size[0] != cfg.roi_size[1]:
        raise ValueError(f"rot90_prob > 0 needs a square in-plane roi_size, not {cfg.roi_size}")
    pos, neg = cfg.pos_neg_ratio
    transforms = Compose(
        [
            SpatialPadd(keys, spatial_size=cfg.roi_size),  # a body smaller than a crop: padded with 0, as air
            RandCropByPosNegLabeld(
                keys, label_key="label", spatial_size=cfg.roi_size, pos=pos, neg=neg, num_samples=cfg.samples_per_volume
            ),
            *(RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=axis) for axis in cfg.flip_axes),  # 0 x, 1 y, 2 z
            RandRotate90d(keys, prob=cfg.rot90_prob, max_k=3, spatial_axes=(0, 1)),
            EnsureTyped(keys, track_meta=False),  # plain tensors: no MONAI metadata to collate
        ]
    )
    return transforms.set_random_state(seed=cfg.seed + distributed.rank())  # each process crops its own way


def build_train_loader(cfg: Config, data: Data) -> DataLoader:
    """The training loader: `batch_size` cases per step, each giving `samples_per_volume` crops.

    Under torchrun each process trains on its own shard of the cases, reshuffled every epoch, with batch_size cases
    per process and step; in one process there is no sampler and the loader shuffles."""
    train_ds = Dataset(
        [{"image": i["image"], "label": i["label"]} for i in data.train], transform=build_transforms(cfg)
    )
    sampler = distributed.train_sampler(train_ds, cfg.seed)
    shard_size = len(sampler) if sampler is not None else len(train_ds)
    return DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=shard_size > cfg.batch_size,  # no tiny last batch, unless there is only one batch
        generator=torch.Generator().manual_seed(cfg.seed),
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,  # do not restart the workers every epoch
        pin_memory=DEVICE.type == "cuda",
    )


def draw_batch(batch: dict, n: int = 6) -> Figure:
    """The middle axial slice of the first crops of a training batch, as the network gets them (cropped, flipped,
    turned, windowed to 0..1; rows down), the fluid outlined in green. A crop centred on fluid has it in its middle
    slice; the others mostly show none."""
    n = min(n, len(batch["image"]))
    middle = batch["image"].shape[-1] // 2
    fig = Figure(figsize=(2.4 * n, 2.6), dpi=100)
    for i in range(n):
        image, label = batch["image"][i, 0, :, :, middle].float(), batch["label"][i, 0, :, :, middle]
        ax = fig.add_subplot(1, n, i + 1)
        ax.imshow(image.T.numpy(), cmap="gray", vmin=0, vmax=1)
        if label.any():
            ax.contour(label.T.float().numpy(), levels=[0.5], colors="lime", linewidths=1)
        ax.set_title(f"crop {i}: {batch['label'][i].float().mean().item():.1%} fluid", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"A training batch: image {tuple(batch['image'].shape)} {batch['image'].dtype}, slice {middle} of "
                 "each crop", fontsize=10)  # fmt: skip
    return fig


if __name__ == "__main__":
    train_loader = build_train_loader(cfg, data)
    batch = first(train_loader)  # {"image": (B x samples, 1, x, y, z) float16 in 0..1, "label": same shape, uint8}
    show(save_figure(draw_batch(batch), cfg.output_dir / "batch.png"))

# %% Model and loss


def build_model(cfg: Config) -> UNet:
    """MONAI's UNet in 3D with residual units (Kerfoot et al., STACOM 2018, https://doi.org/10.1007/978-3-030-12029-
    0_40), after Ronneberger et al. (MICCAI 2015) and Cicek et al. (3D U-Net, MICCAI 2016): one input channel (the
    windowed CT), one output channel (the effusion's logit per voxel)."""
    seed_everything(cfg.seed)  # the same initial weights for the same seed, in every process
    model = UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=cfg.channels,
        strides=cfg.strides,
        num_res_units=cfg.num_res_units,
    )
    # Start from the prior, as RetinaNet does (Lin et al., ICCV 2017): from logit 0 every voxel is fluid at 0.5,
    # and the first hundred steps only learn that most voxels are not.
    output_layer = [m for m in model.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))][-1]
    torch.nn.init.constant_(output_layer.bias, cfg.initial_logit)
    return model


class DiceBCELoss(torch.nn.Module):
    """(1 - bce_weight) x soft Dice (dice.py, over the whole batch) + bce_weight x BCE with logits (pos_weight).

    Dice over the batch, not per crop: the negative crops hold no fluid, and per crop each would add a loss of
    about 1 whatever the prediction. BCE gives every voxel a gradient from the start, where Dice alone is flat;
    it is the mean over all voxels, and pos_weight multiplies the fluid voxels' term: with 3 (the original's
    value), a fluid voxel called background costs three times a background voxel called fluid with the same
    confidence. Fluid is rare even in the positive crops, and unweighted BCE trades it away for the background.
    """

    def __init__(self, bce_weight: float = 0.5, pos_weight: float = 3.0):
        super().__init__()
        if not 0 <= bce_weight <= 1:
            raise ValueError(f"bce_weight must be in [0, 1], not {bce_weight}")
        self.bce_weight = bce_weight
        self.register_buffer("pos_weight", torch.tensor(pos_weight))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits, target = logits.float(), target.float()  # both terms sum over whole volumes: float32 under AMP
        dice = soft_dice_loss(logits, target, batch=True)
        bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=self.pos_weight)
        return (1 - self.bce_weight) * dice + self.bce_weight * bce


if __name__ == "__main__":
    model = build_model(cfg)
    print(f"MONAI UNet 3D {cfg.channels}: {sum(p.numel() for p in model.parameters()):,} parameters")

# %% Train


def train_one_epoch(model, loader, loss_fn, optimizer, scaler, cfg: Config, epoch: int) -> float:
    """One pass over the training cases (`samples_per_volume` crops each); returns the mean loss per crop.

    Stops with a clear error naming the epoch and batch if the loss is not finite.
    """
    model.train()
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, disable=None)
    losses = EpochLoss(epoch, cfg.lr, bar)  # read one step late: the GPU never waits for the CPU to read a loss
    for step, batch in enumerate(bar):
        img = batch["image"].to(DEVICE, non_blocking=True).float()  # (B x samples, 1, x, y, z)
        seg = batch["label"].to(DEVICE, non_blocking=True).float()
        with autocast(DEVICE, cfg.amp):
            loss = loss_fn(model(img), seg)
        # Under torchrun, the mean over the processes: all stop at the same step (one stopping alone would leave
        # the others waiting for it), and the history's loss is that of every crop trained on. In one process,
        # the loss itself. A loss that is not finite stops training (FloatingPointError, naming epoch and batch).
        losses.add(step, distributed.average(loss.detach()), len(img))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # under torchrun, DDP averages the gradients of all processes here
        scaler.step(optimizer)
        scaler.update()
    return losses.mean()


@torch.no_grad()
def predict_logits(model, image: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Logits (x, y, z) of a whole cached volume (1, x, y, z): windows of `roi_size` overlapping by `sw_overlap`,
    blended with gaussian weights (the centre of a window, which saw the most context, counts most)."""
    model.eval()

    def predictor(window: torch.Tensor) -> torch.Tensor:
        with autocast(DEVICE, cfg.amp):
            return model(window).float()  # blended in float32

    logits = sliding_window_inference(
        image[None].to(DEVICE).float(), cfg.roi_size, cfg.sw_batch_size, predictor, overlap=cfg.sw_overlap,
        mode="gaussian",
    )  # fmt: skip
    return logits[0, 0]


def evaluate(model, items: list[dict], loss_fn, cfg: Config) -> dict:
    """The validation row: loss and Dice on the network's grid, over whole volumes: the mean of the cases' Dice (as
    the original's 0.628 over 2 volumes, and as nnU-Net reports its results) and the global Dice (all voxels at once,
    as nnU-Net's online "pseudo Dice" during training).

    Under torchrun each process predicts its share of the cases, and the scores of all are gathered: every process
    returns the same numbers, those of all `items`."""
    dice = DiceAccumulator(empty="one")  # a case without fluid scores 1 if none is predicted (PleThora's all have)
    losses = []
    for item in tqdm(distributed.shard(items), desc="validation", leave=False, disable=None):
        logits = predict_logits(model, item["image"], cfg)
        seg = item["label"][0].to(DEVICE)
        losses.append(loss_fn(logits[None, None], seg[None, None]).item())
        dice.update((torch.sigmoid(logits) > cfg.threshold)[None], seg.bool()[None])
    losses = [loss for part in distributed.gather(losses) for loss in part]  # every process's cases
    dice = distributed.gather_dice(dice)
    return {"val_loss": float(np.mean(losses)), "val_dice": dice.mean(), "val_global_dice": dice.global_dice()}


def poly_decay(cfg: Config):
    """nnU-Net's poly decay, as the factor of `lr` once `done` epochs are done: 0 after the last one.

    A function of the epoch, not PolynomialLR: that one keeps its length in its state, so a finished run resumed
    with a larger max_epochs would go on at lr 0."""
    return lambda done: max(1 - done / cfg.max_epochs, 0.0) ** cfg.lr_power


def fit(cfg: Config, data: Data, model: torch.nn.Module) -> History:
    """Train `model` on random crops of the training cases, validate every `val_interval` epochs and at the last,
    keep the best epoch by validation Dice (output_dir/best_model.pt). Returns the history, one row per epoch
    (history.csv); the epochs not validated have no val_* values."""
    torch.backends.cudnn.benchmark = DEVICE.type == "cuda"  # fixed crop size: let cuDNN pick its fastest kernels
    train_loader = build_train_loader(cfg, data)
    model.to(DEVICE)
    train_model = distributed.wrap(model)  # DDP under torchrun (gradients averaged); `model` is what is saved
    loss_fn = DiceBCELoss(cfg.bce_weight, cfg.pos_weight).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_decay(cfg))
    scaler = grad_scaler(DEVICE, cfg.amp)  # float16 only: none with bfloat16 or on the CPU (precision.py)
    print(f"Training on {DEVICE.type}: {len(data.train)} cases, {len(train_loader)} steps per epoch")
    title = "Pleural effusion: validation Dice per epoch"
    parts = dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)  # what last_checkpoint holds
    with TrainingRun(cfg, "val_dice", title=title, **parts) as run:  # resumed: the decay of this run's max_epochs
        for epoch in run.epochs(train_loader):
            train_loss = train_one_epoch(train_model, train_loader, loss_fn, optimizer, scaler, cfg, epoch)
            scheduler.step()
            validate = epoch % cfg.val_interval == 0 or epoch == cfg.max_epochs
            run.end_epoch(train_loss=train_loss, **(evaluate(model, data.val, loss_fn, cfg) if validate else {}))
    return run.history


if __name__ == "__main__":
    history = fit(cfg, data, model)
    show(cfg.output_dir / "dice_per_epoch.png")
    end_if_stopped(history)  # Ctrl-C or a loss that was not finite: said why; the cells below do not run

# %% Evaluate


def predict_case(model, hu: np.ndarray, cfg: Config) -> np.ndarray:
    """The effusion mask (bool, X, Y, Z) of an HU volume read by `read_dicom_series`, on the series' own grid."""
    prep = preprocess(hu, cfg)
    prob = torch.sigmoid(predict_logits(model, prep["image"], cfg))
    return (to_original_grid(prob, prep, hu.shape, cfg) > cfg.threshold).numpy()


def score_case(case: str, pred: np.ndarray, truth: np.ndarray, affine: np.ndarray) -> dict:
    """A row of val_per_case.csv or test_per_case.csv: the Dice at the series' full resolution, against the PleThora
    mask as read, and the effusion's volume, true and predicted."""
    dice = DiceAccumulator(empty="one")
    dice.update(torch.from_numpy(pred)[None], torch.from_numpy(truth)[None])
    ml = abs(np.linalg.det(affine[:3, :3])) / 1000  # mL per voxel
    return {"case": case, "dice": dice.mean(), "true_ml": truth.sum() * ml, "predicted_ml": pred.sum() * ml,
            "shape": "x".join(map(str, pred.shape))}  # fmt: skip


def score_cases(model, items: list[dict], cfg: Config, masks_dir: Path | None = None) -> tuple[pd.DataFrame, list]:
    """(per_case, views): every case of `items` read again at full resolution, predicted and scored (`score_case`),
    and its slice with most fluid for the figure; each prediction written as NIfTI in the series' geometry into
    `masks_dir` if given."""
    rows, views = [], []
    for item in tqdm(items, desc="predicting cases", leave=False, disable=None):
        hu, affine, truth, _ = read_case(item, item["mask_orientation"])
        pred = predict_case(model, hu, cfg)
        if masks_dir is not None:
            save_mask_nifti(masks_dir / f"{item['case']}_effusion_predicted.nii.gz", pred, affine)
        rows.append(score_case(item["case"], pred, truth, affine))
        k = int(truth.sum(axis=(0, 1)).argmax())  # the slice with most fluid
        views.append({"case": item["case"], "hu": hu[:, :, k], "truth": truth[:, :, k], "pred": pred[:, :, k],
                      "slice": k, "dice": rows[-1]["dice"]})  # fmt: skip
    return pd.DataFrame(rows), views


def evaluate_best(cfg: Config, data: Data) -> pd.DataFrame | None:
    """The best epoch's weights, read back from best_model.pt, on every validation case read again at full
    resolution: the prediction written as NIfTI in the series' geometry (val_predictions/), its Dice and volumes
    (val_per_case.csv), the slices with most fluid (val_predictions.png). Then, once, on the held-out test cases:
    their Dice and volumes (test_per_case.csv), the result, with a 95% bootstrap interval over cases.

    Returns the test cases' rows (the validation cases' when test_fraction is 0), `attrs["scored"]` saying which,
    for the Summary. Process 0 only (None in the others)."""
    if not distributed.is_main():
        return None
    model, checkpoint = load_best(cfg, build_model, DEVICE)
    val_per_case, views = score_cases(model, data.val, cfg, cfg.output_dir / "val_predictions")
    save_atomically(cfg.output_dir / "val_per_case.csv", lambda path: val_per_case.to_csv(path, index=False))
    title = "Validation: PleThora (green) and predicted (red) effusion"
    save_figure(draw_predictions(views[:3], cfg, title), cfg.output_dir / "val_predictions.png")
    on_grid = f"{checkpoint['metric']:.4f} on the network's grid"
    print(f"Best epoch {checkpoint['epoch']}: validation Dice {val_per_case['dice'].mean():.4f} at the series' full "
          f"resolution (mean over {len(val_per_case)} cases; {on_grid}): it chose the epoch, so it is "
          "optimistic")  # fmt: skip
    if not data.test:
        print("No test set (test_fraction 0): the only score is validation's, which chose the model: optimistic")
        val_per_case.attrs = {"scored": "validation"}
        return val_per_case
    # The test cases, scored once with the weights validation chose and nothing else tuned on them.
    per_case, _ = score_cases(model, data.test, cfg)
    save_atomically(cfg.output_dir / "test_per_case.csv", lambda path: per_case.to_csv(path, index=False))
    print(f"Test Dice {describe_ci(per_case['dice'], unit='cases')} per case at the series' full resolution: "
          "the result")  # fmt: skip
    per_case.attrs = {"scored": "test"}
    return per_case


def draw_predictions(views: list[dict], cfg: Config, title: str = "") -> Figure:
    """One axial slice per case (the one with most fluid), in the soft-tissue window, with the true (green) and
    predicted (red) outlines. `views[i]`: {"case", "hu", "truth", "pred" (X, Y) at full resolution, "slice", "dice"}.
    Shown as the scanner shows it, rows down and columns across (patient's right on the left for these series),
    zoomed on the body."""
    fig = Figure(figsize=(4 * len(views), 4), dpi=100)
    for i, view in enumerate(views):
        ax = fig.add_subplot(1, len(views), i + 1)
        ax.imshow(view["hu"].T, cmap="gray", vmin=cfg.hu_window[0], vmax=cfg.hu_window[1])
        for mask, color in ((view["truth"], "lime"), (view["pred"], "red")):
            if mask.any():
                ax.contour(mask.T.astype(np.float32), levels=[0.5], colors=color, linewidths=1.2)
        columns, rows = np.nonzero(view["hu"] > cfg.body_threshold_hu)
        if columns.size:
            ax.set_xlim(columns.min() - 5, columns.max() + 5)
            ax.set_ylim(rows.max() + 5, rows.min() - 5)  # rows down
        ax.set_title(f"{view['case']}, slice {view['slice']}: 3D Dice {view['dice']:.3f}", fontsize=9)
        ax.axis("off")
        if i == 0:
            lines = [Line2D([], [], color=c, label=label) for c, label in (("lime", "PleThora"), ("red", "predicted"))]
            ax.legend(handles=lines, loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


if __name__ == "__main__":
    per_case = evaluate_best(cfg, data)
    show(per_case)
    show(cfg.output_dir / "val_predictions.png")

# %% Predict
# The trained network on CTs nobody outlined: NIfTI files, or folders each holding one DICOM series (any slice order
# or file names), prepared with the settings saved in best_model.pt. Writes predictions/<name>_effusion.nii.gz on
# each input's own voxel grid and predictions/predictions.csv (the effusion's volume per CT); the inputs are only read.
# Needs only the Imports and Configuration cells and a best_model.pt: the window, halving, crop and threshold are the
# checkpoint's.
if not {"find_cases", "find_ct_series", "split_by_case", "build_model", "predict_case"} <= globals().keys():
    # A fresh kernel that ran only Imports and Configuration: what prediction shares with training (the Data cell's
    # reading and preprocessing, the network, the Evaluate cell's prediction on the series' grid) is imported from
    # this file, whose guards do not run.
    from pleural_effusion_3d import (
        CT_DIR,
        MASK_DIR,
        build_model,
        find_cases,
        find_ct_series,
        plethora_mask,
        predict_case,
        split_by_case,
    )

# The orientation the network learnt in: read_dicom_series gives an axial series with x to the patient's left, y to
# the back and z up (nibabel's codes "LPS"). Its augmentation flips only left and right (flip_axes): every crop showed
# the fluid where gravity puts it, at the back of the chest (larger y), in this voxel order. So a NIfTI stored in
# another order (RAS, or dcm2niix's) is turned into this one for the network, and its mask turned back onto the
# input's own grid, voxel for voxel.
TRAINED_AXES = ("L", "P", "S")


def default_inputs(cfg: Config, checkpoint: dict, skipped: Skipped) -> list[Path]:
    """The CT series to predict when none are given: the download's patients without a PleThora mask, the scans no one
    outlined, which a model like this is for. In the synthetic sample every patient has a mask: then the test
    patients of the checkpoint's own seeded split (validation's if it had none), which it never trained on. A patient
    without a usable CT series is skipped."""
    root = find_dataset("pleural_effusion", cfg.data_dir, say=False).root  # as load_data finds it (and says)
    if not (root / CT_DIR).is_dir():
        raise DatasetError(f"{root / CT_DIR} not found: no CT to predict by default (give predict_inputs)")
    trained = Config.from_dict(checkpoint["config"])  # the reviewer, max_cases, fractions, split_seed it trained on
    patients = sorted(p for p in (root / CT_DIR).iterdir() if p.is_dir())
    chosen = [p for p in patients if not plethora_mask(root / MASK_DIR, p.name, trained.reviewer).is_file()]
    if chosen:
        print(f"Predicting the {len(chosen)} patients of {root / CT_DIR} without a PleThora mask")
    else:
        cases = find_cases(root, trained.reviewer, skipped)[: trained.max_cases]
        _, val, test = split_by_case(cases, trained)
        chosen = [case["patient_dir"] for case in test or val]
        print(f"Every patient of {root} has a PleThora mask (as in the synthetic sample): predicting the {len(chosen)} "
              f"{'test' if test else 'validation'} patients of the trained model's split (split_seed "
              f"{trained.split_seed}): {', '.join(p.name for p in chosen)}")  # fmt: skip
    series = []
    for patient_dir in chosen:
        try:
            series.append(find_ct_series(patient_dir))
        except Unusable as err:
            skipped.skip(patient_dir, err)
    return series


def predict_volume(model, img: nib.Nifti1Image, trained: Config) -> np.ndarray:
    """The effusion mask (uint8) of a CT on its own voxel grid: its voxels turned into TRAINED_AXES, predicted as the
    validation series are (`predict_case`), and the mask turned back, voxel for voxel. Raises Unusable for a volume
    that is no CT in Hounsfield units (no air, or nothing denser)."""
    ornt = io_orientation(img.affine)
    hu = apply_orientation(img.get_fdata(dtype=np.float32), ornt_transform(ornt, axcodes2ornt(TRAINED_AXES)))
    body = hu > trained.body_threshold_hu
    if body.all() or not body.any():  # a chest CT has air around the body, at -1000 HU
        where = f"not air and body either side of {trained.body_threshold_hu:.0f} HU"
        raise Unusable("not a CT in HU", f"values {hu.min():.0f} to {hu.max():.0f}, {where} (a mask? a CT unrescaled?)")
    pred = predict_case(model, np.ascontiguousarray(hu), trained)
    return apply_orientation(pred, ornt_transform(axcodes2ornt(TRAINED_AXES), ornt)).astype(np.uint8)


def output_name(path: Path) -> str:
    """The mask's file name for input `path`: a NIfTI's own name, a series folder's patient (its PatientID, else the
    folder's name), plus "_effusion.nii.gz"."""
    stem = mask_name(path, "")
    if path.is_dir():
        first = next(p for p in sorted(path.iterdir()) if is_dicom(p))  # the series was read: there is one
        patient = str(pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["PatientID"]).get("PatientID", ""))
        stem = re.sub(r"[^\w.-]+", "_", patient).strip("_.") or stem  # a file name, whatever the ID holds
    return f"{stem}_effusion.nii.gz"


def predict(cfg: Config, inputs=None) -> list[Path]:
    """The effusion masks of `inputs` (a NIfTI CT, a folder holding one DICOM series, a folder of such, or a list of
    these; None: `default_inputs`), each on its input's own grid (shape and affine), under output_dir/predictions/,
    and predictions.csv: input, mask, effusion_ml, voxels, shape. The weights of cfg.checkpoint (default:
    output_dir/best_model.pt), with the settings they were trained with. Returns the files written (none when no
    input could be predicted); an unusable input is named, skipped and counted. Process 0 only."""
    if not distributed.is_main():
        return []
    model, trained, checkpoint = load_trained(cfg, build_model, DEVICE)
    skipped = Skipped("file", print_limit=10)
    paths = default_inputs(cfg, checkpoint, skipped) if inputs is None else ct_inputs(inputs)
    out_dir = cfg.output_dir / "predictions"

    def segment(img: nib.Nifti1Image, path: Path) -> np.ndarray:  # what the 3D scripts differ in
        return predict_volume(model, img, trained)

    rows = segment_cts(paths, segment, output_name, out_dir, "effusion_ml", skipped)
    print(skipped.summary(f"Predicted {len(rows)} of {len(paths)} CTs into {out_dir} (masks, predictions.csv)"))
    return [out_dir / row["mask"] for row in rows] + [out_dir / "predictions.csv"] if rows else []


if __name__ == "__main__":
    predictions = predict(cfg, cfg.predict_inputs)
    if predictions:  # the volumes (the inputs' paths are in the CSV too); under torchrun process 0 alone predicts
        show(pd.read_csv(predictions[-1], usecols=["mask", "effusion_ml", "voxels", "shape"]))

# %% Summary


def best_text(history: History, per_case: pd.DataFrame | None) -> str:
    """The summary's words on the result: the test cases' mean Dice at full resolution with its 95% interval (where
    this process evaluated: process 0), their volumes, then the best epoch's validation Dice on the network's grid,
    which chose that epoch and so is optimistic."""
    best = history.best()
    text = f"validation Dice {best['val_dice']:.4f} (mean over cases on the network's grid; global "
    text += f"{best['val_global_dice']:.4f}; it chose the epoch)"
    if per_case is None:  # under torchrun, the other processes: process 0 scored the test cases
        return text
    volumes = ", ".join(
        f"{r.case} {r.dice:.4f} ({r.true_ml:.0f} mL true, {r.predicted_ml:.0f} predicted)"
        for r in per_case.head(5).itertuples()
    ) + (", ..." if len(per_case) > 5 else "")  # fmt: skip
    if per_case.attrs.get("scored") != "test":
        return text + f"; at full resolution {volumes}; no test set (test_fraction 0): optimistic"
    test = describe_ci(per_case["dice"], unit="cases")
    return f"test Dice {test} at the series' full resolution ({volumes}); " + text


if __name__ == "__main__":
    pictures = readme_pictures(cfg, data, {"val_predictions.png": "pleural_effusion_3d_predictions.png"})
    print(run_summary(cfg, data, history, best_text(history, per_case),
                      ["best_model.pt", "last_checkpoint.pt", "history.csv", "dice_per_epoch.png", "batch.png",
                       "skipped_cases.csv", "val_per_case.csv", "test_per_case.csv", "val_predictions.png",
                       f"val_predictions/ ({len(data.val)} NIfTI masks)",
                       f"predictions/ ({max(len(predictions) - 1, 0)} NIfTI masks, predictions.csv)"],
                      pictures))  # fmt: skip
