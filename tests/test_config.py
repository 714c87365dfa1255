"""Every public config checks each field's type and range with one helper (`refimpl.config`), naming the
field and what is allowed (issue 19, item 2)."""

from __future__ import annotations

import math

import pytest
import torch

import kernels
from book.train import TrainConfig
from refimpl.baseline import BaselineConfig
from refimpl.codec import CodecConfig
from refimpl.config import check_fields, number, whole
from refimpl.geometric import GeometricConfig
from refimpl.geometric_training import CurriculumConfig
from refimpl.henn import HENNConfig
from refimpl.sintellix import SintellixConfig
from refimpl.superblock import SuperblockConfig
from refimpl.synapse import SynapseConfig

CONFIGS = [TrainConfig, BaselineConfig, SynapseConfig, HENNConfig, SuperblockConfig, GeometricConfig, SintellixConfig,
           CodecConfig, CurriculumConfig]

# (config, field, bad value, what the message says is allowed)
BAD = [
    (TrainConfig, "grad_clip", -1.0, "a finite number > 0"),          # gradient ascent
    (TrainConfig, "grad_clip", 0.0, "a finite number > 0"),           # no learning
    (TrainConfig, "min_lr_ratio", -3, r"a finite number in \[0, 1\]"),
    (TrainConfig, "warmup", -5, "an integer >= 0"),
    (TrainConfig, "weight_decay", -0.1, "a finite number >= 0"),
    (TrainConfig, "lr", float("nan"), "a finite number > 0"),
    (TrainConfig, "steps", 10.0, "an integer >= 1"),
    (TrainConfig, "batch_size", "16", "an integer >= 1"),
    (BaselineConfig, "ffn_hidden", 0, "an integer >= 1, or None"),     # a model without a feed-forward
    (BaselineConfig, "d_model", "128", "an integer >= 1"),
    (BaselineConfig, "norm_eps", 0.0, "a finite number > 0"),
    (BaselineConfig, "tie_embeddings", 1, "True or False"),
    (BaselineConfig, "window", 0, "an integer >= 1, or None"),
    (SynapseConfig, "memory_decay", -1.0, r"a finite number in \[0, 1\]"),
    (SynapseConfig, "memory_strength", float("inf"), "a finite number >= 0"),
    (SynapseConfig, "xlstm_forget_gate", "tanh", "one of 'exp', 'sigmoid'"),
    (SynapseConfig, "router_noise", True, "a finite number >= 0"),
    (HENNConfig, "backbone", "lstm", "one of 'mamba3', 'gdn'"),
    (HENNConfig, "rope_fraction", 1.5, r"a finite number in \[0, 1\]"),
    (HENNConfig, "attention_every", -1, "an integer >= 0"),
    (SuperblockConfig, "dropout", 1.0, r"a finite number in \[0, 1\)"),
    (SuperblockConfig, "layout", "postnorm", "one of 'prenorm', 'as_written'"),
    (SuperblockConfig, "mtp_horizons", 0, "an integer >= 1"),
    (GeometricConfig, "modulate", "q", "a tuple or list"),
    (GeometricConfig, "rank", 2.5, "an integer >= 1"),
    (SintellixConfig, "radius", -1, "an integer >= 0"),
    (SintellixConfig, "fxaa", "yes", "True or False"),
    (CodecConfig, "beta", -0.25, "a finite number >= 0"),
    (CodecConfig, "num_codes", 0, "an integer >= 1"),
    (CurriculumConfig, "grad_clip", -1.0, "a finite number > 0"),
    (CurriculumConfig, "lr_coord", 0, "a finite number > 0"),
]


@pytest.mark.parametrize("config, field, value, allowed", BAD,
                         ids=[f"{c.__name__}.{f}={v!r}" for c, f, v, _ in BAD])
def test_a_bad_field_is_refused_by_name(config, field, value, allowed):
    with pytest.raises(ValueError, match=rf"^{config.__name__}\.{field} must be {allowed}, got {value!r:.20}"):
        config(**{field: value})


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.__name__)
def test_every_field_has_a_rule_and_the_defaults_and_presets_pass(config):
    from dataclasses import fields
    assert set(config.RULES) == {f.name for f in fields(config)}
    config()
    for name in ("tiny", "small"):
        if hasattr(config, "preset"):
            config.preset(name)


def test_rules_in_words_and_at_their_edges():
    assert number(0, 1, high_open=True).describe() == "a finite number in [0, 1)"
    assert whole(1, optional=True).describe() == "an integer >= 1, or None"
    assert number(0, low_open=True).allows(1e-300) and not number(0, low_open=True).allows(0.0)
    assert not number().allows(math.inf) and not number().allows(True) and number().allows(3)
    assert not whole().allows(3.0) and not whole().allows(False)

    from dataclasses import make_dataclass
    Config = make_dataclass("Config", [("a", int), ("b", int)])     # a field the rules below forget
    with pytest.raises(TypeError, match=r"no rule for \['b'\]"):
        check_fields(Config(1, 2), {"a": whole()})


@pytest.mark.parametrize("decay", [-0.5, 0.0, 0.95, 1.0, 1.5])
def test_the_config_and_the_kernel_refuse_the_same_memory_decay(decay):
    """SynapseConfig.memory_decay is refused exactly where the fast-weight kernel and its step loop refuse it."""
    def accepted(call) -> bool:
        try:
            call()
            return True
        except ValueError:
            return False
    q = torch.randn(1, 3, 1, 4)
    gate = torch.zeros(1, 3, 1)
    config_ok = accepted(lambda: SynapseConfig(memory_decay=decay))
    kernel_ok = accepted(lambda: kernels.get("fast_weight_memory", "numba")(q, q, q, gate, decay=decay))
    reference_ok = accepted(lambda: kernels.get("fast_weight_memory", "reference")(q, q, q, gate, decay=decay))
    assert config_ok == kernel_ok == reference_ok == (0.0 <= decay <= 1.0)


def test_every_config_in_refimpl_and_book_is_covered():
    """No public config escapes the rules: every dataclass named *Config in refimpl and book is in CONFIGS."""
    import dataclasses
    import importlib
    import pkgutil

    import book
    import refimpl
    found = set()
    for package in (refimpl, book):
        for info in pkgutil.iter_modules(package.__path__):
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            found |= {obj for name, obj in vars(module).items() if name.endswith("Config") and
                      dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__}
    assert found == set(CONFIGS), f"configs without a test here: {sorted(c.__name__ for c in found - set(CONFIGS))}"


@pytest.mark.parametrize("weights", [{"contrastive": 1.0}, {"contrastive": -1.0, "interference": 1.0, "temporal": 1.0}])
def test_curriculum_weights_name_each_loss_once_with_a_weight_of_zero_or_more(weights):
    with pytest.raises(ValueError, match="CurriculumConfig.weights must map each of contrastive, interference, temporal"):
        CurriculumConfig(weights=weights)
