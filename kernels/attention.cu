// Causal grouped-query attention, optional sliding window, online softmax.
//
// q: [B, T, H, D], k and v: [B, S, G, D], out: [B, T, H, D], all row-major float32.
// Query t is at position p = S - T + t and reads keys [lo, hi):
//   hi = p + 1 (causal) or S;  lo = max(0, p - window + 1) if window > 0, else 0.
// Query head h reads key/value head h / (H / G).
//
// The ladder
//   attention_row_per_thread  one thread per (b, t, h) row; scores are never stored: the running
//                             max m, denominator l and the value sum are rescaled by
//                             exp(m_old - m_new) as each key arrives. Launch: 1-D grid, any block size.

#define MAX_HEAD_DIM 256

extern "C" __global__ void attention_row_per_thread(
        const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
        float* __restrict__ out, int B, int T, int H, int S, int G, int D,
        int causal, int window, float scale) {
    const long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= (long long)B * T * H) return;
    const int h = row % H, t = (row / H) % T, b = row / ((long long)T * H);
    const int g = h / (H / G);
    const int p = S - T + t;
    const int hi = causal ? p + 1 : S;
    const int lo = window > 0 ? max(0, p - window + 1) : 0;

    const float* q_row = q + (((long long)b * T + t) * H + h) * D;
    float acc[MAX_HEAD_DIM];
    for (int d = 0; d < D; ++d) acc[d] = 0.0f;
    float m = -__int_as_float(0x7f800000), l = 0.0f;  // -inf (NVRTC has no INFINITY macro)
    for (int s = lo; s < hi; ++s) {
        const long long kv = (((long long)b * S + s) * G + g) * D;
        float score = 0.0f;
        for (int d = 0; d < D; ++d) score += q_row[d] * k[kv + d];
        score *= scale;
        const float m_new = fmaxf(m, score);
        const float correction = expf(m - m_new);  // 0 on the first key (m = -inf)
        const float weight = expf(score - m_new);
        l = l * correction + weight;
        for (int d = 0; d < D; ++d) acc[d] = acc[d] * correction + weight * v[kv + d];
        m = m_new;
    }
    float* out_row = out + (((long long)b * T + t) * H + h) * D;
    for (int d = 0; d < D; ++d) out_row[d] = acc[d] / l;
}
