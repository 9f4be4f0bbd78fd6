"""lipnorm.data: datasets (TFDS, official local archives, embedded digits) and the
NumPy input pipeline (deterministic shuffling, host sharding, pmap-shaped batches,
CIFAR augmentation, padded/masked evaluation, resumable prefetching iterator).

Imports no model code; uses JAX only for the default process index/count.
"""
from lipnorm.data.pipeline import (Dataset, DatasetInfo, TrainIterator, channel_stats,
                                   get_dataset)
from lipnorm.data.sources import (LoadRequest, Source, clear_cache, dataset_names,
                                  get_source, load_splits)
from lipnorm.data.splits import Splits

__all__ = [
    "Dataset", "DatasetInfo", "LoadRequest", "Source", "Splits", "TrainIterator",
    "channel_stats", "clear_cache", "dataset_names", "get_dataset", "get_source",
    "load_splits",
]
