"""COVID-19 lung lesions on CT: the COVID-19-20 challenge (MICCAI 2020) with MONAI's 3D BasicUNet baseline.

Segments the ground-glass opacities and consolidations of COVID-19 pneumonia in chest CT volumes. Reads the
challenge's NIfTI files as downloaded and checks their headers first (a CT without its mask, image and mask on
different grids, 2D or 4D files and truncated files are named, skipped and counted), splits the labelled cases by
case with a seed into training, validation and test, and trains the challenge baseline recipe with today's MONAI:
fixed orientation, 1.25x1.25x5 mm voxels, HU window -1000..500, random lesion/background crops of 192x192x16,
affine/noise/flip augmentation, a BasicUNet, Dice + cross-entropy, Adam. Every `val_interval` epochs it segments the
validation cases with a sliding window, maps the predictions back onto each scan's own grid and scores them there
(Dice per case, the challenge metric, and global Dice); the best epoch by mean Dice is kept. Validation then decides
whether flip test-time augmentation helps, and the held-out test cases are scored once, with that choice: the
result, with a 95% bootstrap interval. Finally it segments the unlabelled `Validation/` scans and writes one
`NNN.nii.gz` mask per case with the scan's exact shape and affine, as the challenge expects; the same Predict cell
segments your own CTs (NIfTI files or DICOM series) with the trained model.
Challenge: https://covid-segmentation.grand-challenge.org/ ; baseline:
https://github.com/Project-MONAI/tutorials/tree/main/3d_segmentation/challenge_baseline

Data: `data/COVID-19-20_v2/` as unzipped (`Train/volume-covid19-A-XXXX_ct.nii.gz` with `..._seg.nii.gz`,
`Validation/volume-covid19-A-XXXX_ct.nii.gz`). Without it the synthetic stand-in under `data/sample/` is used
(written when missing), and the script says so.
Outputs: `output/covid_ct_segmentation/`: `best_model.pt`, `last_checkpoint.pt`, `history.csv`, `dice_per_epoch.png`,
`batch.png`, `val_per_case.csv`, `test_per_case.csv` (Dice per held-out test case: the result),
`val_predictions.png` (true and predicted outlines; copied to `Images/` for the README when the synthetic sample was
used), `predictions/NNN.nii.gz` (one mask per `Validation/` scan: the
submission) and `predictions/predictions.csv` (lesion volume per scan in mL).

Run: `python covid_ct_segmentation.py` (`QUICK=1` for a short first try), or cell by cell in VS Code or Jupyter,
each cell leaving its result to look at: `cfg`, `data`, `batch`, `model`, `history`, `per_case`. Edit the
configuration inline (`cfg = Config(max_epochs=50)`) and run the cells below again; after Ctrl-C,
`Config(resume=True)` goes on. On several GPUs: `torchrun --nproc_per_node=4 covid_ct_segmentation.py` (README:
several GPUs and machines). Your own CTs with a trained model, no training: `PREDICT=<folder or file> python
covid_ct_segmentation.py` (`CHECKPOINT=<best_model.pt>` for other weights).
"""

# %% Imports
import logging
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import ClassVar

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from monai.data import DataLoader, Dataset, MetaTensor
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
from monai.utils import first
from tqdm import tqdm

import distributed
from checkpoints import (
    BEST_MODEL,
    CHECKPOINT,
    PREDICT,
    RESUME,
    BaseConfig,
    EpochLoss,
    History,
    TrainingRun,
    as_trained,
    end_if_stopped,
    load_best,
    load_trained,
    make_folder,
    predict_only,
    readme_pictures,
    run_summary,
    save_atomically,
    save_checkpoint,
    seed_everything,
)
from data_cleaning import (
    COVID_CASE_NAME,
    Data,
    DatasetError,
    Skipped,
    Unusable,
    cache_dataset,
    ct_inputs,
    damaged_file_stops_the_run,
    find_covid_cases,
    mask_name,
    one_line_data_problems,
    persistent_dataset,
    segment_cts,
    split_groups,
    undecodable_named,
)
from dice import DiceAccumulator, describe_ci, save_figure, show
from precision import autocast, grad_scaler
from sample_data import find_dataset

# MONAI's LoadImage sets up every reader it knows, among them a GPU DICOM decoder that complains on each set-up
# when nvImageCodec is not installed; this script reads NIfTI only (with nibabel), so that message is noise.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")

# %% Configuration
# The repository root, whether run as a file (from any directory) or in a notebook kernel (no __file__).
ROOT = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
QUICK = os.environ.get("QUICK", "0") == "1"  # the collection's quick-run switch (README): read here, once
DEVICE = distributed.device()  # picked once: the GPU if any (under torchrun, this process's own), else the CPU


