"""KvLayout and KvCacheView: the cache layout of make_kv_caches, block reads and writes with exact
values, chunk payloads, block-to-block copies, compatibility errors, the zero-layer mocker."""

from __future__ import annotations

import pytest
import torch

from kvcache.transfer.errors import KvLayoutMismatch
from kvcache.transfer.layout import KvCacheView, KvLayout, block_runs

L, BS, H, D, NB = 3, 4, 2, 3, 8


def caches(num_blocks=NB, dtype=torch.float32, layers=L, offset=0.0):
    """Every element holds a distinct value: 1000 * layer + its flat index (+ offset)."""
    n = 2 * num_blocks * BS * H * D
    return [(torch.arange(n, dtype=torch.float64) + 1000 * layer + offset)
            .view(2, num_blocks * BS, H, D).to(dtype) for layer in range(layers)]


def block(cache: torch.Tensor, b: int) -> torch.Tensor:
    return cache[:, b * BS:(b + 1) * BS]


def test_layout_of_caches_and_sizes():
    lay = KvLayout.of(caches(dtype=torch.float16), BS)
    assert lay == KvLayout(num_layers=L, block_size=BS, num_kv_heads=H, head_dim=D,
                           dtype="float16", num_blocks=NB)
    assert lay.layer_block_nbytes == 2 * BS * H * D * 2 == 96
    assert lay.block_nbytes == 3 * 96
    assert lay.layer_nbytes == NB * 96
    assert lay.nbytes == L * NB * 96
    assert lay.layer_shape == (2, NB * BS, H, D)
    assert lay.torch_dtype is torch.float16
    assert KvLayout.from_dict(lay.to_dict()) == lay


def test_layout_of_rejects_caches_that_do_not_follow_the_layout():
    with pytest.raises(ValueError, match="not a multiple of block_size 5"):
        KvLayout.of(caches(), 5)
    with pytest.raises(ValueError, match=r"\[2, num_blocks \* block_size"):
        KvLayout.of([torch.zeros(3, 8, 2, 3)], BS)
    mixed = caches()
    mixed[1] = mixed[1].to(torch.float16)
    with pytest.raises(ValueError, match="layer 1 .* all layers must be alike"):
        KvLayout.of(mixed, BS)
    strided = caches()
    strided[2] = strided[2].transpose(2, 3).contiguous().transpose(2, 3)
    with pytest.raises(ValueError, match="layer 2 is not contiguous"):
        KvLayout.of(strided, BS)
    with pytest.raises(ValueError, match="num_blocks=9 but the caches hold 8"):
        KvLayout.of(caches(), BS, num_blocks=9)
    with pytest.raises(ValueError, match="pass KvLayout.of\\(\\[\\], block_size, num_blocks=N\\)"):
        KvLayout.of([], BS)
    with pytest.raises(ValueError, match="dtype 'float17'"):
        KvLayout(1, 4, 2, 3, "float17", 8)
    with pytest.raises(ValueError, match="num_blocks must be positive"):
        KvLayout(1, 4, 2, 3, "float32", 0)


def test_compatibility_names_every_difference_and_ignores_num_blocks():
    a = KvLayout(2, 16, 8, 128, "float16", 100)
    assert a.mismatches(KvLayout(2, 16, 8, 128, "float16", 7)) == []
    a.check_compatible(KvLayout(2, 16, 8, 128, "float16", 7))
    b = KvLayout(2, 16, 4, 128, "bfloat16", 100)
    assert a.mismatches(b) == ["num_kv_heads 8 != 4", "dtype float16 != bfloat16"]
    with pytest.raises(KvLayoutMismatch) as info:
        a.check_compatible(b)
    text = str(info.value)
    assert "num_kv_heads 8 != 4" in text and "dtype float16 != bfloat16" in text
    assert "same model" in text and info.value.code == "INVALID_ARGUMENT"
    mocker = KvLayout.of([], 16, num_blocks=10)
    assert mocker.mismatches(a) == ["num_layers 0 != 2"]
    assert mocker.mismatches(KvLayout.of([], 16, num_blocks=3)) == []
    assert mocker.mismatches(KvLayout.of([], 8, num_blocks=3)) == ["block_size 16 != 8"]


def test_layer_groups_bound_the_chunk_size():
    lay = KvLayout(5, 4, 2, 3, "float32", 8)  # 192 bytes per layer and block
    assert lay.layer_groups(4 << 20) == [(0, 5)]
    assert lay.layer_groups(400) == [(0, 2), (2, 4), (4, 5)]
    assert lay.layer_groups(192) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]
    with pytest.raises(ValueError, match="one layer of a block is 192 bytes"):
        lay.layer_groups(191)
    assert KvLayout.of([], 4, num_blocks=2).layer_groups(100) == []


def test_read_blocks_returns_exact_values_in_the_documented_shape():
    cs = caches()
    view = KvCacheView(cs, BS)
    out = view.read_blocks([5, 0, 7])
    assert out.shape == (L, 2, 3, BS, H, D) and out.is_contiguous()
    for layer in range(L):
        for i, b in enumerate([5, 0, 7]):
            assert torch.equal(out[layer, :, i], block(cs[layer], b))
    assert view.read_blocks([]).shape == (L, 2, 0, BS, H, D)


