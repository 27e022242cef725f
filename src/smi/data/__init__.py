"""Real datasets, the synthetic data pool, and data sources (pool, real, noise) as types."""

from smi.data.datasets import DATASETS, ImageDataset, eval_dataset, open_dataset
from smi.data.fashion_mnist import FMNIST_CLASSES, FMNIST_MEAN, FMNIST_STD, load_fashion_mnist
from smi.data.pool import SyntheticPool, load_pool
from smi.data.sources import SOURCES, DataSource, ImageSet, NoiseSource, PoolSource, RealSource, parse_source

__all__ = ["DATASETS", "FMNIST_CLASSES", "FMNIST_MEAN", "FMNIST_STD", "SOURCES", "DataSource", "ImageDataset",
           "ImageSet", "NoiseSource", "PoolSource", "RealSource", "SyntheticPool", "eval_dataset", "load_fashion_mnist",
           "load_pool", "open_dataset", "parse_source"]
