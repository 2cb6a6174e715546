"""Pneumonia detection on chest radiographs: the RSNA Pneumonia Detection Challenge (Kaggle, 2018) with Faster R-CNN.

Finds the lung opacities of pneumonia as boxes: groups the label rows by patient (one radiograph, zero or more
boxes), splits train/validation/test by patient with a seed at the data's own class mix, caps the training patients
per class, trains torchvision's Faster R-CNN (COCO weights from `weights=` or the local torch cache, else from scratch,
said in the summary), scores every epoch with the
challenge metric and with COCO mAP, keeps the best epoch by the challenge metric, chooses on the validation set the
score above which a box is kept, scores the held-out test patients once with both (the result, with a 95% bootstrap
interval over radiographs), and predicts boxes on radiographs it has never seen (DICOM, PNG or JPEG, any size): by
default the challenge's `stage_2_test_images/`, in Kaggle's submission format.
Challenge and metric: https://www.kaggle.com/c/rsna-pneumonia-detection-challenge (Overview > Evaluation).

Data: `data/rsna-pneumonia-detection-challenge/` as unzipped from Kaggle (`stage_2_train_labels.csv`,
`stage_2_detailed_class_info.csv`, `stage_2_train_images/<patientId>.dcm`, `stage_2_test_images/<patientId>.dcm`).
Without it the synthetic stand-in under `data/sample/` is used (written when missing), and the script says so.
Outputs: `output/pneumonia_detection/`: `best_model.pt`, `last_checkpoint.pt`, `history.csv`,
`rsna_metric_per_epoch.png`, `batch.png`, `val_per_case.csv`, `test_per_case.csv` (RSNA precision per held-out test
radiograph: the result), `val_predictions.png` (true and predicted boxes;
copied to `Images/` for the README when the synthetic sample was used), `predictions/` (`predictions.csv`: the
Kaggle submission, `patientId,PredictionString`, boxes in each input's own pixels; `<name>_boxes.png` per input).

Run: `python pneumonia_detection.py` (`QUICK=1` for a short first try), or cell by cell in VS Code or Jupyter,
each cell leaving its result to look at: `cfg`, `data`, `batch`, `model`, `history`, `per_case`. Edit the
configuration inline (`cfg = Config(max_epochs=10)`) and run the cells below again; after Ctrl-C,
`Config(resume=True)` goes on. On several GPUs: `torchrun --nproc_per_node=4 pneumonia_detection.py` (README:
several GPUs and machines). Predict on your own radiographs with the trained model, no training:
`PREDICT=path/to/folder python pneumonia_detection.py` (`CHECKPOINT=path/to/best_model.pt` for other weights).
"""

# %% Imports
import contextlib
import io
import math
import os
import pickle
import warnings
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.models.detection import (
    FasterRCNN_ResNet50_FPN_V2_Weights,
    FasterRCNN_ResNet50_FPN_Weights,
    fasterrcnn_resnet50_fpn,
    fasterrcnn_resnet50_fpn_v2,
)
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import box_iou
from torchvision.ops.misc import FrozenBatchNorm2d
from torchvision.transforms import v2
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
    mask_name,
    one_line_data_problems,
    prepare_cached,
    read_radiograph,
    read_table,
    split_groups,
)
from dice import describe_ci, save_figure, show
from precision import autocast, grad_scaler
from sample_data import find_dataset

# %% Configuration
# The repository root, whether run as a file (from any directory) or in a notebook kernel (no __file__).
ROOT = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
QUICK = os.environ.get("QUICK", "0") == "1"  # the collection's quick-run switch (README): read here, once
DEVICE = distributed.device()  # picked once: the GPU if any (under torchrun, this process's own), else the CPU


@dataclass
class Config(BaseConfig):
    data_dir: Path = ROOT / "data"  # holds rsna-pneumonia-detection-challenge/ as unzipped; else data/sample/ is used
    output_dir: Path = ROOT / "output" / "pneumonia_detection"  # weights, history, plots, predictions/
    images_dir: Path = ROOT / "Images"  # the README's picture: val_predictions.png is copied there, from runs on
    # the synthetic sample only (pictures of real patients never land in a folder of the repository)
    seed: int = 0  # the training sample per class, the initial weights and the flips
    split_seed: int = 0  # which patients are validation and test: kept apart from `seed`, so a new seed keeps the test
    patients_per_class: int | None = 500  # cap on the TRAINING patients per class of the detailed class CSV (balanced
    # training, as the original's sample), drawn after the split; validation and test keep the data's own mix (22.5%
    # with opacity), each val_fraction (test_fraction) / (1 - val_fraction - test_fraction) as many as training (500
    # each for 1,500, 113 with opacity); None: all
    val_fraction: float = 0.2  # of each class's patients, to choose the epoch and the score threshold; split by
    # patient (one radiograph, all its label rows: split by row, one patient could land on both sides), stratified by
    # class: the data's mix
    test_fraction: float = 0.2  # of each class's patients, held out and scored once at the end: the result (0: no
    # test set, and the only score is validation's, which chose the model and is optimistic)
    cache: bool = True  # keep each radiograph decoded and resized on disk (cache_dir): the next run reads it back
    cache_dir: Path | None = None  # None: <data_dir>/cache/pneumonia_detection/ (beside the downloads, never inside)
    image_size: int = 512  # side the 1024-px radiographs are resized to; the opacities are large (150-350 px),
    # and 512 px is what most challenge solutions trained at
    model: str = "fasterrcnn_resnet50_fpn"  # or "fasterrcnn_resnet50_fpn_v2" (Li et al. 2021: better, slower)
    pretrained: str = "auto"  # "auto": COCO weights from `weights`, else from the torch cache (never downloaded), else
    # from scratch (the summary says so: scores then not comparable with the leaderboard); "none": from scratch
    weights: Path | None = None  # torchvision's COCO file for `model` downloaded elsewhere (for the v1 model
    # fasterrcnn_resnet50_fpn_coco-258fb6c6.pth), used before the torch cache; checked: a missing file is one line
    trainable_backbone_layers: int = 3  # with COCO weights: ResNet stages trained, from the top (torchvision's 3)
    train_predictor_only: bool = False  # with COCO weights: train the new box predictor only, as the original did
    rpn_proposals_train: int = 2000  # RPN proposals kept per image in training (torchvision's 2000)
    rpn_proposals_test: int = 1000  # ... at inference (torchvision's 1000); the box head runs on every one
    box_batch_size_per_image: int = 512  # proposals sampled per image for the box head's loss (torchvision's)
    lr: float = 0.005  # SGD, as torchvision's detection fine-tuning tutorial and the original
    momentum: float = 0.9  # ditto
    weight_decay: float = 5e-4  # ditto
    step_size: int = 3  # epochs between learning-rate drops (StepLR)
    gamma: float = 0.1  # learning-rate factor at each drop
    max_epochs: int = 5
    batch_size: int = 4  # radiographs per step (torchvision's tutorial uses 2-4 at 800 px)
    max_steps_per_epoch: int | None = None  # cap on training steps per epoch (tests); None: the whole training set
    hflip: float = 0.5  # probability of a horizontal flip (boxes flipped too): opacities occur in either lung
    score_thresholds: tuple[float, ...] = (0.01, 0.02, 0.03, *(round(0.05 * i, 2) for i in range(1, 20)))  # to 0.95:
    # candidate scores above which a box is kept, chosen on validation (a box on a negative radiograph zeroes it);
    # the low ones for a model trained from scratch for a few steps, whose scores are still low
    precise_bn_batches: int = 50  # training batches over which batch-norm statistics are recomputed before each
    # validation (0: never); see recompute_batch_norm
    num_workers: int = 0  # radiographs are decoded once and cached as tensors: workers would only add start-up
    amp: bool = True  # mixed precision on CUDA (bfloat16 where supported, else float16); ignored on the CPU
    examples: int = 4  # validation radiographs drawn in val_predictions.png (positives first)
    prediction_pictures: int | None = 100  # predictions/<name>_boxes.png for the first so many inputs (None: all):
    # the challenge's test folder has 3,000 radiographs, and the CSV holds every box anyway
    predict_inputs: Path | None = PREDICT  # the Predict cell's input: a folder or a file (None: stage_2_test_images/)
    checkpoint: Path | None = CHECKPOINT  # the weights the Predict cell uses (None: output_dir/best_model.pt)
    tensorboard: bool = False  # also log the history to output_dir/tensorboard (needs `pip install tensorboard`)
    resume: bool = RESUME  # go on from output_dir/last_checkpoint.pt (written after every epoch) up to max_epochs;
    # RESUME=1 python pneumonia_detection.py from the command line
    quick: bool = QUICK  # the quick run below; recorded in the checkpoint: a quick model is not a result
    AS_TRAINED: ClassVar[tuple[str, ...]] = ("image_size", "model", "rpn_proposals_test")  # read by prediction from
    # the checkpoint: the network has only learnt opacities at the size it was trained at (its boxes, proposals and
    # lowest score are built from the checkpoint's settings too); the score threshold is the one chosen on validation

    # The quick run (QUICK=1, or Config(quick=True)): a first try in a few minutes on a CPU, from scratch. These
    # replace the defaults above; a setting given explicitly, as in Config(quick=True, max_epochs=5), wins.
    QUICK_RUN: ClassVar[dict] = dict(
        patients_per_class=12,  # the sample's 36 patients (12 per class): 24 training radiographs, 6 validation, 6 test
        image_size=128,  # 128 px still shows the opacities, with 16x fewer pixels than 512
        rpn_proposals_train=300,  # the box head runs on every proposal: a few hundred cover a 128-px image
        rpn_proposals_test=300,
        box_batch_size_per_image=64,  # at 128 px on a CPU the box head on 512 proposals costs twice the backbone
        step_size=10,  # epochs of 7 steps are too few to gain from a learning-rate drop: none in the quick run
        max_epochs=10,  # 70 steps; from scratch, the sample's opacities appear after about 30
    )


