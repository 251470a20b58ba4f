"""Configuration: two frozen dataclasses, validated on construction.

`MTDConfig` holds what shapes a model, `TrainConfig` what drives training. Field names
are unique across the two, so `mtd_fast.train(ds, **overrides)` can route any keyword
to the right one (`split_overrides`) and reject unknown names with a `TypeError`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Optional

__all__ = ["MTDConfig", "TrainConfig", "split_overrides", "ConfigError", "GRAPH_MODES", "PHASE_MODES",
           "check_graph_options", "LEGACY_VALUES"]

GRAPH_MODES = ("overwrite", "rescaled", "joint", "residual")
PHASE_MODES = ("overwrite", "rescaled")  # modes that train the graph in phases and write back


class ConfigError(ValueError):
    """A configuration value that makes no sense (names the field and the value)."""


def _check(cond: bool, name: str, value: Any, want: str) -> None:
    if not cond:
        raise ConfigError(f"{name}={value!r} is invalid: {want}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class MTDConfig:
    """Model shape of MTD (and the shared fields the baselines read).

    Defaults follow `MTD_SPEC.md`: where paper and code differ the switch is here.
    """

    hidden_size: int = 100  # d
    num_blocks: int = 1  # transformer blocks of the intra-session encoder
    num_heads: int = 1  # must divide hidden_size
    max_position: int = 200  # positions above are clipped to this one
    max_session_length: Optional[int] = None  # keep only the most recent items when set
    item_attention: str = "additive"  # "additive" (paper) or "product" (authors' code)
    position_decay: float = 0.75  # gamma of the position-decay softmax
    learn_position_decay: bool = False
    use_self_attention: bool = True  # False: MTD-va / MTD-at (raw embeddings, no block)
    use_position_decay: bool = True  # False: MTD-va (q = W [x_t ; x_s])
    num_gcn_layers: int = 1
    graph_encoder: str = "gcn"  # "gcn" or "gat" (MTD-ga)
    graph_directed: bool = False
    graph_weighted: bool = False
    graph_norm: str = "sym"  # "sym", "mean" or "none"
    # How the graph side reaches the recommender (README "Graph integration"):
    # "overwrite" E[nodes] = H after each graph phase (the authors' code); "rescaled" the same
    # with each row kept at its previous norm; "joint" L_rec + graph_weight * L_DGI at every
    # step, no write-back (the paper's equation); "residual" the table E + GCN(E) (or
    # LightGCN's layer mean) used for session items and candidates at every step.
    graph_mode: str = "residual"  # chosen on validation: README "Graph integration", benches/figures/graph_modes.md
    residual_form: str = "gcn"  # graph_mode="residual": "gcn" (E + GCN(E)) or "light" (mean of A^l E, l=0..L)
    # residual "gcn" form: dropout on the graph branch in training, T = E + dropout(GCN(E)) (as
    # GCE-GNN drops its global-graph features, 0.5 there); 0 = off (the default)
    graph_dropout: float = 0.0
    # cosine scoring: score_scale * <q/|q|, e/|e|> (NISER), else a plain dot product; on by default:
    # better on validation on all three datasets (README "Graph integration", graph_modes.md)
    score_norm: bool = True
    score_scale: float = 12.0  # the scale of cosine scoring (its initial value when learned)
    learn_score_scale: bool = False
    # a learned bias on the scores of the items already in the session (models/repeat.py: a gate on
    # the session vector, the item's recency and click count; zero at the start; not in the paper).
    # Read by MTD and its ablations only. On by default: converged runs chose it on validation on
    # all three datasets (README "Re-clicks"); the paper's model is repeat_bias=False
    repeat_bias: bool = True
    # with repeat_bias: a learned weight v (from 0) on the session items' identity correction,
    # b_ij += v * (q . e_j - q . t_j) with e_j the item's own embedding row E_j and t_j its row of
    # the table the recommender reads (normalized as the scoring is): v = 1 scores a re-click by
    # the item's own embedding instead of its graph-smoothed row; 0 without a graph (T = E).
    # Off by default (README "Re-clicks": the graph costs re-clicks, helps new items)
    repeat_identity: bool = False
    # Baseline knobs (ignored by MTD); see each model file for what it reads.
    gnn_steps: int = 1  # SR-GNN gated GNN propagation steps
    knn_neighbors: int = 100  # ItemKNN neighbourhood size
    knn_shrink: float = 20.0  # ItemKNN similarity shrinkage lambda (GRU4Rec baseline code)
    memory_size: int = 512  # CSRM / CoSAN memory slots (recent training sessions)
    memory_neighbors: int = 512  # CSRM: slots read from the outer memory (authors' code)
    cosan_neighbors: int = 10  # CoSAN: neighbour sessions retrieved per item

    def __post_init__(self) -> None:
        _check(_is_int(self.hidden_size) and self.hidden_size > 0, "hidden_size", self.hidden_size, "a positive int")
        _check(_is_int(self.num_blocks) and self.num_blocks >= 0, "num_blocks", self.num_blocks, "an int >= 0")
        _check(_is_int(self.num_heads) and self.num_heads > 0, "num_heads", self.num_heads, "a positive int")
        _check(self.hidden_size % self.num_heads == 0, "num_heads", self.num_heads,
               f"must divide hidden_size={self.hidden_size}")
        _check(_is_int(self.max_position) and self.max_position > 0, "max_position", self.max_position,
               "a positive int")
        _check(self.max_session_length is None or (_is_int(self.max_session_length) and self.max_session_length > 0),
               "max_session_length", self.max_session_length, "None or a positive int")
        _check(self.item_attention in ("additive", "product"), "item_attention", self.item_attention,
               "one of 'additive', 'product'")
        _check(_is_num(self.position_decay), "position_decay", self.position_decay, "a finite number")
        _check(_is_int(self.num_gcn_layers) and self.num_gcn_layers >= 1, "num_gcn_layers", self.num_gcn_layers,
               "an int >= 1")
        _check(self.graph_encoder in ("gcn", "gat"), "graph_encoder", self.graph_encoder, "one of 'gcn', 'gat'")
        _check(self.graph_norm in ("sym", "mean", "none"), "graph_norm", self.graph_norm,
               "one of 'sym', 'mean', 'none'")
        _check(self.graph_mode in GRAPH_MODES, "graph_mode", self.graph_mode,
               f"one of {', '.join(map(repr, GRAPH_MODES))}")
        _check(self.residual_form in ("gcn", "light"), "residual_form", self.residual_form, "one of 'gcn', 'light'")
        _check(self.residual_form == "gcn" or self.graph_mode == "residual", "residual_form", self.residual_form,
               f"only graph_mode='residual' propagates the item table (graph_mode={self.graph_mode!r})")
        _check(_is_num(self.graph_dropout) and 0 <= self.graph_dropout < 1, "graph_dropout", self.graph_dropout,
               "a number in [0, 1)")
        _check(self.graph_dropout == 0 or (self.graph_mode == "residual" and self.residual_form == "gcn"),
               "graph_dropout", self.graph_dropout, f"only graph_mode='residual' with residual_form='gcn' adds a "
               f"graph branch to drop (graph_mode={self.graph_mode!r}, residual_form={self.residual_form!r})")
        _check(_is_num(self.score_scale) and self.score_scale > 0, "score_scale", self.score_scale, "a number > 0")
        if self.graph_encoder == "gat":  # attention weights replace both: refuse rather than ignore
            _check(not self.graph_weighted, "graph_weighted", self.graph_weighted,
                   "graph_encoder='gat' (MTD-ga) weighs edges by attention, not by transition counts")
            _check(self.graph_norm == "sym", "graph_norm", self.graph_norm,
                   "graph_encoder='gat' (MTD-ga) normalizes by its attention softmax, not by graph_norm")
        for name in ("learn_position_decay", "use_self_attention", "use_position_decay", "graph_directed",
                     "graph_weighted", "score_norm", "learn_score_scale", "repeat_bias", "repeat_identity"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "a bool")
        _check(not self.repeat_identity or (self.repeat_bias and self.graph_mode == "residual"), "repeat_identity",
               self.repeat_identity, f"only with repeat_bias=True (it weighs a term of that bias) and "
               f"graph_mode='residual' (the only mode that scores a table other than E; "
               f"repeat_bias={self.repeat_bias}, graph_mode={self.graph_mode!r})")
        _check(_is_int(self.gnn_steps) and self.gnn_steps >= 1, "gnn_steps", self.gnn_steps, "an int >= 1")
        _check(_is_int(self.knn_neighbors) and self.knn_neighbors >= 1, "knn_neighbors", self.knn_neighbors,
               "an int >= 1")
        _check(_is_num(self.knn_shrink) and self.knn_shrink >= 0, "knn_shrink", self.knn_shrink, "a number >= 0")
        for name in ("memory_size", "memory_neighbors", "cosan_neighbors"):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 1, name, v, "an int >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Training schedule of `MTD_SPEC.md` section 4 (shared by every model)."""

    batch_size: int = 512
    eval_batch_size: int = 1024
    lr: float = 1e-3
    lr_decay_epochs: int = 30  # multiply lr by lr_decay after this many recommendation epochs
    lr_decay: float = 0.1
    warmup_steps: int = 0  # linear lr warm-up over the first steps of training (0: none)
    l2: float = 1e-6
    dropout: float = 0.3
    patience: int = 3  # recommendation epochs without a better validation P@20 before stopping
    rec_frequency: Optional[int] = None  # f; None: the dataset's default
    graph_phases: int = 4
    graph_steps: int = 1000
    graph_patience: int = 10
    # lambda_g of graph_mode "joint" / "residual": loss = CE + lambda_g * DGI BCE (both means)
    graph_weight: float = 1.0
    eval_test_each_epoch: bool = True  # only for the separately labelled best-on-test figures
    max_steps_per_epoch: Optional[int] = None  # cap batches per epoch (quick runs, benches)
    num_threads: Optional[int] = None  # torch intra-op threads; None leaves torch's choice
    device: str = "cpu"
    # torch's deterministic algorithms during the run: None = on for CPU runs (bit-identical at any
    # thread count, no measured cost), off on CUDA; True = also on CUDA; False = left as the caller set
    # them. README "Determinism" says what each backend guarantees.
    deterministic: Optional[bool] = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_batch_size"):
            v = getattr(self, name)
            _check(_is_int(v) and v > 0, name, v, "a positive int")
        _check(_is_num(self.lr) and self.lr > 0, "lr", self.lr, "a positive number")
        _check(_is_int(self.lr_decay_epochs) and self.lr_decay_epochs >= 1, "lr_decay_epochs",
               self.lr_decay_epochs, "an int >= 1")
        _check(_is_num(self.lr_decay) and 0 < self.lr_decay <= 1, "lr_decay", self.lr_decay, "a number in (0, 1]")
        _check(_is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps", self.warmup_steps,
               "an int >= 0")
        _check(_is_num(self.l2) and self.l2 >= 0, "l2", self.l2, "a number >= 0")
        _check(_is_num(self.dropout) and 0 <= self.dropout < 1, "dropout", self.dropout, "a number in [0, 1)")
        _check(_is_int(self.patience) and self.patience >= 1, "patience", self.patience, "an int >= 1")
        _check(self.rec_frequency is None or (_is_int(self.rec_frequency) and self.rec_frequency >= 1),
               "rec_frequency", self.rec_frequency, "None or an int >= 1")
        for name in ("graph_phases", "graph_steps"):
            v = getattr(self, name)
            _check(_is_int(v) and v >= 0, name, v, "an int >= 0")
        _check(_is_num(self.graph_weight) and self.graph_weight >= 0, "graph_weight", self.graph_weight,
               "a number >= 0")
        _check(_is_int(self.graph_patience) and self.graph_patience >= 1, "graph_patience", self.graph_patience,
               "an int >= 1")
        steps = self.max_steps_per_epoch
        _check(steps is None or (_is_int(steps) and steps >= 1),
               "max_steps_per_epoch", self.max_steps_per_epoch, "None or an int >= 1")
        _check(self.num_threads is None or (_is_int(self.num_threads) and self.num_threads >= 1), "num_threads",
               self.num_threads, "None or an int >= 1")
        _check(isinstance(self.eval_test_each_epoch, bool), "eval_test_each_epoch", self.eval_test_each_epoch, "a bool")
        _check(self.deterministic is None or isinstance(self.deterministic, bool), "deterministic",
               self.deterministic, "None, True or False")
        _check(isinstance(self.device, str) and self.device.split(":")[0] in ("cpu", "cuda"), "device", self.device,
               "'cpu', 'cuda' or 'cuda:N'")


