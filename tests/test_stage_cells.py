"""The shape all five scripts share (HOUSE_STYLE.md): stage cells that each end with a short guarded call leaving
their result under the same name, importing a script runs nothing, a configuration whose defaults are the full
recipe with the quick run as one dict of overrides, the same stage names, and no long function."""

import ast
import dataclasses
import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [
    "lung_xray_unet",
    "nerve_ultrasound_segmentation",
    "pneumonia_detection",
    "covid_ct_segmentation",
    "pleural_effusion_3d",
]
# Each stage cell's guarded call leaves this name at top level.
LEAVES = {"Configuration": "cfg", "Data": "data", "Transforms": "batch", "Model and loss": "model",
          "Train": "history", "Evaluate": "per_case", "Predict": "predictions"}  # fmt: skip
STAGE_FUNCTIONS = ("load_data", "build_transforms", "build_model", "train_one_epoch", "evaluate", "fit")
MAX_FUNCTION_LINES = 60


def cells(script: str) -> dict[str, str]:
    """{cell title: its source} of a script's `# %% Title` cells."""
    source = (REPO_ROOT / f"{script}.py").read_text()
    parts = re.split(r"^# %% (.+)$", source, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def main_guards(source: str) -> list[ast.If]:
    return [
        node
        for node in ast.parse(source).body
        if isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'"
    ]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_stage_cell_ends_with_a_short_guarded_call_leaving_its_result(script):
    found = cells(script)
    assert list(found)[:2] == ["Imports", "Configuration"] and list(found)[-1] == "Summary", list(found)
    for title, name in LEAVES.items():
        assert title in found, (script, title)
        guards = main_guards(found[title])
        assert len(guards) == 1, (script, title)  # one guarded call per cell, at its end
        assert ast.parse(found[title]).body[-1].lineno == guards[0].lineno, (script, title)  # the cell's last
        assigned = {t.id for node in guards[0].body if isinstance(node, ast.Assign) for t in node.targets
                    if isinstance(t, ast.Name)}  # fmt: skip
        assert name in assigned or (title == "Configuration" and "\ncfg = Config()\n" in found[title]), (title, name)
    for title, source in found.items():
        for guard in main_guards(source):
            statements = [node for node in guard.body if not is_predict_only_switch(node)]
            assert len(statements) <= 3, (script, title)  # the cell's call, a picture, a line: machinery elsewhere
    data_guard = main_guards(found["Data"])[0]
    assert "load_data(cfg)" in ast.unparse(data_guard)


def is_predict_only_switch(node: ast.stmt) -> bool:
    """`if PREDICT: predict_only(__file__)`, the configuration cell's switch to the Predict cell alone."""
    return ast.unparse(node) == "if PREDICT:\n    predict_only(__file__)"


@pytest.mark.parametrize("script", SCRIPTS)
def test_predict_cell_needs_only_imports_and_configuration(script):
    found = cells(script)
    assert list(found)[-2:] == ["Predict", "Summary"], list(found)
    guard = main_guards(found["Predict"])[0]
    assert ast.unparse(guard.body[0]) == "predictions = predict(cfg, cfg.predict_inputs)"
    config_guard = main_guards(found["Configuration"])[0]
    assert is_predict_only_switch(config_guard.body[-1])  # PREDICT=<folder> python script.py: no training


@pytest.mark.parametrize("script", SCRIPTS)
def test_importing_a_script_runs_nothing(script, load_script, capsys):
    module = load_script(script)
    assert capsys.readouterr().out == ""  # no dataset looked for, nothing trained, nothing said
    for name in LEAVES.values():
        assert name == "cfg" or not hasattr(module, name), name


@pytest.mark.parametrize("script", SCRIPTS)
def test_stage_names_and_no_function_longer_than_60_lines(script):
    source = (REPO_ROOT / f"{script}.py").read_text()
    tree = ast.parse(source)
    functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    names = {node.name for node in functions}
    for name in (*STAGE_FUNCTIONS, "evaluate_best"):
        assert name in names, (script, name)  # at top level, or a Trainer/Inferencer method (lung)
    assert "main" not in names  # the cells are the one list of the stages
    long = {f.name: f.end_lineno - f.lineno + 1 for f in functions if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES}
    assert not long, (script, long)
    assert "def seed_everything" not in source  # one seeding helper, in checkpoints.py


@pytest.mark.parametrize("script", SCRIPTS)
def test_config_defaults_are_the_full_recipe_and_the_quick_run_one_dict(script, load_script, monkeypatch):
    source = (REPO_ROOT / f"{script}.py").read_text()
    assert " if QUICK else " not in source and "QUICK_RUN: ClassVar[dict] = dict(" in source
    full = load_script(script, quick=False)
    quick_defaults = dataclasses.asdict(full.Config(quick=True))
    overrides = full.Config.QUICK_RUN
    assert overrides and all(quick_defaults[name] == value for name, value in overrides.items())
    assert dataclasses.asdict(full.Config(quick=False)) == dataclasses.asdict(full.cfg)
    assert any(dataclasses.asdict(full.cfg)[name] != value for name, value in overrides.items())
    quick = load_script(script, quick=True)  # QUICK=1 in the environment: the same settings
    assert dataclasses.asdict(quick.cfg) == quick_defaults
    first = next(iter(overrides))  # a setting given explicitly wins over the quick run's
    assert getattr(full.Config(quick=True, **{first: full.cfg.__dict__[first]}), first) == full.cfg.__dict__[first]
    assert isinstance(full.Config(output_dir="elsewhere").output_dir, Path)  # paths as text are paths


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "pneumonia_detection"])
def test_segmentation_scripts_threshold_with_cfg_threshold(script, load_script):
    module = load_script(script)
    assert 0 < module.cfg.threshold < 1
    source = (REPO_ROOT / f"{script}.py").read_text()
    assert "cfg.threshold" in source


@pytest.mark.parametrize("module", sorted(path.stem for path in REPO_ROOT.glob("*.py")))
def test_no_function_of_the_repository_longer_than_60_lines(module):
    tree = ast.parse((REPO_ROOT / f"{module}.py").read_text())
    functions = [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    long = {f.name: f.end_lineno - f.lineno + 1 for f in functions if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES}
    assert not long, (module, long)


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_is_one_environment_switch_away(script, load_script, monkeypatch):
    """RESUME=1 python script.py goes on from last_checkpoint.pt without editing the script: checkpoints reads the
    switch once (tested from the command line for lung), and every script's Config takes it as resume's default."""
    import checkpoints

    assert load_script(script).cfg.resume is checkpoints.RESUME is False  # the tests run without RESUME=1
    monkeypatch.setattr(checkpoints, "RESUME", True)
    assert load_script(script).cfg.resume is True
    assert load_script(script).Config(resume=False).resume is False  # a setting given explicitly wins
