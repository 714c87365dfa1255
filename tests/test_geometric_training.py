"""Chapter 04's training: the operations and their data, the three losses, the curriculum's two learning
rates and phases, routing, and the forgetting experiment's bookkeeping."""

from __future__ import annotations

import pytest
import torch

from refimpl.baseline import matched_baseline
from refimpl.geometric import GeometricConfig, GeometricLM
from refimpl.geometric_training import (OPERATIONS, CurriculumConfig, apply_operation, composed_triples,
                                        contrastive_loss, coordinate_parameters, dialogue_stream,
                                        forgetting_experiment, interference_loss, make_two_rate_optimizer,
                                        minimal_pairs, operation_batch, operation_bits_per_byte, principal_directions,
                                        routing_accuracy, temporal_loss, train_curriculum)

TEXT = torch.frombuffer(bytearray(b"def Parse_42(self, text):\n    return text.upper()  # Tiny example\n" * 20),
                        dtype=torch.uint8)


def test_operations_keep_length_and_do_what_they_say():
    window = b"def Hello_World(x): return 'Abc 42'\n"
    for name in OPERATIONS:
        assert len(apply_operation(name, window)) == len(window)
    assert apply_operation("copy", window) == window
    assert apply_operation("upper", window) == window.upper()
    assert apply_operation("swapcase", window) == window.swapcase()
    assert apply_operation("rot13", apply_operation("rot13", window)) == window          # rot13 is its own inverse
    assert apply_operation("reverse_words", b"ab_c de, f1") == b"c_ba ed, 1f"
    assert apply_operation("leet", b"tease") == b"73453"
    assert apply_operation("upper+reverse_words", b"ab cd") == b"BA DC"
    with pytest.raises(ValueError, match="unknown operation 'shout'"):
        apply_operation("copy+shout", window)


def test_batches_are_deterministic_and_pairs_share_their_text():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = operation_batch(TEXT, OPERATIONS, 5, 16, g1)
    b = operation_batch(TEXT, OPERATIONS, 5, 16, g2)
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    x, y, labels = minimal_pairs(TEXT, ("copy", "upper"), 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == (8, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert (labels[:4] != labels[4:]).all()                                              # two different operations
    for i in range(4):                                                                    # ... of the same window
        assert bytes(x[i].tolist()).upper() == bytes(x[4 + i].tolist()).upper()
    x, y = composed_triples(TEXT, (("upper", "reverse_words"),), 3, 16, torch.Generator().manual_seed(0))
    window = [bytes(torch.cat([x[i], y[i, -1:]]).tolist()) for i in range(9)]         # the T + 1 bytes of a row
    for i in range(3):
        assert apply_operation("reverse_words", window[i]) == window[6 + i]


def test_dialogue_pairs_a_docstring_with_its_code():
    stream = bytes(dialogue_stream(20_000).tolist())
    turns = [t for t in stream.split(b"\x0c\n") if t]
    assert len(turns) > 3
    first = turns[0].decode()
    assert first.startswith(">>> ") and ("\ndef " in first or "\nasync def " in first)
    train, val = dialogue_stream(5_000), dialogue_stream(5_000, validation=True)
    assert not torch.equal(train[:1000], val[:1000])                                      # split by file


def test_contrastive_loss_pulls_same_and_pushes_different_up_to_the_margin():
    labels = torch.tensor([0, 0, 1])
    near = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0]])                            # far apart: no push left
    assert contrastive_loss(near, labels, margin=1.0).item() == 0.0
    apart = torch.tensor([[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]])                           # same label 2 apart (RMS sqrt 2)
    assert abs(contrastive_loss(apart, labels, margin=1.0).item() - 2 * 2.0 / 6) < 1e-6  # 2 of 6 ordered pairs pay d^2
    crowded = torch.zeros(3, 2)
    crowded_loss = contrastive_loss(crowded, labels, margin=1.0).item()                  # 4 different pairs pay ~1:
    assert abs(crowded_loss - 4 / 6) < 1e-5                                              # d is clamped to >= 1e-6
    with pytest.raises(ValueError, match="coords"):
        contrastive_loss(torch.zeros(3), labels)


def test_interference_and_temporal_losses():
    a, b = torch.zeros(2, 4), torch.ones(2, 4) * 2
    assert interference_loss(a, b, torch.ones(2, 4)).item() == 0.0                       # the blend is the midpoint
    assert interference_loss(a, b, torch.full((2, 4), 3.0)).item() == 4.0
    path = torch.arange(5.0)[None, :, None].expand(1, 5, 3)
    assert temporal_loss(path).item() == 1.0
    assert temporal_loss(torch.ones(2, 5, 3)).item() == 0.0


