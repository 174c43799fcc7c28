"""advlens.kernels: array code that must be fast, each kernel with a NumPy reference (its test
oracle) and a GPU implementation that agrees with it.

- :func:`knn2d`: exact kNN of 2-D points by uniform-grid hashing (NumPy reference, CUDA kernel).
- :func:`knn`: exact kNN of high-dimensional points (chunked brute force, CPU or GPU).
- :mod:`advlens.kernels.metrics`: the overlap statistics on neighbour indices.
"""

from advlens.kernels.knn import knn, knn2d

__all__ = ["knn", "knn2d"]
