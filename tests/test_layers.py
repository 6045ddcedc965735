"""GatedSlotAttention, GSABlock and GSAModel: the layer's math against a float64 pure-PyTorch version of
it, prefill + decode against one full pass, causality, grouped kv heads, padding, the state cache.

On CPU the kernels run in Triton's interpreter, so the layers are small (hidden 32, two to four heads);
the GPU adds bfloat16 and the paper's layer size.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, ON_GPU
from gsa_kernels.layers import GatedSlotAttention, GSABlock, GSAModel
from reference import naive_recurrent_gsa
from test_chunk import rel_err


def make_layer(hidden=32, num_heads=2, num_slots=12, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    layer = GatedSlotAttention(hidden_size=hidden, num_heads=num_heads, num_slots=num_slots, **kw)
    with torch.no_grad():   # non-trivial norm weights, so that a wrong norm axis shows
        if layer.use_norm:
            layer.g_norm.weight.uniform_(0.5, 1.5)
    return layer.to(device=DEVICE, dtype=dtype).eval()


def reference_conv(x, weight, bias, cache=None):
    """silu(causal depthwise convolution), token by token in float64: x [B, T, D], weight [D, 1, W],
    cache [B, D, W] (the W previous inputs, newest last) or None; (y, the new cache)."""
    B, T, D = x.shape
    W = weight.shape[-1]
    hist = torch.zeros(B, D, W, dtype=x.dtype) if cache is None else cache.double().cpu().clone()
    ys = []
    for t in range(T):
        hist = torch.cat([hist[..., 1:], x[:, t, :, None]], -1)
        y = (hist * weight[:, 0]).sum(-1)
        ys.append(F.silu(y if bias is None else y + bias))
    return (torch.stack(ys, 1) if ys else x.new_zeros(B, 0, D)), hist


def reference_layer(layer, x, state=None):
    """The layer's math in float64 with the naive recurrence: (y, (hk, hv)), and with short
    convolutions (y, (hk, hv, (q, k, v caches)))."""
    W = {n: p.detach().double().cpu() for n, p in layer.named_parameters()}
    x = x.detach().double().cpu()
    B, T, _ = x.shape
    H, Hkv, K, V, M = layer.num_heads, layer.num_kv_heads, layer.head_k_dim, layer.head_v_dim, layer.num_slots
    phi = {"swish": F.silu, "relu": F.relu, "identity": lambda t: t}[layer.feature_map]
    q, k, v = (x @ W[f"{n}_proj.weight"].T for n in "qkv")
    caches = None
    if layer.use_short_conv:
        old = (None, None, None) if state is None else state[2]
        (q, cq), (k, ck), (v, cv) = (reference_conv(a, W[f"{n}_conv1d.weight"], W.get(f"{n}_conv1d.bias"), c)
                                     for n, a, c in zip("qkv", (q, k, v), old))
        caches = (cq, ck, cv)
        state = None if state is None else state[:2]
    q = phi(q).view(B, T, H, K)
    k = phi(k).view(B, T, Hkv, K)
    v = F.silu(v).view(B, T, Hkv, V)
    g = F.logsigmoid(x @ W["f_proj.weight"].T).view(B, T, Hkv, M) / layer.gate_logit_normalizer
    s = 1 - g.exp()
    h0 = None if state is None else tuple(t.double().cpu() for t in state)
    o, new_state = naive_recurrent_gsa(q, k, v, s, g, scale=layer.scale, initial_state=h0, output_final_state=True)
    o = F.silu(o.reshape(B, T, H * V))
    if layer.use_norm:
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + layer.g_norm.eps) * W["g_norm.weight"]
    if layer.use_output_gate:
        o = o * F.silu(x @ W["g_proj.weight"].T)
    return o @ W["o_proj.weight"].T, (new_state if caches is None else (*new_state, caches))


LAYERS = {  # name -> GatedSlotAttention keyword arguments (hidden 32)
    "chunk": dict(num_heads=2, recurrent_threshold=0),
    "recurrent": dict(num_heads=2, mode="fused_recurrent"),
    "gqa-chunk": dict(num_heads=4, num_kv_heads=2, recurrent_threshold=0),
    "gqa-recurrent-gate": dict(num_heads=4, num_kv_heads=1, mode="fused_recurrent", use_output_gate=True),
    "expand-relu": dict(num_heads=2, expand_k=0.5, expand_v=2.0, feature_map="relu", num_slots=5,
                        recurrent_threshold=0),
    "short-conv": dict(num_heads=4, num_kv_heads=2, use_short_conv=True, conv_size=3, conv_bias=True,
                       recurrent_threshold=0),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_matches_reference(name):
    layer = make_layer(**LAYERS[name])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 32, generator=gen)
    hk_shape, hv_shape = layer.state_shapes(2)
    state = (torch.randn(hk_shape, generator=gen).to(DEVICE), torch.randn(hv_shape, generator=gen).to(DEVICE))
    if layer.use_short_conv:    # caches of the three convolutions, as a previous call leaves them
        state = (*state, tuple(torch.randn(2, conv.hidden_size, conv.kernel_size[0], generator=gen).to(DEVICE)
                               for conv in (layer.q_conv1d, layer.k_conv1d, layer.v_conv1d)))
    with torch.no_grad():
        y, new_state = layer.mix(x.to(DEVICE), state=state)
    ry, ref_state = reference_layer(layer, x, state)
    errors = {"y": rel_err(y, ry), "hk": rel_err(new_state[0], ref_state[0]),
              "hv": rel_err(new_state[1], ref_state[1])}
    if layer.use_short_conv:
        errors.update({f"conv cache {i}": rel_err(a, b) for i, (a, b) in enumerate(zip(new_state[2], ref_state[2]))})
    assert max(errors.values()) <= 1e-5, errors


@pytest.mark.parametrize("name", ["gqa-chunk", "expand-relu", "short-conv"])
def test_prefill_then_decode_equals_one_pass(name):
    """Prefill (chunk kernels) on the first 7 tokens, then 4 decode steps on the state cache: the
    outputs and the final state equal one chunk pass over all 11 tokens."""
    layer = make_layer(**LAYERS[name])
    layer.recurrent_threshold = 1    # chunk for every T > 1, the decode kernel at T = 1
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        y_full, state_full = layer.mix(x)
        y, state = layer.mix(x[:, :7])
        ys = [y]
        for t in range(7, 11):
            y, state = layer.mix(x[:, t:t + 1], state=state)
            ys.append(y)
    assert rel_err(torch.cat(ys, 1), y_full) <= 1e-5
    assert rel_err(state[0], state_full[0]) <= 1e-5 and rel_err(state[1], state_full[1]) <= 1e-5
    if layer.use_short_conv:   # the projections of 1 and of 11 tokens are different GEMMs on a GPU
        assert all(rel_err(a, b) <= 1e-6 for a, b in zip(state[2], state_full[2]))


# ---------------------------------------------------------------------------------------------------
# flash-linear-attention's layer interface: forward(hidden_states, attention_mask, past_key_values,
# use_cache, output_attentions) -> (o, None, past_key_values), with a cache in FLA's protocol

@pytest.mark.parametrize("name", ["gqa-chunk", "short-conv"])
def test_fla_call_through_a_cache_equals_one_pass(name):
    """FLA-style code: prefill 7 tokens with a fresh GSACache, then 4 one-token steps through it; the
    outputs equal one pass (and the state-passing view, `mix`), the cache counts the tokens."""
    from gsa_kernels.layers import GSACache
    layer = make_layer(**LAYERS[name], layer_idx=0)
    layer.recurrent_threshold = 1
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad():
        y_full, attn, none_cache = layer(x)
        assert attn is None and none_cache is None
        assert torch.equal(y_full, layer.mix(x, use_cache=False)[0])
        cache = GSACache()
        y, _, returned = layer(x[:, :7], past_key_values=cache, use_cache=True)
        assert returned is cache and len(cache) == 1
        ys = [y]
        for t in range(7, 11):
            y, _, cache = layer(x[:, t:t + 1], past_key_values=cache, use_cache=True)
            ys.append(y)
    assert rel_err(torch.cat(ys, 1), y_full) <= 1e-5
    assert cache.get_seq_length(0) == 11
    assert set(cache[0]) >= {"recurrent_state", "conv_state"}
    assert (cache[0]["conv_state"] is not None) == layer.use_short_conv


def test_fla_call_takes_the_last_columns_of_a_longer_mask():
    """With a cache FLA passes a mask over past and new tokens: the layer reads its last T columns."""
    from gsa_kernels.layers import GSACache
    layer = make_layer(**LAYERS["chunk"], layer_idx=0)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    mask = torch.tensor([[1, 1, 1, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 1, 1]], device=DEVICE)
    with torch.no_grad():
        y, _, _ = layer(x, attention_mask=mask, past_key_values=GSACache(), use_cache=True)
        ref, _ = layer.mix(x, attention_mask=mask[:, -5:])
    assert torch.equal(y, ref) and not y[1, 2].any()


def test_fla_constructor_order_and_defaults():
    """FLA's positions (mode, hidden_size, expand_k, expand_v, num_heads, ...), num_slots None = K,
    unknown keyword arguments accepted with one warning, a size where mode goes refused by name."""
    layer = GatedSlotAttention("fused_recurrent", 64, 1.0, 0.5, 4)
    assert (layer.mode, layer.hidden_size, layer.head_k_dim, layer.head_v_dim) == ("fused_recurrent", 64, 16, 8)
    assert layer.num_slots == 16
    with pytest.warns(UserWarning, match="fuse_norm"):
        GatedSlotAttention(hidden_size=32, num_heads=2, fuse_norm=True, gate_fn="swish")
    with pytest.raises(TypeError, match="first argument"):
        GatedSlotAttention(32, num_heads=2)


def test_fla_call_bad_arguments():
    from gsa_kernels.layers import GSACache
    layer = make_layer(num_heads=2)                  # no layer_idx
    x = torch.randn(2, 4, 32, device=DEVICE)
    with pytest.raises(ValueError, match="layer_idx"):
        layer(x, past_key_values=GSACache(), use_cache=True)
    state = (torch.zeros(2, 2, 16, 12, device=DEVICE), torch.zeros(2, 2, 12, 16, device=DEVICE))
    with pytest.raises(TypeError, match="mix"):     # our old positional state, where FLA has the mask
        layer(x, state)


def test_short_convolution_against_the_recurrence():
    """Dense and packed (an empty sequence and one shorter than the kernel among them), with and
    without a cache: outputs and new caches equal the token-by-token definition."""
    from gsa_kernels.layers.conv import ShortConvolution
    torch.manual_seed(0)
    conv = ShortConvolution(6, 4, bias=True).double()
    w, b = conv.weight.detach(), conv.bias.detach()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 6, generator=gen, dtype=torch.float64)
    for cache in (None, torch.randn(2, 6, 4, generator=gen, dtype=torch.float64)):
        y, new = conv(x, cache, output_final_state=True)
        ry, rnew = reference_conv(x, w, b, cache)
        assert torch.allclose(y, ry) and torch.allclose(new, rnew)
    cu = torch.tensor([0, 3, 3, 4, 10])
    xp = torch.randn(1, 10, 6, generator=gen, dtype=torch.float64)
    for cache in (None, torch.randn(4, 6, 4, generator=gen, dtype=torch.float64)):
        y, new = conv(xp, cache, output_final_state=True, cu_seqlens=cu)
        for n in range(4):
            a, e = cu[n].item(), cu[n + 1].item()
            ry, rnew = reference_conv(xp[:, a:e], w, b, None if cache is None else cache[n:n + 1])
            assert torch.allclose(y[:, a:e], ry) and torch.allclose(new[n:n + 1], rnew), n


@pytest.mark.parametrize("name", ["chunk", "recurrent"])
def test_causality(name):
    """Changing x at t >= t0 leaves every output before t0 unchanged."""
    layer = make_layer(**LAYERS[name])
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 10, 32, generator=gen)
    x2 = x.clone()
    t0 = 6
    x2[:, t0:] = 5 * torch.randn(1, 10 - t0, 32, generator=gen)
    with torch.no_grad():
        y, _ = layer.mix(x.to(DEVICE), use_cache=False)
        y2, _ = layer.mix(x2.to(DEVICE), use_cache=False)
    assert rel_err(y2[:, :t0], y[:, :t0]) <= 1e-6
    assert rel_err(y2[:, t0:], y[:, t0:]) > 1e-2     # and the change does reach the later outputs


def test_decode_leaves_the_cached_state_untouched():
    layer = make_layer(num_heads=2)
    x = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with torch.no_grad():
        _, state = layer.mix(x[:, :3])
        before = tuple(t.clone() for t in state)
        _, new_state = layer.mix(x[:, 3:], state=state)
    assert all(torch.equal(a, b) for a, b in zip(state, before))
    assert not torch.equal(new_state[0], state[0])
    with torch.no_grad():
        _, none_state = layer.mix(x, use_cache=False)
    assert none_state is None


def test_attention_mask_padding_equals_separate_rows():
    """Left- and right-padded rows in one batch equal each row's kept tokens run alone; padded
    positions give 0."""
    layer = make_layer(num_heads=4, num_kv_heads=2, recurrent_threshold=0)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 32, generator=gen).to(DEVICE)
    mask = torch.zeros(2, 8, dtype=torch.long, device=DEVICE)
    mask[0, 3:] = 1       # left padding: 5 tokens
    mask[1, :6] = 1       # right padding: 6 tokens
    with torch.no_grad():
        y, (hk, hv) = layer.mix(x, attention_mask=mask)
        for b in range(2):
            keep = mask[b].bool()
            y_b, (hk_b, hv_b) = layer.mix(x[b:b + 1, keep])
            assert rel_err(y[b, keep], y_b[0]) <= 1e-5
            assert rel_err(hk[b], hk_b[0]) <= 1e-5 and rel_err(hv[b], hv_b[0]) <= 1e-5
            assert torch.all(y[b, ~keep] == 0)


@pytest.mark.parametrize("name", ["chunk", "recurrent"])
def test_cu_seqlens_equals_separate_sequences(name):
    layer = make_layer(**LAYERS[name])
    lengths = [5, 1, 7]
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    x = torch.randn(1, 13, 32, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    with torch.no_grad():
        y, (hk, hv) = layer.mix(x, cu_seqlens=cu)
        assert hk.shape[0] == len(lengths)
        for n in range(len(lengths)):
            a, b = cu[n].item(), cu[n + 1].item()
            y_n, (hk_n, hv_n) = layer.mix(x[:, a:b])
            assert rel_err(y[:, a:b], y_n) <= 1e-5
            assert rel_err(hk[n], hk_n[0]) <= 1e-5 and rel_err(hv[n], hv_n[0]) <= 1e-5


def test_training_gradients_agree_between_kernels():
    """In training, the chunk kernels and the token-by-token kernels give the same gradients for x and
    every parameter (both are checked against the naive recurrence in their own test files)."""
    layer_c = make_layer(num_heads=4, num_kv_heads=2).train()
    layer_r = copy.deepcopy(layer_c)
    layer_r.mode = "fused_recurrent"
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, 32, generator=gen).to(DEVICE)
    w = torch.randn(2, 6, 32, generator=gen).to(DEVICE)
    grads = []
    for layer in (layer_c, layer_r):
        xi = x.clone().requires_grad_()
        y, _ = layer.mix(xi, use_cache=False)
        (y * w).sum().backward()
        grads.append([xi.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*grads):
        assert rel_err(b, a) <= 1e-5


def test_block_is_pre_norm_residual():
    torch.manual_seed(8)
    block = GSABlock(32, num_heads=2, num_slots=8, hidden_ratio=2).to(DEVICE).eval()
    x = torch.randn(1, 5, 32, device=DEVICE)
    with torch.no_grad():
        y, state = block(x)
        o, _ = block.attn.mix(block.attn_norm(x))
        h = x + o
        assert rel_err(y, h + block.mlp(block.mlp_norm(h))) <= 1e-6
    assert state[0].shape == (1, 2, 16, 8) and block.mlp.intermediate_size % 256 == 0


def small_model(seed=9, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    model = GSAModel(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, num_slots=8, **kw)
    return model.to(device=DEVICE, dtype=dtype).eval()


def test_model_prefill_then_decode_equals_one_pass():
    model = small_model(num_kv_heads=1, recurrent_threshold=1)
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(10)).to(DEVICE)
    with torch.no_grad():
        full, _ = model(ids)
        logits, state = model(ids[:, :6], use_cache=True)
        steps = [logits]
        for t in range(6, 9):
            logits, state = model(ids[:, t:t + 1], state=state, use_cache=True)
            steps.append(logits)
    assert rel_err(torch.cat(steps, 1), full) <= 1e-5


def test_generate_equals_greedy_without_cache():
    model = small_model()
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(11)).to(DEVICE)
    out = model.generate(ids, max_new_tokens=3)
    expect = ids
    with torch.no_grad():
        for _ in range(3):
            logits, _ = model(expect)
            expect = torch.cat([expect, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, expect)


def test_generate_with_left_padding_equals_rows_alone():
    model = small_model(seed=12)
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(13)).to(DEVICE)
    mask = torch.ones(2, 6, dtype=torch.long, device=DEVICE)
    mask[1, :2] = 0
    out = model.generate(ids, max_new_tokens=3, attention_mask=mask)
    for b in range(2):
        alone = model.generate(ids[b:b + 1, mask[b].bool()], max_new_tokens=3)
        assert torch.equal(out[b, -3:], alone[0, -3:])


# ---------------------------------------------------------------------------------------------------
# GPU-only: bfloat16 and the paper's layer size

@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="bf16 and paper-size layers run on the GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_paper_layer_prefill_then_decode_on_gpu(dtype):
    """hidden 2048, 4 heads: K = V = 512, M = 64. Prefill 100 tokens (chunk), decode 8 steps (decode
    kernel), against one chunk pass over 108 tokens and against the float64 reference."""
    layer = make_layer(hidden=2048, num_heads=4, num_slots=64, dtype=dtype)
    x = torch.randn(4, 108, 2048, generator=torch.Generator().manual_seed(14)).to(DEVICE, dtype)
    with torch.no_grad():
        y_full, state_full = layer.mix(x)
        y, state = layer.mix(x[:, :100])
        ys = [y]
        for t in range(100, 108):
            y, state = layer.mix(x[:, t:t + 1], state=state)
            ys.append(y)
    y_steps = torch.cat(ys, 1)
    ry, (rhk, rhv) = reference_layer(layer, x)
    errors = {"y_vs_full": rel_err(y_steps, y_full), "hk_vs_full": rel_err(state[0], state_full[0]),
              "hv_vs_full": rel_err(state[1], state_full[1]),
              "y_vs_ref": rel_err(y_steps, ry), "hk_vs_ref": rel_err(state[0], rhk), "hv_vs_ref": rel_err(state[1], rhv)}
    print(f"\n{dtype}: " + " ".join(f"{n}={e:.1e}" for n, e in errors.items()))
    if dtype == torch.float32:
        bounds = dict.fromkeys(errors, 1e-5)
    else:
        # bf16: the two paths see the same rounded projections, so the contract's state/gradient bound;
        # the float64 reference does not round q, k, v, s, g to bf16 as the layer's projections do, so
        # twice that
        bounds = {n: (1e-2 if n.endswith("full") else 2e-2) for n in errors}
    bad = {n: e for n, e in errors.items() if e > bounds[n]}
    assert not bad, errors


# ---------------------------------------------------------------------------------------------------
# Bad input

def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="num_kv_heads"):
        GatedSlotAttention(hidden_size=32, num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        GatedSlotAttention(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="feature_map"):
        GatedSlotAttention(hidden_size=32, num_heads=2, feature_map="t2r")
    with pytest.raises(ValueError, match="mode"):
        GatedSlotAttention(hidden_size=32, num_heads=2, mode="parallel")


def test_bad_call_arguments():
    layer = make_layer(num_heads=2)
    x = torch.randn(2, 4, 32, device=DEVICE)
    with pytest.raises(ValueError, match="hidden_size"):
        layer.mix(x[..., :16])
    with pytest.raises(ValueError, match="attention_mask"):
        layer.mix(x, attention_mask=torch.ones(2, 5, device=DEVICE))
    with pytest.raises(ValueError, match="not both"):
        layer.mix(x[:1], cu_seqlens=torch.tensor([0, 4]), attention_mask=torch.ones(1, 4, device=DEVICE))
    with pytest.raises(ValueError, match="hk0"):
        layer.mix(x, state=(torch.zeros(2, 2, 16, 11, device=DEVICE), torch.zeros(2, 2, 12, 16, device=DEVICE)))


# Every bad size or scalar is a ValueError naming the caller's argument, raised by the constructor
# that took it, before any parameter is built (not a ZeroDivisionError, a negative-dimension error
# from nn.Linear, or a layer that builds and then computes NaN or zeros).
BAD_SIZES = {
    "num_heads=0": (GatedSlotAttention, dict(hidden_size=32, num_heads=0), "num_heads"),
    "num_heads<0": (GatedSlotAttention, dict(hidden_size=32, num_heads=-2), "num_heads"),
    "num_kv_heads=0": (GatedSlotAttention, dict(hidden_size=32, num_heads=2, num_kv_heads=0), "num_kv_heads"),
    "num_kv_heads<0": (GatedSlotAttention, dict(hidden_size=32, num_heads=2, num_kv_heads=-1), "num_kv_heads"),
    "hidden_size=0": (GatedSlotAttention, dict(hidden_size=0, num_heads=2), "hidden_size"),
    "expand_k=0": (GatedSlotAttention, dict(hidden_size=32, num_heads=2, expand_k=0), "expand_k"),
    "expand_v<0": (GatedSlotAttention, dict(hidden_size=32, num_heads=2, expand_v=-1.0), "expand_v"),
    # hidden_size * expand_k rounds down to 0 key channels, which 0 % num_heads alone would let through
    "no_key_channel": (GatedSlotAttention, dict(hidden_size=32, num_heads=2, expand_k=0.01), "expand_k"),
    "num_heads=2.0": (GatedSlotAttention, dict(hidden_size=32, num_heads=2.0), "num_heads"),
    "scale=nan": (GatedSlotAttention, dict(hidden_size=32, num_heads=2, scale=float("nan")), "scale"),
    "block_intermediate_size=0": (GSABlock, dict(hidden_size=32, num_heads=2, intermediate_size=0),
                                  "intermediate_size"),
    "block_hidden_ratio=0": (GSABlock, dict(hidden_size=32, num_heads=2, hidden_ratio=0), "hidden_ratio"),
    "model_num_heads=0": (GSAModel, dict(vocab_size=50, hidden_size=32, num_heads=0), "num_heads"),
    "model_num_kv_heads=0": (GSAModel, dict(vocab_size=50, hidden_size=32, num_heads=2, num_kv_heads=0),
                             "num_kv_heads"),
    "model_hidden_size<0": (GSAModel, dict(vocab_size=50, hidden_size=-32, num_heads=2), "hidden_size"),
    "model_vocab_size=0": (GSAModel, dict(vocab_size=0, hidden_size=32, num_heads=2), "vocab_size"),
    "model_num_layers=0": (GSAModel, dict(vocab_size=50, hidden_size=32, num_heads=2, num_layers=0), "num_layers"),
}


@pytest.mark.parametrize("case", list(BAD_SIZES))
def test_constructor_rejects_bad_sizes_naming_the_argument(case):
    cls, kwargs, argument = BAD_SIZES[case]
    with pytest.raises(ValueError, match=argument):
        cls(**kwargs)


@pytest.mark.parametrize("normalizer", [0.0, -8.0, float("nan"), float("inf")], ids=str)
def test_gate_logit_normalizer_must_be_finite_and_positive(normalizer):
    """g = logsigmoid(x W_f) / gate_logit_normalizer must be <= 0 (decays exp(g) in (0, 1]): 0 gives
    NaN / -inf gates, a negative one gates above 0, inf gates of exactly 0 for every input."""
    with pytest.raises(ValueError, match="gate_logit_normalizer"):
        GatedSlotAttention(hidden_size=32, num_heads=2, gate_logit_normalizer=normalizer)
    with pytest.raises(ValueError, match="gate_logit_normalizer"):
        GSAModel(vocab_size=50, hidden_size=32, num_heads=2, gate_logit_normalizer=normalizer)


def test_generate_rejects_an_empty_prompt():
    model = small_model()
    ids = torch.zeros(2, 0, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(ids, max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(ids, max_new_tokens=2, attention_mask=torch.ones(2, 0, dtype=torch.long, device=DEVICE))


def test_generate_rejects_an_all_padding_mask():
    model = small_model()
    ids = torch.randint(0, 50, (2, 4), generator=torch.Generator().manual_seed(15)).to(DEVICE)
    with pytest.raises(ValueError, match=r"attention_mask rows \[0, 1\] \(every row\)"):
        model.generate(ids, max_new_tokens=2, attention_mask=torch.zeros(2, 4, dtype=torch.long, device=DEVICE))


def test_generate_rejects_a_row_without_real_tokens_naming_it():
    """Rows may be padded differently, but a row of zeros in the mask has no prompt: an error naming
    that row, not a continuation of nothing (the old behaviour: row 1 sampled from position 0's output)."""
    model = small_model()
    ids = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(16)).to(DEVICE)
    mask = torch.ones(3, 4, dtype=torch.long, device=DEVICE)
    mask[0, :2] = 0     # left-padded: fine
    mask[1] = 0         # nothing to condition on
    with pytest.raises(ValueError, match=r"attention_mask rows \[1\] are all padding"):
        model.generate(ids, max_new_tokens=2, attention_mask=mask)


