// Mixture-of-experts dispatch (a stable counting sort of token copies by expert) and combine.
//
// flat: [N*k] int64 expert of each copy, copies in (token, choice) order.
// Dispatch, in launch order:
//   count_copies              counts[e] = number of copies for expert e        (thread per copy, atomicAdd)
//   exclusive_scan_one_thread offsets[0] = 0, offsets[e+1] = offsets[e] + counts[e]   (one thread; E is small)
//   place_copies_per_expert   thread e walks all copies in order and hands its own copies consecutive
//                             rows from offsets[e]: slot[i] = row, source[row] = i / k   (stable, deterministic)
//   gather_rows               x_sorted[r, :] = x[source[r], :]                  (block per row, threads along C)
// Combine:
//   combine_rows              y[n, :] = sum_j weight[n, j] * expert_out[slot[n, j], :]   (block per token)
// Float tensors are float32, index tensors int64 (long long), all row-major.

extern "C" __global__ void count_copies(const long long* __restrict__ flat, unsigned long long* counts,
                                        long long n_copies) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n_copies) atomicAdd(&counts[flat[i]], 1ULL);
}

extern "C" __global__ void exclusive_scan_one_thread(const long long* __restrict__ counts, long long* offsets,
                                                     int n_experts) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        offsets[0] = 0;
        for (int e = 0; e < n_experts; ++e) offsets[e + 1] = offsets[e] + counts[e];
    }
}

extern "C" __global__ void place_copies_per_expert(const long long* __restrict__ flat, long long n_copies, int k,
                                                   const long long* __restrict__ offsets, long long* slot,
                                                   long long* source, int n_experts) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= n_experts) return;
    long long row = offsets[e];
    for (long long i = 0; i < n_copies; ++i) {
        if (flat[i] == e) {
            slot[i] = row;
            source[row] = i / k;
            ++row;
        }
    }
}

extern "C" __global__ void gather_rows(const float* __restrict__ x, const long long* __restrict__ source,
                                       float* __restrict__ x_sorted, int C) {
    const long long r = blockIdx.x;
    const float* src = x + source[r] * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) x_sorted[r * C + c] = src[c];
}

extern "C" __global__ void combine_rows(const float* __restrict__ expert_out, const long long* __restrict__ slot,
                                        const float* __restrict__ weight, float* __restrict__ y, int C, int k) {
    const long long n = blockIdx.x;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < k; ++j) acc += weight[n * k + j] * expert_out[slot[n * k + j] * C + c];
        y[n * C + c] = acc;
    }
}
