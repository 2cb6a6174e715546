"""Turn the datasets as downloaded into what the pipeline scripts read. Downloads are never modified.

Each dataset gets its own section as its pipeline lands; a step runs from its script automatically
when the prepared output is missing, and can also be run by hand.
"""

from __future__ import annotations

import numpy as np

# %% Ultrasound nerve segmentation (Kaggle): run-length encoding of masks


def rle_encode(mask: np.ndarray) -> str:
    """Kaggle run-length encoding of a binary mask: "start length start length ...", '' when empty.

    Pixels are numbered from 1, top to bottom then left to right (column-major), as `train_masks.csv`
    and the submission format of the Ultrasound Nerve Segmentation challenge expect.
    """
    pixels = np.asarray(mask).astype(bool).flatten(order="F")
    # Pad with a background pixel on each side so every run has a rising and a falling edge.
    edges = np.flatnonzero(np.diff(np.concatenate([[False], pixels, [False]]).astype(np.int8)))
    starts, ends = (
        edges[0::2],
        edges[1::2],
    )  # 0-based start of each run and one past its end
    return " ".join(f"{s + 1} {e - s}" for s, e in zip(starts, ends))


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """The binary (uint8 0/1) mask of `shape` (height, width) that `rle_encode` turned into `rle`."""
    flat = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    numbers = [int(n) for n in str(rle).split()] if isinstance(rle, str) else []  # NaN (pandas) = empty
    if len(numbers) % 2:
        raise ValueError(f"Run-length encoding has an odd number of values: {rle[:60]!r}")
    for start, length in zip(numbers[0::2], numbers[1::2]):
        if start < 1 or start - 1 + length > flat.size:
            raise ValueError(f"Run {start} {length} falls outside an image of {shape[0]}x{shape[1]} pixels")
        flat[start - 1 : start - 1 + length] = 1
    return flat.reshape(shape, order="F")