cfg = Config()
if __name__ == "__main__":
    distributed.setup()  # under torchrun: join the other processes (README: several GPUs); else nothing
    one_line_data_problems()  # from the command line, a data folder unlike the README's is one line
    print(cfg.describe())
    if PREDICT:  # PREDICT=<folder or file> python pneumonia_detection.py: predict, no training (README)
        predict_only(__file__)

# %% Data
LABELS_CSV = "stage_2_train_labels.csv"  # patientId,x,y,width,height,Target: one row per box, or one NaN row
CLASSES_CSV = "stage_2_detailed_class_info.csv"  # patientId,class: repeated on every label row of a patient
TRAIN_IMAGES, TEST_IMAGES = "stage_2_train_images", "stage_2_test_images"  # <patientId>.dcm in each
SAMPLE_SUBMISSION = "stage_2_sample_submission.csv"  # patientId,PredictionString: every test patient, listed once


def read_patients(root: Path) -> list[dict]:
    """The labelled patients of `root`, one dict per patient (= one radiograph), sorted by patientId.

    {"patient_id", "class", "path" (the DICOM), "boxes" (k, 4) float64 x1, y1, x2, y2 in the image's pixels}; k is
    0 for the negatives, which stay negatives: an empty target, never a whole-image box. Class names are read
    stripped (" Lung Opacity " is Lung Opacity); a patient missing from the class CSV is kept as class "unknown",
    and those patients are named in one line.
    """
    labels_path, classes_path = root / LABELS_CSV, root / CLASSES_CSV
    for path in (labels_path, classes_path):
        if not path.is_file():
            raise DatasetError(f"{path} not found: expected the Kaggle download unzipped in {root} (README.md)")
    # Checked: a missing column, or a coordinate or Target that is not a number, is one line naming the file, the
    # column and the row. x, y, width and height are blank on the rows of patients without a box.
    coordinates = dict.fromkeys(["x", "y", "width", "height"], "number")
    labels = read_table(labels_path, {"patientId": "str", **coordinates, "Target": "int"}, "one row per box")
    classes = read_table(classes_path, {"patientId": "str", "class": "str"}, "one class per patient")
    classes = classes[classes["class"] != ""].drop_duplicates("patientId")  # names read stripped: " Normal" is Normal
    classes = classes.set_index("patientId")["class"]
    unknown = sorted(set(labels["patientId"]) - set(classes.index))
    if unknown:  # stratified as a class of their own: say so, and which
        first = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        print(f"{len(unknown)} patient{'s' * (len(unknown) != 1)} of {LABELS_CSV} not in {CLASSES_CSV}, kept "
              f"with class 'unknown': {first}")  # fmt: skip
    # One pass over the table, not a pandas lookup per patient (26,684 of them: 10 s on a 2-core machine): every
    # row's box as one array, sorted by patientId, then cut at each patient's first row
    order = np.argsort(labels["patientId"].to_numpy(), kind="stable")
    ids, target = labels["patientId"].to_numpy()[order], labels["Target"].to_numpy()[order]
    xywh = labels[["x", "y", "width", "height"]].to_numpy(np.float64)[order]
    corners = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)  # x1, y1, x2, y2
    patient_ids, starts = np.unique(ids, return_index=True)
    ends = np.append(starts[1:], len(ids))
    class_of = classes.reindex(patient_ids, fill_value="unknown")
    return [
        {
            "patient_id": patient_id,
            "class": name,
            "path": root / TRAIN_IMAGES / f"{patient_id}.dcm",
            "boxes": corners[start:end][target[start:end] == 1],  # (k, 4); k = 0 for a negative
        }
        for patient_id, name, start, end in zip(patient_ids, class_of, starts, ends)
    ]


def sample_patients(patients: list[dict], per_class: int | None, seed: int) -> list[dict]:
    """Up to `per_class` patients of each class, drawn with `seed`; all of them when `per_class` is None. For
    training only (choose_patients): validation keeps the data's class mix."""
    rng = np.random.default_rng(seed)
    sampled = []
    for name in sorted({p["class"] for p in patients}):
        members = [p for p in patients if p["class"] == name]
        if per_class is not None and len(members) > per_class:
            members = [members[i] for i in sorted(rng.choice(len(members), size=per_class, replace=False))]
        sampled += members
    return sorted(sampled, key=lambda p: p["patient_id"])


