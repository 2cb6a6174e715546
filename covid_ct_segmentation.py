"""COVID-19 lung lesions on CT: the COVID-19-20 challenge (MICCAI 2020) with MONAI's 3D BasicUNet baseline.

Segments the ground-glass opacities and consolidations of COVID-19 pneumonia in chest CT volumes. Reads the
challenge's NIfTI files as downloaded and checks their headers first (a CT without its mask, image and mask on
different grids, 2D or 4D files and truncated files are named, skipped and counted), splits the labelled cases by
case with a seed, and trains the challenge baseline recipe with today's MONAI: fixed orientation, 1.25x1.25x5 mm
voxels, HU window -1000..500, random lesion/background crops of 192x192x16, affine/noise/flip augmentation, a
BasicUNet, Dice + cross-entropy, Adam. Every epoch it segments the validation cases with a sliding window, maps
the predictions back onto each scan's own grid and scores them there (Dice per case, the challenge metric, and
global Dice); the best epoch by mean Dice is kept. Finally it segments the unlabelled `Validation/` scans and
writes one `NNN.nii.gz` mask per case with the scan's exact shape and affine, as the challenge expects.
Challenge: https://covid-segmentation.grand-challenge.org/ ; baseline:
https://github.com/Project-MONAI/tutorials/tree/main/3d_segmentation/challenge_baseline

Data: `data/COVID-19-20_v2/` as unzipped (`Train/volume-covid19-A-XXXX_ct.nii.gz` with `..._seg.nii.gz`,
`Validation/volume-covid19-A-XXXX_ct.nii.gz`). Without it the synthetic stand-in under `data/sample/` is used
(written when missing), and the script says so.
Outputs: `output/covid_ct_segmentation/`: `best_model.pt` (best epoch), `last_checkpoint.pt`, `history.csv` and
`dice_per_epoch.png` (rewritten every epoch), `val_dice_per_case.csv`, `val_predictions.png` (copied to
`Images/covid_ct_segmentation_predictions.png` for the README when the synthetic sample was used),
`submission/NNN.nii.gz` (one mask per `Validation/` scan).

Run: `python covid_ct_segmentation.py` (`QUICK=1` for a short first try), or cell by cell in VS Code or Jupyter;
edit the configuration inline, e.g. `cfg = Config(max_epochs=50)`; after Ctrl-C, `Config(resume=True)` goes on.
On several GPUs: `torchrun --nproc_per_node=4 covid_ct_segmentation.py` (README: several GPUs and machines).
"""

# %% Imports
import gzip
import logging
import math
import os
import random
import re
import shutil
import sys
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from monai.data import CacheDataset, DataLoader, MetaTensor
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss
from monai.networks.nets import BasicUNet
from monai.transforms import (
    Compose,
    EnsureTyped,
    Invertd,
    LoadImaged,
    Orientationd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)
from tqdm import tqdm

import distributed
from checkpoints import (
    EpochLoss,
    best_so_far,
    config_dict,
    resume,
    save_atomically,
    save_checkpoint,
    save_history,
    save_last,
    stop_message,
)
from data_cleaning import DatasetError, Skipped, Unusable
from dice import DiceAccumulator, log_epoch, plot_dice_history, tensorboard_writer
from precision import autocast, grad_scaler
from sample_data import find_dataset

# MONAI's LoadImage sets up every reader it knows, among them a GPU DICOM decoder that complains on each set-up
# when nvImageCodec is not installed; this script reads NIfTI only (with nibabel), so that message is noise.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")

# %% Configuration
# The repository root, whether run as a file (from any directory) or in a notebook kernel (no __file__).
ROOT = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
QUICK = os.environ.get("QUICK", "0") == "1"  # the collection's quick-run switch (README): fewer epochs, cases, voxels
DEVICE = distributed.device()  # picked once: the GPU if any (under torchrun, this process's own), else the CPU


