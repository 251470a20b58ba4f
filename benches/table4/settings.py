"""What the Table 4 study covers and how it is set: the model, peer and dataset names with
their labels, and `Settings` read from MTD_BENCH_SMOKE, MTD_T4_* and
MTD_BENCH_RECBOLE_PYTHON (every variable is listed at the top of `benches/bench_table4.py`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

ALL_MODELS = ("mtd", "gru4rec", "narm", "stamp", "sasrec", "srgnn", "csrm", "cosan")
PEER_MODELS = ("gru4rec", "narm", "stamp", "sasrec", "srgnn")  # what RecBole 1.2.1 implements
ALL_DATASETS = ("yoochoose1_64", "diginetica", "retailrocket")
DATASET_LABELS = {"yoochoose1_64": "Yoochoose 1/64", "yoochoose1_64_mtd": "Yoochoose 1/64 (MTD ids)",
                  "diginetica": "Diginetica", "retailrocket": "Retailrocket", "synthetic": "synthetic (smoke)"}
MODEL_LABELS = {"mtd": "MTD", "gru4rec": "GRU4Rec", "narm": "NARM", "stamp": "STAMP", "sasrec": "SASRec",
                "srgnn": "SR-GNN", "csrm": "CSRM", "cosan": "CoSAN"}
PEER_LABEL = "RecBole"


class SettingsError(ValueError):
    """A bad MTD_T4_* value (names the variable and what it accepts)."""


@dataclass(frozen=True)
class Settings:
    smoke: bool
    datasets: tuple[str, ...]
    models: tuple[str, ...]
    peers: tuple[str, ...]
    recbole_python: Optional[str]
    device: str
    steps: int  # timed training steps per model (estimate mode)
    warmup: int  # untimed steps after the checked step
    epochs: int  # 0: estimate; N: time N whole epochs per model instead
    dgi_steps: int  # timed DGI steps
    graph_steps: int  # bound of the measured graph phase (the trainer's graph_steps)
    graph_patience: int
    threads: Optional[int]
    results: Path
    seed: int
    batch_size: int
    hidden: int
    synthetic_sessions: int
    peer_timeout_s: float

    @property
    def mode(self) -> str:
        return "epochs" if self.epochs > 0 else "estimate"

    @property
    def prefix(self) -> str:
        return "table4_smoke" if self.smoke else "table4"


def _csv(env: Mapping[str, str], key: str, default: Sequence[str], allowed: Optional[Sequence[str]]) -> tuple:
    raw = env.get(key)
    if raw is None or raw.strip() == "":
        return tuple(default)
    if raw.strip().lower() in ("none", "off", "0"):
        return ()
    if raw.strip().lower() == "all" and allowed is not None:
        return tuple(allowed)
    items = tuple(dict.fromkeys(x.strip().lower() for x in raw.split(",") if x.strip()))
    if allowed is not None:
        bad = [x for x in items if x not in allowed]
        if bad:
            raise SettingsError(f"{key}={raw!r}: unknown {bad[0]!r}; use a comma list of {', '.join(allowed)} "
                                f"(or 'all' / 'none')")
    return items


def _int(env: Mapping[str, str], key: str, default: int, lo: int) -> int:
    raw = env.get(key)
    if raw is None or raw.strip() == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        raise SettingsError(f"{key}={raw!r} must be an int >= {lo}") from None
    if v < lo:
        raise SettingsError(f"{key}={raw!r} must be an int >= {lo}")
    return v


def settings_from_env(env: Mapping[str, str], project: Path) -> Settings:
    """The study's settings from MTD_BENCH_SMOKE, MTD_T4_* and MTD_BENCH_RECBOLE_PYTHON."""
    smoke = env.get("MTD_BENCH_SMOKE") == "1"
    datasets = _csv(env, "MTD_T4_DATASETS", ("synthetic",) if smoke else ALL_DATASETS,
                    (*ALL_DATASETS, "yoochoose1_64_mtd", "synthetic"))
    models = _csv(env, "MTD_T4_MODELS", ALL_MODELS, ALL_MODELS)
    peers = _csv(env, "MTD_T4_PEERS", PEER_MODELS, PEER_MODELS)
    device = (env.get("MTD_T4_DEVICE") or "cpu").strip().lower()
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise SettingsError(f"MTD_T4_DEVICE={device!r}: use cpu, cuda or cuda:N")
    # smoke: 1 thread unless asked; on a busy 2-core machine two OpenMP threads made tiny
    # steps 20-50x slower (MTD, batch 128 of 300 items: 0.5-1.5 s against 25 ms)
    threads = _int(env, "MTD_T4_THREADS", 1 if smoke else 0, 0) or None
    results = Path(env.get("MTD_T4_RESULTS") or (project / "benches" / "results"))
    return Settings(
        smoke=smoke, datasets=datasets, models=models, peers=peers,
        recbole_python=(env.get("MTD_BENCH_RECBOLE_PYTHON") or None), device=device,
        steps=_int(env, "MTD_T4_STEPS", 1 if smoke else 10, 1),
        warmup=_int(env, "MTD_T4_WARMUP", 0 if smoke else 1, 0),
        epochs=_int(env, "MTD_T4_EPOCHS", 0, 0),
        dgi_steps=_int(env, "MTD_T4_DGI_STEPS", 1 if smoke else 10, 1),
        graph_steps=_int(env, "MTD_T4_GRAPH_STEPS", 5 if smoke else 1000, 1),
        graph_patience=_int(env, "MTD_T4_GRAPH_PATIENCE", 10, 1),
        threads=threads, results=results, seed=_int(env, "MTD_T4_SEED", 0, 0),
        batch_size=_int(env, "MTD_T4_BATCH", 128 if smoke else 512, 1),
        hidden=_int(env, "MTD_T4_HIDDEN", 100, 1),
        synthetic_sessions=_int(env, "MTD_T4_SYNTHETIC_SESSIONS", 1500, 20),
        peer_timeout_s=float(_int(env, "MTD_T4_PEER_TIMEOUT", 900, 1)),
    )



def settings_dict(s: Settings) -> dict:
    """`s` as the JSON report records it (paths as strings, the mode spelled out)."""
    d = asdict(s)
    d["results"] = str(s.results)
    d["mode"] = s.mode
    return d
