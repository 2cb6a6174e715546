"""Lung segmentation on chest X-rays (Montgomery County set) with a hand-written U-Net, a Trainer and an Inferencer.

Data: `data/MontgomerySet/` as downloaded from the NLM (`CXR_png/`, `ManualMask/leftMask/`, `ManualMask/rightMask/`);
without it, the synthetic stand-in in `data/sample/MontgomerySet/` (written when missing), and the script says so.
With `include_shenzhen=True`, also `data/ChinaSet_AllFiles/CXR_png/CHNCXR_####_#.png` with the separately downloaded
masks `CHNCXR_####_#_mask.png` anywhere below `data/ChinaSet_AllFiles/`. The first run prepares the films once
(`data_cleaning.prepare_lung_segmentation`: union of both lung masks, 512x512, seeded train/test split) into
`data/segmentation/` (for the sample: `data/sample/segmentation/`); the download is only read.

Outputs, in `output/lung_xray_unet/`: `best_model.pt`, `last_checkpoint.pt`, `history.csv`, `dice_per_epoch.png`,
`batch.png`, `test_per_case.csv` (Dice per test film at its original size), `test_predictions.png` (true and
predicted outlines; copied to `Images/` with `dice_per_epoch.png` for the README when the synthetic sample was used)
and `predictions/`: `<name>_mask.png` (0/255, at the film's own size) and `predictions.csv` (size, lung area) for the
test films as downloaded, or for your own films.

Run: `python lung_xray_unet.py` from any directory (`QUICK=1` for a short first try: small images, small network,
fewer epochs; `RESUME=1` to go on from the last epoch saved), or cell by cell in VS Code or Jupyter, each cell
leaving its result to look at: `cfg`, `data`, `batch`, `model`, `history`, `per_case`, `predictions`. Edit the
configuration inline (`cfg = Config(max_epochs=10)`) and run the cells below again. `DATA_DIR`, `OUTPUT_DIR` and
`IMAGES_DIR` in the environment move the data, output and picture folders (the tests use them). On several GPUs:
`torchrun --nproc_per_node=4 lung_xray_unet.py` (README: several GPUs and machines). Predict on your own films
(PNG, JPEG, DICOM) with the trained model, without training: `PREDICT=<folder or file> python lung_xray_unet.py`
(`CHECKPOINT=<best_model.pt>` for other weights).
"""

# %% Imports
import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
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
    PREPARED_CASES,
    PREPARED_MANIFEST,
    Data,
    DatasetError,
    Skipped,
    Unusable,
    expand_inputs,
    mask_name,
    one_line_data_problems,
    prepare_lung_segmentation,
    read_gray,
    read_lung_mask,
    read_radiograph,
    to_unit_range,
)
from dice import DiceAccumulator, SoftDiceLoss, describe_ci, save_figure, show
from precision import autocast, grad_scaler
from sample_data import find_dataset

# %% Configuration
# The repository root, whether run as a file from anywhere or in a notebook kernel (no __file__, cwd = repo root).
ROOT = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
QUICK = os.environ.get("QUICK", "0") == "1"  # the collection's quick-run switch (README): read here, once
DEVICE = distributed.device()  # picked once: the GPU if any (under torchrun, this process's own), else the CPU


