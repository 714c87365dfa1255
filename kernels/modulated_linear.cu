// The coordinate-modulated linear layer: a base GEMM plus low-rank cos/sin terms, in one pass.
//
// x: [N, I], W: [O, I], U, P: [M, O, r], V, Q: [M, I, r], cos_nm, sin_nm: [N, M], y: [N, O];
// all row-major float32.
//
// Row n never builds its effective weight W + sum_m cos[n,m] U_m V_m^T + sin[n,m] P_m Q_m^T; it needs
//   t_c[m, k] = cos[n, m] * sum_i x[n, i] V[m, i, k]          (phase 1: 2 M r dot products of length I)
//   t_s[m, k] = sin[n, m] * sum_i x[n, i] Q[m, i, k]
//   y[n, o]   = sum_i x[n, i] W[o, i] + sum_{m,k} t_c[m, k] U[m, o, k] + t_s[m, k] P[m, o, k]   (phase 2)
//
// The ladder
//   modulated_linear_row_per_block  one block per row n; launch: grid = N blocks, any block size
//                                   (128 here). Phase 1: threads split the M r pairs (m, k) and write
//                                   both terms' coefficients to shared memory; __syncthreads(); phase 2:
//                                   threads split the O outputs, reading the coefficients back as
//                                   warp-wide broadcasts. M r <= MAX_MODULATION (8 KB of shared memory).
//   Faster rungs (a block per tile of rows reusing W, U, P from shared memory; tensor cores; cos and sin
//   of theta . c computed in the same kernel) are the GPU issue's work.

#define MAX_MODULATION 1024   // coefficients per term held in shared memory: M * r <= 1024

extern "C" __global__ void modulated_linear_row_per_block(
        const float* __restrict__ x, const float* __restrict__ W, const float* __restrict__ U,
        const float* __restrict__ V, const float* __restrict__ P, const float* __restrict__ Q,
        const float* __restrict__ cos_nm, const float* __restrict__ sin_nm, float* __restrict__ y,
        int N, int I, int O, int M, int r) {
    __shared__ float t_c[MAX_MODULATION];   // the row's coefficients, flattened j = m * r + k
    __shared__ float t_s[MAX_MODULATION];
    const int n = blockIdx.x, tid = threadIdx.x, threads = blockDim.x;
    const int pairs = M * r;
    if (n >= N || pairs > MAX_MODULATION) return;   // uniform over the block; the wrapper refuses M r > MAX first
    const float* x_row = x + (long long)n * I;

    // Phase 1. Neighbouring threads are neighbouring k of one m, so their V[m, i, k] reads are neighbours;
    // x_row[i] is the same address for every thread (a broadcast from L1).
    for (int j = tid; j < pairs; j += threads) {
        const int m = j / r, k = j % r;
        const float* V_mk = V + (long long)m * I * r + k;    // V[m, i, k] = V_mk[i * r]
        const float* Q_mk = Q + (long long)m * I * r + k;
        float acc_c = 0.0f, acc_s = 0.0f;
        for (int i = 0; i < I; ++i) {
            const float xi = x_row[i];
            acc_c += xi * V_mk[(long long)i * r];
            acc_s += xi * Q_mk[(long long)i * r];
        }
        t_c[j] = cos_nm[(long long)n * M + m] * acc_c;
        t_s[j] = sin_nm[(long long)n * M + m] * acc_s;
    }
    __syncthreads();   // every coefficient written before any thread reads one

    // Phase 2. Writes of y[n, o] coalesce; each thread walks its own row of W (neighbours I floats
    // apart, the uncoalesced read a tiled version fixes).
    for (int o = tid; o < O; o += threads) {
        const float* W_o = W + (long long)o * I;
        float acc = 0.0f;
        for (int i = 0; i < I; ++i) acc += x_row[i] * W_o[i];
        for (int m = 0; m < M; ++m) {
            const long long mo = ((long long)m * O + o) * r;   // U[m, o, :] and P[m, o, :] start here
            for (int k = 0; k < r; ++k) {
                const int j = m * r + k;                        // the same j across the warp: a broadcast
                acc += t_c[j] * U[mo + k] + t_s[j] * P[mo + k];
            }
        }
        y[(long long)n * O + o] = acc;
    }
}
