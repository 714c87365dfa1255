// Bit packing: INT6 (four values in three bytes) and INT4 (two values per byte), row by row.
//
// q: [rows, n] signed char, values in [-2^(bits-1), 2^(bits-1) - 1] (checked by the wrapper);
// packed: [rows, bytes] unsigned char, bytes = 3 * ceil(n / 4) (INT6) or ceil(n / 2) (INT4);
// scale: [rows] float; out: [rows, n] signed char (unpack) or float (dequantize). All row-major.
//
// Codes u = v + 2^(bits-1) are unsigned, stored low bits first:
//   INT6  byte0 = u0 | u1 << 6,  byte1 = u1 >> 2 | u2 << 4,  byte2 = u2 >> 4 | u3 << 2
//   INT4  byte  = u0 | u1 << 4
// Every row is padded with code 0 to whole groups (4 values / 3 bytes, or 2 values / 1 byte), so
// group g of row r owns bytes [r * bytes + g * bytes_per_group, ...) and nobody else touches them.
//
// The ladder
//   *_group_per_thread   one thread per group, any block size, 1-D grid over rows * groups.
//                        The thread packs (reads its values, writes its whole bytes) or unpacks
//                        (reads its bytes, writes its values); no byte is written by two threads,
//                        so there are no races and no synchronisation. Indices are 64-bit.
//   faster (not here)    four INT6 groups a thread = 16 values = 12 bytes = three 32-bit words:
//                        one 128-bit load of 16 values and three word stores to pack, instead
//                        of one byte per instruction; needs 4-byte-aligned rows (see quant.py).

// Code of value i of a row of n values: v + offset, or 0 (padding) past the row's end.
__device__ __forceinline__ int code_at(const signed char* row, long long i, long long n, int offset) {
    return i < n ? (int)row[i] + offset : 0;
}

// Group g of a packed row as four codes (an INT4 pair is followed by two unused zeros).
__device__ __forceinline__ void group_codes(const unsigned char* row, long long g, int bits, int u[4]) {
    if (bits == 6) {
        const int b0 = row[3 * g], b1 = row[3 * g + 1], b2 = row[3 * g + 2];
        u[0] = b0 & 0x3F;
        u[1] = (b0 >> 6) | ((b1 & 0x0F) << 2);
        u[2] = (b1 >> 4) | ((b2 & 0x03) << 4);
        u[3] = b2 >> 2;
    } else {
        const int b = row[g];
        u[0] = b & 0x0F;
        u[1] = b >> 4;
        u[2] = u[3] = 0;
    }
}

extern "C" __global__ void pack_bits_group_per_thread(
        const signed char* __restrict__ q, unsigned char* __restrict__ packed, long long rows, long long n,
        int bits) {
    const long long per_group = bits == 6 ? 4 : 2, bytes_per_group = bits == 6 ? 3 : 1;
    const long long groups = (n + per_group - 1) / per_group;
    const long long job = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (job >= rows * groups) return;
    const long long r = job / groups, g = job % groups, i = g * per_group;
    const signed char* row = q + r * n;
    unsigned char* out = packed + r * groups * bytes_per_group + g * bytes_per_group;   // this group's bytes
    const int offset = 1 << (bits - 1);
    if (bits == 6) {
        const int u0 = code_at(row, i, n, offset), u1 = code_at(row, i + 1, n, offset),
                  u2 = code_at(row, i + 2, n, offset), u3 = code_at(row, i + 3, n, offset);
        out[0] = (unsigned char)((u0 | (u1 << 6)) & 0xFF);          // u0, then u1's low 2 bits
        out[1] = (unsigned char)(((u1 >> 2) | (u2 << 4)) & 0xFF);   // u1's high 4 bits, u2's low 4
        out[2] = (unsigned char)(((u2 >> 4) | (u3 << 2)) & 0xFF);   // u2's high 2 bits, then u3
    } else {
        const int u0 = code_at(row, i, n, offset), u1 = code_at(row, i + 1, n, offset);
        out[0] = (unsigned char)((u0 | (u1 << 4)) & 0xFF);
    }
}

extern "C" __global__ void unpack_bits_group_per_thread(
        const unsigned char* __restrict__ packed, signed char* __restrict__ out, long long rows, long long n,
        int bits) {
    const long long per_group = bits == 6 ? 4 : 2, bytes_per_group = bits == 6 ? 3 : 1;
    const long long groups = (n + per_group - 1) / per_group;
    const long long job = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (job >= rows * groups) return;
    const long long r = job / groups, g = job % groups, i = g * per_group;
    int u[4];
    group_codes(packed + r * groups * bytes_per_group, g, bits, u);
    const int offset = 1 << (bits - 1);
    signed char* row = out + r * n;
#pragma unroll
    for (int j = 0; j < 4; ++j)           // a constant bound, unrolled, keeps u[] in registers
        if (j < per_group && i + j < n) row[i + j] = (signed char)(u[j] - offset);   // the last group may be partial
}

extern "C" __global__ void dequantize_packed_group_per_thread(
        const unsigned char* __restrict__ packed, const float* __restrict__ scale, float* __restrict__ out,
        long long rows, long long n, int bits) {
    const long long per_group = bits == 6 ? 4 : 2, bytes_per_group = bits == 6 ? 3 : 1;
    const long long groups = (n + per_group - 1) / per_group;
    const long long job = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (job >= rows * groups) return;
    const long long r = job / groups, g = job % groups, i = g * per_group;
    int u[4];
    group_codes(packed + r * groups * bytes_per_group, g, bits, u);
    const int offset = 1 << (bits - 1);
    const float s = scale[r];             // one load per thread; the row's threads hit the same cache line
    float* row = out + r * n;
#pragma unroll
    for (int j = 0; j < 4; ++j)           // float(value) * scale: one rounding, as the reference's q.float() * scale
        if (j < per_group && i + j < n) row[i + j] = (float)(u[j] - offset) * s;
}