@dataclass
class Config:
    data_dir: Path = ROOT / "data"  # holds COVID-19-20_v2/ as unzipped; else data/sample/ is used
    output_dir: Path = ROOT / "output" / "covid_ct_segmentation"  # weights, history, plots, submission masks
    images_dir: Path = ROOT / "Images"  # the README's pictures: val_predictions.png is copied there, from runs on
    # the synthetic sample only (pictures of real patients never land in a folder of the repository)
    seed: int = 0  # one seed for the split, the initial weights and the augmentation
    quick: bool = QUICK  # recorded in the checkpoint: a quick model is not a result
    val_fraction: float = 0.2  # of the labelled cases, drawn by case (the baseline took the last 20% by name)
    max_cases: int | None = 10 if QUICK else None  # labelled cases used, the first by name (None: all 199)
    max_infer_cases: int | None = 3 if QUICK else None  # Validation/ scans segmented (None: all 50, a submission)
    pixdim: tuple[float, float, float] = (4.0, 4.0, 5.0) if QUICK else (1.25, 1.25, 5.0)  # voxel size (mm) the
    # network sees (the baseline's 1.25x1.25x5 mm); quick: near the sample's own 3.4-3.9 mm, 10x fewer voxels
    hu_window: tuple[float, float] = (-1000.0, 500.0)  # HU mapped to 0..1 and clipped: air to dense tissue
    roi_size: tuple[int, int, int] = (48, 48, 16) if QUICK else (192, 192, 16)  # training crop and sliding window,
    # (x, y, z) voxels; BasicUNet halves each side 4 times, so multiples of 16
    num_samples: int = 3  # random crops per volume per step (the baseline's 3)
    pos_neg: tuple[float, float] = (1.0, 1.0)  # odds of a crop centred on a lesion voxel vs elsewhere: small lesions
    # would be missed by uniform crops (lesions are a few % of the lungs)
    affine_prob: float = 0.15  # probability of a small random tilt and in-plane zoom (the baseline's values)
    rotate_range: float = 0.05  # radians (3 degrees), about the x and y axes: a slightly tilted patient or gantry
    scale_range: float = 0.1  # +-10% in-plane: bigger and smaller chests
    noise_prob: float = 0.15  # probability of Gaussian noise on the 0..1 intensities
    noise_std: float = 0.01  # about 15 HU
    flip_prob: float = 0.5  # probability of a flip along each axis (lesions occur anywhere in either lung)
    features: tuple[int, ...] = (8, 8, 16, 32, 64, 8) if QUICK else (32, 32, 64, 128, 256, 32)  # BasicUNet
    # channels per level, the last one the decoder's output (the baseline's (32, 32, 64, 128, 256, 32))
    dropout: float = 0.1  # as the baseline
    initial_logit: float = -4.6  # the output bias at the start: logit(0.01), about the share of lesion voxels
    lr: float = 1e-2 if QUICK else 1e-4  # Adam (the baseline's 1e-4); quick: a 16x smaller net, 1000x fewer steps
    max_epochs: int = 14 if QUICK else 500  # the baseline trained 500 epochs of 160 cases; quick: 42 steps
    batch_size: int = 2  # volumes per step, each giving num_samples crops: 6 crops per step (the baseline's)
    val_interval: int = 4 if QUICK else 1  # epochs between validations (sliding window over each validation scan)
    overlap: float = 0.5  # sliding-window overlap between neighbouring windows
    sw_batch_size: int = 4  # windows per forward pass in the sliding window
    tta_flips: bool = not QUICK  # final validation and Validation/ masks: also predict the x- and y-flipped scans
    # and average (the baseline's test-time augmentation, without its noise copies); 3x the inference time
    threshold: float = 0.5  # lesion probability above which a voxel is lesion
    cache_rate: float = 1.0  # share of training volumes kept preprocessed in memory (about 25 MB each at 1.25 mm)
    num_workers: int = 4 if DEVICE.type == "cuda" and not QUICK else 0  # background crops and augmentation feed
    # a GPU; on a CPU they would compete with the model for the same cores
    amp: bool = True  # mixed precision on CUDA (bfloat16 where supported, else float16); ignored on the CPU
    examples: int = 3  # validation cases drawn in val_predictions.png
    tensorboard: bool = False  # also log the history to output_dir/tensorboard (needs `pip install tensorboard`)
    resume: bool = False  # go on from output_dir/last_checkpoint.pt (written after every epoch) up to max_epochs


cfg = Config()

# %% Data
CASE_NAME = re.compile(r"volume-covid19-A-(\d{4})_(ct|seg)\.nii\.gz")  # the challenge's file names
AFFINE_TOLERANCE_MM = 1e-3  # image and mask affines may differ by float rounding, not by a micrometre


def gzip_is_complete(path: Path, expected_bytes: int) -> bool:
    """Whether the .gz file holds all `expected_bytes` of its NIfTI, decompressing it only when in doubt.

    A gzip file ends with the size of its uncompressed data (modulo 2**32): when it matches, the file was written
    to the end, at the cost of reading 4 bytes. Only on a mismatch is the whole file decompressed, since a file made
    of several gzip members (bgzip) keeps in its tail the size of the last member only.
    """
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        if int.from_bytes(f.read(4), "little") == expected_bytes % 2**32:
            return True
    try:
        with gzip.open(path, "rb") as f:
            size = 0
            while chunk := f.read(1 << 24):
                size += len(chunk)
    except (EOFError, OSError, zlib.error):
        return False
    return size >= expected_bytes


