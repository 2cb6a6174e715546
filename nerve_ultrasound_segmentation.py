"""Nerve segmentation on ultrasound: Kaggle's Ultrasound Nerve Segmentation (2016) with a MONAI 2D U-Net.

Outlines the brachial plexus in 580x420 ultrasound frames of the neck, or says there is none (most frames):
reads the download as it is, checks `train_masks.csv` against the mask files, reports (and by default leaves
out of training) near-duplicate frames whose labels contradict, splits train/validation/test by subject, trains a
MONAI UNet, keeps the epoch with the best Kaggle metric (mean Dice per image, an empty prediction on an empty
mask scoring 1), chooses on the validation set the smallest predicted area worth keeping, scores the held-out test
subjects once with both (the result, with a 95% bootstrap interval over subjects), and predicts nerve masks on
frames it has never seen (TIFF or PNG, any size, 8 or 16 bits): by default Kaggle's `test/`, as a submission.
Challenge: https://www.kaggle.com/c/ultrasound-nerve-segmentation

Data: `data/ultrasound-nerve-segmentation/` as unzipped from Kaggle (`train/<subject>_<img>.tif` and
`train/<subject>_<img>_mask.tif`, `test/<img>.tif`, `train_masks.csv`, `sample_submission.csv`). Without it
the synthetic stand-in under `data/sample/` is used (written when missing), and the script says so.
Outputs: `output/nerve_ultrasound_segmentation/`: `best_model.pt`, `last_checkpoint.pt`, `history.csv`,
`dice_per_epoch.png`, `batch.png`, `contradictory_pairs.csv`, `skipped.csv`, `val_per_case.csv`, `test_per_case.csv`
(Kaggle Dice per held-out test frame: the result), `val_predictions.png` (true and predicted outlines; copied to
`Images/` for the README when the synthetic sample was used), `predictions/`
(`<name>_mask.png`, 0/255 at each frame's own size, and `submission.csv`, Kaggle's `img,pixels`).

Run: `python nerve_ultrasound_segmentation.py` (`QUICK=1` for a short first try), or cell by cell in VS Code or
Jupyter, each cell leaving its result to look at: `cfg`, `data`, `batch`, `model`, `history`, `per_case`. Edit the
configuration inline (`cfg = Config(max_epochs=50)`) and run the cells below again; after Ctrl-C, `Config(resume=True)`
or `RESUME=1` goes on. On several GPUs:
`torchrun --nproc_per_node=4 nerve_ultrasound_segmentation.py` (README: several GPUs and machines). Predict on your
own frames with the trained model, no training: `PREDICT=path/to/folder python nerve_ultrasound_segmentation.py`
(`CHECKPOINT=path/to/best_model.pt` for other weights).
"""

# %% Imports
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from monai.data import DataLoader, Dataset
from monai.networks.nets import UNet
from monai.transforms import Compose, EnsureTyped, RandFlipd
from monai.utils import first
from PIL import Image
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
    expand_inputs,
    find_contradictory_pairs,
    frame_signature,
    mask_name,
    one_line_data_problems,
    prepare_cached,
    read_table,
    rle_decode,
    rle_encode,
    split_groups,
)
from dice import DiceAccumulator, SoftDiceLoss, describe_ci, dice_per_image, save_figure, show
from precision import autocast, grad_scaler
from sample_data import find_dataset

# %% Configuration
# The repository root, whether run as a file (from any directory) or in a notebook kernel (no __file__).
ROOT = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
QUICK = os.environ.get("QUICK", "0") == "1"  # the collection's quick-run switch (README): read here, once
DEVICE = distributed.device()  # picked once: the GPU if any (under torchrun, this process's own), else the CPU


@dataclass
class Config(BaseConfig):
    data_dir: Path = ROOT / "data"  # holds ultrasound-nerve-segmentation/ as unzipped; else data/sample/ is used
    output_dir: Path = ROOT / "output" / "nerve_ultrasound_segmentation"  # weights, plots, history, predictions/
    images_dir: Path = ROOT / "Images"  # the README's pictures: val_predictions.png is copied there, from runs on
    # the synthetic sample only (pictures of real patients never land in a folder of the repository)
    seed: int = 0  # the initial weights, the augmentation and the order of the training frames
    split_seed: int = 0  # which subjects are validation and test: kept apart from `seed`, so a new seed keeps the test
    val_fraction: float = 0.2  # of subjects, not frames (one subject's frames on both sides inflate the score): they
    # choose the epoch and the min area
    test_fraction: float = 0.2  # of subjects, held out and scored once at the end: the result (0: no test set, and the
    # only score is validation's, which chose the model and is optimistic)
    max_subjects: int | None = None  # the first N subjects (None: all 47)
    max_test_images: int | None = None  # the first N test frames (None: all 5,508, a complete submission)
    cache: bool = True  # keep each frame decoded and resized on disk (cache_dir): the next run reads it back
    cache_dir: Path | None = None  # None: <data_dir>/cache/nerve_ultrasound_segmentation/ (beside the download)
    image_size: tuple[int, int] = (128, 176)  # (H, W): 420x580's shape, multiples of 16
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)  # UNet features per level, as the original
    strides: tuple[int, ...] = (2, 2, 2, 2)  # stride-2 down-sampling between levels, as the original
    num_res_units: int = 2  # residual units per block, as the original
    initial_logit: float = -4.6  # output bias at the start: logit(0.01), about the share of nerve pixels
    drop_contradictory: bool = True  # leave the empty-labelled frame of a contradictory pair out of training
    duplicate_max_distance: float = 0.15  # RMS distance of standardised 32x32 thumbnails: 0 copy, ~1.4 unrelated
    bce_weight: float = 0.0  # weight of an optional BCE term added to the Dice loss (0: Dice alone, as the original)
    max_epochs: int = 30
    batch_size: int = 128
    val_batch_size: int = 64  # validation batches carry 420x580 masks too: keep them moderate
    lr: float = 1e-3  # Adam, as the original
    threshold: float = 0.5  # nerve probability above which a pixel is nerve
    min_area_candidates: tuple[int, ...] = (0, 250, 500, 1000, 1500, 2000, 3000, 4000, 5000, 6000)  # px at 420x580
    num_workers: int = 2  # frames are cached in memory: workers only flip and batch them
    amp: bool = True  # mixed precision on CUDA (ignored on the CPU): faster, and Dice is computed in float32
    figure_frames: int = 4  # validation frames drawn in val_predictions.png (with a nerve first)
    predict_inputs: Path | None = PREDICT  # the Predict cell's input: a folder or a file (None: the dataset's test/)
    checkpoint: Path | None = CHECKPOINT  # the weights the Predict cell uses (None: output_dir/best_model.pt)
    tensorboard: bool = False  # also log the history to output_dir/tensorboard (needs `pip install tensorboard`)
    resume: bool = RESUME  # go on from output_dir/last_checkpoint.pt (written after every epoch) up to max_epochs;
    # RESUME=1 python nerve_ultrasound_segmentation.py from the command line
    quick: bool = QUICK  # the quick run below; recorded in the checkpoint: a quick model is not a result
    AS_TRAINED: ClassVar[tuple[str, ...]] = ("image_size", "threshold", "quick")  # read by prediction from the
    # checkpoint: the network has only learnt frames shrunk to its training size, its min area was chosen at its
    # threshold, and a quick model must say it is one (its shape is rebuilt from the checkpoint anyway)

    # The quick run (QUICK=1, or Config(quick=True)): a first try in seconds on a CPU. These replace the defaults
    # above; a setting given explicitly, as in Config(quick=True, max_epochs=5), wins.
    QUICK_RUN: ClassVar[dict] = dict(
        max_subjects=6,  # the first few subjects of the real data (the sample has 5)
        max_test_images=60,  # a smoke-test submission, not a complete one
        image_size=(64, 96),
        max_epochs=20,  # the sample is learnt in about 10 epochs
        batch_size=4,  # 128 would be a single step per epoch on the sample's 40 frames
        num_workers=0,
    )