@dataclass
class Config(BaseConfig):
    data_dir: Path = ROOT / "data"  # holds COVID-19-20_v2/ as unzipped; else data/sample/ is used
    output_dir: Path = ROOT / "output" / "covid_ct_segmentation"  # weights, history, plots, predicted masks
    images_dir: Path = ROOT / "Images"  # the README's pictures: val_predictions.png is copied there, from runs on
    # the synthetic sample only (pictures of real patients never land in a folder of the repository)
    seed: int = 0  # the initial weights, the augmentation and the order of the training cases
    split_seed: int = 0  # which cases are validation and test: kept apart from `seed`, so a new seed keeps the test set
    val_fraction: float = 0.2  # of the labelled cases (one per patient), to choose the epoch and flip TTA; the
    # baseline took the last 20% by name
    test_fraction: float = 0.2  # of the labelled cases, held out and scored once at the end: the result (0: no test
    # set, and the only score is validation's, which chose the model and is optimistic)
    max_cases: int | None = None  # labelled cases used, the first by name (None: all 199)
    max_infer_cases: int | None = None  # Validation/ scans segmented by default (None: all 50, a submission)
    pixdim: tuple[float, float, float] = (1.25, 1.25, 5.0)  # voxel size (mm) the network sees, the baseline's
    hu_window: tuple[float, float] = (-1000.0, 500.0)  # HU mapped to 0..1 and clipped: air to dense tissue
    roi_size: tuple[int, int, int] = (192, 192, 16)  # training crop and sliding window, (x, y, z) voxels;
    # BasicUNet halves each side 4 times, so multiples of 16
    num_samples: int = 3  # random crops per volume per step (the baseline's 3)
    pos_neg: tuple[float, float] = (1.0, 1.0)  # odds of a crop centred on a lesion voxel vs elsewhere: small lesions
    # would be missed by uniform crops (lesions are a few % of the lungs)
    affine_prob: float = 0.15  # probability of a small random tilt and in-plane zoom (the baseline's values)
    rotate_range: float = 0.05  # radians (3 degrees), about the x and y axes: a slightly tilted patient or gantry
    scale_range: float = 0.1  # +-10% in-plane: bigger and smaller chests
    noise_prob: float = 0.15  # probability of Gaussian noise on the 0..1 intensities
    noise_std: float = 0.01  # about 15 HU
    flip_prob: float = 0.5  # probability of a flip along each axis (lesions occur anywhere in either lung)
    features: tuple[int, ...] = (32, 32, 64, 128, 256, 32)  # BasicUNet channels per level, the last one the
    # decoder's output (the baseline's)
    dropout: float = 0.1  # as the baseline
    initial_logit: float = -4.6  # the output bias at the start: logit(0.01), about the share of lesion voxels
    lr: float = 1e-4  # Adam, the baseline's
    max_epochs: int = 500  # the baseline trained 500 epochs of 160 cases
    batch_size: int = 2  # volumes per step, each giving num_samples crops: 6 crops per step (the baseline's)
    val_interval: int = 1  # epochs between validations (sliding window over each validation scan); and the last
    overlap: float = 0.5  # sliding-window overlap between neighbouring windows
    sw_batch_size: int = 4  # windows per forward pass in the sliding window
    tta_flips: bool = True  # final validation and Validation/ masks: also predict the x- and y-flipped scans and
    # average (the baseline's test-time augmentation, without its noise copies); 3x the inference time
    threshold: float = 0.5  # lesion probability above which a voxel is lesion
    cache: bool = True  # keep each case loaded, reoriented, resampled and windowed on disk (cache_dir, MONAI's
    # PersistentDataset): the next run, and every epoch, reads it back (about 25 MB per case at 1.25 mm)
    cache_dir: Path | None = None  # None: <data_dir>/cache/covid_ct_segmentation/ (beside the download)
    cache_rate: float = 1.0  # with cache=False: share of training volumes kept preprocessed in memory (CacheDataset)
    num_workers: int = 4 if DEVICE.type == "cuda" else 0  # background crops and augmentation feed a GPU; on a CPU
    # they would compete with the model for the same cores
    amp: bool = True  # mixed precision on CUDA (bfloat16 where supported, else float16); ignored on the CPU
    examples: int = 3  # validation cases drawn in val_predictions.png
    predict_inputs: Path | None = PREDICT  # the Predict cell's input: a NIfTI CT, a DICOM series folder, a folder
    # of these (None: the challenge's Validation/ scans, the submission)
    checkpoint: Path | None = CHECKPOINT  # the weights the Predict cell uses (None: output_dir/best_model.pt)
    tensorboard: bool = False  # also log the history to output_dir/tensorboard (needs `pip install tensorboard`)
    resume: bool = RESUME  # go on from output_dir/last_checkpoint.pt (written after every epoch) up to max_epochs;
    # RESUME=1 python covid_ct_segmentation.py from the command line
    quick: bool = QUICK  # the quick run below; recorded in the checkpoint: a quick model is not a result
    AS_TRAINED: ClassVar[tuple[str, ...]] = ("pixdim", "hu_window", "roi_size", "threshold")  # read by prediction
    # from the checkpoint: the network has only learnt scans at its voxel size and window, in windows of its size

    # The quick run (QUICK=1, or Config(quick=True)): a first try in about a minute on a CPU. These replace the
    # defaults above; a setting given explicitly, as in Config(quick=True, max_epochs=5), wins.
    QUICK_RUN: ClassVar[dict] = dict(
        max_cases=10,  # the first 10 labelled cases of the real data (the sample has 8)
        max_infer_cases=3,  # a smoke-test submission, not a complete one
        pixdim=(4.0, 4.0, 5.0),  # near the sample's own 3.4-3.9 mm: 10x fewer voxels than 1.25 mm
        roi_size=(48, 48, 16),  # 19 cm across at 4 mm (192 voxels: 24 cm at 1.25 mm); multiples of 16 still
        features=(8, 8, 16, 32, 64, 8),  # a 16x smaller network
        lr=1e-2,  # a 16x smaller network and 1000x fewer steps than the baseline's: larger steps
        max_epochs=14,  # 42 steps on the sample
        val_interval=4,  # validation at epochs 4, 8, 12 and 14 (the last)
        tta_flips=False,  # 3x the inference time, for a first try
        num_workers=0,  # no worker processes to start for a minute's run
    )


