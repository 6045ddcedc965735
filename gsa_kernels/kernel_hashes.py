"""Which kernel source each tuned config depends on: one hash per tuned kernel, for staleness.

A tuned config measured for one kernel source says nothing about another, so a tuned file records,
per tuned kernel (`candidates.all_candidates()`), a hash of the source it was measured on: the Triton
kernels it configures and every helper they call, followed through the imports of gsa_kernels/kernels/
and the module-level constants they read (the dependency closure). At run time only the kernels
whose closure changed are stale: an edit to kernels/decode.py makes the decode step stale and leaves
every other kernel fresh, an edit to kernels/intra.py makes the kernels that call the intra-chunk
helpers stale and leaves the state walks alone.

The closure is found statically, from the files (no import, no Triton): top-level functions,
`from gsa_kernels.kernels.<module> import name` lines and `NAME = ...` constants of the kernels
package. A function's text is hashed as its token stream without comments, docstrings and
indentation widths, so rewording a comment or reflowing a line does not make a tuned file stale; a
change of code does. The chunk size ("chunk") shapes the work of every chunk kernel, so its hash
covers all of them. The launcher (launchers/chunk.py) is not hashed: it passes arguments, it does
not decide what a config does.
"""
from __future__ import annotations

import ast
import hashlib
import io
import tokenize
from functools import lru_cache
from pathlib import Path

KERNELS_DIR = Path(__file__).resolve().parent / "kernels"
PACKAGE = "gsa_kernels.kernels"

# tuned kernel (a key of candidates.all_candidates()) -> the Triton kernels it configures, (module, function)
ROOTS = {
    "states_fwd": (("states", "states_fwd_kernel"),),
    "states_fwd_compact": (("states", "states_fwd_kernel"),),
    "chunk_fwd": (("chunk_fwd", "chunk_fwd_kernel"),),
    "chunk_fwd_compact": (("chunk_fwd", "chunk_fwd_kernel"),),
    "states_bwd": (("states", "states_bwd_kernel"),),
    "chunk_bwd_dscores": (("chunk_bwd", "chunk_bwd_dscores_kernel"),),
    "chunk_bwd_keys": (("chunk_bwd", "chunk_bwd_keys_kernel"),),
    "chunk_bwd_values": (("chunk_bwd", "chunk_bwd_values_kernel"),),
    "recurrent_fwd_keys": (("recurrent", "recurrent_fwd_keys_kernel"),),
    "recurrent_fwd_values": (("recurrent", "recurrent_fwd_values_kernel"),),
    "recurrent_bwd_dp": (("recurrent", "recurrent_bwd_dp_kernel"),),
    "recurrent_bwd_keys": (("recurrent", "recurrent_bwd_keys_kernel"),),
    "recurrent_bwd_values": (("recurrent", "recurrent_bwd_values_kernel"),),
    "recurrent_bwd_gates": (("recurrent", "recurrent_bwd_gates_kernel"),),
    "decode": (("decode", "decode_keys_kernel"), ("decode", "decode_values_kernel")),
}
# the chunk size is one choice for all of a call's chunk kernels
ALL_OF = {"chunk": ("states_fwd", "states_fwd_compact", "chunk_fwd", "chunk_fwd_compact", "states_bwd",
                    "chunk_bwd_dscores", "chunk_bwd_keys", "chunk_bwd_values")}


class _Module:
    """The top-level definitions of one kernels file: name -> (source text, names it reads)."""

    def __init__(self, name: str, text: str):
        self.name = name
        tree = ast.parse(text)
        lines = text.splitlines(keepends=True)
        self.defs: dict[str, tuple[str, set[str]]] = {}
        self.imports: dict[str, tuple[str, str]] = {}
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PACKAGE + "."):
                for alias in node.names:
                    self.imports[alias.asname or alias.name] = (node.module[len(PACKAGE) + 1:], alias.name)
            elif isinstance(node, (ast.FunctionDef, ast.Assign, ast.AnnAssign)):
                first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
                source = "".join(lines[first - 1:node.end_lineno])
                reads = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
                targets = [node.name] if isinstance(node, ast.FunctionDef) else \
                    [t.id for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                     if isinstance(t, ast.Name)]
                for target in targets:
                    self.defs[target] = (source, reads - {target})


def normalized(source: str) -> str:
    """The token stream of a definition without comments, docstrings, blank lines and indentation
    widths (indentation kept as structure): what the code does, not how it is laid out."""
    out, previous = [], []
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.ENCODING, tokenize.ENDMARKER}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in skip:
            continue
        # a string standing alone as a statement right after a block opens is a docstring
        if tok.type == tokenize.STRING and previous[-2:] and previous[-1] == "<indent>":
            out.append("<docstring>")
            previous.append("<docstring>")
            continue
        if previous and previous[-1] == "<docstring>" and tok.type == tokenize.NEWLINE:
            out.pop()
            previous.append("<newline>")
            continue
        text = {tokenize.INDENT: "<indent>", tokenize.DEDENT: "<dedent>", tokenize.NEWLINE: "<newline>"}.get(
            tok.type, tok.string)
        out.append(text)
        previous.append(text)
    return " ".join(out)


def _modules(kernels_dir: Path) -> dict[str, _Module]:
    return {p.stem: _Module(p.stem, p.read_text()) for p in sorted(kernels_dir.glob("*.py"))}


def closure(modules: dict[str, _Module], root: tuple[str, str]) -> dict[tuple[str, str], str]:
    """(module, name) -> normalized source of the root and every definition it reaches."""
    seen: dict[tuple[str, str], str] = {}
    todo = [root]
    while todo:
        module, name = todo.pop()
        mod = modules.get(module)
        if mod is None or (module, name) in seen:
            continue
        if name in mod.imports:
            todo.append(mod.imports[name])
            continue
        if name not in mod.defs:
            continue                      # a builtin, `tl`, `triton`: covered by the Triton version
        source, reads = mod.defs[name]
        seen[(module, name)] = normalized(source)
        todo.extend((module, read) for read in reads)
    if root not in seen:
        raise KeyError(f"kernel {root[1]!r} not found in {root[0]}.py")
    return seen


def hashes_of(kernels_dir: Path) -> dict[str, str]:
    """{tuned kernel: 16-hex hash of its dependency closure} for the kernel files in kernels_dir."""
    modules = _modules(kernels_dir)
    closures = {kernel: {key: text for root in roots for key, text in closure(modules, root).items()}
                for kernel, roots in ROOTS.items()}
    for kernel, parts in ALL_OF.items():
        closures[kernel] = {key: text for part in parts for key, text in closures[part].items()}
    out = {}
    for kernel, items in closures.items():
        h = hashlib.sha256()
        for (module, name), text in sorted(items.items()):
            h.update(f"{module}.{name}\0{text}\0".encode())
        out[kernel] = h.hexdigest()[:16]
    return out


@lru_cache(maxsize=1)
def kernel_hashes() -> dict[str, str]:
    """The hashes of the kernels this package holds (computed once per process)."""
    return hashes_of(KERNELS_DIR)
