"""Data: the built-in data sets (one module each), user entry points, and the batches.

A data entry point is called as ``fn(seed=..., **spec.data.kwargs)`` and returns either an
``sgdjob.data.Dataset`` (2-D float32 features and int64 labels, in memory) or a
``(train, test)`` pair of map-style ``torch.utils.data.Dataset``s whose items are
``(input, target)`` tensors of any shape and dtype. ``partition`` fixes which positions each
worker trains on and in which order; ``batches`` builds them, optionally in loader processes.
"""

from sgdjob.data.batches import BatchSource, eval_batches
from sgdjob.data.dataset import Batchable, Data, DataError, Dataset, TensorPair, gather
from sgdjob.data.loading import Shapes, data_shapes, load_data
from sgdjob.data.partition import Partition, partition_for, total_steps

__all__ = [
    "BatchSource",
    "Batchable",
    "Data",
    "DataError",
    "Dataset",
    "Partition",
    "Shapes",
    "TensorPair",
    "data_shapes",
    "eval_batches",
    "gather",
    "load_data",
    "partition_for",
    "total_steps",
]
