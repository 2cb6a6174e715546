"""Every pipeline as a user of Jupyter or VS Code meets it: the README's command turns it into a notebook, and the
notebook runs cell by cell in a real kernel (jupytext reads the `# %%` cells, nbclient runs them) with QUICK=1 and
the configuration edited inline, in a fresh copy of the repository whose data/ holds only the synthetic sample."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Per script: the dataset folder it reads, the inline edit that makes the quick run a few seconds long (as a user
# types it in a cell below the configuration cell), and the files it must write to output/<script>/.
PIPELINES = {
    "lung_xray_unet": (
        "MontgomerySet",
        "cfg = Config(max_epochs=2)",
        ["best_model.pt", "history.csv", "dice_per_epoch.png", "test_predictions.png", "test_dice.csv"],
    ),
    "nerve_ultrasound_segmentation": (
        "ultrasound-nerve-segmentation",
        "cfg = Config(max_epochs=2)",
        ["2D_Nerve_Segmentation.pt", "history.csv", "dice_per_epoch.png", "val_predictions.png", "submission.csv"],
    ),
    "covid_ct_segmentation": (
        "COVID-19-20_v2",
        "cfg = Config(max_epochs=1, pixdim=(6.0, 6.0, 6.0), features=(4, 4, 8, 8, 16, 4), num_samples=2, examples=1)",
        ["best_model.pt", "history.csv", "dice_per_epoch.png", "val_dice_per_case.csv", "val_predictions.png"],
    ),
    "pneumonia_detection": (
        "rsna-pneumonia-detection-challenge",
        "cfg = Config(max_epochs=1, max_steps_per_epoch=2, patients_per_class=3, image_size=64, examples=2)",
        ["Pneumonia_detection.pt", "history.csv", "rsna_metric_per_epoch.png", "val_predictions.png", "submission.csv"],
    ),
    "pleural_effusion_3d": (
        "pleural_effusion",
        "cfg = Config(max_epochs=1, max_cases=3, roi_size=(16, 16, 8), channels=(4, 8), strides=(2,), "
        "samples_per_volume=1)",
        ["best_model.pt", "history.csv", "dice_per_epoch.png", "val_cases.csv", "val_predictions.png"],
    ),
}


def notebook_command() -> list[str]:
    """The README's command that turns the scripts into notebooks."""
    readme = (REPO_ROOT / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("python -m jupytext --to ipynb "))
    return line.split()


def test_readme_notebook_command_names_every_pipeline_and_writes_notebooks(tmp_path):
    pytest.importorskip("jupytext")
    command = notebook_command()
    scripts = command[5:]
    assert set(PIPELINES) <= {Path(s).stem for s in scripts}
    for script in scripts:
        assert (REPO_ROOT / script).is_file(), script
        shutil.copy(REPO_ROOT / script, tmp_path / script)
    result = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    import nbformat

    for script in scripts:
        notebook = nbformat.read(tmp_path / script.replace(".py", ".ipynb"), as_version=4)
        titles = [cell.metadata.get("title") for cell in notebook.cells if cell.cell_type == "code"]
        assert titles[0] is None  # the docstring: what the script does, where the data goes, how to run it
        assert titles[1:3] == ["Imports", "Configuration"] and titles[-1] == "Run", (script, titles)


@pytest.mark.parametrize("script", PIPELINES)
def test_script_runs_as_a_notebook(script, sample_root, tmp_path, monkeypatch, repo_copy):
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    dataset, edit, outputs = PIPELINES[script]
    repo = repo_copy(f"{script}.py", {f"sample/{dataset}": sample_root / dataset})

    notebook = jupytext.read(repo / f"{script}.py")
    source = "\n".join(cell.source for cell in notebook.cells)
    code = [line.split("#", 1)[0] for line in source.splitlines()]
    uses = [line for line in code if "__file__" in line]  # only the ROOT line, guarded for a kernel
    assert all('if "__file__" in globals() else' in line for line in uses), uses
    assert not re.search(r"\bargparse\b|sys\.argv|input\(", source)  # nothing a kernel cannot give
    config = next(i for i, cell in enumerate(notebook.cells) if cell.metadata.get("title") == "Configuration")
    assert "\ncfg = Config()" in notebook.cells[config].source
    notebook.cells.insert(config + 1, jupytext.reads(edit, fmt="py:percent").cells[0])
    monkeypatch.setenv("QUICK", "1")  # the kernel inherits this process's environment
    for name in ("DATA_DIR", "OUTPUT_DIR", "IMAGES_DIR"):
        monkeypatch.delenv(name, raising=False)
    # The kernel starts in the repository copy, as a notebook opened there does (no __file__ in a kernel).
    nbclient.NotebookClient(notebook, timeout=600, resources={"metadata": {"path": str(repo)}}).execute()

    printed = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert f"using the SYNTHETIC sample in {repo / 'data' / 'sample' / dataset}" in printed
    summary = printed[printed.index("\nSummary (") :]
    assert "QUICK run" in summary and "data:    SYNTHETIC sample" in summary
    assert f"outputs: {repo / 'output' / script}/" in summary
    for name in outputs:
        assert (repo / "output" / script / name).is_file(), name
    pictures = re.findall(r"picture: (\S+)", summary)
    assert pictures and all(Path(p).parent == repo / "Images" and Path(p).is_file() for p in pictures)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # nothing written outside the repository