def split_by_patient(
    patients: list[dict], val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test): each class's patients drawn by data_cleaning.split_groups with `seed`, the test
    patients first, at least one of each class on each side asked for. A class too small for that (fewer patients
    than sides) goes to training whole.

    Each patient is one radiograph with all its boxes, so no patient is on two sides. Stratifying by class keeps
    the data's class mix in validation and test (to rounding), and positives and both kinds of negatives in small
    ones.
    """
    sides = ([], [], [])
    needed = 1 + (val_fraction > 0) + (test_fraction > 0)
    for name in sorted({p["class"] for p in patients}):
        members = {p["patient_id"]: p for p in patients if p["class"] == name}
        if len(members) < needed:
            sides[0].extend(members.values())
            continue
        for side, ids in zip(sides, split_groups(members, val_fraction, test_fraction, seed)):
            side.extend(members[i] for i in ids)
    return tuple(sorted(side, key=lambda p: p["patient_id"]) for side in sides)


def choose_patients(patients: list[dict], cfg: Config) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, validation, test) patients: split by patient first, at the data's class mix (`split_seed`), then
    (patients_per_class) training capped per class and validation and test each drawn down to its fraction /
    (1 - val_fraction - test_fraction) of training's size, stratified by class again, so still at the data's mix.

    Drawing the same number per class for every side, as the original did, made validation a third positive against
    22.5% in the data: the score threshold chosen there kept boxes too readily, and the metric came out inflated.
    A balanced training set is kept: positives are where a detector learns its boxes."""
    train, val, test = split_by_patient(patients, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    train = sample_patients(train, cfg.patients_per_class, cfg.seed)
    if cfg.patients_per_class is not None:
        kept = 1 - cfg.val_fraction - cfg.test_fraction  # training's share of the split
        drawn = []
        for side, fraction in ((val, cfg.val_fraction), (test, cfg.test_fraction)):
            n = round(len(train) * fraction / kept)
            if 0 < n < len(side):  # the same stratified draw, keeping n of them
                side = split_by_patient(side, n / len(side), 0, cfg.split_seed)[1]
            drawn.append(side)
        val, test = drawn
    return train, val, test


def with_opacity(items: list[dict]) -> tuple[int, float]:
    """(how many of `items` show an opacity, their share of `items`)."""
    n_pos = sum(len(item["boxes"]) > 0 for item in items)
    return n_pos, n_pos / max(len(items), 1)


PREPARATION = {"resize": "Pillow bilinear, antialiased", "version": 2}  # in the disk cache's key with image_size


def resize_radiograph(pixels: np.ndarray, size: int) -> np.ndarray:
    """(size, size) uint8: stretched to 0..255 (the challenge's images are 8-bit already) and resized with Pillow's
    bilinear filter, which widens with the reduction (antialiased). NumPy and Pillow only: it runs in the disk
    cache's forked workers, where torch's threads would not."""
    low, high = float(pixels.min()), float(pixels.max())
    unit = ((pixels - low) / max(high - low, 1e-6)).astype(np.float32)  # 0..1
    resized = np.asarray(Image.fromarray(unit).resize((size, size), Image.Resampling.BILINEAR))
    return np.clip(np.round(resized * 255), 0, 255).astype(np.uint8)


def to_uint8(pixels: np.ndarray, size: int) -> torch.Tensor:
    """(1, size, size) uint8, as `resize_radiograph`. Kept as uint8, 1,000 radiographs at 512 px take 260 MB."""
    return torch.from_numpy(resize_radiograph(pixels, size))[None]


def prepare_radiograph(job: tuple[Path, int]) -> dict[str, np.ndarray]:
    """The deterministic part of a radiograph's preparation, what the disk cache keeps: (DICOM path, size) ->
    {"image": (size, size) uint8, "shape": the DICOM's (height, width)}. Raises Unusable."""
    path, size = job
    pixels, _ = read_radiograph(path)  # DICOM, rescaled, MONOCHROME1 inverted (data_cleaning)
    return {"image": resize_radiograph(pixels, size), "shape": np.array(pixels.shape, dtype=np.int64)}


def decode_radiographs(patients: list[dict], size: int, skipped: Skipped, progress: bool, cache) -> list:
    """[(patient, {"image", "shape"})] of the patients whose DICOM exists and decodes: from `cache` (a
    data_cleaning.DiskCache) where built, else decoded on every core and written to it; without a cache, decoded
    here, one after the other. Bad inputs are named, skipped and counted."""
    present = []
    for patient in patients:
        if patient["path"].is_file():
            present.append(patient)
        else:
            skipped.skip(patient["patient_id"], "missing DICOM", f"{patient['path']} not found")
    by_path = {patient["path"]: patient for patient in present}
    jobs = [(patient["path"], size) for patient in present]
    if cache is not None:
        done = prepare_cached(jobs, lambda job: [job[0]], prepare_radiograph, cache, skipped, desc="decoding",
                              name_of=lambda job: by_path[job[0]]["patient_id"])  # fmt: skip
        return [(by_path[job[0]], arrays) for job, arrays in done]
    done = []
    for patient, job in zip(present, tqdm(jobs, desc="decoding", leave=False, disable=None if progress else True)):
        try:
            done.append((patient, prepare_radiograph(job)))
        except Unusable as err:
            skipped.skip(patient["patient_id"], err)
    return done


def load_patients(patients: list[dict], size: int, skipped: Skipped, progress: bool = True, cache=None) -> list[dict]:
    """Each patient's DICOM decoded and resized to `size` once (`decode_radiographs`: from the disk cache where
    built, memory-mapped) and kept; bad inputs are named, skipped and counted.

    Adds "image" (1, size, size) uint8, "scale" (size / the DICOM's side) and "target_boxes" (k, 4) float32 in
    `size` pixels. A box reaching outside the image skips the whole patient: clipping it would train on a box we
    know to be wrong, and dropping it would turn part of a positive radiograph into a negative. The boxes are
    checked here, after the cache, as they come from the label CSV, not from the DICOM.
    """
    items = []
    for patient, arrays in decode_radiographs(patients, size, skipped, progress, cache):
        try:
            height, width = (int(n) for n in arrays["shape"])
            boxes = patient["boxes"]
            invalid = ~np.isfinite(boxes).all(1) | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
            if invalid.any():
                corners = boxes[invalid][0].round(1).tolist()
                raise Unusable("invalid box", f"a Target 1 row without a usable box: x1, y1, x2, y2 = {corners}")
            outside = (boxes[:, :2] < 0).any(1) | (boxes[:, 2] > width) | (boxes[:, 3] > height)
            if outside.any():
                where = f"x1, y1, x2, y2 = {boxes[outside][0].round(1).tolist()} in a {width}x{height} image"
                raise Unusable("box outside the image", f"{where} ({outside.sum()} of {len(boxes)} boxes)")
        except Unusable as err:
            skipped.skip(patient["patient_id"], err)
            continue
        scale = np.array([size / width, size / height, size / width, size / height])
        items.append(
            {
                **patient,
                # Not copied: from the disk cache, the pages of the memory-mapped entry, shared by the processes
                # of the machine under torchrun and read from disk when first used
                "image": torch.from_numpy(arrays["image"])[None],
                "scale": scale,
                "target_boxes": torch.as_tensor(boxes * scale, dtype=torch.float32).reshape(-1, 4),
            }
        )
    return items


def to_original(boxes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Boxes (n, 4) in network pixels back to the DICOM's pixels (1024 px for the challenge)."""
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / scale


def radiograph_cache(cfg: Config) -> DiskCache | None:
    """The disk cache of decoded radiographs (None with cache=False): one entry per DICOM, keyed by image_size, the
    preparation (PREPARATION) and the file's path, size and modification time, so that a changed setting or file
    rebuilds exactly its entries."""
    if not cfg.cache:
        return None
    folder = cfg.cache_dir or Path(cfg.data_dir) / "cache" / "pneumonia_detection"
    return DiskCache(folder, {"image_size": cfg.image_size, **PREPARATION}, ("image", "shape"))


def test_patients(root: Path) -> list[str]:
    """The patients the challenge's sample submission lists (a submission needs a row for each), [] without it; a
    file without its patientId column is one DatasetError naming it."""
    path = root / SAMPLE_SUBMISSION
    return read_table(path, {"patientId": "str"}, "the test patients")["patientId"].tolist() if path.is_file() else []


def check_test_images(root: Path) -> str:
    """One line on what the Predict cell will submit, read now, before any training: a sample submission that
    cannot be read stops the run here (DatasetError) rather than after hours of training."""
    if not (root / TEST_IMAGES).is_dir():
        return f"No folder {root / TEST_IMAGES}: no challenge test radiographs to submit (the Predict cell takes yours)"
    present = {path.stem for path in (root / TEST_IMAGES).glob("*.dcm")}
    listed = test_patients(root)
    missing = len(set(listed) - present)
    listing = f"{SAMPLE_SUBMISSION} lists {len(listed)}" if listed else f"no {SAMPLE_SUBMISSION}"
    gaps = f", {missing} of them missing (to be listed with no box)" if missing else ""
    return f"Test radiographs for the submission: {len(present)} in {root / TEST_IMAGES}, {listing}{gaps}"


def load_data(cfg: Config) -> Data:
    """The labelled radiographs of the download (or of the sample): grouped by patient, split by patient with
    validation at the data's class mix, training capped at `patients_per_class` per class (choose_patients),
    decoded once and kept in memory at `image_size`."""
    with distributed.main_first():  # process 0 writes the synthetic sample if missing, the others then read it
        root, synthetic = find_dataset("rsna-pneumonia-detection-challenge", cfg.data_dir)
    patients = read_patients(root)
    print(check_test_images(root))  # every file the run needs is read before training
    per_class = Counter(p["class"] for p in patients)
    print(f"{len(patients)} labelled patients ({', '.join(f'{n} {name}' for name, n in sorted(per_class.items()))})")
    skipped = Skipped("patient")
    chosen = choose_patients(patients, cfg)
    drawn = sum(map(len, chosen))
    # Every process decodes the same patients (uint8 at image_size: 0.26 MB a radiograph at 512 px), so all find the
    # same usable ones and the same split; each then trains on its own shard of it (build_train_loader).
    cache = radiograph_cache(cfg)
    with distributed.main_first():  # under torchrun process 0 decodes into the cache, the others then read it
        train, val, test = (load_patients(part, cfg.image_size, skipped, cache=cache) for part in chosen)
    if cache is not None:
        print(f"Disk cache {cache.folder}: {cache.read} radiographs read back, {cache.built} decoded and written")
    print(skipped.summary(f"{root / TRAIN_IMAGES} ({drawn} patients drawn)"))
    if distributed.is_main():  # every process read the same patients: one lists the skipped ones
        skipped.save(make_folder(cfg.output_dir) / "skipped.csv")
    wanted = {"training": train, "validation": val} | ({"test": test} if cfg.test_fraction > 0 else {})
    if not all(wanted.values()):
        raise DatasetError(
            f"{len(train) + len(val) + len(test)} usable patients of {drawn} drawn: need one for "
            f"{', '.join(wanted)} at least, with their DICOMs in {root / TRAIN_IMAGES}/<patientId>.dcm and their "
            f"boxes in {root / LABELS_CSV}"
        )
    mix = ", ".join(f"{name} {len(items)} radiographs, {with_opacity(items)[0]} with opacity "
                    f"({with_opacity(items)[1]:.1%})" for name, items in (("training", train), ("validation", val),
                                                                          ("test", test)))  # fmt: skip
    print(f"Split by patient (split_seed {cfg.split_seed}), stratified by class, all at {cfg.image_size} px: {mix} "
          f"(of all {len(patients)} labelled patients: {with_opacity(patients)[1]:.1%})")  # fmt: skip
    return Data(root, synthetic, train, val, test, unit="radiographs", skipped=skipped)


if __name__ == "__main__":
    data = load_data(cfg)
    print(data)

# %% Transforms
# The radiographs are cached as uint8 tensors at training size, so the transforms are cheap: a left-right flip,
# and floats in 0..1 on three channels as the COCO-trained backbone takes them. torchvision.transforms.v2 moves the
# boxes with the image; negatives carry an empty (0, 4) box tensor. Left-right is a fair flip for a chest
# radiograph's opacities (they occur in either lung); up-down is not.


def build_transforms(cfg: Config, train: bool) -> v2.Compose:
    """uint8 (1, S, S) -> float (3, S, S) in 0..1, as the COCO-trained backbone takes; flipped when training."""
    flips = [v2.RandomHorizontalFlip(cfg.hflip)] if train and cfg.hflip > 0 else []
    return v2.Compose([*flips, v2.ToDtype(torch.float32, scale=True), v2.RGB()])


class DetectionDataset(Dataset):
    """Cached radiographs as torchvision detection models take them: (image (3, S, S), {"boxes", "labels"})."""

    def __init__(self, items: list[dict], transforms: v2.Compose):
        self.items, self.transforms = items, transforms

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        item = self.items[index]
        boxes = item["target_boxes"]
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(item["image"].shape[-2:])),
            "labels": torch.ones(len(boxes), dtype=torch.int64),  # 1 = opacity; 0 is the background
        }
        return self.transforms(tv_tensors.Image(item["image"]), target)


