"""Tuned configs of fused_recurrent_gsa's kernels: the token-by-token kernels and the decode step read
their configs from the tuned file's recurrent entries (`op: recurrent`), which `python -m tuning.sweep
--op recurrent` writes. A recurrent entry may share its key with a chunk entry; it holds the kernels its
shape launched (the decode step's at T = 1 only); a stale recurrent kernel runs its default; a file
without recurrent entries says nothing about them. Results are compared with the float64 recurrence.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import DEVICE, ON_GPU
from gsa_kernels import (candidates, clear_launches, configs, fused_recurrent_gsa, last_launches, problem_keys,
                         resources, tuned_file)
from reference import naive_recurrent_gsa
from test_tuning import clean_lookup  # noqa: F401 - autouse: no tuned file, an empty user cache, no opt-in
from tuning import search, sweep

RECURRENT = [k for k in candidates.RECURRENT_CANDIDATES if k != "decode"]


def key_of(B, T, H, K, V, M, dtype="float32"):
    return {"K": K, "V": V, "M": M, "dtype": dtype, "tokens": problem_keys.bucket(B * T * H),
            "seqs": problem_keys.bucket(B * H)}


def other_warps(kernel, K=16, V=16, M=16):
    """The default config of a recurrent kernel at these dims with another num_warps: a config the
    defaults never give, so a launch with it can only come from the file."""
    cfg = configs.default_config(kernel, K, V, M, seqs=1)
    warps = candidates.RECURRENT_CANDIDATES[kernel]["num_warps"]
    cfg["num_warps"] = next(w for w in warps if w != cfg["num_warps"])
    for p, vals in candidates.RECURRENT_CANDIDATES[kernel].items():      # a default off the list
        if cfg[p] not in vals:
            cfg[p] = min(vals, key=lambda v: abs(v - cfg[p]))
    return cfg


def write_file(path, entries, **meta_changes):
    meta = search.run_meta(arch=problem_keys.current_arch() or "sm90", dry_run=False, device=DEVICE)
    meta.update(meta_changes)
    path.write_text(yaml.safe_dump({"meta": meta, "entries": entries}, sort_keys=False))
    return path


def recurrent_entry(shape, kernels):
    return {"op": "recurrent", "key": key_of(*shape), "shape": list(shape), "backend": "triton",
            "configs": {k: other_warps(k) for k in kernels}, "times_ms": {}}


def chunk_entry(shape):
    cfgs = {k: {p: vals[0] for p, vals in params.items()} for k, params in candidates.CANDIDATES.items()}
    return {"key": key_of(*shape), "shape": list(shape), "backend": "triton", "configs": cfgs, "times_ms": {}}


def make_inputs(B, T, H=1, D=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    g = F.logsigmoid(torch.randn(B, T, H, D, generator=gen)) / 8
    hk0 = torch.randn(B, H, D, D, generator=gen)
    hv0 = torch.randn(B, H, D, D, generator=gen)
    return [x.to(DEVICE) for x in (q, k, v, 1 - g.exp(), g)], (hk0.to(DEVICE), hv0.to(DEVICE))


def reference(xs, state, do=None):
    xs64 = [x.detach().cpu().double().requires_grad_(do is not None) for x in xs]
    o, _ = naive_recurrent_gsa(*xs64, initial_state=tuple(h.cpu().double() for h in state))
    grads = torch.autograd.grad(o, xs64, do.cpu().double()) if do is not None else None
    return o.detach(), grads


def rel(a, b):
    return ((a.double().cpu() - b).norm() / b.norm()).item()


def test_decode_and_token_by_token_launches_take_the_recurrent_entries(monkeypatch, tmp_path):
    """T = 1 without gradients is the decode step: it launches the T = 1 entry's decode config; a
    training call at T = 32 launches the T = 32 entry's configs, though a chunk entry has the same key;
    a decode step at a batch no entry has takes the nearest entry that holds a decode config (the T = 32
    one holds none); every result equals the float64 recurrence."""
    small = (1, 32, 1, 16, 16, 16)
    path = write_file(tmp_path / "t.yaml", [chunk_entry(small), recurrent_entry((1, 1, 1, 16, 16, 16),
                                                                                 list(candidates.RECURRENT_CANDIDATES)),
                                            recurrent_entry(small, RECURRENT)])
    monkeypatch.setenv(tuned_file.ENV_FILE, str(path))
    configs.reset()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="gsa_kernels")    # a well-formed, fresh file: no warning

        # B = 16 (tokens = seqs = 16) is nearer the T = 32 entry (tokens 32, seqs 1) than the T = 1 one:
        # only the filter on the decode step's kernel sends it to the T = 1 entry
        for B, source in ((1, "tuned"), (16, "nearest")):
            xs, state = make_inputs(B, 1, seed=B)
            clear_launches()
            with torch.no_grad():
                o, _ = fused_recurrent_gsa(*xs, initial_state=state)
            launch = last_launches()["decode"]
            assert (launch["source"], launch["config"]) == (source, other_warps("decode")), B
            assert launch["entry"] == problem_keys.problem_key(**key_of(1, 1, 1, 16, 16, 16))
            assert rel(o, reference(xs, state)[0]) < 1e-5

        xs, state = make_inputs(*small[:2], seed=3)
        xs = [x.requires_grad_() for x in xs]
        do = torch.randn_like(xs[2])
        clear_launches()
        o, _ = fused_recurrent_gsa(*xs, initial_state=state)
        grads = torch.autograd.grad(o, xs, do)
        launched = last_launches()
        assert set(launched) == set(RECURRENT)
        for kernel in RECURRENT:
            assert (launched[kernel]["source"], launched[kernel]["config"]) == ("tuned", other_warps(kernel)), kernel
        o64, grads64 = reference(xs, state, do)
        assert rel(o, o64) < 1e-5
        for name, g, g64 in zip("qkvsg", grads, grads64):
            assert rel(g, g64) < 1e-5, name


def test_a_stale_recurrent_kernel_runs_its_default_and_chunk_only_files_say_nothing(monkeypatch, tmp_path):
    """The file records each recurrent kernel's source hash like a chunk kernel's: a changed decode
    kernel makes its configs stale (one warning, its default) while the token-by-token kernels keep
    theirs. A file of chunk entries alone, from before the recurrent kernels were tuned (no hashes for
    them), gives no warning."""
    entries = [recurrent_entry((1, 1, 1, 16, 16, 16), list(candidates.RECURRENT_CANDIDATES))]
    hashes = {**search.run_meta(arch="sm90", dry_run=False, device=DEVICE)["kernel_hashes"], "decode": "0" * 16}
    monkeypatch.setenv(tuned_file.ENV_FILE, str(write_file(tmp_path / "stale.yaml", entries, kernel_hashes=hashes)))
    configs.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for kernel in candidates.RECURRENT_CANDIDATES:
            configs.launch_config(kernel, K=16, V=16, M=16, dtype=torch.float32, tokens=1, seqs=1)
    ours = [str(w.message) for w in caught if "gsa_kernels" in str(w.message)]
    assert len(ours) == 1 and "stale for kernels ['decode']" in ours[0], ours
    launched = last_launches()
    assert launched["decode"]["source"] == "default"
    assert all(launched[k]["source"] == "tuned" for k in RECURRENT)

    meta = search.run_meta(arch="sm90", dry_run=False, device=DEVICE)
    for name in ("kernel_hashes", "candidates"):
        meta[name] = {k: v for k, v in meta[name].items() if k in candidates.CANDIDATES}
    path = tmp_path / "chunk-only.yaml"
    path.write_text(yaml.safe_dump({"meta": meta, "entries": [chunk_entry((1, 32, 1, 16, 16, 16))]}))
    monkeypatch.setenv(tuned_file.ENV_FILE, str(path))
    configs.reset()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="gsa_kernels")
        configs.launch_config("decode", K=16, V=16, M=16, dtype=torch.float32, tokens=1, seqs=1)
        configs.launch_config("chunk_fwd", K=16, V=16, M=16, dtype=torch.float32, BT=16, tokens=32, seqs=1)
    assert last_launches()["decode"]["source"] == "default"
    assert last_launches()["chunk_fwd"]["source"] == "tuned"


@pytest.mark.parametrize("change, message", [
    (lambda e: e.update(op="fused"), "op must be one of"),
    (lambda e: e.update(backend="torch_compile"), "backend must be triton for op recurrent"),
    (lambda e: e.update(configs={}), "configs must name some of the kernels"),
    (lambda e: e["configs"].update(chunk_fwd={"BK": 32}), "configs must name some of the kernels"),
    (lambda e: e["configs"]["decode"].update(BK=24), "is not a candidate"),
])
def test_a_malformed_recurrent_entry_is_one_warning_and_the_defaults(monkeypatch, tmp_path, change, message):
    entry = recurrent_entry((1, 1, 1, 16, 16, 16), list(candidates.RECURRENT_CANDIDATES))
    change(entry)
    monkeypatch.setenv(tuned_file.ENV_FILE, str(write_file(tmp_path / "bad.yaml", [entry])))
    configs.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            configs.launch_config("decode", K=16, V=16, M=16, dtype=torch.float32, tokens=1, seqs=1)
    ours = [str(w.message) for w in caught if "gsa_kernels" in str(w.message)]
    assert len(ours) == 1 and message in ours[0], ours
    assert last_launches()["decode"]["source"] == "default"


@pytest.mark.parametrize("K, V, M", [(16, 16, 16), (64, 64, 64), (128, 128, 64), (512, 512, 64), (256, 256, 128),
                                     (64, 512, 256), (1024, 1024, 512)])
@pytest.mark.parametrize("seqs", [1, 16, 1024])
def test_every_default_recurrent_config_fits_and_the_fit_rule_refuses_a_spilling_tile(K, V, M, seqs):
    """The sweep prunes by resources.recurrent_fits and the lookup takes a nearest entry only if it
    fits: the defaults must always fit, and a decode tile of 128 rows at 512 slots on one warp must not."""
    for kernel in candidates.RECURRENT_CANDIDATES:
        cfg = configs.default_config(kernel, K, V, M, seqs=seqs)
        assert resources.recurrent_fits(kernel, cfg, K=K, V=V, M=M), (kernel, cfg)
    assert not resources.recurrent_fits("decode", {"BK": 128, "BV": 16, "num_warps": 1}, K=K, V=V, M=512)


def test_recurrent_sweep_writes_entries_the_decode_step_reads(monkeypatch, tmp_path, capsys):
    """python -m tuning.sweep --op recurrent (--dry-run in the interpreter): one T = 1 shape tunes the
    token-by-token kernels (training at T = 1) and the decode step (no gradients); the file it writes
    loads with no warning, and the decode step launches its entry. --kernels of the other op is refused
    naming the op's kernels."""
    shapes = tmp_path / "shapes.yaml"
    shapes.write_text("[[1, 1, 1, 16, 16, 16]]\n")
    out = tmp_path / "rec.yaml"
    where = ["--arch", problem_keys.current_arch()] if ON_GPU else ["--arch", "sm90", "--dry-run"]
    rc = sweep.main(where + ["--op", "recurrent", "--shapes", str(shapes), "--dtypes", "fp32",
                             "--max-candidates", "1", "--output", str(out)])
    assert rc == 0
    doc = yaml.safe_load(out.read_text())
    (entry,) = doc["entries"]
    assert entry["op"] == "recurrent" and set(entry["configs"]) == set(candidates.RECURRENT_CANDIDATES)
    assert entry["times_ms"]["decode"]["op"] == "infer"
    assert doc["meta"]["search"]["op"] == "recurrent"

    monkeypatch.setenv(tuned_file.ENV_FILE, str(out))
    configs.reset()
    xs, state = make_inputs(1, 1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="gsa_kernels")
        with torch.no_grad():
            o, _ = fused_recurrent_gsa(*xs, initial_state=state)
    assert last_launches()["decode"]["source"] == "tuned"
    assert last_launches()["decode"]["config"] == entry["configs"]["decode"]
    assert rel(o, reference(xs, state)[0]) < 1e-5

    capsys.readouterr()
    assert sweep.main(["--arch", "sm90", "--kernels", "decode", "--output", str(tmp_path / "x.yaml")]) == 2
    assert "--kernels: unknown for --op chunk: ['decode']" in capsys.readouterr().err