def check_volume(path: Path) -> nib.Nifti1Image:
    """The NIfTI image (header read, voxels not) of a usable 3D volume; raises Unusable otherwise."""
    try:
        img = nib.load(path)
    except Exception as err:  # nibabel, gzip and zlib raise several kinds on a damaged or non-NIfTI file
        raise Unusable("unreadable", f"not a readable NIfTI file: {err}") from err
    if len(img.shape) != 3:
        raise Unusable("not 3D", f"shape {img.shape}: expected a 3D volume")
    expected = img.dataobj.offset + int(np.prod(img.shape)) * img.get_data_dtype().itemsize
    if path.name.endswith(".gz") and not gzip_is_complete(path, expected):
        raise Unusable("truncated", "the gzip data ends before the volume does")
    return img


def find_cases(folder: Path, skipped: Skipped, labelled: bool = True) -> list[dict]:
    """The usable cases of a challenge folder, sorted by case id: {"case", "image"} and, if labelled, "label".

    Pairs `volume-covid19-A-XXXX_ct.nii.gz` with `..._seg.nii.gz` by case id and checks the headers only (cheap):
    both 3D and complete, the mask on the CT's grid (same shape, same affine). A case failing a check is named,
    skipped and counted in `skipped`.
    """
    files: dict[str, dict[str, Path]] = {}
    for path in sorted(folder.iterdir()):
        match = CASE_NAME.fullmatch(path.name)
        if match is None or (match[2] == "seg" and not labelled):
            expected = "volume-covid19-A-XXXX_ct.nii.gz" + (" or _seg.nii.gz" if labelled else "")
            skipped.skip(path, "unexpected name", f"expected {expected}")
            continue
        files.setdefault(match[1], {})["image" if match[2] == "ct" else "label"] = path
    cases = []
    for case_id, paths in sorted(files.items()):
        if "image" not in paths:
            skipped.skip(paths["label"], "mask without CT", f"no volume-covid19-A-{case_id}_ct.nii.gz")
            continue
        if labelled and "label" not in paths:
            skipped.skip(paths["image"], "CT without mask", f"no volume-covid19-A-{case_id}_seg.nii.gz")
            continue
        try:
            path = paths["image"]
            ct = check_volume(path)
            if labelled:
                path = paths["label"]
                seg = check_volume(path)
                if seg.shape != ct.shape:
                    raise Unusable("mask shape differs", f"mask {seg.shape}, CT {ct.shape}")
                if not np.allclose(seg.affine, ct.affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
                    gap = np.abs(seg.affine - ct.affine).max()
                    raise Unusable("mask affine differs", f"from the CT's by up to {gap:.3g} mm")
        except Unusable as err:
            skipped.skip(path, err)
            continue
        cases.append({"case": case_id, **{key: str(p) for key, p in paths.items()}})
    return cases


def submission_name(case_id: str) -> str:
    """`NNN.nii.gz` for case `volume-covid19-A-0NNN`: the challenge's submission name.

    The baseline cut the first 18 characters, `volume-covid19-A-0`, so case A-0011 became `011.nii.gz`. Formatting
    the number with at least three digits gives the same names for every challenge id (all below 1000) and stays
    unique if an id ever reaches 1000, where cutting a fixed prefix would not.
    """
    return f"{int(case_id):03d}.nii.gz"


def split_by_case(cases: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, validation): a seeded shuffle of the cases, at least one on each side.

    Each case is one patient's scan, so splitting by case keeps a patient on one side. The baseline took the last
    20% in name order, which ties validation to however the ids were assigned.
    """
    if len(cases) < 2:
        raise DatasetError(f"Need at least 2 usable labelled cases to split, found {len(cases)}")
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = min(max(1, round(val_fraction * len(cases))), len(cases) - 1)
    val = sorted((cases[i] for i in order[:n_val]), key=lambda c: c["case"])
    train = sorted((cases[i] for i in order[n_val:]), key=lambda c: c["case"])
    return train, val


# %% Transforms
# The baseline's chain with today's MONAI: LoadImaged(ensure_channel_first) replaces AddChanneld, and predictions
# go back to each scan's grid with Invertd instead of NiftiSaver's resampling. Every scan is reoriented to RAS
# (the challenge's volumes come in more than one orientation) and resampled to `pixdim`, bilinear for the CT and
# nearest-neighbour for the mask, so that it stays binary. Validation and inference transform the CT only: the
# prediction is inverted back to the scan's grid and compared with the mask as stored, where the challenge scores.


class LoadVolumesd(LoadImaged):
    """MONAI's LoadImaged, naming the file it cannot read. find_cases checks each file's header and the length its
    gzip trailer gives (cheap); a .gz damaged inside (a bad sector, a copy patched up) gets past both and fails only
    when its voxels are decompressed, here, deep inside nibabel and zlib: this says which file, as Unusable."""

    def __call__(self, data, reader=None):
        try:
            return super().__call__(data, reader)
        except Exception as err:
            files = [str(data[key]) for key in self.keys if key in data]
            bad = [path for path in files if not decodes(path)] or files  # which of the CT and its mask it was
            detail = f"{', '.join(bad)} cannot be decompressed or decoded ({type(err).__name__}: {err})"
            raise Unusable("unreadable", detail) from err


def decodes(path: str) -> bool:
    """Whether all the voxels of a NIfTI file can be read."""
    try:
        np.asanyarray(nib.load(path).dataobj)
    except Exception:
        return False
    return True


def unusable_cause(err: BaseException) -> Unusable | None:
    """The Unusable behind `err`: MONAI wraps an error raised in a transform in a RuntimeError (or two)."""
    while err is not None and not isinstance(err, Unusable):
        err = err.__cause__ or err.__context__
    return err


def cache_dataset(files: list[dict], transforms: Compose, **kwargs) -> CacheDataset:
    """MONAI's CacheDataset of `files` (loaded and preprocessed now); a file that cannot be read stops the run with
    one line naming it (a DatasetError), not a traceback from three libraries down."""
    try:
        return CacheDataset(files, transforms, **kwargs)
    except RuntimeError as err:
        unusable = unusable_cause(err)
        if unusable is None:
            raise
        raise DatasetError(f"{unusable.detail}: replace it, or move its case (_ct and _seg) out of Train/") from None


def build_transforms(cfg: Config, mode: str) -> Compose:
    """MONAI dictionary transforms for mode "train" (random crops, augmentation), "val" or "infer"."""
    keys = ["image"] if mode == "infer" else ["image", "label"]
    resampled = keys if mode == "train" else ["image"]
    low, high = cfg.hu_window
    transforms = [
        LoadVolumesd(keys, reader="NibabelReader", ensure_channel_first=True),  # (1, X, Y, Z) MetaTensor, float32
        Orientationd(resampled, axcodes="RAS", labels=None),  # labels=None: the axis names of the MetaTensor's space
        Spacingd(resampled, pixdim=cfg.pixdim, mode=("bilinear", "nearest")[: len(resampled)]),
        ScaleIntensityRanged("image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
    ]
    if mode != "infer":
        transforms.append(EnsureTyped("label", dtype=torch.uint8))  # cached 4x smaller than float32
    if mode == "train":
        rotate, scale = cfg.rotate_range, cfg.scale_range
        transforms += [
            # Volumes smaller than a crop (few slices, small field of view) are mirrored at the edges.
            SpatialPadd(keys, spatial_size=cfg.roi_size, mode="reflect"),
            # Everything up to here is deterministic and cached by CacheDataset; what follows runs every step.
            RandAffined(
                keys,
                prob=cfg.affine_prob,
                rotate_range=(rotate, rotate, 0),
                scale_range=(scale, scale, 0),
                mode=("bilinear", "nearest"),
            ),
            RandCropByPosNegLabeld(
                keys,
                label_key="label",
                spatial_size=cfg.roi_size,
                pos=cfg.pos_neg[0],
                neg=cfg.pos_neg[1],
                num_samples=cfg.num_samples,
            ),
            RandGaussianNoised("image", prob=cfg.noise_prob, std=cfg.noise_std),
            *(RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=axis) for axis in range(3)),
            EnsureTyped(keys, track_meta=False),  # plain tensors from here: no metadata to collate
        ]
    return Compose(transforms)


# %% Model and loss


def build_model(cfg: Config) -> torch.nn.Module:
    """MONAI's BasicUNet, a 3D U-Net (Cicek et al., "3D U-Net", MICCAI 2016, https://arxiv.org/abs/1606.06650) with
    instance norm and LeakyReLU, as the challenge baseline. One output channel: the lesion's logit per voxel."""
    model = BasicUNet(spatial_dims=3, in_channels=1, out_channels=1, features=cfg.features, dropout=cfg.dropout)
    # Start from the prior, as RetinaNet does (Lin et al., "Focal loss for dense object detection", ICCV 2017): from
    # a bias of 0, every voxel starts as lesion at probability 0.5, cross-entropy first pushes them all to background,
    # and the Dice term then has nothing to work with. Measured on the quick run: validation Dice 0.000 after 14
    # epochs from a bias of 0, 0.64 from logit(0.01).
    torch.nn.init.constant_(model.final_conv.bias, cfg.initial_logit)
    return model


def build_loss() -> DiceCELoss:
    """Dice + binary cross-entropy on one sigmoid channel.

    The baseline had two softmax channels (background, lesion) and a Dice averaged over both. For one binary
    structure the two outputs carry a single logit's worth of information, and the background's Dice is about 1
    whatever the network does, so half of that Dice term barely moved; one channel puts the whole Dice on the lesion.
    `batch=True` sums the Dice over the batch: half of the crops are centred away from lesions and are often
    empty, and per crop each of those would add a loss near 1 (or 0) whatever the prediction.
    """
    return DiceCELoss(sigmoid=True, batch=True)


# %% Train and evaluate


def train_one_epoch(model, loader, loss_fn, optimizer, scaler, device, cfg: Config, epoch: int) -> float:
    """One pass over the training volumes (num_samples crops each); returns the mean loss per crop.

    Stops with a clear error naming the epoch and step if the loss is not finite.
    """
    model.train()
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, disable=None)
    losses = EpochLoss(epoch, cfg.lr, bar)  # read one step late: the GPU never waits for the CPU to read a loss
    for step, batch in enumerate(bar):
        img = batch["image"].to(device, non_blocking=True)  # (B * num_samples, 1, X, Y, Z) in 0..1
        seg = (batch["label"] > 0).to(device, non_blocking=True, dtype=torch.float32)
        with autocast(device, cfg.amp):
            logits = model(img)
        loss = loss_fn(logits.float(), seg)  # in float32: Dice sums over whole crops
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
def predict_probability(model, image: torch.Tensor, device, cfg: Config, tta: bool = False) -> torch.Tensor:
    """Lesion probability (1, X, Y, Z) on the CPU for a preprocessed (1, X, Y, Z) CT, by sliding window.

    Windows of roi_size overlap by `overlap` and are blended with Gaussian weights, so that each voxel is mostly
    predicted by windows centred near it. With `tta`, the x- and y-flipped scans are predicted too and the
    probabilities averaged.
    """
    model.eval()

    def window_probability(windows: torch.Tensor) -> torch.Tensor:
        with autocast(device, cfg.amp):
            return torch.sigmoid(model(windows).float())

    volume = (image.as_tensor() if isinstance(image, MetaTensor) else image)[None].to(device)  # (1, 1, X, Y, Z)
    flips = [(), (2,), (3,)] if tta else [()]  # (B, C, X, Y, Z): dims 2 and 3 are x and y
    prob = torch.zeros_like(volume)
    for dims in flips:
        flipped = torch.flip(volume, dims) if dims else volume
        out = sliding_window_inference(flipped, cfg.roi_size, cfg.sw_batch_size, window_probability,
                                       overlap=cfg.overlap, mode="gaussian", padding_mode="replicate")  # fmt: skip
        prob += torch.flip(out, dims) if dims else out
    return (prob / len(flips))[0].cpu()


