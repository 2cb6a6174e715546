"""Lung segmentation on chest X-rays (Montgomery County set) with a hand-written U-Net, a Trainer and an Inferencer.

Data: `data/MontgomerySet/` as downloaded from the NLM (`CXR_png/`, `ManualMask/leftMask/`, `ManualMask/rightMask/`);
without it, the synthetic stand-in in `data/sample/MontgomerySet/` (written when missing). With
`include_shenzhen=True`, also `data/ChinaSet_AllFiles/CXR_png/CHNCXR_####_#.png` with the separately downloaded
masks `CHNCXR_####_#_mask.png` anywhere below `data/ChinaSet_AllFiles/`. The first run prepares the films once
(`data_cleaning.prepare_lung_segmentation`: union of both lung masks, 512x512, seeded train/test split) into
`data/segmentation/` (for the sample: `data/sample/segmentation/`); the download is only read.

Outputs, in `output/lung_xray_unet/`: `best_model.pt` (model, optimizer, config, epoch, validation Dice),
`history.csv` and `dice_per_epoch.png` (rewritten every epoch), `predicted_masks/<name>.png` (0/255, each at its
film's original size), `test_dice.csv` (Dice per test film) and `test_predictions.png` (true and predicted outlines).

    python lung_xray_unet.py            # from any directory; or cell by cell in VS Code / Jupyter
    QUICK=1 python lung_xray_unet.py    # a short first try: small images, small network, fewer epochs

`DATA_DIR` and `OUTPUT_DIR` in the environment move the data and output folders (the tests use them). On several
GPUs: `torchrun --nproc_per_node=4 lung_xray_unet.py` (README: several GPUs and machines).
"""

# %% Imports
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

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
    EpochLoss,
    best_so_far,
    config_dict,
    resume,
    save_checkpoint,
    save_history,
    save_last,
    stop_message,
)
from data_cleaning import (
    PREPARED_CASES,
    DatasetError,
    prepare_lung_segmentation,
    read_gray,
    read_lung_mask,
    to_unit_range,
)
from dice import DiceAccumulator, SoftDiceLoss, log_epoch, plot_dice_history, tensorboard_writer
from precision import autocast, grad_scaler
from sample_data import find_dataset

# %% Configuration
QUICK = os.environ.get("QUICK", "0") == "1"  # the collection's quick-run switch (README): read here, once
# The repository root, whether run as a file from anywhere or in a notebook kernel (no __file__, cwd = repo root).
ROOT = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
DEVICE = distributed.device()  # picked once: the GPU if any (under torchrun, this process's own), else the CPU


@dataclass
class Config:
    data_dir: Path = Path(os.environ.get("DATA_DIR", ROOT / "data"))  # holds MontgomerySet/ (else sample/ is used)
    output_dir: Path = Path(os.environ.get("OUTPUT_DIR", ROOT / "output" / "lung_xray_unet"))  # everything written
    images_dir: Path = Path(os.environ.get("IMAGES_DIR", ROOT / "Images"))  # the README's pictures, copied there
    # from runs on the synthetic sample only (pictures of real patients never land in a folder of the repository)
    seed: int = 0  # initial weights, shuffling and augmentation
    split_seed: int = 0  # test and validation films: kept apart from `seed` so a new seed keeps the same test set
    quick: bool = QUICK  # recorded in the checkpoint: a quick model is not a result
    include_shenzhen: bool = False  # add the Shenzhen set (data/ChinaSet_AllFiles/): 662 more films, 8-bit
    prepared_size: int = 512  # side of the prepared films in segmentation/: the original preparation's 512x512
    test_fraction: float = 0.25  # films held out for the final test; one film per patient, so split by patient
    val_fraction: float = 0.2  # of the remaining films, to pick the best epoch by Dice (never the test films)
    max_cases: int | None = 24 if QUICK else None  # films per split (train+validation, test); None: all
    image_size: int = 64 if QUICK else 512  # network input side; lungs are large: 64 px already outlines them
    depth: int = 3 if QUICK else 5  # resolution levels; 5 (4 poolings) as in the paper
    start_filters: int = 8 if QUICK else 32  # channels at the first level, doubled per level (the paper: 64)
    up_mode: str = "transpose"  # "transpose": the paper's 2x2 up-convolution; "bilinear": upsample + 1x1 conv
    norm: str = "instance"  # nnU-Net's: same in training and evaluation at any batch size; "batch"; "none" (paper)
    loss: str = "dice_bce"  # "dice_bce": 1 output, sigmoid; "softmax_dice": 2 outputs, softmax, one-hot Dice + CE
    max_epochs: int = 20 if QUICK else 50  # lungs are large and regular: a U-Net converges in a few hundred steps
    batch_size: int = 2 if QUICK else 8  # quick: more, smaller steps per epoch; 8 films of 512 px fit one GPU (AMP)
    lr: float = 3e-3 if QUICK else 1e-3  # Adam, cosine-annealed to 0; the tiny quick network takes a larger step
    rotate_deg: float = 5.0  # augmentation: films are taken upright, so only small rotations...
    scale: float = 0.05  # ... small zooms (patient size, distance to the detector) ...
    shift: float = 0.03  # ... and shifts (fraction of the side); no flips: the heart is on the patient's left
    intensity: float = 0.1  # brightness and contrast jitter, as exposure varies from film to film
    num_workers: int = 0  # films are cached tensors, augmented on the device per batch: workers would only add start-up
    amp: bool = True  # mixed precision on CUDA (bfloat16 where supported, else float16); ignored on the CPU
    threshold: float = 0.5  # lung probability above which a pixel is lung
    figure_cases: int = 4  # test films shown in test_predictions.png
    tensorboard: bool = False  # also log the history to output_dir/tensorboard (needs `pip install tensorboard`)
    resume: bool = False  # go on from output_dir/last_checkpoint.pt (written after every epoch) up to max_epochs


