"""H-ENN (chapter 02): the parameter calculator, ticks that really carry the state, flat memory,
bit-identical state swapping, SWA, data-dependent initialisation, the artifact, the recall task."""

from __future__ import annotations

import math

import pytest
import torch

from refimpl import henn, quant
from refimpl.henn import (HENNConfig, HENNLM, SavedTensorMeter, WeightAverage, artifact_budget, quantization_aware,
                          associative_recall_batch, bigram_embeddings, henn_parameter_count, load_states,
                          read_artifact, save_states, tick_backward, unigram_output_bias, write_artifact)
from refimpl.io import tensor_file_bytes


def _model(backbone="mamba3", seed=0, **overrides):
    torch.manual_seed(seed)
    return HENNLM(HENNConfig.preset("tiny", backbone=backbone, **overrides))


def _tokens(B, T, seed=0):
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


BACKBONES = pytest.mark.parametrize("backbone", henn.BACKBONES)


@pytest.mark.parametrize("overrides", [{}, {"backbone": "gdn"}, {"ffn_hidden": 0}, {"attention_every": 0},
                                       {"attention_every": 2, "tie_embeddings": False}, {"mimo_rank": 1},
                                       {"rope_fraction": 0.0}, {"n_layers": 5, "expand": 1}],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "tiny")
def test_parameter_calculator_counts_the_built_model(overrides):
    cfg = HENNConfig.preset("tiny", **overrides)
    assert henn_parameter_count(cfg)["total"] == HENNLM(cfg).num_parameters()


@BACKBONES
def test_small_preset_count_and_layout(backbone):
    cfg = HENNConfig.preset("small", backbone=backbone)
    assert henn_parameter_count(cfg)["total"] == HENNLM(cfg).num_parameters()
    assert cfg.layer_kinds() == [backbone, backbone, backbone, "attention"]
    assert HENNConfig.preset("paper").layer_kinds().count("attention") == 3          # layers 4, 8, 12 of 12


@BACKBONES
def test_ticks_with_carried_state_equal_one_call(backbone):
    model = _model(backbone).eval()
    x = _tokens(2, 48)
    with torch.no_grad():
        whole, _ = model(x)
        states = model.new_state()
        pieces = [model(x[:, lo:lo + 16], states=states)[0] for lo in range(0, 48, 16)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=1e-5, rtol=1e-4)


@BACKBONES
def test_a_change_in_tick_one_reaches_tick_two(backbone):
    """The public code restarts every tick from zeros, so tick 2 never sees tick 1. Here it must."""
    model = _model(backbone).eval()
    x = _tokens(1, 32)
    x2 = x.clone()
    x2[0, 3] = (x2[0, 3] + 1) % 256                                                # a token in the first tick
    with torch.no_grad():
        outs = []
        for seq in (x, x2):
            states = model.new_state()
            model(seq[:, :16], states=states)
            outs.append(model(seq[:, 16:], states=states)[0])
        fresh = [model(seq[:, 16:])[0] for seq in (x, x2)]                           # no carried state
    assert (outs[0] - outs[1]).abs().max() > 1e-4
    assert torch.equal(fresh[0], fresh[1])                                          # the public code's behaviour


@BACKBONES
def test_full_bptt_gradients_equal_one_call_and_truncation_cuts_them(backbone):
    x, y = _tokens(2, 48, 1), _tokens(2, 48, 2)
    model = _model(backbone)
    _, loss = model(x, y)
    loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    for truncate in (False, True):
        model.zero_grad(set_to_none=True)
        total = tick_backward(model, x, y, tick=16, truncate=truncate)
        assert math.isclose(total, loss.item(), rel_tol=1e-5)                        # the same mean loss
        same = all(torch.allclose(p.grad, reference[n], atol=1e-6, rtol=1e-4) for n, p in model.named_parameters())
        assert same == (not truncate)                                               # truncation changes gradients


