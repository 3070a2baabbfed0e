"""Stub of vLLM for importing OpenRLHF on CPU (see tests/stubs/README.md)."""

__version__ = "0.0.0+stub"
