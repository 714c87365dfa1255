"""Worked solutions to `book.exercises`, one function per exercise, written the plain way (not the book's code
with its checks and fast paths). Kept out of the notebooks' cells; `show(solutions.rms_norm)` reveals one.
tests/test_exercises.py runs each through its checker."""

from __future__ import annotations

import math

import torch


def rms_norm(x, weight, eps):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dimension."""
    return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def rope(x, cos, sin):
    """Rotate the pairs (first half, second half) of each head by their position's angle."""
    x1, x2 = x.chunk(2, dim=-1)                           # [B, T, H, D/2] each
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def causal_mask(T, S, window):
    """Query t sits at position S - T + t; it sees key s when s <= that position and s > position - window."""
    query = torch.arange(S - T, S)[:, None]
    key = torch.arange(S)[None, :]
    return (key <= query) & (key > query - window)


def attention(q, k, v):
    """softmax(q k^T / sqrt(D), future masked) v."""
    T, D = q.shape
    scores = q @ k.T / math.sqrt(D)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v


def scan_step(h, u, delta, A, B, C, D):
    """h' = exp(delta A) h + delta u B (per channel), y = h' C + D u."""
    h_next = torch.exp(delta[:, None] * A) * h + (delta * u)[:, None] * B[None, :]
    return h_next @ C + D * u, h_next


def delta_rule_step(S, q, k, v, alpha, beta):
    """S' = alpha S + beta (v - alpha S k) k^T; o = S' q."""
    recalled = alpha * (S @ k)
    S_next = alpha * S + beta * torch.outer(v - recalled, k)
    return S_next @ q, S_next


def swiglu(x, w_gate, w_up, w_down):
    """(silu(x W_g) * x W_u) W_d, with silu(z) = z * sigmoid(z)."""
    gate = x @ w_gate
    return (gate * torch.sigmoid(gate) * (x @ w_up)) @ w_down


def gqa(q, k, v):
    """Each query head h attends with key/value head h // (H / G), causally."""
    T, H, D = q.shape
    group = H // k.shape[1]
    out = torch.empty_like(q)
    for h in range(H):
        out[:, h] = attention(q[:, h], k[:, h // group], v[:, h // group])
    return out


def kv_cache(cached, new, window):
    """Concatenate along positions, then keep the last `window` rows."""
    return torch.cat([cached, new])[-window:]


def balance_loss(probs, top_k):
    """E * sum_e f_e P_e: f_e the share of routed copies at expert e, P_e its mean probability."""
    N, E = probs.shape
    chosen = probs.topk(top_k, dim=-1).indices
    share = torch.zeros(E)
    for e in chosen.reshape(-1).tolist():
        share[e] += 1.0 / (N * top_k)
    return E * (share * probs.mean(dim=0)).sum()


def online_softmax(q, k, v):
    """One pass over the keys: running max m, running denominator l, running weighted sum acc."""
    scale = 1.0 / math.sqrt(q.shape[0])
    m, l, acc = float("-inf"), 0.0, torch.zeros(v.shape[1])
    for j in range(k.shape[0]):
        s = float(q @ k[j]) * scale
        m_new = max(m, s)
        correction, weight = math.exp(m - m_new), math.exp(s - m_new)
        l = l * correction + weight
        acc = acc * correction + weight * v[j]
        m = m_new
    return acc / l


def online_regression_step(S, k, v, lr):
    """The gradient of 1/2 |S k - v|^2 with respect to S is (S k - v) k^T; step against it."""
    return S - lr * torch.outer(S @ k - v, k)


def triangular_solve(A, B):
    """Forward substitution: U_t = B_t - sum_{s<t} A_ts U_s (the diagonal of I + A is 1)."""
    U = torch.zeros_like(B)
    for t in range(B.shape[0]):
        U[t] = B[t] - A[t, :t] @ U[:t]
    return U


def capacity_overflow(tokens_per_expert, n_tokens, top_k, capacity_factor):
    """Copies past ceil(f N k / E) at each expert, summed."""
    capacity = math.ceil(capacity_factor * n_tokens * top_k / len(tokens_per_expert))
    return sum(max(0, int(c) - capacity) for c in tokens_per_expert) * torch.ones((), dtype=tokens_per_expert.dtype)


def accepted_prefix(drafts, choices):
    """Walk the drafts while each one matches the main head's choice after the ones before it."""
    n = 1
    while n < len(drafts) and int(drafts[n]) == int(choices[n - 1]):
        n += 1
    return torch.tensor(n)


def horizon_loss(logits, targets, j):
    """Position t predicts token t+j = targets[:, t+j-1]: the first T-j+1 positions have one."""
    T = targets.shape[1]
    scores = logits[:, : T - j + 1]
    return torch.nn.functional.cross_entropy(scores.reshape(-1, scores.shape[-1]), targets[:, j - 1:].reshape(-1))


def experts_to_reach(cfg, total, target):
    """The total grows by one expert's worth per expert: solve total + (E - E0) * per_expert >= target for E."""
    per_expert = cfg.n_superblocks * 2 * (3 * cfg.d_model * cfg.expert_hidden + cfg.d_model)
    return torch.tensor(max(1, math.ceil((target - total) / per_expert) + cfg.n_experts))


def trapezoid_step(h, x_prev, B_prev, x, B, C, dt, A, lam):
    """The previous input's write decays with this step's alpha; the two writes share dt by lambda."""
    alpha = math.exp(dt * A)
    h_next = alpha * h + (1 - lam) * dt * alpha * torch.outer(x_prev, B_prev) + lam * dt * torch.outer(x, B)
    return h_next @ C, h_next


def rotate_pairs(v, angle):
    """Complex multiplication, pair by pair, on the first 2K dimensions."""
    K = angle.shape[-1]
    pairs = torch.view_as_complex(v[..., :2 * K].reshape(*v.shape[:-1], K, 2).contiguous())
    turned = torch.view_as_real(pairs * torch.polar(torch.ones_like(angle), angle)).flatten(-2)
    return torch.cat([turned, v[..., 2 * K:]], dim=-1)


def mimo_update(h, x, B, alpha, gamma):
    """sum_r x_r B_r^T is one matrix product: x^T B."""
    return alpha * h + gamma * x.T @ B


def decay_matrix(log_alpha):
    """exp of the difference of running sums, zeroed above the diagonal."""
    c = torch.cumsum(log_alpha, dim=0)
    return torch.tril(torch.exp(c[:, None] - c[None, :]))


def pack_int6(q):
    """Shift to 0..63, then spread each group of four over three bytes, low bits first."""
    u = (q.long() + 32).view(-1, 4)
    u0, u1, u2, u3 = u.unbind(dim=1)
    return torch.stack([(u0 | u1 << 6) & 0xFF, (u1 >> 2 | u2 << 4) & 0xFF, (u2 >> 4 | u3 << 2) & 0xFF],
                       dim=1).flatten().to(torch.uint8)


def unigram_bias(data):
    """Count the bytes, add one to every count, take log-frequencies."""
    counts = torch.bincount(data.long(), minlength=256).double() + 1
    return torch.log(counts / counts.sum()).float()


def weight_average(mean, count, new):
    """The running mean: each new value moves it by 1 / (count + 1) of the gap."""
    return new.clone() if count == 0 else mean + (new - mean) / (count + 1)
