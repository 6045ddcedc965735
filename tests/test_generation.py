"""Generation from CUDA graphs (gsa_kernels/layers/generation.py): the tokens of the eager loop, batches
padded to buckets, blocks between end-of-sequence checks, one capture per bucket; Gumbel-max sampling
from the softmax's distribution. On a CPU the same static-buffer loop runs without graphs."""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, ON_GPU
from gsa_kernels.layers.generation import GraphedDecoder, sample
from test_layers import small_model

VOCAB = 6


def counting_step(tokens, state):
    """A toy model: the next token is (token + 1) % VOCAB; the state counts the steps of each row and
    is a nested structure with a None leaf, as a layer's can be."""
    (steps, nothing), = state
    logits = torch.zeros(tokens.shape[0], VOCAB, device=tokens.device).scatter_(1, (tokens + 1) % VOCAB, 10.0)
    return logits + 0 * steps[:, :1], [(steps + 1, nothing)]


def eager_reference(first, n, eos):
    """What GSAModel's eager loop does with counting_step: a finished row repeats eos, and the loop
    stops right after the token that finishes the last row."""
    out, tok, done = [], first[:, 0].clone(), first[:, 0] == eos
    if eos is not None and bool(done.all()):
        return first.new_zeros(first.shape[0], 0)
    for _ in range(n):
        tok = (tok + 1) % VOCAB
        if eos is not None:
            tok = torch.where(done, torch.full_like(tok, eos), tok)
            done = done | (tok == eos)
        out.append(tok)
        if eos is not None and bool(done.all()):
            break
    return torch.stack(out, 1)


def test_decode_loop_pads_to_buckets_and_stops_like_the_eager_loop():
    decoder = GraphedDecoder(counting_step, buckets=(1, 2, 4), check_every=4, use_graphs=ON_GPU)
    for first, n, eos in (([0, 2, 4], 12, 5),      # rows finish at steps 5, 3, 1: stop in the 2nd block
                          ([1], 10, None),          # no eos: 10 tokens in blocks of 4, 4, 2
                          ([5, 5], 6, 5),           # every row finished before the first step
                          ([3, 0], 3, 4),           # stops at the last step
                          ([2, 1, 0], 9, None)):    # bucket 4 again: no new capture
        first = torch.tensor(first, device=DEVICE)[:, None]
        state = [(torch.zeros(first.shape[0], 2, device=DEVICE), None)]
        got = decoder.decode(first, state, n, eos_token_id=eos)
        assert torch.equal(got.cpu(), eager_reference(first.cpu(), n, eos)), (first.flatten().tolist(), n, eos)
    # one graph per (bucket, eos): (4, 5), (1, None), (2, 5), (2, 4), (4, None); none off CUDA
    assert decoder.captures == (5 if ON_GPU else 0)


# the plain model on the GPU only (CI's time): the other holds every state structure the plain one does
MODELS = {"short-conv-grouped": {"use_short_conv": True, "conv_size": 3, "num_kv_heads": 1}}
if ON_GPU:
    MODELS["plain"] = {}


@pytest.mark.parametrize("kw", list(MODELS.values()), ids=list(MODELS))
def test_graphed_generation_gives_the_eager_tokens(kw):
    model = small_model(seed=21, **kw)
    ids = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(22)).to(DEVICE)
    eager = model.generate(ids, max_new_tokens=6, cuda_graphs=False)
    assert torch.equal(model.generate(ids, max_new_tokens=6, cuda_graphs=True), eager)
    eos = int(eager[0, -2])        # a token row 0 emits: that row finishes early
    eager = model.generate(ids, max_new_tokens=6, eos_token_id=eos, cuda_graphs=False)
    assert torch.equal(model.generate(ids, max_new_tokens=6, eos_token_id=eos, cuda_graphs=True), eager)


def test_gumbel_max_samples_the_softmax():
    """argmax(logits / T + Gumbel) draws from softmax(logits / T): 20000 draws of 4 tokens against the
    probabilities (standard error ~0.0035: 0.02 is over five of them)."""
    torch.manual_seed(23)
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0]], device=DEVICE).expand(20000, 4)
    draws = sample(logits, 0.7)[:, 0].cpu()
    freq = torch.bincount(draws, minlength=4).double() / draws.numel()
    want = torch.softmax(logits[0].double().cpu() / 0.7, 0)
    assert (freq - want).abs().max() < 0.02, (freq, want)
    assert torch.equal(sample(logits[:2], None), torch.full((2, 1), 3, device=DEVICE))


def test_graphs_refuse_a_sampling_generator():
    model = small_model(seed=24)
    ids = torch.zeros(1, 2, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="generator"):
        model.generate(ids, 2, temperature=1.0, generator=torch.Generator(device=DEVICE), cuda_graphs=True)


def test_default_is_graphs_on_cuda_except_with_a_sampling_generator(monkeypatch):
    """cuda_graphs=None: the graphed loop on CUDA, the eager loop off CUDA and whenever a generator is
    given for sampling (graphs draw from the device's default generator)."""
    model = small_model(seed=25)
    ids = torch.zeros(1, 2, dtype=torch.long, device=DEVICE)
    used = []
    real = type(model)._graphed_decoder
    monkeypatch.setattr(type(model), "_graphed_decoder", lambda self: used.append(1) or real(self))
    model.generate(ids, 2)
    assert bool(used) == ON_GPU
    used.clear()
    model.generate(ids, 2, temperature=1.0, generator=torch.Generator(device=DEVICE).manual_seed(0))
    assert not used
