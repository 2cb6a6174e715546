"""A data folder that is not what the README describes: each script says, in one line and without a traceback,
what it expected where; an empty dataset folder falls back to the synthetic sample and says so."""

import subprocess
import sys

import pytest

import sample_data

# Per script: its dataset folder under data/, and words its message must contain (what it expected).
SCRIPTS = {
    "lung_xray_unet.py": ("MontgomerySet", "expected CXR_png/<name>.png"),
    "nerve_ultrasound_segmentation.py": ("ultrasound-nerve-segmentation", "expected train/<subject>_<img>.tif"),
    "pneumonia_detection.py": ("rsna-pneumonia-detection-challenge", "expected the Kaggle download unzipped"),
    "covid_ct_segmentation.py": ("COVID-19-20_v2", "expected Train/ and Validation/"),
    "pleural_effusion_3d.py": ("pleural_effusion", "expected NSCLC-Radiomics/LUNG1-xxx/<study>/<series>/*.dcm"),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_wrong_data_folder_is_one_line_naming_what_was_expected_where(script, repo_copy, tmp_path):
    folder, expected = SCRIPTS[script]
    repo = repo_copy(script)
    wrong = repo / "data" / folder
    (wrong / "download").mkdir(parents=True)  # unzipped one level too deep: a common slip
    (wrong / "download" / "readme.txt").write_text("the files are one folder further down")
    env = {"PATH": "", "QUICK": "1", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, script], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"Using the real dataset in {wrong}" in result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Data problem: ") and str(wrong) in lines[0], lines
    assert expected in lines[0]


def test_an_empty_dataset_folder_falls_back_to_the_sample_and_says_so(tmp_path, capsys):
    (tmp_path / "MontgomerySet").mkdir()
    found, synthetic = sample_data.find_dataset("MontgomerySet", tmp_path)
    assert synthetic and found == tmp_path / "sample" / "MontgomerySet" and any(found.iterdir())
    assert f"{tmp_path / 'MontgomerySet'} is empty: using the SYNTHETIC sample in {found}" in capsys.readouterr().out


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "lung_xray_unet.py"])  # lung: its own test file
def test_a_file_in_place_of_the_output_folder_is_one_line_and_the_file_is_kept(
    script, repo_copy, sample_root, tmp_path
):
    """A plain file where output/ should be: the Data stage's first write (skipped.csv and the like) ends the run
    with one `Output problem:` line naming the file, exit status 1, no traceback, the file untouched, nothing
    trained."""
    folder, _ = SCRIPTS[script]
    repo = repo_copy(script, {f"sample/{folder}": sample_root / folder})
    in_the_way = repo / "output"
    in_the_way.write_text("keep me")
    env = {"PATH": "", "QUICK": "1", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, script], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    needed = in_the_way / script.removesuffix(".py")
    assert result.stderr.strip().splitlines() == [
        f"Output problem: {in_the_way} is a file, where the folder {needed} is needed: move the file away, or choose "
        "another output_dir"
    ]
    assert in_the_way.read_text() == "keep me" and "\nepoch " not in result.stdout
