"""The resumable experiment runner and `mtd-fast experiment table2` on tiny synthetic data."""
from __future__ import annotations

import importlib
import json
import re

import pytest

import mtd_fast
from mtd_fast.cli import main
from mtd_fast.experiments import (
    ExperimentError,
    RunSpec,
    load_results,
    merge_json,
    merge_table,
    result_path,
    run_all,
    runner,
    table2,
)
from mtd_fast.experiments.report import fmt_mean_sd, markdown_table
from mtd_fast.metrics import METRIC_KEYS

train_module = importlib.import_module("mtd_fast.train")  # the module (the package attribute is the function)

DATA = {"n_sessions": 300, "n_items": 60}
SMALL = {"hidden_size": 8, "batch_size": 64, "max_steps_per_epoch": 2}
CLI_SMALL = ["--n-sessions", "300", "--n-items", "60", "--hidden-size", "8", "--batch-size", "64",
             "--max-steps-per-epoch", "2", "--quiet"]
TOP_KEYS = {"dataset", "model", "label", "seed", "metrics", "best_epoch", "epochs", "fraction", "overrides",
            "model_config", "train_config", "history", "stats", "command", "commit", "torch", "machine", "date",
            "wall_seconds", "format", "format_version"}


def spec(model, seed=0, epochs=2, **kw):
    return RunSpec("synthetic", model=model, seed=seed, epochs=epochs, overrides={**SMALL, **kw.pop("over", {})},
                   dataset_kwargs=DATA, **kw)


class CountingTrain:
    """Wraps mtd_fast.train.train and counts the runs (or refuses them)."""

    def __init__(self, monkeypatch, refuse=False):
        self.calls, self.refuse, self.real = [], refuse, train_module.train
        monkeypatch.setattr(train_module, "train", self)

    def __call__(self, ds, **kw):
        if self.refuse:
            raise AssertionError(f"train() called for {kw.get('model')} seed {kw.get('seed')}")
        self.calls.append((kw["model"], kw["seed"]))
        return self.real(ds, **kw)


def test_run_all_writes_one_file_per_run_then_retrains_nothing(tmp_path, monkeypatch):
    specs = [spec(m, s) for m in ("pop", "stamp") for s in (0, 1)]
    loads = []
    real_load = runner.load_spec_dataset
    monkeypatch.setattr(runner, "load_spec_dataset", lambda s: loads.append(s) or real_load(s))
    counting = CountingTrain(monkeypatch)
    records = run_all(specs, tmp_path, quiet=True)
    assert len(loads) == 1  # one dataset group, loaded once
    assert counting.calls == [("pop", 0), ("pop", 1), ("stamp", 0), ("stamp", 1)]
    files = sorted(p.name for p in tmp_path.glob("*.json"))
    assert files == sorted(result_path(tmp_path, s).name for s in specs)
    assert result_path(tmp_path, specs[0]).name == "synthetic-n_items=60-n_sessions=300__pop__seed0.json"
    ds = mtd_fast.load_dataset("synthetic", **DATA)
    for s, rec in zip(specs, records):
        on_disk = json.loads(result_path(tmp_path, s).read_text())
        assert on_disk == json.loads(json.dumps(rec))
        assert TOP_KEYS <= set(on_disk)
        assert (on_disk["dataset"], on_disk["model"], on_disk["label"], on_disk["seed"]) == ("synthetic", s.model,
                                                                                             s.model, s.seed)
        assert set(METRIC_KEYS) <= set(on_disk["metrics"])
        assert set(on_disk["metrics"]["best_on_test"]) == set(METRIC_KEYS)
        assert on_disk["train_config"]["max_steps_per_epoch"] == 2 and on_disk["model_config"]["hidden_size"] == 8
        assert on_disk["overrides"] == SMALL and on_disk["epochs"] == 2 and on_disk["fraction"] == 1.0
        assert on_disk["stats"] == ds.stats()
        assert on_disk["command"] == s.api_call() and on_disk["command"].startswith("mtd_fast.train(")
        hist = on_disk["history"]
        assert all({"epoch", "valid", "test", "train_seconds"} <= set(h) for h in hist)
        assert on_disk["best_epoch"] in [h["epoch"] for h in hist]
        if s.model == "stamp":  # trained by epochs: the validation-picked epoch's test metrics
            assert len(hist) == 2
            picked = next(h for h in hist if h["epoch"] == on_disk["best_epoch"])
            assert picked["valid"]["P@20"] == max(h["valid"]["P@20"] for h in hist)
            assert on_disk["metrics"]["best_on_test"]["P@20"] == max(h["test"]["P@20"] for h in hist)
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temp file

    CountingTrain(monkeypatch, refuse=True)  # a second invocation trains nothing
    monkeypatch.setattr(runner, "load_spec_dataset", lambda s: pytest.fail("a finished study loaded its data again"))
    again = run_all(specs, tmp_path, quiet=True)
    assert again == [json.loads(result_path(tmp_path, s).read_text()) for s in specs]
    assert load_results(tmp_path, specs[::-1]) == again[::-1]


