// Nearest-code search (vector quantisation): for each row of z, the closest codebook entry.
//
// z: [N, C], codebook: [K, C], row-major float32; indices: [N] int64, distances: [N] float32.
//   indices[n]   = argmin_k sum_c (z[n, c] - codebook[k, c])^2     (exact ties: the lowest k)
//   distances[n] = that minimum, computed from the difference (not ||z||^2 - 2 z.c + ||c||^2)
//
// Rows are independent: row n is an argmin over K distances and reads nothing of other rows.
//
// The ladder
//   vq_nearest_row_per_block  one block of VQ_BLOCK threads per row; launch: grid (N), block (VQ_BLOCK).
//                             Thread t takes codes t, t + VQ_BLOCK, ... in increasing order and keeps
//                             the first minimum; then a shared-memory tree halves the VQ_BLOCK
//                             candidates log2(VQ_BLOCK) times, preferring the lower index on equal
//                             distances. All threads read the same z[n, c] at once (a broadcast);
//                             codebook reads are strided by C across threads (cached, not coalesced).

#define VQ_BLOCK 128   // threads per block: a power of two (the tree halves it); the launch must match

extern "C" __global__ void vq_nearest_row_per_block(
        const float* __restrict__ z, const float* __restrict__ codebook,
        long long* __restrict__ indices, float* __restrict__ distances, int N, int K, int C) {
    __shared__ float cand_d[VQ_BLOCK];   // each thread's candidate distance ...
    __shared__ int cand_k[VQ_BLOCK];     // ... and code; K means "no code" (a thread with t >= K)
    const int n = blockIdx.x, tid = threadIdx.x;
    if (n >= N || blockDim.x != VQ_BLOCK) return;   // the whole block leaves together: no barrier is split

    const float* z_row = z + (long long)n * C;
    float best_d = 0.0f;
    int best_k = K;
    for (int k = tid; k < K; k += VQ_BLOCK) {
        const float* code = codebook + (long long)k * C;
        float d = 0.0f;
        for (int c = 0; c < C; ++c) {
            const float diff = z_row[c] - code[c];
            d += diff * diff;
        }
        if (best_k == K || d < best_d) {   // this thread's first code, or strictly nearer
            best_d = d;
            best_k = k;
        }
    }
    cand_d[tid] = best_d;
    cand_k[tid] = best_k;
    __syncthreads();

    for (int half = VQ_BLOCK / 2; half > 0; half >>= 1) {
        if (tid < half) {
            const float other_d = cand_d[tid + half], mine_d = cand_d[tid];
            const int other_k = cand_k[tid + half], mine_k = cand_k[tid];
            if (other_k < K && (mine_k == K || other_d < mine_d || (other_d == mine_d && other_k < mine_k))) {
                cand_d[tid] = other_d;
                cand_k[tid] = other_k;
            }
        }
        __syncthreads();
    }
    if (tid == 0) {
        indices[n] = (long long)cand_k[0];
        distances[n] = cand_d[0];
    }
}
