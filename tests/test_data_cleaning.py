"""data_cleaning.py: the Kaggle run-length encoding, checked on hand-computed masks and by round trip; the bad-input
report shared by the scripts (Unusable, Skipped), checked line by line."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_cleaning import Skipped, Unusable, rle_decode, rle_encode


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


# %% Bad inputs: named, skipped and counted


def test_unusable_carries_its_problem_for_the_count_and_its_detail():
    err = Unusable("truncated gzip", "ends at byte 1000")
    assert err.problem == "truncated gzip" and err.detail == "ends at byte 1000"
    assert str(err) == "truncated gzip: ends at byte 1000"
    assert str(Unusable("no mask")) == "no mask" and Unusable("no mask").detail == ""


def test_a_file_is_named_by_its_path_and_an_item_by_its_noun(capsys):
    files, patients = Skipped("file"), Skipped("patient")
    first, second = Path("data", "train", "1_1.tif"), Path("data", "train", "1_2.tif")
    files.skip(first, Unusable("unreadable", "not a TIFF: cannot identify image"))
    files.skip(second, "missing")  # a problem the loop finds itself, without detail
    patients.skip("0004cfab", Unusable("no pixel data", "0004cfab.dcm has no PixelData"))
    patients.skip("00313ee0", "invalid box", "a Target 1 row without a width")
    assert capsys.readouterr().out.splitlines() == [
        f"Skipped {first}: unreadable (not a TIFF: cannot identify image)",
        f"Skipped {second}: missing",
        "Skipped patient 0004cfab: no pixel data: 0004cfab.dcm has no PixelData",
        "Skipped patient 00313ee0: invalid box: a Target 1 row without a width",
    ]


def test_summary_counts_each_problem_most_frequent_first(capsys):
    skipped = Skipped("case")
    assert skipped.summary("sample") == "sample: no case skipped" and not skipped.counts
    for case, problem in [("A", "no mask"), ("B", "missing slice"), ("C", "no CT series"), ("D", "missing slice")]:
        skipped.skip(case, problem, "detail")
    assert skipped.counts == {"no mask": 1, "missing slice": 2, "no CT series": 1}
    # Ties keep the order in which the problems were first met.
    assert skipped.summary("sample") == "sample: skipped 4 cases (2 missing slice, 1 no mask, 1 no CT series)"
    assert Skipped("file").summary("Train") == "Train: no file skipped"
    one = Skipped("file")
    one.skip("a.tif", "unreadable")
    assert one.summary("Train") == "Train: skipped 1 file (1 unreadable)"  # singular for one
    assert Skipped("patient").summary("test") == "test: no patient skipped"


def test_only_the_first_skips_of_a_kind_are_printed_and_all_are_kept(capsys):
    skipped = Skipped("case", print_limit=3)
    for n in range(5):
        skipped.skip(f"LUNG1-{n:03d}", Unusable("no mask", "not found"))
    skipped.skip("LUNG1-099", Unusable("empty mask", "marks no voxel"))  # another kind: its own limit
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [f"Skipped case LUNG1-{n:03d}: no mask: not found" for n in range(3)]
    assert lines[3:] == [
        "Skipped case LUNG1-003: no mask (further cases skipped for this reason are not printed)",
        "Skipped case LUNG1-099: empty mask: marks no voxel",
    ]
    assert len(skipped.rows) == 6 and skipped.summary("all") == "all: skipped 6 cases (5 no mask, 1 empty mask)"


def test_without_a_print_limit_every_skip_is_printed(capsys):
    skipped = Skipped("file", print_limit=None)
    for n in range(25):
        skipped.skip(f"{n}.tif", "unreadable")
    assert len(capsys.readouterr().out.splitlines()) == 25 == skipped.counts["unreadable"]


def test_rows_list_every_skip_in_order_as_the_printed_line_reads(capsys):
    cases = Skipped("case", print_limit=1)
    cases.skip("LUNG1-001", Unusable("no mask", "Effusions/LUNG1-001 not found"))
    cases.skip("LUNG1-002", Unusable("no mask", "Effusions/LUNG1-002 not found"))  # not printed, still a row
    assert cases.rows == [
        {"case": "LUNG1-001", "problem": "no mask", "detail": "no mask: Effusions/LUNG1-001 not found"},
        {"case": "LUNG1-002", "problem": "no mask", "detail": "no mask: Effusions/LUNG1-002 not found"},
    ]  # the columns of pleural_effusion_3d.py's skipped_cases.csv
    files, path = Skipped("file"), Path("Train", "a.nii.gz")
    files.skip(path, Unusable("truncated", "the gzip data ends early"))
    assert files.rows == [{"file": str(path), "problem": "truncated", "detail": "truncated (the gzip data ends early)"}]


def test_data_is_one_line_saying_real_or_synthetic_the_counts_and_the_skips(tmp_path):
    from data_cleaning import Data

    skipped = Skipped("file")
    skipped.skip(tmp_path / "bad.tif", "unreadable", "truncated")
    data = Data(tmp_path, True, [{"image": object()}] * 3, [{}], unit="frames", skipped=skipped)
    assert str(data) == f"SYNTHETIC sample {tmp_path}: 3 train, 1 validation frames; 1 file skipped"
    assert repr(data) == f"Data({data})"  # a notebook shows the line, not the cached pixels
    real = Data(tmp_path, False, [{}], [{}, {}], test=[{}] * 4, unit="films")
    assert str(real) == f"real dataset {tmp_path}: 1 train, 2 validation, 4 test films"


def test_split_groups_keeps_patients_whole_and_the_test_set_fixed():
    """Sides are disjoint and cover every patient; the fractions are of all patients; the test patients do not
    move when val_fraction changes; too few patients is one DatasetError naming the fractions."""
    from data_cleaning import DatasetError, split_groups

    patients = [f"P{i:03d}" for i in range(40) for _ in range(3)]  # 3 images each: split by patient, not image
    train, val, test = split_groups(patients, 0.2, 0.25, seed=7)
    assert train | val | test == set(patients) and not (train & val or train & test or val & test)
    assert (len(train), len(val), len(test)) == (22, 8, 10)
    assert split_groups(patients, 0.1, 0.25, seed=7)[2] == test
    assert split_groups(patients, 0.2, 0.25, seed=8)[2] != test
    assert split_groups(patients, 0.2, 0.0, seed=7)[2] == set()
    assert [len(side) for side in split_groups(["a", "b", "c"], 0.2, 0.2, seed=0)] == [1, 1, 1]
    with pytest.raises(DatasetError, match="test_fraction 0.2"):
        split_groups(["a", "b"], 0.2, 0.2, seed=0)


def test_a_bad_label_csv_is_one_data_problem_naming_the_file_the_column_and_the_row(tmp_path):
    """read_table: a missing column, a value that is not a number, a fraction where a count is needed, a blank where
    a value is needed, and a file that is not a CSV at all: each one DatasetError naming file, column and row."""
    from data_cleaning import DatasetError, read_table

    path = tmp_path / "stage_2_train_labels.csv"
    columns = {"patientId": "str", "x": "number", "Target": "int"}
    path.write_text("patientId, x ,Target\n a ,1.5,1\nb,,0\n")  # spaces around names and values; blank x: no box
    table = read_table(path, columns)
    assert table["patientId"].tolist() == ["a", "b"] and table["Target"].tolist() == [1, 0]
    assert table["x"].iloc[0] == 1.5 and np.isnan(table["x"].iloc[1])
    cases = {
        "patientId,x\na,1\n": " has no column Target (it has: patientId, x)",
        "patientId,x,Target\na,1,1\nb,abc,0\nc,def,0\n": ": column x, row 3: 'abc' is not a number; 2 such row(s)",
        "patientId,x,Target\na,1,0.5\n": ": column Target, row 2: '0.5' is not a number (a whole one)",
        "patientId,x,Target\na,1,\n": ": column Target, row 2: '' is not a number",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(DatasetError, match=re.escape(f"{path} (labels){message}")):
            read_table(path, columns, "labels")
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe garbage")
    with pytest.raises(DatasetError, match="is not a readable CSV"):
        read_table(path, columns)
    with pytest.raises(DatasetError, match="not found"):
        read_table(tmp_path / "missing.csv", columns)


def test_skips_print_the_first_10_of_each_kind_and_save_every_one(tmp_path, capsys):
    skipped = Skipped("patient")
    for i in range(25):
        skipped.skip(f"P{i}", "no DICOM", "not in stage_2_train_images")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 11 and "not printed" in lines[-1]
    table = pd.read_csv(skipped.save(tmp_path / "skipped.csv"))
    assert table["patient"].tolist() == [f"P{i}" for i in range(25)] and set(table["problem"]) == {"no DICOM"}


def test_a_data_dir_that_does_not_exist_is_one_data_problem_not_a_sample(tmp_path):
    from data_cleaning import DatasetError
    from sample_data import find_dataset

    with pytest.raises(DatasetError, match=re.escape(f"{tmp_path / 'dta'} (data_dir) is not a folder")):
        find_dataset("MontgomerySet", tmp_path / "dta")
    assert not (tmp_path / "dta").exists()


def test_the_cpu_thread_count_is_half_the_cores_shared_by_torchrun_processes(monkeypatch):
    import torch

    import distributed

    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert distributed.cpu_threads() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.cpu_threads() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert distributed.cpu_threads() == 1
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert distributed.device().type == "cpu" and torch.get_num_threads() == 1
        torch.set_num_threads(3)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # said by the user: left as it is
        distributed.device()
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def _prepare_square(path: Path) -> dict:
    """A stand-in preparation: the file's number squared, as a 2x2 array; a file holding "bad" is unusable."""
    text = path.read_text()
    if text == "bad":
        raise Unusable("unreadable", "holds 'bad'")
    value = int(text)
    return {"image": np.full((2, 2), value * value, np.int64), "label": np.array(value % 2, np.uint8)}


