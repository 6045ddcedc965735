"""benchmarks/report.py without a GPU: what it plans to measure and what it writes from saved rows."""
import argparse
import csv
import json

import pytest

from benchmarks import report


def _args(**kw):
    base = dict(quick=False, sections=list(report.SECTIONS))
    return argparse.Namespace(**{**base, **kw})


def test_plan_covers_the_long_sequences_at_both_batches():
    work = report.plan(_args(sections=["long"]), {p: None for p in report.PROVIDERS})
    cases = {(w[2], w[3], w[7], w[8]) for w in work}
    assert {w[0] for w in work} == {"long"}
    assert len(cases) == len(work) == len(report.LONG_BATCHES) * len(report.LONG_LENGTHS) * 2 * 2
    for B in (1, 4):
        for T in (4096, 65536, 262144):
            for p in ("gsa_kernels", "fla_gsa"):
                assert (B, T, p, "fwd+bwd") in cases
    # without flash-linear-attention the plan holds ours alone
    alone = report.plan(_args(sections=["long"]), {"gsa_kernels": None})
    assert {w[7] for w in alone} == {"gsa_kernels"}


def test_sections_select_the_work():
    provs = {p: None for p in report.PROVIDERS}
    everything = report.plan(_args(), provs)
    assert {w[0] for w in everything} == {"length", "shapes", "long"}
    assert {w[0] for w in report.plan(_args(sections=["shapes"]), provs)} == {"shapes"}
    with pytest.raises(SystemExit):
        report.main(["--sections", "long,lenght", "--plot-only", "unused.json"])


def _row(section, label, B, T, provider, mode, ms, floor_ms, peak=100.0):
    return {"section": section, "label": label, "B": B, "T": T, "H": 4, "D": 512, "M": 64, "provider": provider,
            "mode": mode, "floor_ms": floor_ms, "ms": ms, "peak_MiB": peak}


def test_summary_and_csv_of_the_long_sequences(tmp_path):
    rows = [_row("long", "1x65536", 1, 65536, "gsa_kernels", "fwd", 2.0, 0.25),
            _row("long", "1x65536", 1, 65536, "fla_gsa", "fwd", 3.0, 0.25),
            _row("long", "1x65536", 1, 65536, "gsa_kernels", "fwd+bwd", 10.0, 0.5),
            _row("long", "1x65536", 1, 65536, "fla_gsa", "fwd+bwd", 12.5, 0.5),
            _row("long", "4x16384", 4, 16384, "gsa_kernels", "fwd", 1.9, 0.25),
            _row("long", "4x16384", 4, 16384, "gsa_kernels", "fwd+bwd", 8.0, 0.5)]
    doc = {"meta": {"device": "H200", "torch": "2.11", "triton": "3.6", "fla": "0.6.0", "copy_GBps": 4200.0},
           "rows": rows}
    text = report.summary_markdown(doc)
    lines = text.splitlines()
    assert any(line.startswith("**Long sequences**") for line in lines)
    assert "| [1, 65536] | fwd | 2.000 | 8.0x | 3.000 | 12.0x | 1.50x |" in text
    assert "| [1, 65536] | fwd+bwd | 10.000 | 20.0x | 12.500 | 25.0x | 1.25x |" in text
    # a case FLA did not run keeps its row, with dashes
    assert "| [4, 16384] | fwd | 1.900 | 7.6x | - | - | - |" in text
    report.write_csv(doc, tmp_path / "report.csv")
    with open(tmp_path / "report.csv") as f:
        written = list(csv.DictReader(f))
    assert [r["label"] for r in written] == [r["label"] for r in rows]
