"""Run directories: what a training run leaves behind as it goes, and what `resume` reads.

`train(..., run_dir=PATH)` / `mtd-fast train --run-dir PATH` writes into PATH:

- `run.json`: the format marker, the run's identity (model, seed, backend spec, both
  resolved configs, the dataset's name, counts and content hash, world size), and
  provenance (command, API call, package version, commit, torch, machine, date), plus
  `resumes`: one entry per resumption (the epochs done, and the command, commit and date
  of the process that went on), so a run trained by several versions of the code says
  which trained which epochs;
- `epochs.jsonl`: one JSON line per recommendation epoch (losses, graph phase,
  validation/test metrics, seconds), the `TrainResult.history` entry;
- `curves.png`: losses and validation (and test) P@20 / MRR@20 per epoch, redrawn after
  each epoch (needs matplotlib; skipped with one log line without it);
- `checkpoint_last.pt`: the whole training state after every epoch and every graph
  phase (model, both optimizers, every RNG state, schedule position, best-so-far weights,
  metrics and patience counter), and with `train(checkpoint_every=N)` after every N-th
  step within an epoch too (plus the epoch's progress: format version 2);
  `checkpoint_best.pt`: the same state at the best validation epoch so far. Only these
  two are kept;
- `result.json`: the final metrics once the run has ended.

Every file is replaced atomically (temporary file in the folder, fsync, rename), so a
crash at any instant leaves the previous version whole. Checkpoints carry a SHA-256 of
their contents (`serialization.state_digest`): a corrupt or truncated last checkpoint is
reported and the best one (an earlier, complete state) is used instead. Because training
is deterministic on the CPU, resuming from any complete checkpoint replays the same run.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .provenance import __version__, machine, source_commit
from .serialization import ModelFileError, check_format, read_payload, state_digest

__all__ = ["RunDir", "RunDirError", "dataset_identity", "provenance", "curves_png", "RUN_FORMAT", "RUN_VERSION",
           "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION"]

log = logging.getLogger("mtd_fast")

RUN_FORMAT, RUN_VERSION = "mtd_fast.run", 1
# version 2: a mid-epoch checkpoint (`partial_epoch`); epoch-end checkpoints stay version 1, so
# code from before mid-epoch checkpoints resumes from those and refuses (skips) the others
CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "mtd_fast.checkpoint", 2
RUN_FILE, EPOCHS_FILE, CURVES_FILE, RESULT_FILE = "run.json", "epochs.jsonl", "curves.png", "result.json"
LAST, BEST = "checkpoint_last.pt", "checkpoint_best.pt"
_RUN_FILES = (RUN_FILE, EPOCHS_FILE, LAST, BEST, RESULT_FILE)
# identity keys that may change between a run and its resumption: `epochs` extends or shortens
# the schedule without changing any step before the new end
_MAY_CHANGE = ("epochs",)


class RunDirError(ValueError):
    """A run directory that cannot be started or resumed; the message names the folder and why."""


def _atomic_bytes(path: Path, data: bytes) -> None:
    from .experiments.report import atomic_save  # temp file in the folder, fsync, os.replace

    atomic_save(path, lambda tmp: Path(tmp).write_bytes(data))
    os.chmod(path, 0o644)  # the temporary file was private (mkstemp); the run's records are not
    try:  # make the rename itself durable (matters on power loss, not on a killed process)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, default=str) + "\n").encode()


def dataset_identity(ds) -> dict[str, Any]:
    """Name, counts and a content hash of the dataset as loaded (after fraction, the split and
    compact_ids), plus the SHA-256 of its source files when it was read from a folder."""
    content = state_digest({"sessions": [ds.sessions.offsets, ds.sessions.items],
                            "test": [ds.test.prefixes.offsets, ds.test.prefixes.items, ds.test.targets],
                            "n_items": ds.n_items, "min_prefix": ds.min_prefix, "valid_fraction": ds.valid_fraction,
                            "original_ids": getattr(ds, "original_ids", None)})
    ident = {"name": ds.name, "source": ds.source, "n_items": ds.n_items, "train_sessions": len(ds.train_sessions),
             "valid_sessions": len(ds.valid_sessions), "train_samples": len(ds.train),
             "valid_samples": len(ds.valid), "test_samples": len(ds.test), "content_sha256": content}
    files = {}
    if ds.source and Path(ds.source).is_dir():
        import hashlib

        for name in ("all_train_seq.txt", "train.txt", "test.txt"):
            f = Path(ds.source) / name
            if f.is_file():
                h = hashlib.sha256()
                with open(f, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 22), b""):
                        h.update(block)
                files[name] = h.hexdigest()
    ident["files_sha256"] = files
    return ident


def _same_data(old: Any, new: Any) -> bool:
    """True when two `dataset_identity` records hold the same data: equal content hash and
    source-file hashes. Then only the folder's spelling differs (relative or absolute path,
    another working directory, a link), which must not throw a partial run away."""
    if not (isinstance(old, Mapping) and isinstance(new, Mapping)) or not old.get("content_sha256"):
        return False
    return all(old.get(k) == new.get(k) for k in ("content_sha256", "files_sha256"))


def _with_new_defaults(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`old` with every config field that a later version of mtd_fast added filled in, where
    the resuming run has it at its default: a new option defaults to the old behaviour, so a
    run started before the option existed is the same run (a convergence run may span
    several versions). A new field set to anything else still refuses the resume."""
    from .config import MTDConfig, TrainConfig

    out = dict(old)
    for key, cls in (("model_config", MTDConfig), ("train_config", TrainConfig)):
        if isinstance(old.get(key), Mapping) and isinstance(new.get(key), Mapping):
            defaults = json.loads(json.dumps(dataclasses.asdict(cls()), default=str))
            out[key] = {**{k: v for k, v in new[key].items() if k not in old[key] and k in defaults
                           and v == defaults[k]}, **old[key]}
    return out


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Human-readable paths where two JSON-like values differ."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{k}" if path else str(k)
            if k not in old:
                out.append(f"{sub}: absent in the run directory, {new[k]!r} now")
            elif k not in new:
                out.append(f"{sub}: {old[k]!r} in the run directory, absent now")
            else:
                out += _differences(old[k], new[k], sub)
        return out
    if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _differences(a, b, f"{path}[{i}]")]
    return [] if old == new else [f"{path}: {old!r} in the run directory, {new!r} now"]