def _mapped_files() -> set[str]:
    """The files memory-mapped into this process (Linux)."""
    return {line.split(maxsplit=5)[5].strip() for line in Path("/proc/self/maps").read_text().splitlines()
            if len(line.split(maxsplit=5)) == 6}  # fmt: skip


def test_memory_mapped_entries_hold_no_open_file_so_more_entries_than_the_open_file_limit_are_read(tmp_path, capsys):
    """A process may have only so many files open (1,024 on many Linux systems, fewer than RSNA's 26,684 entries):
    an entry read memory-mapped keeps no file open, so many more entries than the limit are read back, each equal to
    what was written, and none is taken for damaged and deleted; with no file left to open, the error says so and
    the entry is kept."""
    import os
    import resource

    from data_cleaning import DiskCache

    sources = [tmp_path / f"{i}.dcm" for i in range(300)]
    cache = DiskCache(tmp_path / "cache", {"size": 1}, ("image",))
    for i, source in enumerate(sources):
        source.write_text(str(i))
        cache.put([source], {"image": np.full(DiskCache.MMAP_BYTES, i % 251, np.uint8)})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 50, hard))
    try:
        back = [cache.get([source]) for source in sources]  # all kept alive: 300 mappings at once
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) - 1, hard))  # none left
        with pytest.raises(OSError, match=f"while reading the cache entry {cache.entry([sources[0]])}: it is kept"):
            cache.get([sources[0]])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert cache.read == 300 and "cannot be read" not in capsys.readouterr().out
    assert all(arrays["image"][[0, -1]].tolist() == [i % 251] * 2 for i, arrays in enumerate(back))
    assert len(list((tmp_path / "cache").glob("*.arrays"))) == 300
    assert str(cache.entry([sources[-1]])) in _mapped_files()