def test_bad_files_are_redone_never_merged(tmp_path, monkeypatch, capsys):
    specs = [spec("pop", s) for s in range(5)]
    run_all(specs, tmp_path, quiet=True)
    paths = [result_path(tmp_path, s) for s in specs]
    good = paths[0].read_text()
    paths[1].write_text(good[: len(good) // 2])  # truncated by a crash
    paths[2].write_text("not json at all {")  # corrupt
    mismatch = json.loads(good.replace('"seed": 0', '"seed": 3'))
    mismatch["epochs"], mismatch["metrics"]["P@20"] = 7, 99.99  # another spec's result
    paths[3].write_text(json.dumps(mismatch))
    partial = json.loads(paths[4].read_text())
    del partial["history"]
    paths[4].write_text(json.dumps(partial))
    counting = CountingTrain(monkeypatch)
    records = run_all(specs, tmp_path, quiet=True)
    assert sorted(counting.calls) == [("pop", 1), ("pop", 2), ("pop", 3), ("pop", 4)]
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("redo ")]
    assert len(lines) == 4
    assert "truncated" in err and "made by another spec (epochs 7 != 2)" in err and "'history' is missing" in err
    too_long = json.loads(good)
    too_long["epochs"], too_long["history"] = 1, too_long["history"] * 2  # a resume past its cap
    assert runner.validate_record(too_long) == "2 epochs in the history, more than its epochs=1"
    for p in paths[1:]:
        assert (p.parent / (p.name + ".replaced")).is_file()  # kept aside, not merged
    assert all(runner.validate_record(r) is None for r in records)
    assert records[3]["metrics"]["P@20"] != 99.99 and records[3]["epochs"] == 2
    assert "99.99" not in merge_table(load_results(tmp_path))


class Interrupt(Exception):
    pass


def interrupt_at(monkeypatch, call):
    """Make the trainer's `call`-th train_step raise, as a crash or a session end would."""
    real, n = train_module.train_step, [0]

    def step(*a, **kw):
        n[0] += 1
        if n[0] == call:
            raise Interrupt(f"train_step call {call}")
        return real(*a, **kw)
    monkeypatch.setattr(train_module, "train_step", step)


def without_timings(rec):
    return [{k: v for k, v in h.items() if not k.endswith("seconds")} for h in rec["history"]]


def test_interrupted_run_resumes_from_its_partial_run_directory(tmp_path, monkeypatch, capsys):
    s = spec("mtd", epochs=3)
    ref = run_all([s], tmp_path / "ref", quiet=True)[0]
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        interrupt_at(m, 5)  # epoch 3, first step: epochs 1 and 2 are checkpointed
        with pytest.raises(Interrupt):
            run_all([s], out, quiet=True)
    partial = runner.partial_path(out, s)
    assert partial == out / ".partial" / result_path(out, s).stem
    assert (partial / "checkpoint_last.pt").is_file() and not result_path(out, s).exists()
    assert [json.loads(x)["epoch"] for x in (partial / "epochs.jsonl").read_text().splitlines()] == [1, 2]

    steps = []
    real_step = train_module.train_step
    monkeypatch.setattr(train_module, "train_step", lambda *a, **kw: steps.append(1) or real_step(*a, **kw))
    rec = run_all([s], out, quiet=True)[0]
    assert len(steps) == 2  # only epoch 3 trained again (max_steps_per_epoch=2)
    assert without_timings(rec) == without_timings(ref)  # exactly the uninterrupted run
    assert rec["metrics"] == ref["metrics"] and rec["best_epoch"] == ref["best_epoch"]
    assert not partial.exists()  # removed once the result file is written
    assert json.loads(result_path(out, s).read_text()) == rec
    assert rec["resumed_at_epoch"] == 2 and ref["resumed_at_epoch"] == 0
    # which code trained which epochs: one version here (the same checkout both times)
    assert rec["code_versions"] == ref["code_versions"] == [{"from_epoch": 1, "commit": rec["commit"],
                                                             "commit_dirty": rec["commit_dirty"]}]

    # a partial run left behind by an interruption after its result file was written goes
    (partial / "leftover").mkdir(parents=True)
    run_all([s], out, quiet=True)
    assert not partial.exists()

    # a partial run started with another epochs cap is not resumed under this one: the trainer
    # would accept it (epochs may change on resume), but a result must come from one cap
    with monkeypatch.context() as m:
        interrupt_at(m, 5)
        with pytest.raises(Interrupt):
            run_all([spec("mtd", epochs=4)], tmp_path / "caps", quiet=True)
    steps.clear()
    rec = run_all([spec("mtd", epochs=1)], tmp_path / "caps", quiet=True)[0]
    assert len(steps) == 2 and len(rec["history"]) == 1 and rec["epochs"] == 1
    assert "started with epochs=4, this spec has epochs=1" in capsys.readouterr().err

    # a partial run made by another spec under the same file name is set aside, not resumed
    other = spec("mtd", epochs=3, over={"hidden_size": 12})
    with monkeypatch.context() as m:
        interrupt_at(m, 3)
        with pytest.raises(Interrupt):
            run_all([other], tmp_path / "x", quiet=True)
    capsys.readouterr()
    steps.clear()
    rec = run_all([s], tmp_path / "x", quiet=True)[0]
    assert len(steps) == 6  # all three epochs, from the beginning
    assert without_timings(rec) == without_timings(ref)
    stale = runner.partial_path(tmp_path / "x", s).with_name(result_path(out, s).stem + ".stale")
    assert (stale / "run.json").is_file()
    assert "cannot be resumed" in capsys.readouterr().err


def test_interrupted_run_resumes_from_a_mid_epoch_checkpoint(tmp_path, monkeypatch):
    """With checkpoint_every=1 an interruption in epoch 3 loses no finished step: the next
    invocation trains only the step that was cut short, and the record is the uninterrupted one."""
    s = spec("mtd", epochs=3, over={"max_steps_per_epoch": 3})
    ref = run_all([s], tmp_path / "ref", quiet=True)[0]  # the default: 200 steps apart, none here
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        interrupt_at(m, 8)  # epoch 3, step 2: checkpointed after epoch 3's step 1
        with pytest.raises(Interrupt):
            run_all([s], out, quiet=True, checkpoint_every=1)
    from mtd_fast.experiments.status import study_status

    (row,) = study_status(out)
    assert row["state"] == "in progress or interrupted" and row["epochs"] == "2/3 + 1 step"
    steps = []
    real_step = train_module.train_step
    monkeypatch.setattr(train_module, "train_step", lambda *a, **kw: steps.append(1) or real_step(*a, **kw))
    rec = run_all([s], out, quiet=True, checkpoint_every=1)[0]
    assert len(steps) == 2  # steps 2 and 3 of epoch 3
    assert without_timings(rec) == without_timings(ref)
    assert rec["metrics"] == ref["metrics"] and rec["resumed_at_epoch"] == 2


def test_merged_table_equals_the_files(tmp_path):
    specs = [spec(m, s) for m in ("stamp", "pop") for s in (0, 1)] + [spec("pop", 0, label="pop-again")]
    run_all(specs, tmp_path, quiet=True)
    files = {(d["label"], d["seed"]): d for d in (json.loads(p.read_text()) for p in tmp_path.glob("*.json"))}
    records = load_results(tmp_path)
    assert len(records) == 5
    md = merge_table(records, order=["pop", "stamp"])
    rows = [line.split("|")[1:-1] for line in md.splitlines() if line.startswith("| ") and "---" not in line]
    header = [c.strip() for c in rows[0]]
    body = {r[0].strip(): [c.strip() for c in r] for r in rows[1:]}
    assert list(body) == ["POP", "STAMP", "pop-again"]  # the given order, then the others
    for label, name in (("pop", "POP"), ("stamp", "STAMP"), ("pop-again", "pop-again")):
        seeds = sorted(s for (lab, s) in files if lab == label)
        for k in ("P@5", "P@10", "P@20", "MRR@5", "MRR@10", "MRR@20"):
            assert body[name][header.index(k)] == fmt_mean_sd([files[(label, s)]["metrics"][k] for s in seeds])
        assert body[name][header.index("best-on-test P@20")] == fmt_mean_sd(
            [files[(label, s)]["metrics"]["best_on_test"]["P@20"] for s in seeds])
        assert body[name][header.index("seeds")] == str(len(seeds))
    assert " ± " in body["STAMP"][header.index("P@20")]
    merged = merge_json(records)
    (ds,) = merged["datasets"]
    for row in ds["rows"]:
        for k in METRIC_KEYS:
            assert row["metrics"][k]["values"] == [files[(row["label"], s)]["metrics"][k] for s in row["seeds"]]


def _converged(label, valid, test, *, best=7, run=10, epochs=30, dataset="diginetica"):
    """A finished record as the runner writes it, every metric `valid` on validation and
    `test` on test, early stopping with patience 3."""
    hist = [{"epoch": e, "train_loss": 1.0, "train_seconds": 2.0, "valid": dict.fromkeys(METRIC_KEYS, valid)}
            for e in range(1, run + 1)]
    return {"dataset": dataset, "fraction": 1.0, "dataset_kwargs": {}, "label": label, "model": label, "seed": 0,
            "best_epoch": best, "epochs": epochs, "history": hist, "metrics": dict.fromkeys(METRIC_KEYS, test),
            "stats": {}, "train_config": {"patience": 3}}


def test_table2_targets_and_capped_runs_are_computed_from_the_files():
    from mtd_fast.experiments.merge import stopped_by_cap

    capped = _converged("mtd", 70.0, 72.0, best=29, run=30, dataset="yoochoose1_64_mtd")
    assert stopped_by_cap(capped)
    assert not stopped_by_cap(_converged("mtd", 1, 1, best=26, run=30))  # patience 3 ran out at the cap
    assert not stopped_by_cap(_converged("mtd", 1, 1))  # early stopping ended it
    recs = [_converged("mtd", 50.0, 52.0), _converged("mtd-lo", 49.0, 53.0), _converged("srgnn", 48.0, 51.0), capped]
    md = merge_table(recs, table2.ORDER)
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[1:-1]] for r in md.splitlines()
            if r.startswith("| ")}
    header = rows["model"]
    assert rows["MTD"][header.index("valid P@20")] == "70.00"  # the second table (yoochoose) overwrote the first
    assert rows["MTD"][header.index("picked epoch")] == "29 of 30 (cap)"
    assert rows["MTD-lo"][header.index("picked epoch")] == "7 of 10"
    text = table2.targets(merge_json(recs, table2.ORDER))
    digi, yoo = text.split("- **yoochoose1_64_mtd**")
    assert "**not** ahead" in digi and "MTD-lo on test P@20 (53.00 vs 52.00)" in digi
    assert "on validation" not in digi  # MTD leads on validation
    assert "SR-GNN on" not in digi
    assert "P@20 52.00 against 54.5 (2.50 short)" in digi
    assert "Required, not finished: NARM, STAMP, SASRec, CSRM." in digi
    assert "ahead of every other finished model (none)" in yoo and "P@20 72.00 against 71.5 (met)" in yoo
    assert "epochs cap while still improving (not converged): MTD." in yoo and "MTD-lo" in yoo.split("not finished")[1]


