"""One training step of a GSAModel, eager vs torch.compile(fullgraph=True), and the compile time.

    python -m benchmarks.bench_compile [--layers 4 --hidden 2048 --heads 4 --slots 64 --T 2048 --B 4] [--loss logits]

The model is the issue's: 4 GSABlocks, hidden 2048, 4 heads (K = V = 512), 64 slots, bf16 weights and
activations, vocabulary 32000 (a Llama-sized LM head; the issue names none). A step is forward, the
shifted cross-entropy loss and backward (gradients set to None before each). The loss is the
model's own (`model(ids, labels=ids)`: chunked, no float32 logits formed) unless `--loss logits`
(full logits, then F.cross_entropy). Times are medians of
triton.testing.do_bench after warm-up; the compile time is the wall time of the first compiled step
(Dynamo + AOTAutograd + Inductor for forward and backward, our Triton kernels already built by the
eager warm-up) minus one eager step. A second length T/2 then checks that the compiled model does not
recompile (T is marked dynamic). Prints a table and writes --json.

--fla adds flash-linear-attention 0.6.0's GSAForCausalLM in the same run (eager, its own fused norms,
SwiGLU and loss from labels): our model is then built from its config (`GSAModel.from_fla`) and loads
its weights, so both compute the same function from the same parameters (their losses are printed
side by side). FLA's model classes need transformers (benchmarks/gpu_check.sh installs the wheels of
.whl_hf/ when carried: ../shared/GPU.md).
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch._dynamo
import torch.nn.functional as F


def kernel_times(fn, top: int) -> tuple[list, float]:
    """([(kernel, ms, launches)] of the `top` GPU kernels of one call of fn by total time, the total ms
    of all its kernels), from torch.profiler after a warm-up call."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us > 0:
            rows.append((e.key, us / 1e3, e.count))
    rows.sort(key=lambda r: -r[1])
    return rows[:top], sum(ms for _, ms, _ in rows)


def print_kernels(title: str, rows: list, total: float):
    print(f"{title}: {total:.2f} ms of GPU kernels in one step; the largest:")
    for name, ms, count in rows:
        print(f"  {ms:8.3f} ms {count:5d}x  {name[:90]}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--mode", default="default", help="torch.compile mode")
    ap.add_argument("--loss", choices=("labels", "logits"), default="labels",
                    help="labels: the model's chunked loss; logits: full logits and F.cross_entropy")
    ap.add_argument("--fla", action="store_true", help="also time FLA's GSAForCausalLM (eager) in this run")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also print the N GPU kernels of one eager step (ours, and FLA's with --fla) that take "
                         "the most time, from torch.profiler")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_compile needs a CUDA GPU")
    import triton.testing

    from gsa_kernels.layers import GSAModel

    torch.manual_seed(0)
    fla_model = None
    if args.fla:
        from fla.models import GSAConfig, GSAForCausalLM
        fla_config = GSAConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                               num_heads=args.heads, num_slots=args.slots)
        fla_model = GSAForCausalLM(fla_config).to(device="cuda", dtype=torch.bfloat16).train()
        model = GSAModel.from_fla(fla_config, fla_model.state_dict()).to(device="cuda", dtype=torch.bfloat16).train()
        fla_model.cpu()         # off the GPU while ours is measured: each peak holds one model
    else:
        model = GSAModel(args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                         num_slots=args.slots).to(device="cuda", dtype=torch.bfloat16).train()
    ids = torch.randint(0, args.vocab, (args.B, args.T), device="cuda")
    torch._dynamo.mark_dynamic(ids, 1)

    def step(ids):
        if args.loss == "labels":
            return model(ids, labels=ids)[0]
        logits, _ = model(ids)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    compiled_step = torch.compile(step, fullgraph=True, mode=args.mode)

    def train_step(fn):
        def run():
            model.zero_grad(set_to_none=True)
            loss = fn(ids)
            loss.backward()
            return loss
        return run

    eager = train_step(step)
    eager_loss = eager().item()            # warm-up: builds our Triton kernels
    eager_ms = triton.testing.do_bench(eager, warmup=100, rep=1000, return_mode="median")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    compiled_loss = train_step(compiled_step)().item()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0 - eager_ms / 1e3
    compiled_ms = triton.testing.do_bench(train_step(compiled_step), warmup=100, rep=1000, return_mode="median")

    torch.cuda.reset_peak_memory_stats()
    eager()
    eager_peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    train_step(compiled_step)()
    compiled_peak = torch.cuda.max_memory_allocated() / 2**30
    # printed as they come: FLA's first call (its autotuning) can outlast a device call
    print(f"GSAModel {args.layers} layers, hidden {args.hidden}, {args.heads} heads, {args.slots} slots, "
          f"vocab {args.vocab}, B {args.B}, T {args.T}, bf16, loss from {args.loss}, on {torch.cuda.get_device_name()}")
    print(f"{'':>10} {'step ms':>9} {'peak GiB':>9} {'loss':>9}")
    print(f"{'eager':>10} {eager_ms:9.2f} {eager_peak:9.2f} {eager_loss:9.4f}")
    print(f"{'compiled':>10} {compiled_ms:9.2f} {compiled_peak:9.2f} {compiled_loss:9.4f}", flush=True)

    # a second length: the compiled step must not recompile
    frames_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    half = torch.randint(0, args.vocab, (args.B, args.T // 2), device="cuda")
    torch._dynamo.mark_dynamic(half, 1)
    model.zero_grad(set_to_none=True)
    compiled_step(half).backward()
    recompiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames_before

    profiles = {}
    if args.profile:
        profiles["ours"] = kernel_times(eager, args.profile)
        print_kernels("ours, eager", *profiles["ours"])

    fla = {}
    if fla_model is not None:
        model.cpu()
        fla_model.cuda()

        def fla_run():
            fla_model.zero_grad(set_to_none=True)
            loss = fla_model(input_ids=ids, labels=ids).loss
            loss.backward()
            return loss
        fla["loss"] = fla_run().item()          # warm-up: FLA autotunes its kernels on the first call
        fla["ms"] = triton.testing.do_bench(fla_run, warmup=100, rep=1000, return_mode="median")
        torch.cuda.reset_peak_memory_stats()
        fla_run()
        fla["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"{'FLA eager':>10} {fla['ms']:9.2f} {fla['peak_gib']:9.2f} {fla['loss']:9.4f}", flush=True)
        if args.profile:
            profiles["fla"] = kernel_times(fla_run, args.profile)
            print_kernels("FLA, eager", *profiles["fla"])

    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  shape=vars(args), eager_ms=eager_ms, compiled_ms=compiled_ms, speedup=eager_ms / compiled_ms,
                  compile_s=compile_s, eager_peak_gib=eager_peak, compiled_peak_gib=compiled_peak,
                  eager_loss=eager_loss, compiled_loss=compiled_loss, new_graphs_for_T_half=recompiled, fla=fla,
                  kernels={who: dict(total_ms=total, top=rows) for who, (rows, total) in profiles.items()})
    print(f"speed-up {eager_ms / compiled_ms:.2f}x; compile time {compile_s:.1f} s (mode {args.mode!r}); "
          f"new graphs at T = {args.T // 2}: {recompiled}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
