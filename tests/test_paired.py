"""Rank files beside result records and the paired comparisons computed from them."""
from __future__ import annotations

import importlib
import json
import math

import numpy as np
import pytest

import mtd_fast
from mtd_fast.experiments import RunSpec, run_all, runner, table2
from mtd_fast.experiments import ranks as ranks_mod
from mtd_fast.experiments.paired import paired_difference, paired_json, paired_markdown, per_sample
from mtd_fast.metrics import METRIC_KEYS
from mtd_fast.train import evaluate_samples, sample_ranks

train_module = importlib.import_module("mtd_fast.train")  # the module (the package attribute is the function)
DATA = {"n_sessions": 300, "n_items": 60}
SMALL = {"hidden_size": 8, "batch_size": 64, "max_steps_per_epoch": 2}


def spec(model, seed=0, data=DATA):
    return RunSpec("synthetic", model=model, seed=seed, epochs=2, overrides=SMALL, dataset_kwargs=data)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """mtd, stamp and pop (seeds 0 and 1 for mtd and stamp) run into one folder."""
    out = tmp_path_factory.mktemp("runs")
    specs = [spec(m, s) for m in ("mtd", "stamp") for s in (0, 1)] + [spec("pop")]
    return out, {(r["label"], r["seed"]): r for r in run_all(specs, out, quiet=True)}


def test_sample_ranks_give_evaluate_samples_metrics():
    from mtd_fast.experiments.ranks import metrics_from_ranks

    ds = mtd_fast.load_dataset("synthetic", **DATA)
    model = mtd_fast.train(ds, model="stamp", epochs=1, quiet=True, **SMALL).model
    ranks = sample_ranks(model, ds.test, batch_size=37)
    assert ranks.dtype == np.int64 and ranks.shape == (len(ds.test),)
    assert 1 <= ranks.min() and ranks.max() <= ds.n_items
    assert metrics_from_ranks(ranks) == evaluate_samples(model, ds.test, batch_size=1024)
    assert model.training  # restored after the eval-mode pass


def test_every_run_writes_a_rank_file_that_gives_its_recorded_metrics(finished):
    out, recs = finished
    for (label, seed), rec in recs.items():
        s = spec(label, seed)
        path = runner.ranks_path(out, s)
        assert path.is_file() and rec["ranks"]["file"] == path.name == runner.result_path(out, s).stem + ".ranks.npz"
        ranks, problem = ranks_mod.read_ranks(out, rec)
        assert problem is None and set(ranks) == {"valid", "test"}
        assert rec["ranks"]["samples"]["test"]["n"] == len(ranks["test"]) == rec["stats"]["test_samples"]
        assert ranks["test"].dtype == np.uint8 and ranks["test"].max() <= ranks_mod.RANKS_CLIP
        got = ranks_mod.metrics_from_ranks(ranks["test"])
        assert all(math.isclose(got[k], rec["metrics"][k], abs_tol=1e-9) for k in METRIC_KEYS)
    # two seeds of one model rank the same samples: their digests agree
    assert recs[("mtd", 0)]["ranks"]["samples"] == recs[("mtd", 1)]["ranks"]["samples"]


def test_paired_differences_are_the_differences_of_the_recorded_metrics(finished):
    out, recs = finished
    (entry,) = paired_json(list(recs.values()), out, table2.ORDER)
    assert entry["unpaired"] == {}
    rows = {r["label"]: r for r in entry["rows"]}
    assert set(rows) == {"stamp", "pop"} and rows["stamp"]["seeds"] == [0, 1] and rows["pop"]["seeds"] == [0]
    for label, seeds in (("stamp", (0, 1)), ("pop", (0,))):
        for k in ("P@20", "MRR@20"):
            # mean over samples of (ref - other), averaged over seeds = the difference of the mean metrics
            want = np.mean([recs[("mtd", s)]["metrics"][k] - recs[(label, s)]["metrics"][k] for s in seeds])
            assert math.isclose(rows[label]["test"][k]["diff"], want, abs_tol=1e-9)
            assert rows[label]["test"][k]["half"] > 0
    md = paired_markdown([entry])
    assert "| STAMP | 0, 1 |" in md and "| POP | 0 |" in md


