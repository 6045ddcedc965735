"""Problem shapes the sweep tunes: presets, or a YAML/JSON file of your own.

A shape is [B, T, H, K, V, M]; the sweep crosses the shapes with --dtypes. Presets (comma-separate to
combine, e.g. `bench,common`):

    bench        the chunk_gsa benchmark shapes a-d ([B, T, H, K=V, M]: a [8, 2048, 4, 512, 64],
                 b [8, 2048, 16, 128, 64], c [2, 8192, 4, 512, 64], d [32, 512, 4, 256, 64])
    common       the common head dims K = V in {64, 128, 256, 512} x M in {32, 64, 128} at B = 8,
                 T = 2048 and H = 2048 // K heads (hidden size 2048, like shapes a and b)
    common-full  the same with K and V independent (48 shapes per dtype instead of 12)
    long         long sequences with few of them (the bench's f [1, 32768, 4, 512, 64],
                 g [1, 65536, 4, 512, 64], h [4, 16384, 4, 512, 64]), where the two-level walk pays
    tiny         the --dry-run grid: two interpreter-sized shapes (one chunk size, then two)
  for --op recurrent (fused_recurrent_gsa):
    decode       T = 1 (the decode step, and the token-by-token kernels' training step at T = 1): the
                 paper's layer [B, 1, 4, 512, 512, 64] at B = 1, 8, 16, 64, and the common head dims
                 K = V in {64, 128, 256} at M = 64, H = 2048 // K, B = 1 and 16
    short        short prompts and the layer's recurrent threshold, T = 64: the paper's layer at B = 1
                 and 8, and b's heads [8, 64, 16, 128, 128, 64]
    tiny-recurrent  the --dry-run grid of --op recurrent: [1, 1, 1, 16, 16, 16] and [1, 16, 1, 16, 16, 16]

A FILE is a YAML or JSON list whose items are [B, T, H, K, V, M] or {B:, T:, H:, K:, V:, M:}.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Shape:
    B: int
    T: int
    H: int
    K: int
    V: int
    M: int

    def as_list(self) -> list[int]:
        return [self.B, self.T, self.H, self.K, self.V, self.M]

    def __str__(self):
        return "[" + ", ".join(str(x) for x in self.as_list()) + "]"


BENCH = {"a": Shape(8, 2048, 4, 512, 512, 64), "b": Shape(8, 2048, 16, 128, 128, 64),
         "c": Shape(2, 8192, 4, 512, 512, 64), "d": Shape(32, 512, 4, 256, 256, 64)}
LONG = {"f": Shape(1, 32768, 4, 512, 512, 64), "g": Shape(1, 65536, 4, 512, 512, 64),
        "h": Shape(4, 16384, 4, 512, 512, 64)}
HEAD_DIMS = (64, 128, 256, 512)
SLOTS = (32, 64, 128)


def _hidden_2048(K: int) -> int:
    return max(1, 2048 // K)


PRESETS = {
    "bench": lambda: list(BENCH.values()),
    "common": lambda: [Shape(8, 2048, _hidden_2048(D), D, D, M) for D in HEAD_DIMS for M in SLOTS],
    "common-full": lambda: [Shape(8, 2048, _hidden_2048(K), K, V, M)
                            for K in HEAD_DIMS for V in HEAD_DIMS for M in SLOTS],
    "long": lambda: list(LONG.values()),
    "tiny": lambda: [Shape(1, 32, 1, 16, 16, 16), Shape(1, 64, 1, 16, 16, 16)],
    "decode": lambda: [Shape(B, 1, 4, 512, 512, 64) for B in (1, 8, 16, 64)]
    + [Shape(B, 1, _hidden_2048(D), D, D, 64) for D in HEAD_DIMS[:3] for B in (1, 16)],
    "short": lambda: [Shape(1, 64, 4, 512, 512, 64), Shape(8, 64, 4, 512, 512, 64), Shape(8, 64, 16, 128, 128, 64)],
    "tiny-recurrent": lambda: [Shape(1, 1, 1, 16, 16, 16), Shape(1, 16, 1, 16, 16, 16)],
}
# the sweep's grid when --shapes is not given: (op, dry run) -> presets
DEFAULT_GRID = {("chunk", False): "bench,common,long", ("chunk", True): "tiny",
                ("recurrent", False): "decode,short", ("recurrent", True): "tiny-recurrent"}

DTYPE_ALIASES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
                 "half": "float16", "fp32": "float32", "float32": "float32"}


def _shape_from(item, where: str) -> Shape:
    names = ("B", "T", "H", "K", "V", "M")
    if isinstance(item, dict):
        missing = [n for n in names if n not in item]
        if missing:
            raise ValueError(f"--shapes {where}: item {item!r} lacks {missing}")
        values = [item[n] for n in names]
    elif isinstance(item, (list, tuple)) and len(item) == 6:
        values = list(item)
    else:
        raise ValueError(f"--shapes {where}: item {item!r} must be [B, T, H, K, V, M] or a mapping of them")
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in values):
        raise ValueError(f"--shapes {where}: item {item!r} must hold positive ints")
    return Shape(*values)


def parse_shapes(spec: str) -> list[Shape]:
    """Presets (comma-separated) or one FILE; duplicates dropped, order kept."""
    shapes: list[Shape] = []
    path = Path(spec)
    if path.is_file():
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        if not isinstance(data, list) or not data:
            raise ValueError(f"--shapes {spec}: expected a non-empty list of shapes")
        shapes = [_shape_from(item, spec) for item in data]
    else:
        for name in spec.split(","):
            name = name.strip()
            if name not in PRESETS:
                raise ValueError(f"--shapes {spec!r}: {name!r} is neither a file nor a preset "
                                 f"({', '.join(PRESETS)})")
            shapes += PRESETS[name]()
    return list(dict.fromkeys(shapes))


def parse_dtypes(spec: str) -> list[str]:
    out = []
    for name in spec.split(","):
        name = name.strip().lower()
        if name not in DTYPE_ALIASES:
            raise ValueError(f"--dtypes {spec!r}: {name!r} is not one of {sorted(DTYPE_ALIASES)}")
        out.append(DTYPE_ALIASES[name])
    return list(dict.fromkeys(out))