def test_the_decode_step_is_timed_and_gated_from_a_state(monkeypatch):
    """The recurrent search times and checks its forward-only phase (the decode step at T = 1) from a
    float32 state that it must read and update, as a serving engine runs it: a decode that ignored the
    state would otherwise win on a workload without its bytes. A step that drops the state is rejected
    by the gate, naming the run from a state."""
    from tuning.shapes import Shape
    settings = search.Settings(op="recurrent", compile_backend=False)
    shape_search = search.ShapeSearch(Shape(2, 1, 1, 16, 16, 16), "float32", DEVICE, settings)
    assert shape_search.inputs.states is not None and len(shape_search.inputs.states) == len(shape_search.inputs.sets)
    shape_search.discover(None)
    assert [k.name for k in shape_search.kernels if k.phase == "infer"] == ["decode"]
    start = {k.name: shape_search.space(k.name, None)[2] for k in shape_search.kernels}
    ms, why = shape_search.measure(start, "infer")
    assert why is None and ms > 0

    honest = shape_search.fn
    monkeypatch.setattr(shape_search, "fn", lambda *xs, initial_state=None, **kw: honest(*xs, **kw))
    ms, why = shape_search.measure(start, "infer")
    assert ms is None and "from a state" in why


def test_resume_accepts_a_file_made_before_the_recurrent_kernels_were_tuned():
    """sweep --op recurrent --resume adds recurrent entries to a file of chunk entries whose meta
    knows only the chunk kernels: a kernel the old run did not know is no difference, a changed hash
    of one it knew is, unless no kept entry configures that kernel."""
    from tuning import yamlio
    new = search.run_meta(arch="sm90", dry_run=False, device=DEVICE)
    old = copy.deepcopy(new)
    for name in ("kernel_hashes", "candidates"):
        old[name] = {k: v for k, v in old[name].items() if k in candidates.CANDIDATES}
    assert yamlio.software_mismatch(old, new) == []
    old["kernel_hashes"]["chunk_fwd"] = "0" * 16
    assert yamlio.software_mismatch(old, new) == ["kernel_hashes of chunk_fwd"]
    # the same change where the old entries configure no chunk_fwd (a file of recurrent entries, or
    # chunk entries after a decode edit): no difference
    assert yamlio.software_mismatch(old, new, used={"decode", "states_fwd"}) == []
    assert yamlio.software_mismatch(old, new, used={"chunk_fwd"}) == ["kernel_hashes of chunk_fwd"]


