"""Sparse matrix-vector kernels: a plain-torch reference, Triton (GPU) and CPU paths."""
