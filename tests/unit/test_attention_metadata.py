"""AttentionMetadata.tiles_stay_in_chunks: the host check that gates the warp-specialized
prefill kernel (kernels/triton/prefill_ws.py), against a row-by-row simulation of the key
tiles each chunk reads."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.model_factory import make_attn_metadata


def brute_force(query_lens: list[int], chunks: list[int], tile: int, num_rows: int) -> bool:
    """Every row a chunk's tiles read (from its first row, whole tiles up to its length) is
    its own or past the tensor's last row."""
    owner = [i for i, n in enumerate(query_lens) for _ in range(n)]
    owner += [None] * (num_rows - len(owner))  # padding rows: nobody's, but not zeros
    start = 0
    starts = []
    for n in query_lens:
        starts.append(start)
        start += n
    for i in chunks:
        read = -(-query_lens[i] // tile) * tile
        for r in range(starts[i], starts[i] + read):
            if r < num_rows and owner[r] != i:
                return False
    return True


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 700), min_size=1, max_size=6), st.integers(0, 200),
       st.sampled_from([64, 128]), st.data())
def test_tiles_stay_in_chunks_matches_a_row_simulation(query_lens, pad, tile, data):
    chunks = data.draw(st.lists(st.sampled_from(range(len(query_lens))), unique=True))
    meta = make_attn_metadata(query_lens, query_lens, [[0] * (-(-n // 16)) for n in query_lens],
                              16)
    num_rows = sum(query_lens) + pad
    assert (meta.tiles_stay_in_chunks(chunks, tile, num_rows)
            == brute_force(query_lens, chunks, tile, num_rows))


def test_tiles_stay_in_chunks_cases():
    meta = make_attn_metadata([256, 1, 300], [256, 40, 300], [[0] * 16, [0] * 3, [0] * 19], 16)
    assert meta.tiles_stay_in_chunks([0, 2], 128, 557)  # aligned, then last in the rows
    assert not meta.tiles_stay_in_chunks([2], 128, 600)  # padding rows follow it
    assert not meta.tiles_stay_in_chunks([1], 128, 557)  # 1 row: its tile reads chunk 2
    assert meta.tiles_stay_in_chunks([], 128, 557)
