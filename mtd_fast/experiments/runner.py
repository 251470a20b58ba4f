"""The resumable experiment runner: one JSON result file per (dataset, label, seed).

    specs = [RunSpec("diginetica", root="../shared/data/diginetica", model=m, seed=s, epochs=30)
             for m in ("mtd", "srgnn") for s in (0, 1)]
    records = run_all(specs, "benches/figures/table2")   # trains only what is missing
    print(merge_table(load_results("benches/figures/table2")))   # mtd_fast.experiments.merge

`run_all` loads each dataset once, skips every spec whose result file is valid and was
made by the same spec (dataset, data folder, fraction, synthetic options, model, label,
seed, epochs, and the resolved configs on every field either side overrides or whose
default changed: `spec_mismatch`), and retrains the others (`adoption.adopt` takes another
study's finished run of the same spec under another label instead). A corrupt,
truncated or mismatching file is never merged: it is moved aside to `NAME.json.replaced`
(one line says why) and the run is redone. Each file is written atomically right after its run.

A run in progress trains in its own run directory, `OUT/.partial/<result file stem>/`
(`mtd_fast.rundir`: a checkpoint after every epoch and every CHECKPOINT_EVERY training
steps within one), so an interrupted study loses at most the last CHECKPOINT_EVERY steps:
the next invocation resumes that run from its last checkpoint, exactly where it stopped,
and removes the directory once the result file is written. A
partial run made by another spec (other config, data or epochs) is moved aside to
`<stem>.stale` and the run starts over. There is no lock: run one invocation per OUT
folder at a time.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import json
import logging
import math
import os
import re
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..config import LEGACY_VALUES
from ..metrics import METRIC_KEYS
from ..provenance import machine, source_commit
from .ranks import RANKS_SUFFIX, write_ranks
from .report import ExperimentError, atomic_save, atomic_write_json

__all__ = ["RunSpec", "result_path", "ranks_path", "run_all",
           "load_results", "read_result", "validate_record", "spec_mismatch", "config_mismatch", "load_spec_dataset",
           "dataset_part", "FORMAT", "FORMAT_VERSION"]

log = logging.getLogger("mtd_fast")

FORMAT = "mtd_fast/run-result"
FORMAT_VERSION = 1
PARTIAL_DIR = ".partial"  # OUT/.partial/<stem>/: the run directories of unfinished runs
# steps between mid-epoch checkpoints of a run in progress: 1-2 minutes of full-catalogue steps on
# these 2-core machines (0.3-0.6 s), against well under a second to write a checkpoint
CHECKPOINT_EVERY = 200
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")

def _as_items(value: Any, what: str) -> tuple[tuple[str, Any], ...]:
    """A dict (or pairs) -> sorted tuple of (name, value) pairs, so RunSpec stays hashable."""
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    out = []
    for pair in items:
        k, v = pair
        if not isinstance(k, str):
            raise ExperimentError(f"{what}: option names must be strings, got {k!r}")
        try:
            hash(v)
        except TypeError:
            raise ExperimentError(f"{what}: the value of {k!r} must be a scalar, got {v!r}") from None
        out.append((k, v))
    names = [k for k, _ in out]
    if len(set(names)) != len(names):
        raise ExperimentError(f"{what}: an option is given twice ({names})")
    return tuple(sorted(out))


def _norm(value: Any) -> Any:
    """What `value` reads back as from JSON (tuples become lists...): the form compared."""
    return json.loads(json.dumps(value, default=str))


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One training run of a study. `overrides` and `dataset_kwargs` may be given as dicts;
    they are stored as sorted tuples of pairs (hashable). `label` (default: the model name)
    names the row in tables and is part of the file name."""

    dataset: Optional[str] = "synthetic"  # a name as load_dataset takes it; None with root=PATH
    root: Optional[str] = None  # data folder (default $MTD_FAST_DATA/<name>)
    fraction: float = 1.0
    model: str = "mtd"
    seed: int = 0
    epochs: int = 30
    overrides: Any = ()  # MTDConfig / TrainConfig fields
    label: Optional[str] = None
    dataset_kwargs: Any = ()  # synthetic generator options (n_sessions, n_items, seed, avg_length)

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        set_("overrides", _as_items(self.overrides, "overrides"))
        set_("dataset_kwargs", _as_items(self.dataset_kwargs, "dataset_kwargs"))
        if self.root is not None:
            set_("root", os.fspath(self.root))
        if self.label is None:
            set_("label", str(self.model).lower())
        self.validate()

    def validate(self) -> None:
        """Everything that can be checked without data: raises before any training."""
        from ..models import model_class

        if self.dataset is None and self.root is None:
            raise ExperimentError("RunSpec needs a dataset name or root=PATH")
        if self.dataset_kwargs and self.dataset != "synthetic":
            raise ExperimentError(f"dataset_kwargs are options of the synthetic generator; dataset {self.dataset!r} "
                                  "takes none")
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) \
                or not 0.0 < self.fraction <= 1.0:
            raise ExperimentError(f"fraction={self.fraction!r} must be a number in (0, 1]")
        for name in ("seed", "epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or (name == "epochs" and v < 1):
                raise ExperimentError(f"{name}={v!r} must be an int" + (" >= 1" if name == "epochs" else ""))
        if not isinstance(self.label, str) or not _LABEL_RE.match(self.label):
            raise ExperimentError(f"label={self.label!r}: use letters, digits and . _ = + - (it names a file)")
        model_class(self.model)  # ValueError naming the known models
        self.configs()  # TypeError / ValueError / ConfigError naming the field

    def configs(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model config, train config) as dicts: the fields this spec trains with today
        (defaults, the ablation's fixed fields, the overrides)."""
        from ..config import MTDConfig, TrainConfig, split_overrides
        from ..models import ablation_overrides

        mkw, tkw = split_overrides(ablation_overrides(self.model, dict(self.overrides)))
        return dataclasses.asdict(MTDConfig(**mkw)), dataclasses.asdict(TrainConfig(**tkw))

    # ---- derived ----------------------------------------------------------------------------
    @property
    def overrides_dict(self) -> dict[str, Any]:
        return dict(self.overrides)

    @property
    def dataset_kwargs_dict(self) -> dict[str, Any]:
        return dict(self.dataset_kwargs)

    @property
    def dataset_key(self) -> str:
        """The dataset's name as `Dataset.name` reports it (a folder's name when dataset is None)."""
        return self.dataset if self.dataset is not None else (Path(self.root).name or "custom")

    @property
    def data_group(self) -> tuple:
        """Specs with the same group share one loaded dataset."""
        return (self.dataset, self.root, float(self.fraction), self.dataset_kwargs)

    def api_call(self) -> str:
        """The `mtd_fast` call that makes this run (recorded as `command` outside the CLI)."""
        args = [repr(self.dataset)]
        if self.root is not None:
            args.append(f"root={self.root!r}")
        if self.fraction != 1:
            args.append(f"fraction={self.fraction!r}")
        args += [f"{k}={v!r}" for k, v in self.dataset_kwargs]
        kw = "".join(f", {k}={v!r}" for k, v in self.overrides)
        return (f"mtd_fast.train(mtd_fast.load_dataset({', '.join(args)}), model={self.model!r}, "
                f"epochs={self.epochs}, seed={self.seed}{kw})")


def dataset_part(spec: RunSpec) -> str:
    part = spec.dataset_key
    if spec.fraction != 1:
        part += f"_frac{spec.fraction:g}"
    part += "".join(f"-{k}={v}" for k, v in spec.dataset_kwargs)
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", part)


def result_path(out_dir: os.PathLike | str, spec: RunSpec) -> Path:
    """`OUT/<dataset>[_frac<F>][-<synthetic options>]__<label>__seed<S>.json`."""
    return Path(out_dir) / f"{dataset_part(spec)}__{spec.label}__seed{spec.seed}.json"


def partial_path(out_dir: os.PathLike | str, spec: RunSpec) -> Path:
    """The run directory a spec trains in until its result file is written."""
    return Path(out_dir) / PARTIAL_DIR / result_path(out_dir, spec).stem


def checkpoint_path(out_dir: os.PathLike | str, spec: RunSpec) -> Path:
    """The model file beside the result file (written only when run_all(checkpoints=True))."""
    return result_path(out_dir, spec).with_suffix(".pt")


def ranks_path(out_dir: os.PathLike | str, spec: RunSpec) -> Path:
    """`<result file stem>.ranks.npz` beside the result file: the target's rank of every
    validation and test sample under the picked model (`write_ranks`)."""
    return result_path(out_dir, spec).with_suffix(RANKS_SUFFIX)


# ---- provenance ------------------------------------------------------------------------------
def cli_command(argv: Optional[Sequence[str]] = None) -> str:
    """The command line as typed: `mtd-fast ARGS` (sys.argv's tail when argv is None)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["mtd-fast", *args])


def _make_record(spec: RunSpec, result, ds, stats: dict[str, Any], command: str, wall: float,
                 resumed_at: int = 0, code_versions: Optional[list] = None) -> dict[str, Any]:
    import torch

    commit, dirty = source_commit()
    if code_versions is None:
        code_versions = [{"from_epoch": 1, "commit": commit, "commit_dirty": dirty}]
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "dataset": ds.name, "model": spec.model, "label": spec.label, "seed": spec.seed,
        "metrics": result.metrics, "best_epoch": result.best_epoch, "epochs": spec.epochs,
        "epochs_run": len(result.history), "fraction": spec.fraction, "root": spec.root,
        "data_folder": data_folder(spec),
        "dataset_kwargs": spec.dataset_kwargs_dict, "dataset_rec_frequency": ds.rec_frequency,
        "overrides": spec.overrides_dict,
        "model_config": dataclasses.asdict(result.model_config),
        "train_config": dataclasses.asdict(result.train_config),
        "history": result.history, "backends": result.backends, "stats": stats, "command": command,
        "commit": commit, "commit_dirty": dirty, "torch": torch.__version__, "machine": machine(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "wall_seconds": wall,
        # epochs an interrupted invocation had done before this one resumed the run (wall_seconds
        # counts this invocation only; the history has every epoch's seconds)
        "resumed_at_epoch": resumed_at,
        # the code that trained each stretch of epochs (a resumed run may span commits; "commit"
        # above is the one that finished it)
        "code_versions": code_versions,
    }


# ---- validity --------------------------------------------------------------------------------
_REQUIRED = {"dataset": str, "model": str, "label": str, "seed": int, "metrics": dict, "epochs": int,
             "fraction": (int, float), "overrides": dict, "model_config": dict, "train_config": dict,
             "history": list, "stats": dict, "command": str, "date": str}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_record(obj: Any) -> Optional[str]:
    """None for a complete result record, else what is wrong with it."""
    if not isinstance(obj, dict):
        return "not a JSON object"
    if obj.get("format") != FORMAT:
        return f"no {FORMAT!r} format marker"
    if obj.get("format_version") != FORMAT_VERSION:
        return f"format version {obj.get('format_version')!r}, this install reads {FORMAT_VERSION}"
    for key, typ in _REQUIRED.items():
        if key not in obj:
            return f"key {key!r} is missing"
        if not isinstance(obj[key], typ) or isinstance(obj[key], bool):
            return f"key {key!r} has the wrong type"
    m = obj["metrics"]
    for k in METRIC_KEYS:
        if not isinstance(m.get(k), (int, float)) or not math.isfinite(m[k]):
            return f"metrics[{k!r}] is missing or not a finite number"
    if "best_on_test" not in m:
        return "metrics['best_on_test'] is missing"
    bot = m["best_on_test"]
    if bot is not None and not (isinstance(bot, dict) and all(_finite(bot.get(k)) for k in METRIC_KEYS)):
        return "metrics['best_on_test'] is neither null nor a complete set of finite metrics"
    hist = obj["history"]
    if not hist or not all(isinstance(h, dict) for h in hist):
        return "the per-epoch history is empty or malformed"
    if len(hist) > obj["epochs"]:
        return f"{len(hist)} epochs in the history, more than its epochs={obj['epochs']}"
    if [h.get("epoch") for h in hist] != list(range(1, len(hist) + 1)):
        return "the history's epochs are not 1, 2, ... in order"
    for h in hist:
        if not _finite(h.get("train_seconds")) or h["train_seconds"] < 0:
            return f"history epoch {h['epoch']}: train_seconds is missing or not a finite number >= 0"
        for part in ("valid", "test"):
            v = h.get(part)
            if v is not None and not (isinstance(v, dict) and all(_finite(v.get(k)) for k in METRIC_KEYS)):
                return f"history epoch {h['epoch']}: {part!r} is neither null nor a complete set of finite metrics"
    be = obj.get("best_epoch")
    if not isinstance(be, int) or not any(h["epoch"] == be for h in obj["history"]):
        return f"best_epoch {be!r} is not an epoch of the history"
    return None


# Fields whose DEFAULT changed after result files had been written (config.LEGACY_VALUES holds
# the old behaviour), and the models that read them: compared even when neither the spec nor
# the record overrides them, so a file made under an old default never counts as a run of the
# new one (graph_mode and score_norm were chosen by the graph-integration study, repeat_bias in
# README "Re-clicks"; MTD-lo has no graph to integrate).
_MTD_FAMILY = ("mtd", "mtd-va", "mtd-at", "mtd-lo", "mtd-ga")
DEFAULT_CHANGED: dict[str, tuple[str, ...]] = {"graph_mode": tuple(m for m in _MTD_FAMILY if m != "mtd-lo"),
                                               "score_norm": _MTD_FAMILY, "repeat_bias": _MTD_FAMILY}
_MISSING = object()


def config_mismatch(record: dict[str, Any], spec: RunSpec) -> Optional[str]:
    """None when the record's resolved configs agree with what `spec` resolves to today on
    every field either side overrides and every field whose default changed (for the models
    that read it), else the first difference. Fields neither side names took their defaults
    in both, so overrides {"score_norm": True} and {} are the same run while that is the default."""
    from ..config import MTDConfig

    model_cfg, train_cfg = spec.configs()
    model_fields = {f.name for f in dataclasses.fields(MTDConfig)}
    names = set(spec.overrides_dict) | set(record.get("overrides") or {})
    names |= {k for k, models in DEFAULT_CHANGED.items() if spec.model.lower() in models}
    for name in sorted(names):
        part, want = ("model_config", model_cfg) if name in model_fields else ("train_config", train_cfg)
        if name not in want:
            return f"{name!r} is not a config field of this install"
        have = (record.get(part) or {}).get(name, LEGACY_VALUES.get(name, _MISSING))
        if have is _MISSING:
            return f"the record's {part} has no {name!r}"
        if _norm(have) != _norm(want[name]):
            return f"{name} {have!r} != {want[name]!r}"
    return None


def spec_mismatch(record: dict[str, Any], spec: RunSpec, *, label: bool = True) -> Optional[str]:
    """None when `record` is a run of `spec`, else the first difference: the same dataset,
    data folder, fraction, synthetic options, model, seed, epochs cap, label (unless
    `label=False`) and resolved configs (`config_mismatch`)."""
    want = {"dataset": spec.dataset_key, "model": spec.model, "seed": spec.seed, "epochs": spec.epochs,
            "dataset_kwargs": _norm(spec.dataset_kwargs_dict)}
    if label:
        want["label"] = spec.label
    for key, value in want.items():
        have = record.get(key, {} if key == "dataset_kwargs" else None)
        if have != value:
            return f"{key} {have!r} != {value!r}"
    if not math.isclose(float(record["fraction"]), float(spec.fraction), rel_tol=1e-12):
        return f"fraction {record['fraction']!r} != {spec.fraction!r}"
    # the data folder, by real path (a name alone says nothing about which copy of the data;
    # files from before the record had data_folder are compared by their root, if any)
    have = record.get("data_folder") or (os.path.realpath(record["root"]) if record.get("root") else None)
    want = data_folder(spec)
    if have is not None and want is not None and have != want:
        return f"data folder {have!r} != {want!r}"
    return config_mismatch(record, spec)


def read_result(path: Path) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """(record, None) or (None, problem) for the file at `path`."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        return None, f"unreadable ({type(exc).__name__})"
    except json.JSONDecodeError as exc:
        return None, f"corrupt or truncated JSON ({exc.msg} at line {exc.lineno})"
    problem = validate_record(obj)
    return (None, problem) if problem else (obj, None)


def load_results(out_dir: os.PathLike | str, specs: Optional[Sequence[RunSpec]] = None) -> list[dict[str, Any]]:
    """The valid result records in `out_dir` (sorted by file name), or, with `specs`, the
    records of those specs that are valid and match them, in the specs' order."""
    out_dir = Path(out_dir)
    if specs is not None:
        out = []
        for spec in specs:
            rec, _ = read_result(result_path(out_dir, spec)) if result_path(out_dir, spec).is_file() else (None, None)
            if rec is not None and spec_mismatch(rec, spec) is None:
                out.append(rec)
        return out
    if not out_dir.is_dir():
        return []
    records = []
    for path in sorted(out_dir.glob("*.json")):
        rec, _ = read_result(path)
        if rec is not None:
            records.append(rec)
    return records


# ---- running ---------------------------------------------------------------------------------
def check_writable(folder: os.PathLike | str) -> Path:
    """Create `folder` and prove a file can be written there, or raise one clear error."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write_probe"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ExperimentError(f"cannot write results to {folder}: {exc.strerror or exc}") from None
    return folder


def check_data(spec: RunSpec) -> None:
    """Fail early on an unknown dataset name or a missing data folder (before any training)."""
    from ..data import DATASETS, DataError, dataset_dir

    if spec.dataset == "synthetic" or (spec.dataset is None and spec.root is None):
        return
    if spec.dataset is not None and spec.dataset not in DATASETS:
        raise DataError(f"unknown dataset {spec.dataset!r}: use one of {', '.join(['synthetic', *DATASETS])}, "
                        "or a data folder")
    root = Path(spec.root) if spec.root is not None else dataset_dir(spec.dataset)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (dataset {spec.dataset_key!r})")


def data_folder(spec: RunSpec) -> Optional[str]:
    """The real path of the folder a spec reads (its root, else the named dataset's folder
    under the data root); None for synthetic data or when no folder can be named."""
    from ..data import DataError, dataset_dir

    if spec.dataset == "synthetic" or (spec.dataset is None and spec.root is None):
        return None
    try:
        return os.path.realpath(spec.root if spec.root is not None else dataset_dir(spec.dataset))
    except DataError:
        return None


def load_spec_dataset(spec: RunSpec):
    """The dataset a spec trains on (`load_dataset` with its name, root, fraction and options)."""
    from ..data import load_dataset

    return load_dataset(spec.dataset, root=spec.root, fraction=spec.fraction, **spec.dataset_kwargs_dict)


class _StudyBar:
    """One line for the whole study, above the per-epoch bars: runs done / total and an
    ETA from the runs finished in this invocation (skipped runs cost nothing)."""

    def __init__(self, total: int, done: int, quiet: bool) -> None:
        self.total, self.done, self.quiet = total, done, quiet
        self.seconds: list[float] = []
        self.bar = None
        if not quiet and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, position=0, leave=True, dynamic_ncols=True,
                            bar_format="study: {n_fmt}/{total_fmt} runs |{bar}| {desc}")
            self._postfix("")

    def _postfix(self, current: str) -> None:
        left = self.total - self.done
        eta = "ETA ?" if not self.seconds else f"ETA {_hms(statistics.fmean(self.seconds) * left)}"
        self.bar.set_description_str(f"{eta}  {current}".rstrip())

    def start(self, what: str) -> None:
        if self.bar is not None:
            self._postfix(f"now: {what}")

    def finish(self, seconds: float) -> None:
        self.done += 1
        self.seconds.append(seconds)
        if self.bar is not None:
            self.bar.update(1)
            self._postfix("")

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def plan(specs: Sequence[RunSpec], out_dir: os.PathLike | str, checkpoints: bool = False) -> list[Optional[str]]:
    """For each spec: None when its result can be reused, else why it must run
    ("missing", or what is wrong with the file that is there)."""
    out = []
    for spec in specs:
        path = result_path(out_dir, spec)
        if not path.is_file():
            out.append("missing")
            continue
        rec, problem = read_result(path)
        if rec is not None:
            problem = spec_mismatch(rec, spec)
            if problem:
                problem = f"made by another spec ({problem})"
        if problem is None and checkpoints and not checkpoint_path(out_dir, spec).is_file():
            problem = "its checkpoint is missing"
        out.append(problem)
    return out


def run_all(specs: Sequence[RunSpec], out_dir: os.PathLike | str, *, quiet: bool = False, backend: Any = None,
            command: Optional[str] = None, checkpoints: bool = False,
            checkpoint_every: Optional[int] = CHECKPOINT_EVERY, ranks: bool = True) -> list[dict[str, Any]]:
    """Train every spec whose result is not already in `out_dir`; return all their records.

    `command`: what to record as the command line (the CLI passes it); by default each
    record gets the equivalent `mtd_fast.train(...)` call. `checkpoints=True` also saves
    each trained model beside its result (`.pt`) and treats a missing one as not done.
    `checkpoint_every`: training steps between the mid-epoch checkpoints of a run in
    progress (`train(checkpoint_every=...)`; None: at epoch ends only), so an interrupted
    invocation loses at most that many steps of a long epoch.
    `ranks=True` (default) also writes each run's rank file (`ranks_path`: the target's rank
    of every validation and test sample under the picked model, one byte each), which paired
    comparisons between runs read (`experiments.paired`); a result without one is still done.
    """
    from ..train import train

    source_commit()  # read before any data loads (cached): a commit made meanwhile is not this code
    specs = list(specs)
    for s in specs:
        if not isinstance(s, RunSpec):
            raise ExperimentError(f"run_all takes RunSpec objects, got {type(s).__name__}")
    paths = [result_path(out_dir, s) for s in specs]
    seen: dict[Path, RunSpec] = {}
    for s, p in zip(specs, paths):
        if p in seen and seen[p] != s:
            raise ExperimentError(f"two different specs write {p.name}: give them different labels")
        seen[p] = s
    out_dir = check_writable(out_dir)
    todo = plan(specs, out_dir, checkpoints)
    for s, why in zip(specs, todo):  # every data folder is checked before the first run
        if why is not None:
            check_data(s)

    records: dict[int, dict[str, Any]] = {}
    for i, why in enumerate(todo):
        if why is None:
            records[i] = read_result(paths[i])[0]
            # an interruption between writing the result and removing the partial run left it
            shutil.rmtree(partial_path(out_dir, specs[i]), ignore_errors=True)
    pending = [i for i, why in enumerate(todo) if why is not None]
    unique_pending = list(dict.fromkeys(specs[i] for i in pending))
    bar = _StudyBar(len(set(specs)), len(set(specs)) - len(unique_pending), quiet)
    try:
        for i, why in enumerate(todo):
            if why not in (None, "missing"):
                bar.write(f"redo {paths[i].name}: {why}")
        groups: dict[tuple, list[int]] = {}
        for i in pending:
            groups.setdefault(specs[i].data_group, []).append(i)
        for idxs in groups.values():
            ds = load_spec_dataset(specs[idxs[0]])
            stats = ds.stats()
            for i in idxs:
                s = specs[i]
                if i in records:  # a duplicate spec, already run in this call
                    continue
                old = paths[i]
                if old.is_file():  # corrupt, partial or mismatching: never merged, kept aside
                    os.replace(old, old.with_name(old.name + ".replaced"))
                what = f"{dataset_part(s)} {s.label} seed {s.seed}"
                bar.start(what)
                t0 = time.perf_counter()
                run_dir = partial_path(out_dir, s)
                res, resumed_at = _train_resumably(train, ds, s, run_dir, backend, quiet, bar, checkpoint_every)
                wall = time.perf_counter() - t0
                versions = _code_versions(run_dir, len(res.history))
                rec = _make_record(s, res, ds, stats, command or s.api_call(), wall, resumed_at, versions)
                if ranks:
                    rec["ranks"] = write_ranks(ranks_path(out_dir, s), res.model, ds,
                                               res.train_config.eval_batch_size)
                if checkpoints:
                    from ..serialization import save

                    atomic_save(checkpoint_path(out_dir, s), lambda tmp: save(res.model, tmp))
                atomic_write_json(old, rec)
                shutil.rmtree(run_dir, ignore_errors=True)
                rec = json.loads(json.dumps(rec, default=str))  # exactly what the file holds
                for j in idxs:
                    if specs[j] == s:
                        records[j] = rec
                bar.finish(wall)
                if not quiet:
                    bar.write(f"[{bar.done}/{bar.total}] {what}: best epoch {rec['best_epoch']}, test P@20 "
                              f"{rec['metrics']['P@20']:.2f} MRR@20 {rec['metrics']['MRR@20']:.2f} "
                              f"({_hms(wall)}) -> {old}")
    finally:
        bar.close()
    return [records[i] for i in range(len(specs))]


def _partial_epochs(run_dir: Path) -> tuple[Optional[int], int]:
    """(the epochs cap the partial run in `run_dir` was started with, or None when its
    run.json cannot be read; how many epoch lines it has written)."""
    from ..rundir import EPOCHS_FILE, RUN_FILE

    try:
        epochs = json.loads((run_dir / RUN_FILE).read_text())["identity"]["epochs"]
    except (OSError, ValueError, KeyError, TypeError):
        epochs = None
    try:
        done = sum(1 for line in (run_dir / EPOCHS_FILE).read_text().splitlines() if line.strip())
    except OSError:
        done = 0
    return (epochs if isinstance(epochs, int) else None), done


def _set_aside(run_dir: Path, why: str, bar) -> None:
    stale = run_dir.with_name(run_dir.name + ".stale")
    shutil.rmtree(stale, ignore_errors=True)
    if stale.exists():  # not removable (permissions?): keep the newer one under a unique name
        stale = run_dir.with_name(f"{run_dir.name}.stale-{int(time.time())}")
    os.replace(run_dir, stale)
    bar.write(f"partial run {run_dir} cannot be resumed ({why}); moved to {stale.name}, starting over")


def _resumed_after(run_dir: Path, lines: int) -> int:
    """The epoch the resumed checkpoint held (the run record's last resume; `lines`, the epoch
    lines found before resuming, when the record cannot say): the line count alone is off when
    the run died between its checkpoint and its epoch line, or fell back to an older checkpoint."""
    from ..rundir import RUN_FILE

    try:
        after = json.loads((run_dir / RUN_FILE).read_text())["resumes"][-1]["after_epoch"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return lines
    return after if isinstance(after, int) and not isinstance(after, bool) else lines


def _code_versions(run_dir: Path, epochs_run: int) -> Optional[list]:
    """The code versions a run directory records for its `epochs_run` epochs (None without a run record)."""
    from ..rundir import RUN_FILE, RunDir

    return RunDir(run_dir).code_versions(epochs_run) if (run_dir / RUN_FILE).is_file() else None


def _train_resumably(train, ds, spec: RunSpec, run_dir: Path, backend: Any, quiet: bool, bar,
                     checkpoint_every: Optional[int] = None):
    """Train `spec` in `run_dir`, resuming the partial run there when the same spec made it;
    a partial run made by another one (other config, data or epochs cap) is moved aside and
    the run starts over. Returns (result, the number of epochs the resumed run had done)."""
    from ..rundir import RUN_FILE, RunDirError

    kw = dict(model=spec.model, epochs=spec.epochs, seed=spec.seed, backend=backend, quiet=quiet,
              checkpoint_every=checkpoint_every, **spec.overrides_dict)
    if (run_dir / RUN_FILE).is_file():
        epochs, done = _partial_epochs(run_dir)
        if epochs is not None and epochs != spec.epochs:
            # the trainer lets a resume change epochs; a result file must come from one cap
            _set_aside(run_dir, f"it was started with epochs={epochs}, this spec has epochs={spec.epochs}", bar)
        else:
            try:
                res = train(ds, run_dir=run_dir, resume=True, **kw)
                return res, _resumed_after(run_dir, done)
            except RunDirError as exc:
                _set_aside(run_dir, str(exc), bar)
    elif run_dir.exists():  # a folder without a run record: a start that crashed before writing one
        shutil.rmtree(run_dir)
    return train(ds, run_dir=run_dir, **kw), 0
