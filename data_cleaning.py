"""Turn the datasets as downloaded into what the pipeline scripts read. Downloads are never modified.

Each dataset gets its own section as its pipeline lands; a step runs from its script automatically
when the prepared output is missing, and can also be run by hand.
"""

from __future__ import annotations

import errno
import functools
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import stat
import sys
import time
import zlib
from collections import Counter
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import torch
from PIL import Image
from pydicom.pixels import get_decoder
from tqdm import tqdm

from checkpoints import CheckpointError, OutputError, make_folder, save_atomically
from distributed import usable_cores


class DatasetError(FileNotFoundError):
    """A data folder that does not hold what README.md describes; the message says what was expected where.

    From the command line it ends the run in one line, `Data problem: <message>` (`one_line_data_problems`).
    """


def one_line_data_problems() -> None:
    """From the command line, a DatasetError ends the run with one line, `Data problem: <message>`, and exit status
    1, instead of a traceback through the script's cells: the message already says what was expected where (a
    CheckpointError likewise, `Checkpoint problem: <message>`, and an OutputError, `Output problem: <message>`: a full
    disk, a file where output_dir should be). Other errors keep their traceback. In a notebook
    IPython shows errors its own way (it does not use sys.excepthook)."""
    previous = sys.excepthook

    def excepthook(kind, value, trace):
        if issubclass(kind, DatasetError):
            sys.stderr.write(f"Data problem: {value}\n")
        elif issubclass(kind, CheckpointError):
            sys.stderr.write(f"Checkpoint problem: {value}\n")
        elif issubclass(kind, OutputError):
            sys.stderr.write(f"Output problem: {value}\n")
        else:
            previous(kind, value, trace)

    sys.excepthook = excepthook


@dataclass(repr=False)
class Data:
    """What a script's Data stage found: the dataset folder it read, whether that is the synthetic sample, the
    cases of each split (one dict each: paths, and for the 2D scripts the decoded pixels), and what was skipped.
    Shown as one line (`data` in a notebook, `print(data)`): the cases themselves are in `train`, `val`, `test`."""

    root: Path  # the dataset folder read: data/<name>, or data/sample/<name>
    synthetic: bool  # True for the synthetic stand-in: its scores say the pipeline runs, nothing about the task
    train: list
    val: list  # chooses the best epoch (and any threshold)
    test: list = field(default_factory=list)  # held out until the end, where a script has them
    unit: str = "cases"  # what a case is, in the counts: "films", "frames", "radiographs", "cases"
    skipped: Skipped | None = None  # the inputs named, skipped and counted while reading

    def __str__(self) -> str:
        counts = f"{len(self.train)} train, {len(self.val)} validation"
        counts += f", {len(self.test)} test" if self.test else ""
        left_out = ""
        if self.skipped is not None:
            n = self.skipped.counts.total()
            left_out = f"; {n} {self.skipped.noun}{'' if n == 1 else 's'} skipped"
        source = "SYNTHETIC sample" if self.synthetic else "real dataset"
        return f"{source} {self.root}: {counts} {self.unit}{left_out}"

    def __repr__(self) -> str:
        return f"Data({self})"


def split_groups(groups, val_fraction: float, test_fraction: float, seed: int) -> tuple[set, set, set]:
    """(train, validation, test) sets of the distinct `groups` (patients: never an image or a slice), drawn by a
    seeded shuffle. Both fractions are of all groups; each side that asks for some gets at least one group, and
    training keeps at least one. The test groups are drawn first, so they depend only on the groups, the seed and
    test_fraction: a new val_fraction (or a new training seed, where a script keeps them apart) keeps the test set.

    The test set is scored once, at the end, by the network validation chose: it alone says how the model does on
    patients it has never seen. Validation chose the epoch (and any threshold), so its score is optimistic."""
    names = sorted(set(groups), key=str)
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]

    def share(fraction: float, available: int) -> int:
        return 0 if fraction <= 0 else min(max(round(fraction * len(names)), 1), available - 1)

    n_test = share(test_fraction, len(names))
    n_val = share(val_fraction, len(names) - n_test)
    if len(names) - n_test - n_val < 1 or (val_fraction > 0 and n_val < 1) or (test_fraction > 0 and n_test < 1):
        raise DatasetError(
            f"{len(names)} patient(s) cannot be split into training, validation "
            f"(val_fraction {val_fraction}) and test (test_fraction {test_fraction}): "
            f"need {1 + (val_fraction > 0) + (test_fraction > 0)} at least"
        )
    return set(order[n_test + n_val :]), set(order[n_test : n_test + n_val]), set(order[:n_test])


