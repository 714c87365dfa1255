// 3D neighbourhood attention: every neuron of an X x Y x Z grid attends over the cube around it.
//
// q, k, v, out: [B, X, Y, Z, H, D], all row-major float32. Neuron (x, y, z), head h, reads the
// neurons (x', y', z') with |x - x'|, |y - y'|, |z - z'| all <= radius that exist (no wrap-around):
//   out = sum_n softmax_n(q . k_n * scale) v_n,   scale = 1 / sqrt(D).
//
// The ladder
//   neighbourhood_attention_query_per_thread  one thread per query (b, x, y, z, h): at most
//                             (2 radius + 1)^3 keys, walked once with an online softmax (running
//                             max m, denominator l and value sum rescaled by exp(m_old - m_new) as
//                             each key arrives). The loops are clamped to the grid: out-of-grid
//                             neighbours are skipped, never padded. Launch: 1-D grid over
//                             B*X*Y*Z*H queries, any block size; the wrapper clamps radius to the
//                             longest side, so x + radius + 1 cannot overflow.

#define MAX_HEAD_DIM 128

extern "C" __global__ void neighbourhood_attention_query_per_thread(
        const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
        float* __restrict__ out, int B, int X, int Y, int Z, int H, int D, int radius, float scale) {
    const long long query = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (query >= (long long)B * X * Y * Z * H || D > MAX_HEAD_DIM) return;  // the wrapper refuses D > MAX first
    const int h = query % H;
    const int z = (query / H) % Z;
    const int y = (query / ((long long)H * Z)) % Y;
    const int x = (query / ((long long)H * Z * Y)) % X;
    const long long b = query / ((long long)H * Z * Y * X);

    // Row-major [B, X, Y, Z, H, D]: the query's own row starts at query * D; neuron (x', y', z') of
    // batch b, head h starts at (((b * X + x') * Y + y') * Z + z') * H + h, times D.
    const float* q_row = q + query * D;
    float acc[MAX_HEAD_DIM];   // 512 B per thread: local memory (cached in L1) unless D is known at compile time
    for (int d = 0; d < D; ++d) acc[d] = 0.0f;
    float m = -__int_as_float(0x7f800000), l = 0.0f;  // -inf (NVRTC has no INFINITY macro)

    const int x_lo = max(0, x - radius), x_hi = min(X, x + radius + 1);
    const int y_lo = max(0, y - radius), y_hi = min(Y, y + radius + 1);
    const int z_lo = max(0, z - radius), z_hi = min(Z, z + radius + 1);
    for (int xn = x_lo; xn < x_hi; ++xn) {
        for (int yn = y_lo; yn < y_hi; ++yn) {
            for (int zn = z_lo; zn < z_hi; ++zn) {
                const long long kv = ((((b * X + xn) * Y + yn) * Z + zn) * H + h) * D;
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
        }
    }
    float* out_row = out + query * D;
    for (int d = 0; d < D; ++d) out_row[d] = acc[d] / l;  // l >= 1: the largest score adds exp(0)
}