def collate(batch: list[tuple]) -> tuple[tuple, tuple]:
    """Images of a detection batch stay a list (the model batches them itself), with one target dict each."""
    return tuple(zip(*batch))


def build_train_loader(cfg: Config, data: Data) -> DataLoader:
    """The training radiographs, shuffled and flipped, in batches of (images, targets).

    Under torchrun each process trains on its own shard of the radiographs, reshuffled every epoch, with batch_size
    radiographs per process and step; in one process there is no sampler and the loader shuffles them all. The
    validation radiographs need no loader: evaluate() predicts them in batches, each process its share."""
    train_ds = DetectionDataset(data.train, build_transforms(cfg, train=True))
    sampler = distributed.train_sampler(train_ds, cfg.seed)
    shard_size = len(sampler) if sampler is not None else len(train_ds)
    return DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=shard_size > cfg.batch_size,  # no tiny last batch, unless there is only one batch
        collate_fn=collate,
        generator=torch.Generator().manual_seed(cfg.seed),
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
    )


def outline(ax, boxes, color: str, scores=None) -> None:
    """Draw boxes (n, 4) x1, y1, x2, y2 in the picture's pixels on `ax`, with their scores if given."""
    for i, (x1, y1, x2, y2) in enumerate(np.asarray(boxes).reshape(-1, 4)):
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=1.5))
        if scores is not None:
            ax.text(x1, y1, f"{scores[i]:.2f}", color=color, fontsize=7, va="bottom")


def draw_batch(batch: tuple, n: int = 6) -> Figure:
    """The first radiographs of a training batch as the network gets them (flipped, at training size), with their
    boxes in green."""
    images, targets = batch
    n = min(n, len(images))
    fig = Figure(figsize=(3.2 * n, 3.5), dpi=100)
    for i in range(n):
        ax = fig.add_subplot(1, n, i + 1)
        ax.imshow(images[i][0].numpy(), cmap="gray", vmin=0, vmax=1)
        outline(ax, targets[i]["boxes"], "lime")
        n_boxes = len(targets[i]["boxes"])
        ax.set_title(f"{n_boxes} box{'es' * (n_boxes != 1)}" if n_boxes else "no opacity", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"A training batch: {len(images)} images {tuple(images[0].shape)} {images[0].dtype}", fontsize=10)
    return fig


if __name__ == "__main__":
    train_loader = build_train_loader(cfg, data)
    batch = next(iter(train_loader))  # (images: (3, S, S) float each, targets: {"boxes" (k, 4), "labels"} each)
    show(save_figure(draw_batch(batch), cfg.output_dir / "batch.png"))

# %% Model and loss
# Faster R-CNN: Ren, He, Girshick, Sun, "Faster R-CNN: Towards Real-Time Object Detection with Region Proposal
# Networks", NeurIPS 2015, https://arxiv.org/abs/1506.01497; with a feature pyramid (Lin et al. 2017,
# https://arxiv.org/abs/1612.03144). A region proposal network scores anchor boxes as object or not and refines
# them; a box head classifies each proposal and refines it again. The loss is the sum of the four terms the model
# returns in training (train_one_epoch): RPN objectness and box regression, box-head classification and box
# regression. v2: Li et al. 2021, "Benchmarking Detection Transfer Learning with Vision Transformers",
# arXiv:2111.11429.
MODELS = {
    "fasterrcnn_resnet50_fpn": (fasterrcnn_resnet50_fpn, FasterRCNN_ResNet50_FPN_Weights.COCO_V1),
    "fasterrcnn_resnet50_fpn_v2": (fasterrcnn_resnet50_fpn_v2, FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1),
}


def cached_weights_path(model_name: str) -> Path:
    """Where torch.hub keeps the COCO weights of `model_name` once downloaded: <hub dir>/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / MODELS[model_name][1].url.rsplit("/", 1)[-1]


def coco_weights(cfg: Config) -> Path | None:
    """The COCO weights that build_model starts from, or None when it trains from scratch: the file `cfg.weights`
    if given (a missing one is one line), else torchvision's file if already in the local torch cache, never
    downloaded (the machine may be offline); None with pretrained="none"."""
    if cfg.model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, not {cfg.model!r}")
    if cfg.pretrained not in ("auto", "none"):
        raise ValueError(f"pretrained must be 'auto' or 'none', not {cfg.pretrained!r}")
    if cfg.pretrained == "none":
        if cfg.weights is not None:
            raise ValueError(f"weights={cfg.weights} and pretrained='none' ask for opposite starts: drop one")
        return None
    if cfg.weights is not None:
        if not Path(cfg.weights).is_file():
            raise DatasetError(f"weights={cfg.weights} not found: give torchvision's COCO file for {cfg.model} "
                               f"({cached_weights_path(cfg.model).name}), or None for the torch cache")  # fmt: skip
        return Path(cfg.weights)
    path = cached_weights_path(cfg.model)
    return path if path.is_file() else None


def freeze_batch_norm(module: torch.nn.Module) -> None:
    """Every BatchNorm2d below `module` replaced by a FrozenBatchNorm2d with eps 0, as torchvision's v1 builder
    makes them from the COCO weights: the trained network's numbers to the last bit (eps 1e-5 shifts its scores)."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child.num_features, eps=0.0))
        else:
            freeze_batch_norm(child)


