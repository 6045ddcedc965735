"""Multi-query associative recall (MQAR), the GSA paper's recall task, trained on these kernels.

    python -m examples.mqar [--widths 64,128,256] [--models gsa,attention] [--lrs 1e-3,3e-3]
                            [--epochs 16] [--jobs 1] [--out docs/mqar] [--resume] [--gather] [--tiny]

The task (the Zoology benchmark's setup, which the paper used): a sequence opens with key-value pairs
(k_1 v_1 k_2 v_2 ...; keys from the first half of the vocabulary, values from the second), then holds
queries, each a key of its context, at even offsets after it, with 0 in between (Zoology's figure-2
runs; `Task(noise=True)`: random tokens, Zoology's later default). The model
must emit a query's value at the query's position; loss and accuracy count those positions only. The
offset of each query is drawn from a power law that favours near positions (p(gap) ~ gap^(alpha - 1),
alpha 0.01). Defaults: vocabulary 8192, length 512, 64 pairs, 100k training and 3k test examples,
drawn from a seed on the fly.

Models: L layers of [RMSNorm -> token mixer -> residual] without MLPs, then RMSNorm and a linear head.
GSA: gsa_kernels.layers.GatedSlotAttention, 4 heads, width / 4 slots, gate normaliser 16 (the paper's
MQAR runs). The reference: causal softmax attention (SDPA) of the same width and heads, with learned
absolute positions (GSA needs none). Training: AdamW (weight decay 0.1), cosine decay after a short
warm-up, bf16 autocast on a GPU, a short sweep of learning rates; each run's best test accuracy over
its epochs is kept. On a GPU each step is one CUDA-graph replay (`GraphedStep`). The head runs on the answer positions only (64 of 512 per sequence): the other
positions carry no loss, so their logits would be 7/8 of the head's work for nothing. `--jobs N` trains
N runs at once in separate processes: the models are small, so one run leaves most of a large GPU idle
between its launches. Each run's record is saved to OUT/runs/NAME.json after every epoch and gathered
into OUT/runs.json (a killed sweep resumes with --resume and skips the finished ones; --gather only
gathers); the model's checkpoint is saved every epoch (OUT/ckpt/*.pt) and a resumed run continues
from it. OUT/mqar.png plots accuracy against
width (matplotlib, the `bench` extra).

Why examples/ and not benchmarks/: this trains models end to end and reports what they learn; the
benchmarks time kernels.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gsa_kernels.layers import GatedSlotAttention, RMSNorm

IGNORE = -100


@dataclass(frozen=True)
class Task:
    vocab: int = 8192
    length: int = 512
    pairs: int = 64
    train: int = 100_000
    test: int = 3_000
    alpha: float = 0.01
    noise: bool = False             # random tokens between the queries instead of 0
    seed: int = 0


def make_examples(task: Task, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [n, length], labels [n, length]) of MQAR; labels are IGNORE except at the queries."""
    rng = np.random.default_rng(seed)
    half = task.vocab // 2
    context = 2 * task.pairs
    if context + 2 * task.pairs > task.length:
        raise ValueError(f"length {task.length} cannot hold {task.pairs} pairs and their queries")
    keys = np.stack([rng.choice(np.arange(1, half), task.pairs, replace=False) for _ in range(n)])
    values = np.stack([rng.choice(np.arange(half, task.vocab), task.pairs, replace=False) for _ in range(n)])
    inputs = (rng.integers(1, task.vocab, size=(n, task.length)) if task.noise
              else np.zeros((n, task.length), dtype=np.int64))
    inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
    # query slots: the even offsets after the context; offset i (0-based) drawn with p ~ (i+1)^(alpha-1)
    slots = (task.length - context) // 2
    p = np.arange(1, slots + 1, dtype=np.float64) ** (task.alpha - 1)
    p /= p.sum()
    labels = np.full((n, task.length), IGNORE, dtype=np.int64)
    for row in range(n):
        gaps = rng.choice(slots, task.pairs, replace=False, p=p)
        order = rng.permutation(task.pairs)          # which pair each chosen slot asks for
        pos = context + 2 * gaps
        inputs[row, pos] = keys[row, order]
        labels[row, pos] = values[row, order]
    return torch.from_numpy(inputs.astype(np.int64)), torch.from_numpy(labels)


