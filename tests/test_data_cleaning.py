"""data_cleaning.py: the Kaggle run-length encoding, checked on hand-computed masks and by round trip."""

import numpy as np
import pytest

from data_cleaning import rle_decode, rle_encode


def test_rle_is_one_indexed_and_column_major():
    # 3 rows x 4 columns; pixels are numbered down each column first: column 0 holds 1, 2, 3.
    mask = np.array(
        [
            [0, 1, 0, 0],
            [1, 1, 0, 1],
            [1, 0, 0, 1],
        ]
    )
    # Column-major order: 0 1 1 | 1 1 0 | 0 0 0 | 0 1 1 -> runs start at pixel 2 (length 4) and 11 (length 2).
    assert rle_encode(mask) == "2 4 11 2"
    np.testing.assert_array_equal(rle_decode("2 4 11 2", (3, 4)), mask)


def test_empty_and_full_masks():
    assert rle_encode(np.zeros((4, 5))) == ""
    assert rle_encode(np.ones((4, 5))) == "1 20"
    assert rle_decode("", (4, 5)).sum() == 0
    assert rle_decode(float("nan"), (4, 5)).sum() == 0  # how pandas reads an empty cell


def test_mask_values_255_count_as_foreground():
    assert rle_encode(np.array([[0, 255], [255, 0]], dtype=np.uint8)) == "2 2"


@pytest.mark.parametrize("seed", range(5))
def test_round_trip_on_random_masks(seed):
    mask = (np.random.default_rng(seed).random((42, 58)) > 0.5).astype(np.uint8)
    decoded = rle_decode(rle_encode(mask), mask.shape)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, mask)


def test_bad_encodings_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="odd number"):
        rle_decode("1 2 3", (4, 4))
    with pytest.raises(ValueError, match="outside an image of 4x4"):
        rle_decode("15 3", (4, 4))