def test_paired_difference_by_hand():
    ref, other = np.array([1, 30, 2, 4], dtype=np.uint8), np.array([30, 1, 2, 1], dtype=np.uint8)
    d = per_sample(ref, "MRR@20") - per_sample(other, "MRR@20")  # 1, -1, 0, 0.25 - 1
    np.testing.assert_allclose(d, [1, -1, 0, -0.75])
    got = paired_difference([ref], [other], "MRR@20")
    assert math.isclose(got["diff"], 100 * d.mean())
    assert math.isclose(got["half"], 100 * 1.959963984540054 * d.std(ddof=1) / 2)
    np.testing.assert_array_equal(per_sample(ref, "P@20"), [1, 0, 1, 1])
    with pytest.raises(ValueError, match="one rank array per seed"):
        paired_difference([ref], [other, other], "P@20")


def test_a_rank_file_that_is_not_the_recorded_one_is_never_paired(finished, tmp_path):
    out, recs = finished
    for p in out.iterdir():
        if p.is_file():
            (tmp_path / p.name).write_bytes(p.read_bytes())
    stamp0 = runner.ranks_path(tmp_path, spec("stamp", 0))
    stamp0.write_bytes(runner.ranks_path(tmp_path, spec("pop")).read_bytes())  # another run's file
    ranks, problem = ranks_mod.read_ranks(tmp_path, recs[("stamp", 0)])
    assert ranks is None and "sha256 differs" in problem
    # a file whose hash the record names, but whose ranks are not the record's model's
    bad = dict(recs[("stamp", 1)])
    bad["ranks"] = dict(bad["ranks"], file=runner.ranks_path(tmp_path, spec("pop")).name,
                        sha256=recs[("pop", 0)]["ranks"]["sha256"])
    _, problem = ranks_mod.read_ranks(tmp_path, bad)
    assert "do not give the record's" in problem
    (entry,) = paired_json(list(recs.values()), tmp_path, table2.ORDER)
    rows = {r["label"]: r for r in entry["rows"]}
    assert rows["stamp"]["seeds"] == [1]  # seed 0's file is refused; seed 1 still pairs
    runner.ranks_path(tmp_path, spec("mtd", 0)).unlink()
    runner.ranks_path(tmp_path, spec("mtd", 1)).unlink()
    (entry,) = paired_json(list(recs.values()), tmp_path, table2.ORDER)
    assert entry["rows"] == [] and set(entry["unpaired"]) == {"stamp", "pop"}
    assert "MTD has no rank file" in entry["unpaired"]["pop"]
    assert "Not paired" in paired_markdown([entry])


def test_runs_on_other_samples_are_not_paired(tmp_path):
    other = {**DATA, "seed": 5}  # another synthetic draw, also 300 sessions: other samples
    recs = run_all([spec("mtd"), spec("stamp")], tmp_path / "a", quiet=True)
    moved = run_all([spec("stamp", data=other)], tmp_path / "b", quiet=True)[0]
    for p in (tmp_path / "b").glob("*"):
        if p.is_file():
            (tmp_path / "a" / p.name).write_bytes(p.read_bytes())
    moved = dict(moved, dataset_kwargs=DATA)  # pretend it is the same dataset: the digests still differ
    (entry,) = paired_json([recs[0], moved], tmp_path / "a", table2.ORDER)
    assert entry["rows"] == [] and "same samples" in entry["unpaired"]["stamp"]


def test_ranks_false_writes_none_and_a_record_without_ranks_is_still_done(tmp_path, monkeypatch):
    s = spec("pop")
    rec = run_all([s], tmp_path, quiet=True, ranks=False)[0]
    assert "ranks" not in rec and not runner.ranks_path(tmp_path, s).exists()
    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail("retrained a finished run"))
    assert run_all([s], tmp_path, quiet=True) == [rec]


