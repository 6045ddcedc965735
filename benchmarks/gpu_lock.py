"""A machine-wide lock around GPU timings, so that timings taken by parallel processes (our benchmarks
while flash-linear-attention autotunes in the background) never share the GPU."""
import contextlib
import fcntl

LOCK = "/tmp/gsa_bench_gpu.lock"


@contextlib.contextmanager
def gpu_lock():
    with open(LOCK, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
