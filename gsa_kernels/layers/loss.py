"""Cross-entropy of a linear head without the logits tensor: the language model's loss in chunks of
tokens.

    loss = mean over labelled tokens i of  logsumexp_v (h_i W^T)_v - (h_i W^T)_{y_i}

A model's float32 logits [tokens, vocab] are its largest tensor (1 GiB at 8192 tokens x 32000), and
their gradient another. Here each chunk's logits exist only while the chunk is processed, and the
gradients of h and W are computed in the same pass (the loss is a scalar, so its backward only
scales them): memory is one chunk of logits plus the two gradients, and W h is computed once.
The logits are h W^T in h's dtype, then float32 (as `lm_head(h).float()` would give); an all-ignored
batch gives NaN, as torch.nn.functional.cross_entropy does.

Under torch.compile the loss is cross_entropy on the whole logits, left to the compiler: a Python loop
over token chunks would fix the token count in the graph (a dynamic T raises a constraint violation;
a static one recompiles for every length).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# float32 logits per chunk: 128 MiB
_CHUNK_BYTES = 128 << 20


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, ignore_index: int, chunk: int):
        ctx.weight_dtype = weight.dtype     # its gradient is accumulated in float32
        valid = labels != ignore_index
        count = valid.sum()
        needs = ctx.needs_input_grad
        grad_h = torch.empty_like(h) if needs[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if needs[1] else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        scale = 1.0 / count.clamp(min=1).float()
        for start in range(0, h.shape[0], chunk):
            hc, yc, vc = h[start:start + chunk], labels[start:start + chunk], valid[start:start + chunk]
            logits = (hc @ weight.T).float()
            lse = torch.logsumexp(logits, -1)
            target = yc.clamp(min=0).unsqueeze(1)
            total = total + torch.where(vc, lse - logits.gather(1, target)[:, 0], 0).sum()
            if grad_h is None and grad_w is None:
                continue
            p = logits.sub_(lse[:, None]).exp_()      # the logits are dead once the loss is summed
            p.scatter_add_(1, target, torch.full_like(p[:, :1], -1.0))
            p = p.mul_((vc.float() * scale)[:, None]).to(h.dtype)
            if grad_w is not None:
                # the gradient of the logits in h's dtype, as autograd through `linear(h).float()` has
                # it; a half-precision product on the tensor cores (a float32 one runs ~10x slower),
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
        return gh, gw, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100, chunk_tokens: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits hidden @ weight.T against labels, over the tokens whose label is
    not ignore_index, without forming all the logits. hidden [..., D], weight [vocab, D], labels [...]
    (integers; ignore_index marks a token without a target). chunk_tokens: tokens per chunk (default:
    128 MiB of float32 logits)."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels (shape {tuple(labels.shape)}) must have hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight (shape {tuple(weight.shape)}) must be [vocab, {hidden.shape[-1]}]")
    h = hidden.reshape(-1, hidden.shape[-1])
    if torch.compiler.is_compiling():
        return F.cross_entropy((h @ weight.T).float(), labels.reshape(-1), ignore_index=ignore_index)
    chunk = chunk_tokens or max(1, _CHUNK_BYTES // (4 * weight.shape[0]))
    return _LinearCrossEntropy.apply(h, weight, labels.reshape(-1), ignore_index, chunk)
