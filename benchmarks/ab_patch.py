"""Write the working tree's uncommitted change as a patch for `gpu_check.sh ab`, with the shipped tuned
files' kernel hashes moved to the edited sources' (a timing stand-in, never a change to land).

    python -m benchmarks.ab_patch docs/pending/NAME-ab.diff

An edit to a kernel makes its tuned configs stale (gsa_kernels/kernel_hashes.py), so the patched side
of an A/B would run that kernel's defaults against the base's tuned configs: a comparison of configs,
not of the change. With the hashes moved, the patched side runs the shipped configs, as the base
does; the sweep that lands a change re-validates them (`AB_SWEEP`, or the sweep step). The tuned
files in the working tree are left as they were.
"""
from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

from gsa_kernels.kernel_hashes import kernel_hashes

SHIPPED = ("tuned_configs/sm90.yaml", "tuned_configs/sm90-nvidia-h200.yaml")


def moved_hashes(text: str, hashes: dict) -> tuple[str, list[str]]:
    """The tuned file's text with each `kernel: <hash>` of kernel_hashes set to the current hash, and
    the kernels that moved."""
    block = re.search(r"kernel_hashes: \{[^}]*\}", text)
    if block is None:
        raise SystemExit("ab_patch: a tuned file without a kernel_hashes mapping")
    inside, moved = block.group(0), []
    for kernel, new in hashes.items():
        match = re.search(r"\b%s: ([0-9a-f]{16})\b" % re.escape(kernel), inside)
        if match and match.group(1) != new:
            inside = inside[:match.start(1)] + new + inside[match.end(1):]
            moved.append(kernel)
    return text[:block.start()] + inside + text[block.end():], moved


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", help="where to write the patch (e.g. docs/pending/NAME-ab.diff)")
    args = ap.parse_args(argv)
    root = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True,
                               check=True).stdout.strip())
    patch = subprocess.run(["git", "diff", "--", ".", *(f":!{f}" for f in SHIPPED)], cwd=root,
                           capture_output=True, text=True, check=True).stdout
    if not patch:
        raise SystemExit("ab_patch: the working tree has no change to write")
    hashes = kernel_hashes()
    originals = {f: (root / f).read_text() for f in SHIPPED}
    try:
        for f, text in originals.items():
            text, moved = moved_hashes(text, hashes)
            (root / f).write_text(text)
            print(f"{f}: hashes moved for {', '.join(moved) or 'no kernel'}")
        patch += subprocess.run(["git", "diff", "--", *SHIPPED], cwd=root, capture_output=True, text=True,
                                check=True).stdout
    finally:
        for f, text in originals.items():
            (root / f).write_text(text)
    Path(args.output).write_text(patch)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