def test_two_learning_rates_split_base_and_coordinates():
    model = GeometricLM(GeometricConfig.preset("tiny", modulate=("q", "down")))
    coords = {id(p) for p in coordinate_parameters(model)}
    assert {id(p) for p in model.predictor.parameters()} <= coords
    assert id(model.blocks[0].proj["q"].U) in coords and id(model.blocks[0].proj["q"].weight) not in coords
    optimizer = make_two_rate_optimizer(model, lr_base=1e-3, lr_coord=5e-3)
    by_rate = {}
    for group in optimizer.param_groups:
        by_rate.setdefault(group["lr"], set()).update(id(p) for p in group["params"])
    assert by_rate[5e-3] == coords
    assert by_rate[1e-3] == {id(p) for p in model.parameters()} - coords


def test_curriculum_runs_its_phases_in_order_and_learns():
    cfg = CurriculumConfig(steps=10, batch_size=6, seq_len=16, eval_every=10, warmup=2)
    assert [cfg.phase(s) for s in range(10)] == [1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    torch.manual_seed(0)
    model = GeometricLM(GeometricConfig.preset("tiny"))
    history = train_curriculum(model, TEXT, TEXT, TEXT, cfg, progress=False)
    assert history.phase == [1, 1, 2, 2, 2, 2, 3, 3, 3, 3] and len(history.val_bpb) == 1
    assert all(a > 0 for a in history.auxiliary)
    assert history.lm_bpb[-1] < history.lm_bpb[0]
    baseline = matched_baseline(model.num_parameters(), 16, n_layers=2)
    plain = train_curriculum(baseline, TEXT, TEXT, TEXT, cfg, progress=False)
    assert plain.auxiliary == [0.0] * 10                                                 # same bytes, no extra loss
    with pytest.raises(ValueError, match="phase_ends"):
        CurriculumConfig(phase_ends=(0.7, 0.5))
    with pytest.raises(ValueError, match="unknown operation"):
        CurriculumConfig(operations=("copy", "yell"))


def test_routing_accuracy_and_pca():
    train = torch.tensor([[0.0, 0.0], [0.2, 0.0], [5.0, 5.0], [5.2, 5.0]])
    labels = torch.tensor([0, 0, 1, 1])
    accuracy, confusion = routing_accuracy(train, labels, torch.tensor([[0.1, 0.1], [4.0, 4.0], [1.0, 1.0]]),
                                           torch.tensor([0, 1, 1]))
    assert abs(accuracy - 2 / 3) < 1e-6 and confusion.tolist() == [[1, 0], [1, 1]]
    points = torch.tensor([[-2.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, -1.0, 0.0]]) + 1.0
    mean, directions, spread = principal_directions(points, 2)
    assert torch.allclose(mean, torch.ones(3))
    assert torch.allclose(directions[0].abs(), torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)
    assert spread[0] > spread[1]


def test_forgetting_experiment_measures_task_a_before_and_after_b():
    make = lambda: GeometricLM(GeometricConfig.preset("tiny", max_seq_len=16))  # noqa: E731
    frozen = forgetting_experiment(make, TEXT, TEXT, "copy", "rot13", steps=3, seq_len=16, batch_size=4, lr=1e-2,
                                   arm="frozen_base", eval_batches=1)
    joint = forgetting_experiment(make, TEXT, TEXT, "copy", "rot13", steps=3, seq_len=16, batch_size=4, lr=1e-2,
                                  arm="coordinates", eval_batches=1)
    assert frozen.a_after_a == joint.a_after_a                                            # same seed, same start
    assert frozen.forgetting == frozen.a_after_b - frozen.a_after_a
    with pytest.raises(ValueError, match="arm must be"):
        forgetting_experiment(make, TEXT, TEXT, "copy", "rot13", 1, 16, 2, 1e-2, arm="magic")
    with pytest.raises(ValueError, match="needs a GeometricLM"):
        forgetting_experiment(lambda: matched_baseline(10_000, 16, n_layers=1), TEXT, TEXT, "copy", "rot13", 1, 16,
                              2, 1e-2, arm="coordinates")


def test_operation_bits_per_byte_uses_the_same_windows_for_every_model():
    model = GeometricLM(GeometricConfig.preset("tiny", max_seq_len=16))
    first = operation_bits_per_byte(model, TEXT, ("copy", "upper"), 16, batches=1, batch_size=2)
    again = operation_bits_per_byte(model, TEXT, ("copy", "upper"), 16, batches=1, batch_size=2)
    assert first == again and set(first) == {"copy", "upper"}
