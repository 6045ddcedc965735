"""benchmarks/ab_patch.py: the shipped files' kernel hashes moved to the edited sources' for an A/B."""
from benchmarks.ab_patch import moved_hashes

TEXT = """meta:
  candidates_before: {chunk_fwd: 0123456789abcdef}
  kernel_hashes: {states_fwd: ad759c0e8e2eeecc, chunk_fwd: 9ff5ec52eceee914, chunk_fwd_compact: 9ff5ec52eceee914,
    chunk: f0651d9b36150e7c}
  candidates: {chunk: 0e7d10b9971ea8d7, chunk_fwd: 666ca93b5127930c}
"""


def test_only_the_changed_kernels_move_and_only_their_hashes():
    hashes = {"states_fwd": "ad759c0e8e2eeecc", "chunk_fwd": "1111111111111111",
              "chunk_fwd_compact": "1111111111111111", "chunk": "2222222222222222", "decode": "3333333333333333"}
    text, moved = moved_hashes(TEXT, hashes)
    assert moved == ["chunk_fwd", "chunk_fwd_compact", "chunk"]
    assert "chunk_fwd: 1111111111111111, chunk_fwd_compact: 1111111111111111" in text
    assert "chunk: 2222222222222222}" in text and "states_fwd: ad759c0e8e2eeecc" in text
    # other mappings of hashes, before or after, are not kernel hashes: untouched
    assert "candidates: {chunk: 0e7d10b9971ea8d7, chunk_fwd: 666ca93b5127930c}" in text
    assert "candidates_before: {chunk_fwd: 0123456789abcdef}" in text
    assert moved_hashes(text, hashes) == (text, [])