cfg = Config()

# %% Data


def prepare_data(cfg: Config) -> Path:
    """The prepared folder: real data when `data_dir/MontgomerySet` exists, else the sample; prepared if missing."""
    montgomery, _ = find_dataset("MontgomerySet", Path(cfg.data_dir))  # says which one it is using
    shenzhen = montgomery.parent / "ChinaSet_AllFiles" if cfg.include_shenzhen else None
    # The prepared folder sits beside the dataset used: data/segmentation or data/sample/segmentation, never mixed.
    return prepare_lung_segmentation(
        montgomery, montgomery.parent / "segmentation", cfg.prepared_size, cfg.test_fraction, cfg.split_seed, shenzhen
    )


def split_cases(prepared: Path, cfg: Config) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test) cases; validation is a seeded draw of the prepared train split.

    A case is {"name", "image", "seg" (prepared PNGs), "height", "width" (original), "mask_files" (originals)}.
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
    if is_mask:
        # Nearest neighbour keeps the mask binary (the original resized masks bilinearly: soft, wrong labels).
        return (F.interpolate(pixels, size=(size, size), mode="nearest-exact") > 0).float()[0]
    # Prepared images are 16-bit, 0..65535 = 0..1; antialiasing as in the preparation when shrinking further.
    return F.interpolate(pixels / 65535, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def load_cases(cases: list[dict], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and masks of `cases` at `size`, decoded once and kept in memory: (N, 1, size, size) each."""
    if not cases:  # under torchrun, a process's share of few validation films may be empty
        return torch.zeros(0, 1, size, size), torch.zeros(0, 1, size, size)
    images = torch.stack([read_prepared(case["image"], size) for case in cases])
    segs = torch.stack([read_prepared(case["seg"], size, is_mask=True) for case in cases])
    return images, segs


# %% Transforms
# Plain torch rather than MONAI dictionary transforms: the films are cached tensors already, one random affine per
# batch on the device is a few lines (and as fast on a GPU as the network), and importing monai.transforms would
# add about 4 s to a 30 s quick run.


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
    trains fast and well. The original compared a 2-channel output with class indices in its Dice loss; here the
    softmax head's Dice is taken against one-hot targets, over both channels.
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


# %% Train and evaluate


class Trainer:
    """Trains on `train_loader`, validates every epoch, keeps the epoch with the best validation Dice.

    Each epoch appends a row to `history` and rewrites `history.csv` and `dice_per_epoch.png`; an epoch that
    improves the validation Dice (summed over all validation films, as nnU-Net does) rewrites `best_model.pt`;
    every epoch rewrites `last_checkpoint.pt`, everything needed to go on (`resume=True`). Both are replaced
    atomically, so a kill at any moment leaves the previous ones whole. Ctrl-C or a loss that is not finite stops
    training with one line that says where, and sets `stopped`; the checkpoints on disk are kept.

    Under torchrun, `model` (saved, validated) is trained through `train_model`, its DistributedDataParallel
    wrapper, each process on its own shard of the films; `val_loader` holds this process's share of the validation
    films, and the scores of all are gathered. Only process 0 writes. In one process `train_model` is `model`.
    """

    def __init__(self, cfg: Config, model: nn.Module, train_loader: DataLoader, val_loader: DataLoader):
        self.cfg, self.model, self.train_loader, self.val_loader = cfg, model, train_loader, val_loader
        self.train_model = distributed.wrap(model)  # DDP under torchrun (gradients averaged); `model` is what is saved
        self.output_dir = Path(cfg.output_dir)
        self.loss_fn = LungLoss(cfg.loss)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=cfg.max_epochs)
        self.scaler = grad_scaler(DEVICE, cfg.amp)  # float16 only: none with bfloat16 or on the CPU (precision.py)
        self.history: list[dict] = []
        self.best_dice, self.best_epoch = -math.inf, 0
        self.stopped: str | None = None  # why training stopped before max_epochs, if it did

    def train_one_epoch(self, epoch: int) -> float:
        """One pass over the training films, augmented; the mean loss per film."""
        self.train_model.train()
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}", leave=False, disable=None)
        losses = EpochLoss(epoch, self.cfg.lr, bar)  # read one step late: the GPU never waits for a loss to be read
        for step, (img, seg) in enumerate(bar):
            img, seg = augment(img.to(DEVICE, non_blocking=True), seg.to(DEVICE, non_blocking=True), self.cfg)
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
        mean = losses.mean()  # checks the last step before the learning rate moves on
        self.scheduler.step()
        return mean

    @torch.no_grad()
    def evaluate(self) -> tuple[float, DiceAccumulator]:
        """Validation loss per film, and the Dice of the thresholded predictions (at the network's size). Under
        torchrun each process validates its share of the films (`val_loader`), and both results cover all of them."""
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
        return total / count, distributed.gather_dice(dice)

    def save_best(self, epoch: int, val_dice: float) -> None:
        checkpoint = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "config": config_dict(self.cfg),
            "epoch": epoch,
            "metric": val_dice,
            "metric_name": "validation Dice",
        }
        save_checkpoint(checkpoint, self.output_dir / "best_model.pt")

    def fit(self) -> list[dict]:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        parts = {name: getattr(self, name) for name in ("model", "optimizer", "scheduler", "scaler")}
        first_epoch = 1
        if self.cfg.resume:
            first_epoch, self.history = resume(self.output_dir, DEVICE, **parts)
            self.best_dice, self.best_epoch = best_so_far(self.output_dir / "best_model.pt")
        writer = tensorboard_writer(self.cfg.tensorboard and distributed.is_main(), self.output_dir / "tensorboard")
        try:
            self.train_epochs(first_epoch, writer, parts)
        # Ctrl-C (or Interrupt in a notebook) drops the epoch under way; a loss that is not finite stops training.
        except (KeyboardInterrupt, FloatingPointError) as err:
            self.stopped = stop_message(err, self.output_dir, self.history, self.output_dir / "best_model.pt")
        finally:
            if writer is not None:
                writer.close()
        if self.stopped:
            print(self.stopped)
        return self.history

    def train_epochs(self, first_epoch: int, writer, parts: dict) -> None:
        for epoch in range(first_epoch, self.cfg.max_epochs + 1):
            start = time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            distributed.set_epoch(self.train_loader, epoch)  # under torchrun: new shards for this epoch
            train_loss = self.train_one_epoch(epoch)
            val_loss, dice = self.evaluate()
            val_dice = dice.global_dice()
            is_best = val_dice > self.best_dice  # the same in every process: the scores cover all films
            if is_best:
                self.best_dice, self.best_epoch = val_dice, epoch
            self.history.append(
                {
                    "epoch": epoch,
                    "train_loss": train_loss,
                    "val_loss": val_loss,
                    "val_dice": val_dice,
                    "val_mean_dice": dice.mean(),
                    "lr": lr,
                    "seconds": time.perf_counter() - start,
                }
            )
            if distributed.is_main():  # one process writes; the others hold the same weights and history
                if is_best:
                    self.save_best(epoch, val_dice)
                save_history(self.history, self.output_dir / "history.csv")
                plot_dice_history([row["val_dice"] for row in self.history], self.output_dir / "dice_per_epoch.png")
                log_epoch(writer, self.history[-1], epoch)
                save_last(self.output_dir, epoch, self.history, self.cfg, **parts)
            print(
                f"epoch {epoch:3d}/{self.cfg.max_epochs}  train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
                f"val Dice {val_dice:.4f}  (best {self.best_dice:.4f} at epoch {self.best_epoch})  "
                f"{self.history[-1]['seconds']:.1f} s"
            )


class Inferencer:
    """Loads the best checkpoint and segments films: at the network's size, then back at each film's own size."""

    def __init__(self, checkpoint_path: Path):
        checkpoint = torch.load(checkpoint_path, map_location=DEVICE, weights_only=True)
        self.cfg = Config(**checkpoint["config"])  # the settings it was trained with, whatever `cfg` says now
        self.epoch, self.val_dice = checkpoint["epoch"], checkpoint["metric"]
        self.model = build_model(self.cfg).to(DEVICE)
        self.model.load_state_dict(checkpoint["model"])
        self.model.eval()

    @torch.no_grad()
    def predict(self, case: dict) -> np.ndarray:
        """The lung mask of one prepared case at its original (height, width), bool.

        The probabilities are resized (bilinearly) before thresholding, not the mask: a 512-px mask blown up to a
        4892-px film with nearest neighbour has 10-px stairs along every outline, where interpolated probabilities
        give smooth outlines that fall between the network's pixels.
        """
        img = read_prepared(case["image"], self.cfg.image_size)[None].to(DEVICE)  # (1, 1, S, S)
        prob = torch.sigmoid(lung_logit(self.model(img)).float())
        prob = F.interpolate(prob, size=(case["height"], case["width"]), mode="bilinear", align_corners=False)
        return (prob[0, 0] > self.cfg.threshold).cpu().numpy()

    def run(self, cases: list[dict], output_dir: Path) -> dict:
        """Predict `cases`, write the masks, the Dice per film and the outline figure; return the test Dice."""
        output_dir = Path(output_dir)
        (output_dir / "predicted_masks").mkdir(parents=True, exist_ok=True)
        dice, rows, shown = DiceAccumulator(empty="one"), [], []
        for case in tqdm(cases, desc="test", leave=False, disable=None):
            pred = self.predict(case)
            Image.fromarray(pred.astype(np.uint8) * np.uint8(255)).save(
                output_dir / "predicted_masks" / f"{case['name']}.png"
            )
            truth = read_lung_mask(case["mask_files"], pred.shape)  # the original union mask, at the original size
            dice.update(torch.from_numpy(pred)[None], torch.from_numpy(truth)[None])
            rows.append(
                {
                    "name": case["name"],
                    "height": case["height"],
                    "width": case["width"],
                    "dice": dice.per_image()[-1].item(),
                }
            )
            if len(shown) < self.cfg.figure_cases:
                shown.append((case, truth, pred, rows[-1]["dice"]))
        pd.DataFrame(rows).to_csv(output_dir / "test_dice.csv", index=False)
        self.plot(shown, output_dir / "test_predictions.png")
        return {"test_dice": dice.global_dice(), "test_mean_dice": dice.mean()}

    @staticmethod
    def plot(shown: list[tuple], path: Path) -> None:
        """Test films with their true (green) and predicted (red) lung outlines."""
        fig = Figure(figsize=(3.5 * len(shown), 4.2), dpi=100)
        for i, (case, truth, pred, score) in enumerate(shown):
            ax = fig.add_subplot(1, len(shown), i + 1)
            step = max(1, max(truth.shape) // 1024)  # a 4892-px film is drawn at a quarter: same outlines, faster
            ax.imshow(to_unit_range(read_gray(case["image_file"])[::step, ::step]), cmap="gray")
            ax.contour(truth[::step, ::step], levels=[0.5], colors="lime", linewidths=1.2)
            ax.contour(pred[::step, ::step], levels=[0.5], colors="red", linewidths=1.2)
            ax.set_title(f"{case['name']}\nDice {score:.3f}", fontsize=9)
            ax.axis("off")
        handles = [Line2D([], [], color="lime", label="true"), Line2D([], [], color="red", label="predicted")]
        fig.legend(handles=handles, loc="lower center", ncol=2)
        fig.savefig(path, bbox_inches="tight")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every GPU


def main(cfg: Config) -> list[dict]:
    """Prepare the films if needed, train, pick the best epoch by validation Dice, segment the test films."""
    start = time.perf_counter()
    seed_everything(cfg.seed)  # the same initial weights in every process
    # Under `torchrun --nproc_per_node=N`: join the other processes, take this process's GPU, print only in process
    # 0 (README, "Several GPUs"). With `python` or in a notebook: one process on DEVICE.
    distributed.setup()
    torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest convolutions
    with distributed.main_first():  # process 0 writes the sample and the prepared films if missing, then the others
        prepared = prepare_data(cfg)
    train_cases, val_cases, test_cases = split_cases(prepared, cfg)
    print(
        f"{len(train_cases)} train, {len(val_cases)} validation, {len(test_cases)} test films at {cfg.image_size} px "
        f"on {DEVICE.type}{' (QUICK run)' if cfg.quick else ''}"
    )
    loader = {"batch_size": cfg.batch_size, "num_workers": cfg.num_workers, "pin_memory": DEVICE.type == "cuda"}
    train_ds = TensorDataset(*load_cases(train_cases, cfg.image_size))
    # Under torchrun each process trains on its own shard of the films, reshuffled every epoch (Trainer: set_epoch),
    # with batch_size films per process and step; in one process there is no sampler and the loader shuffles.
    sampler = distributed.train_sampler(train_ds, cfg.seed)
    train_loader = DataLoader(
        train_ds, shuffle=sampler is None, sampler=sampler, generator=torch.Generator().manual_seed(cfg.seed), **loader
    )
    val_shard = distributed.shard(val_cases)  # this process's share of the validation films (all in one process)
    val_loader = DataLoader(TensorDataset(*load_cases(val_shard, cfg.image_size)), **loader)

    model = build_model(cfg).to(DEVICE)
    print(
        f"U-Net: depth {cfg.depth}, {cfg.start_filters} start filters, {cfg.up_mode} up-sampling, {cfg.norm} norm, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters; loss {cfg.loss}"
    )
    if distributed.world_size() > 1:  # augment() draws from torch's generator: each process its own way
        torch.manual_seed(cfg.seed + distributed.rank())
    trainer = Trainer(cfg, model, train_loader, val_loader)
    history = trainer.fit()
    if not distributed.is_main():
        return history  # process 0 alone segments the test films and writes; the others are done
    if trainer.stopped or not trainer.best_epoch:  # said why; the checkpoints on disk are kept
        return history

    inferencer = Inferencer(Path(cfg.output_dir) / "best_model.pt")
    print(f"Best epoch {inferencer.epoch}: validation Dice {inferencer.val_dice:.4f}")
    output_dir = Path(cfg.output_dir)
    test = inferencer.run(test_cases, output_dir)
    print(
        f"Test Dice {test['test_dice']:.4f} (mean per film {test['test_mean_dice']:.4f}) on {len(test_cases)} films "
        f"at their original size"
    )
    synthetic = prepared.parent == Path(cfg.data_dir) / "sample"  # prepared beside the sample, not the real data
    pictures = []
    if synthetic:  # the README's pictures: films with outlines (true and predicted), and the Dice curve
        Path(cfg.images_dir).mkdir(parents=True, exist_ok=True)
        for name in ("test_predictions.png", "dice_per_epoch.png"):
            pictures.append(Path(cfg.images_dir) / f"lung_xray_unet_{name}")
            shutil.copyfile(output_dir / name, pictures[-1])
    print(f"\nSummary ({time.perf_counter() - start:.0f} s{', QUICK run' if cfg.quick else ''})\n"
          f"  data:    {'SYNTHETIC sample' if synthetic else 'real dataset'}, prepared in {prepared}: "
          f"{len(train_cases)} train, {len(val_cases)} validation, {len(test_cases)} test films\n"
          f"  best:    epoch {inferencer.epoch} of {len(history)}, validation Dice {inferencer.val_dice:.4f}; "
          f"test Dice {test['test_dice']:.4f}\n"
          f"  outputs: {output_dir}/ best_model.pt, history.csv, dice_per_epoch.png, predicted_masks/ "
          f"({len(test_cases)} masks), test_dice.csv, test_predictions.png"
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
