// TIES merging in CUDA C: trim (a per-row threshold), elect a sign, disjoint mean.
//
// tau: [K, P] row-major float32 (K task vectors), thresholds: [K], out: [P].
// Two launches, in this order on one stream:
//
//   ties_threshold_radix_select      grid = K blocks (one per row), block = a multiple of 32 threads,
//                                    at most 1024 (the warp shuffles need whole warps).
//       thresholds[k] = the keep-th largest |tau[k, :]|, found exactly, bit by bit: for non-negative
//       floats the bit pattern read as an unsigned int orders like the value, so starting from
//       prefix = 0, for bit = 30 .. 0 (bit 31, the sign, is 0 in every |x|):
//           candidate = prefix | (1 << bit)
//           if #{p : bits(|tau[k, p]|) >= candidate} >= keep:  prefix = candidate
//       The final prefix is the largest value with at least `keep` entries at or above it: the
//       keep-th largest magnitude itself. Each round is one pass over the row (coalesced) and a
//       block-wide count: warp shuffles, then warp 0 sums the warp totals.
//
//   ties_merge_parameter_per_thread  1-D grid over P parameters, any block size.
//       Column p's trimmed values are tau[k, p] where |tau[k, p]| >= thresholds[k], else 0.
//       elected = sign(sum of them) (mass) or sign(sum of their signs) (count);
//       out[p] = lam * (sum of those with the elected sign) / (their number, at least 1; or K).
//       Neighbouring threads read neighbouring parameters of each row: coalesced.

#define MAX_WARPS 32

__device__ int warp_sum_int(int v) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    return v;  // lane 0 holds the warp's total
}

extern "C" __global__ void ties_threshold_radix_select(const float* __restrict__ tau, float* __restrict__ thresholds,
                                                       int P, int keep) {
    __shared__ int warp_counts[MAX_WARPS];
    __shared__ int total;
    const int row = blockIdx.x, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int n_warps = (blockDim.x + 31) / 32;
    const float* x = tau + (long long)row * P;

    unsigned int prefix = 0u;                       // the threshold's bits decided so far
    for (int bit = 30; bit >= 0; --bit) {
        const unsigned int candidate = prefix | (1u << bit);
        int n = 0;
        for (int p = tid; p < P; p += blockDim.x) n += (__float_as_uint(x[p]) & 0x7fffffffu) >= candidate;
        n = warp_sum_int(n);
        if (lane == 0) warp_counts[warp] = n;
        __syncthreads();                            // every warp's count is in shared memory
        if (warp == 0) {
            int c = lane < n_warps ? warp_counts[lane] : 0;
            c = warp_sum_int(c);
            if (lane == 0) total = c;
        }
        __syncthreads();                            // total is ready; the next round's writes to warp_counts
                                                    // and total come after the next round's first barrier,
                                                    // by which time every thread has read this one
        if (total >= keep) prefix = candidate;      // the same decision in every thread
    }
    if (tid == 0) thresholds[row] = __uint_as_float(prefix);
}

extern "C" __global__ void ties_merge_parameter_per_thread(const float* __restrict__ tau,
                                                           const float* __restrict__ thresholds,
                                                           float* __restrict__ out, int K, int P, float lam,
                                                           int by_count, int divide_by_all) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= P) return;
    float mass = 0.0f;                              // elect: over the trimmed values of column p
    int votes = 0;
    for (int k = 0; k < K; ++k) {
        const float x = tau[(long long)k * P + p];
        if (fabsf(x) >= thresholds[k]) {            // survives the trim (a dropped entry adds 0)
            mass += x;
            votes += (x > 0.0f) - (x < 0.0f);
        }
    }
    const int elected = by_count ? (votes > 0) - (votes < 0) : (mass > 0.0f) - (mass < 0.0f);
    float sum = 0.0f;                               // merge: the surviving values with the elected sign
    int agreeing = 0;
    for (int k = 0; k < K; ++k) {
        const float x = tau[(long long)k * P + p];
        if (fabsf(x) >= thresholds[k] && ((x > 0.0f && elected > 0) || (x < 0.0f && elected < 0))) {
            sum += x;
            ++agreeing;
        }
    }
    const int count = divide_by_all ? K : (agreeing > 1 ? agreeing : 1);
    out[p] = lam * sum / (float)count;
}