def test_combine_replaces_the_new_ops_entries_and_keeps_the_rest(tmp_path, capsys):
    """A decode re-tune put into the shipped file: NEW's entries replace BASE's of the same op and
    key, BASE's others stay, a chunk entry sharing the key is not replaced by a recurrent one, and the
    result reads back with nothing stale."""
    from tuning import combine
    shape = (1, 1, 4, 16, 16, 16)
    old_rec = recurrent_entry(shape, ["decode"])
    other_rec = recurrent_entry((8, 1, 4, 16, 16, 16), ["decode"])
    new_rec = copy.deepcopy(old_rec)
    new_rec["configs"]["decode"] = configs.default_config("decode", 16, 16, 16, seqs=4)
    base = write_file(tmp_path / "base.yaml", [chunk_entry(shape), old_rec, other_rec], date="base-date")
    new = write_file(tmp_path / "new.yaml", [new_rec], date="new-date")
    assert combine.main([str(base), str(new), "--output", str(tmp_path / "out.yaml"), "--note", "why"]) == 0
    doc = yaml.safe_load((tmp_path / "out.yaml").read_text())
    assert doc["meta"]["search"]["note"] == "why"
    got = {(e.get("op", "chunk"), e["shape"][0]): e["configs"] for e in doc["entries"]}
    assert got == {("chunk", 1): chunk_entry(shape)["configs"], ("recurrent", 1): new_rec["configs"],
                   ("recurrent", 8): other_rec["configs"]}
    assert doc["meta"]["date"] == "new-date" and "base-date" in doc["meta"]["search"]["combined_with"]
    # a NEW cut short by its time budget lacks none of BASE's shapes: complete as BASE is
    for base_complete in (True, False):
        write_file(base, [chunk_entry(shape), old_rec, other_rec], complete=base_complete)
        write_file(new, [new_rec], complete=False)
        assert combine.main([str(base), str(new), "--output", str(tmp_path / "out.yaml")]) == 0
        assert yaml.safe_load((tmp_path / "out.yaml").read_text())["meta"]["complete"] is base_complete
    _, entries, stale = tuned_file.validate(doc, arch="sm90")
    assert not stale and len(entries) == 3


