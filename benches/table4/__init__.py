"""Helpers of the Table 4 timing study (`benches/bench_table4.py`), one module per seam:

- `settings`: the model, peer and dataset names and labels, `Settings` from the environment;
- `steps`: the batches, the checked and the timed training step (the trainer's own
  `train_step`), MTD's fast backends against the reference, with their tolerances;
- `estimates`: seconds per epoch from timed steps or epochs, the amortised graph phase;
- `report`: `Report` (markdown table shaped like the paper's Table 4, ratios, JSON, bar
  chart) and the machine facts that head it;
- `peer`: the client of the RecBole peer process.

The names the bench uses are re-exported here (`import table4 as t4`; `benches/` is on
sys.path under pytest, as for `harness`). Unit-tested in `tests/test_table4_helpers.py`,
which loads this folder as the package `table4`; nothing here imports pytest.
"""
from .estimates import amortised, epoch_estimate, measured_epochs
from .peer import PeerError, PeerProcess, PeerUnavailable, write_peer_samples
from .report import COLORS, Report, bar_chart, fmt_seconds, machine_info, meta_sentence, method_sentence
from .settings import (
    ALL_DATASETS,
    ALL_MODELS,
    DATASET_LABELS,
    MODEL_LABELS,
    PEER_LABEL,
    PEER_MODELS,
    Settings,
    SettingsError,
    settings_dict,
    settings_from_env,
)
from .steps import (
    GRAD_RTOL,
    LOSS_ATOL,
    LOSS_RTOL,
    checked_train_step,
    close,
    compare_dgi_backends,
    compare_rec_backends,
    grad_rel_err,
    grad_report,
    plan_batches,
    rel_diff,
    timed,
)

__all__ = [
    "ALL_DATASETS", "ALL_MODELS", "COLORS", "DATASET_LABELS", "GRAD_RTOL", "LOSS_ATOL", "LOSS_RTOL", "MODEL_LABELS",
    "PEER_LABEL", "PEER_MODELS", "PeerError", "PeerProcess", "PeerUnavailable", "Report", "Settings",
    "SettingsError", "amortised", "bar_chart", "checked_train_step", "close", "compare_dgi_backends",
    "compare_rec_backends", "epoch_estimate", "fmt_seconds", "grad_rel_err", "grad_report", "machine_info",
    "measured_epochs", "meta_sentence", "method_sentence", "plan_batches", "rel_diff", "settings_dict",
    "settings_from_env", "timed", "write_peer_samples",
]
