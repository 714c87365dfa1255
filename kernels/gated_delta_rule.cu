// The gated delta rule, fused recurrent forward with state in and out.
//
// q, k: [B, T, H, K], v: [B, T, H, V], g, beta: [B, T, H], out: [B, T, H, V],
// state: [B, H, V, K] (holds the initial state on entry, the final state on exit); all row-major float32.
//
// Row i of the state evolves on its own:
//   recalled = alpha_t * S[i, :] . k_t            (alpha_t = exp(g_t))
//   delta    = beta_t * (v_t[i] - recalled)
//   S[i, :]  = alpha_t * S[i, :] + delta * k_t
//   out_t[i] = scale * S[i, :] . q_t
//
// The ladder
//   gated_delta_rule_row_per_thread  one thread per (b, h, i) row, the row of K floats in a
//                                    thread-local array; launch: 1-D grid over B*H*V rows, any block size.

#define MAX_KEY_DIM 256

extern "C" __global__ void gated_delta_rule_row_per_thread(
        const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
        const float* __restrict__ g, const float* __restrict__ beta, float* __restrict__ out,
        float* __restrict__ state, int B, int T, int H, int K, int V, float scale) {
    const long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= (long long)B * H * V || K > MAX_KEY_DIM) return;  // the wrapper refuses K > MAX_KEY_DIM first
    const int i = row % V, h = (row / V) % H, b = row / ((long long)H * V);

    float S[MAX_KEY_DIM];   // 1 KB per thread: local memory (cached in L1), a first rung, not a fast one
    float* state_row = state + row * K;   // [B, H, V, K] row-major: row (b, h, i) starts at row * K
    for (int j = 0; j < K; ++j) S[j] = state_row[j];

    for (int t = 0; t < T; ++t) {
        const long long bth = ((long long)b * T + t) * H + h;   // index into [B, T, H]
        const float* k_t = k + bth * K;
        const float* q_t = q + bth * K;
        const float alpha = expf(g[bth]);
        float recalled = 0.0f;
        for (int j = 0; j < K; ++j) recalled += S[j] * k_t[j];
        const float delta = beta[bth] * (v[bth * V + i] - alpha * recalled);
        float read = 0.0f;
        for (int j = 0; j < K; ++j) {
            S[j] = alpha * S[j] + delta * k_t[j];
            read += S[j] * q_t[j];
        }
        out[bth * V + i] = scale * read;
    }
    for (int j = 0; j < K; ++j) state_row[j] = S[j];
}
