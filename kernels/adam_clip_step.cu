// Adam with gradient-norm clipping, on flat buffers, in two launches.
//
// param, grad, exp_avg (m), exp_avg_sq (v): [n] float32, contiguous; norm_sq: one double, zeroed
// by the caller before the first launch. Everything else is a host-computed number.
//
//   launch 1  adam_sum_of_squares   norm_sq += sum_i grad[i]^2                  (in double)
//   launch 2  adam_clip_update      coef = clip ? min(1, max_norm / (sqrt(norm_sq) + 1e-6)) : 1
//                                   g    = coef * grad[i] + weight_decay * param[i]
//                                   m    = beta1 m + (1 - beta1) g
//                                   v    = beta2 v + (1 - beta2) g^2
//                                   param[i] -= step_size * m / (sqrt(v) / bc2_sqrt + eps)
// with step_size = lr / (1 - beta1^t), bc2_sqrt = sqrt(1 - beta2^t) and 1 - beta from the host (in double,
// then rounded once: 1.0f - 0.999f would be off by 1.3e-5 relative, since 0.999f is not 0.999). Launch 2
// reads the norm from device memory, so nothing comes back to the host between the launches
// (the stream orders them).
//
// The ladder
//   adam_sum_of_squares  grid-stride loop (each thread sums elements i, i + gridsize, ...: coalesced),
//                        then a shared-memory tree over the block (log2(ADAM_BLOCK) halvings) and
//                        one atomicAdd per block. Launch: ADAM_BLOCK threads, at most a few
//                        thousand blocks (the grid-stride loop covers the rest), so at most that
//                        many atomics. Accumulated in double (see kernels/adam_clip_step.py; atomicAdd on double
//                        needs sm_60+).
//   adam_clip_update     one thread per element, any block size; every thread recomputes the same
//                        clip coefficient from norm_sq (one broadcast load, a sqrt and a divide,
//                        nothing next to the five streams of n floats it reads and writes).

#define ADAM_BLOCK 256  // threads per block of adam_sum_of_squares: a power of two (kernels/adam_clip_step.py uses it)

extern "C" __global__ void adam_sum_of_squares(const float* __restrict__ grad, double* __restrict__ norm_sq,
                                               long long n) {
    __shared__ double partial[ADAM_BLOCK];
    const int tid = threadIdx.x;
    double acc = 0.0;
    for (long long i = (long long)blockIdx.x * blockDim.x + tid; i < n; i += (long long)gridDim.x * blockDim.x) {
        const double x = grad[i];
        acc += x * x;
    }
    partial[tid] = acc;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
        if (tid < stride) partial[tid] += partial[tid + stride];
        __syncthreads();
    }
    if (tid == 0) atomicAdd(norm_sq, partial[0]);   // block totals arrive in any order: last-bit nondeterminism
}

extern "C" __global__ void adam_clip_update(float* __restrict__ param, const float* __restrict__ grad,
                                            float* __restrict__ exp_avg, float* __restrict__ exp_avg_sq,
                                            const double* __restrict__ norm_sq, long long n, int clip,
                                            double max_norm, float beta1, float beta2, float one_minus_beta1,
                                            float one_minus_beta2, float step_size, float bc2_sqrt, float eps,
                                            float weight_decay) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    // as torch.nn.utils.clip_grad_norm_: scale down only, and never divide by zero
    const float coef = clip ? (float)fmin(1.0, max_norm / (sqrt(*norm_sq) + 1e-6)) : 1.0f;
    const float p = param[i];
    float g = coef * grad[i];
    if (weight_decay != 0.0f) g += weight_decay * p;              // L2 form (torch.optim.Adam), not AdamW
    const float m = beta1 * exp_avg[i] + one_minus_beta1 * g;
    const float v = beta2 * exp_avg_sq[i] + one_minus_beta2 * g * g;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    param[i] = p - step_size * m / (sqrtf(v) / bc2_sqrt + eps);
}
