"""Examples that train models on gsa_kernels end to end (run from a checkout: python -m examples.<name>)."""