class Attention(nn.Module):
    """Causal softmax attention (SDPA), the reference model's mixer."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(B, T, D))


class GSAMixer(nn.Module):
    def __init__(self, width: int, heads: int, short_conv: bool = False):
        super().__init__()
        self.attn = GatedSlotAttention(hidden_size=width, num_heads=heads, num_slots=width // 4,
                                       gate_logit_normalizer=16, recurrent_threshold=0, use_short_conv=short_conv)

    def forward(self, x):
        return self.attn.mix(x, use_cache=False)[0]


class RecallModel(nn.Module):
    """Embedding -> L x [RMSNorm -> mixer -> residual] -> RMSNorm -> head (no MLPs, as the paper's runs)."""

    def __init__(self, kind: str, vocab: int, width: int, layers: int, heads: int, length: int,
                 short_conv: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(length, width) if kind == "attention" else None
        self.norms = nn.ModuleList(RMSNorm(width) for _ in range(layers))
        self.mixers = nn.ModuleList(GSAMixer(width, heads, short_conv) if kind == "gsa" else Attention(width, heads)
                                    for _ in range(layers))
        self.final = RMSNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids, positions=None):
        """Logits [B, T, vocab], or [B, P, vocab] at the positions [B, P] (indices along T)."""
        h = self.embed(ids)
        if self.pos is not None:
            h = h + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for norm, mix in zip(self.norms, self.mixers):
            h = h + mix(norm(h))
        if positions is not None:
            h = h.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))
        return self.head(self.final(h))


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """[n, pairs]: where each row's labels are set (every row has the same count), in order."""
    mask = labels != IGNORE
    counts = mask.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("every example must hold the same number of queries")
    return mask.nonzero()[:, 1].view(len(labels), int(counts[0]))


@dataclass
class Run:
    model: str
    width: int
    lr: float
    layers: int = 2
    heads: int = 4
    epochs: int = 16
    batch: int = 64
    warmup: float = 0.1            # fraction of the steps
    weight_decay: float = 0.1
    short_conv: bool = False       # GSA's causal depthwise convolutions on q, k, v (conv_size 4)

    def __post_init__(self):
        if self.short_conv and self.model != "gsa":
            raise ValueError(f"short_conv is a GSA layer's option, not {self.model!r}'s")

    @property
    def name(self) -> str:
        conv = "-conv" if self.short_conv else ""
        return f"{self.model}{conv}-w{self.width}-L{self.layers}-lr{self.lr:g}"


def evaluate(model, inputs, labels, batch, device, autocast) -> tuple[float, float]:
    """(loss, accuracy) over the query positions."""
    model.eval()
    positions = answer_positions(labels)
    total_loss, correct, count = 0.0, 0, 0
    with torch.no_grad(), autocast():
        for i in range(0, len(inputs), batch):
            ids, pos = inputs[i:i + batch].to(device), positions[i:i + batch].to(device)
            target = labels[i:i + batch].to(device).gather(1, pos).flatten()
            logits = model(ids, pos).float().flatten(0, 1)
            total_loss += F.cross_entropy(logits, target, reduction="sum").item()
            correct += (logits.argmax(-1) == target).sum().item()
            count += target.numel()
    model.train()
    return total_loss / max(count, 1), correct / max(count, 1)


