"""`--set key=value` is typed as the notebook's parameters cell declares the parameter: YAML 1.1
would make `judge=no` or `judge=off` a bool, and `policy=1.0` a float, for `str` parameters.

No kernel starts here: plan_run checks a run and types its parameters without running anything
(the end-to-end case, `--set judge=no` reaching a notebook as "no", is in tests/test_sweep.py).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import yaml

from starling_lib.pipeline import PipelineError, SetText, parse_set, plan_run, typed_setting


@pytest.mark.parametrize("text, annotation, expected", [
    ("no", "str", "no"), ("off", "str", "off"), ("yes", "str", "yes"), ("on", "str", "on"),
    ("1.0", "str", "1.0"), ("10", "str", "10"), ("null", "str", "null"), ("[a, b]", "str", "[a, b]"),
    ("a: b: c", "str", "a: b: c"), ("", "str", ""), ("gpt-4", "str", "gpt-4"),
    ("no", "str | None", "no"), ("null", "str | None", None), ("x", "Optional[str]", "x"),
    ("10", "int", 10), ("1e-5", "float", 1e-5), ("2", "float", 2), ("no", "bool", False), ("true", "bool", True),
    ("10", None, 10), ("no", None, False), ("cpu", None, "cpu"),   # undeclared type: plain YAML
])
def test_typed_setting(text, annotation, expected):
    value = typed_setting(text, annotation)
    assert value == expected and type(value) is type(expected)


def _notebook(folder: Path, stem: str, params: str) -> Path:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell('run_dir: str = ""\n' + params)
    cell.metadata["tags"] = ["parameters"]
    nb.cells = [cell]
    path = folder / f"{stem}.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.fixture
def config(tmp_path) -> Path:
    a = _notebook(tmp_path, "10_a", 'judge: str = "local"\nsteps: int = 3\nmixed_precision: str = "auto"\n'
                                    'label: str | None = None\n')
    b = _notebook(tmp_path, "20_b", "judge: int = 0\n")  # the same name, another type
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"parameters": {"judge": "local"}, "notebooks": [
        {"path": str(a), "parameters": {"mixed_precision": "auto"}}, str(b)]}))
    return path


def test_set_values_take_the_declared_type(config, tmp_path):
    overrides = parse_set(["judge=no", "steps=10", "mixed_precision=off", "label=null"])
    assert all(isinstance(v, SetText) for v in overrides.values())
    plan = plan_run(config, tmp_path / "run", only=["10"], overrides=overrides)
    (entry, params), = plan.steps
    assert params == {"judge": "no", "steps": 10, "mixed_precision": "off", "label": None,
                      "run_dir": str(tmp_path / "run")}
    # recorded typed in config.yaml and summary.json (no SetText left to dump)
    assert plan.config.overrides == {"judge": "no", "steps": 10, "mixed_precision": "off", "label": None}
    dumped = yaml.safe_load(yaml.safe_dump(plan.config.as_dict()))
    assert dumped["parameters"]["judge"] == "no" and dumped["notebooks"][0]["parameters"]["mixed_precision"] == "off"
    assert not (tmp_path / "run").exists()  # planning writes nothing


def test_each_notebook_types_the_same_text_its_own_way(config, tmp_path):
    plan = plan_run(config, tmp_path / "run", overrides=parse_set(["judge=7"]))
    assert [params["judge"] for _, params in plan.steps] == ["7", 7]


def test_text_that_fits_no_declared_type_is_refused(config, tmp_path):
    with pytest.raises(PipelineError, match=r"'steps' is declared `int` but is given 'ten'"):
        plan_run(config, tmp_path / "run", only=["10"], overrides=parse_set(["steps=ten"]))
    with pytest.raises(PipelineError, match=r"20_b.*'judge' is declared `int` but is given False"):
        plan_run(config, tmp_path / "run", overrides=parse_set(["judge=no"]))


def test_python_overrides_are_taken_as_given(config, tmp_path):
    plan = plan_run(config, tmp_path / "run", only=["10"], overrides={"judge": "no", "steps": 4})
    assert plan.steps[0][1]["judge"] == "no" and plan.steps[0][1]["steps"] == 4
    with pytest.raises(PipelineError, match="declared `str` but is given False"):
        plan_run(config, tmp_path / "run", only=["10"], overrides={"judge": False})
