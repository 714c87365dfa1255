"""Sintellix (chapter 01): the grid model's parts, the calculator against built models, the task helpers."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from refimpl.sintellix import (NeuronLinear, SintellixConfig, SintellixGrid, corrupt, face_neighbour_mean, fxaa, image_patches, psnr,
                               sintellix_memory, sintellix_parameter_count, temporal_hierarchy)

SWITCHES = ("neighbour_attention", "global_aggregation", "temporal", "noise_filter", "fxaa")


@pytest.mark.parametrize("sharing", [True, False])
@pytest.mark.parametrize("off", [None, *SWITCHES])
def test_parameter_calculator_counts_the_built_model(sharing, off):
    cfg = SintellixConfig.preset("tiny", weight_sharing=sharing, **({off: False} if off else {}))
    assert sintellix_parameter_count(cfg)["total"] == SintellixGrid(cfg).num_parameters()


def test_memory_calculator_at_the_write_ups_size():
    per_neuron = sintellix_memory(SintellixConfig.preset("paper"))
    shared = sintellix_memory(SintellixConfig.preset("paper", weight_sharing=True))
    assert per_neuron["parts"]["adam_moments"] == 2 * per_neuron["parts"]["parameters"]
    assert per_neuron["total_bytes"] > 50 * 8e9                                         # the claimed 8 GB, x 65
    assert shared["total_bytes"] < 8e9                                                  # shared weights fit
    assert per_neuron["parameters"] > 1000 * shared["parameters"]


def test_forward_shapes_and_every_switch_changes_the_output():
    torch.manual_seed(0)
    cfg = SintellixConfig.preset("tiny")
    x = torch.rand(2, 4, 4, 1)
    full = SintellixGrid(cfg)
    with torch.no_grad():
        full.filter_threshold.fill_(-5.0)                                               # (it starts wide open)
    y = full(x)
    assert y.shape == (2, 4, 4, 1) and full.last_states.shape == (cfg.steps + 1, 2, cfg.n_neurons, cfg.dim)
    for name in SWITCHES:
        torch.manual_seed(0)
        ablated = SintellixGrid(replace(cfg, **{name: False}))
        ablated.load_state_dict({k: v for k, v in full.state_dict().items() if k in ablated.state_dict()})
        assert not torch.allclose(ablated(x), y), f"switching off {name} changed nothing"


def test_without_neighbours_or_global_the_input_cannot_reach_the_top():
    torch.manual_seed(0)
    cfg = SintellixConfig.preset("tiny", neighbour_attention=False, global_aggregation=False, fxaa=False)
    model = SintellixGrid(cfg)
    a, b = torch.rand(1, 4, 4, 1), torch.rand(1, 4, 4, 1)
    assert torch.allclose(model(a), model(b))                                           # per-neuron only: no path
    model = SintellixGrid(replace(cfg, neighbour_attention=True))
    assert not torch.allclose(model(a), model(b))


def test_information_travels_one_layer_per_step_through_neighbours():
    torch.manual_seed(0)
    cfg = SintellixConfig.preset("tiny", grid=(3, 3, 4), global_aggregation=False, fxaa=False, temporal=False, steps=2)
    model = SintellixGrid(cfg)
    a, b = torch.rand(1, 3, 3, 1), torch.rand(1, 3, 3, 1)
    assert torch.allclose(model(a), model(b))                                           # z = 3 is 3 steps from z = 0
    model.cfg.steps = 3
    assert not torch.allclose(model(a), model(b))


def test_global_sample_is_uniform_fixed_per_step_and_capped():
    model = SintellixGrid(SintellixConfig.preset("tiny"))
    s0, s0_again, s1 = model.global_sample(0), model.global_sample(0), model.global_sample(1)
    assert torch.equal(s0, s0_again) and not torch.equal(s0, s1)
    assert len(s0) == 8 and len(set(s0.tolist())) == 8
    big = SintellixGrid(SintellixConfig.preset("tiny", n_global=1000))
    assert sorted(big.global_sample(0).tolist()) == list(range(48))


def test_temporal_hierarchy_pairs_newest_frames_first():
    history = torch.arange(8.0).view(1, 8, 1, 1).expand(1, 8, 2, 3)                    # frame f holds the value f
    equal = torch.zeros(2, 7, 2)
    assert torch.allclose(temporal_hierarchy(history, equal), torch.full((1, 2, 3), 3.5))  # the mean of 0..7
    newest = torch.zeros(2, 7, 2)
    newest[..., 0] = 30.0                                                               # every merge keeps its first
    assert torch.allclose(temporal_hierarchy(history, newest), torch.zeros(1, 2, 3), atol=1e-6)
    first_pair_only = torch.zeros(2, 7, 2)
    first_pair_only[:, 0, 1] = 30.0                                                     # (t-1, t-2) keeps t-2
    first_pair_only[:, 4, 0] = first_pair_only[:, 6, 0] = 30.0                          # later merges keep the left
    assert torch.allclose(temporal_hierarchy(history, first_pair_only), torch.ones(1, 2, 3), atol=1e-6)


def test_face_neighbour_mean_and_fxaa():
    grid = (3, 2, 1)
    S = torch.arange(6.0).view(1, 6, 1)                                                 # neuron (x, y) holds 2x + y
    mean = face_neighbour_mean(S, grid)
    assert mean[0, 0, 0].item() == pytest.approx((2 + 1) / 2)                           # (0,0): (1,0)=2 and (0,1)=1
    assert mean[0, 2, 0].item() == pytest.approx((0 + 4 + 3) / 3)                       # (1,0): (0,0), (2,0), (1,1)
    uniform = torch.full((2, 6, 4), 0.7)
    args = (torch.tensor(4.0), torch.tensor(0.5), torch.tensor(0.0))
    assert torch.allclose(fxaa(uniform, grid, *args), uniform)                          # nothing to smooth
    edge = torch.zeros(1, 6, 4)
    edge[0, 4:] = 5.0                                                                   # a sharp step along x
    smoothed = fxaa(edge, grid, *args)
    assert smoothed[0, 4:].mean() < 5.0 and smoothed[0, 2:4].mean() > 0.0               # the step is softened


def test_noise_filter_suppresses_small_updates():
    torch.manual_seed(0)
    cfg = SintellixConfig.preset("tiny", neighbour_attention=False, global_aggregation=False, fxaa=False)
    model = SintellixGrid(cfg)
    with torch.no_grad():
        model.filter_threshold.fill_(5.0)                                               # threshold e^5: blocks all
    S = torch.randn(1, cfg.n_neurons, cfg.dim)
    history = torch.randn(1, cfg.history, cfg.n_neurons, cfg.dim)
    blocked = model.step(S, history, 0)
    cfg_off = replace(cfg, temporal=False)
    no_temporal = SintellixGrid(cfg_off)
    no_temporal.load_state_dict({k: v for k, v in model.state_dict().items() if k in no_temporal.state_dict()})
    assert torch.allclose(blocked, no_temporal.step(S, None, 0), atol=1e-5)              # the update did not pass


def test_task_helpers():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(20, 30), torch.rand(12, 12)]
    patches = image_patches(images, 5, (8, 8), g)
    assert patches.shape == (5, 8, 8, 1)
    clean = torch.full((2, 8, 8, 1), 0.5)
    dropped = corrupt(clean, noise=0.0, drop=0.5, generator=g)
    assert 0.2 < (dropped == 0).float().mean().item() < 0.8
    assert psnr(clean, clean) == math.inf and psnr(clean * 0, clean) == pytest.approx(10 * math.log10(4))
    with pytest.raises(ValueError, match="smaller than"):
        image_patches([torch.rand(4, 4)], 1, (8, 8), g)


def test_bad_input_is_refused():
    model = SintellixGrid(SintellixConfig.preset("tiny"))
    with pytest.raises(ValueError, match=r"x must be \[B, X, Y, in_channels\] = \[B, 4, 4, 1\]"):
        model(torch.rand(2, 4, 5, 1))
    with pytest.raises(ValueError, match="floating-point"):
        model(torch.zeros(2, 4, 4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="power of two"):
        SintellixConfig(history=6)
    with pytest.raises(ValueError, match="divisible by n_heads"):
        SintellixConfig(dim=30, n_heads=8)
    with pytest.raises(ValueError, match="three sides"):
        SintellixConfig(grid=(4, 4))


def _train_in_memory(model, batches, lr, steps):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        x, y = batches[step]
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()


@pytest.mark.parametrize("fast_blocks, prefetch", [(1000, False), (3, False), (3, True)])  # fits / far too little room
def test_offloaded_training_equals_training_in_memory(tmp_path, fast_blocks, prefetch):
    from refimpl.sintellix import offload_neuron_weights, stored_adam_step
    from refimpl.store import TieredStore
    cfg = SintellixConfig.preset("tiny", weight_sharing=False, steps=2)
    torch.manual_seed(0)
    reference = SintellixGrid(cfg).double()
    offloaded = SintellixGrid(cfg).double()
    offloaded.load_state_dict(reference.state_dict())
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(2, 4, 4, 1, generator=g, dtype=torch.float64),
                torch.rand(2, 4, 4, 1, generator=g, dtype=torch.float64)) for _ in range(3)]
    _train_in_memory(reference, batches, 1e-2, 3)

    largest = max(m.weight.numel() for m in offloaded.modules() if isinstance(m, NeuronLinear))
    block_bytes = largest // 3 * 8 * 4                     # a third of the largest weight, fp64, with grad and moments
    with TieredStore(tmp_path / "store", fast_bytes=fast_blocks * block_bytes, ram_bytes=2 * block_bytes) as store:
        keys = offload_neuron_weights(offloaded, store, slabs=3, prefetch=prefetch)
        resident = list(offloaded.parameters())
        states = {}
        for step in range(3):
            x, y = batches[step]
            torch.nn.functional.mse_loss(offloaded(x), y).backward()
            stored_adam_step(store, keys, resident, states, step + 1, lr=1e-2, max_norm=1.0)
        stats = store.stats()
        for name, module in reference.named_modules():
            if isinstance(module, NeuronLinear):
                stored = torch.cat([store.get(f"{name}.{i}")["param"] for i in range(3)])
                torch.testing.assert_close(stored, module.weight.detach(), rtol=1e-9, atol=1e-12)
    for (name, p), q in zip(reference.named_parameters(), resident):
        torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-9, atol=1e-12)
    assert (stats["hit_rate"] == 1.0) == (fast_blocks == 1000)
    if fast_blocks == 3:
        assert stats["disk_reads"] + stats["prefetches_used"] > 0         # blocks really went to disk and back
    if prefetch:
        assert stats["prefetches_issued"] > 0