def test_publish_copies_rank_files_and_the_readme_shows_the_paired_table(finished, tmp_path):
    out, recs = finished
    results = tmp_path / "results" / "table2"
    results.mkdir(parents=True)
    for p in out.iterdir():
        if p.is_file():
            (results / p.name).write_bytes(p.read_bytes())
    figures = tmp_path / "figures"
    readme = tmp_path / "README.md"
    readme.write_text("<!-- table2 -->\nold\n<!-- /table2 -->\n")
    res = table2.publish(tmp_path / "results", figures, readme)
    ranks = sorted(p.name for p in results.glob("*.ranks.npz"))
    assert len(ranks) == 5 and set(ranks) <= set(res["copied"])
    assert sorted(p.name for p in (figures / "table2").glob("*.ranks.npz")) == ranks
    md = (figures / "table2.md").read_text()
    assert "## Paired differences" in md and "## Provenance" in md
    block = table2.readme_block(md)
    assert "**Paired differences (computed from the rank files)**" in block and "| STAMP | 0, 1 |" in block
    assert "result files, made" not in block  # provenance stays out of the README
    merged = json.loads((figures / "table2.json").read_text())
    assert {r["label"] for r in merged["paired"][0]["rows"]} == {"stamp", "pop"}
    # a source rank file that is not the recorded one is listed and not copied
    (figures / "table2" / ranks[0]).unlink()
    (results / ranks[0]).write_bytes(b"not a rank file")
    res = table2.publish(tmp_path / "results", figures, readme)
    assert ranks[0] in res["skipped"] and "sha256" in res["skipped"][ranks[0]]
    assert not (figures / "table2" / ranks[0]).exists()


def test_the_sample_digest_covers_prefixes_and_targets():
    from mtd_fast.data.store import Samples

    digest = ranks_mod.samples_digest
    a = Samples.from_lists([[1, 2], [3]], [4, 5])
    assert digest(a) == digest(Samples.from_lists([[1, 2], [3]], [4, 5]))
    assert digest(a) != digest(Samples.from_lists([[1], [2, 3]], [4, 5]))  # prefixes
    assert digest(a) != digest(Samples.from_lists([[1, 2], [3]], [5, 4]))  # targets


def test_cli_compare_prints_the_paired_difference_and_names_what_is_wrong(finished, tmp_path, capsys):
    from mtd_fast.cli import main

    out, recs = finished
    a, b = runner.result_path(out, spec("mtd", 1)), runner.result_path(out, spec("stamp", 1))
    assert main(["compare", str(a), str(b), "--metrics", "P@20", "MRR@10"]) == 0
    text = capsys.readouterr().out
    rows = {(c[1], c[2]): c for c in ([x.strip() for x in line.split("|")] for line in text.splitlines()
                                      if line.startswith("| valid") or line.startswith("| test"))}
    assert set(rows) == {(s, k) for s in ("valid", "test") for k in ("P@20", "MRR@10")}
    want = recs[("mtd", 1)]["metrics"]["P@20"] - recs[("stamp", 1)]["metrics"]["P@20"]
    assert float(rows[("test", "P@20")][5]) == pytest.approx(want, abs=0.006)  # printed with 2 decimals
    assert main(["compare", str(a), str(b), "--by-length"]) == 0
    text = capsys.readouterr().out
    assert "test samples by prefix length" in text and "| A - B P@20 | ± P@20 |" in text
    assert main(["compare", str(a), str(b), "--by-repeat", "valid"]) == 0
    text = capsys.readouterr().out
    assert "valid samples by target" in text and "| repeat |" in text and "| new |" in text
    with pytest.raises(SystemExit):  # one grouping at a time
        main(["compare", str(a), str(b), "--by-length", "--by-repeat"])
    capsys.readouterr()
    assert main(["compare", str(a), str(b), "--metrics", "P@50"]) == 2
    assert "--metrics P@50" in capsys.readouterr().err
    for p in out.iterdir():
        if p.is_file():
            (tmp_path / p.name).write_bytes(p.read_bytes())
    runner.ranks_path(tmp_path, spec("stamp", 1)).unlink()
    b2 = runner.result_path(tmp_path, spec("stamp", 1))
    assert main(["compare", str(runner.result_path(tmp_path, spec("mtd", 1))), str(b2)]) == 2
    err = capsys.readouterr().err
    assert str(b2) in err and "unreadable" in err
    other = run_all([spec("stamp", data={**DATA, "seed": 5})], tmp_path / "o", quiet=True)[0]
    c = runner.result_path(tmp_path / "o", spec("stamp", data={**DATA, "seed": 5}))
    assert other["ranks"]["samples"] != recs[("mtd", 1)]["ranks"]["samples"]
    assert main(["compare", str(a), str(c)]) == 2 and "different samples" in capsys.readouterr().err


