"""Synthetic image-text pool and a loopback HTTP server with planted faults, used by `curate demo` and tests."""
