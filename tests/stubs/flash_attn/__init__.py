"""Stub of flash-attn for importing OpenRLHF on CPU (see tests/stubs/README.md)."""