class GraphedStep:
    """One training step (forward, loss, backward, clipping, AdamW) captured in a CUDA graph and
    replayed on static input buffers: the models here are small, so an eager step is mostly host time
    (a few hundred launches). The capture needs a few warm-up steps; the parameters and the optimizer
    state are put back afterwards, so the run is the eager run's."""

    def __init__(self, model, opt, step_body, ids, positions, targets):
        self.ids, self.positions, self.targets = ids.clone(), positions.clone(), targets.clone()
        saved_params = [p.detach().clone() for p in model.parameters()]
        saved_state = {k: {n: t.clone() if torch.is_tensor(t) else t for n, t in v.items()}
                       for k, v in opt.state.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                step_body(self.ids, self.positions, self.targets)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)     # the captured backward then writes the gradients, not adds
        with torch.cuda.graph(self.graph):
            self.loss = step_body(self.ids, self.positions, self.targets)
        with torch.no_grad():
            for p, saved in zip(model.parameters(), saved_params):
                p.copy_(saved)
            for param, state in opt.state.items():       # created by the warm-up steps if it was empty
                for name, t in state.items():
                    if not torch.is_tensor(t):
                        continue
                    if param in saved_state:
                        t.copy_(saved_state[param][name])
                    else:
                        t.zero_()

    def __call__(self, ids, positions, targets):
        self.ids.copy_(ids, non_blocking=True)
        self.positions.copy_(positions, non_blocking=True)
        self.targets.copy_(targets, non_blocking=True)
        self.graph.replay()
        return self.loss