cfg = Config()
if __name__ == "__main__":
    distributed.setup()  # under torchrun: join the other processes (README: several GPUs); else nothing
    one_line_data_problems()  # from the command line, a data folder unlike the README's is one line
    print(cfg.describe())
    if PREDICT:  # PREDICT=<folder or file> python nerve_ultrasound_segmentation.py: predict, no training (README)
        predict_only(__file__)

# %% Data
SHAPE = (420, 580)  # (height, width) of every Kaggle frame, and of every submitted mask
TRAIN_NAME = re.compile(r"(\d+)_(\d+)(_mask)?\.tif")  # <subject>_<img>.tif and <subject>_<img>_mask.tif
UNREADABLE_ERRORS = (OSError, SyntaxError, ValueError)  # what Pillow raises on truncated or non-image files


def decode_frame(path: Path) -> np.ndarray:
    """The 8-bit grayscale pixels (H, W) of a TIFF or PNG frame, as the network is trained on; raises Unusable.

    Kaggle's frames are 8-bit: a 16-bit frame is scaled by its type's range (65535 -> 255), not by its own maximum,
    so that a frame saved with 8 or 16 bits gets the same pixels and a dark frame stays dark (read as 8-bit, a 16-bit
    frame would come out almost white). Colour (a screenshot of the scanner) becomes its gray value."""
    try:
        with Image.open(path) as img:
            img.load()  # Pillow reads lazily: decode now, so a truncated file fails here and is named
            frames, mode = getattr(img, "n_frames", 1), img.mode
            if mode.startswith("I;16"):
                pixels = np.round(np.asarray(img, dtype=np.float32) / 257).astype(np.uint8)
            elif mode not in ("I", "F"):
                pixels = np.asarray(img.convert("L"), dtype=np.uint8)
    except (*UNREADABLE_ERRORS, Image.DecompressionBombError) as err:
        raise Unusable("unreadable", f"not a readable TIFF or PNG: {err}") from None
    if mode in ("I", "F"):  # 32-bit integers or floats: no range to scale by
        raise Unusable("unsupported pixels", f"32-bit pixels ({mode}); save the frame with 8 or 16 bits")
    if frames > 1:
        raise Unusable("several frames", f"{frames} frames in one file (a clip): save each frame as a file")
    return pixels


def find_train_cases(train_dir: Path, skipped: Skipped) -> list[dict]:
    """Pair `<subject>_<img>.tif` with `<subject>_<img>_mask.tif` by name; report files without their partner."""
    images, masks = {}, {}
    for path in sorted(train_dir.iterdir()):
        match = TRAIN_NAME.fullmatch(path.name)
        if match is None:  # e.g. 1_1_scan.tif, a download renamed by hand: the names carry the pairing
            skipped.skip(path, "unexpected name", "expected <subject>_<img>.tif or <subject>_<img>_mask.tif")
            continue
        key = int(match[1]), int(match[2])
        (masks if match[3] else images)[key] = path
    for key in sorted(masks.keys() - images.keys()):
        skipped.skip(masks[key], "mask without image", f"no {key[0]}_{key[1]}.tif")
    for key in sorted(images.keys() - masks.keys()):
        skipped.skip(images[key], "image without mask", f"no {key[0]}_{key[1]}_mask.tif")
    return [
        {"subject": s, "img": i, "image": images[s, i], "mask": masks[s, i]} for s, i in sorted(images.keys() & masks)
    ]