def to_scan_grid(prob: torch.Tensor, image: MetaTensor, transforms: Compose) -> torch.Tensor:
    """A (1, X, Y, Z) map on the preprocessed grid of `image`, back on the grid of the scan as stored.

    Invertd undoes what `transforms` did to the CT (resampling, then reorientation), read from the CT's record of
    its applied operations; probabilities are interpolated bilinearly, and thresholded after.
    """
    invert = Invertd("pred", transform=transforms, orig_keys="image", nearest_interp=False)
    return invert({"pred": MetaTensor(prob), "image": image})["pred"].as_tensor()


def evaluate(
    model, val_ds, transforms: Compose, device, cfg: Config, tta: bool = False
) -> tuple[DiceAccumulator, list]:
    """Dice of every case of `val_ds` on the scan's own grid, and the binary predictions (1, X, Y, Z) there. Under
    torchrun `val_ds` holds this process's share of the cases during training (the caller gathers the scores)."""
    dice = DiceAccumulator(empty="one")  # a case without lesions scores 1 only if nothing is predicted
    predictions = []
    for i in tqdm(range(len(val_ds)), desc="validation", leave=False, disable=None):
        item = val_ds[i]
        prob = predict_probability(model, item["image"], device, cfg, tta)
        pred = to_scan_grid(prob, item["image"], transforms) > cfg.threshold
        seg = item["label"].as_tensor() > 0  # (1, X, Y, Z), as stored
        if pred.shape != seg.shape:  # cannot happen if the inversion is right: fail loudly rather than mis-score
            raise RuntimeError(f"Prediction {tuple(pred.shape)} and mask {tuple(seg.shape)} differ: {item['case']}")
        dice.update(pred[None], seg[None])
        predictions.append(pred)
    return dice, predictions


