"""Another study's finished run as this study's row (`mtd-fast experiment NAME --adopt FILE...`).

A result file is a run of a spec when `runner.spec_mismatch` finds no difference; with the
label set aside, the same run can be what two studies mean by two labels (a graph_modes
variant that became the default is Table 2's MTD). `adopt` copies it, with its rank file,
under the spec's label and overrides and records where it came from (`adopted_from`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .ranks import RANKS_SUFFIX
from .report import ExperimentError, atomic_save, atomic_write_json
from .runner import RunSpec, check_writable, ranks_path, read_result, result_path, spec_mismatch

__all__ = ["adopt", "adopt_files"]


def _read(source: Path) -> dict:
    rec, problem = read_result(source) if source.is_file() else (None, "no such file")
    if rec is None:
        raise ExperimentError(f"cannot adopt {source}: {problem}")
    return rec


def adopt(source: os.PathLike | str, spec: RunSpec, out_dir: os.PathLike | str) -> Path:
    """Copy the finished result file `source` (and its rank file) into `out_dir` as the result
    of `spec`, when it is a run of `spec` under another label: the same dataset, data folder,
    fraction, model, seed, epochs cap and resolved configs (`spec_mismatch(label=False)`), as
    when a variant of one study is what another study's row now means. The copy gets the
    spec's label and overrides and an `adopted_from` block (the source file's name, label,
    overrides and command); metrics, history and provenance stay the source's. Another valid
    result of `spec` already in `out_dir` is kept (ExperimentError); any other file there is moved
    aside to `NAME.json.replaced`; the file `adopt` made from the same `source` before is
    written again (the same command rerun adopts nothing new). Returns the path written."""
    source = Path(source)
    rec = _read(source)
    why = spec_mismatch(rec, spec, label=False)
    if why is not None:
        raise ExperimentError(f"cannot adopt {source} as {spec.label!r}: it is not a run of that spec ({why})")
    return _copy(source, rec, spec, out_dir)


def _copy(source: Path, rec: dict, spec: RunSpec, out_dir: os.PathLike | str) -> Path:
    """`adopt`'s copy of `source` (read as `rec`, already a run of `spec`)."""
    dest = result_path(check_writable(out_dir), spec)
    if dest.resolve() == source.resolve():
        raise ExperimentError(f"{source} is already the result file of {spec.label!r}")
    new = {**rec, "label": spec.label, "overrides": spec.overrides_dict,
           "adopted_from": {"file": source.name, "label": rec["label"], "overrides": rec["overrides"],
                            "command": rec["command"]}}
    if rec.get("ranks"):
        new["ranks"] = {**rec["ranks"], "file": ranks_path(out_dir, spec).name}
    if dest.is_file():
        have, _ = read_result(dest)
        if have is None or spec_mismatch(have, spec) is not None:
            os.replace(dest, dest.with_name(dest.name + ".replaced"))
        elif have != new:  # the same adoption again (the command rerun) is rewritten, rank file included
            raise ExperimentError(f"{dest} already holds a finished run of {spec.label!r}: remove it to adopt "
                                  f"{source} instead")
    if rec.get("ranks"):
        src_ranks = source.with_name(str(rec["ranks"].get("file") or source.with_suffix(RANKS_SUFFIX).name))
        if not src_ranks.is_file():
            raise ExperimentError(f"cannot adopt {source}: its rank file {src_ranks.name} is not beside it")
        data = src_ranks.read_bytes()
        atomic_save(ranks_path(out_dir, spec), lambda tmp: Path(tmp).write_bytes(data))
    atomic_write_json(dest, new)
    return dest


def adopt_files(sources: Sequence[os.PathLike | str], specs: Sequence[RunSpec],
                out_dir: os.PathLike | str) -> list[Path]:
    """`adopt` each of `sources` as the one spec of `specs` it is a run of (label aside);
    a file that is a run of none of them, or of several, is refused before anything is copied."""
    pairs = []
    for source in sources:
        rec = _read(Path(source))
        why = {s: spec_mismatch(rec, s, label=False) for s in dict.fromkeys(specs)}
        fits = [s for s, w in why.items() if w is None]
        if len(fits) != 1:
            near = [f"{s.label}: {w}" for s, w in why.items() if s.model == rec["model"] and s.seed == rec["seed"]]
            what = "several of this study's runs (" + ", ".join(s.label for s in fits) + ")" if fits else \
                "none of this study's runs" + (f" ({'; '.join(near)})" if near else
                                                f" (none trains model {rec['model']!r} with seed {rec['seed']})")
            raise ExperimentError(f"cannot adopt {source}: it matches {what}")
        pairs.append((Path(source), rec, fits[0]))
    if len({s for _, _, s in pairs}) != len(pairs):
        raise ExperimentError("two of the files to adopt are runs of the same spec: give one")
    # a copy that lands on another source's file (a relabelled row taking the old label) goes
    # after that source has been adopted
    sources_at = {Path(s).resolve() for s in sources}
    pairs.sort(key=lambda pair: result_path(out_dir, pair[2]).resolve() in sources_at)
    return [_copy(source, rec, spec, out_dir) for source, rec, spec in pairs]
