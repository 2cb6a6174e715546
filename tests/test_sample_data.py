"""sample_data.py: which folder a script gets (real or synthetic), and how the stand-ins are written.

The content of each stand-in is checked with the real readers in test_sample_2d.py and test_sample_3d.py.
"""

import pytest

import sample_data

NAME = "MontgomerySet"


@pytest.fixture
def counting_writer(monkeypatch):
    """Replace one dataset's writer with a fast one that records its calls."""
    calls = []

    def writer(out, rng):
        calls.append(out)
        (out / "CXR_png").mkdir()
        (out / "CXR_png" / "MCUCXR_0001_0.png").write_bytes(bytes(rng.integers(0, 255, 16, dtype="uint8")))

    monkeypatch.setitem(sample_data.WRITERS, NAME, writer)
    return calls


def test_real_dataset_is_preferred_and_named(tmp_path, capsys, counting_writer):
    (tmp_path / NAME / "CXR_png").mkdir(parents=True)
    assert sample_data.find_dataset(NAME, tmp_path) == (tmp_path / NAME, False)  # the real one: not synthetic
    assert f"Using the real dataset in {tmp_path / NAME}" in capsys.readouterr().out
    assert not counting_writer and not (tmp_path / "sample").exists()


@pytest.mark.parametrize("make_empty_folder", [False, True])
def test_missing_or_empty_dataset_falls_back_to_the_sample(tmp_path, capsys, counting_writer, make_empty_folder):
    if make_empty_folder:
        (tmp_path / NAME).mkdir()
    path, synthetic = sample_data.find_dataset(NAME, tmp_path)
    assert path == tmp_path / "sample" / NAME and synthetic
    assert (path / "CXR_png" / "MCUCXR_0001_0.png").is_file()
    assert "SYNTHETIC sample" in capsys.readouterr().out
    # A second call reuses what is there rather than writing it again.
    assert sample_data.find_dataset(NAME, tmp_path) == (path, True)
    assert len(counting_writer) == 1


def test_overwrite_writes_again_and_seed_changes_content(tmp_path, counting_writer):
    path = sample_data.write_dataset(NAME, tmp_path, seed=0)
    first = (path / "CXR_png" / "MCUCXR_0001_0.png").read_bytes()
    sample_data.write_dataset(NAME, tmp_path, seed=0, overwrite=True)
    assert (path / "CXR_png" / "MCUCXR_0001_0.png").read_bytes() == first
    sample_data.write_dataset(NAME, tmp_path, seed=1, overwrite=True)
    assert (path / "CXR_png" / "MCUCXR_0001_0.png").read_bytes() != first
    assert len(counting_writer) == 3


def test_an_interrupted_write_leaves_no_dataset_behind(tmp_path, monkeypatch):
    def failing_writer(out, rng):
        (out / "CXR_png").mkdir()
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C half way

    monkeypatch.setitem(sample_data.WRITERS, NAME, failing_writer)
    with pytest.raises(KeyboardInterrupt):
        sample_data.write_dataset(NAME, tmp_path)
    assert not (tmp_path / NAME).exists()  # a later run will not mistake the half-written folder for data


def test_unknown_dataset_is_refused_with_the_known_names():
    with pytest.raises(ValueError, match="expected one of COVID-19-20_v2, ultrasound-nerve-segmentation"):
        sample_data.write_dataset("Montgomery", "unused")


def test_all_five_stand_ins_are_written_small(sample_root):
    # The session's tests also run scripts with data_dir=sample_root: their disk cache lands in cache/ beside the
    # datasets, as it does beside a user's downloads. It is theirs, not the sample's.
    datasets = [p for p in sample_root.iterdir() if p.name != "cache"]
    assert sorted(p.name for p in datasets) == sorted(sample_data.WRITERS)
    files = [f for folder in datasets for f in folder.rglob("*") if f.is_file()]
    megabytes = sum(f.stat().st_size for f in files) / 2**20
    assert megabytes < 100, f"the sample data takes {megabytes:.0f} MB"
    assert not list(sample_root.glob(".*partial"))


@pytest.mark.parametrize("name", list(sample_data.WRITERS))
def test_same_seed_writes_the_same_bytes_and_another_seed_other_content(name, sample_root, tmp_path):
    def files(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    reference = files(sample_root / name)  # written with the default seed
    assert files(sample_data.write_dataset(name, tmp_path / "again")) == reference
    other = files(sample_data.write_dataset(name, tmp_path / "other", seed=1))
    changed = [path for path, content in reference.items() if other.get(path) != content]
    assert len(changed) > 0.8 * len(reference), f"only {len(changed)} of {len(reference)} files change with the seed"