def read_table(path: Path, columns: dict[str, str], what: str = "") -> pd.DataFrame:
    """A label CSV, checked: the `columns` it must have ({name: "str" | "int" | "float" | "number"}; "number" allows
    blanks, as RSNA's x/y/width/height for patients without a box), names stripped of spaces, each numeric column
    parsed. Anything else is one DatasetError naming the file, the column and the first bad row (as a spreadsheet
    numbers it: the header is row 1), never a KeyError or ValueError from pandas. `what` says what the file is."""
    about = f"{path}{f' ({what})' if what else ''}"
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except FileNotFoundError:
        raise DatasetError(f"{about} not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DatasetError(f"{about} is not a readable CSV: {str(err).splitlines()[0]}") from None
    table.columns = [str(name).strip() for name in table.columns]
    missing = [name for name in columns if name not in table.columns]
    if missing:
        raise DatasetError(f"{about} has no column {', '.join(missing)} (it has: {', '.join(table.columns) or 'none'})")
    for name, kind in columns.items():
        text = table[name].str.strip()
        if kind == "str":
            table[name] = text
            continue
        values = pd.to_numeric(text.where(text != ""), errors="coerce")
        bad = values.isna() & ((text != "") | (kind != "number"))  # unparsable, or blank where a value is needed
        if kind == "int":
            bad |= values.notna() & (values != values.round())
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            whole = " (a whole one)" if kind == "int" else ""
            raise DatasetError(f"{about}: column {name}, row {row + 2}: {text.iloc[row]!r} is not a number{whole}; "
                               f"{int(bad.sum())} such row(s)")  # fmt: skip
        table[name] = values.astype("int64") if kind == "int" else values
    return table


# %% Bad inputs: named, skipped and counted
# A real download always holds a few bad items (a truncated file, a mask without its image, a series with a missing
# slice). One of them must cost that item, not the run, and never go unnoticed: each is named on one line when it
# is found, skipped, and counted in a summary line. All five scripts report them in the same words.


class Unusable(Exception):
    """An input that cannot be used: `problem` is the short kind it is counted under ("truncated", "no mask"),
    `detail` what exactly is wrong with this one (naming the file at fault where the item is not a file).

    Raised by a reader deep down, where the problem is found, and caught by the loop over the inputs, which hands
    it to `Skipped.skip`: the reader need not know what is done with a bad input, and no library traceback escapes.
    """

    def __init__(self, problem: str, detail: str = ""):
        super().__init__(f"{problem}: {detail}" if detail else problem)
        self.problem, self.detail = problem, detail


class Skipped:
    """Bad inputs of one pass over a dataset: each is named on one line when found, skipped, and counted.

    `noun` says what an input is ("file", "patient", "case"): `Skipped patient <id>: <problem>: <detail>`. A file
    is named by its path alone (`Skipped <path>: <problem> (<detail>)`): the path already says what it is, and the
    detail, often a reader's own message with colons of its own, stands apart in parentheses. `counts` holds the
    number skipped per problem, `rows` every skip in order as {noun: name, "problem", "detail"} for a CSV, where
    "detail" is the message as printed after the name, so that a row reads on its own like the printed line.
    `print_limit`: print only the first so many of each problem (10; None: all); all are still counted and kept in
    `rows` (`save` writes them as a CSV). Where one reason skips most of a download (pleural_effusion_3d.py: most
    NSCLC-Radiomics patients have no PleThora mask), hundreds of identical lines would hide the few that need a look.
    """

    def __init__(self, noun: str, print_limit: int | None = 10) -> None:
        self.noun = noun
        self.print_limit = print_limit
        self.counts: Counter[str] = Counter()
        self.rows: list[dict] = []

    def skip(self, name, err_or_problem: Unusable | str, detail: str = "") -> None:
        """Count `name` (a path for files, else an id) as skipped for `err_or_problem` and print it (up to the limit).

        Either the Unusable a reader raised, or its problem and detail given directly where the loop itself finds
        the problem (a mask without its image needs no reader to fail).
        """
        if isinstance(err_or_problem, Unusable):
            problem, detail = err_or_problem.problem, err_or_problem.detail
        else:
            problem = err_or_problem
        if self.noun == "file":
            label, message = str(name), f"{problem} ({detail})" if detail else problem
        else:
            label, message = f"{self.noun} {name}", f"{problem}: {detail}" if detail else problem
        self.counts[problem] += 1
        self.rows.append({self.noun: str(name), "problem": problem, "detail": message})
        if self.print_limit is None or self.counts[problem] <= self.print_limit:
            print(f"Skipped {label}: {message}")
        elif self.counts[problem] == self.print_limit + 1:  # said once, so that the silence after it is not a surprise
            print(f"Skipped {label}: {problem} (further {self.noun}s skipped for this reason are not printed)")

    def save(self, path: Path) -> Path:
        """Every skip as a CSV (noun, problem, detail), atomically: the full list behind the capped lines."""
        table = pd.DataFrame(self.rows, columns=[self.noun, "problem", "detail"])
        save_atomically(path, lambda partial: table.to_csv(partial, index=False))
        return path

    def summary(self, what: str) -> str:
        """One line for the end of the pass: `<what>: skipped N <noun>s (<n1> <problem1>, ...)`, most frequent first
        ("1 <noun>" for one)."""
        if not self.counts:
            return f"{what}: no {self.noun} skipped"
        kinds = ", ".join(f"{n} {problem}" for problem, n in self.counts.most_common())
        total = self.counts.total()
        return f"{what}: skipped {total} {self.noun}{'' if total == 1 else 's'} ({kinds})"


# %% Preprocessed once: the disk cache (data/cache/<script>/)
# Decoding and resizing a real dataset takes minutes (26,684 DICOMs; 78 JPEG-2000 series) and gives the same arrays
# every run. As nnU-Net does, each source file is prepared once and its arrays kept on disk: one entry per source,
# named by a hash of the preparation settings and the source's path, size and modification time, so a changed
# setting or a touched file rebuilds exactly its own entries and nothing else. An entry is one file of arrays, read
# back memory-mapped: under torchrun the processes of one machine share the pages of one copy. Entries are
# written atomically (a killed run leaves none half-written); one that cannot be read is rebuilt, with one line.


@functools.lru_cache(maxsize=4096)
def _real_folder(folder: str) -> str:
    return os.path.realpath(folder)  # one lstat per part of the path: paid once per folder, not once per file


def source_stamp(sources) -> list:
    """(path, size, modification time) of each source file, or of each file in a source folder (a DICOM series)."""
    stamp = []
    for source in sources:
        status = os.stat(source)
        if stat.S_ISDIR(status.st_mode):
            files = [(f, f.stat()) for f in sorted(p for p in Path(source).rglob("*") if p.is_file())]
        else:
            files = [(Path(os.path.abspath(source)), status)]
        stamp += [(os.path.join(_real_folder(str(f.parent)), f.name), s.st_size, s.st_mtime_ns) for f, s in files]
    return stamp


class DiskCache:
    """Prepared arrays of each source, on disk under `folder`: `get(sources)` gives {name: array} or None (not built,
    or damaged: then rebuilt), `put(sources, arrays)` writes them. `settings` holds everything the preparation
    depends on (sizes, windows, the script's preparation version): entries of other settings are never read.
    `names` are the arrays every entry holds. `built` and `read` count entries.

    An entry is one file, `<folder>/<hash>.arrays`: an 8-byte length, a JSON index (each array's name, dtype, shape
    and offset), then each array's bytes, starting at a multiple of 64 bytes as in NumPy's .npy. One file, not one
    per array: creating a file is what writing a small entry costs most (0.4 ms here, against 0.02 ms to write
    60 KB into it), and a kill cannot fall between the arrays of an entry. JSON, not .npy headers: NumPy parses
    each .npy header as Python source, which was most of the time a warm start took to read small entries. An
    array of MMAP_BYTES or more is memory-mapped, copy-on-write (one mapping per entry, no file left open): its pages
    are read from disk when first used and shared with every process of the machine that maps the same file
    (torchrun's), until one writes to them (then that process gets its own copy of the page; the file never
    changes). Smaller ones are read into memory: a mapping each would exhaust the system's limit on mappings (65,530
    by default) long before memory. An entry that cannot be opened for want of file handles or memory is kept (the
    error is raised): only an entry that is itself unreadable is deleted and rebuilt."""

    MMAP_BYTES = 1 << 16
    FORMAT = 3  # in the key: entries of an earlier layout (2: .npy records in 256 subfolders) are never read

    def __init__(self, folder: Path, settings: dict, names: tuple[str, ...]):
        self.folder, self.names = Path(folder), names
        self.settings = json.dumps({**settings, "cache format": self.FORMAT}, sort_keys=True, default=str)
        self.built = self.read = 0

    def entry(self, sources) -> Path:
        digest = hashlib.sha1(json.dumps([self.settings, source_stamp(sources)]).encode()).hexdigest()
        return self.folder / f"{digest}.arrays"

    def get(self, sources, entry: Path | None = None, count: bool = True) -> dict[str, np.ndarray] | None:
        """The entry of `sources` (at `entry`, where the caller has it already), or None."""
        entry = entry or self.entry(sources)
        try:
            arrays = self._read(entry)
        except FileNotFoundError:
            return None  # never built
        except OSError as err:
            if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):  # the machine's limit, not the entry's fault
                raise OSError(err.errno, f"{err.strerror} while reading the cache entry {entry}: it is kept") from err
            return self._damaged(sources, entry, err)
        except (ValueError, TypeError, KeyError) as err:  # damaged: its index or arrays unreadable
            return self._damaged(sources, entry, err)
        self.read += count
        return arrays

    def _damaged(self, sources, entry: Path, err: BaseException) -> None:
        print(f"Cache entry {entry} of {', '.join(map(str, sources))} cannot be read ({err}): rebuilding it")
        entry.unlink(missing_ok=True)

    def put(self, sources, arrays: dict[str, np.ndarray], entry: Path | None = None) -> dict[str, np.ndarray]:
        entry = entry or self.entry(sources)
        arrays = {name: np.asarray(arrays[name], order="C") for name in self.names}  # written as is
        save_atomically(entry, lambda partial: self._write(partial, arrays))
        self.built += 1
        if all(array.nbytes < self.MMAP_BYTES for array in arrays.values()):
            return arrays  # what reading it back would give: the same values, in memory
        # Read back as the next run will (the large arrays memory-mapped): the prepared copies are then freed, and a
        # cold run holds no more memory than a warm one
        return self.get(sources, entry, count=False) or arrays

    def _write(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        index, offset = [], 0
        for name, array in arrays.items():
            if array.dtype.hasobject or array.dtype.fields:
                raise ValueError(f"{name}: a {array.dtype} array cannot be cached (plain numbers only)")
            index.append({"name": name, "dtype": array.dtype.str, "shape": array.shape, "offset": offset})
            offset += -(-array.nbytes // 64) * 64
        header = json.dumps(index).encode()
        start = -(-(8 + len(header)) // 64) * 64  # the arrays' bytes begin here, aligned
        with path.open("wb") as file:
            file.write(len(header).to_bytes(8, "little") + header + bytes(start - 8 - len(header)))
            for item, array in zip(index, arrays.values()):
                file.seek(start + item["offset"])
                file.write(array.data)

    def _read(self, path: Path) -> dict[str, np.ndarray]:
        arrays, mapped = {}, None
        with path.open("rb") as file:
            length = int.from_bytes(file.read(8), "little")
            index = json.loads(file.read(min(length, 1 << 20)))  # a damaged length: too short to parse, ValueError
            start, size = -(-(8 + length) // 64) * 64, os.fstat(file.fileno()).st_size
            if [item["name"] for item in index] != list(self.names):
                raise ValueError(f"holds {[item['name'] for item in index]}, not {list(self.names)}")
            for item in index:
                dtype, shape, offset = np.dtype(item["dtype"]), tuple(item["shape"]), start + item["offset"]
                nbytes = math.prod(shape) * dtype.itemsize
                if offset + nbytes > size:
                    raise ValueError(f"{item['name']} is cut short")
                if nbytes >= self.MMAP_BYTES:
                    mapped = self._map(path, size) if mapped is None else mapped
                    arrays[item["name"]] = mapped[offset : offset + nbytes].view(dtype).reshape(shape)
                else:
                    file.seek(offset)
                    data = bytearray(nbytes)  # writable, as a copy-on-write mapping is
                    file.readinto(data)
                    arrays[item["name"]] = np.frombuffer(data, dtype).reshape(shape)
        return arrays

    @staticmethod
    def _map(path: Path, size: int) -> np.ndarray:
        """The whole entry file, memory-mapped copy-on-write, as uint8. torch's mapping, not NumPy's np.memmap:
        NumPy's keeps a file descriptor open per mapping, and a process may have 1,024 open at once on many Linux
        systems (with RSNA's 26,684 entries, every one past the limit was taken for damaged); torch closes the file.
        Where the system refuses the mapping (its limit on mappings, a platform without private file mappings), the
        file is read into memory instead: the same values, not shared between processes."""
        try:
            return torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8).numpy()
        except RuntimeError:
            return np.fromfile(path, np.uint8, size)


def prepare_cached(items: list, sources_of, prepare, cache: DiskCache | None, skipped: Skipped,
                   desc: str = "preparing", workers: int | None = None, name_of=None) -> list:  # fmt: skip
    """[(item, arrays)] for every usable item, in order: arrays from `cache` where built, else `prepare(item)`
    (a module-level function returning {name: array}, raising Unusable for a bad input), run in parallel on every
    core this process may use (`workers`) and written to the cache (cache=None: none read or written). Items that
    raise Unusable are skipped (and tried again next run: a repaired file is then taken). `sources_of(item)` lists
    the files its arrays come from.
    `prepare` decodes with NumPy, Pillow, pydicom, nibabel: not torch, whose threads do not survive a fork. Under
    torchrun, call it inside distributed.main_first(): process 0 builds, the others then read its entries.
    `name_of(item)` names a skipped item (default: its first source)."""
    # Each entry is named from its sources' size and time before they are read: a file changed while it is being
    # prepared is then prepared again next run
    entries = [cache.entry(sources_of(item)) if cache else None for item in items]
    found = [cache.get(sources_of(item), entry) if cache else None for item, entry in zip(items, entries)]
    missing = [i for i, arrays in enumerate(found) if arrays is None]
    if workers is None:
        workers = usable_cores()
    with parallel_map(prepare, [items[i] for i in missing], workers) as results:
        for i, result in zip(missing, tqdm(results, total=len(missing), desc=desc, leave=False, disable=None)):
            if isinstance(result, Unusable):
                skipped.skip(name_of(items[i]) if name_of else sources_of(items[i])[0], result)
            else:
                found[i] = cache.put(sources_of(items[i]), result, entries[i]) if cache else result
    return [(item, arrays) for item, arrays in zip(items, found) if arrays is not None]


def _unusable_as_result(prepare, item):
    try:
        return prepare(item)
    except Unusable as err:  # returned, not raised: the other items of the pool go on
        return err


@contextmanager
def parallel_map(function, items: list, workers: int):
    """function(item) for each item, in order, as an iterator: in `workers` forked processes where there are
    several items and cores (Linux, macOS with fork), else in this one. An Unusable is returned as the result."""
    import concurrent.futures
    import multiprocessing

    call = functools.partial(_unusable_as_result, function)
    if workers < 2 or len(items) < 2 or "fork" not in multiprocessing.get_all_start_methods():
        yield map(call, items)
        return
    context = multiprocessing.get_context("fork")  # the children have the script's functions without importing it
    with concurrent.futures.ProcessPoolExecutor(min(workers, len(items)), mp_context=context) as pool:
        yield pool.map(call, items, chunksize=max(1, len(items) // (8 * workers)))


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


# Near-duplicate frames with contradictory labels. Each subject's frames come from one ultrasound video, so
# many are near copies of each other; in a few pairs one copy has the nerve outlined and the other an empty
# mask. Such a pair teaches the model both answers for one image. The pipeline finds these pairs on small
# standardised thumbnails, reports them, and by default leaves the empty-labelled frame out of training.


def frame_signature(pixels: np.ndarray, size: int = 32) -> np.ndarray:
    """A frame shrunk to `size` x `size` by area averaging, then standardised: float32 (size * size,).

    Averaging blocks of about 13 x 18 pixels (580x420 -> 32x32) smooths the speckle, which differs between
    any two frames, and keeps the anatomy; standardising removes the gain, which the operator changes.
    """
    small = Image.fromarray(np.asarray(pixels, dtype=np.float32)).resize((size, size), Image.Resampling.BOX)
    values = np.asarray(small, dtype=np.float32).ravel()
    return (values - values.mean()) / max(float(values.std()), 1e-6)


def find_near_duplicates(signatures: np.ndarray, groups, max_distance: float) -> list[tuple[int, int, float]]:
    """Pairs (i, j, distance), i < j, of rows of `signatures` in the same group whose distance is <= max_distance.

    The distance is the root-mean-square difference of two signatures: 0 for a copy, about 1.4 for unrelated
    frames (for standardised signatures it is sqrt(2 (1 - correlation))). Only frames of one group (subject)
    are compared: two subjects never share a frame, and this keeps the work linear in the number of subjects.
    """
    signatures, groups = np.asarray(signatures, dtype=np.float64), np.asarray(groups)
    pairs = []
    for group in np.unique(groups):
        index = np.flatnonzero(groups == group)
        s = signatures[index]
        squared = (s**2).sum(axis=1)
        distance = np.sqrt(np.clip(squared[:, None] + squared[None, :] - 2 * s @ s.T, 0, None) / s.shape[1])
        for a, b in zip(*np.nonzero(np.triu(distance <= max_distance, k=1))):
            pairs.append((int(index[a]), int(index[b]), float(distance[a, b])))
    return sorted(pairs)


def find_contradictory_pairs(frames: pd.DataFrame, signatures: np.ndarray, max_distance: float) -> pd.DataFrame:
    """Near-duplicate frames of one subject of which one mask is empty and the other is not.

    `frames` has one row per frame (`subject`, `img`, `has_nerve`), in the order of `signatures` (one
    `frame_signature` each). Returns one row per pair: subject, img_with_nerve, img_empty, distance.
    """
    has_nerve = frames["has_nerve"].to_numpy(bool)
    rows = []
    for i, j, distance in find_near_duplicates(signatures, frames["subject"].to_numpy(), max_distance):
        if has_nerve[i] != has_nerve[j]:
            nerve, empty = (i, j) if has_nerve[i] else (j, i)
            rows.append((frames["subject"].iat[i], frames["img"].iat[nerve], frames["img"].iat[empty], distance))
    return pd.DataFrame(rows, columns=["subject", "img_with_nerve", "img_empty", "distance"])


# %% Montgomery County chest X-rays (NLM): lung masks, 512x512, seeded train/test split

LUNG_MASK_FOLDERS = ("ManualMask/leftMask", "ManualMask/rightMask")  # the patient's left and right lung
SHENZHEN_IMAGE_FOLDER = "CXR_png"  # ChinaSet_AllFiles/CXR_png/CHNCXR_0001_0.png; masks <name>_mask.png anywhere below
PREPARED_MANIFEST = "prepared.json"  # written last: a prepared folder without it is not complete
PREPARED_CASES = "cases.csv"
UNREADABLE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)  # what Pillow raises on bad files


def read_gray(path: Path) -> np.ndarray:
    """The pixels of a grayscale PNG as stored (8-bit, 16-bit, palette or RGB), float32 (H, W).

    Raises Unusable naming the file when it cannot be decoded (truncated, not an image): Pillow opens
    lazily and only fails at `load()`, with a message that does not say which file it was reading.
    """
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "I", "I;16", "I;16B", "I;16L", "F"):
                img = img.convert("L")  # RGB, palette, 1-bit: the gray value (masks: anything > 0 counts)
            return np.asarray(img, dtype=np.float32)
    except UNREADABLE_ERRORS as error:
        raise Unusable("unreadable PNG", f"{path} is not a readable PNG ({error})") from error


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """Map an X-ray to 0..1: its 0.5 and 99.5 percentiles go to 0 and 1, values beyond are clipped.

    Per image, not by bit depth: Montgomery stores 12-bit values in 16-bit PNGs (max 4095, not 65535),
    Shenzhen 8-bit, and exposure differs from film to film. A percentile window gives every image the same
    contrast range whatever its bit depth (an 8-bit image and the same image x257 or x16 map to the same
    result), and a burned-in marker or a few hot pixels cannot squeeze the anatomy into a sliver, as
    dividing by the image's maximum would.
    """
    low, high = np.percentile(pixels, [0.5, 99.5])
    return np.clip((pixels - low) / max(high - low, 1e-6), 0, 1).astype(np.float32)


def binary_mask(pixels: np.ndarray) -> np.ndarray:
    """A mask as stored, binarised at half its range: NLM's 0/255 masks at 127.5, 16-bit ones at 32767.5, 0/1 ones
    at 0.5. Not `> 0`: a mask saved as JPEG or resized carries faint values along its outline and in the background,
    which `> 0` would all turn into lung."""
    top = pixels.max(initial=0)
    full = 1.0 if top <= 1 else 255.0 if top <= 255 else 65535.0
    return pixels > full / 2


def read_lung_mask(paths: list[Path], shape: tuple[int, int]) -> np.ndarray:
    """The union of the masks in `paths` (left and right lung, or Shenzhen's single mask) as bool `shape`.

    Raises Unusable naming the file when one is unreadable or not of `shape` (the image's (height, width)).
    """
    union = np.zeros(shape, dtype=bool)
    for path in paths:
        mask = binary_mask(read_gray(path))
        if mask.shape != union.shape:
            raise Unusable(
                "mask of another size",
                f"{path} is {mask.shape[1]}x{mask.shape[0]} pixels, its image {shape[1]}x{shape[0]}",
            )
        union |= mask
    return union


def find_lung_cases(montgomery_dir: Path, shenzhen_dir: Path | None, skipped: Skipped) -> list[dict]:
    """Pair every image with its masks by file name.

    A case is {"name", "source", "image", "masks"}. Unpaired files are named, skipped and counted in `skipped`,
    never silently dropped: an image without (one of) its masks, and masks without an image.
    """
    cases = []
    images = {p.name: p for p in sorted((montgomery_dir / "CXR_png").glob("*.png"))}
    masks = [{p.name: p for p in sorted((montgomery_dir / folder).glob("*.png"))} for folder in LUNG_MASK_FOLDERS]
    for name, image in images.items():
        missing = [f"{folder}/{name}" for folder, found in zip(LUNG_MASK_FOLDERS, masks) if name not in found]
        if missing:
            skipped.skip(Path(name).stem, "image without mask", f"CXR_png/{name} has no {' or '.join(missing)}")
        else:
            cases.append(
                {
                    "name": Path(name).stem,
                    "source": "Montgomery",
                    "image": image,
                    "masks": [found[name] for found in masks],
                }
            )
    for name in sorted(set().union(*masks) - set(images)):
        where = " and ".join(f"{folder}/{name}" for folder, found in zip(LUNG_MASK_FOLDERS, masks) if name in found)
        skipped.skip(Path(name).stem, "mask without image", f"{where} has no image CXR_png/{name}")
    if shenzhen_dir is not None:
        images = {p.stem: p for p in sorted((shenzhen_dir / SHENZHEN_IMAGE_FOLDER).glob("*.png"))}
        masks = {p.stem.removesuffix("_mask"): p for p in sorted(shenzhen_dir.rglob("*_mask.png"))}
        for stem, image in images.items():
            if stem in masks:
                cases.append({"name": stem, "source": "Shenzhen", "image": image, "masks": [masks[stem]]})
            else:
                skipped.skip(stem, "image without mask", f"{image.relative_to(shenzhen_dir)} has no {stem}_mask.png")
        for stem in sorted(set(masks) - set(images)):
            skipped.skip(stem, "mask without image", f"{masks[stem].relative_to(shenzhen_dir)} has no image {stem}.png")
    return cases


def _prepare_case(case: dict, size: int) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(uint16 image, uint8 0/255 mask), both size x size, and the original (height, width); Unusable if bad."""
    pixels = read_gray(case["image"])
    mask = read_lung_mask(case["masks"], pixels.shape)
    # Images: Lanczos, an antialiasing filter (a 4020x4892 film shrinks ~9x; plain sampling would alias the ribs).
    small = Image.fromarray(pixels, mode="F").resize((size, size), Image.Resampling.LANCZOS)
    image = np.round(to_unit_range(np.asarray(small)) * 65535).astype(np.uint16)  # 16 bits: no precision lost
    # Masks: nearest neighbour, so they stay strictly 0/255 (a bilinear resize invents in-between values).
    mask = Image.fromarray(mask.astype(np.uint8) * np.uint8(255)).resize((size, size), Image.Resampling.NEAREST)
    return image, np.asarray(mask), pixels.shape


def _prepare_lung_job(job: tuple[dict, int]) -> dict[str, np.ndarray]:
    """`_prepare_case` as the disk cache keeps it: (case, size) -> {"image", "mask", "shape"}. NumPy and Pillow
    only: it runs in forked workers."""
    image, mask, shape = _prepare_case(*job)
    return {"image": image, "mask": mask, "shape": np.array(shape, dtype=np.int64)}


LUNG_PREPARATION = {"image": "Lanczos, 16-bit percentiles", "mask": "union, nearest", "version": 1}


def prepare_lung_segmentation(
    montgomery_dir: Path,
    out_dir: Path | None = None,
    size: int = 512,
    test_fraction: float = 0.25,
    seed: int = 0,
    shenzhen_dir: Path | None = None,
    cache_dir: Path | None = None,
) -> Path:
    """Write the lung segmentation cases to `out_dir/{train,test}/{image,mask}/<name>.png`; return `out_dir`.

    As the original preparation: the union of the left and right lung masks, images and masks resized to
    `size` x `size` (images with an antialiasing filter, masks nearest-neighbour), paired by file name, a
    seeded split by file name (one film per patient in both sets, so by patient). `out_dir` defaults to
    `segmentation/` beside the download, which is only read. Also written: `cases.csv` (each case's split,
    original size and source files, relative to the parent of `out_dir`) and, last, `prepared.json`.

    Idempotent: a complete folder prepared with the same settings is reused as it is. Bad cases (an image
    without a mask, a mask without an image, an unreadable PNG, a mask of another size) are named, skipped
    and counted; with no usable case left, a FileNotFoundError says what was expected where. The films are decoded
    on every core; with `cache_dir`, also kept there (`_write_prepared_cases`): one film changed, one decoded.
    """
    montgomery_dir = Path(montgomery_dir).resolve()
    out_dir = (montgomery_dir.parent / "segmentation" if out_dir is None else Path(out_dir)).resolve()
    if out_dir.is_relative_to(montgomery_dir):
        raise ValueError(f"{out_dir} is inside the download {montgomery_dir}, which is never modified")
    settings = {"version": 1, "source": montgomery_dir.name, "size": size, "test_fraction": test_fraction, "seed": seed,
                "shenzhen": None if shenzhen_dir is None else Path(shenzhen_dir).name,
                # every source file's path, size and modification time: a film added, removed, replaced or restored
                # after a failed read makes the preparation run again
                "download": download_stamp(montgomery_dir, shenzhen_dir)}  # fmt: skip
    if _prepared_with(out_dir, settings):
        return out_dir
    if shenzhen_dir is not None and not (Path(shenzhen_dir) / SHENZHEN_IMAGE_FOLDER).is_dir():
        raise DatasetError(f"Shenzhen set asked for, but {Path(shenzhen_dir) / SHENZHEN_IMAGE_FOLDER} is missing")

    skipped = Skipped("case")
    cases = find_lung_cases(montgomery_dir, None if shenzhen_dir is None else Path(shenzhen_dir), skipped)
    partial = out_dir.with_name(f".{out_dir.name}.partial")  # renamed into place at the end: never half-written
    shutil.rmtree(partial, ignore_errors=True)
    rows = _write_prepared_cases(cases, size, partial, out_dir.parent, skipped, cache_dir)
    if not rows:
        shutil.rmtree(partial)
        raise DatasetError(
            f"No usable image/mask pair in {montgomery_dir} ({skipped.counts.total()} skipped): expected "
            f"CXR_png/<name>.png with {LUNG_MASK_FOLDERS[0]}/<name>.png and {LUNG_MASK_FOLDERS[1]}/<name>.png"
        )
    counts = _split_prepared_cases(rows, partial, test_fraction, seed)
    manifest = {**settings, **counts, "skipped": dict(skipped.counts)}  # problem: number of cases
    skipped.save(partial / "skipped.csv")  # each case skipped, as named when it was prepared
    (partial / PREPARED_MANIFEST).write_text(json.dumps(manifest, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)  # only ever a folder with our manifest (checked by _prepared_with)
    os.replace(partial, out_dir)
    print(skipped.summary(f"Prepared {len(rows)} cases in {out_dir} ({counts['train']} train, {counts['test']} test)"))
    return out_dir


def download_stamp(montgomery_dir: Path, shenzhen_dir: Path | None) -> str:
    """A hash of the path, size and modification time of every film and mask the preparation reads."""
    folders = [montgomery_dir / folder for folder in ("CXR_png", *LUNG_MASK_FOLDERS)]
    folders += [] if shenzhen_dir is None else [Path(shenzhen_dir)]
    stamp = source_stamp([folder for folder in folders if folder.is_dir()])
    return hashlib.sha1(json.dumps(stamp).encode()).hexdigest()


def _prepared_with(out_dir: Path, settings: dict) -> bool:
    """Whether `out_dir` is a complete preparation with `settings` (then reused as it is, and said so). A folder
    without our manifest is someone else's: refused, never overwritten."""
    manifest = out_dir / PREPARED_MANIFEST
    if manifest.exists():
        previous = json.loads(manifest.read_text())
        if all(previous.get(key) == value for key, value in settings.items()):
            print(
                f"Reusing the prepared cases in {out_dir} ({previous['train']} train, {previous['test']} test, "
                f"{sum(previous['skipped'].values())} skipped at preparation)"
            )
            return True
        changed = [key for key, value in settings.items() if previous.get(key) != value]
        if changed == ["download"]:
            print(f"{out_dir} was prepared from other files (a film or mask added, removed or changed since): "
                  "preparing it again")  # fmt: skip
        else:
            print(f"{out_dir} was prepared with other settings: preparing it again")
    elif out_dir.exists():
        raise FileExistsError(f"{out_dir} exists but has no {PREPARED_MANIFEST}: it was not written here; move it away")
    return False


def _write_prepared_cases(cases: list[dict], size: int, partial: Path, base: Path, skipped: Skipped,
                          cache_dir: Path | None = None) -> list[dict]:  # fmt: skip
    """Each usable case's image and mask at `size` into `partial/{image,mask}/<name>.png`, decoded on every core:
    one row per case written (its original size, its source files relative to `base`); the bad ones named, skipped
    and counted. With `cache_dir`, each film's result is also kept there (a DiskCache keyed by `size` and its files'
    path, size and modification time): when a film or mask changes, only that film is decoded again."""
    for folder in ("image", "mask"):
        (partial / folder).mkdir(parents=True)
    jobs = [(case, size) for case in cases]
    cache = DiskCache(cache_dir, {"size": size, **LUNG_PREPARATION}, ("image", "mask", "shape")) if cache_dir else None
    done = prepare_cached(jobs, lambda job: [job[0]["image"], *job[0]["masks"]], _prepare_lung_job, cache, skipped,
                          desc="Preparing lung cases", name_of=lambda job: job[0]["name"])  # fmt: skip
    if cache:
        print(f"Disk cache {cache.folder}: {cache.read} films read back, {cache.built} decoded and written")
    rows = []
    for (case, _), arrays in done:
        height, width = (int(n) for n in arrays["shape"])
        Image.fromarray(np.asarray(arrays["image"])).save(partial / "image" / f"{case['name']}.png")
        Image.fromarray(np.asarray(arrays["mask"])).save(partial / "mask" / f"{case['name']}.png")
        relative = [os.path.relpath(p.resolve(), base) for p in (case["image"], *case["masks"])]
        rows.append({"name": case["name"], "source": case["source"], "height": height, "width": width,
                     "image_file": relative[0], "mask_files": ";".join(relative[1:])})  # fmt: skip
    return rows


def _split_prepared_cases(rows: list[dict], partial: Path, test_fraction: float, seed: int) -> dict[str, int]:
    """A seeded split of the sorted names (the same cases go to test on every machine and every run): the files
    moved to `partial/{train,test}/{image,mask}/`, each row given its split, `cases.csv` written; the counts."""
    names = sorted(row["name"] for row in rows)
    n_test = min(max(1, round(test_fraction * len(names))), len(names) - 1) if len(names) > 1 else 0
    test_names = set(np.random.default_rng(seed).permutation(names)[:n_test])
    for row in rows:
        row["split"] = "test" if row["name"] in test_names else "train"
        for folder in ("image", "mask"):
            (partial / row["split"] / folder).mkdir(parents=True, exist_ok=True)
            os.replace(partial / folder / f"{row['name']}.png", partial / row["split"] / folder / f"{row['name']}.png")
    for folder in ("image", "mask"):
        (partial / folder).rmdir()
    cases_table = pd.DataFrame(rows).sort_values(["split", "name"])
    cases_table.to_csv(partial / PREPARED_CASES, index=False)
    return {split: int((cases_table["split"] == split).sum()) for split in ("train", "test")}


# %% COVID-19-20 (MICCAI 2020): NIfTI volumes checked before they are decoded
# Train/volume-covid19-A-XXXX_ct.nii.gz with its _seg.nii.gz, and Validation/ CTs without masks, read as downloaded.
# The headers are checked when the cases are found, which decompresses no voxel: a CT without its mask, a mask on
# another grid, a 2D or 4D file and an interrupted download each cost their case, named, before anything trains. A
# .gz damaged inside gets past those checks and fails only when MONAI decodes it: undecodable_named names it then.

COVID_CASE_NAME = re.compile(r"volume-covid19-A-(\d{4})_(ct|seg)\.nii\.gz")  # the challenge's file names
AFFINE_TOLERANCE_MM = 1e-3  # image and mask affines may differ by float rounding, not by a micrometre
DAMAGED_CASE_ADVICE = "replace it, or move its case (_ct and _seg) out of Train/"


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
    if Path(path).name.endswith(".gz") and not gzip_is_complete(path, expected):
        raise Unusable("truncated", "the gzip data ends before the volume does")
    return img


def check_mask_on_ct_grid(seg: nib.Nifti1Image, ct: nib.Nifti1Image) -> None:
    """Raise Unusable unless the mask has its CT's shape and affine: a mask on another grid marks other voxels."""
    if seg.shape != ct.shape:
        raise Unusable("mask shape differs", f"mask {seg.shape}, CT {ct.shape}")
    if not np.allclose(seg.affine, ct.affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
        gap = np.abs(seg.affine - ct.affine).max()
        raise Unusable("mask affine differs", f"from the CT's by up to {gap:.3g} mm")


def find_covid_cases(folder: Path, skipped: Skipped, labelled: bool = True) -> list[dict]:
    """The usable cases of a challenge folder, sorted by case id: {"case", "image"} and, if labelled, "label".

    Pairs `volume-covid19-A-XXXX_ct.nii.gz` with `..._seg.nii.gz` by case id and checks the headers only (cheap):
    both 3D and complete, the mask on the CT's grid (same shape, same affine). A case failing a check is named (by
    the file at fault), skipped and counted in `skipped`.
    """
    files: dict[str, dict[str, Path]] = {}
    for path in sorted(Path(folder).iterdir()):
        match = COVID_CASE_NAME.fullmatch(path.name)
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
                check_mask_on_ct_grid(check_volume(path), ct)
        except Unusable as err:
            skipped.skip(path, err)
            continue
        cases.append({"case": case_id, **{key: str(p) for key, p in paths.items()}})
    return cases


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


@contextmanager
def undecodable_named(item: dict, keys):
    """Reading the files `item[key]` of `keys` inside this block (MONAI's LoadImaged in covid_ct_segmentation.py's
    LoadVolumesd): an error there becomes Unusable naming the file that cannot be decoded, the CT or its mask.
    find_covid_cases checks each file's header and the length its gzip trailer gives (cheap); a .gz damaged inside
    (a bad sector, a copy patched up) gets past both and fails only when its voxels are decompressed, deep inside
    nibabel and zlib, with a message that names no file."""
    try:
        yield
    except Exception as err:
        files = [str(item[key]) for key in keys if key in item]
        bad = [path for path in files if not decodes(path)] or files
        detail = f"{', '.join(bad)} cannot be decompressed or decoded ({type(err).__name__}: {err})"
        raise Unusable("unreadable", detail) from err


@contextmanager
def damaged_file_stops_the_run():
    """Loading volumes (a CacheDataset built, a batch drawn) inside this block: a file that cannot be decoded ends
    the run with one line naming it (a DatasetError, `Data problem: ...`), not a traceback from three libraries
    down. Any other error goes through."""
    try:
        yield
    except RuntimeError as err:
        unusable = unusable_cause(err)
        if unusable is None:
            raise
        raise DatasetError(f"{unusable.detail}: {DAMAGED_CASE_ADVICE}") from None


def cache_dataset(files: list[dict], transforms, **kwargs):
    """MONAI's CacheDataset of `files` (loaded and preprocessed now, up to the first random transform); a file
    that cannot be decoded stops the run with one line naming it."""
    from monai.data import CacheDataset

    with damaged_file_stops_the_run():
        return CacheDataset(files, transforms, **kwargs)


def stamped_hash(item: dict, settings: str = "", keys: tuple[str, ...] = ("image", "label")) -> bytes:
    """The disk cache key of a MONAI data item: its contents, `settings` (JSON of everything the preprocessing
    depends on) and the path, size and modification time of its files `keys`: a touched file is a new key."""
    from monai.data.utils import pickle_hashing

    files = [item[key] for key in keys if key in item]
    return pickle_hashing({**item, "_settings": settings, "_stamp": source_stamp(files)})


@functools.cache  # one class, defined when first needed: MONAI is imported by the 3D scripts only
def _persistent_class():
    from monai.data import PersistentDataset

    class CheckedPersistentDataset(PersistentDataset):
        """MONAI's PersistentDataset, with two mends. MONAI writes an entry into a temporary folder, then moves it:
        the folder is put beside the entries, so the move is a rename on one disk, atomic (from /tmp, often another
        disk, it is a copy that a kill can cut short). And an entry that torch.load cannot read, for any reason
        (MONAI rebuilds only some), is rebuilt with one line naming it."""

        def entry(self, item) -> Path:
            return Path(self.cache_dir) / f"{self.hash_func(item).decode('utf-8')}{self.transform_hash}.pt"

        def _cachecheck(self, item_transformed):
            import tempfile

            saved, tempfile.tempdir = tempfile.tempdir, str(self.cache_dir)
            try:
                try:
                    return super()._cachecheck(item_transformed)
                except (RuntimeError, EOFError, OSError, ValueError) as err:
                    entry = self.entry(item_transformed)
                    if unusable_cause(err) is not None or not entry.is_file():
                        raise  # the transforms failed (a damaged volume): not the entry
                    print(f"Cache entry {entry} cannot be read ({type(err).__name__}: {str(err)[:120]}): rebuilding it")
                    entry.unlink()
                    return super()._cachecheck(item_transformed)
            finally:
                tempfile.tempdir = saved

    return CheckedPersistentDataset


class _BuildEntries:
    """A torch Dataset that builds the disk cache entry of item i and returns only the problem, if any (a file that
    cannot be decoded): a DataLoader's workers then build the entries in parallel and hand nothing big back."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> str:
        try:
            self.dataset[i]
        except RuntimeError as err:
            unusable = unusable_cause(err)
            if unusable is None:
                raise
            return unusable.detail
        return ""


def persistent_dataset(files: list[dict], transforms, folder: Path, settings: dict, workers: int | None = None,
                       desc: str = "preprocessing") -> tuple:  # fmt: skip
    """(dataset, read, built): MONAI's PersistentDataset of `files` (CheckedPersistentDataset), whose deterministic
    transforms (up to the first random one) run once per item and are kept on disk in `folder`, keyed by the
    transforms' class names, `settings` (everything they depend on: spacing, window, the script's version of the
    chain) and each item's files' path, size and modification time. The missing entries are built now, on every
    core (a DataLoader's worker processes, each torch single-threaded), with a bar on a terminal; `read` entries
    were there already. Later epochs read the entries back from disk, a page cache that every process of the
    machine shares. A file that cannot be decoded stops the run with one line naming it. Under torchrun, call it
    inside distributed.main_first(): process 0 builds, the others then find every entry built."""
    import multiprocessing

    import torch
    from monai.data.utils import json_hashing
    from monai.transforms import Compose
    from torch.utils.data import DataLoader  # torch's: one item at a time, no collation

    folder = make_folder(Path(folder))
    remove_leftovers(folder)
    key = functools.partial(stamped_hash, settings=json.dumps(settings, sort_keys=True, default=str))
    persistent = _persistent_class()
    # track_meta: the entries keep their MetaTensors' affine and applied operations, which Invertd needs to put a
    # prediction back on the scan's grid (reset_ops_id, MONAI's default, lets other instances of the transforms do
    # it). weights_only=False: that metadata holds NumPy arrays, which torch's weights-only reader refuses (every
    # entry would be rebuilt, every time); the folder holds only what this function wrote there.
    options = dict(hash_func=key, hash_transform=json_hashing, track_meta=True, weights_only=False)
    dataset = persistent(files, transforms, cache_dir=folder, **options)
    missing = [item for item in files if not dataset.entry(item).is_file()]
    if missing:  # the chain up to its first random transform: the same entries (the transform hash stops there)
        chain = transforms.flatten().transforms
        first = next((i for i, t in enumerate(chain) if not _deterministic(t)), len(chain))
        builder = persistent(missing, Compose(chain[:first]), cache_dir=folder, **options)
        if workers is None:
            workers = usable_cores()
        # Forked workers: they have the script's transforms without importing it (spawned ones, macOS's default,
        # would have to pickle them); where fork is missing, this process builds the entries itself.
        forks = "fork" in multiprocessing.get_all_start_methods()
        workers = min(workers, len(missing)) if len(missing) > 1 and forks else 0
        # Its own generator: a DataLoader draws its workers' seeds from the global one otherwise, and a first run
        # would then train with other random numbers (dropout, crops) than the runs after it
        loader = DataLoader(_BuildEntries(builder), batch_size=None, num_workers=workers, generator=torch.Generator(),
                            multiprocessing_context="fork" if workers else None)  # fmt: skip
        for problem in tqdm(loader, total=len(missing), desc=desc, leave=False, disable=None):
            if problem:
                raise DatasetError(f"{problem}: {DAMAGED_CASE_ADVICE}")
    return dataset, len(files) - len(missing), len(missing)


def remove_leftovers(folder: Path, age_s: float = 600.0) -> None:
    """The temporary folders (tmp*) a killed build left in a PersistentDataset's folder: MONAI writes each entry in a
    folder of its own and moves it out; kill -9 leaves that folder, with half an entry, for good. Removed once older
    than any entry's write takes (10 minutes), so that a build running beside this one keeps its own."""
    now = time.time()
    for leftover in folder.glob("tmp*"):
        with suppress(OSError):  # gone already: another run removed it
            if leftover.is_dir() and now - leftover.stat().st_mtime > age_s:
                shutil.rmtree(leftover)


def _deterministic(transform) -> bool:
    from monai.transforms import RandomizableTrait, Transform

    return isinstance(transform, Transform) and not isinstance(transform, RandomizableTrait)


# %% The user's own files: what the Predict cells read and write
# A Predict cell runs a trained model on files nobody here has seen: any size, bit depth, orientation, slice order,
# file naming. Each file (or DICOM series) that cannot be used is named on one line, skipped and counted, and the
# others are still predicted; the user's files are only ever read.

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
NOT_A_SLICE = ("DICOMDIR",)  # the index file of a DICOM CD: DICOM, but no image


def expand_inputs(inputs) -> list[Path]:
    """The entries of `inputs` (a folder, a file, or a list of either): a folder gives its files and subfolders,
    sorted by name, hidden ones left out; a file or folder given in a list is kept as it is. Raises DatasetError
    naming an input that does not exist."""
    entries = []
    for item in [inputs] if isinstance(inputs, (str, Path)) else list(inputs):
        path = Path(item).expanduser()
        if not path.exists():
            raise DatasetError(f"{path} not found: nothing to predict there")
        if path.is_dir() and isinstance(inputs, (str, Path)):
            entries += sorted(p for p in path.iterdir() if not p.name.startswith("."))
        else:
            entries.append(path)
    return entries


def has_dicom_preamble(path: Path) -> bool:
    """Whether the file says it is DICOM ("DICM" after its 128-byte preamble), whatever its name."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def is_dicom(path: Path) -> bool:
    """A DICOM file by its name (.dcm) or by its content: TCIA and PACS exports often have no extension."""
    return path.is_file() and (path.suffix.lower() in DICOM_SUFFIXES or has_dicom_preamble(path))


def read_dicom_image(path: Path) -> pydicom.Dataset:
    """The DICOM dataset of `path` with its pixels decodable; raises Unusable saying why not (missing, not DICOM,
    truncated, compressed without an installed decoder), never an error from deep inside pydicom."""
    if not path.is_file():
        raise Unusable("missing DICOM", f"{path} not found")
    try:
        ds = pydicom.dcmread(path)
    except Exception as err:  # pydicom raises several kinds on a damaged or non-DICOM file
        raise Unusable("unreadable DICOM", f"{path}: {err}") from err
    if "PixelData" not in ds:
        sop_class = ds.get("file_meta", {}).get("MediaStorageSOPClassUID") or ds.get("SOPClassUID")
        if "Rows" in ds or (sop_class is not None and "Image" in sop_class.name):  # an image's file, cut short
            raise Unusable("truncated DICOM", f"{path} ends after {path.stat().st_size:,} bytes, before its pixels")
        raise Unusable("no pixel data", f"{path} holds no image (a DICOM of another kind: {sop_class or 'unknown'})")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is not None and syntax.is_compressed:
        decoder = get_decoder(syntax)
        if not decoder.is_available:
            needs = "; ".join(decoder.missing_dependencies)
            raise Unusable("no decoder", f"{path} is compressed as {syntax.name}, install one of: {needs}")
    return ds


def dicom_pixels(ds: pydicom.Dataset) -> np.ndarray:
    """The stored pixels of a dataset read by `read_dicom_image` as float32, the rescaling applied (HU for CT)."""
    try:
        pixels = ds.pixel_array.astype(np.float32)
    except Exception as err:  # the decoder plugins raise RuntimeError, ValueError, OSError...
        raise Unusable("undecodable pixel data", f"{ds.filename}: {err}") from err
    return pixels * np.float32(ds.get("RescaleSlope", 1)) + np.float32(ds.get("RescaleIntercept", 0))


def read_radiograph(path: Path) -> tuple[np.ndarray, tuple[float, float] | None]:
    """(the pixels of a grayscale radiograph as float32 (H, W), bright = dense; the pixel spacing (rows, columns)
    in mm where a DICOM gives one, else None). DICOM by name or content (RescaleSlope/Intercept applied,
    MONOCHROME1, where bright means air, inverted), else any image Pillow reads (PNG, JPEG, TIFF; 8 or 16 bits;
    RGB turned gray). Values as stored: the caller normalises them as its network was trained. Raises Unusable."""
    if not is_dicom(path):
        try:
            return read_gray(path), None
        except Unusable as err:
            reason = err.__cause__ or err.detail  # Pillow's own words
            raise Unusable("unreadable image", f"{path} is neither DICOM nor an image Pillow reads ({reason})") from err
    ds = read_dicom_image(path)
    pixels = dicom_pixels(ds)
    if pixels.ndim != 2:
        raise Unusable("not a grayscale radiograph", f"{path} has pixel array shape {pixels.shape}")
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        pixels = pixels.max() + pixels.min() - pixels  # same range, reversed
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")  # at the patient, else at the detector
    return pixels, (float(spacing[0]), float(spacing[1])) if spacing else None


def ct_inputs(inputs) -> list[Path]:
    """The CT volumes among `inputs`: NIfTI files, and folders holding one DICOM series each (any file names).
    A folder given as `inputs` that itself holds DICOM files is one series; otherwise its NIfTI files and each of
    its subfolders (searched down to the folders that hold DICOM files) are inputs, and any other file too, so
    that it is named when it cannot be read."""
    if isinstance(inputs, (str, Path)) and Path(inputs).is_dir() and any(map(is_dicom, Path(inputs).iterdir())):
        return [Path(inputs)]
    found = []
    for path in expand_inputs(inputs):
        if path.is_dir():
            series = sorted({p.parent for p in path.rglob("*") if p.name not in NOT_A_SLICE and is_dicom(p)})
            found += series or [path]  # a folder without DICOM files: named when it is read
        else:
            found.append(path)
    return found


def read_ct(path: Path) -> nib.Nifti1Image:
    """The CT of `path` as a NIfTI image (voxels in HU, its affine in RAS mm): a NIfTI file as stored (checked
    with `check_volume`), or the DICOM series of a folder (`read_dicom_series`), then built in memory with the
    series' geometry. Raises Unusable naming the file at fault."""
    if path.is_dir():
        hu, affine = read_dicom_series(path)
        return nib.Nifti1Image(hu, affine)
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise Unusable("not a CT", f"{path} is neither a NIfTI file (.nii, .nii.gz) nor a folder of DICOM files")
    try:
        img = check_volume(path)
        np.asanyarray(img.dataobj)  # decode now: a file damaged inside fails here, named
    except Unusable as err:
        raise Unusable(err.problem, f"{path}: {err.detail}") from err
    except Exception as err:  # nibabel, gzip and zlib raise several kinds on a file damaged inside
        raise Unusable("unreadable", f"{path} cannot be decoded ({type(err).__name__}: {err})") from err
    return img


def read_dicom_series(series_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(HU volume float32 (X, Y, Z), its NIfTI affine (RAS mm)) of the DICOM series in `series_dir`.

    Every file of the folder that is DICOM by name (.dcm) or by content is a slice, so extension-less exports
    read too. Axes as NIfTI and MONAI order them: X = DICOM columns, Y = rows, Z = slices sorted by
    ImagePositionPatient projected on the slice normal, never by file name or InstanceNumber (TCIA numbers series
    from the head down; exports number them any way). Raises Unusable, naming the slice at fault where there is
    one, for an unreadable or truncated slice, several series, a missing slice, inconsistent slices.
    """
    files = sorted(p for p in series_dir.iterdir() if p.name not in NOT_A_SLICE and is_dicom(p))
    datasets = [read_dicom_image(path) for path in files]
    check_slices(datasets, series_dir)
    row_dir, col_dir = np.array(datasets[0].ImageOrientationPatient, dtype=np.float64).reshape(2, 3)  # DICOM: the
    # direction of a row (columns increase), of a column (rows increase)
    datasets, positions = sort_by_position(datasets, np.cross(row_dir, col_dir), series_dir)
    # Stored values to HU slice by slice (the slope and intercept may differ between slices); (columns, rows) = (X, Y)
    hu = np.stack([dicom_pixels(ds).T for ds in datasets], axis=-1)

    row_spacing, col_spacing = (float(s) for s in datasets[0].PixelSpacing)  # DICOM order: between rows, columns
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # one column to the next: along the row direction, by the column spacing
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(datasets) - 1)  # one slice to the next (a tilt included)
    lps[:3, 3] = positions[0]
    return hu, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM's patient axes are LPS, NIfTI's RAS: x and y flip


def check_slices(datasets: list, series_dir: Path) -> None:
    """Raise Unusable unless the files of `series_dir` are one series of at least 2 slices, each with its geometry,
    all of the same orientation, size and pixel spacing."""
    uids = Counter(str(ds.get("SeriesInstanceUID", "none")) for ds in datasets)
    if len(uids) > 1:
        series = ", ".join(f"{n} files of ...{uid[-10:]}" for uid, n in uids.most_common())
        raise Unusable("mixed series", f"{series_dir} holds {len(uids)} SeriesInstanceUIDs ({series})")
    if len(datasets) < 2:
        raise Unusable("too few slices", f"{len(datasets)} DICOM file(s) in {series_dir}")
    for keyword in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing"):
        lacking = [ds.filename for ds in datasets if keyword not in ds]
        if lacking:
            raise Unusable("no geometry", f"{lacking[0]} (and {len(lacking) - 1} more) lacks {keyword}")
    orientations = np.array([ds.ImageOrientationPatient for ds in datasets], dtype=np.float64)
    sizes = {(int(ds.Rows), int(ds.Columns), tuple(float(s) for s in ds.PixelSpacing)) for ds in datasets}
    if not np.allclose(orientations, orientations[0], atol=1e-4) or len(sizes) > 1:
        raise Unusable("inconsistent slices", f"orientation, size or pixel spacing differs in {series_dir}")


def sort_by_position(datasets: list, normal: np.ndarray, series_dir: Path) -> tuple[list, np.ndarray]:
    """(the slices sorted along the slice normal, their ImagePositionPatient (n, 3) in LPS mm, in that order).

    Raises Unusable for two slices at one position, a missing slice or uneven spacing: the affine's one step from
    slice to slice would place the voxels beyond the gap wrongly."""
    positions = np.array([ds.ImagePositionPatient for ds in datasets], dtype=np.float64)
    order = np.argsort(positions @ normal, kind="stable")
    datasets, positions = [datasets[i] for i in order], positions[order]
    along = positions @ normal  # mm along the normal, increasing
    gaps = np.diff(along)
    step = float(np.median(gaps))
    if gaps.min() < 1e-3:
        raise Unusable("duplicate slice position", f"two slices at {along[gaps.argmin()]:.2f} mm in {series_dir}")
    if np.abs(gaps - step).max() > 0.1 * step:  # real series are evenly spaced to well under 1%
        i = int(np.abs(gaps - step).argmax())
        where = f"{gaps[i]:.2f} mm between the slices at {along[i]:.2f} and {along[i + 1]:.2f} mm along the normal"
        problem = "missing slice" if gaps[i] > 1.5 * step else "uneven slice spacing"
        raise Unusable(problem, f"{where}, {step:.2f} mm elsewhere, in {series_dir}")
    return datasets, positions


def save_mask_nifti(path: Path, mask: np.ndarray, affine: np.ndarray) -> None:
    """A 0/1 uint8 mask on its CT's voxel grid (the CT's shape; its affine as both sform and qform, scanner
    coordinates in mm), written atomically: a crash never leaves half a mask."""
    out = nib.Nifti1Image(mask.astype(np.uint8), affine)
    out.set_sform(affine, code=1)
    out.set_qform(affine, code=1)
    out.header.set_xyzt_units("mm", "sec")
    make_folder(path.parent)  # a file in its place: one Output problem line
    # Gzipped by hand: nib.save picks the format by the file's extension, and the temporary file's is ".partial".
    save_atomically(path, lambda partial: partial.write_bytes(gzip.compress(out.to_bytes(), compresslevel=1)))


def volume_ml(mask: np.ndarray, affine: np.ndarray) -> float:
    """The volume of a mask in mL: its voxels times the voxel's volume (the affine's determinant, mm^3 / 1000)."""
    return float(mask.sum()) * abs(float(np.linalg.det(affine[:3, :3]))) / 1000


def mask_name(path: Path, suffix: str) -> str:
    """The output name for input `path`: its name without image extensions, plus `suffix` ("_mask.png")."""
    name = path.name
    for ext in (*NIFTI_SUFFIXES[::-1], *DICOM_SUFFIXES, ".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return name + suffix


def unique_name(name: str, used: set[str], suffix: str) -> str:
    """`name` (ending in `suffix`), or with _2, _3... before the suffix when this run already wrote it: two inputs
    named alike (two folders' ct.nii.gz) never overwrite each other's output. Adds the name to `used`."""
    stem, unique, n = name.removesuffix(suffix), name, 1
    while unique in used:
        n += 1
        unique = f"{stem}_{n}{suffix}"
    used.add(unique)
    return unique


def segment_cts(paths: list[Path], segment, name_of, out_dir: Path, volume: str, skipped: Skipped) -> list[dict]:
    """The prediction loop of the 3D scripts: each CT of `paths` read (`read_ct`: a NIfTI file, or a DICOM series
    folder), segmented by `segment(img, path)` into a uint8 mask on its own voxel grid, written to
    out_dir/`name_of(path)` (made unique) on that grid, and described by a row {input, mask, <volume> (mL), voxels,
    shape} of out_dir/predictions.csv. A CT that cannot be read or used (Unusable) is named, skipped and counted in
    `skipped`, and listed in out_dir/skipped.csv with every earlier skip of `skipped`; the others are still
    segmented. Returns the rows; both CSVs are written even when they are empty."""
    make_folder(out_dir)  # a file in its place: one Output problem line
    rows, used = [], set()
    for path in tqdm(paths, desc="segmenting", leave=False, disable=None):
        try:
            img = read_ct(path)  # checked and decoded here: a damaged file is named, not met deep inside a library
            mask = segment(img, path)
        except Unusable as err:
            skipped.skip(path, err)
            continue
        name = unique_name(name_of(path), used, ".nii.gz")
        save_mask_nifti(out_dir / name, mask, img.affine)
        rows.append({"input": str(path), "mask": name, volume: volume_ml(mask, img.affine),
                     "voxels": int(mask.sum()), "shape": "x".join(map(str, mask.shape))})  # fmt: skip
    table = pd.DataFrame(rows, columns=["input", "mask", volume, "voxels", "shape"])
    save_atomically(out_dir / "predictions.csv", lambda partial: table.to_csv(partial, index=False))
    skipped.save(out_dir / "skipped.csv")
    return rows
