"""Data: packed sessions, the SR-GNN pickle layout, raw-log preprocessing, synthetic data."""
from .dataset import DATASETS, Dataset, DataWarning, load_dataset
from .pickle_io import read_samples, read_sessions, safe_load_pickle, write_pickle_layout
from .store import DataError, Samples, Sessions, expand_samples, iter_batches, pad_batch


def preprocess(*args, **kwargs):
    """Raw click logs -> `Dataset` (see `mtd_fast.data.raw.preprocess`)."""
    from .raw import preprocess as _preprocess

    return _preprocess(*args, **kwargs)


__all__ = ["DATASETS", "Dataset", "DataWarning", "load_dataset", "read_samples", "read_sessions", "safe_load_pickle",
           "write_pickle_layout", "DataError", "Samples", "Sessions", "expand_samples", "iter_batches",
           "pad_batch", "preprocess"]