def split_by_subject(subjects, cfg: Config) -> tuple[list[int], list[int], list[int]]:
    """(train, validation, test) subjects, sorted: the distinct subjects drawn by data_cleaning.split_groups with
    `split_seed`, the test subjects first (they stay when val_fraction or seed change), at least one on each side
    asked for.

    By subject, not by frame: the frames of one subject are one video, and near copies of a training frame in
    validation or test would measure memory, not segmentation.
    """
    sides = split_groups([int(s) for s in subjects], cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    return tuple(sorted(side) for side in sides)


def read_masks_csv(path: Path, cases: list[dict]) -> dict[tuple[int, int], tuple[str, int]] | None:
    """{(subject, img): (run-length encoding, its row as a spreadsheet numbers it)} from train_masks.csv, or None
    (said) when the file is missing; its rows without an image/mask pair among `cases` are reported. A missing
    column or an id that is not a whole number is one DatasetError naming the file, the column and the row."""
    if not path.is_file():
        print(f"{path} not found: using the mask files without checking them against it")
        return None
    table = read_table(path, {"subject": "int", "img": "int", "pixels": "str"}, "the masks' run-length encodings")
    rows = {  # row + 2: as a spreadsheet numbers the rows, the header being row 1
        (s, i): (rle, row + 2) for row, (s, i, rle) in enumerate(zip(table["subject"], table["img"], table["pixels"]))
    }
    orphans = sorted(rows.keys() - {(c["subject"], c["img"]) for c in cases})
    if orphans:
        names = ", ".join(f"{s}_{i}" for s, i in orphans[:5]) + (", ..." if len(orphans) > 5 else "")
        print(f"{path.name} has {len(orphans)} row(s) without an image/mask pair in {path.parent / 'train'}: {names}")
    return rows


def resize(pixels: np.ndarray, size: tuple[int, int], mask: bool = False) -> torch.Tensor:
    """(1, height, width) uint8 tensor; masks by nearest neighbour so that they stay binary."""
    return torch.from_numpy(resize_array(pixels, size, mask))[None]


def resize_array(pixels: np.ndarray, size: tuple[int, int], mask: bool = False) -> np.ndarray:
    """`resize` in NumPy and Pillow only (height, width): what the disk cache's forked workers run."""
    resample = Image.Resampling.NEAREST if mask else Image.Resampling.BILINEAR  # Pillow's bilinear antialiases
    small = Image.fromarray(pixels).resize(size[::-1], resample)
    return np.asarray(small, dtype=np.uint8).copy()


PREPARATION = {"resize": "Pillow bilinear, masks nearest", "signature": 32, "version": 1}  # in the cache's key
PREPARED = ("image", "label", "mask_bits", "signature")  # the arrays of a cache entry (prepare_frame)


def prepare_frame(job: tuple[Path, Path, tuple[int, int]]) -> dict[str, np.ndarray]:
    """The deterministic part of a frame's preparation, what the disk cache keeps: (frame, mask, image_size) ->
    {"image", "label"} at training size (uint8), the 420x580 mask packed to bits ("mask_bits": Kaggle scores at
    full size, and train_masks.csv is checked against it) and the near-duplicate "signature". Raises Unusable
    naming the file at fault."""
    image_path, mask_path, size = job
    arrays = {}
    for name, path in (("image", image_path), ("mask", mask_path)):
        try:
            pixels = decode_frame(path)
        except Unusable as err:
            raise Unusable(err.problem, f"{path.name}: {err.detail}") from None
        if pixels.shape != SHAPE:
            height, width = pixels.shape
            raise Unusable("wrong size", f"{path.name}: {width}x{height} pixels (width x height), expected "
                           f"{SHAPE[1]}x{SHAPE[0]}")  # fmt: skip
        arrays[name] = pixels
    mask = arrays["mask"] > 0  # masks are 0/255
    return {
        "image": resize_array(arrays["image"], size),
        "label": resize_array(mask.view(np.uint8), size, mask=True),
        "mask_bits": np.packbits(mask),
        "signature": frame_signature(arrays["image"]),
    }


def decode_frames(cases: list[dict], cfg: Config, skipped: Skipped) -> list[tuple[dict, dict]]:
    """[(case, prepare_frame's arrays)] of the cases whose frame and mask decode: from the disk cache
    (data/cache/nerve_ultrasound_segmentation/, keyed by image_size, the preparation and both files' path, size
    and modification time) where built, else decoded on every core and written to it; with cache=False decoded
    here, one after the other. Bad files are named, skipped and counted."""
    jobs = [(case["image"], case["mask"], tuple(cfg.image_size)) for case in cases]
    by_image = {case["image"]: case for case in cases}
    if cfg.cache:
        folder = cfg.cache_dir or Path(cfg.data_dir) / "cache" / "nerve_ultrasound_segmentation"
        cache = DiskCache(folder, {"image_size": cfg.image_size, **PREPARATION}, PREPARED)
        with distributed.main_first():  # under torchrun process 0 decodes into the cache, the others then read it
            done = prepare_cached(jobs, lambda job: [job[0], job[1]], prepare_frame, cache, skipped,
                                  desc="reading frames")  # fmt: skip
        print(f"Disk cache {cache.folder}: {cache.read} frames read back, {cache.built} decoded and written")
        return [(by_image[job[0]], arrays) for job, arrays in done]
    done = []
    for case, job in zip(cases, tqdm(jobs, desc="reading frames", leave=False, disable=None)):
        try:
            done.append((case, prepare_frame(job)))
        except Unusable as err:
            skipped.skip(case["image"], err)
    return done


def load_frames(
    cases: list[dict], cfg: Config, masks_csv: dict | None, full_masks: set[int], skipped: Skipped
) -> list[dict]:
    """Every frame decoded once (`decode_frames`: from the disk cache where built), checked, and kept in memory at
    training size (uint8).

    Each case becomes {subject, img, image, label, has_nerve, signature} plus, for the subjects in `full_masks`
    (validation and test), the 420x580 mask as bool, since Kaggle scores at full size. A frame whose mask disagrees
    with train_masks.csv is left out: one of the two is wrong, and which one cannot be told.
    """
    frames = []
    for case, arrays in decode_frames(cases, cfg, skipped):
        mask = np.unpackbits(arrays["mask_bits"], count=SHAPE[0] * SHAPE[1]).reshape(SHAPE).astype(bool)
        if masks_csv is not None:
            rle, row = masks_csv.get((case["subject"], case["img"]), (None, None))
            try:
                agrees = rle is not None and np.array_equal(rle_decode(rle, SHAPE), mask)
            except ValueError as err:  # an encoding outside the image or with an odd number of values: the row
                skipped.skip(
                    f"train_masks.csv row {row}", "invalid run-length", f"{case['subject']}_{case['img']}: {err}"
                )
                continue
            if not agrees:
                problem = "has no row" if rle is None else f"differs from its row {row}"
                skipped.skip(case["mask"], "disagrees with train_masks.csv", f"{problem} in train_masks.csv")
                continue
        frame = {
            "subject": case["subject"],
            "img": case["img"],
            "path": case["image"],  # to draw the frame at full size in val_predictions.png
            "image": torch.from_numpy(np.array(arrays["image"]))[None],  # read from the cache into memory
            "label": torch.from_numpy(np.array(arrays["label"]))[None],
            "has_nerve": bool(mask.any()),
            "signature": np.array(arrays["signature"]),
        }
        if case["subject"] in full_masks:
            frame["full_label"] = torch.from_numpy(mask)[None]  # (1, 420, 580) bool
        frames.append(frame)
    return frames


def drop_contradictory_pairs(frames: list[dict], train: list[dict], cfg: Config) -> list[dict]:
    """The training frames without the empty-labelled frame of each contradictory pair (unless
    drop_contradictory=False); the pairs, looked for among all frames, are listed in contradictory_pairs.csv.

    Only ever left out of training: validation keeps every frame, because Kaggle scores the data as labelled,
    noise included."""
    table = pd.DataFrame([{k: f[k] for k in ("subject", "img", "has_nerve")} for f in frames])
    pairs = find_contradictory_pairs(table, np.stack([f["signature"] for f in frames]), cfg.duplicate_max_distance)
    listed = cfg.output_dir / "contradictory_pairs.csv"
    if distributed.is_main():  # under torchrun every process finds the same pairs: one writes them
        make_folder(cfg.output_dir)  # a file in its place: one Output problem line
        save_atomically(listed, lambda path: pairs.to_csv(path, index=False))
    dropped = set(zip(pairs["subject"], pairs["img_empty"])) if cfg.drop_contradictory else set()
    kept = [f for f in train if (f["subject"], f["img"]) not in dropped]
    left_out = f"{len(train) - len(kept)} empty-labelled frame(s) left out of training"
    print(f"Near-duplicate frames with contradictory labels: {len(pairs)} pair(s), listed in {listed}; "
          + (left_out if cfg.drop_contradictory else "all kept (drop_contradictory=False)"))  # fmt: skip
    if len(pairs):  # the threshold was tuned on the synthetic sample only: the distances let a user judge it
        distances = ", ".join(f"{d:.3f}" for d in sorted(pairs["distance"])[:10])
        print(f"  their distances: {distances}{', ...' if len(pairs) > 10 else ''} (duplicate_max_distance "
              f"{cfg.duplicate_max_distance}, tuned on the synthetic sample only: 0 is a copy, about 1.4 unrelated "
              "frames; look at the pairs before trusting it)")  # fmt: skip
    return kept


TEST_NAME = re.compile(r"(\d+)\.tif")  # test/<img>.tif: no subject id, on purpose; the submission's img is <img>


def find_test_frames(root: Path, skipped: Skipped) -> tuple[dict[int, Path], list[int]]:
    """({img: path} of Kaggle's test/<img>.tif, sorted by img; the imgs sample_submission.csv lists, sorted, or []
    without it). Files of another name are skipped; a sample_submission.csv without an integer `img` column is one
    DatasetError naming the file, the column and the row."""
    frames = {}
    if (root / "test").is_dir():
        for path in sorted((root / "test").iterdir()):
            match = TEST_NAME.fullmatch(path.name)
            if match is None:
                skipped.skip(path, "unexpected name", "expected <img>.tif")
            else:
                frames[int(match[1])] = path
    listed = root / "sample_submission.csv"
    ids = read_table(listed, {"img": "int"}, "the frames a submission lists")["img"] if listed.is_file() else []
    return dict(sorted(frames.items())), sorted(set(ids))


def check_test_frames(root: Path) -> str:
    """One line on what the Predict cell will submit, read now, before any training: a sample_submission.csv that
    cannot be read stops the run here (DatasetError) rather than after hours of training."""
    frames, listed = find_test_frames(root, Skipped("file", print_limit=0))  # the Predict cell names them
    if not (root / "test").is_dir():
        return f"No folder {root / 'test'}: no Kaggle test frames to submit (the Predict cell takes your own)"
    missing = len(set(listed) - frames.keys())
    listing = f"sample_submission.csv lists {len(listed)}" if listed else "no sample_submission.csv"
    gaps = f", {missing} of them missing (to be predicted empty and named)" if missing else ""
    return f"Test frames for the submission: {len(frames)} in {root / 'test'}, {listing}{gaps}"


def load_data(cfg: Config) -> Data:
    """The training frames of the download (or of the sample): checked against train_masks.csv, split by subject,
    decoded once and kept in memory, contradictory near-duplicates left out of training."""
    with distributed.main_first():  # process 0 writes the synthetic sample if missing, the others then read it
        root, synthetic = find_dataset("ultrasound-nerve-segmentation", cfg.data_dir)
    skipped = Skipped("file")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise DatasetError(f"No folder {train_dir}: expected train/<subject>_<img>.tif and _mask.tif in {root}")
    cases = find_train_cases(train_dir, skipped)
    masks_csv = read_masks_csv(root / "train_masks.csv", cases)
    print(check_test_frames(root))  # every file the run needs is read before training
    subjects = sorted({c["subject"] for c in cases})[: cfg.max_subjects]
    cases = [c for c in cases if c["subject"] in subjects]
    needed = 1 + (cfg.val_fraction > 0) + (cfg.test_fraction > 0)  # a subject for each side asked for
    if len(subjects) < needed:
        raise DatasetError(
            f"Found {len(cases)} image/mask pairs of {len(subjects)} subject(s) in {train_dir}: expected "
            f"<subject>_<img>.tif with <subject>_<img>_mask.tif (580x420, 8-bit) for at least {needed} subjects "
            "(training, validation, test)"
        )
    sides = dict(zip(("training", "validation", "test"), split_by_subject(subjects, cfg)))
    # Validation and test are scored as Kaggle does, at 420x580: their frames keep the full-size mask.
    frames = load_frames(cases, cfg, masks_csv, set(sides["validation"]) | set(sides["test"]), skipped)
    print(skipped.summary(f"Training folder {train_dir}"))
    if distributed.is_main():  # every process read the same files: one lists the skipped ones
        skipped.save(make_folder(cfg.output_dir) / "skipped.csv")
    train, val, test = ([f for f in frames if f["subject"] in side] for side in map(set, sides.values()))
    for name, side_frames in zip(sides, (train, val, test)):
        if sides[name] and not side_frames:
            raise DatasetError(
                f"No usable frame left for {name} in {train_dir} (subjects {sides[name]}): expected readable "
                "580x420 <subject>_<img>.tif with its _mask.tif, agreeing with train_masks.csv"
            )
    train = drop_contradictory_pairs(frames, train, cfg)  # validation and test keep every frame, as Kaggle scores
    print(f"Split by subject (split_seed {cfg.split_seed}): subjects {sides['training']} for training, "
          f"{sides['validation']} for validation ({sum(not f['has_nerve'] for f in val)} of its {len(val)} frames "
          f"without nerve), {sides['test']} for test ({len(test)} frames)")  # fmt: skip
    return Data(root, synthetic, train, val, test, unit="frames", skipped=skipped)


if __name__ == "__main__":
    data = load_data(cfg)
    print(data)

# %% Transforms
# The frames are cached as uint8 tensors at training size, so the transforms are cheap: a left-right flip only.
# Left-right is arbitrary in these images (which side the probe marker is on, which side of the neck), and a
# nerve seen mirrored is still a nerve. Up-down is not: the skin is at the top and echoes fade with depth.
# Intensities stay uint8 through the loader (4x less to copy) and become floats on the device.


def build_transforms(cfg: Config, train: bool) -> Compose:
    """The training transforms (a random left-right flip), or the validation ones (none); plain tensors out."""
    flips = [RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1)] if train else []  # (C, H, W): 1 = width
    transforms = Compose([*flips, EnsureTyped(keys=["image", "label"], track_meta=False)])  # no metadata to collate
    return transforms.set_random_state(seed=cfg.seed + distributed.rank())  # each process flips its own way