cfg = Config()
if __name__ == "__main__":
    distributed.setup()  # under torchrun: join the other processes (README: several GPUs); else nothing
    one_line_data_problems()  # from the command line, a data folder unlike the README's is one line
    print(cfg.describe())
    if PREDICT:  # PREDICT=<folder or file> python covid_ct_segmentation.py: predict, no training (README)
        predict_only(__file__)

# %% Data


def split_by_case(cases: list[dict], cfg: Config) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test): the cases drawn by data_cleaning.split_groups with `split_seed`, the test cases
    first (they stay when val_fraction or seed change), at least one on each side asked for.

    Each case is one patient's scan, so splitting by case keeps a patient on one side. The baseline took the last
    20% in name order, which ties validation to however the ids were assigned; and it had no test set: the challenge's
    Validation/ scans have no masks, so the labelled Train/ cases provide it.
    """
    sides = split_groups([c["case"] for c in cases], cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    return tuple(sorted((c for c in cases if c["case"] in side), key=lambda c: c["case"]) for side in sides)


def load_data(cfg: Config) -> Data:
    """The labelled cases of Train/ (or of the sample), {"case", "image", "label"} with file paths: paired by case
    id, their headers checked (data_cleaning.py), the first max_cases, split by case into train, validation and test
    with split_seed."""
    with distributed.main_first():  # process 0 writes the synthetic sample if missing, the others then read it
        root, synthetic = find_dataset("COVID-19-20_v2", cfg.data_dir)
    train_dir = root / "Train"
    if not train_dir.is_dir():
        raise DatasetError(f"{train_dir} not found: expected Train/ and Validation/ in {root} (README.md)")
    skipped = Skipped("file")
    cases = find_covid_cases(train_dir, skipped)  # a case with a missing, 2D/4D, truncated or misaligned file: named
    print(skipped.summary(f"{train_dir}: {len(cases)} usable labelled cases"))
    if distributed.is_main():  # every process read the same files: one lists the skipped ones
        skipped.save(make_folder(cfg.output_dir) / "skipped.csv")
    if cfg.max_cases is not None and len(cases) > cfg.max_cases:
        print(f"Using the first {cfg.max_cases} of {len(cases)} labelled cases (max_cases)")
        cases = cases[: cfg.max_cases]
    needed = 1 + (cfg.val_fraction > 0) + (cfg.test_fraction > 0)  # a case for each side asked for
    if len(cases) < needed:
        raise DatasetError(
            f"{len(cases)} usable labelled case(s) in {train_dir}: need {needed} at least (training, validation, "
            "test), as volume-covid19-A-XXXX_ct.nii.gz with its volume-covid19-A-XXXX_seg.nii.gz (3D, on the same grid)"
        )
    train, val, test = split_by_case(cases, cfg)
    print(f"Split by case (split_seed {cfg.split_seed}): validation cases {', '.join(c['case'] for c in val)}; "
          f"test cases {', '.join(c['case'] for c in test) if len(test) <= 20 else len(test)}")  # fmt: skip
    return Data(root, synthetic, train, val, test, unit="cases", skipped=skipped)


if __name__ == "__main__":
    data = load_data(cfg)
    print(data)

# %% Transforms
# The baseline's chain with today's MONAI: LoadImaged(ensure_channel_first) replaces AddChanneld, and predictions
# go back to each scan's grid with Invertd instead of NiftiSaver's resampling. Every scan is reoriented to RAS
# (the challenge's volumes come in more than one orientation) and resampled to `pixdim`, bilinear for the CT and
# nearest-neighbour for the mask, so that it stays binary. Validation and inference transform the CT only: the
# prediction is inverted back to the scan's grid and compared with the mask as stored, where the challenge scores.


class LoadVolumesd(LoadImaged):
    """MONAI's LoadImaged, naming the file it cannot decode (data_cleaning.undecodable_named), so that a .gz
    damaged inside is named, skipped and counted like every other bad input."""

    def __call__(self, data, reader=None):
        with undecodable_named(data, self.keys):
            return super().__call__(data, reader)


def build_transforms(cfg: Config, mode: str) -> Compose:
    """MONAI dictionary transforms for mode "train" (random crops, augmentation), "val" or "infer"."""
    keys = ["image"] if mode == "infer" else ["image", "label"]
    resampled = keys if mode == "train" else ["image"]
    low, high = cfg.hu_window
    transforms = [
        # MONAI's LoadImaged, naming a file it cannot decode: (1, X, Y, Z) MetaTensor, float32
        LoadVolumesd(keys, reader="NibabelReader", ensure_channel_first=True),
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
            # Everything up to here is deterministic and cached (on disk, or by CacheDataset); what follows runs
            # every step.
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


def preview_batch(cfg: Config, data: Data) -> dict:
    """One training batch as the network gets it: the first batch_size training cases through the training
    transforms, read from the files here (fit preprocesses each case once, into the disk cache), num_samples crops
    each."""
    transforms = build_transforms(cfg, "train")
    loader = DataLoader(Dataset(data.train[: cfg.batch_size], transforms), batch_size=cfg.batch_size,
                        generator=torch.Generator().manual_seed(cfg.seed))  # fmt: skip
    with damaged_file_stops_the_run():  # a CT or mask that cannot be decoded: one line naming it
        return first(loader)


def draw_batch(batch: dict, n: int = 6) -> Figure:
    """The middle axial slice of the first crops of a batch, lesion outlined in green, and each crop's share of
    lesion voxels. A lesion-centred crop has its centre voxel on a lesion, in or next to that slice; the others
    are centred anywhere in the scan."""
    n = min(n, len(batch["image"]))
    fig = Figure(figsize=(2.4 * n, 2.8), dpi=100)
    for i in range(n):
        k = batch["image"].shape[-1] // 2
        # RAS arrays drawn as radiologists read a slice (the patient's right on the left, anterior at the top), but
        # for the random flips, which turn some crops over.
        img, seg = (np.flip(batch[key][i, 0, :, :, k].numpy(), (0, 1)).T for key in ("image", "label"))
        ax = fig.add_subplot(1, n, i + 1)
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        if seg.any():
            ax.contour(seg, levels=[0.5], colors="lime", linewidths=1)
        ax.set_title(f"crop {i}: {batch['label'][i].float().mean().item():.1%} lesion", fontsize=9)
        ax.axis("off")
    with_lesion = int(batch["label"].flatten(1).any(1).sum())
    fig.suptitle(f"A training batch: image {tuple(batch['image'].shape)} {batch['image'].dtype}; lesion in "
                 f"{with_lesion} of {len(batch['label'])} crops ({batch['label'].float().mean().item():.1%} of the "
                 "voxels)", fontsize=10)  # fmt: skip
    return fig


if __name__ == "__main__":
    batch = preview_batch(cfg, data)  # {"image": (batch_size x num_samples, 1, X, Y, Z) in 0..1, "label": same}
    show(save_figure(draw_batch(batch), cfg.output_dir / "batch.png"))

# %% Model and loss


def build_model(cfg: Config) -> torch.nn.Module:
    """MONAI's BasicUNet, a 3D U-Net (Cicek et al., "3D U-Net", MICCAI 2016, https://arxiv.org/abs/1606.06650) with
    instance norm and LeakyReLU, as the challenge baseline. One output channel: the lesion's logit per voxel."""
    seed_everything(cfg.seed)  # the same initial weights for the same seed, in every process
    model = BasicUNet(spatial_dims=3, in_channels=1, out_channels=1, features=cfg.features, dropout=cfg.dropout)
    # Start from the prior, as RetinaNet does (Lin et al., "Focal loss for dense object detection", ICCV 2017): from
    # a bias of 0, every voxel starts as lesion at probability 0.5, cross-entropy first pushes them all to background,
    # and the Dice term then has nothing to work with. Measured on the quick run: validation Dice 0.000 after 14
    # epochs from a bias of 0, 0.58 from logit(0.01).
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