def test_truncated_memory_is_flat_in_sequence_length():
    model = _model()
    peaks = {}
    for truncate in (True, False):
        for T in (32, 64, 128):
            meter = SavedTensorMeter()
            with meter:
                tick_backward(model, _tokens(2, T), _tokens(2, T, 1), tick=16, truncate=truncate)
            peaks[truncate, T] = meter.peak_bytes
            assert meter.current == 0                                               # everything released
    assert peaks[True, 128] <= 1.02 * peaks[True, 32]
    assert peaks[False, 128] >= 3 * peaks[False, 32]


@BACKBONES
def test_swap_and_resume_is_bit_identical(backbone, tmp_path):
    model = _model(backbone).eval()
    x = _tokens(2, 64, 3)
    with torch.no_grad():
        states = model.new_state()
        straight = [model(x[:, lo:lo + 16], states=states)[0] for lo in range(0, 64, 16)]
        states = model.new_state()
        for lo in (0, 16):
            model(x[:, lo:lo + 16], states=states)
        path = save_states(tmp_path / "sleep.states", states)
        assert path.read_bytes()[:12] == b"BOOKTENSORS\x02"                          # a tensor file, not a pickle
        twin = HENNLM(model.cfg).eval()
        twin.load_state_dict(model.state_dict())
        woken = load_states(path, twin)
        resumed = [twin(x[:, lo:lo + 16], states=woken)[0] for lo in (32, 48)]
    assert torch.equal(resumed[0], straight[2]) and torch.equal(resumed[1], straight[3])


def test_swap_file_is_checked(tmp_path):
    model = _model().eval()
    states = model.new_state()
    with torch.no_grad():
        model(_tokens(1, 8), states=states)
    path = save_states(tmp_path / "s.states", states)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    (tmp_path / "damaged.states").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        load_states(tmp_path / "damaged.states", model)
    with pytest.raises(ValueError, match="holds states for layers"):
        load_states(path, _model(attention_every=2))
    (tmp_path / "junk").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="not a tensor file"):
        load_states(tmp_path / "junk", model)


def test_weight_average_is_the_mean_of_the_snapshots():
    model = torch.nn.Linear(3, 2)
    average, snapshots = WeightAverage(), []
    for k in range(3):
        with torch.no_grad():
            model.weight.fill_(float(k))
        snapshots.append(model.weight.detach().clone())
        average.update(model)
    average.copy_to(model)
    assert torch.allclose(model.weight, torch.stack(snapshots).mean(0))
    with pytest.raises(ValueError, match="no weights averaged"):
        WeightAverage().copy_to(model)


def test_unigram_bias_makes_the_untrained_model_predict_unigrams():
    data = torch.tensor(list(b"aaaabbc" * 50), dtype=torch.uint8)
    model = _model()
    with torch.no_grad():
        model.unembed.weight.zero_()                                              # (tied) no signal but the bias
    bias = unigram_output_bias(model, data)
    counts = torch.bincount(data.long(), minlength=256).double() + 1
    assert torch.allclose(bias.double(), torch.log(counts / counts.sum()), atol=1e-6)
    x = data[:-1].long()[None, :100]
    _, loss = model(x, data[1:101].long()[None])
    entropy = -(counts / counts.sum() * torch.log(counts / counts.sum()))[[97, 98, 99]].sum()
    assert loss.item() < 2.0 and loss.item() > entropy.item() * 0.5
    embedding = bigram_embeddings(model, data)
    assert embedding.shape == (256, 32) and torch.allclose(model.embed.weight, embedding)
    assert math.isclose(embedding.std().item(), 0.02, rel_tol=1e-3)


@pytest.mark.parametrize("bits", [4, 6, 8, 32])
def test_artifact_size_is_the_file_and_loads_back(bits, tmp_path):
    model = _model()
    info = write_artifact(tmp_path / "model.art", model, bits)
    assert info["model_bytes"] == (tmp_path / "model.art").stat().st_size
    assert info["total_bytes"] == info["model_bytes"] + info["code_bytes"]
    back = read_artifact(tmp_path / "model.art")
    for name, p in model.state_dict().items():
        q = back.state_dict()[name]
        if bits == 32 or not henn.quantizable(name, p):
            assert torch.equal(q, p), name
        else:
            assert torch.equal(q, quant.dequantize_per_row(*quant.quantize_per_row(p, bits))), name
    assert back.unembed.weight is back.embed.weight


