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

It also requires every size >= 1, one device for all, and one dtype for the floating-point ones (an argument may
be declared "integer:" or "uint8:" instead). Checks a contract cannot
say (a value range, a keyword's type, H % G == 0) stay in the op's own `check_*` function, next to it.
The kernels call the same function, so a reference and its kernels refuse the same inputs.

Also here: `fail` and `at_least_fp32`, the helpers every op used to define for itself.
"""

from __future__ import annotations

import torch


def fail(message: str):
    """Raise the ValueError every op raises for bad input."""
    raise ValueError(message)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors are promoted for reductions; float32 and float64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class Contract:
    """The shapes of an op's tensor arguments, declared once; `check` binds and verifies them.

        Contract(op, q="B T H K", ..., initial_state="B H V K?")
        Contract(op, {"initial_state C": "B H Dv Dk?"})      # names that are not identifiers, as a dict

    Each shape is a string of space-separated dimension letters (a letter may be a word, "Dk"); a leading
    "..." allows any number of leading dimensions (RMSNorm's x [..., C]); a trailing "?" lets the argument
    be None. Arguments are floating-point tensors, all of one dtype, unless the shape starts with a kind:
    "integer: ... n" (any integer dtype) or "uint8: R bytes" (exactly uint8); every argument shares a device.
    Sizes must be >= 1 unless `empty_ok` (bit packing takes empty rows).
    """

    KINDS = {"float": "a floating-point tensor", "integer": "an integer tensor", "uint8": "a uint8 tensor"}

    def __init__(self, op: str, shapes: dict[str, str] | None = None, *, empty_ok: bool = False, **more: str):
        self.op, self.empty_ok = op, empty_ok
        self.shapes: dict[str, tuple[tuple[str, ...], bool, bool]] = {}
        self.kinds: dict[str, str] = {}
        for name, spec in {**(shapes or {}), **more}.items():
            kind, _, rest = spec.rpartition(":")
            kind = kind.strip() or "float"
            if kind not in self.KINDS:
                raise ValueError(f"Contract {op}: {name}'s kind must be one of {sorted(self.KINDS)}, got {kind!r}")
            self.kinds[name] = kind
            optional = rest.endswith("?")
            letters = rest.rstrip("?").split()
            leading = bool(letters) and letters[0] == "..."
            letters = tuple(letters[1:] if leading else letters)
            if not letters or "..." in letters:
                raise ValueError(f"Contract {op}: {name} needs dimension letters, with '...' only first, got {spec!r}")
            self.shapes[name] = (letters, optional, leading)
        self.letters: tuple[str, ...] = tuple(dict.fromkeys(l for ls, _, _ in self.shapes.values() for l in ls))

    def __repr__(self) -> str:
        return f"{self.op}: " + ", ".join(f"{name} {self._written(name)}" for name in self.shapes)

    def _written(self, name: str, sizes: dict[str, int] | None = None) -> str:
        letters, optional, leading = self.shapes[name]
        shown = ("...",) * leading + letters
        text = f"[{', '.join(shown)}]"
        if sizes and any(l in sizes for l in letters):
            text += f" = [{', '.join(('...',) * leading + tuple(str(sizes.get(l, l)) for l in letters))}]"
        return text + ("?" if optional and sizes is None else "")

    @staticmethod
    def _of_kind(t, kind: str) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        if kind == "float":
            return t.is_floating_point()
        if kind == "uint8":
            return t.dtype == torch.uint8
        return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool

    def check(self, tensors: dict | None = None, **more) -> tuple[int, ...]:
        """Verify every declared argument (all must be passed, by name); return one size per letter, in the
        order the letters first appear in the contract (0 for a letter only an absent optional argument has).

        Refused, with the op, the argument, what was expected and what came: a non-tensor or non-float
        tensor; a wrong number of dimensions, or a size that disagrees with the one its letter already has;
        a dtype or device other than the first argument's; any size < 1."""
        tensors = {**(tensors or {}), **more}
        if set(tensors) != set(self.shapes):
            raise TypeError(f"Contract {self.op}: check() takes exactly {sorted(self.shapes)}, got {sorted(tensors)}")
        sizes: dict[str, int] = {}
        first: tuple[str, torch.Tensor] | None = None          # the device every argument must share
        first_float: tuple[str, torch.Tensor] | None = None    # the dtype every float argument must share
        for name, (letters, optional, leading) in self.shapes.items():
            t = tensors[name]
            if t is None and optional:
                continue
            if not self._of_kind(t, self.kinds[name]):
                got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
                fail(f"{self.op}: {name} must be {self.KINDS[self.kinds[name]]} {self._written(name)}, got {got}")
            own = t.shape[t.dim() - len(letters):] if leading else t.shape
            if (t.dim() < len(letters) if leading else t.dim() != len(letters)) or any(
                    sizes.get(l, n) != n for l, n in zip(letters, own)):
                fail(f"{self.op}: {name} must be {self._written(name, sizes)}, got {list(t.shape)}")
            for l, n in zip(letters, own):
                sizes.setdefault(l, n)
            if first is None:
                first = (name, t)
            elif t.device != first[1].device:
                fail(f"{self.op}: {name} must be on {first[0]}'s device {first[1].device} (one device for all), "
                     f"got {t.device}")
            if self.kinds[name] == "float":
                if first_float is None:
                    first_float = (name, t)
                elif t.dtype != first_float[1].dtype:
                    fail(f"{self.op}: {name} must have {first_float[0]}'s dtype {first_float[1].dtype}, got {t.dtype}")
        empty = [f"{l} = {n}" for l, n in sizes.items() if n < 1]
        if empty and not self.empty_ok:
            fail(f"{self.op}: every size must be >= 1, got {', '.join(empty)}")
        return tuple(sizes.get(l, 0) for l in self.letters)