if __name__ == "__main__":
    model = build_model(cfg)
    print(f"MONAI BasicUNet {cfg.features}: {sum(p.numel() for p in model.parameters()):,} parameters")

# %% Train


def train_one_epoch(model, loader, loss_fn, optimizer, scaler, cfg: Config, epoch: int) -> float:
    """One pass over the training volumes (num_samples crops each); returns the mean loss per crop.

    Stops with a clear error naming the epoch and step if the loss is not finite.
    """
    model.train()
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, disable=None)
    losses = EpochLoss(epoch, cfg.lr, bar)  # read one step late: the GPU never waits for the CPU to read a loss
    for step, batch in enumerate(bar):
        img = batch["image"].to(DEVICE, non_blocking=True)  # (B * num_samples, 1, X, Y, Z) in 0..1
        seg = (batch["label"] > 0).to(DEVICE, non_blocking=True, dtype=torch.float32)
        with autocast(DEVICE, cfg.amp):
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
def predict_probability(model, image: torch.Tensor, cfg: Config, tta: bool = False) -> torch.Tensor:
    """Lesion probability (1, X, Y, Z) on the CPU for a preprocessed (1, X, Y, Z) CT, by sliding window.

    Windows of roi_size overlap by `overlap` and are blended with Gaussian weights, so that each voxel is mostly
    predicted by windows centred near it. With `tta`, the x- and y-flipped scans are predicted too and the
    probabilities averaged.
    """
    model.eval()

    def window_probability(windows: torch.Tensor) -> torch.Tensor:
        with autocast(DEVICE, cfg.amp):
            return torch.sigmoid(model(windows).float())

    volume = (image.as_tensor() if isinstance(image, MetaTensor) else image)[None].to(DEVICE)  # (1, 1, X, Y, Z)
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


def score_cases(model, val_ds, transforms: Compose, cfg: Config, tta: bool = False, keep: int = 0):
    """(DiceAccumulator, predictions): the Dice of every case of `val_ds` on the scan's own grid, and the binary
    predictions (1, X, Y, Z) there of its first `keep` cases (for a figure: a whole scan's mask is large)."""
    dice = DiceAccumulator(empty="one")  # a case without lesions scores 1 only if nothing is predicted
    predictions = []
    for i in tqdm(range(len(val_ds)), desc="validation", leave=False, disable=None):
        item = val_ds[i]
        prob = predict_probability(model, item["image"], cfg, tta)
        pred = to_scan_grid(prob, item["image"], transforms) > cfg.threshold
        seg = item["label"].as_tensor() > 0  # (1, X, Y, Z), as stored
        if pred.shape != seg.shape:  # cannot happen if the inversion is right: fail loudly rather than mis-score
            raise RuntimeError(f"Prediction {tuple(pred.shape)} and mask {tuple(seg.shape)} differ: {item['case']}")
        dice.update(pred[None], seg[None])
        if i < keep:
            predictions.append(pred)
    return dice, predictions


