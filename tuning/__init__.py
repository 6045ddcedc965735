"""The tuning sweep: `python -m tuning.sweep --arch sm90` times every candidate launch config of every
kernel on the present GPU and writes the winners to tuned_configs/<arch>.yaml (see README, Tuning).

Modules: sweep (the CLI), shapes (the shape presets), search (one shape: pruning, coordinate descent,
tie-break), measure (inputs, timing, the correctness gate), compile_backend (torch.compile timing in
worker subprocesses), compile_times (that timing alone, filled into a tuned file), precompile
(parallel compilation), yamlio (atomic writes, resume), combine (a re-tune put into a shipped file),
first_call (the first-call measurement), registers (registers and spills of each kernel, compiled
on the CPU). This package imports nothing at
import time, so that --dry-run can set TRITON_INTERPRET before Triton is first imported.
"""
