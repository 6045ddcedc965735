"""The sweep's command line refuses bad input cleanly: exit status 2 and one line on stderr naming the
option and what it expects, no traceback, before any shape is tuned.

Covered: an --output that cannot be written (a directory, a parent that is a file, a read-only
directory), a --resume file that breaks the schema (and is left as it was), --tie and the other numeric
options out of range, empty string options and bad --dtypes (checked before the GPU is looked at), a
--seed file with a malformed meta; and the leftover temp files of a killed atomic write, removed by
the next run that writes the same output.

Everything runs in-process with search.tune_shape replaced by a stub, so no test ever tunes (not even
when a check is missing and main goes on) and none needs a GPU.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import yaml

from tuning import search, shapes, yamlio
from tuning import sweep as sweep_cli

STUB_REASON = "stub: tune_shape is not run by these tests"


@pytest.fixture(autouse=True)
def no_tuning(monkeypatch):
    """Any shape that reaches tuning "fails" at once; the list returned records those calls."""
    calls = []

    def stub(**kwargs):
        calls.append(kwargs)
        return {"entry": None, "failed": STUB_REASON}
    monkeypatch.setattr(search, "tune_shape", stub)
    # --dry-run asks for the interpreter; conftest sets it on a CPU, and no kernel runs here anyway
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return calls


def run_cli(*argv) -> int:
    """main's exit status, whether it returns it or argparse raises SystemExit."""
    try:
        return sweep_cli.main(list(argv))
    except SystemExit as e:
        return e.code


def assert_one_line_error(capsys, *names):
    """stderr is exactly one line, the sweep's error line, and it names each of names."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tuning.sweep: error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], err
    return lines[0]


def dry_run(out, *extra):
    return ("--arch", "sm90", "--dry-run", "--output", str(out), *extra)


# ---------------------------------------------------------------------------------------------
# --output


def test_output_that_is_a_directory_is_refused(tmp_path, capsys, no_tuning):
    assert run_cli(*dry_run(tmp_path)) == 2
    assert_one_line_error(capsys, "--output", "directory")
    assert not no_tuning


@pytest.mark.parametrize("below", ["sm90.yaml", "sub/sm90.yaml"], ids=["parent", "ancestor"])
def test_output_under_a_file_is_refused(tmp_path, capsys, no_tuning, below):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    assert run_cli(*dry_run(blocker / below)) == 2
    assert_one_line_error(capsys, "--output", str(blocker), "not a directory")
    assert blocker.read_text() == "not a directory\n" and not no_tuning


def _can_create_in(d: Path) -> bool:
    try:
        fd, probe = tempfile.mkstemp(dir=d)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory no file can be created in: mode 0555, or (root ignores modes) sysfs's root."""
    d = tmp_path / "read-only"
    d.mkdir()
    d.chmod(0o555)
    try:
        if not _can_create_in(d):
            yield d
        elif Path("/sys").is_dir() and not _can_create_in(Path("/sys")):
            yield Path("/sys")
        else:
            pytest.skip("no directory here refuses new files to this user")
    finally:
        d.chmod(0o755)


def test_output_in_a_read_only_directory_is_refused(read_only_dir, capsys, no_tuning):
    out = read_only_dir / "gsa_sweep_test_sm90.yaml"
    assert run_cli(*dry_run(out)) == 2
    assert_one_line_error(capsys, "--output", str(read_only_dir), "cannot create")
    assert not out.exists() and not no_tuning


# ---------------------------------------------------------------------------------------------
# --resume


@pytest.fixture
def resumable(tmp_path, no_tuning):
    """A well-formed file a --resume of the same dry run accepts: the stub's failed tiny shapes."""
    out = tmp_path / "sm90.yaml"
    assert run_cli(*dry_run(out)) == 0
    doc = yaml.safe_load(out.read_text())
    assert len(doc["failed"]) == len(shapes.PRESETS["tiny"]()) and doc["entries"] == []
    no_tuning.clear()
    return out, doc


def test_a_well_formed_resume_file_is_kept(resumable, capsys, no_tuning):
    out, doc = resumable
    capsys.readouterr()
    assert run_cli(*dry_run(out, "--resume")) == 0
    assert "resuming from" in capsys.readouterr().err
    assert not no_tuning                                     # every shape was in the file
    assert yaml.safe_load(out.read_text())["failed"] == doc["failed"]


ENTRY_KEY = {"K": 16, "V": 16, "M": 16, "dtype": "float16", "tokens": 32, "seqs": 1}


def _bad_key_entry(configs):
    return {"key": {**ENTRY_KEY, "K": "16"}, "shape": [1, 32, 1, 16, 16, 16], "backend": "triton",
            "configs": configs}


@pytest.mark.parametrize("corrupt,names", [
    (lambda d: d.update(failed="notalist"), ["failed", "list"]),
    (lambda d: d.update(failed=[3]), ["failed[0]", "mapping"]),
    (lambda d: d["failed"][0]["key"].update(K="16"), ["failed[0].key.K"]),
    (lambda d: d["failed"][0].update(key=[16, 16]), ["failed[0].key"]),
    (lambda d: d.update(entries="abc"), ["entries", "list"]),
    (lambda d: d.update(entries=["oops"]), ["entries[0]", "mapping"]),
    (lambda d: d.update(entries=[_bad_key_entry({})]), ["entries[0].key.K"]),
    (lambda d: d.update(meta="notamapping"), ["meta", "mapping"]),
    (lambda d: d.clear() or d.update(meta=None), ["meta"]),
], ids=["failed-not-a-list", "failed-item-not-a-mapping", "failed-key-wrong-type", "failed-key-not-a-mapping",
        "entries-not-a-list", "entry-not-a-mapping", "entry-key-wrong-type", "meta-not-a-mapping", "no-meta"])