def write_json(path: Path, obj):
    """Write atomically (a killed sweep never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


def train(run: Run, task: Task, data, device, ckpt: Path | None = None, progress="bar", max_steps=None,
          graph: bool = True, record_path: Path | None = None) -> dict:
    """Train one model; returns its record (losses per epoch, best test accuracy, seconds).

    progress: "bar" (one line redrawn), "lines" (a line per 5% of the steps, for runs side by side) or None.
    graph: on a GPU, replay the training step from a CUDA graph (GraphedStep).
    record_path: where the record is written after every epoch ("finished" false until the last)."""
    (x_train, y_train), (x_test, y_test) = data
    torch.manual_seed(task.seed)
    model = RecallModel(run.model, task.vocab, run.width, run.layers, run.heads, task.length,
                        run.short_conv).to(device)
    on_gpu = device.type == "cuda"
    graphed = on_gpu and graph
    # capturable: the optimizer's step counts and learning rate live on the GPU, so a graph can hold it
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(run.lr, device=device) if graphed else run.lr,
                            weight_decay=run.weight_decay, betas=(0.9, 0.98), capturable=graphed)
    steps_per_epoch = len(x_train) // run.batch             # whole batches: a graph has one shape
    total = steps_per_epoch * run.epochs if max_steps is None else max_steps
    warm = max(1, int(run.warmup * total))

    def set_lr(step):       # linear warm-up, then cosine decay; filled in place when the graph holds it
        lr = run.lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))
        for group in opt.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
    # the autocast cache must be off inside a CUDA graph (its casts would be captured once, then stale)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graphed)) if on_gpu
                else contextlib.nullcontext)
    record = {**asdict(run), "task": asdict(task), "device": torch.cuda.get_device_name() if on_gpu else "cpu",
              "cuda_graph": graphed, "epochs_done": 0, "train_loss": [], "test_loss": [], "test_acc": [],
              "seconds": 0.0}
    step = 0
    if ckpt is not None and ckpt.is_file():          # resume this run where its last epoch ended
        saved = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        record, step = saved["record"], saved["step"]
    positions = answer_positions(y_train)
    targets = y_train.gather(1, positions)

    def step_body(ids, pos, tgt):       # forward, loss, backward, clipping, update; no host sync
        with autocast():
            logits = model(ids, pos)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    def eager_step(ids, pos, tgt):
        opt.zero_grad(set_to_none=True)
        return step_body(ids, pos, tgt)

    gen = torch.Generator().manual_seed(task.seed + 1)
    for _ in range(record["epochs_done"]):           # the same shuffles as an unbroken run
        torch.randperm(len(x_train), generator=gen)
    train_step = eager_step
    t0 = time.monotonic() - record["seconds"]
    report_every, end = (20, "") if progress == "bar" else (max(1, total // 20), "\n")
    for epoch in range(record["epochs_done"], run.epochs):
        order = torch.randperm(len(x_train), generator=gen)
        running, seen = torch.zeros((), device=device), 0
        for i in range(0, steps_per_epoch * run.batch, run.batch):
            if step >= total:
                break
            idx = order[i:i + run.batch]
            batch = [t[idx].to(device, non_blocking=True) for t in (x_train, positions, targets)]
            set_lr(step)
            if graphed and train_step is eager_step:
                try:
                    train_step = GraphedStep(model, opt, step_body, *batch)
                except RuntimeError as err:     # keep training, eagerly, and say so in the record
                    print(f"{run.name}: CUDA graph capture failed ({err}); training eagerly", file=sys.stderr)
                    graphed = record["cuda_graph"] = False
            loss = train_step(*batch)
            step += 1
            running, seen = running + loss.detach(), seen + 1          # no host sync per step
            if progress and (step % report_every == 0 or step == total):
                el = time.monotonic() - t0
                eta = el / step * (total - step)
                print(("\r" if progress == "bar" else "") + f"{run.name} epoch {epoch + 1}/{run.epochs} step "
                      f"{step}/{total} loss {running.item() / seen:.3f} elapsed {el:.0f}s ETA {eta:.0f}s",
                      end=end, file=sys.stderr, flush=True)
        test_loss, test_acc = evaluate(model, x_test, y_test, run.batch, device, autocast)
        record["train_loss"].append(float(running) / max(seen, 1))
        record["test_loss"].append(test_loss)
        record["test_acc"].append(test_acc)
        record["epochs_done"] = epoch + 1
        record["seconds"] = time.monotonic() - t0
        record["best_test_acc"] = max(record["test_acc"])
        record["finished"] = step >= total or epoch + 1 == run.epochs
        if record_path is not None:
            write_json(record_path, {**record, "name": run.name})
        if ckpt is not None:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "record": record, "step": step}, tmp)
            tmp.replace(ckpt)
        if progress:
            print(("\n" if progress == "bar" else "") + f"{run.name} epoch {epoch + 1}: test accuracy {test_acc:.4f}",
                  file=sys.stderr)
        if step >= total:
            break
    record.setdefault("best_test_acc", None)
    return record


def _label(record: dict) -> str:
    return record["model"] + (" + short conv" if record.get("short_conv") else "")


def best_runs(records: list) -> dict:
    """{(label, width): the record of that model and width with the best test accuracy over its lrs}."""
    best = {}
    for r in records:
        key = (_label(r), r["width"])
        if key not in best or (r["best_test_acc"] or 0.0) > (best[key]["best_test_acc"] or 0.0):
            best[key] = r
    return best


def plot(records: list, path: Path):
    """Left: best test accuracy against width (best lr per point). Right: those runs' test accuracy
    after each epoch (MQAR is learned in sudden steps: where a run stands when it stops matters)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    best = best_runs(records)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label in sorted({lab for lab, _ in best}):
        widths = sorted(w for lab, w in best if lab == label)
        line, = left.plot(widths, [best[label, w]["best_test_acc"] or 0.0 for w in widths], marker="o", label=label)
        for style, w in zip(("-", "--", ":", "-."), widths):
            r = best[label, w]
            right.plot(range(1, len(r["test_acc"]) + 1), r["test_acc"], style, color=line.get_color(),
                       label=f"{label}, width {w}, lr {r['lr']:g}")
    left.set_xscale("log", base=2)
    left.set_xlabel("model width")
    left.set_ylabel("MQAR test accuracy (best lr)")
    left.set_ylim(0, 1.02)
    left.legend()
    right.set_xlabel("epoch")
    right.set_ylabel("test accuracy")
    right.set_ylim(0, 1.02)
    right.legend(fontsize=7)
    some = records[0] if records else {}
    fig.suptitle(f"MQAR on {some.get('device', '?')}: {some.get('layers', '?')} layers, batch {some.get('batch', '?')}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


_DATA = {}


def train_and_save(run: Run, task: Task, out: Path, progress, max_steps=None) -> dict:
    """Train one run (its data drawn once per process) and save its record as OUT/runs/NAME.json."""
    if task not in _DATA:
        _DATA[task] = (make_examples(task, task.train, task.seed), make_examples(task, task.test, task.seed + 1000))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    path = out / "runs" / f"{run.name}.json"
    rec = train(run, task, _DATA[task], device, ckpt=out / "ckpt" / f"{run.name}.pt", progress=progress,
                max_steps=max_steps, record_path=path)
    rec["name"] = run.name
    write_json(path, rec)
    print(f"{run.name}: best test accuracy {rec['best_test_acc']:.4f} in {rec['seconds']:.0f} s", file=sys.stderr)
    return rec


def learning_rates(spec: str, model: str) -> list[float]:
    """The learning rates of MODEL in SPEC: bare entries apply to every model, MODEL:LR to that one only."""
    rates = []
    for entry in spec.split(","):
        name, _, rate = entry.rpartition(":")
        if name in ("", model):
            rates.append(float(rate))
    if not rates:
        raise SystemExit(f"error: --lrs {spec!r} gives no learning rate for the model {model!r}")
    return rates


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gsa,attention")
    ap.add_argument("--widths", default="64,128,256")
    ap.add_argument("--lrs", default="1e-3,3e-3",
                    help="learning rates for every model, or MODEL:LR entries for one model (gsa:1e-2,attention:3e-3)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--short-conv", action="store_true", help="GSA layers with short convolutions on q, k, v")
    ap.add_argument("--steps", type=int, default=None, help="stop each run after this many steps (a timing probe)")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process")
    ap.add_argument("--out", default="docs/mqar")
    ap.add_argument("--resume", action="store_true", help="skip the runs OUT/runs holds; continue a killed run "
                                                          "from its checkpoint")
    ap.add_argument("--gather", action="store_true", help="train nothing: gather OUT/runs into runs.json and the "
                                                          "plot (after a sweep cut short)")
    ap.add_argument("--tiny", action="store_true", help="a CPU-sized task (vocabulary 64, length 64, 8 pairs)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs must be at least 1, got {args.jobs}")
    task = Task(vocab=64, length=64, pairs=8, train=2048, test=256) if args.tiny else Task()
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if args.resume and (out / "runs.json").is_file():       # a committed runs.json seeds a fresh machine
        for rec in json.loads((out / "runs.json").read_text()):
            path = out / "runs" / f"{rec['name']}.json"
            if not path.is_file():
                write_json(path, rec)
    elif not args.gather:
        for old in (out / "runs").glob("*.json"):
            old.unlink()
    needs_gpu = not args.gather and "gsa" in args.models.split(",")
    if needs_gpu and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("error: the GSA model runs the Triton kernels, which need a GPU (or TRITON_INTERPRET=1 set "
                 "before starting, for the interpreter: very slow); --models attention runs on a CPU")
    runs = [Run(model, width, lr, layers=args.layers, epochs=args.epochs, batch=args.batch,
                short_conv=args.short_conv and model == "gsa")
            for model in args.models.split(",")
            for width in (int(w) for w in args.widths.split(","))
            for lr in learning_rates(args.lrs, model)]
    def finished(run):
        path = out / "runs" / f"{run.name}.json"
        return path.is_file() and json.loads(path.read_text()).get("finished", False)
    todo = [] if args.gather else [r for r in runs if not finished(r)]
    if args.jobs == 1:
        for run in todo:
            train_and_save(run, task, out, "bar", args.steps)
    else:
        import multiprocessing
        # one CPU thread per run: runs side by side would otherwise each start a thread per core
        with multiprocessing.get_context("spawn").Pool(args.jobs, initializer=torch.set_num_threads, initargs=(1,),
                                                       maxtasksperchild=1) as pool:
            pool.starmap(train_and_save, [(run, task, out, "lines", args.steps) for run in todo], chunksize=1)
    records = [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]
    write_json(out / "runs.json", records)
    try:
        plot(records, out / "mqar.png")
    except ImportError:
        print("matplotlib not installed (the bench extra): no plot", file=sys.stderr)


if __name__ == "__main__":
    main()
