"""Datasets: the MVTec AD layout (any dataset shaped like it) and the built-in offline dataset."""

from dmdd_core.data.builtin import BUILTIN_CATEGORIES, DEFECT_TYPES, default_data_root, ensure_builtin_dataset
from dmdd_core.data.mvtec import (
    StreamBatchSampler,
    SyntheticPairDataset,
    TestDataset,
    TestSample,
    TrainPair,
    list_categories,
    list_test_images,
    list_train_images,
    load_image,
    load_mask,
    stream_indices,
)

__all__ = [
    "BUILTIN_CATEGORIES",
    "DEFECT_TYPES",
    "StreamBatchSampler",
    "SyntheticPairDataset",
    "TestDataset",
    "TestSample",
    "TrainPair",
    "default_data_root",
    "ensure_builtin_dataset",
    "list_categories",
    "list_test_images",
    "list_train_images",
    "load_image",
    "load_mask",
    "stream_indices",
]
