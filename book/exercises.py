"""Exercises with checked answers: the reader writes a function, `check` runs it beside the book's own code.

    from book.exercises import check, exercise
    exercise("rms_norm")                  # the task, the signature and a stub to copy
    def my_rms_norm(x, weight, eps): ...
    check("rms_norm", my_rms_norm)        # ✓, or what is wrong in plain words: shape, which element, by how much

Each exercise compares the reader's function with the reference that the models really run (`refimpl.ops`,
`refimpl.blocks`) on several random inputs, with the book's one comparison (`kernels.check.compare`, float32
tolerances). The worked solutions live in `book/solutions.py`, not in the notebooks' cells; a test runs every
solution through its checker and requires every stub to fail it.

Does not include: grading of style or speed; an answer is right when its numbers are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from book.show import display_markdown
from refimpl import ops
from refimpl.blocks import KVCache, SwiGLU, apply_rope, capacity_overflow, load_balancing_loss, rope_tables
from refimpl.superblock import SuperblockConfig, SuperblockLM, accepted_prefix, experts_to_reach, parameter_count


@dataclass(frozen=True)
class Exercise:
    """One task: what to write, the inputs it is tried on, and the book's answer to compare with."""
    name: str
    task: str                                  # what to write, in a sentence or two (Markdown)
    signature: str                             # the def line the reader's function should have
    make_inputs: Callable[[torch.Generator], tuple]   # one set of arguments, drawn from the generator
    reference: Callable                        # the book's own code, given the same arguments

    def stub(self) -> str:
        """The def to copy into a cell: the signature and a body that says it is not written yet."""
        return f"{self.signature}\n    raise NotImplementedError(\"your code here\")\n"


