"""tuning/registers.py: the kernels an op launches, compiled for sm90 on the CPU (Triton's ptxas and
cuobjdump, no GPU), with their registers, spills and shared memory. The report names every kernel
the op launched, reads plausible resource counts, and follows the configs it is given."""
from __future__ import annotations

import pytest

from tuning import registers


@pytest.mark.parametrize("BK", [16, 32])
def test_the_decode_steps_kernels_are_compiled_with_the_given_tiles(BK):
    configs = {"decode": {"BK": BK, "BV": 16, "num_warps": 1, "PDL": 0}}
    rows = registers.report([1, 1, 1, 64, 64, 16], "float32", "recurrent", configs)
    by_kernel = {r["kernel"]: r for r in rows}
    # T = 1 with gradients: the token-by-token kernels; without: the decode step's two launches
    assert {"decode_keys_kernel", "decode_values_kernel", "recurrent_fwd_keys_kernel",
            "recurrent_bwd_gates_kernel"} <= set(by_kernel)
    keys = by_kernel["decode_keys_kernel"]
    assert keys["constexprs"]["BK"] == BK and keys["num_warps"] == 1
    for r in rows:
        assert 16 <= r["regs"] <= 255 and r["stack"] >= 0 and r["local"] >= 0 and r["shared"] >= 0
        assert 1 <= r["programs_per_sm"] <= registers.BLOCKS_PER_SM
    assert by_kernel["decode_keys_kernel"]["programs_per_sm"] == registers.BLOCKS_PER_SM   # 1 warp, few registers


def test_the_checkpoint_level_reaches_the_op():
    # level 2 rebuilds the chunk states in the backward (a second forward walk) and walks the keys'
    # and values' gradients apart; level 0 saves the states and walks both in one launch
    def names(level):
        launches = registers._child("record", {"shape": [1, 40, 1, 16, 16, 8], "dtype": "float32", "op": "chunk",
                                               "configs": {}, "level": level}, interpret=True)
        return [x["name"] for x in launches]
    level0, level2 = names(0), names(2)
    assert level0.count("states_fwd_kernel") == 1 and level0.count("states_bwd_kernel") == 1
    assert level2.count("states_fwd_kernel") == 2 and level2.count("states_bwd_kernel") == 2
