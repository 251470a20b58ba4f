"""Data: packed sessions, the SR-GNN pickle layout, raw-log preprocessing, synthetic data."""
from .dataset import Dataset, DataWarning
from .load import DATA_ENV, DATASETS, data_root, dataset_dir, load_dataset
from .pickle_io import read_samples, read_sessions, safe_load_pickle, write_pickle_layout
from .store import DataError, Samples, Sessions, expand_samples, iter_batches, pad_batch


def preprocess(*args, **kwargs):
    """Raw click logs -> `Dataset` (see `mtd_fast.data.raw.preprocess`)."""
    from .raw import preprocess as _preprocess

    return _preprocess(*args, **kwargs)


__all__ = ["DATASETS", "DATA_ENV", "data_root", "dataset_dir", "Dataset", "DataWarning", "load_dataset",
           "read_samples", "read_sessions", "safe_load_pickle",
           "write_pickle_layout", "DataError", "Samples", "Sessions", "expand_samples", "iter_batches",
           "pad_batch", "preprocess"]