def to_dataset(frames: list[dict], transform, full: bool = False) -> Dataset:
    """A MONAI Dataset of {image, label} (plus the 420x580 `full_label` for validation) from cached frames."""
    keys = ("image", "label", "full_label") if full else ("image", "label")
    return Dataset([{k: f[k] for k in keys} for f in frames], transform=transform)


def build_loaders(cfg: Config, data: Data) -> tuple[DataLoader, DataLoader]:
    """(training loader: shuffled, flipped; validation loader: this process's share of the validation frames).

    Under torchrun each process trains on its own shard of the frames, reshuffled every epoch, with batch_size
    frames per process and step; in one process there is no sampler and the loader shuffles."""
    args = {"num_workers": cfg.num_workers, "pin_memory": DEVICE.type == "cuda"}
    args["persistent_workers"] = cfg.num_workers > 0  # do not restart the workers every epoch
    train_ds = to_dataset(data.train, build_transforms(cfg, train=True))
    sampler = distributed.train_sampler(train_ds, cfg.seed)
    shard_size = len(sampler) if sampler is not None else len(train_ds)
    train_loader = DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=shard_size > cfg.batch_size,  # no tiny last batch, unless there is only one batch
        generator=torch.Generator().manual_seed(cfg.seed),
        **args,
    )
    val_ds = to_dataset(distributed.shard(data.val), build_transforms(cfg, train=False), full=True)
    return train_loader, DataLoader(val_ds, batch_size=cfg.val_batch_size, **args)


