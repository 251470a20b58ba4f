"""A result file is a run of a spec by its resolved configs (defaults that changed included),
and a finished run of one study can be adopted as another study's row (`--adopt`)."""
from __future__ import annotations

import json

import pytest

from mtd_fast.cli import main
from mtd_fast.experiments import ExperimentError, RunSpec, load_results, run_all, runner, table2
from mtd_fast.experiments.adoption import adopt, adopt_files
from mtd_fast.experiments.ranks import read_ranks
from mtd_fast.experiments.study import Study

DATA = {"n_sessions": 300, "n_items": 60}
SMALL = {"hidden_size": 8, "batch_size": 64, "max_steps_per_epoch": 2}


def spec(model, label=None, **over):
    return RunSpec("synthetic", model=model, seed=0, epochs=1, overrides={**SMALL, **over}, label=label,
                   dataset_kwargs=DATA)


def old_record(rec):
    """`rec` as a file written before repeat_bias existed (the model then had no such term)."""
    old = json.loads(json.dumps(rec))
    del old["model_config"]["repeat_bias"], old["model_config"]["repeat_identity"]
    return old


def test_a_record_is_matched_by_its_resolved_configs(tmp_path):
    (rec,) = run_all([spec("mtd", score_norm=True, repeat_bias=True)], tmp_path, quiet=True)
    assert runner.spec_mismatch(rec, spec("mtd", score_norm=True, repeat_bias=True)) is None
    # the same run when the overrides only spell out today's defaults (score_norm and repeat_bias)
    assert runner.spec_mismatch(rec, spec("mtd")) is None
    assert "repeat_bias True != False" in runner.spec_mismatch(rec, spec("mtd", repeat_bias=False))
    assert "score_norm True != False" in runner.spec_mismatch(rec, spec("mtd", score_norm=False))
    assert runner.spec_mismatch(rec, spec("mtd", label="other"), label=False) is None
    assert "label" in runner.spec_mismatch(rec, spec("mtd", label="other"))


def test_a_file_made_before_the_default_changed_is_not_a_run_of_the_new_default(tmp_path):
    """A file without repeat_bias was trained without the term: it is the paper's MTD (repeat_bias
    False), never the default MTD now, even though its overrides are the same ({})."""
    (rec,) = run_all([spec("mtd", repeat_bias=False)], tmp_path, quiet=True)
    old = old_record({**rec, "overrides": SMALL})
    assert "repeat_bias False != True" in runner.spec_mismatch(old, spec("mtd"))
    assert runner.spec_mismatch(old, spec("mtd", repeat_bias=False)) is None
    for ablation in ("mtd-lo", "mtd-va", "mtd-at", "mtd-ga"):
        assert "repeat_bias" in runner.config_mismatch({**old, "model": ablation}, spec(ablation))
    # a baseline reads no repeat_bias: its old files stay runs of it
    (pop,) = run_all([spec("pop")], tmp_path / "pop", quiet=True)
    assert runner.spec_mismatch(old_record(pop), spec("pop")) is None
    # a file from before cosine scoring existed scored by dot product (config.LEGACY_VALUES)
    bare = json.loads(json.dumps(rec))
    del bare["model_config"]["score_norm"], bare["model_config"]["position_decay"]
    assert "score_norm False != True" in runner.spec_mismatch(bare, spec("mtd", repeat_bias=False))
    # and a file lacking a field that has no legacy value is refused by name
    assert "has no 'position_decay'" in runner.spec_mismatch(bare, spec("mtd", repeat_bias=False, score_norm=False,
                                                                         position_decay=0.5))
    # the runner redoes such a file rather than reuse it
    (tmp_path / "new").mkdir()
    path = runner.result_path(tmp_path / "new", spec("mtd"))
    path.write_text(json.dumps(old))
    assert "made by another spec (repeat_bias False != True)" in runner.plan([spec("mtd")], tmp_path / "new")[0]


