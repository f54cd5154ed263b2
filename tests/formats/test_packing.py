"""Storage layouts, bit-exact round trips and golden bytes."""

import torch

from lowbit.formats.packing import pack_int32_nibbles, pack_nibbles, unpack_int32_nibbles, unpack_nibbles


def test_nibbles_low_first_along_any_dim():
    codes = torch.tensor([[1, 2, 3, 4]], dtype=torch.uint8)
    assert pack_nibbles(codes).tolist() == [[0x21, 0x43]]
    signed = torch.randint(-8, 8, (6, 10), dtype=torch.int8)
    for dim in (0, 1):
        packed = pack_nibbles(signed, dim)
        assert packed.dtype == torch.uint8 and packed.shape[dim] == signed.shape[dim] // 2
        assert torch.equal(unpack_nibbles(packed, dim, signed=True), signed)


def test_int4_output_dim_packing_as_modelopt():
    q = torch.tensor([[-8, 7], [3, -1]], dtype=torch.int8)  # [out=2, in=2]
    packed = pack_nibbles(q, dim=0)
    assert packed.tolist() == [[(-8 & 0xF) | (3 & 0xF) << 4, (7 & 0xF) | (-1 & 0xF) << 4]]


def test_int32_packing_golden_word():
    q = torch.tensor([[-8, -7, 0, 1, 2, 3, 4, 7]])
    word = pack_int32_nibbles(q + 8)
    assert word.dtype == torch.int32
    assert word.item() & 0xFFFFFFFF == 0xFCBA9810
    assert torch.equal(unpack_int32_nibbles(word).long() - 8, q)


def test_int32_packing_roundtrip_random():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    assert torch.equal(unpack_int32_nibbles(pack_int32_nibbles(codes)), codes)