def test_run_interrupted_before_its_first_checkpoint_records_who_trained_epoch_1(tmp_path, monkeypatch):
    """A run directory with run.json and no checkpoint (a crash in epoch 1) restarts from the
    beginning; the restarting process is noted in run.json (after_epoch 0), so code_versions
    names the code that trained epoch 1, not the one that only made the folder."""
    import mtd_fast.rundir as rundir_module

    s = spec("stamp", epochs=2)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        interrupt_at(m, 1)  # the very first step: no checkpoint yet
        with pytest.raises(Interrupt):
            run_all([s], out, quiet=True)
    partial = runner.partial_path(out, s)
    assert (partial / "run.json").is_file() and not (partial / "checkpoint_last.pt").exists()
    record = json.loads((partial / "run.json").read_text())
    record["commit"] = "0" * 40  # as if another checkout had made the folder
    (partial / "run.json").write_text(json.dumps(record))
    notes = []
    real_note = rundir_module.RunDir.note_resume
    monkeypatch.setattr(rundir_module.RunDir, "note_resume",
                        lambda self, done, prov: notes.append(done) or real_note(self, done, prov))
    rec = run_all([s], out, quiet=True)[0]
    assert notes == [0]
    assert [v["from_epoch"] for v in rec["code_versions"]] == [1]
    assert rec["code_versions"][0]["commit"] == rec["commit"] != "0" * 40


