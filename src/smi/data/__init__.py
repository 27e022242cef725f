"""Real datasets for evaluation and the synthetic data pool."""

from smi.data.fashion_mnist import FMNIST_CLASSES, FMNIST_MEAN, FMNIST_STD, load_fashion_mnist
from smi.data.pool import SyntheticPool, load_pool

__all__ = ["FMNIST_CLASSES", "FMNIST_MEAN", "FMNIST_STD", "SyntheticPool", "load_fashion_mnist", "load_pool"]