def draw_batch(batch: dict, n: int = 6) -> Figure:
    """The first frames of a training batch as the network gets them (flipped, at training size), nerve in green."""
    n = min(n, len(batch["image"]))
    fig = Figure(figsize=(2.6 * n, 2.4), dpi=100)
    for i in range(n):
        ax = fig.add_subplot(1, n, i + 1)
        ax.imshow(batch["image"][i, 0].numpy(), cmap="gray", vmin=0, vmax=255)
        if batch["label"][i].any():
            ax.contour(batch["label"][i, 0].numpy(), levels=[0.5], colors="lime", linewidths=1)
        ax.set_title("nerve" if batch["label"][i].any() else "no nerve", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"A training batch: image {tuple(batch['image'].shape)} {batch['image'].dtype}", fontsize=10)
    return fig


if __name__ == "__main__":
    train_loader, val_loader = build_loaders(cfg, data)
    batch = first(train_loader)  # {"image": (B, 1, H, W) uint8, "label": (B, 1, H, W) uint8}
    show(save_figure(draw_batch(batch), cfg.output_dir / "batch.png"))

# %% Model and loss


def build_model(cfg: Config) -> UNet:
    """MONAI's UNet with residual units (Kerfoot et al., "Left-ventricle quantification using residual U-Net",
    STACOM 2018, https://doi.org/10.1007/978-3-030-12029-0_40), after the U-Net of Ronneberger et al., MICCAI 2015.
    One input channel (grayscale), one output channel: the nerve's logit per pixel."""
    seed_everything(cfg.seed)  # the same initial weights for the same seed, in every process
    model = UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=cfg.channels,
        strides=cfg.strides,
        num_res_units=cfg.num_res_units,
    )
    # Start from the prior, as RetinaNet does (Lin et al., "Focal loss for dense object detection", ICCV 2017):
    # the output layer follows a normalisation, so its bias alone sets the starting logit, and from 0 (every
    # pixel a nerve at probability 0.5) Adam's small steps take hundreds of updates to reach the background.
    output_layer = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))][-1]
    torch.nn.init.constant_(output_layer.bias, cfg.initial_logit)
    return model


class DiceBCELoss(torch.nn.Module):
    """Soft Dice loss over the whole batch (dice.py), plus `bce_weight` x binary cross-entropy.

    Dice over the batch, not per image: about 60% of the frames have no nerve, and per image each of them
    would add a loss of about 1 whatever the prediction; summed over the batch, their false positives count
    against the batch's Dice instead.
    """

    def __init__(self, bce_weight: float = 0.0):
        super().__init__()
        self.dice = SoftDiceLoss(batch=True)
        self.bce = torch.nn.BCEWithLogitsLoss()
        self.bce_weight = bce_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.dice(logits, target)
        if self.bce_weight:
            loss = loss + self.bce_weight * self.bce(logits.float(), target.float())
        return loss


if __name__ == "__main__":
    model = build_model(cfg)
    print(f"MONAI UNet {cfg.channels}: {sum(p.numel() for p in model.parameters()):,} parameters")

# %% Train


def apply_min_area(pred: torch.Tensor, min_area: int) -> torch.Tensor:
    """Binary masks (B, 1, H, W) with those of fewer than `min_area` pixels emptied.

    Most of the Kaggle metric is deciding whether a nerve is present (an empty frame scores 1 or 0), and a
    small blob is more often a false alarm than a nerve: the nerve is thousands of pixels at 420x580.
    """
    return pred & (pred.sum(dim=(1, 2, 3), keepdim=True) >= min_area)


class MinAreaScores:
    """Kaggle Dice (dice.py, empty="one") and nerve-presence accuracy over a validation pass, for any minimum area.

    The filter either keeps a predicted mask whole or empties it, so an image's Dice after the filter is its
    Dice as predicted or its Dice as an empty prediction: two accumulators give every candidate N at once, and
    the second one is the all-empty baseline (no nerve predicted anywhere).
    """

    def __init__(self) -> None:
        self.predicted = DiceAccumulator(empty="one")
        self.all_empty = DiceAccumulator(empty="one")
        self.areas, self.present = [], []

    def update(self, pred: torch.Tensor, seg: torch.Tensor) -> None:
        """Add a batch of binary predictions and truths, (B, 1, 420, 580)."""
        self.predicted.update(pred, seg)
        self.all_empty.update(torch.zeros_like(seg), seg)
        self.areas.append(pred.flatten(1).sum(dim=1).cpu())
        self.present.append(seg.flatten(1).any(dim=1).cpu())

    def dice(self, min_area: int) -> float:
        kept = torch.cat(self.areas) >= min_area
        return torch.where(kept, self.predicted.per_image(), self.all_empty.per_image()).mean().item()

    def presence_accuracy(self, min_area: int) -> float:
        predicted_present = torch.cat(self.areas) >= max(min_area, 1)
        return (predicted_present == torch.cat(self.present)).double().mean().item()

    def gathered(self) -> "MinAreaScores":
        """The scores of the frames that every process validated (under torchrun each takes a share), the same on
        every process, so that all choose the same minimum area and the same best epoch. Itself in one process."""
        if distributed.world_size() == 1:
            return self
        merged = MinAreaScores()
        merged.predicted = distributed.gather_dice(self.predicted)
        merged.all_empty = distributed.gather_dice(self.all_empty)
        merged.areas = [torch.cat(part) for part in distributed.gather(self.areas) if part]
        merged.present = [torch.cat(part) for part in distributed.gather(self.present) if part]
        return merged


