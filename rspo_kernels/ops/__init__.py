"""Triton kernels and their autograd wrappers, one module per op."""
