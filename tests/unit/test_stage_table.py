"""The stage table is the one truth about the stages: dvc.yaml declares exactly what it
declares, its wiring holds together, and the layers above it import in one direction."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pipeline import stages

REPO = Path(__file__).resolve().parents[2]
DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _entries(entries: list | None) -> dict[str, dict]:
    """dvc.yaml's paths in a deps/outs/metrics/plots list, each with its options (cache, template...)."""
    found = {}
    for e in entries or []:
        path = next(iter(e)) if isinstance(e, dict) else e
        found[path] = (e[path] or {}) if isinstance(e, dict) else {}
    return found


def _declared(entries: list | None) -> set[str]:
    return set(_entries(entries))


def _cached(entries: list | None, cached: bool) -> set[str]:
    return {p for p, options in _entries(entries).items() if options.get("cache", True) == cached}


def _paths(names: tuple[str, ...]) -> set[str]:
    return {"${data.raw}" if n == stages.RAW else stages.CATALOG[n] for n in names}


def test_dvc_yaml_has_exactly_the_tables_stages_in_its_order():
    assert list(DVC) == [s.name for s in stages.DVC_STAGES]


@pytest.mark.parametrize("stage", stages.DVC_STAGES, ids=lambda s: s.name)
def test_dvc_yaml_declares_what_the_table_declares(stage):
    assert stage.name in DVC, f"dvc.yaml has no stage {stage.name}: add it with cmd `d2d stage {stage.name}`"
    entry = DVC[stage.name]
    assert entry["cmd"] == f"d2d stage {stage.name}"
    assert _declared(entry.get("deps")) == _paths(stage.reads) | set(stage.code)
    assert _declared(entry.get("params")) == set(stage.params)
    assert _cached(entry.get("outs"), True) == _paths(stage.outs)
    assert _cached(entry.get("outs"), False) == _paths(stage.uncached)
    assert _declared(entry.get("metrics")) == _paths(stage.metrics)
    assert _declared(entry.get("plots")) == _paths(stage.plots)
    # metrics and plots are small files kept in Git, not in the DVC cache
    assert _cached(entry.get("metrics"), False) | _cached(entry.get("plots"), False) == _paths(stage.metrics + stage.plots)


def test_every_stage_reads_what_an_earlier_stage_wrote_and_no_file_has_two_writers():
    written: dict[str, str] = {}
    for stage in stages.STAGES:
        for name in stage.reads:
            assert name == stages.RAW or name in written, f"{stage.name} reads {name}, which no earlier stage writes"
        for name in stage.writes:
            assert name not in written, f"{name} is written by {written.get(name)} and {stage.name}"
            written[name] = stage.name
        assert stage.dvc is False or stage.report in stage.writes, f"{stage.name}'s summary file is not one of its outputs"


def test_every_code_dependency_and_the_params_sections_exist():
    from pipeline.config import Params

    sections = set(Params.model_fields) | {f.alias for f in Params.model_fields.values() if f.alias}
    for stage in stages.STAGES:
        for code in stage.code:
            assert (REPO / code).exists(), f"{stage.name}: {code} does not exist"
        # its own runner is code it depends on: editing it must make DVC run the stage again
        assert stage.run.__module__.replace(".", "/") + ".py" in stage.code or not stage.dvc, stage.name
        for section in stage.params:
            assert section.split(".")[0] in sections, f"{stage.name}: params section {section} is not in Params"


def test_a_runner_may_not_touch_a_file_its_stage_does_not_declare(tmp_path):
    from pipeline.config import load_params

    files = stages.StageFiles(stages.stage("clean"), load_params(REPO / "params.yaml"), tmp_path)
    assert files["clean"] == tmp_path / "data/clean/clean.parquet"
    with pytest.raises(KeyError, match="stage clean does not declare 'model'"):
        files["model"]


def test_an_unknown_stage_names_the_choices():
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown stage 'x'; choose one of: validate, clean, split, train, evaluate, register"):
        stages.stage("x")


# --- the layers: app → flows → pipeline, and no module reaches into another's privates ---

PACKAGES = ("app", "flows", "pipeline")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names, line) of every import in the file, at any depth (imports inside functions too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names], node.lineno))
    return found


def test_the_source_tree_was_found():
    assert {"app.cli", "flows.training", "flows.retry", "pipeline.stages", "pipeline.runners"} <= set(MODULES)


@pytest.mark.parametrize(("lower", "upper"), [("pipeline", "flows"), ("pipeline", "app"), ("flows", "app")])
def test_layers_import_in_one_direction(lower, upper):
    wrong = [f"{name}:{line} imports {module}" for name, path in MODULES.items() if name.split(".")[0] == lower
             for module, _, line in _imports(path) if module.split(".")[0] == upper]
    assert not wrong, wrong