def choose_min_area(scores: MinAreaScores, candidates) -> int:
    """The candidate minimum area with the best validation Dice; the smallest among equals (it removes least)."""
    return max(sorted(candidates), key=scores.dice)


def train_one_epoch(model, loader, loss_fn, optimizer, scaler, cfg: Config, epoch: int) -> float:
    """One pass over the training frames; returns the mean loss. Stops with a clear error if it is not finite."""
    model.train()
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, disable=None)
    losses = EpochLoss(epoch, cfg.lr, bar)  # read one step late: the GPU never waits for the CPU to read a loss
    for step, batch in enumerate(bar):
        img = batch["image"].to(DEVICE, non_blocking=True).float() / 255  # (B, 1, H, W) in [0, 1]
        seg = batch["label"].to(DEVICE, non_blocking=True).float()
        with autocast(DEVICE, cfg.amp):
            loss = loss_fn(model(img), seg)
        # Under torchrun, the mean over the processes: all stop at the same step (one stopping alone would leave
        # the others waiting for it), and the history's loss is that of every frame trained on. In one process,
        # the loss itself. A loss that is not finite stops training (FloatingPointError, naming epoch and batch).
        losses.add(step, distributed.average(loss.detach()), len(img))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # under torchrun, DDP averages the gradients of all processes here
        scaler.step(optimizer)
        scaler.update()
    return losses.mean()


