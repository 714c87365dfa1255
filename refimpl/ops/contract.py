"""What every op checks before it computes: argument types, dtypes and shapes, refused by name.

An op's shapes are written once, as a contract in the notation of its docstring:

    GDR = Contract("gated_delta_rule", q="B T H K", k="B T H K", v="B T H V", g="B T H", beta="B T H",
                   initial_state="B H V K?")
    B, T, H, K, V = GDR.check(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state)

Each argument is a floating-point tensor whose dimensions are named by letters; a letter is bound
by the first argument that has it and must agree everywhere after; a trailing "?" lets the argument
be None. `check` returns the sizes in the order the letters first appear, and raises ValueError
naming the op, the argument, the shape it expected (with the sizes bound so far) and the shape it
got, e.g.

    gated_delta_rule: v must be [B, T, H, V] = [2, 19, 4, V], got [2, 19, 3, 8]

It also requires every size >= 1 and one dtype and device for all of them. Checks a contract cannot
say (a value range, a keyword's type, H % G == 0) stay in the op's own `check_*` function, next to it.
The kernels call the same function, so a reference and its kernels refuse the same inputs.

Also here: `fail`, `expect_float` and `at_least_fp32`, the three helpers every op used to define itself.
"""

from __future__ import annotations

import torch


def fail(message: str):
    """Raise the ValueError every op raises for bad input."""
    raise ValueError(message)


def expect_float(name: str, t) -> None:
    """`t` must be a floating-point torch.Tensor; the message names it."""
    if not isinstance(t, torch.Tensor):
        fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        fail(f"{name} must be a floating-point tensor, got {t.dtype}")


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors are promoted for reductions; float32 and float64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _shape_of(value) -> str:
    shape = getattr(value, "shape", None)
    return str(list(shape)) if shape is not None else type(value).__name__


class Contract:
    """The shapes of an op's tensor arguments, declared once; `check` binds and verifies them.

    Contract(op, **shapes): each shape is a string of space-separated dimension letters (letters may
    be words, "Dk"), ending in "?" if the argument may be None.
    """

    def __init__(self, op: str, **shapes: str):
        self.op = op
        self.shapes: dict[str, tuple[tuple[str, ...], bool]] = {}
        for name, spec in shapes.items():
            optional = spec.endswith("?")
            letters = tuple(spec.rstrip("?").split())
            if not letters:
                raise ValueError(f"Contract {op}: {name} needs at least one dimension letter")
            self.shapes[name] = (letters, optional)
        self.letters: tuple[str, ...] = tuple(dict.fromkeys(l for ls, _ in self.shapes.values() for l in ls))

    def __repr__(self) -> str:
        parts = ", ".join(f"{name} [{', '.join(ls)}]{'?' if opt else ''}" for name, (ls, opt) in self.shapes.items())
        return f"{self.op}({parts})"

    def check(self, **tensors) -> tuple[int, ...]:
        """Verify every declared argument (all must be passed); return the sizes, one per letter, in order."""
        if set(tensors) != set(self.shapes):
            raise TypeError(f"Contract {self.op}: check() takes exactly {sorted(self.shapes)}, got {sorted(tensors)}")
        sizes: dict[str, int] = {}
        first = None
        for name, (letters, optional) in self.shapes.items():
            t = tensors[name]
            if t is None and optional:
                continue
            expected = f"[{', '.join(letters)}]"
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                fail(f"{self.op}: {name} must be a floating-point tensor {expected}, got {kind}")
            bound = [str(sizes.get(l, l)) for l in letters]
            if t.dim() != len(letters) or any(l in sizes and sizes[l] != n for l, n in zip(letters, t.shape)):
                shown = expected if all(l not in sizes for l in letters) else f"{expected} = [{', '.join(bound)}]"
                fail(f"{self.op}: {name} must be {shown}, got {list(t.shape)}")
            for l, n in zip(letters, t.shape):
                sizes.setdefault(l, n)
            if first is None:
                first = (name, t)
            elif t.dtype != first[1].dtype or t.device != first[1].device:
                fail(f"{self.op}: {name} must share {first[0]}'s dtype and device ({first[1].dtype}, {first[1].device}), "
                     f"got {t.dtype}, {t.device}")
        empty = [f"{l}={n}" for l, n in sizes.items() if n < 1]
        if empty:
            fail(f"{self.op}: every size must be >= 1, got {', '.join(empty)}")
        return tuple(sizes[l] for l in self.letters if l in sizes)
