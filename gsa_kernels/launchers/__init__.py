"""Launchers: for each op, the plain functions that size the buffers and grids, ask configs.py for the
launch configs and launch the Triton kernels of gsa_kernels/kernels/. No autograd here."""
