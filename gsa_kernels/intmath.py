"""Host-side integer helpers for launch sizes and grids.

triton.cdiv and triton.next_power_of_2 are constexpr functions in Triton 3.6: ~5 us a call from
Python, and config lookups and launchers call them on every launch. Same results, plain integer
math.
"""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (0 for x <= 0, as Triton's)."""
    return 0 if x <= 0 else 1 << (int(x) - 1).bit_length()


def pow2_at_least(x: int, lo: int = 16) -> int:
    """next_pow2(x), at least `lo`: a tile width tl.dot and tl.arange accept."""
    return max(lo, next_pow2(x))
