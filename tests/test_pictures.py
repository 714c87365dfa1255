"""Every primer picture (book.pictures) draws from sample numbers and passes the figure check."""

from __future__ import annotations

import inspect

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from book import pictures  # noqa: E402
from book.figure_check import problems  # noqa: E402

rng = np.random.default_rng(0)
SAMPLES = {
    "rms_norm": lambda: pictures.rms_norm(rng.normal(size=(3, 8)) * [[0.01], [1], [100]], rng.normal(size=(3, 8)),
                                          ["scale 0.01", "scale 1", "scale 100"]),
    "rope": lambda: pictures.rope(np.arange(16)[:, None] * np.array([1.0, 0.1, 0.01, 0.001]),
                                  rng.normal(size=(16, 16)), pairs=(0, 1)),
    "swiglu": lambda: pictures.swiglu(*(np.linspace(-5, 5, 50),) * 4),
    "masks": lambda: pictures.masks({"causal": np.tril(np.ones((8, 8), bool)), "one query": np.ones((1, 8), bool)}),
    "gqa": lambda: pictures.gqa(8, 2),
    "cache_size": lambda: pictures.cache_size(np.arange(1, 65), {"full": np.arange(1, 65),
                                                                 "window": np.minimum(np.arange(1, 65), 16)}),
    "moe_load": lambda: pictures.moe_load({"before": np.array([239, 19, 26, 228]), "after": np.full(4, 128)}, 128,
                                          {"before": 1.4, "after": 1.0}),
    "scan": lambda: pictures.scan(np.arange(40), {"a": rng.normal(size=40), "b": rng.normal(size=40)},
                                  np.eye(40)[5]),
    "recall": lambda: pictures.recall(np.array([4, 8, 16, 32]), {"linear": np.array([0.3, 0.6, 1.0, 1.4]),
                                                                  "delta": np.array([0.2, 0.5, 0.7, 0.9])}, 16,
                                      {"linear": np.full(32, 1.5), "delta": np.linspace(0, 1.2, 32)}),
    "worker_maps": lambda: pictures.worker_maps({"rows": np.repeat([[0], [1]], 8, axis=1),
                                                 "cols": np.tile(np.arange(8) % 4, (2, 1))}, "column", "row"),
}


def test_every_picture_has_a_sample():
    public = {name for name, fn in inspect.getmembers(pictures, inspect.isfunction) if fn.__module__ == pictures.__name__}
    assert public == set(SAMPLES)


@pytest.mark.parametrize("name", SAMPLES)
def test_every_picture_is_fit_to_print(name):
    fig = SAMPLES[name]()
    assert problems(fig) == []
    matplotlib.pyplot.close(fig)