@dataclass
class Config(BaseConfig):
    data_dir: Path = Path(os.environ.get("DATA_DIR", ROOT / "data"))  # holds MontgomerySet/ (else sample/ is used)
    output_dir: Path = Path(os.environ.get("OUTPUT_DIR", ROOT / "output" / "lung_xray_unet"))  # everything written
    images_dir: Path = Path(os.environ.get("IMAGES_DIR", ROOT / "Images"))  # the README's pictures, copied there
    # from runs on the synthetic sample only (pictures of real patients never land in a folder of the repository)
    seed: int = 0  # initial weights, shuffling and augmentation
    split_seed: int = 0  # test and validation films: kept apart from `seed` so a new seed keeps the same test set
    include_shenzhen: bool = False  # add the Shenzhen set (data/ChinaSet_AllFiles/): 662 more films, 8-bit
    prepared_size: int = 512  # side of the prepared films in segmentation/: the original preparation's 512x512
    cache: bool = True  # also keep each film decoded and shrunk on disk (cache_dir): when a film changes, only it
    # is decoded again to prepare segmentation/ anew
    cache_dir: Path | None = None  # None: <data_dir>/cache/lung_xray_unet/ (beside the download)
    test_fraction: float = 0.25  # films held out for the final test; one film per patient, so split by patient
    val_fraction: float = 0.2  # of the remaining films, to pick the best epoch by Dice (never the test films)
    max_cases: int | None = None  # films per split (train+validation, test); None: all
    image_size: int = 512  # network input side: the prepared films as they are
    depth: int = 5  # resolution levels; 5 (4 poolings) as in the paper
    start_filters: int = 32  # channels at the first level, doubled per level (the paper: 64)
    up_mode: str = "transpose"  # "transpose": the paper's 2x2 up-convolution; "bilinear": upsample + 1x1 conv
    norm: str = "instance"  # nnU-Net's: same in training and evaluation at any batch size; "batch"; "none" (paper)
    loss: str = "dice_bce"  # "dice_bce": 1 output, sigmoid; "softmax_dice": 2 outputs, softmax, one-hot Dice + CE
    max_epochs: int = 50  # lungs are large and regular: a U-Net converges in a few hundred steps
    batch_size: int = 8  # 8 films of 512 px fit one GPU (AMP)
    lr: float = 1e-3  # Adam, cosine-annealed to 0 over max_epochs
    rotate_deg: float = 5.0  # augmentation: films are taken upright, so only small rotations...
    scale: float = 0.05  # ... small zooms (patient size, distance to the detector) ...
    shift: float = 0.03  # ... and shifts (fraction of the side); no flips: the heart is on the patient's left
    intensity: float = 0.1  # brightness and contrast jitter, as exposure varies from film to film
    num_workers: int = 0  # films are cached tensors, augmented on the device per batch: workers would only add start-up
    amp: bool = True  # mixed precision on CUDA (bfloat16 where supported, else float16); ignored on the CPU
    threshold: float = 0.5  # lung probability above which a pixel is lung
    figure_cases: int = 4  # test films shown in test_predictions.png
    predict_inputs: Path | None = PREDICT  # the Predict cell's input: a folder or a file (None: the test films)
    checkpoint: Path | None = CHECKPOINT  # the weights the Predict cell uses (None: output_dir/best_model.pt)
    tensorboard: bool = False  # also log the history to output_dir/tensorboard (needs `pip install tensorboard`)
    resume: bool = RESUME  # go on from output_dir/last_checkpoint.pt (written after every epoch) up to max_epochs;
    # RESUME=1 python lung_xray_unet.py from the command line
    quick: bool = QUICK  # the quick run below; recorded in the checkpoint: a quick model is not a result
    # Read by prediction from the checkpoint, whatever the fields above say now: a film is shrunk, normalised and
    # thresholded as the training films were, and the default inputs are the test films of the split it trained on.
    AS_TRAINED: ClassVar[tuple[str, ...]] = (
        *("prepared_size", "image_size", "threshold"),  # the input preparation and the mask
        *("split_seed", "test_fraction", "include_shenzhen"),  # which films it never saw
    )

    # The quick run (QUICK=1, or Config(quick=True)): a first try in seconds on a CPU. These replace the defaults
    # above; a setting given explicitly, as in Config(quick=True, max_epochs=5), wins.
    QUICK_RUN: ClassVar[dict] = dict(
        max_cases=24,  # a short first try on the real set too (the sample has 12 films)
        image_size=64,  # lungs are large: 64 px already outlines them
        depth=3,  # a small network for small images
        start_filters=8,
        max_epochs=20,  # the sample is learnt in about 15 epochs
        batch_size=2,  # more, smaller steps per epoch on the sample's few films
        lr=3e-3,  # the tiny network takes a larger step
    )


cfg = Config()
if __name__ == "__main__":
    distributed.setup()  # under torchrun: join the other processes (README: several GPUs); else nothing
    one_line_data_problems()  # from the command line, a data folder unlike the README's is one line
    print(cfg.describe())
    if PREDICT:  # PREDICT=<folder or file> python lung_xray_unet.py: predict, no training (README)
        predict_only(__file__)

# %% Data


def prepare_data(cfg: Config, montgomery: Path) -> Path:
    """The prepared folder of the Montgomery download `montgomery` (with Shenzhen if asked), prepared if missing.

    It sits beside the download: data/segmentation, or data/sample/segmentation for the sample, never mixed."""
    shenzhen = montgomery.parent / "ChinaSet_AllFiles" if cfg.include_shenzhen else None
    cache_dir = (cfg.cache_dir or Path(cfg.data_dir) / "cache" / "lung_xray_unet") if cfg.cache else None
    return prepare_lung_segmentation(montgomery, montgomery.parent / "segmentation", cfg.prepared_size,
                                     cfg.test_fraction, cfg.split_seed, shenzhen, cache_dir)  # fmt: skip