def test_adopt_copies_a_run_of_the_same_spec_under_another_label(tmp_path):
    variant = spec("mtd", label="residual-rep+cos", graph_mode="residual", score_norm=True, repeat_bias=True)
    (rec,) = run_all([variant], tmp_path / "a", quiet=True)
    source = runner.result_path(tmp_path / "a", variant)
    row, paper = spec("mtd"), spec("mtd", label="mtd-norep", repeat_bias=False)

    with pytest.raises(ExperimentError, match=r"not a run of that spec \(repeat_bias True != False\)"):
        adopt(source, paper, tmp_path / "b")
    with pytest.raises(ExperimentError, match="no such file"):
        adopt(tmp_path / "a" / "missing.json", row, tmp_path / "b")
    dest = adopt(source, row, tmp_path / "b")
    got = json.loads(dest.read_text())
    assert dest == runner.result_path(tmp_path / "b", row) and dest.name.endswith("__mtd__seed0.json")
    assert got["label"] == "mtd" and got["overrides"] == row.overrides_dict
    assert got["adopted_from"] == {"file": source.name, "label": "residual-rep+cos", "overrides": rec["overrides"],
                                   "command": rec["command"]}
    assert got["metrics"] == rec["metrics"] and got["history"] == rec["history"]
    ranks, problem = read_ranks(tmp_path / "b", got)  # the rank file came along, checksum intact
    assert problem is None and got["ranks"]["file"] == runner.ranks_path(tmp_path / "b", row).name
    assert runner.plan([row], tmp_path / "b") == [None]  # nothing left to train
    # the same command again adopts nothing new; a lost rank file comes back
    runner.ranks_path(tmp_path / "b", row).unlink()
    assert adopt(source, row, tmp_path / "b") == dest and json.loads(dest.read_text()) == got
    assert read_ranks(tmp_path / "b", got)[1] is None and not list((tmp_path / "b").glob("*.replaced"))
    # another file holding the same run is not this adoption: the row is kept
    other = tmp_path / "c" / "other.json"
    other.parent.mkdir()
    other.write_text(source.read_text())
    with pytest.raises(ExperimentError, match="already holds a finished run"):
        adopt(other, row, tmp_path / "b")
    assert json.loads(dest.read_text()) == got


def test_adopt_files_relabels_the_old_row_before_the_new_run_takes_its_label(tmp_path):
    """The table2 switch: the file under "mtd" (made without the term) becomes "mtd-norep", and a
    run with the term becomes "mtd"; given in either order."""
    (old,) = run_all([spec("mtd", repeat_bias=False)], tmp_path / "old", quiet=True)
    table = tmp_path / "table2"
    table.mkdir()
    old_file = runner.result_path(table, spec("mtd"))
    old_file.write_text(json.dumps({**old_record(old), "overrides": SMALL}))
    old_ranks = runner.ranks_path(tmp_path / "old", spec("mtd", repeat_bias=False))
    runner.ranks_path(table, spec("mtd")).write_bytes(old_ranks.read_bytes())
    variant = spec("mtd", label="rep", repeat_bias=True)
    run_all([variant], tmp_path / "gm", quiet=True)
    row, paper = spec("mtd"), spec("mtd", label="mtd-norep", repeat_bias=False)
    adopt_files([runner.result_path(tmp_path / "gm", variant), old_file], [row, paper], table)
    recs = {r["label"]: r for r in load_results(table)}
    assert recs["mtd-norep"]["adopted_from"]["label"] == "mtd" and recs["mtd-norep"]["metrics"] == old["metrics"]
    for label in ("mtd", "mtd-norep"):  # each row's rank file is its own run's
        assert read_ranks(table, recs[label])[1] is None
    assert recs["mtd"]["adopted_from"]["label"] == "rep"
    assert runner.plan([row, paper], table) == [None, None]
    with pytest.raises(ExperimentError, match=r"matches none of this study's runs \(none trains model 'mtd'"):
        adopt_files([runner.result_path(table, row)], [spec("pop")], tmp_path / "c")