BAD_GENERATE_ARGUMENTS = {
    "temperature<0": (dict(temperature=-1.0), "temperature"),
    "temperature=nan": (dict(temperature=float("nan")), "temperature"),
    "temperature=inf": (dict(temperature=float("inf")), "temperature"),
    "max_new_tokens<0": (dict(max_new_tokens=-1), "max_new_tokens"),
    "max_new_tokens=1.5": (dict(max_new_tokens=1.5), "max_new_tokens"),
    "eos_token_id>=vocab": (dict(eos_token_id=50), "eos_token_id"),
    "eos_token_id<0": (dict(eos_token_id=-1), "eos_token_id"),
}


@pytest.mark.parametrize("case", list(BAD_GENERATE_ARGUMENTS))
def test_generate_rejects_bad_sampling_arguments(case):
    """Checked before the prefill pass: a negative or non-finite temperature is an error (0 is greedy),
    not silently greedy or NaN probabilities; an eos_token_id outside the vocabulary could never stop
    a row."""
    kwargs, argument = BAD_GENERATE_ARGUMENTS[case]
    model = small_model()
    ids = torch.randint(0, 50, (2, 4), generator=torch.Generator().manual_seed(17)).to(DEVICE)
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=argument):
        model.generate(ids, **kwargs)


@pytest.mark.parametrize("ids", [torch.tensor([[1, 50]]), torch.tensor([[-1, 3]]), torch.tensor([1, 2]),
                                 torch.tensor([[1.0, 2.0]])], ids=["id>=vocab", "id<0", "1-D", "float"])