def evaluate(model, val_ds, transforms: Compose, cfg: Config) -> dict:
    """The validation row: Dice per case on each scan's own grid, averaged over the cases (the challenge's metric),
    and the global Dice of all their voxels. Under torchrun each process segments its share of the cases
    (`val_ds`), and the scores cover all of them, the same in every process."""
    dice, _ = score_cases(model, val_ds, transforms, cfg)
    dice = distributed.gather_dice(dice)  # every process's cases (unchanged in one process)
    return {"val_dice": dice.mean(), "val_global_dice": dice.global_dice()}


# What the deterministic transforms depend on besides the Config fields below: in the cache's key, so that a change of
# build_transforms is a new entry, never a stale one read back.
PREPROCESSING_VERSION = 1


def preprocessed(cases: list[dict], transforms: Compose, cfg: Config, mode: str, progress: bool = False,
                 say: bool = False) -> Dataset:  # fmt: skip
    """The cases through `transforms`, their deterministic part (load, reorient, resample, window, pad) done once:
    with `cache`, on disk in <data_dir>/cache/covid_ct_segmentation/ (or `cache_dir`), MONAI's PersistentDataset
    keyed by the settings and each file's path, size and modification time, built on every core where missing;
    without, in memory now (MONAI's CacheDataset, `cache_rate` of them). One line says what the disk cache held,
    where it built entries or where asked to (`say`)."""
    if not cfg.cache:
        rate = cfg.cache_rate if mode == "train" else 1.0
        return cache_dataset(cases, transforms, cache_rate=rate, progress=progress)
    settings = {"mode": mode, "pixdim": cfg.pixdim, "hu_window": cfg.hu_window, "version": PREPROCESSING_VERSION}
    if mode == "train":  # volumes smaller than a crop are padded to it
        settings["roi_size"] = cfg.roi_size
    folder = cfg.cache_dir or Path(cfg.data_dir) / "cache" / "covid_ct_segmentation"
    dataset, read, built = persistent_dataset(cases, transforms, folder, settings, desc="preprocessing CTs")
    if built or say:
        print(f"Disk cache {folder}: {read} {mode} cases read back, {built} preprocessed and written")
    return dataset


def build_loaders(cfg: Config, data: Data) -> tuple[DataLoader, Dataset, Compose]:
    """(training loader, validation cases, validation transforms), each case preprocessed once: read back from the
    disk cache (built now where missing) or, with cache=False, kept in memory.

    Under torchrun process 0 builds the disk cache of every case, the others then read it; each process trains on
    its own fixed share of the training cases (shuffled within it every epoch; the shares have equal length, so all
    take the same steps) and validates its share of the validation cases. The entries are read from disk, whose
    page cache the processes share; without the disk cache each process keeps only its share in memory. All of
    them in one process."""
    train_transforms, val_transforms = build_transforms(cfg, "train"), build_transforms(cfg, "val")
    train_transforms.set_random_state(seed=cfg.seed + distributed.rank())  # each process crops its own way
    bar = sys.stderr.isatty() and distributed.is_main()  # MONAI's caching bar, on a terminal only (minutes for 199)
    if cfg.cache:
        with distributed.main_first():  # process 0 builds every case's entry, the others then find them built
            if distributed.is_main():
                preprocessed(data.train, train_transforms, cfg, "train", say=True)
                preprocessed(data.val + data.test, val_transforms, cfg, "val", say=True)
    train_ds = preprocessed(distributed.train_shard(data.train), train_transforms, cfg, "train", progress=bar)
    val_ds = preprocessed(distributed.shard(data.val), val_transforms, cfg, "val", progress=bar)  # CT resampled,
    # the mask as stored
    train_loader = DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,  # do not restart the workers every epoch
        pin_memory=DEVICE.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    return train_loader, val_ds, val_transforms


def fit(cfg: Config, data: Data, model: torch.nn.Module) -> History:
    """Train `model` on the training cases, validate every val_interval epochs and at the last, keep the best epoch
    by validation Dice (output_dir/best_model.pt). Returns the history, one row per epoch (history.csv)."""
    torch.backends.cudnn.benchmark = DEVICE.type == "cuda"  # fixed window size: let cuDNN pick its fastest kernels
    train_loader, val_ds, val_transforms = build_loaders(cfg, data)
    model.to(DEVICE)
    train_model = distributed.wrap(model)  # DDP under torchrun (gradients averaged); `model` is what is saved
    loss_fn = build_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scaler = grad_scaler(DEVICE, cfg.amp)  # float16 only: none with bfloat16 or on the CPU (precision.py)
    print(f"Training on {DEVICE.type}: {len(data.train)} cases at {cfg.pixdim} mm, {len(train_loader)} steps per epoch")
    title = "COVID-19-20 lesions: validation Dice (mean over cases) per epoch"
    with TrainingRun(cfg, "val_dice", title=title, model=model, optimizer=optimizer, scaler=scaler) as run:
        for epoch in run.epochs(train_loader):
            train_loss = train_one_epoch(train_model, train_loader, loss_fn, optimizer, scaler, cfg, epoch)
            validate = epoch % cfg.val_interval == 0 or epoch == cfg.max_epochs  # a sliding window over every scan
            run.end_epoch(train_loss=train_loss, **(evaluate(model, val_ds, val_transforms, cfg) if validate else {}))
    return run.history