def test_no_module_imports_another_modules_private_name():
    """`from pipeline.x import _name` (or `from pipeline import _x`) couples to what a module
    keeps to itself; what others need is public."""
    wrong = []
    tests = {str(p.relative_to(REPO).with_suffix("")).replace("/", "."): p for p in (REPO / "tests").rglob("*.py")}
    assert {"tests.conftest", "tests.unit.test_monitor", "tests.integration.test_monitor"} <= set(tests)
    for name, path in [*MODULES.items(), *tests.items()]:
        for module, names, line in _imports(path):
            if module.split(".")[0] in PACKAGES and module != name:
                wrong += [f"{path.relative_to(REPO)}:{line} imports {module}.{n}" for n in names
                          if n.startswith("_") and not n.startswith("__")]
            if module.split(".")[0] in PACKAGES and any(p.startswith("_") and not p.startswith("__") for p in module.split(".")):
                wrong.append(f"{path.relative_to(REPO)}:{line} imports the private module {module}")
        wrong += [f"{path.relative_to(REPO)}:{line} uses {used}" for used, line in _private_attributes(path, name)]
    assert not wrong, wrong


def _private_attributes(path: Path, own: str) -> list[tuple[str, int]]:
    """`module._name` where `module` is another of the project's modules, imported by name."""
    tree = ast.parse(path.read_text(), str(path))
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            bound |= {a.asname or a.name: f"{node.module}.{a.name}" for a in node.names
                      if f"{node.module}.{a.name}" in MODULES}
        elif isinstance(node, ast.Import):
            bound |= {a.asname: a.name for a in node.names if a.asname and a.name in MODULES}
    return [(f"{bound[n.value.id]}.{n.attr}", n.lineno) for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in bound
            and bound[n.value.id] != own and n.attr.startswith("_") and not n.attr.startswith("__")]


def test_the_private_name_check_sees_both_ways_of_reaching_in(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from pipeline import registry\nfrom pipeline.monitor import _aware\nregistry._rescore\n")
    assert _private_attributes(probe, "probe") == [("pipeline.registry._rescore", 3)]
    assert [n for m, names, _ in _imports(probe) for n in names if n.startswith("_")] == ["_aware"]


def test_the_architecture_notes_show_the_table_as_the_code_has_it():
    text = (REPO / "docs/ARCHITECTURE.md").read_text()
    for row in stages.describe():
        r = {k: ", ".join(f"`{p}`" for p in v.split(", ")) if k in ("reads", "writes") and v != "—" else v
             for k, v in row.items()}
        line = f"| {r['stage']} | `{r['runner']}` | {r['params']} | {r['reads']} | {r['writes']} | `{r['returns']}` |"
        assert line in text, line


def test_d2d_stages_prints_every_stage(capsys, monkeypatch):
    from app import cli

    monkeypatch.setattr("sys.argv", ["d2d", "stages"])
    monkeypatch.setattr(cli.console, "width", 400)  # one line per stage, as on a wide terminal
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(s.name in out for s in stages.STAGES) and "data/split/train.parquet" in out


def test_a_summary_reads_back_from_its_report_and_its_one_line_shows_the_numbers():
    from pipeline.summaries import Evaluated, Trained

    report = {"test_accuracy": 0.9, "val_log_loss": 0.2, "mlflow_run_id": "r1", "model_uri": "models:/m-1"}
    evaluated = Evaluated.from_report(report)
    assert evaluated.metrics == {"test_accuracy": 0.9, "val_log_loss": 0.2} and evaluated.test() == {"accuracy": 0.9}
    assert evaluated.shown() == {"test_accuracy": 0.9, "val_log_loss": 0.2, "mlflow_run_id": "r1", "model_uri": "models:/m-1"}
    trained = Trained.from_report({"epochs_run": 3, "best_epoch": 2, "best_val_loss": 0.1, "train_seconds": 1.5,
                                   "num_workers": 2, "best_val_accuracy": 0.9, "fresh_tensors": ["head.weight"]})
    assert trained.fresh_tensors == ("head.weight",) and trained.init_from is None
    assert "fresh_tensors" not in trained.shown() and trained.shown()["epochs_run"] == 3
    with pytest.raises(KeyError, match="Trained: the report has no 'num_workers'"):
        Trained.from_report({"epochs_run": 3, "best_epoch": 2, "best_val_loss": 0.1, "train_seconds": 1.5})


def test_a_training_run_has_one_field_per_stage_of_the_stages_summary_type():
    """flows/training.py builds TrainingRun from the table's stages by name: a stage added to the
    table without its field here would fail only at the end of a real run."""
    import dataclasses
    import typing

    from pipeline.summaries import TrainingRun

    hints = typing.get_type_hints(TrainingRun)
    assert [f.name for f in dataclasses.fields(TrainingRun)] == [s.name.replace("-", "_") for s in stages.STAGES]
    assert all(hints[s.name.replace("-", "_")] is s.summary for s in stages.STAGES)
