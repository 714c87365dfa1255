// RMSNorm in CUDA C: y[r, c] = x[r, c] / sqrt(mean_c(x[r, c]^2) + eps) * w[c]
//
// x, y: [R, C] row-major float32, w: [C]. Launch: grid = R blocks (one per row),
// block = 128 threads (a power of two, at most 1024; at least 32 for the warp-shuffle version,
// whose full-mask shuffles need whole warps).
//
// The ladder
//   rms_norm_block_per_row  threads stride along the row (coalesced loads), then a
//                           shared-memory tree halves the partial sums log2(128) = 7 times,
//                           with a __syncthreads() after each step.
//   rms_norm_warp_shuffle   each warp of 32 sums its lanes with __shfl_down_sync (registers,
//                           no shared memory, no block barrier), then warp 0 sums the
//                           (at most 32) warp totals. Two barriers instead of eight.

#define MAX_WARPS 32

extern "C" __global__ void rms_norm_block_per_row(const float* __restrict__ x, const float* __restrict__ w,
                                                  float* __restrict__ y, int C, float eps) {
    __shared__ float partial[1024];
    const int r = blockIdx.x, tid = threadIdx.x;
    const float* row = x + (size_t)r * C;
    float acc = 0.0f;
    for (int c = tid; c < C; c += blockDim.x) acc += row[c] * row[c];
    partial[tid] = acc;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (tid < stride) partial[tid] += partial[tid + stride];
        __syncthreads();
    }
    const float inv_rms = rsqrtf(partial[0] / C + eps);
    for (int c = tid; c < C; c += blockDim.x) y[(size_t)r * C + c] = row[c] * inv_rms * w[c];
}

__device__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    return v;  // lane 0 holds the warp's total
}

extern "C" __global__ void rms_norm_warp_shuffle(const float* __restrict__ x, const float* __restrict__ w,
                                                 float* __restrict__ y, int C, float eps) {
    __shared__ float warp_totals[MAX_WARPS];
    __shared__ float inv_rms_shared;
    const int r = blockIdx.x, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int n_warps = (blockDim.x + 31) / 32;
    const float* row = x + (size_t)r * C;
    float acc = 0.0f;
    for (int c = tid; c < C; c += blockDim.x) acc += row[c] * row[c];
    acc = warp_sum(acc);
    if (lane == 0) warp_totals[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        float total = lane < n_warps ? warp_totals[lane] : 0.0f;
        total = warp_sum(total);
        if (lane == 0) inv_rms_shared = rsqrtf(total / C + eps);
    }
    __syncthreads();
    const float inv_rms = inv_rms_shared;
    for (int c = tid; c < C; c += blockDim.x) y[(size_t)r * C + c] = row[c] * inv_rms * w[c];
}
