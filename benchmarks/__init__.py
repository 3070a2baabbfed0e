"""Benchmarks of rspo_kernels: throughput (``runner``, ``bench_throughput``) and estimator variance."""