if __name__ == "__main__":
    history = fit(cfg, data, model)
    show(cfg.output_dir / "dice_per_epoch.png")
    end_if_stopped(history)  # Ctrl-C or a loss that was not finite: said why; the cells below do not run

# %% Evaluate


def validate_best(model, cases: list[dict], transforms: Compose, cfg: Config):
    """(per_case, flips, dice, predictions): the best weights on every validation case, on its scan's own grid
    (val_per_case.csv); with tta_flips, also with flip test-time augmentation, which is then used (flips=True) only
    where it raises validation's mean Dice. `dice` and `predictions` are those of the setting chosen."""
    val_ds = preprocessed(cases, transforms, cfg, "val")  # every validation case, read once for both passes
    dice, predictions = score_cases(model, val_ds, transforms, cfg, keep=cfg.examples)
    per_case = pd.DataFrame({"case": [c["case"] for c in cases], "dice": dice.per_image().numpy()})
    flips = False
    if cfg.tta_flips:
        flipped, flipped_predictions = score_cases(model, val_ds, transforms, cfg, tta=True, keep=cfg.examples)
        per_case["dice_tta"] = flipped.per_image().numpy()
        # 3x the inference time, and not always better: chosen here, on validation, never on the test cases.
        flips = flipped.mean() > dice.mean()
        print(f"Flip test-time augmentation: validation Dice {flipped.mean():.4f} with flips, {dice.mean():.4f} "
              f"without: {'used' if flips else 'not used'} for the test cases and the submission")  # fmt: skip
        if flips:
            dice, predictions = flipped, flipped_predictions
    save_atomically(cfg.output_dir / "val_per_case.csv", lambda path: per_case.to_csv(path, index=False))
    return per_case, flips, dice, predictions


def save_choice(cfg: Config, checkpoint: dict, flips: bool) -> None:
    """best_model.pt again (atomically), with the flip TTA choice beside the weights: the Predict cell, in a fresh
    kernel too, then segments the submission as the test cases were scored."""
    made = "validation" if cfg.tta_flips else "not compared: tta_flips=False"
    checkpoint["choices"] = {"tta_flips": bool(flips), "chosen_on": made}
    save_checkpoint(checkpoint, cfg.output_dir / BEST_MODEL)


def score_test(model, cases: list[dict], transforms: Compose, cfg: Config, flips: bool) -> pd.DataFrame:
    """The held-out test cases, scored once with the weights and the TTA validation chose: Dice per case on each
    scan's own grid (test_per_case.csv), their mean with a 95% bootstrap interval over cases, and the global Dice."""
    test_ds = preprocessed(cases, transforms, cfg, "val")
    dice, _ = score_cases(model, test_ds, transforms, cfg, tta=flips)
    per_case = pd.DataFrame({"case": [c["case"] for c in cases], "dice": dice.per_image().numpy()})
    save_atomically(cfg.output_dir / "test_per_case.csv", lambda path: per_case.to_csv(path, index=False))
    print(f"Test Dice {describe_ci(per_case['dice'], unit='cases')} per case on each scan's grid (global "
          f"{dice.global_dice():.4f}){', with flip TTA' if flips else ''}: the result")  # fmt: skip
    return per_case


def evaluate_best(cfg: Config, data: Data) -> pd.DataFrame | None:
    """The best epoch's weights, read back from best_model.pt: on every validation case, where flip TTA is chosen
    (validate_best; the choice saved in best_model.pt), then once on the held-out test cases with that choice
    (test_per_case.csv), all on each scan's own grid; the outlines of validation cases (val_predictions.png).

    Returns the test cases' Dice (the validation cases' when test_fraction is 0), with `attrs` saying which cases
    ("scored"), the TTA choice ("tta_flips", "tta_compared") and validation's mean Dice with it ("val_dice"), for
    the Summary.
    Process 0 only (None in the others)."""
    if not distributed.is_main():
        return None
    model, checkpoint = load_best(cfg, build_model, DEVICE)
    cfg = as_trained(cfg, checkpoint)
    transforms = build_transforms(cfg, "val")
    val_per_case, flips, dice, predictions = validate_best(model, data.val, transforms, cfg)
    save_choice(cfg, checkpoint, flips)
    figure = draw_predictions(data.val, predictions, dice.per_image(), cfg)
    save_figure(figure, cfg.output_dir / "val_predictions.png")
    print(f"Best epoch {checkpoint['epoch']}: validation Dice {dice.mean():.4f} (mean over {len(data.val)} cases on "
          f"each scan's grid; global {dice.global_dice():.4f}{'; with flip TTA' if flips else ''}): it chose the "
          "epoch, so it is optimistic")  # fmt: skip
    per_case = score_test(model, data.test, transforms, cfg, flips) if data.test else val_per_case
    if not data.test:
        print("No test set (test_fraction 0): the only score is validation's, which chose the model: optimistic")
    per_case.attrs = {"scored": "test" if data.test else "validation", "tta_flips": flips, "val_dice": dice.mean(),
                      "tta_compared": cfg.tta_flips}  # fmt: skip
    return per_case