def test_combine_replaces_entries_of_an_older_candidate_list_and_refuses_to_keep_them(tmp_path, capsys):
    """After a parameter is added to a kernel (the decode step's PDL), BASE's entries of that kernel
    lack it: NEW's re-tune replaces them (nothing of the old list is kept), but a BASE entry that NEW
    does not replace cannot be read as today's, and is refused by name."""
    from tuning import combine
    shape, other = (1, 1, 4, 16, 16, 16), (8, 1, 4, 16, 16, 16)
    old_rec = recurrent_entry(shape, ["decode"])
    dropped = next(iter(old_rec["configs"]["decode"]))          # as if that parameter were new today
    del old_rec["configs"]["decode"][dropped]
    old_other = copy.deepcopy(old_rec)
    old_other.update(key=key_of(*other), shape=list(other))
    new_rec = recurrent_entry(shape, ["decode"])
    new = write_file(tmp_path / "new.yaml", [new_rec])
    base = write_file(tmp_path / "base.yaml", [old_rec])
    assert combine.main([str(base), str(new), "--output", str(tmp_path / "out.yaml")]) == 0
    (entry,) = yaml.safe_load((tmp_path / "out.yaml").read_text())["entries"]
    assert entry["configs"] == new_rec["configs"]
    base = write_file(tmp_path / "base.yaml", [old_rec, old_other])
    assert combine.main([str(base), str(new)]) == 2
    err = capsys.readouterr().err
    assert "BASE is not a tuned file (its entries that NEW does not replace)" in err and dropped in err, err


