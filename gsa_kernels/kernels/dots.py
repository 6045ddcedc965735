"""Tensor-core dots of a 16-bit tile with a float32 one, and the power-of-two scales they share.

A tl.dot on float32 operands runs in tf32 for half inputs (PREC), and the GPU truncates each operand
to 11 significant bits. That is too coarse for the slot scores: a softmax turns a relative error of
q Hk into an absolute error of the probabilities, and its backward subtracts nearly equal terms
(at scale 1 with no forgetting, dq was 1.6e-2 off against the 1e-2 bound). Here the
16-bit tile goes to the tensor cores as loaded (its products are exact) and the float32 one as two
16-bit halves hi + lo, hi = x rounded and lo = what that rounding left: 16 significant bits in
bfloat16, 22 in float16, for two 16-bit dots (the tensor cores run 16-bit dots at twice tf32's rate).
"""
import triton
import triton.language as tl


@triton.jit
def halves(x, dtype: tl.constexpr):
    """float32 x as hi + lo in a 16-bit dtype (hi = x rounded, lo = what that rounding left)."""
    hi = x.to(dtype)
    return hi, (x - hi.to(tl.float32)).to(dtype)


@triton.jit
def pow2_scale(amax):
    """The power of two in (amax / 2, amax] and its inverse, from amax's exponent bits alone (no
    log2 / exp2 / division, which a serial loop would wait on): x / scale lies in (-2, 2). amax 0
    or subnormal gives 1, 1; amax >= 2^127 gives 2^126, whose inverse is still a normal float (x /
    scale in (-4, 4); 2^-127 would read as 0 and turn the largest finite states into zeros)."""
    bits = tl.minimum(amax.to(tl.int32, bitcast=True) & 0x7F800000, 253 << 23)
    normal = bits != 0
    scale = tl.where(normal, bits, 127 << 23).to(tl.float32, bitcast=True)
    inverse = tl.where(normal, (254 << 23) - bits, 127 << 23).to(tl.float32, bitcast=True)
    return scale, inverse


@triton.jit
def dot_acc(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b, where one operand is float32 and bounded in magnitude by the inputs (w = s
    e^(Gend - G), p e^G) or a bfloat16 one, and the other is float32 too or in the half input dtype.
    Half inputs: the float32 operand is split into halves of the other's dtype, two 16-bit dots.
    float16's range is not float32's: an operand that can grow past 65504 goes through
    `dot_acc_scaled` instead."""
    if a.dtype == tl.float32 and b.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=PREC)
    elif a.dtype == tl.float32:
        a_hi, a_lo = halves(a, b.dtype)
        return tl.dot(a_lo, b, tl.dot(a_hi, b, acc))
    else:
        b_hi, b_lo = halves(b, a.dtype)
        return tl.dot(a, b_lo, tl.dot(a, b_hi, acc))


@triton.jit
def dot_acc_scaled(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b for a in the input dtype and a float32 b of any magnitude (a state). float16: b's
    halves are taken of b / 2^e, 2^e the tile's largest magnitude's power of two, so they cannot
    overflow, and the product is scaled back (exact). bfloat16 has float32's range: plain halves."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=PREC)
    elif a.dtype == tl.float16:
        scale, inverse = pow2_scale(tl.max(tl.max(tl.abs(b), axis=1), axis=0))
        b_hi, b_lo = halves(b * inverse, a.dtype)
        return acc + scale * tl.dot(a, b_lo, tl.dot(a, b_hi))
    else:
        b_hi, b_lo = halves(b, a.dtype)
        return tl.dot(a, b_lo, tl.dot(a, b_hi, acc))