def test_malformed_resume_file_is_refused_and_left_as_it_was(resumable, capsys, no_tuning, corrupt, names):
    out, doc = resumable
    corrupt(doc)
    out.write_text(yamlio.dump(doc))
    before = out.read_text()
    capsys.readouterr()
    assert run_cli(*dry_run(out, "--resume")) == 2
    assert_one_line_error(capsys, "--resume", str(out), *names)
    assert out.read_text() == before and not no_tuning     # never rewritten, e.g. "notalist" as letters


def test_unparsable_resume_file_gives_one_line(tmp_path, capsys, no_tuning):
    out = tmp_path / "sm90.yaml"
    out.write_text("meta: {\n  unclosed: [1, 2\n")
    assert run_cli(*dry_run(out, "--resume")) == 2
    assert_one_line_error(capsys, "--resume", str(out))
    assert not no_tuning


# ---------------------------------------------------------------------------------------------
# numbers


@pytest.mark.parametrize("option,value,expects", [
    ("--tie", "-0.01", ">= 0"),
    ("--tie", "1", "< 1"),
    ("--tie", "nan", ">= 0"),
    ("--time-budget", "nan", "positive"),
    ("--time-budget", "inf", "positive"),
    ("--compile-timeout", "0", "positive"),
    ("--compile-timeout", "-5", "positive"),
    ("--warmup-ms", "-1", ">= 0"),
    ("--rep-ms", "0", "positive"),
], ids=["tie-negative", "tie-one", "tie-nan", "budget-nan", "budget-inf", "compile-timeout-zero",
        "compile-timeout-negative", "warmup-negative", "rep-zero"])
def test_numeric_option_out_of_range_is_refused(tmp_path, capsys, no_tuning, option, value, expects):
    out = tmp_path / "sm90.yaml"
    assert run_cli(*dry_run(out, option, value)) == 2
    assert_one_line_error(capsys, option, expects, value)
    assert not out.exists() and not no_tuning


def test_argparse_errors_are_one_line_too(tmp_path, capsys, no_tuning):
    assert run_cli(*dry_run(tmp_path / "sm90.yaml", "--tie", "abc")) == 2
    assert_one_line_error(capsys, "--tie", "abc")


# ---------------------------------------------------------------------------------------------
# strings and dtypes


@pytest.mark.parametrize("option", ["--dtypes", "--shapes", "--kernels", "--output", "--seed", "--resume"])
def test_empty_string_option_is_refused(tmp_path, capsys, no_tuning, option):
    argv = ["--arch", "sm90", "--dry-run", option, ""]
    if option != "--output":
        argv += ["--output", str(tmp_path / "sm90.yaml")]
    assert run_cli(*argv) == 2
    assert_one_line_error(capsys, option, "empty")
    assert not no_tuning and not list(tmp_path.iterdir())


@pytest.mark.parametrize("spec,bad", [("float64", "float64"), ("fp16,int8", "int8"), ("fp16,", "''")])
def test_bad_dtype_is_refused_before_the_gpu_is_looked_at(tmp_path, capsys, no_tuning, spec, bad):
    # no --dry-run: without a GPU the run would otherwise stop at "no CUDA GPU", hiding the typo
    assert run_cli("--arch", "sm90", "--dtypes", spec, "--output", str(tmp_path / "sm90.yaml")) == 2
    line = assert_one_line_error(capsys, "--dtypes", bad)
    assert "float16" in line and "GPU" not in line


# ---------------------------------------------------------------------------------------------
# --seed


def test_seed_file_with_a_malformed_meta_is_refused(tmp_path, capsys, no_tuning):
    seed = tmp_path / "seed.yaml"
    seed.write_text(yamlio.dump({"meta": "notamapping", "entries": []}))
    assert run_cli(*dry_run(tmp_path / "sm90.yaml", "--seed", str(seed))) == 2
    assert_one_line_error(capsys, "--seed", str(seed))
    assert not no_tuning


# ---------------------------------------------------------------------------------------------
# leftovers of a killed atomic write


def test_leftover_temp_files_of_the_output_are_removed_by_the_next_run(tmp_path, no_tuning):
    out = tmp_path / "sm90.yaml"
    # the names atomic_write_yaml's mkstemp gives: ".<name>." + 8 of [a-z0-9_] + ".tmp"
    stale = [tmp_path / ".sm90.yaml.ab12cd_9.tmp", tmp_path / ".sm90.yaml.zzzzzzzz.tmp"]
    kept = [tmp_path / name for name in (
        ".sm80.yaml.ab12cd_9.tmp",          # another output's
        ".sm90.yaml.short.tmp",             # not mkstemp's 8 characters
        ".sm90.yaml.ABCDEFGH.tmp",          # not mkstemp's alphabet
        "sm90.yaml.ab12cd_9.tmp",           # no leading dot
        ".sm90.yaml.ab12cd_9.tmp.keep",     # another suffix
        "notes.tmp")]
    for p in stale + kept:
        p.write_text("half a file\n")
    assert run_cli(*dry_run(out)) == 0
    assert no_tuning                                         # it did go on to (stub) tuning
    assert not [p for p in stale if p.exists()]
    assert all(p.read_text() == "half a file\n" for p in kept)
    assert yaml.safe_load(out.read_text())["meta"]["complete"] is True


def test_a_refused_run_removes_no_temp_files(tmp_path, capsys, no_tuning):
    out = tmp_path / "sm90.yaml"
    leftover = tmp_path / ".sm90.yaml.ab12cd_9.tmp"
    leftover.write_text("half a file\n")
    assert run_cli(*dry_run(out, "--tie", "-1")) == 2
    assert leftover.exists()
