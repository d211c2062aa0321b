// y[i] = a * x[i] + y[i] for i < n (grid-stride loop).
// Parameters (hetmm marshalling order): f32 a, ptr x, ptr y, u64 n.
extern "C" __global__ void saxpy(float a, const float* x, float* y, unsigned long long n) {
    unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        y[i] = a * x[i] + y[i];
    }
}
