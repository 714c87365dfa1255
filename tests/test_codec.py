"""Chapter 01's semantic codec: pieces round-trip, decode(indices) is the quantised output, one shared codebook."""

from __future__ import annotations

import pytest
import torch

from refimpl.codec import (CodecConfig, SemanticCodec, image_from_pieces, image_pieces, signal_pieces, text_pieces)


@pytest.fixture
def codec():
    torch.manual_seed(0)
    return SemanticCodec(CodecConfig.preset("tiny"), generator=torch.Generator().manual_seed(0))


def test_pieces_cut_and_reassemble():
    image = torch.rand(8, 12)
    pieces = image_pieces(image, 4)
    assert pieces.shape == (6, 4, 4) and torch.equal(pieces[1], image[:4, 4:8])
    assert torch.equal(image_from_pieces(pieces, 8, 12), image)
    assert signal_pieces(torch.arange(10.0), 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert text_pieces(torch.tensor(list(b"abcdefg"), dtype=torch.uint8), 3).tolist() == [[97, 98, 99], [100, 101, 102]]


@pytest.mark.parametrize("modality, pieces", [("image", torch.rand(5, 4, 4)), ("signal", torch.randn(5, 16)),
                                              ("text", torch.randint(0, 256, (5, 4)))])
def test_decode_of_indices_is_the_decoded_quantised_output(codec, modality, pieces):
    codec.eval()
    out = codec(modality, pieces)
    indices, _ = codec.round_trip(modality, pieces)
    assert torch.equal(indices, out.indices)
    z_q = codec.quantizer.lookup(indices)                              # decode(encode(x)) = quantised
    torch.testing.assert_close(codec.decode(modality, z_q), out.reconstruction)


def test_one_codebook_serves_every_modality_and_training_lowers_the_loss(codec):
    g = torch.Generator().manual_seed(1)
    data = {"image": torch.rand(64, 4, 4, generator=g), "signal": torch.randn(64, 16, generator=g),
            "text": torch.randint(0, 256, (64, 4), generator=g)}
    optimizer = torch.optim.Adam(codec.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        total = sum(out.recon_loss + out.vq_loss for out in (codec(m, x) for m, x in data.items()))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    assert losses[-1] < 0.8 * losses[0]
    used = {m: set(codec.round_trip(m, x)[0].tolist()) for m, x in data.items()}
    assert all(0 <= i < 32 for s in used.values() for i in s)          # every modality indexes the same 32 codes


def test_bad_input_is_refused(codec):
    with pytest.raises(ValueError, match=r"image pieces must be \[B, 4, 4\]"):
        codec("image", torch.rand(3, 5, 5))
    with pytest.raises(ValueError, match="text pieces must be int64"):
        codec("text", torch.rand(3, 4))
    with pytest.raises(ValueError, match="unknown modality 'audio'"):
        codec("audio", torch.rand(3, 16))
    with pytest.raises(ValueError, match="must be \\[H, W\\]"):
        image_pieces(torch.rand(2, 3, 4), 2)
    with pytest.raises(ValueError, match="CodecConfig.dim must be an integer >= 1"):
        CodecConfig(dim=0)