_MODEL_FIELDS = {f.name for f in fields(MTDConfig)}
_TRAIN_FIELDS = {f.name for f in fields(TrainConfig)}
assert not (_MODEL_FIELDS & _TRAIN_FIELDS), "field names must be unique across the two configs"

# Config fields added after model and result files had been written, each with the value
# that reproduces the code before it existed: a file without the field was made with that
# value (before graph_mode the write-back was the only integration, before score_norm scoring
# was a dot product, before repeat_bias there was no re-click term). Where that is not
# today's default, reading an old file with the default would build another model, so
# `load` and the experiment runner fill a missing field from here.
LEGACY_VALUES: dict[str, Any] = {"graph_mode": "overwrite", "residual_form": "gcn", "score_norm": False,
                                 "learn_score_scale": False, "graph_dropout": 0.0, "repeat_bias": False,
                                 "repeat_identity": False, "deterministic": None}
assert set(LEGACY_VALUES) <= _MODEL_FIELDS | _TRAIN_FIELDS


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Route keyword overrides to (MTDConfig fields, TrainConfig fields).

    Raises TypeError naming the first unknown keyword.
    """
    model, train = {}, {}
    for key, value in overrides.items():
        if key in _MODEL_FIELDS:
            model[key] = value
        elif key in _TRAIN_FIELDS:
            train[key] = value
        else:
            raise TypeError(
                f"unknown option {key!r}: not a field of MTDConfig or TrainConfig "
                f"(MTDConfig: {', '.join(sorted(_MODEL_FIELDS))}; TrainConfig: {', '.join(sorted(_TRAIN_FIELDS))})"
            )
    return model, train


# TrainConfig fields that only the phase modes read, and the one only the per-step modes read
_PHASE_FIELDS = ("rec_frequency", "graph_steps", "graph_patience")


def check_graph_options(mode: str, explicit: set[str], train_config: TrainConfig) -> None:
    """Refuse explicitly given schedule fields that `graph_mode` would ignore.

    `explicit`: the option names the user passed. `graph_phases=0` (no graph at all, MTD-lo)
    is valid in every mode.
    """
    if mode in PHASE_MODES:
        if "graph_weight" in explicit:
            raise ConfigError(f"graph_weight is the per-step DGI weight of graph_mode 'joint' / 'residual'; "
                              f"graph_mode={mode!r} trains the graph in phases (graph_phases, graph_steps, "
                              "graph_patience, rec_frequency)")
        return
    unused = [n for n in _PHASE_FIELDS if n in explicit]
    if "graph_phases" in explicit and train_config.graph_phases != 0:
        unused.insert(0, "graph_phases")
    if unused:
        raise ConfigError(f"{', '.join(unused)}: graph_mode={mode!r} trains the graph at every step (weight "
                          "graph_weight), so graph phases do not exist; only graph_phases=0 (no graph) applies")