def test_by_length_splits_the_paired_difference_over_prefix_lengths(finished, tmp_path):
    from mtd_fast.experiments.paired import LENGTH_BUCKETS, by_length

    out, recs = finished
    a, b = runner.result_path(out, spec("mtd", 0)), runner.result_path(out, spec("stamp", 0))
    rows = by_length(a, b, "test")
    ds = mtd_fast.load_dataset("synthetic", **DATA)
    lengths = np.diff(ds.test.prefixes.offsets)
    assert sum(r["samples"] for r in rows) == len(ds.test)
    for r in rows:
        lo, hi = next((lo, hi) for lab, lo, hi in LENGTH_BUCKETS if lab == r["length"])
        assert r["samples"] == int(((lengths >= lo) & (lengths <= (hi or lengths.max()))).sum())
    for k in ("P@20", "MRR@20"):  # the buckets' differences, weighted by their sizes, are the whole split's
        whole = recs[("mtd", 0)]["metrics"][k] - recs[("stamp", 0)]["metrics"][k]
        assert sum(r["samples"] * r[f"A - B {k}"] for r in rows) / len(ds.test) == pytest.approx(whole, abs=1e-9)
        assert sum(r["samples"] * r[f"A {k}"] for r in rows) / len(ds.test) == pytest.approx(
            recs[("mtd", 0)]["metrics"][k], abs=1e-9)
    # data that is not what the runs ranked is refused
    for p in out.iterdir():
        if p.is_file():
            (tmp_path / p.name).write_bytes(p.read_bytes())
    a2 = runner.result_path(tmp_path, spec("mtd", 0))
    rec = json.loads(a2.read_text())
    rec["dataset_kwargs"] = {**DATA, "seed": 3}  # another synthetic draw: other samples
    a2.write_text(json.dumps(rec))
    with pytest.raises(Exception, match="not what the run ranked"):
        by_length(a2, runner.result_path(tmp_path, spec("stamp", 0)), "test")


def test_by_repeat_splits_re_clicks_from_new_targets(finished):
    from mtd_fast.experiments.paired import by_repeat, repeat_mask

    out, recs = finished
    ds = mtd_fast.load_dataset("synthetic", **DATA)
    for split in ("valid", "test"):
        samples = ds.split(split)
        want = np.array([int(samples.targets[i]) in set(samples.prefixes[i].tolist()) for i in range(len(samples))])
        assert 0 < want.sum() < len(samples)  # both groups present, so the check below can fail
        assert np.array_equal(repeat_mask(samples), want)
    a, b = runner.result_path(out, spec("mtd", 0)), runner.result_path(out, spec("pop"))
    rows = by_repeat(a, b, "test")
    assert [r["target"] for r in rows] == ["repeat", "new"]
    assert rows[0]["samples"] == int(repeat_mask(ds.test).sum()) and sum(r["samples"] for r in rows) == len(ds.test)
    for k in ("P@20", "MRR@20"):
        whole = recs[("mtd", 0)]["metrics"][k] - recs[("pop", 0)]["metrics"][k]
        assert sum(r["samples"] * r[f"A - B {k}"] for r in rows) / len(ds.test) == pytest.approx(whole, abs=1e-9)
