"""examples/mqar.py, the paper's recall task: the data follow the task's rules, and a tiny
configuration trains (its loss falls and the test accuracy beats chance) for GSA and for attention.

On a CPU the GSA layer's chunk op is replaced by the pure-PyTorch chunked form (the same math; the
kernels are checked against it in test_chunk.py and test_reference.py): Triton's interpreter runs the
kernels far too slowly for a training run. On a GPU the layer runs the kernels.
"""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, ON_GPU
from examples.mqar import IGNORE, Run, Task, best_runs, learning_rates, make_examples, train


def test_examples_hold_every_pair_and_query_it_after_the_context():
    task = Task(vocab=64, length=64, pairs=8)
    x, y = make_examples(task, 50, seed=3)
    ctx = 2 * task.pairs
    assert x.shape == y.shape == (50, 64)
    assert (y[:, :ctx] == IGNORE).all()
    for row in range(50):
        keys, values = x[row, 0:ctx:2], x[row, 1:ctx:2]
        assert (keys < task.vocab // 2).all() and (values >= task.vocab // 2).all()
        assert len(set(keys.tolist())) == task.pairs
        pos = (y[row] != IGNORE).nonzero().squeeze(1)
        assert len(pos) == task.pairs and (pos >= ctx).all() and ((pos - ctx) % 2 == 0).all()
        answer = dict(zip(keys.tolist(), values.tolist()))
        assert all(answer[int(x[row, p])] == int(y[row, p]) for p in pos)
    # the power law favours near queries: more in the first quarter of the slots than the last
    gaps = ((y != IGNORE).nonzero()[:, 1] - ctx) // 2
    slots = (task.length - ctx) // 2
    assert (gaps < slots // 4).sum() > (gaps >= 3 * slots // 4).sum()
    # the same seed, the same examples
    assert torch.equal(make_examples(task, 50, seed=3)[0], x)


@pytest.mark.parametrize("model", ["gsa", "attention"])
def test_tiny_mqar_trains(model, monkeypatch):
    if not ON_GPU:
        import gsa_kernels.layers.gsa as layer
        from gsa_kernels.torch_chunked import chunk_gsa_torch
        monkeypatch.setattr(layer, "chunk_gsa", lambda *a, checkpoint_level=2, **k: chunk_gsa_torch(*a, **k))
    task = Task(vocab=32, length=32, pairs=4, train=512, test=128)
    data = (make_examples(task, task.train, 0), make_examples(task, task.test, 1000))
    rec = train(Run(model, 32, 1e-2, epochs=4, batch=32), task, data, torch.device(DEVICE), progress=False)
    assert rec["train_loss"][-1] < 0.85 * rec["train_loss"][0], rec["train_loss"]
    assert rec["best_test_acc"] > 2 / (task.vocab // 2), rec["test_acc"]      # chance: 1 / 16 values


def test_learning_rates_per_model():
    assert learning_rates("1e-3,3e-3", "gsa") == [1e-3, 3e-3]
    assert learning_rates("gsa:1e-2,attention:3e-3,1e-3", "gsa") == [1e-2, 1e-3]
    assert learning_rates("gsa:1e-2,attention:3e-3", "attention") == [3e-3]
    with pytest.raises(SystemExit, match="attention"):
        learning_rates("gsa:1e-2", "attention")


def test_best_runs_keep_each_model_and_widths_best_learning_rate():
    def rec(model, width, lr, acc, conv=False):
        return dict(model=model, width=width, lr=lr, best_test_acc=acc, short_conv=conv)
    records = [rec("attention", 64, 1e-3, 0.2), rec("attention", 64, 3e-3, 0.9), rec("attention", 64, 1e-2, None),
               rec("gsa", 64, 1e-2, 0.5, conv=True), rec("gsa", 64, 1e-3, 0.7)]
    best = best_runs(records)
    assert sorted(best) == [("attention", 64), ("gsa", 64), ("gsa + short conv", 64)]
    assert best["attention", 64]["lr"] == 3e-3
    assert best["gsa + short conv", 64]["best_test_acc"] == 0.5 and best["gsa", 64]["lr"] == 1e-3
    # the short convolutions are a GSA layer's: an attention run cannot carry them
    assert Run("attention", 64, 1e-3).name == "attention-w64-L2-lr0.001"
    assert Run("gsa", 64, 1e-2, short_conv=True).name == "gsa-conv-w64-L2-lr0.01"
    with pytest.raises(ValueError, match="short_conv"):
        Run("attention", 64, 1e-3, short_conv=True)
