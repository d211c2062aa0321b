// Streaming kernels: every element of a large array read (or written) once.

// out[blockIdx.x] = sum of the elements this block visits (grid-stride), wrapping on overflow.
// Parameters: ptr src, u64 n, ptr out (gridDim.x values). Launch with 256 threads per block.
extern "C" __global__ void stream_sum(const unsigned long long* src, unsigned long long n, unsigned long long* out) {
    __shared__ unsigned long long partial[256];
    unsigned long long sum = 0;
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        sum += src[i];
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (unsigned int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            partial[threadIdx.x] += partial[threadIdx.x + s];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        out[blockIdx.x] = partial[0];
    }
}

// dst[i] = i ^ seed for i < n.
// Parameters: ptr dst, u64 n, u64 seed.
extern "C" __global__ void stream_write(unsigned long long* dst, unsigned long long n, unsigned long long seed) {
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        dst[i] = i ^ seed;
    }
}