@pytest.mark.parametrize("stale_in", ["BASE", "NEW"])
def test_combine_refuses_stale_kernels_and_other_software(tmp_path, capsys, stale_in):
    """A kernel configured by a kept BASE entry (or by NEW) whose source hash is not today's would
    be labelled fresh by the combined meta: refused, naming it, and nothing written; so is a pair of
    files from other software."""
    from tuning import combine
    shape = (1, 1, 4, 16, 16, 16)
    kernel = "chunk_fwd" if stale_in == "BASE" else "decode"
    hashes = search.run_meta(arch="sm90", dry_run=False, device=DEVICE)["kernel_hashes"]
    edited = {"kernel_hashes": {**hashes, kernel: "0" * 16}}
    base = write_file(tmp_path / "base.yaml", [chunk_entry(shape)], **(edited if stale_in == "BASE" else {}))
    new = write_file(tmp_path / "new.yaml", [recurrent_entry(shape, ["decode"])],
                     **(edited if stale_in == "NEW" else {}))
    before = base.read_text()
    assert combine.main([str(base), str(new)]) == 2
    err = capsys.readouterr().err
    assert f"{stale_in}'s entries configure" in err and kernel in err, err
    assert base.read_text() == before
    base = write_file(tmp_path / "base.yaml", [chunk_entry(shape)])
    write_file(tmp_path / "new.yaml", [recurrent_entry(shape, ["decode"])], triton="0.0.1")
    before = base.read_text()
    assert combine.main([str(base), str(new)]) == 2
    assert "triton" in capsys.readouterr().err and base.read_text() == before