def read_coco_file(path: Path, model: torch.nn.Module, name: str) -> dict:
    """The state dict in `path`, checked against `model` (network `name`, COCO's 91 classes): a file that is no
    PyTorch weights file, or the weights of another network, is one line naming it (DatasetError), not a traceback."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise DatasetError(f"weights={path}: not a readable PyTorch weights file ({type(err).__name__})") from None
    state = state if isinstance(state, dict) else {}
    # Batch norm's step counters come and go with the kind of norm layer (frozen ones have none): not weights.
    expected = {key: value for key, value in model.state_dict().items() if not key.endswith("num_batches_tracked")}
    unfit = [key for key, value in expected.items() if getattr(state.get(key), "shape", None) != value.shape]
    unknown = {key for key in state.keys() - expected.keys() if not key.endswith("num_batches_tracked")}
    if unfit or unknown:
        raise DatasetError(f"weights={path}: not the COCO weights of {name} ({len(unfit)} of its {len(expected)} "
                           f"tensors missing or of another shape, {len(unknown)} unknown)")  # fmt: skip
    return state


def load_coco(model: torch.nn.Module, path: Path, cfg: Config) -> None:
    """The COCO weights of `path` into `model`, which then is what torchvision's builder makes with
    weights=COCO_V1 (a test checks it), from any file, not only the torch cache's: v1's ResNet batch norm frozen
    (FrozenBatchNorm2d, eps 0), and the ResNet stages below the top `trainable_backbone_layers` not trained."""
    if cfg.model == "fasterrcnn_resnet50_fpn":
        freeze_batch_norm(model.backbone.body)
    model.load_state_dict(read_coco_file(path, model, cfg.model))
    stages = ["layer4", "layer3", "layer2", "layer1", "conv1"][: cfg.trainable_backbone_layers]
    stages += ["bn1"] * (cfg.trainable_backbone_layers == 5)  # torchvision's rule: the stem's norm with all five
    for name, parameter in model.backbone.body.named_parameters():
        parameter.requires_grad_(name.startswith(tuple(stages)))


def build_model(cfg: Config) -> torch.nn.Module:
    """Faster R-CNN with a 2-class box predictor (background, opacity), from COCO weights if any (`coco_weights`:
    cfg.weights or the torch cache's), else every layer from scratch, batch norm included."""
    seed_everything(cfg.seed)  # the same initial weights for the same seed, in every process
    builder, _ = MODELS[cfg.model]
    start = coco_weights(cfg)
    kwargs = {
        "min_size": cfg.image_size,  # the model's own resize: to our size, i.e. none (it would upsample to 800)
        "max_size": cfg.image_size,
        "rpn_pre_nms_top_n_train": cfg.rpn_proposals_train,
        "rpn_post_nms_top_n_train": cfg.rpn_proposals_train,
        "rpn_pre_nms_top_n_test": cfg.rpn_proposals_test,
        "rpn_post_nms_top_n_test": cfg.rpn_proposals_test,
        "box_batch_size_per_image": cfg.box_batch_size_per_image,
        "box_score_thresh": min(cfg.score_thresholds),  # lower scores can never be kept
    }
    model = builder(weights=None, weights_backbone=None, **kwargs)  # every layer trainable, COCO's 91 classes
    if start is not None:
        load_coco(model, start, cfg)
    # A new predictor for 2 classes (background, opacity) in place of COCO's 91.
    model.roi_heads.box_predictor = FastRCNNPredictor(model.roi_heads.box_predictor.cls_score.in_features, 2)
    if start is not None and cfg.train_predictor_only:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith("roi_heads.box_predictor."))
    return model