def test_generate_rejects_bad_input_ids(ids):
    """Out-of-range ids are an IndexError inside the embedding on the CPU and a device-side assert on
    the GPU; a 1-D prompt an error about the layer's internal x."""
    with pytest.raises(ValueError, match="input_ids"):
        small_model().generate(ids.to(DEVICE), max_new_tokens=2)


# ---------------------------------------------------------------------------------------------------
# The loss without logits (layers/loss.py) and GSAModel(labels=...)

@pytest.mark.parametrize("fused", [False, True], ids=["torch", "kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [3, 5, None])
def test_linear_cross_entropy_equals_cross_entropy_on_full_logits(dtype, chunk, fused):
    """Loss and both gradients equal float64 F.cross_entropy over h W^T, ignored tokens included,
    whatever the chunking (chunks that split the tokens unevenly, or one chunk), with each chunk's
    loss and gradient from PyTorch ops or from the Triton kernel (a vocabulary of 5000 spans two of
    its blocks)."""
    from gsa_kernels.layers.loss import linear_cross_entropy
    if fused and dtype == torch.bfloat16 and not ON_GPU:
        dtype = torch.float16       # the interpreter computes bf16 wrongly (test_interpreter_guard.py)
    vocab = 5000 if fused else 50
    gen = torch.Generator().manual_seed(6)
    h = torch.randn(2, 7, 16, generator=gen).to(DEVICE, dtype).requires_grad_()
    w = (torch.randn(vocab, 16, generator=gen) / 2).to(DEVICE, dtype).requires_grad_()
    y = torch.randint(0, vocab, (2, 7), generator=gen).to(DEVICE)
    y[0, :3] = -100
    loss = linear_cross_entropy(h, w, y, chunk_tokens=chunk, fused=fused)
    gh, gw = torch.autograd.grad(loss * 3.0, (h, w))
    h64, w64 = (t.detach().double().requires_grad_() for t in (h, w))
    ref = F.cross_entropy((h64 @ w64.T).reshape(-1, vocab), y.reshape(-1))
    rgh, rgw = torch.autograd.grad(ref * 3.0, (h64, w64))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())
    assert rel_err(gh, rgh) <= tol and rel_err(gw, rgw) <= tol
    assert gh.dtype == h.dtype and gw.dtype == w.dtype
    all_ignored = linear_cross_entropy(h, w, torch.full_like(y, -100), fused=fused)
    assert torch.isnan(all_ignored)       # as F.cross_entropy's mean over no token
    for bad in (vocab, -1):               # a label outside the vocabulary is never scored silently
        wrong = y.clone()
        wrong[1, 2] = bad
        assert torch.isnan(linear_cross_entropy(h, w, wrong, chunk_tokens=chunk, fused=fused))


def test_model_loss_with_labels_equals_cross_entropy_of_its_logits():
    torch.manual_seed(0)
    model = GSAModel(vocab_size=40, hidden_size=32, num_layers=2, num_heads=2, num_slots=8).to(DEVICE)
    ids = torch.randint(0, 40, (2, 9), device=DEVICE)
    labels = ids.clone()
    labels[1, :2] = -100
    loss, state = model(ids, labels=labels)
    assert state is None
    logits, _ = model(ids)
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    ref = F.cross_entropy(logits.reshape(-1, 40), shifted.reshape(-1))
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item()
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(loss, params)
    ref_grads = torch.autograd.grad(ref, params)
    assert max(rel_err(a, b) for a, b in zip(grads, ref_grads)) <= 1e-5
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=labels[:, :5])