def write_mask(mask: np.ndarray, reference: nib.Nifti1Image, path: Path) -> None:
    """Write a 0/1 uint8 mask with the reference scan's header: same shape, affine, sform and qform.

    Written to a temporary file first and renamed, so that a crash never leaves half a mask in the submission.
    """
    if mask.shape != reference.shape:
        raise ValueError(f"Mask {mask.shape} does not match its scan {reference.shape}: {path.name}")
    out = nib.Nifti1Image(mask.astype(np.uint8), reference.affine, reference.header)
    out.set_data_dtype(np.uint8)
    out.header.set_slope_inter(1, 0)  # the CT's rescaling (if any) must not apply to a mask
    path.parent.mkdir(parents=True, exist_ok=True)
    # Compressed here, not by nib.save: nibabel picks the format from the file name, and the temporary one that
    # save_atomically writes ends in .partial.
    save_atomically(path, lambda partial: partial.write_bytes(gzip.compress(out.to_bytes(), compresslevel=6)))


def predict_folder(model, folder: Path, transforms: Compose, device, cfg: Config, out_dir: Path) -> list[Path]:
    """Segment every usable scan of an unlabelled folder and write `out_dir/NNN.nii.gz`; returns the masks written."""
    skipped = Skipped("file")
    cases = find_cases(folder, skipped, labelled=False)
    if cfg.max_infer_cases is not None and len(cases) > cfg.max_infer_cases:
        cases = cases[: cfg.max_infer_cases]
        print(f"Segmenting the first {len(cases)} scans of {folder} only (max_infer_cases): not a complete submission")
    written = []
    for case in tqdm(cases, desc="segmenting", leave=False, disable=None):
        try:
            item = transforms({"image": case["image"]})
        except RuntimeError as err:  # a scan damaged inside: named, skipped and counted, the others segmented
            unusable = unusable_cause(err)
            if unusable is None:
                raise
            skipped.skip(case["image"], unusable.problem, unusable.detail.removeprefix(f"{case['image']} "))
            continue
        prob = predict_probability(model, item["image"], device, cfg, tta=cfg.tta_flips)
        mask = (to_scan_grid(prob, item["image"], transforms) > cfg.threshold)[0].numpy()
        path = out_dir / submission_name(case["case"])
        write_mask(mask, nib.load(case["image"]), path)
        written.append(path)
    print(skipped.summary(f"{folder} ({len(written)} masks written to {out_dir})"))
    return written