def split_cases(prepared: Path, cfg: Config) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test) cases; validation is a seeded draw of the prepared train split.

    A case is {"name", "image", "seg" (prepared PNGs), "height", "width" (original), "image_file", "mask_files"
    (originals)}.
    """
    table = pd.read_csv(prepared / PREPARED_CASES).sort_values("name")
    cases = {split: [] for split in ("train", "test")}
    for row in table.itertuples():
        cases[row.split].append(
            {
                "name": row.name,
                "image": prepared / row.split / "image" / f"{row.name}.png",
                "seg": prepared / row.split / "mask" / f"{row.name}.png",
                "height": int(row.height),
                "width": int(row.width),
                "image_file": prepared.parent / row.image_file,
                "mask_files": [prepared.parent / f for f in row.mask_files.split(";")],
            }
        )
    pool = [cases["train"][i] for i in np.random.default_rng(cfg.split_seed).permutation(len(cases["train"]))]
    pool, test = pool[: cfg.max_cases], cases["test"][: cfg.max_cases]
    if len(pool) < 2 or not test:
        raise DatasetError(f"{prepared} holds {len(pool)} train and {len(test)} test films: need 2 and 1 at least")
    n_val = min(max(1, round(cfg.val_fraction * len(pool))), len(pool) - 1)
    return pool[n_val:], pool[:n_val], test


def read_prepared(path: Path, size: int, is_mask: bool = False) -> torch.Tensor:
    """A prepared PNG as a float tensor (1, size, size): images 0..1, masks 0/1."""
    pixels = torch.from_numpy(read_gray(path))[None, None]  # (1, 1, H, W)
    if is_mask:  # nearest neighbour keeps the mask binary: a bilinear resize would give soft, wrong labels
        return (F.interpolate(pixels, size=(size, size), mode="nearest-exact") > 0).float()[0]
    return to_network_size(pixels, size)


def to_network_size(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """A prepared film's 16-bit values (1, 1, H, W), 0..65535 = 0..1, as the network reads them: (1, size, size)."""
    # Antialiasing as in the preparation when shrinking further.
    return F.interpolate(pixels / 65535, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def film_as_prepared(pixels: np.ndarray, cfg: Config) -> torch.Tensor:
    """A film as stored (any size and bit depth, (H, W)) made the network's input (1, image_size, image_size)
    exactly as a training film was (data_cleaning.prepare_lung_segmentation, then read_prepared): shrunk to
    prepared_size with Lanczos, to 0..1 by its own percentiles (to_unit_range), rounded to the prepared PNG's 16
    bits, shrunk to image_size. The same film as an 8-bit or a 16-bit file gives the same input."""
    small = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
    small = small.resize((cfg.prepared_size, cfg.prepared_size), Image.Resampling.LANCZOS)
    stored = np.round(to_unit_range(np.asarray(small)) * 65535).astype(np.float32)  # as segmentation/ holds it
    return to_network_size(torch.from_numpy(stored)[None, None], cfg.image_size)


def decode(cases: list[dict], size: int) -> list[dict]:
    """The cases with their prepared film and lung mask decoded once at `size` and kept in memory: "film" (1, size,
    size) in 0..1, "lungs" (1, size, size) 0/1."""
    return [
        case | {"film": read_prepared(case["image"], size), "lungs": read_prepared(case["seg"], size, is_mask=True)}
        for case in tqdm(cases, desc="reading films", leave=False, disable=None)
    ]


def skipped_at_preparation(prepared: Path, cfg: Config) -> Skipped:
    """The cases the preparation named and skipped (on the run that prepared the folder), counted by problem, and
    listed in output_dir/skipped.csv (process 0)."""
    skipped = Skipped("case")
    skipped.counts.update(json.loads((prepared / PREPARED_MANIFEST).read_text())["skipped"])
    listed = prepared / "skipped.csv"
    if listed.is_file():  # a folder prepared before skipped.csv was written there has the counts only
        skipped.rows = pd.read_csv(listed, dtype=str, keep_default_na=False).to_dict("records")
    if distributed.is_main():
        skipped.save(cfg.output_dir / "skipped.csv")
    return skipped


def load_data(cfg: Config) -> Data:
    """The films of the download (or of the sample), prepared once into segmentation/ beside it, split by patient
    into train, validation and test; the train and validation films decoded at the network's size (`image_size`).
    The test films stay on disk: the Inferencer reads them at the size its network was trained at."""
    with distributed.main_first():  # process 0 writes the sample and the prepared films if missing, then the others
        root, synthetic = find_dataset("MontgomerySet", cfg.data_dir)  # says which one it is using
        prepared = prepare_data(cfg, root)
    train, val, test = split_cases(prepared, cfg)
    train, val = decode(train, cfg.image_size), decode(val, cfg.image_size)
    return Data(root, synthetic, train, val, test, unit="films", skipped=skipped_at_preparation(prepared, cfg))


if __name__ == "__main__":
    data = load_data(cfg)
    print(data)

# %% Transforms
# Plain torch rather than MONAI dictionary transforms: the films are cached tensors already, one random affine per
# batch on the device is a few lines (and as fast on a GPU as the network), and importing monai.transforms would
# add about 4 s to a 30 s quick run. Validation and test films are not augmented.


def augment(img: torch.Tensor, seg: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """A small random rotation, zoom and shift per film (the same for image and mask), and exposure jitter."""
    n = img.shape[0]

    def uniform() -> torch.Tensor:  # (N,) uniform in [-1, 1]
        return torch.rand(n, device=img.device) * 2 - 1

    angle, zoom = torch.deg2rad(cfg.rotate_deg * uniform()), 1 + cfg.scale * uniform()
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos, -sin, cfg.shift * uniform()], 1), torch.stack([sin, cos, cfg.shift * uniform()], 1)], 1
    )  # (N, 2, 3)
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    img = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
    seg = F.grid_sample(seg, grid, mode="nearest", padding_mode="zeros", align_corners=False)  # stays 0/1
    contrast, brightness = 1 + cfg.intensity * uniform(), cfg.intensity * uniform()
    return img * contrast.view(n, 1, 1, 1) + brightness.view(n, 1, 1, 1), seg


