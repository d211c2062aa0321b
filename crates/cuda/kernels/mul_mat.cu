// r = a x b for m x m row-major f32 matrices: the seed's mul_mat_on_gpu(r, a, b, m).
// 16 x 16 tiles staged in shared memory; one thread per element of r.
// Parameters: ptr r, ptr a, ptr b, u64 m. Launch with 16 x 16 threads, ceil(m/16)^2 blocks.
#define TILE 16
extern "C" __global__ void mul_mat(float* r, const float* a, const float* b, unsigned long long m) {
    __shared__ float ta[TILE][TILE];
    __shared__ float tb[TILE][TILE];
    unsigned long long row = (unsigned long long)blockIdx.y * TILE + threadIdx.y;
    unsigned long long col = (unsigned long long)blockIdx.x * TILE + threadIdx.x;
    float acc = 0.0f;
    for (unsigned long long k0 = 0; k0 < m; k0 += TILE) {
        unsigned long long ka = k0 + threadIdx.x;
        unsigned long long kb = k0 + threadIdx.y;
        ta[threadIdx.y][threadIdx.x] = (row < m && ka < m) ? a[row * m + ka] : 0.0f;
        tb[threadIdx.y][threadIdx.x] = (kb < m && col < m) ? b[kb * m + col] : 0.0f;
        __syncthreads();
        for (int k = 0; k < TILE; ++k) {
            acc += ta[threadIdx.y][k] * tb[k][threadIdx.x];
        }
        __syncthreads();
    }
    if (row < m && col < m) {
        r[row * m + col] = acc;
    }
}