def test_budget_counts_the_payload_exactly():
    model = _model()
    for bits in (4, 6, 32):
        tensors = henn._quantised_tensors(model, bits, packed=True)
        payload = sum(t.numel() * t.element_size() for t in tensors.values())
        assert artifact_budget(model.cfg, bits)["payload_bytes"] == payload
        assert len(tensor_file_bytes(tensors)) > payload                            # plus the header


def test_quantization_aware_step_takes_the_gradient_at_the_rounded_weights():
    model = _model()
    x, y = _tokens(2, 16), _tokens(2, 16, 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rounded = _model()
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if henn.quantizable(name, p):
                p.copy_(quant.fake_quantize(p, 4))
    rounded(x, y)[1].backward()

    def plain(m, x, y):
        _, loss = m(x, y)
        loss.backward()
        return loss.item()

    loss = quantization_aware(plain, 4)(model, x, y)
    assert math.isclose(loss, rounded(x, y)[1].item(), rel_tol=1e-6)
    for (name, p), q in zip(model.named_parameters(), rounded.parameters()):
        assert torch.equal(p, before[name]), f"{name}: the float weights must come back"
        assert torch.allclose(p.grad, q.grad, atol=1e-7), f"{name}: gradient at the rounded weights"


def test_associative_recall_batch():
    x, y, mask = associative_recall_batch(3, n_pairs=5, n_queries=2, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == mask.shape == (3, 14)
    for b in range(3):
        seq = bytes(torch.cat([x[b, :1], y[b]]).tolist())
        pairs = dict(zip(seq[0:10:2], seq[1:10:2]))
        assert seq[10] == ord("|") and len(pairs) == 5
        answers = y[b][mask[b]].tolist()
        questions = x[b][mask[b]].tolist()
        assert [pairs[q] for q in questions] == answers


def test_bad_input_is_a_value_error():
    with pytest.raises(ValueError, match="backbone must be one of"):
        HENNConfig(backbone="mamba2")
    with pytest.raises(ValueError, match="ssm_head_dim"):
        HENNConfig(d_model=96, ssm_head_dim=40)
    with pytest.raises(ValueError, match="unknown preset"):
        HENNConfig.preset("huge")
    model = _model()
    with pytest.raises(ValueError, match="tick must be a positive int"):
        tick_backward(model, _tokens(1, 8), _tokens(1, 8), tick=0)
    with pytest.raises(ValueError, match="one HENNState per layer"):
        model(_tokens(1, 8), states=model.new_state()[:2])
    with pytest.raises(ValueError, match="int tensor"):
        model(torch.zeros(1, 8))
    with pytest.raises(ValueError, match="bits must be one of"):
        write_artifact("/tmp/never-written", model, 5)


@BACKBONES
def test_bf16_autocast_ticks_give_the_same_loss_to_bf16_precision(backbone):
    """autocast="bf16": each tick's forward in bfloat16, the same model and batch; the weights stay float32."""
    x = _tokens(2, 32)
    losses = {}
    for autocast in ("none", "bf16"):
        model = _model(backbone)
        losses[autocast] = henn.tick_backward(model, x[:, :-1], x[:, 1:], 8, autocast=autocast)
        assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
                   for p in model.parameters() if p.requires_grad)
    assert losses["bf16"] == pytest.approx(losses["none"], rel=0.02)
    assert losses["bf16"] != losses["none"], "autocast changed nothing: was the forward in bf16 at all?"
    with pytest.raises(ValueError, match="autocast must be 'none' or 'bf16', got 'fp8'"):
        henn.tick_backward(_model(backbone), x[:, :-1], x[:, 1:], 8, autocast="fp8")