def _randn(g: torch.Generator, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _rope_inputs(g):
    x = _randn(g, 2, 5, 3, 8)
    cos, sin = rope_tables(torch.arange(5), 8)
    return x, cos, sin


def _attention_inputs(g):
    return _randn(g, 6, 4), _randn(g, 6, 4), _randn(g, 6, 4)


def _one_head_attention(q, k, v):
    return ops.attention(q[None, :, None], k[None, :, None], v[None, :, None], causal=True)[0, :, 0]


def _swiglu_inputs(g):
    C, F = 6, 10
    return _randn(g, 4, C), _randn(g, C, F) / C ** 0.5, _randn(g, C, F) / C ** 0.5, _randn(g, F, C) / F ** 0.5


def _swiglu(x, w_gate, w_up, w_down):
    """The book's SwiGLU block (nn.Linear keeps weights as [out, in]) given these [in, out] matrices."""
    block = SwiGLU(*w_gate.shape)
    with torch.no_grad():
        for linear, w in ((block.gate, w_gate), (block.up, w_up), (block.down, w_down)):
            linear.weight.copy_(w.T)
        return block(x)


def _gqa_inputs(g):
    T, H, G, D = 5, 6, 2, 4
    return _randn(g, T, H, D), _randn(g, T, G, D), _randn(g, T, G, D)


def _gqa(q, k, v):
    return ops.attention(q[None], k[None], v[None], causal=True)[0]


def _kv_cache_inputs(g):
    S, T, D = int(torch.randint(0, 6, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g)), 3
    return _randn(g, S, D), _randn(g, T, D), int(torch.randint(1, 7, (1,), generator=g))


def _kv_cache(cached, new, window):
    cache = KVCache(k=cached[None, :, None], v=cached[None, :, None], seen=len(cached)) if len(cached) else KVCache()
    cache.append(new[None, :, None], new[None, :, None], window)
    return cache.k[0, :, 0]


def _balance_inputs(g):
    N, E = 12, 4
    return torch.softmax(_randn(g, N, E) * 2, dim=-1), 2


def _balance(probs, top_k):
    chosen = probs.topk(top_k, dim=-1).indices                                    # [N, k]
    return load_balancing_loss(probs, torch.bincount(chosen.reshape(-1), minlength=probs.shape[-1]))


def _online_inputs(g):
    S, D = 7, 4
    return _randn(g, D) * 3, _randn(g, S, D), _randn(g, S, D)


def _one_query(q, k, v):
    return ops.attention(q[None, None, None], k[None, :, None], v[None, :, None], causal=False)[0, 0, 0]


def _sgd_inputs(g):
    K, V = 5, 3
    return (_randn(g, V, K), torch.nn.functional.normalize(_randn(g, K), dim=0), _randn(g, V),
            float(torch.rand(1, generator=g)) * 0.9 + 0.05)


def _delta_rule_as_sgd(S, k, v, lr):
    """The model's own op: one step of the delta rule with no decay (alpha = 1) and beta = lr."""
    _, S_next = ops.gated_delta_rule_recurrent(k[None, None, None], k[None, None, None], v[None, None, None],
                                               torch.zeros(1, 1, 1), torch.full((1, 1, 1), lr), S[None, None])
    return S_next[0, 0]


def _triangular_inputs(g):
    C, V = 6, 3
    return torch.tril(_randn(g, C, C), diagonal=-1) * 0.5, _randn(g, C, V)


def _unit_lower_solve(A, B):
    """What gated_delta_rule_chunked does with (I + A) U = B: one unit-triangular solve."""
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    return torch.linalg.solve_triangular(A + eye, B, upper=False, unitriangular=True)


def _capacity_inputs(g):
    E, N, k = 4, 64, 2
    counts = torch.bincount(torch.randint(0, E, (N * k,), generator=g) ** 2 % E, minlength=E)   # uneven on purpose
    return counts, N, k, float(torch.rand(1, generator=g)) + 0.8


def _accepted_inputs(g):
    J = 4
    drafts = torch.randint(0, 3, (J,), generator=g)
    choices = torch.where(torch.rand(J, generator=g) < 0.6, torch.roll(drafts, -1), torch.randint(0, 3, (J,), generator=g))
    return drafts, choices


def _accepted(drafts, choices):
    return torch.tensor(accepted_prefix(drafts.tolist(), choices.tolist()))


def _horizon_inputs(g):
    B, T, V = 2, 7, 5
    return _randn(g, B, T, V), torch.randint(0, V, (B, T), generator=g), int(torch.randint(1, 4, (1,), generator=g))


def _horizon_loss(logits, targets, j):
    """The model's own _horizon_loss, with its final norm and unembedding replaced by the identity."""
    identity = type("Heads", (), {"logits": staticmethod(lambda h: h)})()
    return SuperblockLM._horizon_loss(identity, logits, targets, j)


def _experts_inputs(g):
    cfg = SuperblockConfig(d_model=16 * int(torch.randint(2, 5, (1,), generator=g)),
                           n_superblocks=int(torch.randint(1, 4, (1,), generator=g)), n_heads=4, n_kv_heads=2)
    total = parameter_count(cfg)["total"]
    return cfg, total, float(total) * (2 + 4 * float(torch.rand(1, generator=g)))


def _experts(cfg, total, target):
    return torch.tensor(experts_to_reach(cfg, target))


def _scan_step_inputs(g):
    Dm, N = 4, 3
    h = _randn(g, Dm, N)
    u, delta = _randn(g, Dm), torch.rand(Dm, generator=g) + 0.1
    A = -torch.rand(Dm, N, generator=g) - 0.1
    B, C, D = _randn(g, N), _randn(g, N), _randn(g, Dm)
    return h, u, delta, A, B, C, D


def _scan_step(h, u, delta, A, B, C, D):
    y, h_next = ops.selective_scan_recurrent(u[None, None], delta[None, None], A, B[None, None], C[None, None], D,
                                             h[None])
    return y[0, 0], h_next[0]


def _delta_step_inputs(g):
    K, V = 4, 3
    S = _randn(g, V, K)
    k = torch.nn.functional.normalize(_randn(g, K), dim=0)
    q = torch.nn.functional.normalize(_randn(g, K), dim=0)
    v = _randn(g, V)
    alpha, beta = float(torch.rand(1, generator=g)) * 0.5 + 0.5, float(torch.rand(1, generator=g))
    return S, q, k, v, alpha, beta


def _delta_step(S, q, k, v, alpha, beta):
    o, S_next = ops.gated_delta_rule_recurrent(q[None, None, None], k[None, None, None], v[None, None, None],
                                               torch.full((1, 1, 1), math.log(alpha)), torch.full((1, 1, 1), beta),
                                               S[None, None], scale=1.0)
    return o[0, 0, 0], S_next[0, 0]


# ---------------------------------------------------------------- chapter 02 (H-ENN)

def _one_token(t):
    """A [P] or [N] vector as the scan's [B=1, T=1, H=1, R=1, .] input."""
    return t[None, None, None, None]


def _trapezoid_inputs(g):
    P, N = 3, 4
    h, x_prev, x = _randn(g, P, N), _randn(g, P), _randn(g, P)
    B_prev, B, C = _randn(g, N), _randn(g, N), _randn(g, N)
    dt = float(torch.rand(1, generator=g)) + 0.1
    A = -float(torch.rand(1, generator=g)) - 0.1
    lam = float(torch.rand(1, generator=g))
    return h, x_prev, B_prev, x, B, C, dt, A, lam


def _trapezoid_step(h, x_prev, B_prev, x, B, C, dt, A, lam):
    """The model's own op: one token of the Mamba-3 scan (one head, rank 1, no rotation, no skip)."""
    one = lambda v: torch.tensor(v, dtype=h.dtype).view(1, 1, 1)            # noqa: E731  a number as [B, T, H]
    start = ops.Mamba3ScanState(h[None, None], None, B_prev[None, None, None], x_prev[None, None, None])
    y, state = ops.mamba3_scan_recurrent(_one_token(x), one(dt), one(A), _one_token(B), _one_token(C),
                                         trap=one(lam), initial_state=start)
    return y[0, 0, 0, 0], state.h[0, 0]


def _rotate_inputs(g):
    return _randn(g, 2, 3, 8), torch.rand(2, 3, 3, generator=g) * 2 * math.pi


def _mimo_inputs(g):
    P, N, R = 3, 4, 2
    return _randn(g, P, N), _randn(g, R, P), _randn(g, R, N), float(torch.rand(1, generator=g)) * 0.9 + 0.05, \
        float(torch.rand(1, generator=g)) + 0.1


def _mimo_update(h, x, B, alpha, gamma):
    """The model's own op with lambda = 1 (no trapezoid), dt = gamma and A = log(alpha) / dt."""
    R, P = x.shape
    N = B.shape[1]
    one = lambda v: torch.tensor(v, dtype=h.dtype).view(1, 1, 1)            # noqa: E731
    _, state = ops.mamba3_scan_recurrent(x.view(1, 1, 1, R, P), one(gamma), one(math.log(alpha) / gamma),
                                         B.view(1, 1, 1, R, N), torch.zeros(1, 1, 1, R, N, dtype=h.dtype),
                                         initial_state=ops.Mamba3ScanState(h[None, None]))
    return state.h[0, 0]


def _decay_inputs(g):
    return (-torch.rand(int(torch.randint(3, 9, (1,), generator=g)), generator=g),)


def _pack_inputs(g):
    return (torch.randint(-32, 32, (4 * int(torch.randint(1, 6, (1,), generator=g)),), generator=g),)


def _unigram_inputs(g):
    return (torch.randint(0, 256, (int(torch.randint(20, 400, (1,), generator=g)),), generator=g),)


def _unigram(data):
    """The model's own initialiser, on a tiny H-ENN (its output bias has the 256 bytes' log-frequencies)."""
    from refimpl.henn import HENNConfig, HENNLM, unigram_output_bias
    return unigram_output_bias(HENNLM(HENNConfig.preset("tiny")), data)


def _average_inputs(g):
    return _randn(g, 5), int(torch.randint(0, 6, (1,), generator=g)), _randn(g, 5)


def _weight_average(mean, count, new):
    """The model's own averager: its running mean after `count` values, then one more."""
    from refimpl.henn import WeightAverage
    module = torch.nn.Linear(5, 1, bias=False)
    average = WeightAverage()
    average.count, average.mean = count, {"weight": mean[None].clone()}
    with torch.no_grad():
        module.weight.copy_(new[None])
    if count == 0:                                      # a fresh average starts from the first value
        average.mean = {}
    average.update(module)
    return average.mean["weight"][0]


EXERCISES = {e.name: e for e in [
    Exercise("rms_norm",
             "Normalise each vector of `x` by its root mean square, then scale by `weight`: "
             "$y = x / \\sqrt{\\mathrm{mean}(x^2) + \\epsilon} \\cdot w$ over the last dimension.",
             "def rms_norm(x, weight, eps):",
             lambda g: (_randn(g, 2, 5, 8), _randn(g, 8), 1e-6), ops.rms_norm),
    Exercise("rope",
             "Rotate each head's pairs $(x_i, x_{i+D/2})$ by the angle of its position: "
             "$(x_1 \\cos - x_2 \\sin,\\; x_1 \\sin + x_2 \\cos)$ with the two halves of the last dimension "
             "as $x_1, x_2$ (x: [B, T, H, D], cos, sin: [T, D/2]).",
             "def rope(x, cos, sin):",
             _rope_inputs, apply_rope),
    Exercise("causal_mask",
             "The boolean [T, S] mask of which keys query t may see: itself and earlier positions "
             "(queries are the last T of S positions), and with `window` W only the last W of those.",
             "def causal_mask(T, S, window):",
             lambda g: (int(torch.randint(1, 6, (1,), generator=g)) + 2, 9, int(torch.randint(1, 5, (1,), generator=g))),
             lambda T, S, window: ops.attention_mask(T, S, causal=True, window=window)),
    Exercise("attention",
             "Causal softmax attention for one head: $\\mathrm{softmax}(q k^T / \\sqrt{D} + M) v$, "
             "q, k, v: [T, D], M = -inf above the diagonal.",
             "def attention(q, k, v):",
             _attention_inputs, _one_head_attention),
    Exercise("swiglu",
             "The gated feed-forward: $y = (\\mathrm{silu}(x W_g) \\odot x W_u) W_d$ with "
             "$\\mathrm{silu}(z) = z\\,\\sigma(z)$ (x: [N, C], w_gate, w_up: [C, F], w_down: [F, C]).",
             "def swiglu(x, w_gate, w_up, w_down):",
             _swiglu_inputs, _swiglu),
    Exercise("gqa",
             "Causal attention where H query heads share G key/value heads: query head h reads key/value head "
             "$h \\,//\\, (H/G)$ (q: [T, H, D], k, v: [T, G, D] -> [T, H, D]).",
             "def gqa(q, k, v):",
             _gqa_inputs, _gqa),
    Exercise("kv_cache",
             "Append the new keys to the cached ones and keep only the last `window` (cached: [S, D], may be "
             "empty; new: [T, D] -> [min(S + T, window), D]).",
             "def kv_cache(cached, new, window):",
             _kv_cache_inputs, _kv_cache),
    Exercise("balance_loss",
             "Route each token to its `top_k` most probable experts, then return the load-balancing loss "
             "$E \\sum_e f_e P_e$: $f_e$ the share of the N·k routed copies that went to expert e, $P_e$ "
             "the mean router probability of e (probs: [N, E] -> a scalar tensor).",
             "def balance_loss(probs, top_k):",
             _balance_inputs, _balance),
    Exercise("online_softmax",
             "Attention for one query, walking the keys once: keep the running max m, the running sum "
             "$l = \\sum e^{s_j - m}$ and the running weighted sum of values, rescaling both by "
             "$e^{m_{old} - m_{new}}$ when m grows; scores $s_j = q \\cdot k_j / \\sqrt{D}$, no mask "
             "(q: [D], k, v: [S, D] -> [D]).",
             "def online_softmax(q, k, v):",
             _online_inputs, _one_query),
    Exercise("online_regression_step",
             "One step of gradient descent, learning rate `lr`, on the regression loss "
             "$L(S) = \\tfrac12 \\lVert S k - v \\rVert^2$: return $S - \\mathrm{lr}\\, \\nabla_S L$ "
             "(S: [V, K], k: [K] of unit length, v: [V]). The book checks it against one step of its delta rule.",
             "def online_regression_step(S, k, v, lr):",
             _sgd_inputs, _delta_rule_as_sgd),
    Exercise("triangular_solve",
             "Solve $(I + A)\\,U = B$ for U by forward substitution, one row at a time: row t of U is row t of B "
             "minus $\\sum_{s<t} A_{ts} U_s$ (A: [C, C] strictly lower-triangular, B: [C, V] -> U: [C, V]).",
             "def triangular_solve(A, B):",
             _triangular_inputs, _unit_lower_solve),
    Exercise("capacity_overflow",
             "Each of the E experts can take at most $\\lceil f \\cdot N k / E \\rceil$ token copies; return "
             "how many copies are over capacity in total, as a 0-d tensor (tokens_per_expert: [E] copies routed "
             "to each expert, n_tokens N, top_k k, capacity_factor f).",
             "def capacity_overflow(tokens_per_expert, n_tokens, top_k, capacity_factor):",
             _capacity_inputs, capacity_overflow),
    Exercise("accepted_prefix",
             "Self-speculative decoding: `drafts[0]` is the main head's own pick and always stands; draft i "
             "stands while it equals `choices[i - 1]` (the main head's greedy pick after drafts 0..i-1) and every "
             "earlier draft stood. Return how many stand, as a 0-d tensor (drafts, choices: [J] token ids).",
             "def accepted_prefix(drafts, choices):",
             _accepted_inputs, _accepted),
    Exercise("horizon_loss",
             "The multi-token-prediction loss of horizon j: the mean cross-entropy of predicting token t+j from "
             "position t, with `targets[:, t]` = token t+1, so token t+j is `targets[:, t+j-1]`; positions with "
             "no token t+j are left out (logits: [B, T, V], targets: [B, T], j >= 1).",
             "def horizon_loss(logits, targets, j):",
             _horizon_inputs, _horizon_loss),
    Exercise("experts_to_reach",
             "The smallest number of experts per MoE layer E at which the model's total parameter count reaches "
             "`target`: every extra expert adds $2 n_{sb} (3 C F + C)$ (a SwiGLU expert and its router column, in two "
             "MoE layers per superblock), and `total` is the count at the config's own `cfg.n_experts`. Return E as a "
             "0-d tensor (cfg: a SuperblockConfig with d_model C, n_superblocks, expert_hidden F; target: a count).",
             "def experts_to_reach(cfg, total, target):",
             _experts_inputs, _experts),
    Exercise("scan_step",
             "One step of Mamba's selective scan for one token: $h' = e^{\\Delta A} h + \\Delta\\, u\\, B$, "
             "$y = h' C + D u$ (h: [Dm, N], u, delta, D: [Dm], A: [Dm, N], B, C: [N]). Return (y, h').",
             "def scan_step(h, u, delta, A, B, C, D):",
             _scan_step_inputs, _scan_step),
    Exercise("delta_rule_step",
             "One step of the gated delta rule: $S' = \\alpha S + \\beta (v - \\alpha S k) k^T$, read "
             "$o = S' q$ (S: [V, K], q, k: [K], v: [V], alpha, beta: numbers). Return (o, S').",
             "def delta_rule_step(S, q, k, v, alpha, beta):",
             _delta_step_inputs, _delta_step),
    Exercise("trapezoid_step",
             "One token of Mamba-3's scan (one head, rank 1, a real state): with $\\alpha = e^{\\Delta A}$, "
             "$h' = \\alpha h + (1-\\lambda)\\,\\Delta\\,\\alpha\\; x_{prev} B_{prev}^T + \\lambda\\,\\Delta\\; x B^T$ "
             "and $y = h' C$ (h: [P, N], x_prev, x: [P], B_prev, B, C: [N]; dt, A, lam: numbers). Return (y, h').",
             "def trapezoid_step(h, x_prev, B_prev, x, B, C, dt, A, lam):",
             _trapezoid_inputs, _trapezoid_step),
    Exercise("rotate_pairs",
             "Turn the pairs $(v_{2k}, v_{2k+1})$ by angle[..., k] for k < K, as the complex numbers "
             "$v_{2k} + i\\, v_{2k+1}$ times $e^{i\\,\\mathrm{angle}_k}$; dimensions from 2K on stay as they are "
             "(v: [..., N], angle: [..., K] with K <= N/2 -> [..., N]).",
             "def rotate_pairs(v, angle):",
             _rotate_inputs, ops.rotate_pairs),
    Exercise("mimo_update",
             "The MIMO state update: R input channels write a rank-R change, "
             "$h' = \\alpha h + \\gamma \\sum_r x_r B_r^T$ (h: [P, N], x: [R, P], B: [R, N]; alpha, gamma: numbers).",
             "def mimo_update(h, x, B, alpha, gamma):",
             _mimo_inputs, _mimo_update),
    Exercise("decay_matrix",
             "The decay mask of the chunked scan: $L_{ts} = \\alpha_{s+1} \\cdots \\alpha_t = e^{c_t - c_s}$ for "
             "$s \\le t$ (1 on the diagonal) and 0 above it, with c the running sum of log alpha "
             "(log_alpha: [T] -> [T, T]).",
             "def decay_matrix(log_alpha):",
             _decay_inputs, ops.decay_matrix),
    Exercise("pack_int6",
             "Pack 6-bit values four to three bytes: $u = v + 32$, then byte0 = u0 | u1 << 6, "
             "byte1 = u1 >> 2 | u2 << 4, byte2 = u2 >> 4 | u3 << 2, each kept to its low 8 bits "
             "(q: [4n] integers in [-32, 31] -> [3n] uint8).",
             "def pack_int6(q):",
             _pack_inputs, lambda q: ops.pack_bits(q, 6)),
    Exercise("unigram_bias",
             "The unigram initialisation of the output bias: the log of each byte's add-one-smoothed frequency, "
             "$b_v = \\log \\frac{n_v + 1}{\\sum_u (n_u + 1)}$ over the 256 byte values (data: [n] byte ids -> [256]).",
             "def unigram_bias(data):",
             _unigram_inputs, _unigram),
    Exercise("weight_average",
             "The running mean that stochastic weight averaging keeps: after `count` weights have been averaged "
             "into `mean`, add `new`: $\\bar w \\leftarrow \\bar w + (w - \\bar w) / (\\mathrm{count} + 1)$ "
             "(a count of 0 means `new` is the first; mean, new: [n] -> [n]).",
             "def weight_average(mean, count, new):",
             _average_inputs, _weight_average),
]}


def exercise(name: str) -> Exercise:
    """The exercise `name`, displayed (task and stub) in a notebook."""
    if name not in EXERCISES:
        raise KeyError(f"no exercise {name!r}; the exercises are {', '.join(EXERCISES)}")
    e = EXERCISES[name]
    display_markdown(f"**Exercise `{name}`.** {e.task}\n\n```python\n{e.stub()}```\n\n"
                     f"Then `check({name!r}, your_function)`.", plain=f"Exercise {name}: {e.task}\n{e.stub()}")
    return e


@dataclass
class CheckResult:
    """What `check` found: passed, and one plain sentence per problem (empty when it passed)."""
    name: str
    passed: bool
    problems: list[str]

    def __str__(self) -> str:
        if self.passed:
            return f"✓ {self.name}: right on every input tried"
        return f"✗ {self.name}: " + "; ".join(self.problems)


def _outputs(value) -> list:
    return list(value) if isinstance(value, tuple) else [value]


def _difference(got, expected, label: str) -> str | None:
    """None if `got` matches `expected`, else what is wrong in plain words."""
    from kernels.check import compare
    if not isinstance(got, torch.Tensor):
        return f"{label} is a {type(got).__name__}, expected a tensor of shape {list(expected.shape)}"
    if tuple(got.shape) != tuple(expected.shape):
        return f"{label} has shape {list(got.shape)}, expected {list(expected.shape)}"
    if expected.dtype == torch.bool or got.dtype == torch.bool:
        if got.dtype != expected.dtype:
            return f"{label} is {got.dtype}, expected {expected.dtype}"
        wrong = (got != expected).nonzero()
        if len(wrong):
            at = tuple(int(i) for i in wrong[0])
            return f"{label}: {len(wrong)} of {expected.numel()} entries wrong, first at {at}: got {bool(got[at])}"
        return None
    result = compare(got.to(expected.dtype), expected)
    if result.passed:
        return None
    err = (got.double() - expected.double()).abs()
    at = tuple(int(i) for i in (~(err <= result.atol + result.rtol * expected.double().abs())).nonzero()[0])
    n_bad = int((~(err <= result.atol + result.rtol * expected.double().abs())).sum())
    return (f"{label}: {n_bad} of {expected.numel()} elements are off; at {at} you have {float(got[at]):.4g}, "
            f"the book has {float(expected[at]):.4g} (off by {float(err[at]):.2g})")


def check(name: str, fn: Callable, trials: int = 3, quiet: bool = False) -> CheckResult:
    """Run `fn` beside exercise `name`'s reference on `trials` random inputs; print and return the verdict."""
    if name not in EXERCISES:
        raise KeyError(f"no exercise {name!r}; the exercises are {', '.join(EXERCISES)}")
    e = EXERCISES[name]
    problems: list[str] = []
    for trial in range(trials):
        g = torch.Generator().manual_seed(1000 + trial)
        args = e.make_inputs(g)
        expected = _outputs(e.reference(*args))
        try:
            got = _outputs(fn(*args))
        except NotImplementedError:
            problems = ["not written yet (the stub raises NotImplementedError)"]
            break
        except Exception as err:                      # the reader's code: say what it raised, in one line
            problems = [f"raised {type(err).__name__}: {err}"]
            break
        if len(got) != len(expected):
            problems = [f"returned {len(got)} value(s), expected {len(expected)}"]
            break
        labels = ["the result"] if len(expected) == 1 else [f"output {i}" for i in range(len(expected))]
        found = [d for g_, x, label in zip(got, expected, labels) if (d := _difference(g_, x, label))]
        if found:
            problems = [f"on input set {trial + 1}: " + "; ".join(found)]
            break
    result = CheckResult(name, not problems, problems)
    if not quiet:
        print(result)
    return result