def test_write_blocks_round_trip_touches_only_the_named_blocks():
    src = KvCacheView(caches(), BS)
    dst_caches = caches(num_blocks=6, offset=0.5)
    before = [c.clone() for c in dst_caches]
    dst = KvCacheView(dst_caches, BS)
    data = src.read_blocks([1, 2, 6])
    dst.write_blocks([4, 0, 3], data)
    assert torch.equal(dst.read_blocks([4, 0, 3]), data)
    for layer in range(L):
        for b in (1, 2, 5):
            assert torch.equal(block(dst_caches[layer], b), block(before[layer], b))
    with pytest.raises(ValueError, match=r"shape \(3, 2, 2, 4, 2, 3\)"):
        dst.write_blocks([1, 2], data)
    with pytest.raises(ValueError, match="float32 tensor"):
        dst.write_blocks([1, 2, 5], data.to(torch.float16))
    with pytest.raises(ValueError, match="must be distinct"):
        dst.write_blocks([1, 1, 2], data)


def test_block_ids_out_of_range_are_a_clear_error():
    view = KvCacheView(caches(), BS)
    with pytest.raises(ValueError, match=r"block id 8 out of range: this cache has blocks 0..7"):
        view.read_blocks([0, 8])
    with pytest.raises(ValueError, match="out of range"):
        view.read_blocks([-1])
    with pytest.raises(ValueError, match="out of range"):
        view.read_blocks([True])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_chunk_bytes_round_trip_bit_for_bit(dtype):
    src_caches = [torch.randn(2, NB * BS, H, D, generator=torch.Generator().manual_seed(i))
                  .to(dtype) for i in range(L)]
    src = KvCacheView(src_caches, BS)
    dst = KvCacheView(caches(dtype=dtype), BS)
    lay = src.layout
    payload = src.read_block_bytes(6, 1, 3)
    assert payload.dtype == torch.uint8 and payload.numel() == 2 * lay.layer_block_nbytes
    joined = b"".join(bytes(memoryview(p)) for p in src.block_pieces(6, 1, 3))
    assert joined == payload.numpy().tobytes()
    # Layout of the payload: for each layer, that block's [2, BS, H, D] slots.
    expected = torch.cat([block(src_caches[layer], 6).contiguous().view(torch.uint8).reshape(-1)
                          for layer in (1, 2)])
    assert torch.equal(payload, expected)
    dst.write_block_bytes(2, 1, 3, payload)
    for layer in (1, 2):
        assert torch.equal(block(dst.caches[layer], 2).view(torch.uint8),
                           block(src_caches[layer], 6).view(torch.uint8))
    assert torch.equal(block(dst.caches[0], 2), block(caches(dtype=dtype)[0], 2))
    with pytest.raises(ValueError, match="must hold 192 bytes|must hold 96 bytes"):
        dst.write_block_bytes(2, 0, 1, payload)
    with pytest.raises(ValueError, match=r"layer range \[2, 4\) outside \[0, 3\)"):
        src.read_block_bytes(0, 2, 4)


def test_block_runs_coalesce_consecutive_pairs():
    assert block_runs([3, 4, 5, 9, 10, 2], [0, 1, 2, 3, 4, 7]) == [(3, 0, 3), (9, 3, 2), (2, 7, 1)]
    assert block_runs([1, 2], [5, 4]) == [(1, 5, 1), (2, 4, 1)]
    assert block_runs([], []) == []


def test_copy_blocks_from_copies_exact_values_and_checks_layouts():
    src = KvCacheView(caches(), BS)
    dst_caches = caches(num_blocks=10, offset=0.25)
    before = [c.clone() for c in dst_caches]
    dst = KvCacheView(dst_caches, BS)
    pairs = {3: 0, 4: 1, 5: 2, 0: 9, 7: 5}
    nbytes = dst.copy_blocks_from(src, list(pairs), list(pairs.values()))
    assert nbytes == 5 * src.layout.block_nbytes
    for layer in range(L):
        for s, d in pairs.items():
            assert torch.equal(block(dst_caches[layer], d), block(src.caches[layer], s))
        for d in set(range(10)) - set(pairs.values()):
            assert torch.equal(block(dst_caches[layer], d), block(before[layer], d))
    other = KvCacheView(caches(dtype=torch.float16), BS)
    with pytest.raises(KvLayoutMismatch, match="dtype float32 != float16"):
        dst.copy_blocks_from(other, [0], [0])
    with pytest.raises(ValueError, match="1 source blocks but 2 destination blocks"):
        dst.copy_blocks_from(src, [0], [0, 1])


def test_copy_blocks_from_stops_between_runs_when_asked():
    src = KvCacheView(caches(), BS)
    dst_caches = caches(num_blocks=10, offset=0.25)
    before = [c.clone() for c in dst_caches]
    dst = KvCacheView(dst_caches, BS)
    polls = []

    def should_stop():
        polls.append(1)
        return len(polls) > 1  # let the first run through, stop before the second

    assert dst.copy_blocks_from(src, [0, 1, 5], [0, 1, 7], should_stop=should_stop) == -1
    assert torch.equal(block(dst_caches[0], 1), block(src.caches[0], 1))
    assert torch.equal(block(dst_caches[0], 7), block(before[0], 7))


def test_zero_layer_mocker_cache_moves_no_bytes_but_checks_ids():
    mock = KvCacheView([], 16, num_blocks=4)
    assert mock.layout == KvLayout(0, 16, 0, 0, "float32", 4)
    assert mock.layout.block_nbytes == 0
    assert mock.read_blocks([0, 3]).shape == (0, 2, 2, 16, 0, 0)
    mock.write_blocks([1], mock.read_blocks([2]))
    assert mock.read_block_bytes(0, 0, 0).numel() == 0
    assert mock.block_pieces(0, 0, 0) == []
    other = KvCacheView([], 16, num_blocks=9)
    assert mock.copy_blocks_from(other, [8, 7], [0, 1]) == 0
    with pytest.raises(ValueError, match="out of range"):
        mock.read_blocks([4])