def full_size_probability(logits: torch.Tensor, size: tuple[int, int] = SHAPE) -> torch.Tensor:
    """Nerve probabilities at 420x580 (B, 1, 420, 580), or at another frame's (height, width), from logits at
    training size: upsampled bilinearly, then thresholded by the caller, as predictions are made."""
    return F.interpolate(torch.sigmoid(logits.float()), size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def evaluate(model, loader, loss_fn, cfg: Config) -> dict:
    """The validation row: loss at training size, and the Kaggle scores at 420x580 with the minimum area that
    scores best here (chosen on validation, used for the submission), next to the all-empty baseline.

    Under torchrun each process validates its share of the frames (`loader`), and the scores cover all of them.
    """
    model.eval()
    scores = MinAreaScores()
    total, count = 0.0, 0
    for batch in tqdm(loader, desc="validation", leave=False, disable=None):
        img = batch["image"].to(DEVICE, non_blocking=True).float() / 255
        with autocast(DEVICE, cfg.amp):
            logits = model(img)
        total, count = total + loss_fn(logits, batch["label"].to(DEVICE).float()).item() * len(img), count + len(img)
        scores.update(full_size_probability(logits) > cfg.threshold, batch["full_label"].to(DEVICE))
    total, count = distributed.all_sum(total, count)  # every process's frames (unchanged in one process)
    scores = scores.gathered()
    min_area = choose_min_area(scores, cfg.min_area_candidates)
    return {
        "val_loss": total / count,
        "val_dice": scores.dice(min_area),  # Kaggle metric after the min-area filter
        "val_dice_no_filter": scores.dice(0),
        "min_area": min_area,
        "presence_accuracy": scores.presence_accuracy(min_area),
        "val_dice_all_empty": scores.all_empty.mean(),  # the baseline: no nerve predicted anywhere
    }


def fit(cfg: Config, data: Data, model: torch.nn.Module) -> History:
    """Train `model` on the training frames, validate every epoch, keep the best epoch by the Kaggle metric
    (output_dir/best_model.pt, with its minimum area). Returns the history, one row per epoch (history.csv)."""
    torch.backends.cudnn.benchmark = DEVICE.type == "cuda"  # fixed input size: let cuDNN pick its fastest kernels
    train_loader, val_loader = build_loaders(cfg, data)
    model.to(DEVICE)
    train_model = distributed.wrap(model)  # DDP under torchrun (gradients averaged); `model` is what is saved
    loss_fn = DiceBCELoss(cfg.bce_weight)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scaler = grad_scaler(DEVICE, cfg.amp)  # float16 only: none with bfloat16 or on the CPU (precision.py)
    print(f"Training on {DEVICE.type}: {len(data.train)} frames, {len(train_loader)} steps per epoch")
    title = "Nerve segmentation: validation Dice (Kaggle metric) per epoch"
    with TrainingRun(cfg, "val_dice", title=title, model=model, optimizer=optimizer, scaler=scaler) as run:
        for epoch in run.epochs(train_loader):
            train_loss = train_one_epoch(train_model, train_loader, loss_fn, optimizer, scaler, cfg, epoch)
            run.end_epoch(train_loss=train_loss, **evaluate(model, val_loader, loss_fn, cfg))
    return run.history


if __name__ == "__main__":
    history = fit(cfg, data, model)
    show(cfg.output_dir / "dice_per_epoch.png")
    end_if_stopped(history)  # Ctrl-C or a loss that was not finite: said why; the cells below do not run

# %% Evaluate


@torch.no_grad()
def predict_masks(model, images: list[torch.Tensor], cfg: Config, min_area: int) -> torch.Tensor:
    """Nerve masks at 420x580 (B, 1, 420, 580) bool, on the CPU, of frames cached at training size ((1, H, W)
    uint8 each): thresholded at full size, then masks smaller than `min_area` emptied."""
    img = torch.stack(images).to(DEVICE).float() / 255  # (B, 1, H, W)
    model.eval()
    with autocast(DEVICE, cfg.amp):
        logits = model(img)
    return apply_min_area(full_size_probability(logits) > cfg.threshold, min_area).cpu()


def score_frames(model, frames: list[dict], cfg: Config, min_area: int, shown=()) -> tuple[pd.DataFrame, dict]:
    """(per_case, shown_masks): the Kaggle Dice of each frame at 420x580 with `min_area` (a row per frame: subject,
    img, has_nerve, predicted_area, dice), and {index: (mask, Dice)} of the frames at the indices in `shown`."""
    rows, shown_masks = [], {}
    for start in tqdm(range(0, len(frames), cfg.val_batch_size), desc="evaluating", leave=False, disable=None):
        batch = frames[start : start + cfg.val_batch_size]
        pred = predict_masks(model, [f["image"] for f in batch], cfg, min_area)
        scores = dice_per_image(pred, torch.stack([f["full_label"] for f in batch]), empty="one")
        for i, (frame, mask, score) in enumerate(zip(batch, pred, scores.tolist())):
            rows.append({"subject": frame["subject"], "img": frame["img"], "has_nerve": frame["has_nerve"],
                         "predicted_area": int(mask.sum()), "dice": score})  # fmt: skip
            if start + i in shown:
                shown_masks[start + i] = (mask, score)
    return pd.DataFrame(rows), shown_masks


def evaluate_best(cfg: Config, data: Data) -> pd.DataFrame | None:
    """The best epoch's weights, read back from best_model.pt, with the minimum area validation chose for them: on
    every validation frame (val_per_case.csv, the outlines in val_predictions.png), then once on the held-out test
    frames (test_per_case.csv): the Kaggle Dice per frame, the result, with a 95% bootstrap interval that redraws
    whole subjects (the frames of one subject are one video, not independent).

    Returns the test frames' rows (the validation frames' when test_fraction is 0), `attrs["scored"]` saying which,
    for the Summary. Process 0 only (None in the others)."""
    if not distributed.is_main():
        return None
    model, checkpoint = load_best(cfg, build_model, DEVICE)
    min_area = checkpoint["metrics"]["min_area"]
    shown = figure_frames(data.val, cfg.figure_frames)
    val_per_case, shown_masks = score_frames(model, data.val, cfg, min_area, shown)
    save_atomically(cfg.output_dir / "val_per_case.csv", lambda path: val_per_case.to_csv(path, index=False))
    figure = draw_predictions([data.val[i] for i in shown], [shown_masks[i] for i in shown])
    save_figure(figure, cfg.output_dir / "val_predictions.png")
    baseline = val_per_case["has_nerve"].eq(False).mean()  # all-empty: 1 on the frames without nerve, 0 elsewhere
    print(f"Best epoch {checkpoint['epoch']}: validation Dice {val_per_case['dice'].mean():.4f} (Kaggle metric, "
          f"mean over {len(val_per_case)} frames at 420x580) with min area {min_area} px; all-empty baseline on the "
          f"same frames {baseline:.4f}: validation chose the epoch and the min area, so it is optimistic")  # fmt: skip
    if not data.test:
        print("No test set (test_fraction 0): the only score is validation's, which chose the model: optimistic")
        val_per_case.attrs = {"scored": "validation"}
        return val_per_case
    # The test frames, scored once with the weights and the min area validation chose: nothing tuned on them.
    per_case, _ = score_frames(model, data.test, cfg, min_area)
    save_atomically(cfg.output_dir / "test_per_case.csv", lambda path: per_case.to_csv(path, index=False))
    baseline = per_case["has_nerve"].eq(False).mean()
    print(f"Test Dice {describe_ci(per_case['dice'], per_case['subject'], unit='frames')} (Kaggle metric at "
          f"420x580, min area {min_area} px; all-empty baseline {baseline:.4f}): the result")  # fmt: skip
    per_case.attrs = {"scored": "test", "all_empty": baseline}
    return per_case


def figure_frames(frames: list[dict], n: int) -> list[int]:
    """The indices of up to `n` frames to draw: frames with a nerve first, then one without (where a good model
    predicts nothing)."""
    with_nerve = [i for i, f in enumerate(frames) if f["has_nerve"]][: max(n - 1, 1)]
    return (with_nerve + [i for i, f in enumerate(frames) if not f["has_nerve"]][:1])[:n]


def draw_predictions(frames: list[dict], predictions: list[tuple]) -> Figure:
    """Validation frames at 420x580 with the true (green) and predicted (red) nerve outlines, and their Dice;
    `predictions[i]` is the (mask (1, 420, 580), Dice) of `frames[i]`, as scored."""
    fig = Figure(figsize=(3.4 * len(frames), 2.9), dpi=100)
    for i, (frame, (pred, score)) in enumerate(zip(frames, predictions)):
        ax = fig.add_subplot(1, len(frames), i + 1)
        ax.imshow(np.asarray(Image.open(frame["path"])), cmap="gray", vmin=0, vmax=255)
        for mask, color in ((frame["full_label"][0], "lime"), (pred[0], "red")):
            if mask.any():
                ax.contour(mask.numpy(), levels=[0.5], colors=color, linewidths=1.2)
        ax.set_title(f"{frame['subject']}_{frame['img']}: Dice {score:.3f}", fontsize=9)
        ax.axis("off")
    handles = [Line2D([], [], color="lime", label="true nerve"), Line2D([], [], color="red", label="predicted")]
    fig.legend(handles=handles, loc="lower center", ncol=2)
    return fig


if __name__ == "__main__":
    per_case = evaluate_best(cfg, data)
    show(per_case)
    show(cfg.output_dir / "val_predictions.png")

# %% Predict
# The trained network on frames it has never seen: by default Kaggle's test/ folder (the submission), or your own
# TIFF or PNG frames (cfg.predict_inputs, PREDICT=), of any size, 8 or 16 bits. Writes predictions/<name>_mask.png
# (0/255, at the frame's own size) and predictions/submission.csv (Kaggle's img,pixels). Needs only the Imports and
# Configuration cells and a best_model.pt: the image size, threshold and min area are the checkpoint's.
if not {"decode_frame", "find_test_frames", "resize", "build_model", "apply_min_area"} <= globals().keys():
    # A fresh kernel that ran only Imports and Configuration: what prediction shares with training (the Data, Model
    # and Train cells' reading, resizing, network and min-area filter) is imported from this file, whose guards do
    # not run.
    from nerve_ultrasound_segmentation import (
        SHAPE,
        TEST_NAME,
        apply_min_area,
        build_model,
        decode_frame,
        find_test_frames,
        full_size_probability,
        resize,
    )


def read_user_frames(paths: list[Path], skipped: Skipped, taken: set[str]) -> dict[Path, np.ndarray]:
    """{path: 8-bit pixels} of the frames among `paths` that can be predicted; the others are named, skipped and
    counted. A Kaggle training mask (<name>_mask.tif) is a label, not a frame; and of two inputs that would write
    the same mask (a.png and a.tif), the second is skipped. `taken`: the names of the masks written so far."""
    frames = {}
    for path in paths:
        name = mask_name(path, "")
        if name.endswith("_mask"):
            skipped.skip(path, "a mask", "its name ends in _mask: a label, not an ultrasound frame")
        elif name in taken:
            skipped.skip(path, "same name", f"{name}_mask.png is the mask of an earlier input")
        else:
            try:
                frames[path] = decode_frame(path)  # 8 or 16 bits, as the Data cell reads Kaggle's frames
                taken.add(name)
            except Unusable as err:
                skipped.skip(path, err)
    return frames


@torch.no_grad()
def predict_frames(model, frames: list[np.ndarray], trained: Config, min_area: int) -> list[np.ndarray]:
    """Nerve masks (H, W) bool, each at its own frame's size, of 8-bit frames of any size: each frame resized to
    the training size as in training (another shape than 420x580 is stretched to it, as the network only knows
    that shape), the probability resized back to the frame's size and thresholded, then the min-area filter with
    the area scaled from 420x580 to the frame's pixel count (a nerve covers the same share of a frame at any
    resolution). For a 420x580 frame, exactly the masks the Evaluate cell scores."""
    if not frames:
        return []
    img = torch.stack([resize(frame, trained.image_size) for frame in frames]).to(DEVICE).float() / 255
    with autocast(DEVICE, trained.amp):
        logits = model(img)  # (B, 1, H, W) at training size
    masks = []
    for frame, frame_logits in zip(frames, logits):
        pred = full_size_probability(frame_logits[None], frame.shape) > trained.threshold  # (1, 1, height, width)
        area = round(min_area * frame.size / (SHAPE[0] * SHAPE[1]))
        masks.append(apply_min_area(pred, area)[0, 0].cpu().numpy())
    return masks


def kaggle_test_frames(cfg: Config, skipped: Skipped) -> tuple[list[Path], dict]:
    """(the challenge's test frames, <img>.tif sorted by img, the first max_test_images only where set; the
    submission's rows preset empty for every img it must list). A frame listed in sample_submission.csv but
    missing, or one that cannot be read, is so predicted empty, and Kaggle still accepts the submission."""
    root = find_dataset("ultrasound-nerve-segmentation", cfg.data_dir, say=False).root  # as load_data finds it
    test_dir = root / "test"
    if not test_dir.is_dir():
        print(f"No folder {test_dir}: no test frames to predict (expected test/<img>.tif)")
        return [], {}
    ids, listed = find_test_frames(root, skipped)
    if cfg.max_test_images is not None and len(ids) > cfg.max_test_images:
        ids = dict(list(ids.items())[: cfg.max_test_images])
        print(f"Predicting the first {len(ids)} test frames only (max_test_images): not a complete submission")
    else:
        for img_id in sorted(set(listed) - ids.keys()):  # the first 10 named, all in the summary's count
            skipped.skip(test_dir / f"{img_id}.tif", "missing", "listed in sample_submission.csv; predicted empty")
            ids[img_id] = None
    return [path for path in ids.values() if path is not None], dict.fromkeys(ids, "")


def submission_id(path: Path) -> int | str:
    """The submission's `img` of a frame: the number of a Kaggle test name (<img>.tif), else the name of its mask."""
    match = TEST_NAME.fullmatch(path.name)
    return int(match[1]) if match else mask_name(path, "")


def write_mask(mask: np.ndarray, path: Path) -> Path:
    """A mask as an 8-bit PNG, 0 background and 255 nerve (Kaggle's _mask.tif values), written atomically."""
    save_atomically(path, lambda partial: Image.fromarray(mask.astype(np.uint8) * 255).save(partial, format="PNG"))
    return path


def write_submission(rows: dict, path: Path) -> Path:
    """submission.csv as Kaggle reads it: `img,pixels`, one row per frame (Kaggle's numbers first, in order, then
    other names), empty pixels for no nerve."""
    table = pd.DataFrame(sorted(rows.items(), key=lambda row: (isinstance(row[0], str), row[0])))
    save_atomically(path, lambda partial: table.set_axis(["img", "pixels"], axis=1).to_csv(partial, index=False))
    return path


def predict(cfg: Config, inputs=None) -> list[Path]:
    """Nerve masks for the frames of `inputs` (a folder, a file, or a list of files; None: Kaggle's test/), with
    the weights of cfg.checkpoint (default: output_dir/best_model.pt) and the settings they were trained with:
    predictions/<name>_mask.png (0/255 uint8 at the frame's own size) and predictions/submission.csv (img,pixels:
    Kaggle's run-length encoding on each frame's own grid). Returns the files written. Process 0 only ([] in the
    others). The input files are only read."""
    if not distributed.is_main():
        return []
    model, trained, checkpoint = load_trained(cfg, build_model, DEVICE)
    min_area = checkpoint["metrics"]["min_area"]  # chosen on validation with these weights, in px at 420x580
    skipped = Skipped("file", print_limit=10)
    paths, rows = kaggle_test_frames(cfg, skipped) if inputs is None else (expand_inputs(inputs), {})
    out_dir = make_folder(cfg.output_dir / "predictions")  # a file in its place: one Output problem line
    written, taken = [], set()
    for start in tqdm(range(0, len(paths), cfg.val_batch_size), desc="predicting", leave=False, disable=None):
        frames = read_user_frames(paths[start : start + cfg.val_batch_size], skipped, taken)
        for path, mask in zip(frames, predict_frames(model, list(frames.values()), trained, min_area)):
            written.append(write_mask(mask, out_dir / mask_name(path, "_mask.png")))
            rows[submission_id(path)] = rle_encode(mask)
    if rows:
        written.append(write_submission(rows, out_dir / "submission.csv"))
    print(skipped.summary(f"Predicted {len(taken)} frame(s) of {len(paths)} file(s) into {out_dir}"))
    return written


if __name__ == "__main__":
    predictions = predict(cfg, cfg.predict_inputs)

# %% Summary


def best_scores(history: History, per_case: pd.DataFrame | None) -> str:
    """The result: the test frames' Kaggle Dice with its 95% interval over subjects (process 0 alone has them), then
    the best epoch's validation Dice, which chose that epoch and the min area, and so is optimistic."""
    best = history.best()
    text = f"validation Dice {best['val_dice']:.4f} (Kaggle metric; all-empty baseline "
    text += f"{best['val_dice_all_empty']:.4f}), min area {best['min_area']} px: they chose the epoch"
    if per_case is None:  # under torchrun, the other processes: process 0 scored the test frames
        return text
    if per_case.attrs.get("scored") != "test":
        return text + "; no test set (test_fraction 0): this score chose the model and is optimistic"
    test = describe_ci(per_case["dice"], per_case["subject"], unit="frames")
    return f"test Dice {test} (Kaggle metric; all-empty baseline {per_case.attrs['all_empty']:.4f}); " + text


if __name__ == "__main__":
    pictures = readme_pictures(cfg, data, {"val_predictions.png": "nerve_ultrasound_segmentation_predictions.png"})
    print(run_summary(cfg, data, history, best_scores(history, per_case),
                      ["best_model.pt", "last_checkpoint.pt", "history.csv", "dice_per_epoch.png", "batch.png",
                       "contradictory_pairs.csv", "skipped.csv", "val_per_case.csv", "test_per_case.csv",
                       "val_predictions.png",
                       "predictions/ (<name>_mask.png, submission.csv)"],
                      pictures))  # fmt: skip