def test_the_disk_cache_builds_once_and_rebuilds_exactly_what_changed(tmp_path, capsys, monkeypatch):
    """Second run: nothing prepared, every entry read; a touched source rebuilds its entry alone; other settings
    rebuild everything; a damaged entry and an entry half written by a killed run are rebuilt; arrays equal the
    preparation's, in parallel too; an unusable source is skipped and tried again next run."""
    import os

    from data_cleaning import DiskCache, prepare_cached

    monkeypatch.setattr(DiskCache, "MMAP_BYTES", 0)  # every array memory-mapped, however small

    sources = []
    for i in range(6):
        sources.append(tmp_path / "data" / f"{i}.txt")
        sources[-1].parent.mkdir(exist_ok=True)
        sources[-1].write_text("bad" if i == 5 else str(i))
    folder = tmp_path / "cache"

    def run(settings=None, workers=1):
        cache = DiskCache(folder, settings or {"size": 2}, ("image", "label"))
        skipped = Skipped("file")
        prepared = prepare_cached(sources, lambda s: [s], _prepare_square, cache, skipped, workers=workers)
        return cache, skipped, prepared

    cache, skipped, prepared = run(workers=2)  # in 2 forked processes
    assert (cache.built, cache.read, skipped.counts["unreadable"]) == (5, 0, 1)
    for source, arrays in prepared:
        expected = _prepare_square(source)
        assert all(np.array_equal(arrays[name], expected[name]) for name in expected)
    cache, _, again = run()
    assert (cache.built, cache.read) == (0, 5) and [s for s, _ in again] == [s for s, _ in prepared]
    assert str(cache.entry([sources[0]])) in _mapped_files()  # read, not decoded: memory-mapped
    again[0][1]["image"][0, 0] = 7  # copy-on-write: this process's copy changes, the entry on disk does not
    assert np.array_equal(run()[2][0][1]["image"], _prepare_square(sources[0])["image"])
    os.utime(sources[2], ns=(0, sources[2].stat().st_mtime_ns + 10**9))  # touched: only its entry is redone
    assert run()[0].built == 1
    assert run({"size": 3})[0].built == 5  # another setting: every entry built anew, the old ones never read
    entry = cache.entry([sources[1]])
    entry.write_bytes(b"\x93NUMPY garbage")  # damaged
    half = cache.entry([sources[4]])
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])  # cut short: its label missing
    sources[3].write_text("3")  # same content, new time: rebuilt
    capsys.readouterr()
    cache, _, prepared = run()
    assert cache.built == 3 and not list(folder.rglob("*.partial"))
    assert len(list(folder.rglob("*.arrays"))) == 5 + 2 + 5  # one file per entry: size 2 (the 2 touched files
    # have a new entry each; their old ones stay until the cache is cleared) and size 3
    assert f"Cache entry {entry} of {sources[1]} cannot be read" in capsys.readouterr().out
    assert np.array_equal(dict(prepared)[sources[1]]["image"], np.full((2, 2), 1))
    sources[5].write_text("5")  # the bad file repaired: taken now
    cache, skipped, prepared = run()
    assert (cache.built, len(prepared), skipped.counts.total()) == (1, 6, 0)