def axial_view(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The volume reoriented so that `view[:, :, k].T` shows axial slice k as radiologists read it (the patient's
    right on the left of the picture, anterior at the top: LPS array axes, as DICOM stores slices), and its affine."""
    ornt = nib.orientations.ornt_transform(nib.io_orientation(affine), nib.orientations.axcodes2ornt("LPS"))
    view_affine = affine @ nib.orientations.inv_ornt_aff(ornt, volume.shape)
    return nib.orientations.apply_orientation(volume, ornt), view_affine


def draw_predictions(cases: list[dict], predictions: list, dice: torch.Tensor, cfg: Config) -> Figure:
    """One axial slice per validation case (the one with the most lesion), with the true lesion outlined in green
    and the predicted one in red, both on the scan's own grid."""
    n = min(cfg.examples, len(predictions))
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
    handles = [Line2D([], [], color="lime", label="true lesion"), Line2D([], [], color="red", label="predicted")]
    fig.legend(handles=handles, loc="lower center", ncol=2)
    fig.suptitle("Validation: true lesions (green), predicted (red)", fontsize=10)
    return fig


if __name__ == "__main__":
    per_case = evaluate_best(cfg, data)
    show(per_case)
    show(cfg.output_dir / "val_predictions.png")

# %% Predict
# The trained network on CTs nobody outlined: NIfTI files (any orientation or voxel size) or folders each holding one
# DICOM series (any slice order or file names), prepared with the voxel size, HU window and window size saved in
# best_model.pt. Writes one uint8 mask per CT on that CT's own voxel grid to predictions/ (NNN.nii.gz for the
# challenge's scans: the submission) and predictions/predictions.csv (lesion volume per CT); the inputs are only read.
if not {"build_transforms", "build_model", "predict_probability", "to_scan_grid"} <= globals().keys():
    # A fresh kernel that ran only Imports and Configuration: what prediction shares with training (the Transforms
    # cell's preparation, the network, the sliding window and the mapping back onto the scan's grid) is imported from
    # this file, whose guards do not run.
    from covid_ct_segmentation import build_model, build_transforms, predict_probability, to_scan_grid


def submission_name(case_id: str) -> str:
    """`NNN.nii.gz` for case `volume-covid19-A-0NNN`: the challenge's submission name.

    The baseline cut the first 18 characters, `volume-covid19-A-0`, so case A-0011 became `011.nii.gz`. Formatting
    the number with at least three digits gives the same names for every challenge id (all below 1000) and stays
    unique if an id ever reaches 1000, where cutting a fixed prefix would not.
    """
    return f"{int(case_id):03d}.nii.gz"


def output_name(path: Path) -> str:
    """The mask's file name: the challenge's `NNN.nii.gz` for its `volume-covid19-A-0NNN_ct.nii.gz` scans (Run All
    on Validation/ writes the submission), else the input's name (a series: its folder's) + `_lesions.nii.gz`."""
    match = COVID_CASE_NAME.fullmatch(path.name)
    return submission_name(match[1]) if match and match[2] == "ct" else mask_name(path, "_lesions.nii.gz")


def default_inputs(cfg: Config) -> list[Path]:
    """The challenge's unlabelled Validation/ scans (of the sample when the download is missing, as load_data finds
    them): the submission. The first max_infer_cases only, where set (the quick run's smoke test)."""
    root, synthetic = find_dataset("COVID-19-20_v2", cfg.data_dir, say=False)  # said below, once
    scans = ct_inputs(root / "Validation") if (root / "Validation").is_dir() else []  # a stray file: named when read
    print(f"Segmenting the challenge's test scans, {root / 'Validation'}{' (synthetic)' if synthetic else ''}")
    if not scans:
        print(f"No scans in {root / 'Validation'}: no submission (set predict_inputs to predict your own CTs)")
    if cfg.max_infer_cases is not None and len(scans) > cfg.max_infer_cases:
        print(f"Segmenting the first {cfg.max_infer_cases} of {len(scans)} Validation/ scans only (max_infer_cases): "
              "not a complete submission")  # fmt: skip
        scans = scans[: cfg.max_infer_cases]
    return scans


def predict_volume(model, ct: nib.Nifti1Image, path: Path, trained: Config) -> np.ndarray:
    """The lesion mask (uint8 0/1) of CT `ct` (read from `path`) on its own voxel grid: prepared as the Evaluate
    cell prepares a validation scan (the Transforms cell's chain, from a NIfTI file), segmented by sliding window,
    the probabilities mapped back onto the scan's grid (Invertd) and thresholded there."""
    transforms = build_transforms(trained, "infer")
    with tempfile.TemporaryDirectory() as tmp:
        if path.is_dir():  # a DICOM series, read into memory: as a NIfTI file for the same chain (float32 HU)
            path = Path(tmp) / "series.nii"
            nib.save(ct, path)
        image = transforms({"image": str(path)})["image"]  # (1, X, Y, Z) in 0..1, RAS at pixdim
    if image.min() > 0.25:  # a chest CT has lungs (-850 HU: 0.1 in the default window) and air around the body
        low, high = trained.hu_window
        raise Unusable("not a CT in HU", f"{path}: nothing below {low + 0.25 * (high - low):.0f} HU, no lung or air "
                       "(a mask? a CT stored without its rescaling?)")  # fmt: skip
    prob = predict_probability(model, image, trained, tta=trained.tta_flips)
    mask = (to_scan_grid(prob, image, transforms) > trained.threshold)[0].numpy().astype(np.uint8)
    if mask.shape != ct.shape:  # cannot happen if the inversion is right: fail loudly rather than misplace a mask
        raise RuntimeError(f"Mask {mask.shape} and CT {ct.shape} differ: {path}")
    return mask


def flips_for_prediction(cfg: Config, checkpoint: dict) -> bool:
    """Flip TTA on or off as the Evaluate cell chose it on validation (saved in best_model.pt); without that choice
    (Evaluate has not run on these weights), cfg.tta_flips, said in one line."""
    choice = checkpoint.get("choices", {})
    if "tta_flips" not in choice:
        print(f"No flip TTA choice in the checkpoint (the Evaluate cell makes it on validation): tta_flips="
              f"{cfg.tta_flips}, from the configuration")  # fmt: skip
        return cfg.tta_flips
    print(f"Flip test-time augmentation {'on' if choice['tta_flips'] else 'off'}, as chosen by the Evaluate cell "
          f"({choice['chosen_on']})")  # fmt: skip
    return bool(choice["tta_flips"])


def predict(cfg: Config, inputs=None) -> list[Path]:
    """The lesion masks of `inputs` (a NIfTI CT, a folder holding one DICOM series, a folder of these, or a list;
    None: the challenge's Validation/ scans) in output_dir/predictions/, each on its CT's own grid (shape, affine),
    and predictions.csv: input, mask, lesion_ml, voxels, shape. The weights of cfg.checkpoint (default:
    output_dir/best_model.pt) with the settings they were trained with (AS_TRAINED). An unusable input is named,
    skipped and counted. Returns the files written (none if no input could be used). Process 0 only."""
    if not distributed.is_main():
        return []
    model, trained, checkpoint = load_trained(cfg, build_model, DEVICE)
    trained = replace(trained, tta_flips=flips_for_prediction(trained, checkpoint))
    paths = default_inputs(cfg) if inputs is None else ct_inputs(inputs)
    skipped = Skipped("file", print_limit=10)
    out_dir = cfg.output_dir / "predictions"  # made by segment_cts (a file in its place: one Output problem line)
    segment = partial(predict_volume, model, trained=trained)  # segment(ct, path): what the 3D scripts differ in
    rows = segment_cts(paths, segment, output_name, out_dir, "lesion_ml", skipped)
    print(skipped.summary(f"Segmented {len(rows)} of {len(paths)} CTs into {out_dir} (masks, predictions.csv)"))
    return [out_dir / row["mask"] for row in rows] + [out_dir / "predictions.csv"] if rows else []


if __name__ == "__main__":
    predictions = predict(cfg, cfg.predict_inputs)
    if predictions:  # the lesion volume per CT (the inputs' paths are in the CSV too); process 0 alone predicts
        show(pd.read_csv(predictions[-1], usecols=["mask", "lesion_ml", "voxels", "shape"]))

# %% Summary


def predicted(cfg: Config, predictions: list[Path]) -> str:
    """The summary's words on predictions/: the masks written, and the scans the Predict cell skipped (listed in
    predictions/skipped.csv), which the data line, counting the labelled Train/ files, does not include."""
    listed = cfg.output_dir / "predictions" / "skipped.csv"
    n = len(pd.read_csv(listed)) if listed.is_file() else 0  # written by every run of the Predict cell
    skips = f"; {n} scan{'s' * (n != 1)} skipped, listed in predictions/skipped.csv" if n else ""
    return f"predictions/ ({max(len(predictions) - 1, 0)} masks and predictions.csv{skips})"


def best_scores(history: History, per_case: pd.DataFrame | None) -> str:
    """The result: the test cases' mean Dice with its 95% interval (process 0 alone has them), then the best epoch's
    validation Dice, which chose that epoch (and the flip TTA) and so is optimistic."""
    best = history.best()
    text = f"validation Dice {best['val_dice']:.4f} (mean over cases on each scan's grid; global "
    text += f"{best['val_global_dice']:.4f}; it chose the epoch)"
    if per_case is None:  # under torchrun, the other processes: process 0 scored the test cases
        return text
    flips = per_case.attrs.get("tta_flips", False)
    chosen = f"flip TTA {'on' if flips else 'off'} as validation chose ({per_case.attrs.get('val_dice', 0):.4f} so)"
    if not per_case.attrs.get("tta_compared", True):
        chosen = "no flip TTA (tta_flips=False)"
    if per_case.attrs.get("scored") != "test":
        return text + f"; {chosen}; no test set (test_fraction 0): this score chose the model and is optimistic"
    return f"test Dice {describe_ci(per_case['dice'], unit='cases')} on each scan's grid, {chosen}; " + text


if __name__ == "__main__":
    pictures = readme_pictures(cfg, data, {"val_predictions.png": "covid_ct_segmentation_predictions.png"})
    print(run_summary(cfg, data, history, best_scores(history, per_case),
                      ["best_model.pt", "last_checkpoint.pt", "history.csv", "dice_per_epoch.png", "batch.png",
                       "skipped.csv", "val_per_case.csv", "test_per_case.csv", "val_predictions.png",
                       predicted(cfg, predictions)],
                      pictures))  # fmt: skip