def build_transforms(cfg: Config) -> Callable:
    """The training augmentation: `augment(img, seg) -> (img, seg)` on a batch (B, 1, S, S), on its own device.

    It draws from torch's random generator: seeded by build_model, and per process under torchrun (Trainer)."""
    return functools.partial(augment, cfg=cfg)


def films(cases: list[dict], size: int) -> TensorDataset:
    """(film, lungs) of decoded cases as a dataset of tensors (N, 1, size, size); empty for no case (under
    torchrun, a process's share of few validation films may be empty)."""
    if not cases:
        return TensorDataset(torch.zeros(0, 1, size, size), torch.zeros(0, 1, size, size))
    return TensorDataset(torch.stack([c["film"] for c in cases]), torch.stack([c["lungs"] for c in cases]))


def build_loaders(cfg: Config, data: Data) -> tuple[DataLoader, DataLoader]:
    """(training loader: shuffled; validation loader: this process's share of the validation films).

    Under torchrun each process trains on its own shard of the films, reshuffled every epoch, with batch_size
    films per process and step; in one process there is no sampler and the loader shuffles."""
    args = {"batch_size": cfg.batch_size, "num_workers": cfg.num_workers, "pin_memory": DEVICE.type == "cuda"}
    train_ds = films(data.train, cfg.image_size)
    sampler = distributed.train_sampler(train_ds, cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    train_loader = DataLoader(train_ds, shuffle=sampler is None, sampler=sampler, generator=generator, **args)
    return train_loader, DataLoader(films(distributed.shard(data.val), cfg.image_size), **args)


def draw_batch(batch: tuple[torch.Tensor, torch.Tensor], n: int = 6) -> Figure:
    """The first films of a training batch as the network gets them (augmented, at its size), lungs outlined."""
    img, seg = batch
    n = min(n, len(img))
    fig = Figure(figsize=(2.6 * n, 2.8), dpi=100)
    for i in range(n):
        ax = fig.add_subplot(1, n, i + 1)
        ax.imshow(img[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)  # exposure jitter shows as a darker or paler film
        ax.contour(seg[i, 0].numpy(), levels=[0.5], colors="lime", linewidths=1)
        ax.axis("off")
    fig.suptitle(f"An augmented training batch: films {tuple(img.shape)} {img.dtype}, lungs in green", fontsize=10)
    return fig


if __name__ == "__main__":
    train_loader, val_loader = build_loaders(cfg, data)
    batch = build_transforms(cfg)(*next(iter(train_loader)))  # (films, lung masks): (B, 1, S, S) each
    show(save_figure(draw_batch(batch), cfg.output_dir / "batch.png"))

# %% Model and loss
# U-Net: Ronneberger, Fischer, Brox, "U-Net: Convolutional Networks for Biomedical Image Segmentation", MICCAI 2015,
# https://arxiv.org/abs/1505.04597. A contracting path of 3x3 convolutions and 2x2 max pooling that doubles the
# channels at each level, an expanding path that halves them, and skip connections that concatenate the
# contracting path's maps, so the outlines keep their full-resolution detail. Two changes, as most re-implementations
# make: padded convolutions (the output has the input's size, no overlap-tile), and optional normalisation.


def norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


def conv_block(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """Two 3x3 convolutions, each followed by normalisation and ReLU."""
    layers = []
    for channels in (in_channels, out_channels):
        bias = norm == "none"  # a normalisation layer brings its own shift
        layers += [
            nn.Conv2d(channels, out_channels, 3, padding=1, bias=bias),
            norm_layer(norm, out_channels),
            nn.ReLU(),
        ]
    return nn.Sequential(*layers)


class UNet(nn.Module):
    """U-Net with `depth` resolution levels, `start_filters` channels at the first, any input size.

    (B, in_channels, H, W) -> logits (B, out_channels, H, W). Inputs whose sides are not multiples of
    2**(depth - 1) are padded for the poolings and the output cropped back.
    """

    def __init__(self, in_channels=1, out_channels=1, depth=5, start_filters=64, up_mode="transpose", norm="instance"):
        super().__init__()
        if up_mode not in ("transpose", "bilinear"):
            raise ValueError(f"up_mode must be 'transpose' or 'bilinear', not {up_mode!r}")
        if norm not in ("batch", "instance", "none"):
            raise ValueError(f"norm must be 'batch', 'instance' or 'none', not {norm!r}")
        if depth < 2:
            raise ValueError(f"depth must be 2 or more (one pooling at least), not {depth}")
        widths = [start_filters * 2**level for level in range(depth)]
        self.down = nn.ModuleList(conv_block(c_in, c_out, norm) for c_in, c_out in zip([in_channels, *widths], widths))
        self.ups, self.up_blocks = nn.ModuleList(), nn.ModuleList()
        for wide, narrow in zip(widths[:0:-1], widths[-2::-1]):  # from the bottom level up
            if up_mode == "transpose":
                self.ups.append(nn.ConvTranspose2d(wide, narrow, 2, stride=2))
            else:  # no learned up-sampling kernel, hence no checkerboard artefacts
                self.ups.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(wide, narrow, 1)))
            self.up_blocks.append(conv_block(2 * narrow, narrow, norm))  # skip connection + up-sampled maps
        self.head = nn.Conv2d(widths[0], out_channels, 1)
        self.multiple = 2 ** (depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        x = F.pad(x, (0, -width % self.multiple, 0, -height % self.multiple))
        skips = []
        for level, block in enumerate(self.down):
            x = block(x if level == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()  # the bottom level
        for up, block in zip(self.ups, self.up_blocks):
            x = block(torch.cat([skips.pop(), up(x)], dim=1))
        return self.head(x)[..., :height, :width]


def build_model(cfg: Config) -> UNet:
    """One grayscale channel in; one logit (sigmoid) or two (softmax over background and lung) out."""
    seed_everything(cfg.seed)  # the same initial weights for the same seed, in every process
    out_channels = {"dice_bce": 1, "softmax_dice": 2}[cfg.loss]
    return UNet(1, out_channels, cfg.depth, cfg.start_filters, cfg.up_mode, cfg.norm)


def lung_logit(logits: torch.Tensor) -> torch.Tensor:
    """The lung logit (B, 1, H, W) of either head: sigmoid(it) is the lung probability, it > 0 the mask.

    For two classes, softmax(l)[lung] = sigmoid(l_lung - l_background), so both heads share every step below.
    """
    return logits if logits.shape[1] == 1 else logits[:, 1:] - logits[:, :1]


class LungLoss(nn.Module):
    """Soft Dice + cross-entropy, for either head; `seg` is the 0/1 mask (B, 1, H, W).

    Dice alone gives weak gradients early on and cross-entropy alone is swayed by the large background: their sum
    trains fast and well. The softmax head's Dice is taken against one-hot targets, over both channels (a
    2-channel output compared with class indices would score the wrong thing).
    """

    def __init__(self, mode: str):
        super().__init__()
        if mode not in ("dice_bce", "softmax_dice"):
            raise ValueError(f"loss must be 'dice_bce' or 'softmax_dice', not {mode!r}")
        self.mode, self.dice = mode, SoftDiceLoss()

    def forward(self, logits: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        if self.mode == "dice_bce":
            return self.dice(logits, seg) + F.binary_cross_entropy_with_logits(logits.float(), seg)
        one_hot = torch.cat([1 - seg, seg], dim=1)  # (B, 2, H, W): background, lung
        # The sigmoid of each logit minus the other is that channel's softmax: dice.soft_dice_loss applies to it.
        return self.dice(logits - logits.flip(1), one_hot) + F.cross_entropy(logits.float(), seg[:, 0].long())


if __name__ == "__main__":
    model = build_model(cfg)
    print(f"U-Net: depth {cfg.depth}, {cfg.start_filters} start filters, {cfg.up_mode} up-sampling, {cfg.norm} "
          f"norm, {sum(p.numel() for p in model.parameters()):,} parameters; loss {cfg.loss}")  # fmt: skip

# %% Train


class Trainer:
    """Trains `model` on the training films, validates every epoch, keeps the epoch with the best validation Dice
    (pooled over all validation films, as nnU-Net's online "pseudo Dice" that picks its checkpoint): `fit()`.

    The per-epoch bookkeeping is checkpoints.TrainingRun's: best_model.pt, last_checkpoint.pt (resume=True goes on
    from it), history.csv, dice_per_epoch.png, and the stop on Ctrl-C or a loss that is not finite, with one line.

    Under torchrun, `model` (saved, validated) is trained through `train_model`, its DistributedDataParallel
    wrapper, each process on its own shard of the films; `val_loader` holds this process's share of the validation
    films, and the scores of all are gathered. Only process 0 writes. In one process `train_model` is `model`.
    """

    def __init__(self, cfg: Config, data: Data, model: nn.Module):
        torch.backends.cudnn.benchmark = DEVICE.type == "cuda"  # fixed input size: let cuDNN pick its fastest kernels
        self.cfg, self.data = cfg, data
        self.train_loader, self.val_loader = build_loaders(cfg, data)
        self.model = model.to(DEVICE)
        self.train_model = distributed.wrap(self.model)  # DDP under torchrun (gradients averaged); `model` is saved
        self.augment = build_transforms(cfg)
        self.loss_fn = LungLoss(cfg.loss)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=cfg.max_epochs)
        self.scaler = grad_scaler(DEVICE, cfg.amp)  # float16 only: none with bfloat16 or on the CPU (precision.py)
        if distributed.world_size() > 1:  # the augmentation draws from torch's generator: each process its own way
            torch.manual_seed(cfg.seed + distributed.rank())

    def train_one_epoch(self, epoch: int) -> float:
        """One pass over the training films, augmented; the mean loss per film."""
        self.train_model.train()
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}", leave=False, disable=None)
        losses = EpochLoss(epoch, self.cfg.lr, bar)  # read one step late: the GPU never waits for a loss to be read
        for step, (img, seg) in enumerate(bar):
            img, seg = self.augment(img.to(DEVICE, non_blocking=True), seg.to(DEVICE, non_blocking=True))
            with autocast(DEVICE, self.cfg.amp):
                loss = self.loss_fn(self.train_model(img), seg)
            # Under torchrun, the mean over the processes: all stop at the same step (one stopping alone would leave
            # the others waiting for it), and the history's loss is that of every film trained on. In one process,
            # the loss itself. A loss that is not finite stops training (FloatingPointError, naming epoch and batch).
            losses.add(step, distributed.average(loss.detach()), len(img))
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()  # under torchrun, DDP averages the gradients of all processes here
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return losses.mean()  # checks the last step too

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The validation row: loss per film, and the Dice of the thresholded predictions at the network's size,
        over all films (`val_dice`, the one that picks the best epoch) and per film (`val_mean_dice`). Under
        torchrun each process validates its share of the films (`val_loader`), and the scores cover all of them."""
        self.model.eval()
        total, count = 0.0, 0
        dice = DiceAccumulator(empty="one")  # every film has lungs: the convention for empty masks never applies
        for img, seg in self.val_loader:
            img, seg = img.to(DEVICE), seg.to(DEVICE)
            with autocast(DEVICE, self.cfg.amp):
                logits = self.model(img)
            total, count = total + self.loss_fn(logits, seg).item() * len(img), count + len(img)
            dice.update(torch.sigmoid(lung_logit(logits).float()) > self.cfg.threshold, seg > 0.5)
        total, count = distributed.all_sum(total, count)  # every process's films (unchanged in one process)
        dice = distributed.gather_dice(dice)
        return {"val_loss": total / count, "val_dice": dice.global_dice(), "val_mean_dice": dice.mean()}

    def fit(self) -> History:
        """Train up to max_epochs (with resume=True, from the epoch after last_checkpoint.pt), validating every
        epoch. Returns the history, one row per epoch (history.csv); `history.stopped` says why if it stopped early."""
        print(f"Training on {DEVICE.type}: {len(self.data.train)} films, {len(self.train_loader)} steps per epoch")
        parts = {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler, "scaler": self.scaler}
        title = "Lung segmentation: validation Dice per epoch"
        with TrainingRun(self.cfg, "val_dice", title=title, **parts) as run:
            for epoch in run.epochs(self.train_loader):
                train_loss = self.train_one_epoch(epoch)
                self.scheduler.step()  # cosine annealing, one step per epoch
                run.end_epoch(train_loss=train_loss, **self.evaluate())
        return run.history


if __name__ == "__main__":
    history = Trainer(cfg, data, model).fit()
    show(cfg.output_dir / "dice_per_epoch.png")
    end_if_stopped(history)  # Ctrl-C or a loss that was not finite: said why; the cells below do not run

# %% Evaluate


class Inferencer:
    """The best epoch's network, read back and built with the configuration it was trained with (whatever `cfg`
    says now); segments films at its input size, then at each film's own size.

    For the Evaluate cell (`Inferencer(cfg)`): output_dir/best_model.pt, thresholded at `cfg.threshold`. For the
    Predict cell (`for_prediction=True`): `cfg.checkpoint` (else best_model.pt), and everything in
    `Config.AS_TRAINED` as trained, the threshold too (`trained`).
    """

    def __init__(self, cfg: Config, for_prediction: bool = False):
        if for_prediction:
            self.model, self.trained, checkpoint = load_trained(cfg, build_model, DEVICE)
            self.threshold = self.trained.threshold
        else:
            self.model, checkpoint = load_best(cfg, build_model, DEVICE)
            self.trained, self.threshold = type(cfg).from_dict(checkpoint["config"]), cfg.threshold
        self.epoch, self.val_dice = checkpoint["epoch"], checkpoint["metric"]

    @torch.no_grad()
    def mask(self, film: torch.Tensor, height: int, width: int) -> np.ndarray:
        """The lung mask, bool (height, width), of a film prepared at the network's input size (1, S, S).

        The probabilities are resized (bilinearly) before thresholding, not the mask: a 512-px mask blown up to a
        4892-px film with nearest neighbour has 10-px stairs along every outline, where interpolated probabilities
        give smooth outlines that fall between the network's pixels.
        """
        prob = torch.sigmoid(lung_logit(self.model(film[None].to(DEVICE))).float())  # (1, 1, S, S)
        prob = F.interpolate(prob, size=(height, width), mode="bilinear", align_corners=False)
        return (prob[0, 0] > self.threshold).cpu().numpy()

    def predict(self, case: dict) -> np.ndarray:
        """The lung mask of one prepared case at its original (height, width), bool."""
        return self.mask(read_prepared(case["image"], self.trained.image_size), case["height"], case["width"])

    def predict_film(self, pixels: np.ndarray) -> np.ndarray:
        """The lung mask of a film as stored (H, W), any size and bit depth, at that size, bool: prepared as the
        training films were. A test film's original gives the mask `predict` gives for its prepared case."""
        return self.mask(film_as_prepared(pixels, self.trained), *pixels.shape)

    def segment(self, cases: list[dict], keep: int = 0) -> tuple[pd.DataFrame, DiceAccumulator, list]:
        """Every film of `cases` segmented and scored against the original masks at the film's own size: (one row
        per film, the scores of all, the (true, predicted) masks of the first `keep` films, for a figure)."""
        dice, rows, kept = DiceAccumulator(empty="one"), [], []
        for case in tqdm(cases, desc="test", leave=False, disable=None):
            pred = self.predict(case)
            truth = read_lung_mask(case["mask_files"], pred.shape)  # the original union mask, at the original size
            dice.update(torch.from_numpy(pred)[None], torch.from_numpy(truth)[None])
            rows.append({"name": case["name"], "height": case["height"], "width": case["width"]})
            if len(kept) < keep:
                kept.append((truth, pred))
        per_case = pd.DataFrame(rows, columns=["name", "height", "width"])
        per_case["dice"] = dice.per_image().tolist() if rows else []
        return per_case, dice, kept


def draw_predictions(cases: list[dict], per_case: pd.DataFrame, masks: list[tuple]) -> Figure:
    """Test films at their original size with their true (green) and predicted (red) lung outlines; `masks[i]` is
    the (true, predicted) pair of `cases[i]`, as scored."""
    fig = Figure(figsize=(3.5 * len(cases), 4.2), dpi=100)
    for i, (case, score, (truth, pred)) in enumerate(zip(cases, per_case["dice"], masks)):
        ax = fig.add_subplot(1, len(cases), i + 1)
        step = max(1, max(truth.shape) // 1024)  # a 4892-px film is drawn at a quarter: same outlines, faster
        ax.imshow(to_unit_range(read_gray(case["image_file"])[::step, ::step]), cmap="gray")
        ax.contour(truth[::step, ::step], levels=[0.5], colors="lime", linewidths=1.2)
        ax.contour(pred[::step, ::step], levels=[0.5], colors="red", linewidths=1.2)
        ax.set_title(f"{case['name']}\nDice {score:.3f}", fontsize=9)
        ax.axis("off")
    handles = [Line2D([], [], color="lime", label="true"), Line2D([], [], color="red", label="predicted")]
    fig.legend(handles=handles, loc="lower center", ncol=2)
    return fig


def evaluate_best(cfg: Config, data: Data) -> pd.DataFrame | None:
    """The best epoch's network on the held-out test films: the Dice per film at its original size
    (test_per_case.csv, returned) and the outlines (test_predictions.png); their masks are the Predict cell's.
    Process 0 only (None in the others)."""
    if not distributed.is_main():
        return None
    inferencer = Inferencer(cfg)
    per_case, dice, shown = inferencer.segment(data.test, keep=cfg.figure_cases)
    save_atomically(cfg.output_dir / "test_per_case.csv", lambda path: per_case.to_csv(path, index=False))
    figure = draw_predictions(data.test[: len(shown)], per_case, shown)
    save_figure(figure, cfg.output_dir / "test_predictions.png")
    # The headline is the mean of the films' Dice, as published for Montgomery (each film counts once); the pooled
    # Dice (all films' pixels at once) beside it weighs the large films more.
    print(f"Best epoch {inferencer.epoch}: test Dice {describe_ci(per_case['dice'], unit='films')} per film at its "
          f"original size (pooled {dice.global_dice():.4f}); validation Dice {inferencer.val_dice:.4f} (pooled, "
          "chose the epoch)")  # fmt: skip
    return per_case


if __name__ == "__main__":
    per_case = evaluate_best(cfg, data)
    show(per_case)
    show(cfg.output_dir / "test_predictions.png")

# %% Predict
# The trained network on films of your own, PNG, JPEG or DICOM of any size and bit depth (by default the held-out
# test films as downloaded): predictions/<name>_mask.png (0/255, at the film's own size) and predictions.csv (one row
# per film: its size and lung area, in cm2 too where a DICOM gives its pixel spacing). It needs the Imports and
# Configuration cells and a trained best_model.pt (or cfg.checkpoint), nothing else.

if "Inferencer" not in globals():  # a fresh kernel, where only Imports and Configuration ran: the definitions of
    from lung_xray_unet import Inferencer, split_cases  # the cells above, from the script (importing runs no stage)

PREDICTION_COLUMNS = ["input", "mask", "height", "width", "lung_area_px", "lung_area_cm2"]


def held_out_films(trained: Config) -> list[Path]:
    """The original files of the test films the Evaluate cell scores: films the network never saw. The prepared
    folder records the split (cases.csv, prepared.json); it must be the split the checkpoint (`trained`) used."""
    montgomery, synthetic = find_dataset("MontgomerySet", trained.data_dir, say=False)  # as load_data finds it
    prepared = montgomery.parent / "segmentation"
    if not (prepared / PREPARED_MANIFEST).is_file():
        raise DatasetError(f"{prepared} is not prepared: run the Data cell once (it holds out the test films), or "
                           "give predict_inputs (a folder or files)")  # fmt: skip
    split = json.loads((prepared / PREPARED_MANIFEST).read_text())
    found = (split["seed"], split["test_fraction"], split["shenzhen"] is not None)
    wanted = (trained.split_seed, trained.test_fraction, trained.include_shenzhen)
    if found != wanted:  # another split's test films may be this network's training films
        raise DatasetError(f"{prepared} holds another split (split_seed, test_fraction, include_shenzhen: {found}) "
                           f"than the checkpoint's {wanted}: give predict_inputs, or prepare its split")  # fmt: skip
    films = [case["image_file"] for case in split_cases(prepared, trained)[2]]
    print(f"Predicting the {len(films)} test films held out in {prepared}{' (SYNTHETIC)' if synthetic else ''}")
    return films


def predict_one(inferencer: Inferencer, path: Path, out_dir: Path, taken: set[str]) -> dict:
    """One film's mask written to out_dir/<name>_mask.png (0/255 at the film's own size); its predictions.csv
    row. Raises Unusable for a file that is not a readable radiograph, or whose name another input already took."""
    name = mask_name(path, "_mask.png")
    if name in taken:
        raise Unusable("same name as another input", f"{path} would overwrite the mask {name} of an earlier input")
    pixels, spacing = read_radiograph(path)  # bright = dense, as the training films; spacing (rows, columns) mm
    mask = inferencer.predict_film(pixels)
    png = Image.fromarray(mask.astype(np.uint8) * np.uint8(255))
    save_atomically(out_dir / name, lambda partial: png.save(partial, format="PNG"))
    taken.add(name)
    area = int(mask.sum())
    cm2 = area * spacing[0] * spacing[1] / 100 if spacing else None  # mm2 per pixel; 100 mm2 = 1 cm2
    return {"input": str(path.absolute()), "mask": name, "height": mask.shape[0], "width": mask.shape[1],
            "lung_area_px": area, "lung_area_cm2": cm2}  # fmt: skip


def predict(cfg: Config, inputs=None) -> list[Path]:
    """Lung masks of the films in `inputs` (a folder, a file, or a list of files; None: the held-out test films),
    with the trained network and its own input preparation and threshold, into output_dir/predictions/. A file
    that cannot be used is named, skipped and counted; the inputs are only read. Returns the files written (the
    masks, then predictions.csv; none when nothing could be predicted). Process 0 only ([] in the others)."""
    if not distributed.is_main():
        return []
    inferencer = Inferencer(cfg, for_prediction=True)
    paths = expand_inputs(inputs) if inputs is not None else held_out_films(inferencer.trained)
    out_dir = make_folder(cfg.output_dir / "predictions")
    skipped, rows, taken = Skipped("file", print_limit=10), [], set()
    for path in tqdm(paths, desc="predict", leave=False, disable=None):
        try:
            rows.append(predict_one(inferencer, path, out_dir, taken))
        except Unusable as err:
            skipped.skip(path, err)
    if not rows:
        print(skipped.summary(f"No lung mask predicted in {out_dir}, of {len(paths)} given"))
        return []
    table = pd.DataFrame(rows, columns=PREDICTION_COLUMNS)
    save_atomically(out_dir / "predictions.csv", lambda partial: table.to_csv(partial, index=False))
    print(skipped.summary(f"Predicted {len(rows)} lung mask(s) in {out_dir} (predictions.csv)"))
    return [*(out_dir / row["mask"] for row in rows), out_dir / "predictions.csv"]


if __name__ == "__main__":
    predictions = predict(cfg, cfg.predict_inputs)

# %% Summary
OUTPUTS = ["best_model.pt", "last_checkpoint.pt", "history.csv", "dice_per_epoch.png", "batch.png", "skipped.csv",
           "test_per_case.csv", "test_predictions.png", "predictions/ (<film>_mask.png, predictions.csv)"]  # fmt: skip
PICTURES = {name: f"lung_xray_unet_{name}" for name in ("test_predictions.png", "dice_per_epoch.png")}


def best_text(history: History, per_case: pd.DataFrame | None) -> str:
    """The result: the test films' mean Dice with its 95% interval (process 0 alone has them), then the best
    epoch's validation Dice, which chose that epoch and so is optimistic."""
    text = f"validation Dice {history.best()['val_dice']:.4f} (pooled; it chose the epoch)"
    if per_case is not None:
        text = f"test Dice {describe_ci(per_case['dice'], unit='films')} at their original size; " + text
    return text


if __name__ == "__main__":
    pictures = readme_pictures(cfg, data, PICTURES)  # from the synthetic sample only
    print(run_summary(cfg, data, history, best_text(history, per_case), OUTPUTS, pictures))