class RunDir:
    """One run directory. Only the main process (rank 0) writes; `writer=False` makes every
    write a no-op, so the trainer calls the same methods on every rank."""

    def __init__(self, path: os.PathLike | str, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer
        self._curves_ok = True

    # ---- starting / resuming ------------------------------------------------------------------
    @staticmethod
    def check(path: os.PathLike | str, resume: bool) -> None:
        """The checks that need no identity: run before any training or data work."""
        p = Path(path)
        if resume:
            if not p.exists():
                raise RunDirError(f"resume: run directory {p} does not exist (start a run there with run_dir= and "
                                  "resume=False first)")
            if not p.is_dir():
                raise RunDirError(f"resume: {p} is not a folder")
            if not (p / RUN_FILE).is_file():
                what = "is empty" if not any(p.iterdir()) else f"holds no {RUN_FILE}"
                raise RunDirError(f"resume: run directory {p} {what}: nothing to resume (was the run started with "
                                  "run_dir= pointing here?)")
            return
        if p.exists() and not p.is_dir():
            raise RunDirError(f"run_dir {p} exists and is not a folder")
        if p.is_dir():
            held = [f for f in _RUN_FILES if (p / f).exists()]
            if held:
                raise RunDirError(f"run directory {p} already holds a run ({', '.join(held)}): pass resume=True "
                                  "(--resume) to continue it, or choose another folder")
        try:
            p.mkdir(parents=True, exist_ok=True)
            probe = p / ".write_probe"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise RunDirError(f"cannot write to run directory {p}: {exc.strerror or exc}") from None

    def start(self, identity: dict[str, Any], provenance: dict[str, Any]) -> None:
        """Write run.json for a new run."""
        if self.writer:
            record = {"format": RUN_FORMAT, "version": RUN_VERSION, "identity": identity, **provenance}
            _atomic_bytes(self.path / RUN_FILE, _json_bytes(record))

    def note_resume(self, epochs_done: int, provenance: dict[str, Any], steps_done: int = 0) -> None:
        """Append to run.json's `resumes` the process that goes on after `epochs_done` epochs
        (and `steps_done` steps of the next one, from a mid-epoch checkpoint: `after_step`)."""
        if not self.writer:
            return
        f = self.path / RUN_FILE
        record = json.loads(f.read_text())
        entry = {"after_epoch": int(epochs_done), **({"after_step": int(steps_done)} if steps_done else {}),
                 **{k: provenance[k] for k in ("commit", "commit_dirty", "command")}, "date": provenance["created"]}
        record["resumes"] = [*record.get("resumes", []), entry]
        _atomic_bytes(f, _json_bytes(record))

    def code_versions(self, epochs_run: Optional[int] = None) -> list[dict[str, Any]]:
        """[{"from_epoch", "commit", "commit_dirty"}]: the code that trained each stretch of epochs,
        from run.json (the start and every resumption; consecutive equal commits merged). A
        resumption from a mid-epoch checkpoint starts its stretch at step `from_step` (> 1) of
        `from_epoch`. With `epochs_run`, a resumption after the last epoch (one that only finished
        the run: the final test of a run that had already stopped) is left out: it trained no epoch."""
        record = json.loads((self.path / RUN_FILE).read_text())
        out: list[dict[str, Any]] = []
        starts = [((1, 1), record), *(((e["after_epoch"] + 1, e.get("after_step", 0) + 1), e)
                                      for e in record.get("resumes", []))]
        for start, r in starts:
            version = {"commit": r.get("commit"), "commit_dirty": r.get("commit_dirty")}
            # a resume from an earlier checkpoint redoes what came after it
            out = [v for v in out if (v["from_epoch"], v.get("from_step", 1)) < start]
            if not out or {k: out[-1][k] for k in version} != version:
                out.append({"from_epoch": start[0], **({"from_step": start[1]} if start[1] > 1 else {}), **version})
        return [v for v in out if epochs_run is None or v["from_epoch"] <= max(epochs_run, 1)]

    def check_identity(self, identity: dict[str, Any]) -> None:
        """Refuse to resume a run made with another config, dataset, backend or world size."""
        f = self.path / RUN_FILE
        try:
            record = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RunDirError(f"resume: {f} cannot be read ({type(exc).__name__}: {exc})") from None
        check_format(record, RUN_FORMAT, RUN_VERSION, f"resume: {f}:", "run record", RunDirError)
        old = {k: v for k, v in (record.get("identity") or {}).items() if k not in _MAY_CHANGE}
        new = {k: v for k, v in json.loads(json.dumps(identity, default=str)).items() if k not in _MAY_CHANGE}
        diffs = [d for d in _differences(_with_new_defaults(old, new), new)
                 if not (d.startswith("dataset.source:") and _same_data(old.get("dataset"), new.get("dataset")))]
        if diffs:
            more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
            raise RunDirError(f"resume: run directory {self.path} was made by another run: " + "; ".join(diffs[:3])
                              + more + ". Resume with the same settings and data, or start a new run_dir")

    # ---- per-epoch records ----------------------------------------------------------------------
    def write_epochs(self, history: list[dict[str, Any]]) -> None:
        """Rewrite epochs.jsonl from the history (at resume: drop lines of epochs that the
        checkpoint does not hold, written after it by the run that died)."""
        if self.writer:
            text = "".join(json.dumps(h, default=str) + "\n" for h in history)
            _atomic_bytes(self.path / EPOCHS_FILE, text.encode())

    def append_epoch(self, entry: dict[str, Any]) -> None:
        if not self.writer:
            return
        with open(self.path / EPOCHS_FILE, "a") as fh:
            fh.write(json.dumps(entry, default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._write_curves_safely(entry)

    def _write_curves_safely(self, entry: dict[str, Any]) -> None:
        if not self._curves_ok:
            return
        try:
            history = [json.loads(line) for line in (self.path / EPOCHS_FILE).read_text().splitlines() if line]
            _atomic_bytes(self.path / CURVES_FILE, curves_png(history))
        except ImportError:
            self._curves_ok = False
            log.info("run directory %s: matplotlib is not installed, so no curves.png (pip install matplotlib)",
                     self.path)

    def write_result(self, result: dict[str, Any]) -> None:
        if self.writer:
            _atomic_bytes(self.path / RESULT_FILE, _json_bytes(result))

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any], best: bool) -> None:
        """Write the state to checkpoint_last.pt (and checkpoint_best.pt when `best`)."""
        if not self.writer:
            return
        version = 2 if state.get("partial_epoch") is not None else 1
        payload = {"format": CHECKPOINT_FORMAT, "version": version, "state": state}
        payload["digest"] = state_digest(payload)
        buf = io.BytesIO()
        torch.save(payload, buf)
        data = buf.getvalue()
        _atomic_bytes(self.path / LAST, data)
        if best:
            _atomic_bytes(self.path / BEST, data)

    def load_checkpoint(self) -> Optional[tuple[dict[str, Any], Path]]:
        """(state, file) of the newest complete checkpoint; None when the run never wrote one.
        A broken last checkpoint is reported and the best one used; both broken raise."""
        if self.writer:  # temporary files of writes that a crash interrupted (never renamed into place)
            for tmp in self.path.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
        problems = []
        for name in (LAST, BEST):
            f = self.path / name
            if not f.exists():
                continue
            try:
                payload = read_payload(f, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "checkpoint")
                state = payload.get("state")
                if not isinstance(state, dict):
                    raise ModelFileError(f"{f}: holds no training state")
            except ModelFileError as exc:
                problems.append(str(exc))
                log.warning("resume: %s; trying the previous checkpoint", exc)
                continue
            if problems:
                log.warning("resume: using %s (epoch %s) because %s", f, state.get("position", {}).get("epoch"),
                            problems[0])
            return state, f
        if problems:
            raise RunDirError("resume: no usable checkpoint in " f"{self.path}: " + " | ".join(problems))
        return None


# the command line as typed, set by the CLI (`mtd-fast ...`); None: this process's sys.argv
CLI_COMMAND: Optional[str] = None


def provenance(api_call: str) -> dict[str, Any]:
    """Command, API call, versions, commit, machine and date of this process."""
    commit, dirty = source_commit()
    command = CLI_COMMAND if CLI_COMMAND is not None else shlex.join(sys.argv)
    return {"command": command, "api_call": api_call,
            "mtd_fast_version": __version__, "commit": commit, "commit_dirty": dirty, "torch": torch.__version__,
            "machine": machine(), "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def curves_png(history: list[dict[str, Any]]) -> bytes:
    """PNG bytes: training (and graph) loss, and validation (dashed: test) P@20 / MRR@20 per epoch.
    Uses matplotlib's object API only: no pyplot, no global backend change in the user's process."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for key, label in (("train_loss", "training loss"), ("graph_loss", "graph (DGI) loss")):
        pts = [(e, h[key]) for e, h in zip(epochs, history) if h.get(key) is not None]
        if pts:
            ax1.plot(*zip(*pts), marker="o", label=label)
    ax1.set_xlabel("epoch")
    ax1.set_title("loss")
    for split, style in (("valid", "-"), ("test", "--")):
        for metric in ("P@20", "MRR@20"):
            pts = [(e, h[split][metric]) for e, h in zip(epochs, history) if h.get(split)]
            if pts:
                ax2.plot(*zip(*pts), style, marker="o", label=f"{split} {metric}")
    ax2.set_xlabel("epoch")
    ax2.set_title("metrics (x100)")
    for ax in (ax1, ax2):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