def describe_model(cfg: Config, model: torch.nn.Module) -> str:
    """One line: the network, how many of its parameters train, and whether it starts from COCO weights."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    start = coco_weights(cfg)
    if start is not None:
        origin = f"from the COCO weights in {start}"
    elif cfg.pretrained == "auto":
        origin = (f"from scratch, all layers trainable: COCO weights not found in {cached_weights_path(cfg.model)} "
                  "(weights=<file> for a copy downloaded elsewhere)")  # fmt: skip
    else:
        origin = "from scratch, all layers trainable (pretrained='none')"
    return f"{cfg.model}: {trained:,} of {sum(p.numel() for p in model.parameters()):,} parameters trained, {origin}"


if __name__ == "__main__":
    model = build_model(cfg)
    print(describe_model(cfg, model))

# %% Train


# The challenge's IoU thresholds, 0.40, 0.45, ..., 0.75, rounded so that 0.6 is exactly the float 0.6.
IOU_THRESHOLDS = np.round(np.arange(0.40, 0.751, 0.05), 2)


def rsna_image_precision(
    pred_boxes: np.ndarray, scores: np.ndarray, true_boxes: np.ndarray, thresholds: np.ndarray = IOU_THRESHOLDS
) -> float | None:
    """The challenge's score of one image (boxes x1, y1, x2, y2), or None when the image does not count.

    For each IoU threshold t: the predictions, in descending confidence, each take the unmatched true box of highest
    IoU if that IoU is above t (a hit); precision = TP / (TP + FP + FN); the score is the mean over thresholds. An
    image without true boxes scores 0 with any prediction and is skipped (None) without.
    """
    pred_boxes, true_boxes = np.asarray(pred_boxes).reshape(-1, 4), np.asarray(true_boxes).reshape(-1, 4)
    if len(true_boxes) == 0:
        return None if len(pred_boxes) == 0 else 0.0
    if len(pred_boxes) == 0:
        return 0.0
    order = np.argsort(-np.asarray(scores), kind="stable")
    # float64: an IoU of exactly 0.6 must not come out as 0.6000001 and pass the 0.6 threshold.
    iou = box_iou(*(torch.as_tensor(b, dtype=torch.float64) for b in (pred_boxes[order], true_boxes))).numpy()
    iou = iou[iou.max(axis=1) > min(thresholds)]  # the others are false positives at every threshold
    precisions = []
    for t in thresholds:
        matched = np.zeros(len(true_boxes), dtype=bool)
        for row in iou:
            candidates = np.where(~matched & (row > t), row, -1.0)
            if candidates.max() > t:
                matched[candidates.argmax()] = True
        tp = int(matched.sum())
        fp, fn = len(pred_boxes) - tp, len(true_boxes) - tp
        precisions.append(tp / (tp + fp + fn))
    return float(np.mean(precisions))


def rsna_metric(predictions: list[dict], truths: list[np.ndarray], min_score: float = 0.0) -> float:
    """Mean over images of `rsna_image_precision`, keeping predictions scoring at least `min_score`.

    `predictions[i]`: {"boxes" (n, 4), "scores" (n,)}; `truths[i]`: the true boxes (k, 4). NaN if no image counts.
    """
    values = []
    for pred, truth in zip(predictions, truths):
        keep = np.asarray(pred["scores"]) >= min_score
        value = rsna_image_precision(np.asarray(pred["boxes"])[keep], np.asarray(pred["scores"])[keep], truth)
        if value is not None:
            values.append(value)
    return float(np.mean(values)) if values else math.nan


def choose_score_threshold(
    predictions: list[dict], truths: list[np.ndarray], candidates: tuple[float, ...]
) -> tuple[float, float]:
    """(the candidate score threshold with the best RSNA metric, that metric); the lowest among equals."""
    scored = [(rsna_metric(predictions, truths, t), t) for t in sorted(candidates)]
    best_value, best_threshold = max(scored, key=lambda vt: -math.inf if math.isnan(vt[0]) else vt[0])
    return best_threshold, best_value


def coco_map(predictions: list[dict], truths: list[np.ndarray]) -> tuple[float, float]:
    """(COCO mAP@[.5:.95], mAP@.5) of the predictions, with pycocotools' COCOeval ("bbox"), class "opacity".

    Ground truth and detections are built in memory; pycocotools' prints are silenced. No prediction at all gives
    0; no true box at all gives NaN (COCO's -1).
    """

    def xywh(box) -> list[float]:
        return [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])]

    annotations = []
    for i, truth in enumerate(truths):
        for box in np.asarray(truth).reshape(-1, 4):
            annotation = {"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1, "bbox": xywh(box)}
            annotations.append(annotation | {"area": float((box[2] - box[0]) * (box[3] - box[1])), "iscrowd": 0})
    detections = [
        {"image_id": i + 1, "category_id": 1, "bbox": xywh(box), "score": float(score)}
        for i, pred in enumerate(predictions)
        for box, score in zip(np.asarray(pred["boxes"]).reshape(-1, 4), pred["scores"])
    ]
    if not annotations:
        return math.nan, math.nan
    if not detections:
        return 0.0, 0.0
    truth = COCO()
    truth.dataset = {
        "images": [{"id": i + 1} for i in range(len(truths))],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "opacity"}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        truth.createIndex()
        evaluator = COCOeval(truth, truth.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0]), float(evaluator.stats[1])


@torch.no_grad()
def recompute_batch_norm(model, loader, cfg: Config) -> None:
    """Precise BN: set the running statistics of every batch-norm layer to their average over training batches,
    computed with the current weights (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", arXiv:2105.07576;
    Detectron2's PreciseBN hook).

    Eval mode normalises with running averages that lag behind the weights while they change fast: from scratch,
    on the quick run, eval mode found no opacity for several epochs in which the same weights with batch statistics
    already outlined them (mean best IoU 0.5). With COCO weights the v1 model's batch norm is frozen: nothing to do.
    Under torchrun each process averages over the batches of its own shard, then the processes average their
    statistics (equal numbers of equal batches: the average over all of them), so that all evaluate alike.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if not norms or cfg.precise_bn_batches <= 0:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # None: a plain average over the batches that follow
    model.train()  # batch statistics, and the running averages updated; no gradient, so the weights stay
    for step, (images, targets) in enumerate(loader):
        if step >= cfg.precise_bn_batches:
            break
        with autocast(DEVICE, cfg.amp):
            model([img.to(DEVICE) for img in images], [{k: v.to(DEVICE) for k, v in t.items()} for t in targets])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    distributed.average_buffers(model)  # nothing in one process


def train_one_epoch(model, loader, optimizer, scaler, cfg: Config, epoch: int) -> dict[str, float]:
    """One pass over the training radiographs; returns the mean loss and the mean of each of its four terms.

    Stops with a clear error naming the epoch and batch if the loss is not finite. Under torchrun `model` is the
    DDP wrapper and `loader` deals this process its shard; the losses are averaged over the processes at every step,
    so that every process records the same numbers and all stop together at a loss that is not finite.
    """
    model.train()
    bar = tqdm(loader, desc=f"epoch {epoch} train", leave=False, disable=None)
    epoch_losses = EpochLoss(epoch, cfg.lr, bar)  # read one step late: the GPU never waits for a loss to be read
    for step, (images, targets) in enumerate(bar):
        if cfg.max_steps_per_epoch is not None and step >= cfg.max_steps_per_epoch:
            break
        images = [img.to(DEVICE, non_blocking=True) for img in images]
        targets = [{key: value.to(DEVICE) for key, value in t.items()} for t in targets]
        with autocast(DEVICE, cfg.amp):
            losses = model(images, targets)
            loss = sum(losses.values())
        # The loss and its four terms, averaged over the processes (all stop at the same step at a loss that is not
        # finite), read in one transfer to the CPU, one step late; the epoch's means are per step (n=1).
        values = torch.stack([loss.detach().float(), *(value.detach().float() for value in losses.values())])
        epoch_losses.add(step, distributed.average(values), 1, names=("train_loss", *losses))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # under torchrun, DDP averages the gradients of all processes here
        scaler.step(optimizer)
        scaler.update()
    return epoch_losses.means()


@torch.no_grad()
def detect(model, images: list[torch.Tensor], scales: list[np.ndarray], cfg: Config) -> list[dict]:
    """Predicted boxes (in the DICOM's pixels) and scores of a list of (3, S, S) images, as numpy, best first."""
    model.eval()
    with autocast(DEVICE, cfg.amp):
        outputs = model([img.to(DEVICE) for img in images])
    return [
        {"boxes": to_original(out["boxes"].float().cpu().numpy(), scale), "scores": out["scores"].float().cpu().numpy()}
        for out, scale in zip(outputs, scales)
    ]


def predict_items(model, items: list[dict], cfg: Config) -> list[dict]:
    """Predictions for cached radiographs (in the DICOM's pixels), in the order of `items`, by batches, in this
    process."""
    dataset = DetectionDataset(items, build_transforms(cfg, train=False))
    predictions = []
    for start in tqdm(range(0, len(items), cfg.batch_size), desc="validation", leave=False, disable=None):
        batch = range(start, min(start + cfg.batch_size, len(items)))
        predictions += detect(model, [dataset[i][0] for i in batch], [items[i]["scale"] for i in batch], cfg)
    return predictions


def predict_gathered(model, items: list[dict], cfg: Config) -> list[dict]:
    """Predictions for every radiograph of `items`, in their order, on every process: under torchrun each process
    predicts its share and the shares are gathered (predict_items itself in one process)."""
    share = distributed.shard(items)  # all of them in one process
    return distributed.gather_shards(predict_items(model, share, cfg), len(items))


NO_BOX = {"boxes": np.zeros((0, 4)), "scores": np.zeros(0)}  # predicting nothing: the baseline


def evaluate(model, items: list[dict], cfg: Config) -> dict:
    """The validation row: the RSNA metric at the score threshold that scores best here (chosen on validation, used
    for the submission), COCO mAP, and what predicting nothing scores on the same radiographs.

    Under torchrun each process predicts its share of `items` and the shares are gathered, so every process holds
    all the predictions and computes the same metrics (the same best epoch and score threshold)."""
    predictions = predict_gathered(model, items, cfg)
    truths = [item["boxes"] for item in items]  # the CSV's boxes, in the DICOM's pixels
    threshold, val_rsna = choose_score_threshold(predictions, truths, cfg.score_thresholds)
    val_map, val_map50 = coco_map(predictions, truths)
    return {
        "val_rsna": val_rsna,  # the challenge metric at the best score threshold of this epoch
        "score_threshold": threshold,
        "val_map": val_map,  # COCO mAP@[.5:.95] of all predictions (no threshold: COCO ranks by score)
        "val_map50": val_map50,
        "val_rsna_predict_nothing": rsna_metric([NO_BOX] * len(items), truths),  # the baseline
    }


def fit(cfg: Config, data: Data, model: torch.nn.Module) -> History:
    """Train `model` on the training radiographs, validate every epoch, keep the best epoch by the validation RSNA
    metric (output_dir/best_model.pt, with its score threshold). Returns the history, one row per epoch
    (history.csv)."""
    torch.backends.cudnn.benchmark = DEVICE.type == "cuda"  # every image has the same size: cuDNN's fastest kernels
    # Saved with the weights: a model trained from scratch is rebuilt from scratch (its batch norm trainable), even
    # where COCO weights have reached the cache since.
    cfg = replace(cfg, pretrained="auto" if coco_weights(cfg) is not None else "none")
    train_loader = build_train_loader(cfg, data)
    model.to(DEVICE)
    train_model = distributed.wrap(model)  # DDP under torchrun (gradients averaged); `model` is what is saved
    if distributed.world_size() > 1:  # the flips draw from torch's generator: each process its own way
        torch.manual_seed(cfg.seed + distributed.rank())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    scaler = grad_scaler(DEVICE, cfg.amp)  # float16 only: none with bfloat16 or on the CPU (precision.py)
    steps = min(len(train_loader), cfg.max_steps_per_epoch or len(train_loader))
    print(f"Training on {DEVICE.type}: {len(data.train)} radiographs, {steps} steps per epoch")
    parts = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    title = "Pneumonia detection: validation RSNA metric per epoch"
    with TrainingRun(cfg, "val_rsna", plot="rsna_metric_per_epoch.png", title=title, ylabel="RSNA metric",
                     **parts) as run:  # fmt: skip
        for epoch in run.epochs(train_loader):
            losses = train_one_epoch(train_model, train_loader, optimizer, scaler, cfg, epoch)
            scheduler.step()
            recompute_batch_norm(model, train_loader, cfg)  # precise BN before validating
            run.end_epoch(**losses, **evaluate(model, data.val, cfg))
    return run.history


if __name__ == "__main__":
    history = fit(cfg, data, model)
    show(cfg.output_dir / "rsna_metric_per_epoch.png")
    end_if_stopped(history)  # Ctrl-C or a loss that was not finite: said why; the cells below do not run

# %% Evaluate


def boxes_above(pred: dict, min_score: float) -> dict:
    """The predicted boxes and scores of one radiograph that score at least `min_score`."""
    keep = np.asarray(pred["scores"]) >= min_score
    return {"boxes": np.asarray(pred["boxes"]).reshape(-1, 4)[keep], "scores": np.asarray(pred["scores"])[keep]}


def pick_examples(items: list[dict], n: int) -> list[dict]:
    """Up to `n` radiographs, positives first (with two boxes if any), then one of each kind of negative."""
    positives = sorted((i for i in items if len(i["target_boxes"])), key=lambda i: -len(i["target_boxes"]))
    negatives = {}
    for item in items:
        if not len(item["target_boxes"]):
            negatives.setdefault(item["class"], item)  # the first of each kind of negative
    n_pos = max(n - len(negatives), min(2, n))
    return (positives[:n_pos] + list(negatives.values()))[:n]


def draw_predictions(items: list[dict], predictions: list[dict], threshold: float) -> Figure:
    """Radiographs at training size with their true boxes (green) and predicted boxes with their scores (red).

    `predictions[i]` holds "boxes" (n, 4) in the DICOM's pixels and "scores" (n,), for `items[i]`.
    """
    fig = Figure(figsize=(3.2 * len(items), 3.7), dpi=100)
    for i, (item, pred) in enumerate(zip(items, predictions)):
        ax = fig.add_subplot(1, len(items), i + 1)
        ax.imshow(item["image"][0].numpy(), cmap="gray", vmin=0, vmax=255)
        outline(ax, item["target_boxes"], "lime")
        outline(ax, pred["boxes"] * item["scale"], "red", pred["scores"])
        n_boxes = len(item["target_boxes"])
        ax.set_title(f"{item['patient_id'][:8]}\n{item['class']}, {n_boxes} box{'es' * (n_boxes != 1)}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"Validation: true (green), predicted with score >= {threshold:.2f} (red)", fontsize=10)
    return fig


def score_radiographs(items: list[dict], predictions: list[dict]) -> pd.DataFrame:
    """A row per radiograph: patient_id, class, true and predicted boxes, and its RSNA precision (NaN where it does
    not count: no opacity, no box predicted)."""
    rows = []
    for item, pred in zip(items, predictions):
        precision = rsna_image_precision(pred["boxes"], pred["scores"], item["boxes"])
        rows.append(
            {
                "patient_id": item["patient_id"],
                "class": item["class"],
                "true_boxes": len(item["boxes"]),
                "predicted_boxes": len(pred["boxes"]),
                "rsna_precision": math.nan if precision is None else precision,  # NaN: does not count
            }
        )
    return pd.DataFrame(rows)


def evaluate_best(cfg: Config, data: Data) -> pd.DataFrame | None:
    """The best epoch's weights, read back from best_model.pt, with the score threshold validation chose for them:
    on every validation radiograph (val_per_case.csv, the boxes in val_predictions.png), then once on the held-out
    test radiographs (test_per_case.csv): the RSNA precision per radiograph, their mean (the challenge metric) the
    result, with a 95% bootstrap interval over the radiographs that count, and COCO mAP.

    Returns the test radiographs' rows (the validation ones' when test_fraction is 0), `attrs` saying which
    ("scored") and the baseline and mAP of those radiographs, for the Summary. Process 0 only (None in the others)."""
    if not distributed.is_main():
        return None
    model, checkpoint = load_best(cfg, build_model, DEVICE)
    threshold = checkpoint["metrics"]["score_threshold"]
    predictions = [boxes_above(pred, threshold) for pred in predict_items(model, data.val, cfg)]
    val_per_case = score_radiographs(data.val, predictions)
    save_atomically(cfg.output_dir / "val_per_case.csv", lambda path: val_per_case.to_csv(path, index=False))
    shown = pick_examples(data.val, cfg.examples)
    by_patient = {item["patient_id"]: pred for item, pred in zip(data.val, predictions)}
    figure = draw_predictions(shown, [by_patient[item["patient_id"]] for item in shown], threshold)
    save_figure(figure, cfg.output_dir / "val_predictions.png")
    counted, best = val_per_case["rsna_precision"].dropna(), checkpoint["metrics"]
    print(f"Best epoch {checkpoint['epoch']}: validation RSNA metric {counted.mean():.4f} with score >= "
          f"{threshold:.2f} (mean over the {len(counted)} of {len(val_per_case)} radiographs that count; predicting "
          f"nothing scores {best['val_rsna_predict_nothing']:.4f}; mAP {best['val_map']:.4f}, mAP@.5 "
          f"{best['val_map50']:.4f}): validation chose the epoch and the threshold, so it is optimistic")  # fmt: skip
    if not data.test:
        print("No test set (test_fraction 0): the only score is validation's, which chose the model: optimistic")
        val_per_case.attrs = {"scored": "validation"}
        return val_per_case
    # The test radiographs, scored once with the weights and the score threshold validation chose.
    raw = predict_items(model, data.test, cfg)
    per_case = score_radiographs(data.test, [boxes_above(pred, threshold) for pred in raw])
    save_atomically(cfg.output_dir / "test_per_case.csv", lambda path: per_case.to_csv(path, index=False))
    truths = [item["boxes"] for item in data.test]
    test_map, test_map50 = coco_map(raw, truths)
    nothing = rsna_metric([NO_BOX] * len(truths), truths)
    per_case.attrs = {"scored": "test", "threshold": threshold, "predict_nothing": nothing, "map": test_map,
                      "map50": test_map50}  # fmt: skip
    print(f"Test {held_out_scores(per_case)}: the result")
    return per_case


def held_out_scores(per_case: pd.DataFrame) -> str:
    """The test radiographs' RSNA metric with its interval, as the Evaluate cell prints it and the Summary gives it."""
    a = per_case.attrs
    metric = describe_ci(per_case["rsna_precision"], unit="radiographs that count")
    return (f"RSNA metric {metric} at score >= {a['threshold']:.2f} of {len(per_case)} radiographs (predicting "
            f"nothing: {a['predict_nothing']:.4f}; mAP {a['map']:.4f}, mAP@.5 {a['map50']:.4f})")  # fmt: skip


if __name__ == "__main__":
    per_case = evaluate_best(cfg, data)
    show(per_case)
    show(cfg.output_dir / "val_predictions.png")

# %% Predict
# The trained network on radiographs it has never seen: by default the challenge's stage_2_test_images/ (the Kaggle
# submission), or your own (cfg.predict_inputs, PREDICT=): DICOM (by name or content), PNG or JPEG, of any size.
# Writes predictions/predictions.csv (Kaggle's patientId,PredictionString, boxes in each input's own pixels) and
# predictions/<name>_boxes.png. Needs only the Imports and Configuration cells and a best_model.pt: the image size
# and network are the checkpoint's, the score threshold the one chosen on validation with those weights.
SHARED = ("TEST_IMAGES", "test_patients", "to_uint8", "build_transforms", "outline", "build_model",
          "freeze_batch_norm", "detect", "boxes_above")  # fmt: skip
if not set(SHARED) <= globals().keys():
    # A fresh kernel that ran only Imports and Configuration: what prediction shares with training (the Data cell's
    # resizing, the network, the Train cell's detection) is imported from this file, whose guards do not run.
    from pneumonia_detection import (
        TEST_IMAGES,
        boxes_above,
        build_model,
        build_transforms,
        detect,
        freeze_batch_norm,
        outline,
        test_patients,
        to_uint8,
    )


def build_trained_model(cfg: Config) -> torch.nn.Module:
    """The network of a checkpoint trained with `cfg`, for its weights: built as build_model built it, but never
    from the COCO weights, which the checkpoint's weights replace anyway, so that prediction works on a machine
    that never had them."""
    model = build_model(replace(cfg, pretrained="none", weights=None))
    if cfg.pretrained == "auto" and cfg.model == "fasterrcnn_resnet50_fpn":  # trained from COCO (fit saves "none"
        freeze_batch_norm(model.backbone.body)  # otherwise): v1 then froze its ResNet's batch norm
    return model


def predict_one(model, path: Path, trained: Config, min_score: float) -> tuple[np.ndarray, dict]:
    """(the radiograph's pixels as read, its boxes scoring at least `min_score` in those pixels, best first).

    Prepared as the training radiographs were: stretched to 0..255 and resized to the trained image_size (a
    non-square one squeezed, as the network only ever saw square ones); the boxes are mapped back with separate x
    and y scales, to the input's own width and height. Raises Unusable for a file that is no radiograph."""
    with warnings.catch_warnings():  # pydicom's warnings on a cut file: read_radiograph names it in one line
        warnings.filterwarnings("ignore", module="pydicom")
        pixels, _ = read_radiograph(path)
    height, width = pixels.shape
    size = trained.image_size
    scale = np.array([size / width, size / height, size / width, size / height])
    image = build_transforms(trained, train=False)(tv_tensors.Image(to_uint8(pixels, size)))
    return pixels, boxes_above(detect(model, [image], [scale], trained)[0], min_score)


def prediction_string(pred: dict) -> str:
    """Kaggle's PredictionString: "conf x y width height ..." (top-left corner and size, in the input's pixels)."""
    return " ".join(f"{score:.4f} {x1:.1f} {y1:.1f} {x2 - x1:.1f} {y2 - y1:.1f}"
                    for (x1, y1, x2, y2), score in zip(pred["boxes"], pred["scores"]))  # fmt: skip


def draw_boxes(pixels: np.ndarray, pred: dict, name: str, min_score: float) -> Figure:
    """The radiograph in its own pixels with its predicted boxes and their scores (red)."""
    height, width = pixels.shape
    fig = Figure(figsize=(5, 5 * height / width + 0.4), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(pixels, cmap="gray")
    outline(ax, pred["boxes"], "red", pred["scores"])
    n = len(pred["boxes"])
    ax.set_title(f"{name}: {n} box{'es' * (n != 1)} with score >= {min_score:.2f}", fontsize=8)
    ax.axis("off")
    return fig


def predict_files(model, paths: list[Path], trained: Config, min_score: float, out_dir: Path, skipped: Skipped):
    """({patientId (the file's name without extension): PredictionString}, the pictures written) for `paths`; a
    file that cannot be used, or a second one of the same name, is named, skipped and counted."""
    rows, pictures = {}, []
    for path in tqdm(paths, desc="predicting", leave=False, disable=None):
        name = mask_name(path, "")
        try:
            if name in rows:
                raise Unusable("same name", f"a file named {name} was predicted already: one row per patientId")
            pixels, pred = predict_one(model, path, trained, min_score)
        except Unusable as err:
            skipped.skip(path, err)
            continue
        rows[name] = prediction_string(pred)
        if trained.prediction_pictures is None or len(pictures) < trained.prediction_pictures:
            pictures.append(save_figure(draw_boxes(pixels, pred, name, min_score), out_dir / f"{name}_boxes.png"))
    if len(pictures) < len(rows):
        print(f"Pictures of the first {len(pictures)} of {len(rows)} radiographs only (prediction_pictures)")
    return rows, pictures


def predict(cfg: Config, inputs=None) -> list[Path]:
    """Boxes of lung opacity on the radiographs of `inputs` (a folder, a file, or a list of files; None: the
    challenge's stage_2_test_images/), with the weights of cfg.checkpoint (default: output_dir/best_model.pt), its
    image size and its score threshold: output_dir/predictions/predictions.csv (patientId,PredictionString) and
    <patientId>_boxes.png for the first cfg.prediction_pictures. Returns the files written (none when no input
    could be predicted); the inputs are only read. Process 0 only ([] in the others)."""
    if not distributed.is_main():
        return []
    model, trained, checkpoint = load_trained(cfg, build_trained_model, DEVICE)
    min_score = checkpoint["metrics"]["score_threshold"]  # chosen on validation for these weights (evaluate)
    listed = []  # the challenge's test patients: Kaggle takes a submission with a row for each
    if inputs is None:
        root, _ = find_dataset("rsna-pneumonia-detection-challenge", cfg.data_dir, say=False)  # as load_data does
        inputs, listed = root / TEST_IMAGES, test_patients(root)
    paths, skipped = expand_inputs(inputs), Skipped("file", print_limit=10)
    out_dir = make_folder(cfg.output_dir / "predictions")  # a file in its place: one Output problem line
    rows, pictures = predict_files(model, paths, trained, min_score, out_dir, skipped)
    predicted, missing = len(rows), [patient for patient in listed if patient not in rows]
    if missing:
        print(f"{len(missing)} patient{'s' * (len(missing) != 1)} of {SAMPLE_SUBMISSION} not predicted: listed "
              "with no box, as Kaggle takes a submission with a row for every test patient")  # fmt: skip
        rows |= dict.fromkeys(missing, "")
    table = pd.DataFrame(sorted(rows.items()), columns=["patientId", "PredictionString"])
    if predicted:
        save_atomically(out_dir / "predictions.csv", lambda path: table.to_csv(path, index=False))
    with_boxes = int((table["PredictionString"] != "").sum())
    done = f"Predicted {predicted} of {len(paths)} radiographs into {out_dir} ({with_boxes} with boxes of score >= "
    print(skipped.summary(done + f"{min_score:.2f}; predictions.csv, {len(pictures)} pictures)"))
    return [*pictures, out_dir / "predictions.csv"] if predicted else []


if __name__ == "__main__":
    predictions = predict(cfg, cfg.predict_inputs)
    if len(predictions) > 1:  # the first radiograph with its boxes; every box is in predictions.csv
        show(predictions[0])

# %% Summary
FROM_SCRATCH = "FROM SCRATCH: no COCO weights, scores not comparable with the leaderboard"  # whose entries started
# from ImageNet or COCO weights and trained for hours at 512 px or more (README: expectations)


def summarize(cfg: Config, data: Data, history: History, pictures: list[Path], per_case=None) -> str:
    """The closing lines: the data, the result (the test radiographs' RSNA metric with its interval, where this
    process scored them: process 0) and the best epoch's validation scores, which chose it, the outputs, and where
    training started (from COCO weights, or FROM SCRATCH, which no score of the leaderboard did)."""
    best = history.best()
    outputs = ["best_model.pt", "last_checkpoint.pt", "history.csv", "rsna_metric_per_epoch.png", "batch.png",
               "skipped.csv", "val_per_case.csv", "test_per_case.csv", "val_predictions.png",
               "predictions/ (predictions.csv, pictures)"]  # fmt: skip
    scores = (f"validation RSNA metric {best['val_rsna']:.4f} at score >= {best['score_threshold']:.2f} (predicting "
              f"nothing: {best['val_rsna_predict_nothing']:.4f}; mAP {best['val_map']:.4f}, mAP@.5 "
              f"{best['val_map50']:.4f}; it chose the epoch and the threshold)")  # fmt: skip
    if per_case is not None and per_case.attrs.get("scored") == "test":
        scores = f"test {held_out_scores(per_case)}; " + scores
    elif per_case is not None:
        scores += "; no test set (test_fraction 0): this score chose the model and is optimistic"
    start = coco_weights(cfg)
    return "\n".join([run_summary(cfg, data, history, scores, outputs, pictures),
                      f"  start:   the COCO weights in {start}" if start is not None else FROM_SCRATCH])  # fmt: skip


if __name__ == "__main__":
    pictures = readme_pictures(cfg, data, {"val_predictions.png": "pneumonia_detection_predictions.png"})
    print(summarize(cfg, data, history, pictures, per_case))