@pytest.mark.parametrize("extra", [{}, {"use_short_conv": True, "num_kv_heads": 1}], ids=["plain", "conv-gqa"])
def test_model_loads_an_fla_checkpoint(extra):
    """A GSAForCausalLM state dict (our keys under `model.`, plus lm_head) and its config dict (FLA's
    field names, num_hidden_layers and its `exapnd_k` spelling included) give the same model."""
    torch.manual_seed(0)
    kw = dict(vocab_size=40, hidden_size=32, num_layers=2, num_heads=2, num_slots=8, **extra)
    ours = GSAModel(**kw).to(DEVICE).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fla_sd = {(k if k == "lm_head.weight" else "model." + k): v.clone() for k, v in ours.state_dict().items()}
    config = {"vocab_size": 40, "hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2, "num_slots": 8,
              "exapnd_k": 1, "exapnd_v": 1, "norm_eps": 1e-6, "hidden_act": "swish", "attn": None,
              "fuse_norm": True, "num_kv_heads": extra.get("num_kv_heads"),
              "use_short_conv": extra.get("use_short_conv", False)}
    loaded = GSAModel.from_fla(config, fla_sd).to(DEVICE).eval()
    ids = torch.randint(0, 40, (2, 6), device=DEVICE)
    with torch.no_grad():
        assert torch.equal(loaded(ids)[0], ours(ids)[0])
    with pytest.raises(ValueError, match="attn_res_proj"):
        GSAModel.from_fla(config, {**fla_sd, "model.layers.0.attn_res_proj.weight": torch.zeros(1, 32)})
    with pytest.raises(ValueError, match="attnres_block_size"):
        GSAModel.from_fla({**config, "attnres_block_size": 2})
