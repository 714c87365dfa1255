"""`make doctor`: the environment report names every requirement and every backend, and fails on a missing one."""

from __future__ import annotations

import importlib.metadata

from book import doctor


def test_report_lists_every_requirement_and_backend():
    text, ok = doctor.report()
    assert ok, text
    for name, _ in doctor.requirements():
        assert f" {name} " in text
    for backend in ("reference", "numba", "numba_cuda", "cupy", "nvcc", "NVRTC", "chromium"):
        assert f"  {backend}" in text
    assert "verdict: everything the book needs is here" in text


def test_version_specifiers():
    assert doctor._satisfies("2.13.0+cpu", "==2.13.0")
    assert not doctor._satisfies("2.12.1", "==2.13.0")
    assert doctor._satisfies("1.26.4", ">=1.26") and not doctor._satisfies("1.25.0", ">=1.26")
    assert doctor._satisfies("0.1", "")


def test_a_missing_package_fails_with_a_plain_line(monkeypatch):
    real = importlib.metadata.version

    def version(name):
        if name == "zstandard":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    text, ok = doctor.report()
    assert not ok
    assert "MISSING  zstandard" in text and "make env" in text
