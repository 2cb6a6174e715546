"""Every pipeline as a user of Jupyter or VS Code meets it: the README's command turns it into a notebook, and the
notebook runs cell by cell in a real kernel (jupytext reads the `# %%` cells, nbclient runs them) with QUICK=1 and
the configuration edited inline, in a fresh copy of the repository whose data/ holds only the synthetic sample.
After each stage cell the kernel holds that stage's result (`data`, `batch`, `model`, `history`, `per_case`); an
inline `cfg = Config(max_epochs=1)` and the Train cell run again give a history of one epoch."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Per script: the dataset folder it reads, the settings that make the quick run a few seconds long (typed inline as
# `cfg = Config(...)` below the configuration cell, as a user does), and the files it must write to output/<script>/.
COMMON = ["best_model.pt", "last_checkpoint.pt", "history.csv", "batch.png"]
PIPELINES = {
    "lung_xray_unet": (
        "MontgomerySet",
        {"max_epochs": 2},
        COMMON + ["dice_per_epoch.png", "test_per_case.csv", "test_predictions.png", "predictions"],
    ),
    "nerve_ultrasound_segmentation": (
        "ultrasound-nerve-segmentation",
        {"max_epochs": 2},
        COMMON + ["dice_per_epoch.png", "val_per_case.csv", "test_per_case.csv", "val_predictions.png", "predictions"],
    ),
    "covid_ct_segmentation": (
        "COVID-19-20_v2",
        {"max_epochs": 2, "pixdim": (6.0, 6.0, 6.0), "features": (4, 4, 8, 8, 16, 4), "num_samples": 2, "examples": 1},
        COMMON + ["dice_per_epoch.png", "val_per_case.csv", "test_per_case.csv", "val_predictions.png", "predictions"],
    ),
    "pneumonia_detection": (
        "rsna-pneumonia-detection-challenge",
        {"max_epochs": 2, "max_steps_per_epoch": 2, "patients_per_class": 3, "image_size": 64, "examples": 2},
        COMMON + ["rsna_metric_per_epoch.png", "val_per_case.csv", "test_per_case.csv", "val_predictions.png",
                  "predictions"],
    ),
    "pleural_effusion_3d": (
        "pleural_effusion",
        {"max_epochs": 2, "max_cases": 3, "roi_size": (16, 16, 8), "channels": (4, 8), "strides": (2,),
         "samples_per_volume": 1, "val_interval": 1},
        COMMON + ["dice_per_epoch.png", "val_per_case.csv", "test_per_case.csv", "val_predictions.png",
                  "val_predictions", "predictions"],
    ),
}  # fmt: skip
STAGES = {"Data": "data", "Transforms": "batch", "Model and loss": "model", "Train": "history", "Evaluate": "per_case"}
CELLS = ["Imports", "Configuration", *STAGES, "Predict", "Summary"]


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
        assert titles[1:] == [title for title in CELLS if title in titles], (script, titles)
        assert set(STAGES) <= set(titles), (script, titles)


def probe(after: str) -> str:
    """A cell that prints which stage results the kernel holds, as JSON: run after the cell titled `after`."""
    names = ["cfg", *STAGES.values()]
    return f"import json as _json\nprint('HOLDS {after}:', _json.dumps([n for n in {names!r} if n in globals()]))"


def config_edit(settings: dict) -> str:
    return "cfg = Config(" + ", ".join(f"{key}={value!r}" for key, value in settings.items()) + ")"


@pytest.mark.parametrize("script", PIPELINES)
def test_script_runs_as_a_notebook_cell_by_cell(script, sample_root, tmp_path, monkeypatch, repo_copy):
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    dataset, settings, outputs = PIPELINES[script]
    repo = repo_copy(f"{script}.py", {f"sample/{dataset}": sample_root / dataset})

    notebook = jupytext.read(repo / f"{script}.py")
    source = "\n".join(cell.source for cell in notebook.cells)
    code = [line.split("#", 1)[0] for line in source.splitlines()]
    uses = [line.strip() for line in code if "__file__" in line]  # the ROOT line, guarded for a kernel, and the
    # PREDICT switch, which a kernel never takes (nobody sets PREDICT there)
    assert all('if "__file__" in globals() else' in line or line == "predict_only(__file__)" for line in uses), uses
    assert not re.search(r"\bargparse\b|sys\.argv|input\(", source)  # nothing a kernel cannot give
    cells, titles = [], {}
    for cell in notebook.cells:
        cells.append(cell)
        title = cell.metadata.get("title")
        if title == "Configuration":
            assert "\ncfg = Config()\n" in cell.source
            cells.append(jupytext.reads(config_edit(settings), fmt="py:percent").cells[0])  # the user's edit
        if title in ("Configuration", *STAGES):
            titles[title] = cell
            cells.append(jupytext.reads(probe(title), fmt="py:percent").cells[0])
    # Then the user edits the configuration again and runs the Train cell once more: it takes the new value.
    for extra in (config_edit(settings | {"max_epochs": 1}), titles["Train"].source, "print('EPOCHS', len(history))"):
        cells.append(jupytext.reads(extra, fmt="py:percent").cells[0])
    notebook.cells = cells
    monkeypatch.setenv("QUICK", "1")  # the kernel inherits this process's environment
    for name in ("DATA_DIR", "OUTPUT_DIR", "IMAGES_DIR"):
        monkeypatch.delenv(name, raising=False)
    # The kernel starts in the repository copy, as a notebook opened there does (no __file__ in a kernel).
    nbclient.NotebookClient(notebook, timeout=600, resources={"metadata": {"path": str(repo)}}).execute()

    printed = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    holds = {title: json.loads(names) for title, names in re.findall(r"HOLDS ([^:]+): (\[.*\])", printed)}
    expected = ["cfg"]
    for title, name in [("Configuration", None), *STAGES.items()]:
        expected += [name] if name else []
        assert holds[title] == expected, (title, holds)
    assert "EPOCHS 1" in printed  # the second run of the Train cell took max_epochs=1
    pictures = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(pictures) >= 3  # the batch, the metric per epoch and the predictions, drawn inline
    assert f"using the SYNTHETIC sample in {repo / 'data' / 'sample' / dataset}" in printed
    summary = printed[printed.index("\nSummary (") :]
    assert "QUICK run" in summary and "data:    SYNTHETIC sample" in summary
    assert f"outputs: {repo / 'output' / script}/" in summary
    # Running the Train cell again is a fresh run: the first run's outputs, evaluation and predictions included,
    # were moved whole to previous/<time>/, so that the 1-epoch try replaced nothing.
    out = repo / "output" / script
    (earlier,) = (out / "previous").iterdir()
    assert f"An earlier run's outputs in {out} were moved to {earlier}" in printed
    for name in outputs:
        assert (earlier / name).exists(), name
    assert torch.load(earlier / "best_model.pt", weights_only=True)["config"]["max_epochs"] != 1
    assert len(pd.read_csv(out / "history.csv")) == 1  # the 1-epoch run's own
    pictures = re.findall(r"picture: (\S+)", summary)
    assert pictures and all(Path(p).parent == repo / "Images" and Path(p).is_file() for p in pictures)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"]  # nothing written outside the repository

    # A fresh kernel, as a user who trained yesterday opens it: Imports, Configuration and Predict, nothing else.
    # The configuration is the plain quick one (not the settings trained with): the checkpoint's settings apply.
    fresh = [cell for cell in jupytext.read(repo / f"{script}.py").cells
             if cell.metadata.get("title") in ("Imports", "Configuration", "Predict")]  # fmt: skip
    check = "print('PREDICTED', len(predictions), all(p.is_file() for p in predictions), sorted(globals().keys() & "
    check += f"{list(STAGES.values())!r}))"
    notebook.cells = fresh + [jupytext.reads(check, fmt="py:percent").cells[0]]
    nbclient.NotebookClient(notebook, timeout=600, resources={"metadata": {"path": str(repo)}}).execute()
    printed = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert f"Predicting with {repo / 'output' / script / 'best_model.pt'}" in printed, printed
    count, all_files, stages = re.search(r"PREDICTED (\d+) (True|False) (\[.*\])", printed).groups()
    assert int(count) > 0 and all_files == "True" and stages == "[]", printed  # written, and no stage ran
    assert (repo / "output" / script / "predictions").is_dir()
