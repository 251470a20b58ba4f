"""What every experiment shares: its settings (`Study`), the folder layout, provenance
lines for the markdown, and matplotlib set up for files (no display).

Layout under `out` (default `benches/figures`) for an experiment NAME:
`out/NAME/*.json` the per-run result files (the runner's), `out/NAME.md`, `out/NAME.json`
and `out/NAME*.png` the merged report over every valid result file in `out/NAME/`, so
runs made by several invocations (other models, seeds or datasets) add up.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

from .adoption import adopt_files
from .report import ExperimentError, atomic_save, require
from .runner import RunSpec, run_all

__all__ = ["Study", "PAPER_MODEL", "pyplot", "save_figure", "provenance"]

# The paper's MTD where our default differs from it (MTDConfig.repeat_bias: README "Re-clicks").
# The studies that reproduce the paper's figures (ablation, sensitivity, interpret) train the
# paper's model unless the invocation sets the field itself (--repeat-bias).
PAPER_MODEL: dict[str, Any] = {"repeat_bias": False}


@dataclasses.dataclass
class Study:
    """The settings of one experiment invocation (the CLI's flags)."""

    name: str
    dataset: Optional[str] = "synthetic"
    root: Optional[str] = None
    fraction: float = 1.0
    dataset_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    models: Optional[Sequence[str]] = None  # None: the experiment's own list
    seeds: Optional[Sequence[int]] = None  # None: the experiment's default seeds
    epochs: int = 30
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # applied to every run
    out: Path = Path("benches/figures")
    quiet: bool = False
    backend: Any = None
    command: Optional[str] = None  # the CLI line, recorded in every result file
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # experiment-specific
    # finished result files of other studies to take as this study's runs (runner.adopt_files)
    adopt: Sequence[str] = ()

    def __post_init__(self) -> None:
        self.out = Path(self.out)

    @property
    def runs_dir(self) -> Path:
        return self.out / self.name

    def spec(self, model: str, seed: int, label: Optional[str] = None,
             extra: Optional[dict[str, Any]] = None) -> RunSpec:
        return RunSpec(dataset=self.dataset, root=self.root, fraction=self.fraction, model=model, seed=seed,
                       epochs=self.epochs, overrides={**self.overrides, **(extra or {})}, label=label,
                       dataset_kwargs=self.dataset_kwargs)

    def check_fixed(self, label: str, fixed: dict[str, Any], what: str) -> None:
        """Refuse options of this invocation that contradict the fields `what` `label` fixes."""
        clash = sorted(k for k in fixed if k in self.overrides and self.overrides[k] != fixed[k])
        if clash:
            raise ExperimentError(f"{what} {label!r} fixes {', '.join(clash)}; do not pass them as options")

    def paper_spec(self, model: str, seed: int, label: Optional[str] = None,
                   extra: Optional[dict[str, Any]] = None) -> RunSpec:
        """`spec` of the paper's model: PAPER_MODEL's fields the invocation does not set added."""
        fixed = {k: v for k, v in PAPER_MODEL.items() if k not in self.overrides}
        return self.spec(model, seed, label, {**fixed, **(extra or {})})

    def seeds_or(self, default: Sequence[int]) -> list[int]:
        seeds = list(self.seeds) if self.seeds else list(default)
        if len(set(seeds)) != len(seeds):
            raise ExperimentError(f"seeds {seeds} repeat a seed")
        return seeds

    def run(self, specs: Sequence[RunSpec], checkpoints: bool = False) -> list[dict[str, Any]]:
        """Adopt the `adopt` files as runs of `specs`, then train what is still missing."""
        if self.adopt:
            if checkpoints:
                raise ExperimentError(f"experiment {self.name} reads each run's saved model; --adopt copies result "
                                      "files only")
            adopt_files(self.adopt, specs, self.runs_dir)
        return run_all(specs, self.runs_dir, quiet=self.quiet, backend=self.backend, command=self.command,
                       checkpoints=checkpoints)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (clear error when matplotlib is missing)."""
    matplotlib = require("matplotlib", "matplotlib")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Write a PNG atomically and close the figure."""
    plt = pyplot()
    try:
        atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def provenance(records: Sequence[dict[str, Any]]) -> str:
    """Markdown lines naming the commands, commits, torch versions and dates behind the records."""
    if not records:
        return ""
    commands = sorted({r["command"] for r in records})
    commits = sorted({(r.get("commit") or "unknown") + (" (with uncommitted changes)" if r.get("commit_dirty") else "")
                      for r in records})
    dates = sorted(r["date"] for r in records)
    torch = sorted({r.get("torch", "?") for r in records})
    machine = sorted({str((r.get("machine") or {}).get("platform", "?")) for r in records})
    lines = [f"{len(records)} result files, made {dates[0]} to {dates[-1]} with torch {', '.join(torch)} on "
             f"{', '.join(machine)}; commit {', '.join(commits)}. Commands:", "", "```"]
    lines += commands + ["```"]
    adopted = sorted(f"- {r['dataset']} {r['label']} seed {r['seed']}: {r['adopted_from']['file']} (label "
                     f"{r['adopted_from']['label']})" for r in records if r.get("adopted_from"))
    if adopted:
        lines += ["", "Adopted (another study's run of the same spec, `--adopt`; its command is above):", "",
                  *adopted]
    return "\n".join(lines)
