"""Datasets: loaders and the bundled MNIST test set (being written)."""