def test_table2_leaves_out_a_row_made_under_an_old_default(tmp_path):
    (rec,) = run_all([spec("mtd", repeat_bias=False)], tmp_path / "runs", quiet=True)
    stale = {**old_record(rec), "overrides": SMALL}
    assert "made under another default (repeat_bias False != True)" in table2.outdated(stale)
    assert table2.outdated({**stale, "label": "mtd-norep"}) is None
    assert table2.outdated({**rec, "label": "mtd-lo-norep", "model": "mtd-lo"}) is None
    res = table2.report([stale, {**stale, "label": "mtd-norep"}], Study("table2", out=tmp_path))
    assert [r["label"] for ds in json.loads(res["paths"]["json"].read_text())["datasets"] for r in ds["rows"]] \
        == ["mtd-norep"]
    assert "## Left out" in res["markdown"] and "mtd/seed0: made under another default" in res["markdown"]
    assert "## Left out" not in table2.readme_block(res["markdown"])
    # publish never copies it from the runs' folder into the figures
    runs = tmp_path / "results" / "table2"
    runs.mkdir(parents=True)
    (runs / "synthetic__mtd__seed0.json").write_text(json.dumps(stale))
    (runs / "synthetic__mtd-norep__seed0.json").write_text(json.dumps({**stale, "label": "mtd-norep"}))
    out = table2.publish(tmp_path / "results", tmp_path / "figures")
    assert out["copied"] == ["synthetic__mtd-norep__seed0.json"]
    assert "made under another default" in out["skipped"]["synthetic__mtd__seed0.json"]


def test_table2_rows_of_the_papers_model_and_the_cli_adopt(tmp_path, capsys):
    study = Study("table2", models=["mtd", "mtd-norep", "mtd-lo-norep"], epochs=1, overrides=SMALL,
                  dataset_kwargs=DATA)
    got = {s.label: (s.model, s.overrides_dict.get("repeat_bias")) for s in table2.specs(study)}
    assert got == {"mtd": ("mtd", None), "mtd-norep": ("mtd", False), "mtd-lo-norep": ("mtd-lo", False)}
    with pytest.raises(ExperimentError, match="row 'mtd-norep' fixes repeat_bias"):
        table2.specs(Study("table2", models=["mtd-norep"], overrides={"repeat_bias": True}))

    base = ["--n-sessions", "300", "--n-items", "60", "--hidden-size", "8", "--batch-size", "64",
            "--max-steps-per-epoch", "2", "--quiet", "--epochs", "1", "--out", str(tmp_path)]
    assert main(["experiment", "graph_modes", "--models", "residual-rep+cos", *base]) == 0
    source = next((tmp_path / "graph_modes").glob("*residual-rep+cos*.json"))
    assert main(["experiment", "table2", "--models", "mtd", "--adopt", str(source), *base]) == 0
    (rec,) = load_results(tmp_path / "table2")
    assert rec["label"] == "mtd" and rec["adopted_from"]["label"] == "residual-rep+cos"
    assert rec["model_config"]["repeat_bias"] is True
    md = (tmp_path / "table2.md").read_text()
    assert f"- synthetic mtd seed 0: {source.name} (label residual-rep+cos)" in md.split("Adopted")[1]
    # a graph_modes variant without the term is not the default MTD any more
    assert main(["experiment", "graph_modes", "--models", "residual+cos", *base]) == 0
    plain = next((tmp_path / "graph_modes").glob("*__residual+cos__*.json"))
    assert main(["experiment", "table2", "--models", "mtd", "--adopt", str(plain), *base]) == 2
    assert "repeat_bias False != True" in capsys.readouterr().err


def test_the_paper_figures_studies_train_the_papers_model():
    from mtd_fast.experiments import ablation, graph_modes, sensitivity

    for s in ablation.specs(Study("ablation", models=["mtd", "mtd-lo"], seeds=[0])):
        assert s.overrides_dict["repeat_bias"] is False
    assert all(s.overrides_dict["repeat_bias"] is False for s in sensitivity.specs(Study("sensitivity", seeds=[0])))
    # unless the invocation asks for the term
    (s,) = ablation.specs(Study("ablation", models=["mtd"], seeds=[0], overrides={"repeat_bias": True}))
    assert s.overrides_dict["repeat_bias"] is True
    for label, (_, kw) in graph_modes.VARIANTS.items():
        assert kw["repeat_bias"] is ("-rep" in label), label