def test_a_cache_entry_gives_back_each_array_as_written_and_a_damaged_index_is_rebuilt(tmp_path, capsys, monkeypatch):
    """Every kind of array the scripts keep comes back equal, with its dtype and shape (0-d, empty, bool, a strided
    view, one large enough to be memory-mapped, and the same where the system refuses the mapping); an entry whose
    index is not the expected one, or is garbage, is rebuilt with one line."""
    from data_cleaning import DiskCache

    source = tmp_path / "frame.tif"
    source.write_bytes(b"pixels")
    big = np.arange(40_000, dtype=np.float32).reshape(100, 400)
    arrays = {"big": big[:, ::2], "scalar": np.array(7, np.int64), "empty": np.zeros((0, 4)), "flags": big[0] > 5}
    cache = DiskCache(tmp_path / "cache", {"size": 1}, tuple(arrays))
    cache.put([source], arrays)
    back = DiskCache(tmp_path / "cache", {"size": 1}, tuple(arrays)).get([source])
    scalar = back["scalar"]
    while isinstance(scalar, np.ndarray):  # to the memory under the views: the small arrays are read, not mapped
        scalar = scalar.base
    assert str(cache.entry([source])) in _mapped_files() and isinstance(memoryview(scalar).obj, bytearray)
    refused = []

    def refuse(*args, **kwargs):
        refused.append(1)
        raise RuntimeError("no private file mappings here")

    monkeypatch.setattr("data_cleaning.torch.from_file", refuse)
    unmapped = cache.get([source])  # a system that refuses the mapping: read into memory instead
    assert refused == [1] and unmapped is not None
    for name, array in arrays.items():
        for got in (back[name], unmapped[name]):
            assert got.dtype == array.dtype and got.shape == array.shape
            assert np.array_equal(got, array) and got.flags.writeable
    renamed = DiskCache(tmp_path / "cache", {"size": 1}, ("big", "scalar"))  # the script's arrays changed
    assert renamed.get([source]) is None and "cannot be read (holds ['big', 'scalar', 'empty', 'flags']" in \
        capsys.readouterr().out  # fmt: skip
    cache.put([source], arrays)
    entry = cache.entry([source])
    entry.write_bytes((3).to_bytes(8, "little") + b"[1]")  # an index that parses but is not one
    assert cache.get([source]) is None and f"Cache entry {entry} of {source} cannot be read" in capsys.readouterr().out
    assert not entry.exists()


def test_the_3d_prediction_loop_lists_its_skips_and_a_file_in_place_of_its_folder_is_one_output_problem(tmp_path):
    """segment_cts (COVID and pleural): every skipped input in predictions/skipped.csv beside predictions.csv; a
    plain file where predictions/ should be is one OutputError naming it, before any CT is read."""
    from checkpoints import OutputError
    from data_cleaning import segment_cts

    text = tmp_path / "notes.nii.gz"
    text.write_text("not a NIfTI")
    skipped = Skipped("file", print_limit=0)
    rows = segment_cts([text], lambda img, path: None, lambda path: "x.nii.gz", tmp_path / "out", "ml", skipped)
    assert rows == [] and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["predictions.csv", "skipped.csv"]
    listed = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert listed["file"].tolist() == [str(text)] and len(listed) == 1
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(OutputError, match=r"taken is a file, where the folder .*taken/predictions is needed"):
        segment_cts([text], lambda img, path: None, lambda path: "x.nii.gz", tmp_path / "taken" / "predictions", "ml",
                    Skipped("file"))  # fmt: skip
