"""Cross-entropy of a linear head without the logits tensor: the language model's loss in chunks of
tokens.

    loss = mean over labelled tokens i of  logsumexp_v (h_i W^T)_v - (h_i W^T)_{y_i}

A model's float32 logits [tokens, vocab] are its largest tensor (1 GiB at 8192 tokens x 32000), and
their gradient another. Here each chunk's logits exist only while the chunk is processed, and the
gradients of h and W are computed in the same pass (the loss is a scalar, so its backward only
scales them): memory is one chunk of logits plus the two gradients, and W h is computed once.
The logits are h W^T in h's dtype (as `lm_head(h)` gives them), the softmax in float32, and the
logits' gradient is rounded to h's dtype, as autograd through `lm_head(h).float()` has it. On CUDA
each chunk's loss and gradient is one Triton launch (kernels/cross_entropy.py) that overwrites the
logits with their gradient. An all-ignored batch gives NaN, as torch.nn.functional.cross_entropy
does.

Under torch.compile the loss is cross_entropy on the whole logits, left to the compiler: a Python loop
over token chunks would fix the token count in the graph (a dynamic T raises a constraint violation;
a static one recompiles for every length).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from gsa_kernels.intmath import next_pow2
from gsa_kernels.kernels.cross_entropy import cross_entropy_kernel

# logits per chunk: 128 MiB in their own dtype
_CHUNK_BYTES = 128 << 20


def _cross_entropy_torch(logits, labels, scale, ignore_index: int, write_grad: bool):
    """Per-row loss (float32) of a chunk of logits [C, V]; with write_grad, the gradient (softmax minus
    the one-hot target, times scale, 0 on ignored rows) overwrites the logits. What
    kernels/cross_entropy.py computes, in PyTorch ops (off CUDA)."""
    V = logits.shape[1]
    x = logits.float()
    lse = torch.logsumexp(x, -1)
    in_range = (labels >= 0) & (labels < V)
    ignored = labels == ignore_index
    target = labels.clamp(0, V - 1)[:, None]
    rows = torch.where(in_range, lse - x.gather(1, target)[:, 0], float("nan"))
    rows = torch.where(ignored, 0.0, rows)
    if write_grad:
        p = x.sub_(lse[:, None]).exp_()
        p.scatter_add_(1, target, -in_range[:, None].to(p.dtype))
        logits.copy_(p.mul_((~ignored)[:, None] * scale))
    return rows


def _cross_entropy_triton(logits, labels, scale, ignore_index: int, write_grad: bool):
    C, V = logits.shape
    rows = torch.empty(C, dtype=torch.float32, device=logits.device)
    if C:
        cross_entropy_kernel[(C,)](logits, labels, rows, scale, V, logits.stride(0), ignore_index,
                                   WRITE_GRAD=write_grad, BLOCK=min(4096, next_pow2(V)), num_warps=8)
    return rows


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, ignore_index: int, chunk: int, fused: bool):
        ctx.weight_dtype = weight.dtype     # its gradient is accumulated in float32
        count = (labels != ignore_index).sum()
        needs = ctx.needs_input_grad
        grad_h = torch.empty_like(h) if needs[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if needs[1] else None
        write_grad = grad_h is not None or grad_w is not None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        scale = 1.0 / count.clamp(min=1).float()        # on the device: no host sync
        chunk_loss = _cross_entropy_triton if fused else _cross_entropy_torch
        for start in range(0, h.shape[0], chunk):
            hc, yc = h[start:start + chunk], labels[start:start + chunk]
            logits = hc @ weight.T              # in h's dtype, as `linear(h)` gives them
            total = total + chunk_loss(logits, yc.contiguous(), scale, ignore_index, write_grad).sum()
            if not write_grad:
                continue
            p = logits                          # now the gradient of the logits, in h's dtype
            if grad_w is not None:
                # a half-precision product on the tensor cores (a float32 one runs ~10x slower),
                # summed over the chunks in float32
                if p.dtype == torch.float32:
                    grad_w.addmm_(p.T, hc)
                else:
                    grad_w.add_(p.T @ hc)
            if grad_h is not None:
                grad_h[start:start + chunk] = p @ weight
        ctx.save_for_backward(grad_h, grad_w)
        return total / count.float()

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * grad_loss).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100, chunk_tokens: int | None = None,
                         fused: bool | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits hidden @ weight.T against labels, over the tokens whose label is
    not ignore_index, without forming all the logits. hidden [..., D], weight [vocab, D], labels [...]
    (integers; ignore_index marks a token without a target; a label outside [0, vocab) makes the loss
    NaN). chunk_tokens: tokens per chunk (default: 128 MiB of logits). fused: each chunk's loss and
    gradient by the Triton kernel (kernels/cross_entropy.py) or by PyTorch ops; default: the kernel
    on CUDA."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels (shape {tuple(labels.shape)}) must have hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight (shape {tuple(weight.shape)}) must be [vocab, {hidden.shape[-1]}]")
    h = hidden.reshape(-1, hidden.shape[-1])
    if torch.compiler.is_compiling():
        return F.cross_entropy((h @ weight.T).float(), labels.reshape(-1), ignore_index=ignore_index)
    chunk = chunk_tokens or max(1, _CHUNK_BYTES // (h.element_size() * weight.shape[0]))
    fused = h.is_cuda if fused is None else fused
    return _LinearCrossEntropy.apply(h, weight, labels.reshape(-1), ignore_index, chunk, fused)