# %% Peek at the predictions


def axial_view(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The volume reoriented so that `view[:, :, k].T` shows axial slice k as radiologists read it (the patient's
    right on the left of the picture, anterior at the top: LPS array axes, as DICOM stores slices), and its affine."""
    ornt = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt("LPS"))
    view_affine = affine @ nib.orientations.inv_ornt_aff(ornt, volume.shape)
    return nib.orientations.apply_orientation(volume, ornt), view_affine


def draw_predictions(cases: list[dict], predictions: list, dice: torch.Tensor, path: Path, cfg: Config) -> None:
    """One axial slice per validation case (the one with the most lesion), with the true lesion outlined in green
    and the predicted one in red, both on the scan's own grid."""
    n = min(cfg.examples, len(cases))
    fig = Figure(figsize=(3.3 * n, 3.8), dpi=100)
    for i in range(n):
        ct = nib.load(cases[i]["image"])
        seg = np.asanyarray(nib.load(cases[i]["label"]).dataobj) > 0
        view = {}
        for key, volume in (("ct", np.asanyarray(ct.dataobj)), ("seg", seg), ("pred", predictions[i][0].numpy())):
            view[key], view_affine = axial_view(volume, ct.affine)
        voxel = nib.affines.voxel_sizes(view_affine)
        k = int(np.argmax(view["seg"].sum(axis=(0, 1)) + 1e-3 * view["pred"].sum(axis=(0, 1))))
        z_mm = (view_affine @ [0, 0, k, 1])[2]  # the slice's height in scanner coordinates
        ax = fig.add_subplot(1, n, i + 1)
        ax.imshow(view["ct"][:, :, k].T, cmap="gray", vmin=cfg.hu_window[0], vmax=cfg.hu_window[1],
                  aspect=voxel[1] / voxel[0])  # fmt: skip
        for key, color in (("seg", "lime"), ("pred", "red")):
            if view[key][:, :, k].any():
                ax.contour(view[key][:, :, k].T, levels=[0.5], colors=color, linewidths=1)
        ax.set_title(f"A-{cases[i]['case']} at z = {z_mm:.0f} mm\nDice of the case {dice[i]:.3f}", fontsize=9)
        ax.axis("off")
    fig.suptitle("Validation: true lesions (green), predicted (red)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomically(path, lambda partial: fig.savefig(partial, format="png", bbox_inches="tight"))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every GPU


def main(cfg: Config) -> list[dict]:
    """Train, keep the best epoch by validation Dice, then segment Validation/ for a submission.

    Returns the history: one dict per epoch (also written to history.csv)."""
    start_time = time.time()
    seed_everything(cfg.seed)  # the same initial weights in every process
    # Under `torchrun --nproc_per_node=N`: join the other processes, take this process's GPU, print only in process
    # 0 (README, "Several GPUs"). With `python` or in a notebook: one process on DEVICE.
    device = distributed.setup()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed window size: let cuDNN pick its fastest kernels
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with distributed.main_first():  # process 0 writes the synthetic sample if missing, the others then read it
        root, synthetic = find_dataset("COVID-19-20_v2", Path(cfg.data_dir))  # says real or synthetic

    skipped = Skipped("file")
    train_dir = root / "Train"
    if not train_dir.is_dir():
        raise DatasetError(f"{train_dir} not found: expected Train/ and Validation/ in {root} (README.md)")
    cases = find_cases(train_dir, skipped)
    print(skipped.summary(f"{train_dir}: {len(cases)} usable labelled cases"))
    if cfg.max_cases is not None and len(cases) > cfg.max_cases:
        print(f"Using the first {cfg.max_cases} of {len(cases)} labelled cases (max_cases)")
        cases = cases[: cfg.max_cases]
    if len(cases) < 2:
        raise DatasetError(
            f"{len(cases)} usable labelled case(s) in {train_dir}: need 2 at least, as "
            "volume-covid19-A-XXXX_ct.nii.gz with its volume-covid19-A-XXXX_seg.nii.gz (3D, on the same grid)"
        )
    train_files, val_files = split_by_case(cases, cfg.val_fraction, cfg.seed)
    print(f"Split by case (seed {cfg.seed}): {len(train_files)} train, {len(val_files)} validation "
          f"({', '.join(c['case'] for c in val_files)}) at {cfg.pixdim} mm on {device.type}"
          + (" (QUICK run)" if cfg.quick else ""))  # fmt: skip

    train_transforms = build_transforms(cfg, "train")
    val_transforms = build_transforms(cfg, "val")
    train_transforms.set_random_state(seed=cfg.seed + distributed.rank())  # each process crops its own way
    bar = sys.stderr.isatty() and distributed.is_main()  # MONAI's caching bar, on a terminal only (minutes for 199)
    # Under torchrun each process caches and trains on its own fixed share of the training cases (shuffled within it
    # every epoch; the shares have equal length, so all take the same steps), and validates its share of the
    # validation cases: the memory is not multiplied by the number of processes. All of them in one process.
    train_ds = cache_dataset(distributed.train_shard(train_files), train_transforms, cache_rate=cfg.cache_rate,
                             progress=bar)  # fmt: skip
    val_ds = cache_dataset(distributed.shard(val_files), val_transforms, progress=bar)  # CT resampled, mask as stored
    train_loader = DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,  # do not restart the workers every epoch
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    batch = next(iter(train_loader))  # peek at one batch
    with_lesion = int(batch["label"].flatten(1).any(1).sum())
    print(f"One training batch: image {tuple(batch['image'].shape)} {batch['image'].dtype}, label "
          f"{tuple(batch['label'].shape)}, lesion in {with_lesion} of {len(batch['label'])} crops "
          f"({batch['label'].mean().item():.1%} of the voxels); {len(train_loader)} steps per epoch")  # fmt: skip

    model = build_model(cfg).to(device)
    train_model = distributed.wrap(model)  # DDP under torchrun (gradients averaged); `model` is what is saved
    loss_fn = build_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scaler = grad_scaler(device, cfg.amp)  # float16 only: none with bfloat16 or on the CPU
    checkpoint_path = output_dir / "best_model.pt"
    parts = {"model": model, "optimizer": optimizer, "scaler": scaler}  # what last_checkpoint.pt holds
    history, first_epoch = [], 1
    if cfg.resume:
        first_epoch, history = resume(output_dir, device, **parts)
    best_dice, best_epoch = best_so_far(checkpoint_path) if cfg.resume else (-math.inf, 0)
    writer = tensorboard_writer(cfg.tensorboard and distributed.is_main(), output_dir / "tensorboard")
    try:
        for epoch in range(first_epoch, cfg.max_epochs + 1):
            epoch_start = time.time()
            train_loss = train_one_epoch(train_model, train_loader, loss_fn, optimizer, scaler, device, cfg, epoch)
            row = {"epoch": epoch, "train_loss": train_loss, "val_dice": np.nan, "val_global_dice": np.nan}
            validate = epoch % cfg.val_interval == 0 or epoch == cfg.max_epochs
            is_best = False
            if validate:
                dice, _ = evaluate(model, val_ds, val_transforms, device, cfg)
                dice = distributed.gather_dice(dice)  # every process's cases: the same scores in every process
                row |= {"val_dice": dice.mean(), "val_global_dice": dice.global_dice()}
                is_best = row["val_dice"] > best_dice
                if is_best:
                    best_dice, best_epoch = row["val_dice"], epoch
            history.append(row | {"seconds": time.time() - epoch_start})
            if distributed.is_main():  # one process writes; the others hold the same weights and history
                if is_best:
                    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
                    state |= {"config": config_dict(cfg), "epoch": epoch, "metric": best_dice}
                    state |= {"metric_name": "validation Dice (mean over cases, on each scan's grid)"}
                    save_checkpoint(state, checkpoint_path)
                save_history(history, output_dir / "history.csv")
                # Epochs without validation have no val_* values: left out, not drawn as NaN.
                log_epoch(writer, {key: value for key, value in history[-1].items() if not pd.isna(value)}, epoch)
                if validate:
                    title = "COVID-19-20 lesions: validation Dice (mean over cases) per epoch"
                    plot_dice_history([h["val_dice"] for h in history], output_dir / "dice_per_epoch.png", title=title)
                save_last(output_dir, epoch, history, cfg, **parts)
            scores = ""
            if validate:
                scores = f"  val Dice {row['val_dice']:.4f} (global {row['val_global_dice']:.4f})"
            print(f"epoch {epoch:3d}/{cfg.max_epochs}  train loss {train_loss:.4f}{scores}  "
                  f"{history[-1]['seconds']:.1f} s" + ("  *best*" if best_epoch == epoch else ""))  # fmt: skip
    # Ctrl-C (or Interrupt in a notebook) drops the epoch under way; a loss that is not finite stops training.
    except (KeyboardInterrupt, FloatingPointError) as err:
        print(stop_message(err, output_dir, history, checkpoint_path))
        return history
    finally:
        if writer is not None:
            writer.close()
    if not distributed.is_main():
        return history  # process 0 alone validates the best epoch and segments Validation/; the others are done
    if distributed.world_size() > 1:  # process 0 held its share of the validation cases only: now all of them
        val_ds = cache_dataset(val_files, val_transforms, progress=bar)

    # The best epoch's weights, read back from the checkpoint, for the final validation, the figure and the masks.
    checkpoint = torch.load(checkpoint_path, map_location=device, weights_only=True)
    model.load_state_dict(checkpoint["model"])
    dice, predictions = evaluate(model, val_ds, val_transforms, device, cfg)
    per_case = pd.DataFrame({"case": [c["case"] for c in val_files], "dice": dice.per_image().numpy()})
    best = f"validation Dice {dice.mean():.4f} (mean over cases on each scan's grid; global {dice.global_dice():.4f})"
    if cfg.tta_flips:
        dice, predictions = evaluate(model, val_ds, val_transforms, device, cfg, tta=True)
        per_case["dice_tta"] = dice.per_image().numpy()
        best += f"; with flip test-time augmentation {dice.mean():.4f} (global {dice.global_dice():.4f})"
    save_atomically(output_dir / "val_dice_per_case.csv", lambda path: per_case.to_csv(path, index=False))
    draw_predictions(val_files, predictions, dice.per_image(), output_dir / "val_predictions.png", cfg)
    pictures = []
    if synthetic:  # the README's picture; pictures of real patients never land in a folder of the repository
        Path(cfg.images_dir).mkdir(parents=True, exist_ok=True)
        pictures.append(Path(cfg.images_dir) / "covid_ct_segmentation_predictions.png")
        shutil.copyfile(output_dir / "val_predictions.png", pictures[-1])

    infer_dir, written = root / "Validation", []
    if infer_dir.is_dir():
        infer_transforms = build_transforms(cfg, "infer")
        written = predict_folder(model, infer_dir, infer_transforms, device, cfg, output_dir / "submission")
    else:
        print(f"{infer_dir} not found: no masks to submit")
    print(f"\nSummary ({time.time() - start_time:.0f} s{', QUICK run' if cfg.quick else ''})\n"
          f"  data:    {'SYNTHETIC sample' if synthetic else 'real dataset'} {root}: {len(cases)} labelled cases "
          f"used ({len(train_files)} train, {len(val_files)} validation), {sum(skipped.counts.values())} files "
          f"skipped\n"
          f"  best:    epoch {best_epoch} of {len(history)}, {best}\n"
          f"  outputs: {output_dir}/ {checkpoint_path.name}, last_checkpoint.pt, history.csv, dice_per_epoch.png, "
          f"val_dice_per_case.csv, val_predictions.png, submission/ ({len(written)} masks NNN.nii.gz)"
          + "".join(f"\n  picture: {p}" for p in pictures))  # fmt: skip
    return history


# %% Run
if __name__ == "__main__":
    try:
        history = main(cfg)
    except DatasetError as err:  # a data folder unlike the README's: one line saying what was expected where
        raise SystemExit(f"Data problem: {err}") from None
    finally:
        distributed.shutdown()  # under torchrun: leave the process group (nothing to do in one process)