def test_publish_copies_finished_files_merges_and_rewrites_the_readme_block(tmp_path, monkeypatch):
    results, figures = tmp_path / "results", tmp_path / "figures"
    run_all([spec("pop"), spec("stamp")], results / "table2", quiet=True)
    torn = results / "table2" / "torn.json"
    torn.write_text('{"format": ')  # a partial file: listed, never copied
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- table2 -->\nold table\n<!-- /table2 -->\nafter\n")
    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail("publish must not train"))
    res = table2.publish(results, figures, readme)
    assert sorted(n for n in res["copied"] if n.endswith(".json")) == sorted(
        p.name for p in (results / "table2").glob("*__seed0.json"))
    assert list(res["skipped"]) == ["torn.json"] and not (figures / "table2" / "torn.json").exists()
    md = (figures / "table2.md").read_text()
    assert "| POP |" in md and "| STAMP |" in md and (figures / "table2_curves.png").is_file()
    text = readme.read_text()
    assert text == ("# x\n\nbefore\n<!-- table2 -->\n" + table2.readme_block(md) + "\n<!-- /table2 -->\nafter\n")
    assert "old table" not in text
    assert table2.publish(results, figures, readme)["copied"] == []  # nothing new: nothing copied, same README
    assert readme.read_text() == text
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="no <!-- table2 -->"):
        table2.publish(results, figures, readme)


