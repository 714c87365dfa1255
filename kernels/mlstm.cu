// The stabilised mLSTM (xLSTM), recurrent forward with state in and out.
//
// q, k: [B, T, H, Dk], v: [B, T, H, Dv], i_pre, f_pre: [B, T, H], h: [B, T, H, Dv],
// C: [B, H, Dv, Dk] (holds the starting C on entry, the final C on exit),
// n0: [B, H, Dk], m0: [B, H] (the starting n and m, read only), n: [B, H, Dk], m: [B, H] (the final
// n and m, written by the thread of row 0 of each head); all row-major float32.
//
// Per (b, h) pair and token, keys scaled by key_scale = 1/sqrt(Dk):
//   m_t    = max(f~_t + m_{t-1}, i~_t)
//   i'     = exp(i~_t - m_t),  f' = exp(f~_t + m_{t-1} - m_t)        (both <= 1)
//   C[i,:] = f' C[i,:] + i' v_t[i] k_t,      n = f' n + i' k_t
//   h_t[i] = (C[i,:] . q_t) / max(|n . q_t|, exp(-m_t))
// Row i of C evolves on its own given the gates; every thread recomputes the head's m and n itself
// (n costs the same Dk work as the row), so threads never communicate. The starting n and m come
// from separate inputs because the thread of row 0 may write the final ones while a thread of the
// same head in a later block has not yet read the starting ones.
//
// The ladder
//   mlstm_row_per_thread  one thread per (b, h, i) row of C, the row and a private copy of n in
//                         thread-local arrays; launch: 1-D grid over B*H*Dv rows, any block size.

#define MAX_HEAD_DIM 128

extern "C" __global__ void mlstm_row_per_thread(
        const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
        const float* __restrict__ i_pre, const float* __restrict__ f_pre,
        const float* __restrict__ n0, const float* __restrict__ m0,
        float* __restrict__ h, float* __restrict__ C, float* __restrict__ n, float* __restrict__ m,
        int B, int T, int H, int Dk, int Dv, float key_scale) {
    const long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= (long long)B * H * Dv || Dk > MAX_HEAD_DIM) return;  // the wrapper refuses Dk > MAX_HEAD_DIM first
    const int i = row % Dv, head = (row / Dv) % H, b = row / ((long long)H * Dv);
    const long long pair = (long long)b * H + head;              // index into [B, H]

    float C_row[MAX_HEAD_DIM];   // 2 x 512 B per thread: local memory (cached in L1), a first rung, not a fast one
    float n_own[MAX_HEAD_DIM];
    float* C_out = C + row * Dk;  // [B, H, Dv, Dk] row-major: row (b, h, i) starts at row * Dk
    for (int j = 0; j < Dk; ++j) {
        C_row[j] = C_out[j];
        n_own[j] = n0[pair * Dk + j];
    }
    float m_prev = m0[pair];

    for (int t = 0; t < T; ++t) {
        const long long bth = ((long long)b * T + t) * H + head;  // index into [B, T, H]
        const float* k_t = k + bth * Dk;
        const float* q_t = q + bth * Dk;
        const float i_t = i_pre[bth];
        const float f_plus_m = f_pre[bth] + m_prev;
        const float m_t = i_t > f_plus_m ? i_t : f_plus_m;
        const float i_gate = expf(i_t - m_t);
        const float f_gate = expf(f_plus_m - m_t);
        const float floor_ = expf(-m_t);                          // the max(., 1) in units of e^{-m}
        m_prev = m_t;
        const float write = i_gate * v[bth * Dv + i];
        float nq = 0.0f, read = 0.0f;
        for (int j = 0; j < Dk; ++j) {                            // n and the row in one pass over k_t, q_t
            const float k_j = key_scale * k_t[j], q_j = q_t[j];
            n_own[j] = f_gate * n_own[j] + i_gate * k_j;
            nq += n_own[j] * q_j;
            C_row[j] = f_gate * C_row[j] + write * k_j;
            read += C_row[j] * q_j;
        }
        const float abs_nq = fabsf(nq);
        // not fmaxf: it would drop a NaN, where torch.maximum (the reference) keeps it
        h[bth * Dv + i] = read / (abs_nq < floor_ ? floor_ : abs_nq);
    }
    for (int j = 0; j < Dk; ++j) C_out[j] = C_row[j];
    if (i == 0) {                                                 // every thread of the head holds the same n, m
        for (int j = 0; j < Dk; ++j) n[pair * Dk + j] = n_own[j];
        m[pair] = m_prev;
    }
}
