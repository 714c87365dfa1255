// The fast-weight memory, fused recurrent forward with state in and out.
//
// q, k: [B, T, H, Dk], v: [B, T, H, Dv], gate: [B, T, H] (pre-sigmoid), reads: [B, T, H, Dv],
// W: [B, H, Dk, Dv] (holds the initial memory on entry, the final memory on exit); all row-major float32.
//
// Column j of W evolves on its own (a_t = strength * sigmoid(gate_t)):
//   reads_t[j] = W[:, j] . q_t                     (read first)
//   W[:, j]    = decay * W[:, j] + (a_t v_t[j]) k_t  (then decay and write)
//
// The ladder
//   fast_weight_column_per_thread  one thread per (b, h, j) column, the column of Dk floats in a
//                                  thread-local array; launch: 1-D grid over B*H*Dv columns, any block size.
//                                  Neighbouring threads are neighbouring j: v_t[j] loads and reads_t[j]
//                                  stores are coalesced, q_t and k_t are the same address for the whole
//                                  (b, h) group (a broadcast). The column's initial load and final store
//                                  stride by Dv, but happen once.

#define MAX_KEY_DIM 128

extern "C" __global__ void fast_weight_column_per_thread(
        const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
        const float* __restrict__ gate, float* __restrict__ reads, float* __restrict__ W,
        int B, int T, int H, int Dk, int Dv, float decay, float strength) {
    const long long column = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (column >= (long long)B * H * Dv || Dk > MAX_KEY_DIM) return;  // the wrapper refuses Dk > MAX_KEY_DIM first
    const int j = column % Dv, h = (column / Dv) % H, b = column / ((long long)H * Dv);

    float w[MAX_KEY_DIM];   // 512 B per thread: local memory (cached in L1), a first rung, not a fast one
    float* W_bh = W + ((long long)b * H + h) * Dk * Dv;   // [Dk, Dv] block of pair (b, h); column j strides by Dv
    for (int i = 0; i < Dk; ++i) w[i] = W_bh[(long long)i * Dv + j];

    for (int t = 0; t < T; ++t) {
        const long long bth = ((long long)b * T + t) * H + h;   // index into [B, T, H]
        const float* q_t = q + bth * Dk;
        const float* k_t = k + bth * Dk;
        float read = 0.0f;
        for (int i = 0; i < Dk; ++i) read += w[i] * q_t[i];     // read before writing
        reads[bth * Dv + j] = read;
        const float a = strength * (1.0f / (1.0f + expf(-gate[bth])));   // strength * sigmoid(gate)
        const float av = a * v[bth * Dv + j];
        for (int i = 0; i < Dk; ++i) w[i] = decay * w[i] + av * k_t[i];
    }
    for (int i = 0; i < Dk; ++i) W_bh[(long long)i * Dv + j] = w[i];
}