def test_status_reads_the_study_folder_without_training(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    runs = out / "table2"
    run_all([spec("pop"), spec("stamp")], runs, quiet=True)
    names = ("pop", "stamp", "narm", "sasrec", "csrm")
    pop, stamp, narm, sasrec, csrm = (result_path(runs, spec(m)).stem for m in names)
    (runs / f"{narm}.json").write_text('{"format": ')  # torn: redone next time
    live = runs / ".partial" / sasrec
    live.mkdir(parents=True)
    (live / "run.json").write_text(json.dumps({"identity": {"epochs": 30}}))
    lines = [{"epoch": e, "train_seconds": 10.0 + e, "valid": {"P@20": p, "MRR@20": m}}
             for e, p, m in ((1, 40.0, 10.0), (2, 42.0, 11.0), (3, 42.0, 12.0), (4, 41.0, 13.0))]
    (live / "epochs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"epoch": 5, "va')
    (runs / ".partial" / f"{csrm}.stale").mkdir()

    from mtd_fast.experiments.status import study_status

    rows = {r["run"]: r for r in study_status(runs)}
    assert rows[pop]["state"] == "finished" and rows[pop]["best epoch"] == "fitted"
    rec = json.loads((runs / f"{stamp}.json").read_text())
    assert rows[stamp]["best epoch"] == rec["best_epoch"] and rows[stamp]["epochs"] == f"{len(rec['history'])}/2"
    assert rows[narm]["state"].startswith("invalid, will be redone")
    sas = rows[sasrec]  # the torn 5th line skipped; epoch 3 wins the P@20 tie on MRR@20
    assert (sas["state"], sas["epochs"], sas["best epoch"], sas["valid P@20"], sas["s/epoch"]) == \
        ("in progress or interrupted", "4/30", 3, 42.0, 14.0)
    assert rows[csrm]["state"] == "set aside (not resumed)"
    assert rows[pop]["rank file"] == rows[stamp]["rank file"] == "yes"
    runner.ranks_path(runs, spec("pop")).write_bytes(b"torn")  # not the file its record names
    rec.pop("ranks")
    (runs / f"{stamp}.json").write_text(json.dumps(rec))  # a record from before rank files
    rows = {r["run"]: r for r in study_status(runs)}
    assert (rows[pop]["rank file"], rows[stamp]["rank file"]) == ("refused", "none")
    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail("--status must not train"))
    assert main(["experiment", "table2", "--status", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 finished, 1 invalid, will be redone, 1 in progress or interrupted, 1 set aside" in printed
    assert f"| {sasrec} | in progress or interrupted | 4/30 | 3 | 42.00 | 12.00 | 14.00 |  |" in printed
    assert main(["experiment", "table2", "--status", "--out", str(tmp_path / "none")]) == 0
    assert "no result files and no runs in progress" in capsys.readouterr().out


def test_runspec_validation_and_hashing():
    a = RunSpec("synthetic", model="MTD-lo", overrides={"lr": 0.01, "batch_size": 8})
    assert a.label == "mtd-lo" and a.overrides == (("batch_size", 8), ("lr", 0.01))
    assert hash(a) == hash(RunSpec("synthetic", model="MTD-lo", overrides={"batch_size": 8, "lr": 0.01}))
    with pytest.raises(ValueError, match="unknown model 'gpt'"):
        RunSpec(model="gpt")
    with pytest.raises(TypeError, match="unknown option 'nope'"):
        RunSpec(overrides={"nope": 1})
    with pytest.raises(ValueError, match="lr=-1 is invalid"):
        RunSpec(overrides={"lr": -1})
    with pytest.raises(ValueError, match="fixes graph_phases=0"):
        RunSpec(model="mtd-lo", overrides={"graph_phases": 2})
    with pytest.raises(ExperimentError, match="label"):
        RunSpec(label="a/b")
    with pytest.raises(ExperimentError, match="dataset_kwargs"):
        RunSpec("diginetica", dataset_kwargs={"n_items": 3})
    with pytest.raises(ExperimentError, match="give them different labels"):
        run_all([RunSpec(model="pop"), RunSpec(model="pop", epochs=3)], "unused")
    s = RunSpec("diginetica", root="/data/dg", fraction=0.25, model="srgnn", seed=2, label="srgnn")
    assert result_path("out", s).as_posix() == "out/diginetica_frac0.25__srgnn__seed2.json"


def test_markdown_table_renderer():
    md = markdown_table([{"a": 1.234, "b": "x"}, {"a": 2e6}], ["a", "b"], right=["a"])
    assert md.splitlines() == ["| a | b |", "| ---: | --- |", "| 1.23 | x |", "| 2000000 |  |"]
    assert fmt_mean_sd([1.0]) == "1.00" and fmt_mean_sd([1.0, 3.0]) == "2.00 ± 1.41"


def test_table2_curves_give_every_model_its_own_line():
    pytest.importorskip("matplotlib")
    styles = {label: table2.line_style(label) for label in table2.ORDER}
    lines = {(tuple(st["color"]), st["linestyle"]) for st in styles.values()}
    assert len(lines) == len(table2.ORDER)  # no two models share colour and line
    for label, (model, _) in table2.PAPER_ROWS.items():  # the paper's row: its default's colour, dashed
        assert styles[label]["color"] == styles[model]["color"] and styles[label]["linestyle"] == "--"
    assert table2.line_style("my-variant") == table2.line_style("my-variant")  # stable outside ORDER


def test_cli_table2_files_resume_and_errors(tmp_path, monkeypatch, capsys):
    out = tmp_path / "figs"
    argv = ["experiment", "table2", "--models", "pop", "stamp", "--seeds", "0", "1", "--epochs", "2", *CLI_SMALL,
            "--out", str(out)]
    assert main(argv) == 0
    runs = sorted(p.name for p in (out / "table2").glob("*.json"))
    assert len(runs) == 4 and all(re.match(r"synthetic-n_items=60-n_sessions=300__(pop|stamp)__seed[01]\.json", r)
                                  for r in runs)
    rec = json.loads((out / "table2" / runs[0]).read_text())
    assert rec["command"] == "mtd-fast " + " ".join(argv)
    merged = json.loads((out / "table2.json").read_text())
    assert [r["label"] for r in merged["datasets"][0]["rows"]] == ["pop", "stamp"]
    md = (out / "table2.md").read_text()
    assert md.count("| POP |") == 1 and "best-on-test P@20" in md and "mtd-fast experiment table2" in md
    assert (out / "table2_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert merge_table(load_results(out / "table2"), table2.ORDER) in md  # the table is the files
    capsys.readouterr()
    CountingTrain(monkeypatch, refuse=True)
    assert main(argv) == 0  # everything done: merges again, trains nothing
    assert (out / "table2.md").read_text() == md

    def err(args):
        assert main(args) == 2
        text = capsys.readouterr().err
        assert len(text.strip().splitlines()) == 1, text
        return text

    assert "unknown experiment 'table3'" in err(["experiment", "table3", "--out", str(out)])
    assert "unknown model 'gpt'" in err(["experiment", "table2", "--models", "gpt", "--out", str(out)])
    assert "no such folder" in err(["experiment", "table2", "--dataset", "diginetica", "--data-dir",
                                    str(tmp_path / "nope"), "--out", str(out)])
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert "cannot write results" in err(["experiment", "table2", "--models", "pop", *CLI_SMALL,
                                          "--out", str(blocker / "sub")])


def test_targets_never_count_a_missing_metric_as_mtd_ahead():
    mtd = _converged("mtd", 50.0, 52.0)
    for h in mtd["history"]:
        h["valid"] = None  # no validation metrics for MTD
    text = table2.targets(merge_json([mtd, _converged("srgnn", 60.0, 51.0)], table2.ORDER))
    assert "ahead of every other finished model" not in text
    assert "Not comparable (a metric is missing): SR-GNN on validation P@20 (MTD's missing)" in text


def test_a_row_never_mixes_settings_or_repeats_a_seed():
    from mtd_fast.experiments.merge import group_records, stopped_by_cap

    short = _converged("mtd", 50.0, 52.0, epochs=3, best=3, run=3)
    short["seed"] = 1
    with pytest.raises(ValueError, match=r"diginetica / mtd: the seeds were run with different settings"):
        group_records([_converged("mtd", 50.0, 52.0), short])
    with pytest.raises(ValueError, match=r"more than one result for seed\(s\) \[0\]"):
        group_records([_converged("mtd", 50.0, 52.0), _converged("mtd", 51.0, 52.0)])
    other = _converged("mtd", 50.0, 52.0)
    other["seed"], other["overrides"] = 1, {"lr": 0.01}
    with pytest.raises(ValueError, match="overrides"):
        merge_json([_converged("mtd", 50.0, 52.0), other])
    unvalidated = _converged("mtd", 1, 1, best=30, run=30)
    for h in unvalidated["history"]:
        h["valid"] = None
    assert not stopped_by_cap(unvalidated)  # no validation: no "still improving" claim


def test_publish_keeps_a_converged_file_from_a_run_of_another_setting(tmp_path):
    results, smoke, figures = tmp_path / "results", tmp_path / "smoke", tmp_path / "figures"
    run_all([spec("stamp", epochs=2)], results / "table2", quiet=True)
    run_all([spec("stamp", epochs=1)], smoke / "table2", quiet=True)  # same file name, another cap
    assert table2.publish(results, figures)["copied"]
    published = next((figures / "table2").glob("*.json")).read_text()
    res = table2.publish(smoke, figures)
    assert res["copied"] == [] and "another setting" in next(iter(res["skipped"].values()))
    assert next((figures / "table2").glob("*.json")).read_text() == published
    assert table2.publish(smoke, figures, force=True)["copied"]
    assert json.loads(next((figures / "table2").glob("*.json")).read_text())["epochs"] == 1
    with pytest.raises(ValueError, match="nothing to publish"):
        table2.publish(tmp_path / "empty", tmp_path / "figures2")
    assert not (tmp_path / "figures2").exists()


def test_result_files_that_would_break_the_merge_are_invalid(tmp_path):
    run_all([spec("stamp")], tmp_path, quiet=True)
    good = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert runner.validate_record(good) is None
    for change, problem in [
        (lambda r: r["history"][0].pop("train_seconds"), "train_seconds is missing"),
        (lambda r: r["metrics"].update(best_on_test=[1]), "best_on_test"),
        (lambda r: r["history"].reverse(), "not 1, 2, ... in order"),
        (lambda r: r["history"][1]["valid"].update({"P@20": "x"}), "'valid' is neither null"),
    ]:
        bad = json.loads(json.dumps(good))
        change(bad)
        assert problem in runner.validate_record(bad)


def test_resumed_at_epoch_is_the_checkpoint_not_the_epoch_lines(tmp_path, monkeypatch):
    s = spec("stamp", epochs=3)
    with monkeypatch.context() as m:
        interrupt_at(m, 5)  # in epoch 3: epochs 1 and 2 checkpointed
        with pytest.raises(Interrupt):
            run_all([s], tmp_path, quiet=True)
    lines = runner.partial_path(tmp_path, s) / "epochs.jsonl"
    lines.write_text(lines.read_text().splitlines(keepends=True)[0])  # died after the checkpoint, before its line
    rec = run_all([s], tmp_path, quiet=True)[0]
    assert rec["resumed_at_epoch"] == 2 and len(rec["history"]) == 3


def test_a_finished_result_from_another_data_folder_is_not_reused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    rec = {"dataset": "diginetica", "model": "pop", "label": "pop", "seed": 0, "epochs": 1, "overrides": {},
           "dataset_kwargs": {}, "fraction": 1.0, "root": str(a), "data_folder": str(a.resolve())}
    assert runner.spec_mismatch(rec, RunSpec("diginetica", root=str(a), model="pop", epochs=1)) is None
    link = tmp_path / "a-link"
    link.symlink_to(a)
    assert runner.spec_mismatch(rec, RunSpec("diginetica", root=str(link), model="pop", epochs=1)) is None
    assert "data folder" in runner.spec_mismatch(rec, RunSpec("diginetica", root=str(b), model="pop", epochs=1))
    old = {k: v for k, v in rec.items() if k != "data_folder"}  # a file from before data_folder: its root
    assert "data folder" in runner.spec_mismatch(old, RunSpec("diginetica", root=str(b), model="pop", epochs=1))


def test_resume_accepts_another_spelling_of_the_same_data_folder(tmp_path):
    from mtd_fast.rundir import RunDir, RunDirError

    ident = {"model": "mtd", "dataset": {"name": "d", "source": "/data/d", "content_sha256": "ab",
                                         "files_sha256": {"train.txt": "cd"}}}
    rd = RunDir(tmp_path)
    rd.start(ident, {})
    rd.check_identity({**ident, "dataset": {**ident["dataset"], "source": "../data/d"}})  # same data: resumes
    with pytest.raises(RunDirError, match="content_sha256"):
        rd.check_identity({**ident, "dataset": {**ident["dataset"], "source": "/x", "content_sha256": "ef"}})
