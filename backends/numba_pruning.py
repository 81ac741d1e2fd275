"""Numba twin of minillm.pruning.csr_matmul: y = x W with W in compressed sparse rows.

Dense BLAS does 2 flops for every weight, zero or not; a CSR product does 2
per nonzero but reaches its outputs through an index (a scatter), which
vectorises poorly. Two loops, one per regime:

- few rows of x (decode, N < ``BLOCK``): for each row, every input i scatters
  x[n, i] * W[i, j] into y[n, j] over row i's nonzeros (y's row stays in L1);
- many rows (training, N >= ``BLOCK``): ``BLOCK`` rows of x at a time into a
  transposed accumulator acc[j, r], so each nonzero updates ``BLOCK``
  contiguous values (one SIMD loop) instead of one; then acc is written back.

Single-threaded, like the other twins (``numba_layers.PARALLEL``).
"""
import numpy as np
from numba import njit

KERNELS: dict = {}
BLOCK = 16          # rows of x per pass of the blocked loop


@njit(cache=True, fastmath=True)
def _rows(x, data, indices, indptr, n_out):
    N, n_in = x.shape
    y = np.zeros((N, n_out), dtype=x.dtype)
    for n in range(N):
        for i in range(n_in):
            a = x[n, i]
            for k in range(indptr[i], indptr[i + 1]):
                y[n, indices[k]] += a * data[k]
    return y


@njit(cache=True, fastmath=True)
def _blocked(x, data, indices, indptr, n_out):
    N, n_in = x.shape
    y = np.empty((N, n_out), dtype=x.dtype)
    acc = np.empty((n_out, BLOCK), dtype=x.dtype)          # y^T of one block of rows
    xi = np.empty(BLOCK, dtype=x.dtype)
    for n0 in range(0, N, BLOCK):
        nb = min(BLOCK, N - n0)
        acc[:, :] = 0
        xi[:] = 0
        for i in range(n_in):
            for r in range(nb):
                xi[r] = x[n0 + r, i]
            for k in range(indptr[i], indptr[i + 1]):
                v = data[k]
                row = acc[indices[k]]
                for r in range(BLOCK):                     # full width: a fixed-length SIMD loop
                    row[r] += xi[r] * v
        for r in range(nb):
            for j in range(n_out):
                y[n0 + r, j] = acc[j, r]
    return y


@njit(cache=True)
def _indices_ok(indices, indptr, n_out):
    if indptr[0] != 0:
        return False
    for i in range(indptr.shape[0] - 1):        # rows are ranges of data: non-decreasing
        if indptr[i + 1] < indptr[i]:
            return False
    for k in range(indices.shape[0]):
        if indices[k] < 0 or indices[k] >= n_out:
            return False
    return True


def csr_matmul(x, data, indices, indptr, n_out):
    """Accelerated minillm.pruning.csr_matmul — see it for the math."""
    x = np.ascontiguousarray(x)
    data = np.ascontiguousarray(data, dtype=x.dtype)
    indices = np.ascontiguousarray(indices, dtype=np.int32)
    indptr = np.ascontiguousarray(indptr, dtype=np.int32)
    n_out = int(n_out)
    if x.ndim != 2 or indptr.shape[0] != x.shape[1] + 1 or indptr[-1] != data.shape[0] \
            or indices.shape != data.shape or not _indices_ok(indices, indptr, n_out):
        raise IndexError("csr_matmul: x, indptr, indices and n_out disagree (compiled code has "
                         "no bounds checks)")
    if x.shape[0] < BLOCK:
        return _rows(x, data, indices, indptr, n_out)
    return _blocked(x, data, indices, indptr, n_out)


KERNELS["pruning.csr_matmul"] = csr_matmul
