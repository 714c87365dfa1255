// The Mamba-3 scan (exponential-trapezoidal step, rotating state, MIMO), recurrent forward with state in and out.
//
// x: [B, T, H, R, P], dt, A, trap: [B, T, H] (trap all ones when the layer has no trapezoid),
// Bm, Cm: [B, T, H, R, N], theta: [B, T, H, max(K, 1)] (K = 0: no rotation, theta not read),
// D: [H] (zeros when the layer has no skip), y: [B, T, H, R, P],
// h: [B, H, P, N] (holds the starting state on entry, the final state on exit),
// angle0: [B, H, max(K, 1)], B_prev0: [B, H, R, N], x_prev0: [B, H, R, P] (the starting angle, previous
// rotated B and previous x; read only), angle, B_prev, x_prev: the same shapes (the final ones, written
// here); all row-major float32.
//
// Per (b, h) pair and token, alpha = exp(dt A), beta = (1 - trap) dt alpha, gamma = trap dt:
//   phi[k]  = (phi[k] + dt theta[k]) mod 2 pi               (torch.remainder: fmod, + 2 pi if negative)
//   B~_r    = B_r with pair (2k, 2k+1) turned by phi[k]     (k < K), C~_r the same
//   h[p, n] = alpha h[p, n] + beta sum_r x_prev[r, p] B~_prev[r, n] + gamma sum_r x[r, p] B~[r, n]
//   y[r, p] = sum_n h[p, n] C~_r[n] + D x[r, p]
// Row p of h evolves on its own given the pair's scalars and rotated B~, C~, which depend on no row: every
// thread recomputes the angles and rotates B and C itself (P times redundant across a pair), so threads
// never communicate. The starting angle and B_prev come from separate inputs because the thread of p == 0
// writes the final ones while a thread of the same pair in a later block may not have read them yet.
//
// The ladder
//   mamba3_scan_row_per_thread  one thread per state row (b, h, p): its N state values, K angles (with their
//                               cos and sin), the previous token's B~ (R x N) and its own x_prev[r, p] in
//                               thread-local arrays; launch: 1-D grid over B*H*P rows, any block size.
//                               Neighbouring threads are neighbouring p, so x and y accesses coalesce.
//   (next rung: a block per (b, h) pair computing phi, cos/sin, B~_t and C~_t once per token into shared
//   memory for its P threads)

#define MAX_STATE_DIM 64                     // N
#define MAX_RANK 4                           // R: R * N <= 256 floats of B~_prev per thread
#define MAX_ANGLES (MAX_STATE_DIM / 2)       // K <= N / 2

// Element n of row M (N values) with pair (2k, 2k+1) turned by the angle whose cos and sin are given, k < K.
__device__ __forceinline__ float rotated(const float* __restrict__ M, int n, int K,
                                         const float* cos_phi, const float* sin_phi) {
    if (n >= 2 * K) return M[n];
    const int k = n >> 1;
    const float re = M[2 * k], im = M[2 * k + 1];
    return (n & 1) ? re * sin_phi[k] + im * cos_phi[k] : re * cos_phi[k] - im * sin_phi[k];
}

extern "C" __global__ void mamba3_scan_row_per_thread(
        const float* __restrict__ x, const float* __restrict__ dt, const float* __restrict__ A,
        const float* __restrict__ Bm, const float* __restrict__ Cm, const float* __restrict__ theta,
        const float* __restrict__ trap, const float* __restrict__ D,
        const float* __restrict__ angle0, const float* __restrict__ B_prev0, const float* __restrict__ x_prev0,
        float* __restrict__ y, float* __restrict__ h, float* __restrict__ angle,
        float* __restrict__ B_prev, float* __restrict__ x_prev,
        int B, int T, int H, int R, int P, int N, int K) {
    const long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    // the wrapper refuses N > MAX_STATE_DIM and R > MAX_RANK first (and K <= N / 2 always)
    if (row >= (long long)B * H * P || N > MAX_STATE_DIM || R > MAX_RANK || K > MAX_ANGLES) return;
    const int p = row % P, head = (row / P) % H, b = row / ((long long)H * P);
    const long long pair = (long long)b * H + head;                // index into [B, H]
    const int K1 = K > 0 ? K : 1;                                  // row length of theta, angle0, angle
    const float two_pi = 6.283185307179586f;                       // 2 pi rounded to float, as the reference's

    float state[MAX_STATE_DIM];                                    // h[p, :]
    float phi[MAX_ANGLES], cos_phi[MAX_ANGLES], sin_phi[MAX_ANGLES];
    float B_before[MAX_RANK * MAX_STATE_DIM];                      // B~_{t-1}, [R, N]: ~1.7 KB in all per
    float x_before[MAX_RANK], x_now[MAX_RANK];                     // thread, local memory (cached in L1)
    float* h_row = h + row * N;                                    // [B, H, P, N]: row (b, h, p) starts at row * N
    for (int n = 0; n < N; ++n) state[n] = h_row[n];
    for (int k = 0; k < K; ++k) phi[k] = angle0[pair * K1 + k];
    for (int r = 0; r < R; ++r) {
        x_before[r] = x_prev0[(pair * R + r) * P + p];
        for (int n = 0; n < N; ++n) B_before[r * N + n] = B_prev0[(pair * R + r) * N + n];
    }
    const float skip = D[head];

    for (int t = 0; t < T; ++t) {
        const long long bth = ((long long)b * T + t) * H + head;  // index into [B, T, H]
        const float step = dt[bth];
        const float alpha = expf(step * A[bth]);
        const float lam = trap[bth];
        const float beta = (1.0f - lam) * step * alpha;           // weight of the previous token's input
        const float gamma = lam * step;                           // weight of this token's input
        for (int k = 0; k < K; ++k) {
            float a = fmodf(phi[k] + step * theta[bth * K1 + k], two_pi);
            if (a < 0.0f) a += two_pi;
            phi[k] = a;
            sincosf(a, &sin_phi[k], &cos_phi[k]);
        }
        for (int r = 0; r < R; ++r) x_now[r] = x[(bth * R + r) * P + p];
        const float* B_t = Bm + bth * R * N;                       // [R, N] of this token
        const float* C_t = Cm + bth * R * N;
        for (int n = 0; n < N; ++n) {
            float now = 0.0f, before = 0.0f;
            for (int r = 0; r < R; ++r) {
                const float turned = rotated(B_t + r * N, n, K, cos_phi, sin_phi);   // B~_t[r, n]
                now += x_now[r] * turned;
                before += x_before[r] * B_before[r * N + n];
                B_before[r * N + n] = turned;                      // read above, then replaced
            }
            state[n] = alpha * state[n] + beta * before + gamma * now;
        }
        for (int r = 0; r < R; ++r) {
            float read = 0.0f;
            for (int n = 0; n < N; ++n) read += state[n] * rotated(C_t + r * N, n, K, cos_phi, sin_phi);
            y[(bth * R + r) * P + p] = read + skip * x_now[r];
            x_before[r] = x_now[r];
        }
    }
    for (int n = 0; n < N; ++n) h_row[n] = state[n];
    for (int r = 0; r < R; ++r) x_prev[(pair * R + r) * P + p] = x_before[r];
    if (p == 0) {                                                  // every thread of the pair holds the same
        for (int k = 0; k < K; ++k) angle[pair * K1 + k] = phi[k];                     // angles and B~
        for (int r = 0; r < R; ++r)
            for (int n = 0; n < N; ++n) B_prev[(pair * R + r) * N + n] = B_before[r * N + n];
    }
}
