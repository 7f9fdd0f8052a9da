// taproot CUDA kernels: every op of the Backend trait that is not a matrix product (those are
// cuBLAS). Compiled at run time with NVRTC (and, in CI, to PTX for sm_90 without a GPU).
// fp32 throughout, written after llm.c's fp32 kernels: flat, one kernel per op, shapes in
// comments. Dims: B batch, T time, C channels, NH heads, hs = C/NH, N = B*T, V/Vp vocabulary.
// Reductions use warp shuffles; where a result sums over rows of a batch (bias and LayerNorm
// parameter gradients, the embedding gradient) float atomics are used, so the summation order
// is not fixed: the GPU backend matches the CPU reference to a tolerance, not bitwise.

#define WARP 32
// -inf without math headers (NVRTC compiles without the CUDA runtime headers)
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}
// Block-wide sum for blockDim.x a multiple of 32, at most 1024. Every thread gets the result.
__device__ float block_sum(float v) {
    __shared__ float shared[32];
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, nwarps = blockDim.x / WARP;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < nwarps ? shared[lane] : 0.0f;
    return warp_sum(v);
}
__device__ float block_max(float v) {
    __shared__ float shared[32];
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, nwarps = blockDim.x / WARP;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < nwarps ? shared[lane] : NEG_INF;
    return warp_max(v);
}

// ---------------------------------------------------------------------------------------------
// elementwise

extern "C" __global__ void fill_kernel(float* x, float value, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = value;
}
// dst = a + b
extern "C" __global__ void add_kernel(float* dst, const float* a, const float* b, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = a[i] + b[i];
}
// dst = alpha * dst + beta * src
extern "C" __global__ void axpby_kernel(float* dst, float alpha, float beta, const float* src, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) dst[i] = alpha * dst[i] + beta * src[i];
}
// out[0] += sum(x^2) over a grid-stride range; out must be zeroed first. Per-thread partials
// in double, one atomic per block.
extern "C" __global__ void sumsq_kernel(float* out, const float* x, long n) {
    double acc = 0.0;
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        double v = x[i];
        acc += v * v;
    }
    float s = block_sum((float)acc);
    if (threadIdx.x == 0) atomicAdd(out, s);
}
// x *= 1 / (sqrt(ss[0]) + eps)
extern "C" __global__ void scale_by_rnorm_kernel(float* x, const float* ss, float eps, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= 1.0f / (sqrtf(ss[0]) + eps);
}
// out (N, OC) += b (OC), broadcast over rows
extern "C" __global__ void add_bias_kernel(float* out, const float* b, int N, int OC) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (long)N * OC) out[i] += b[i % OC];
}
// db (OC) += column sums of dout (N, OC). Block (32, 8): 32 columns, 8 row lanes; grid
// (OC/32, row chunks). Each thread sums a strided run of rows of its column (coalesced across
// the 32 columns), the 8 lanes reduce in shared memory, one atomic per column per block.
// (One thread per column looping over all N rows left the GPU nearly idle: OC/256 blocks.)
#define BIAS_ROWS 256
extern "C" __global__ void bias_backward_kernel(float* db, const float* dout, int N, int OC) {
    __shared__ float part[8][33];
    int o = blockIdx.x * 32 + threadIdx.x;
    int r0 = blockIdx.y * BIAS_ROWS;
    int r1 = min(N, r0 + BIAS_ROWS);
    float s = 0.0f;
    if (o < OC)
        for (int r = r0 + threadIdx.y; r < r1; r += 8) s += dout[(long)r * OC + o];
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && o < OC) {
        float t = 0.0f;
        for (int i = 0; i < 8; i++) t += part[i][threadIdx.x];
        atomicAdd(&db[o], t);
    }
}

// ---------------------------------------------------------------------------------------------
// embedding

// out (B, T, C) = wte[ids] + wpe[t] (wpe null: no position table, rotary models)
extern "C" __global__ void encoder_forward_kernel(float* out, const unsigned int* ids, const float* wte, const float* wpe, int B, int T, int C) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)B * T * C) return;
    long bt = i / C;
    int c = i % C, t = bt % T;
    out[i] = wte[(long)ids[bt] * C + c] + (wpe ? wpe[(long)t * C + c] : 0.0f);
}
// dwte[ids] += dout; dwpe[t] += dout (atomics: tokens repeat)
extern "C" __global__ void encoder_backward_kernel(float* dwte, float* dwpe, const float* dout, const unsigned int* ids, int B, int T, int C) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)B * T * C) return;
    long bt = i / C;
    int c = i % C, t = bt % T;
    atomicAdd(&dwte[(long)ids[bt] * C + c], dout[i]);
    if (dwpe) atomicAdd(&dwpe[(long)t * C + c], dout[i]);
}

// ---------------------------------------------------------------------------------------------
// layernorm: one warp per row

extern "C" __global__ void layernorm_forward_kernel(float* out, float* mean, float* rstd, const float* inp, const float* w, const float* b, int N, int C) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) / WARP, lane = threadIdx.x % WARP;
    if (row >= N) return;
    const float* x = inp + (long)row * C;
    float s = 0.0f;
    for (int i = lane; i < C; i += WARP) s += x[i];
    float m = warp_sum(s) / C;
    float v = 0.0f;
    for (int i = lane; i < C; i += WARP) { float d = x[i] - m; v += d * d; }
    float r = 1.0f / sqrtf(warp_sum(v) / C + 1e-5f);
    float* o = out + (long)row * C;
    for (int i = lane; i < C; i += WARP) o[i] = (x[i] - m) * r * w[i] + b[i];
    if (lane == 0) { mean[row] = m; rstd[row] = r; }
}
// dinp += ...; dw += ...; db += ... One warp per row, rows strided over the grid; each block
// accumulates its rows' dw and db in shared memory (2C floats, dynamic) and adds them to the
// global sums once at the end, instead of an atomic per element per row (llm.c's scheme).
extern "C" __global__ void layernorm_backward_kernel(float* dinp, float* dw, float* db, const float* dout, const float* inp, const float* w, const float* mean, const float* rstd, int N, int C) {
    extern __shared__ float sh[];
    float* sdw = sh;
    float* sdb = sh + C;
    for (int i = threadIdx.x; i < 2 * C; i += blockDim.x) sh[i] = 0.0f;
    __syncthreads();
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, nwarps = blockDim.x / WARP;
    for (int row = blockIdx.x * nwarps + warp; row < N; row += gridDim.x * nwarps) {
        const float* x = inp + (long)row * C;
        const float* d = dout + (long)row * C;
        float m = mean[row], r = rstd[row];
        float a = 0.0f, bb = 0.0f;
        for (int i = lane; i < C; i += WARP) {
            float norm = (x[i] - m) * r, dn = w[i] * d[i];
            a += dn; bb += dn * norm;
        }
        a = warp_sum(a) / C;
        bb = warp_sum(bb) / C;
        float* di = dinp + (long)row * C;
        for (int i = lane; i < C; i += WARP) {
            float norm = (x[i] - m) * r, dn = w[i] * d[i];
            di[i] += (dn - a - norm * bb) * r;
            atomicAdd(&sdw[i], norm * d[i]);
            atomicAdd(&sdb[i], d[i]);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        atomicAdd(&dw[i], sdw[i]);
        atomicAdd(&db[i], sdb[i]);
    }
}

// ---------------------------------------------------------------------------------------------
// attention (the products are batched cuBLAS calls on permuted q, k, v)

// qkv (B, T, 3, NH, hs) -> q, k, v each (B, NH, T, hs)
extern "C" __global__ void permute_qkv_kernel(float* q, float* k, float* v, const float* qkv, int B, int T, int NH, int hs) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)B * NH * T * hs) return;
    int d = i % hs; long r = i / hs;
    int t = r % T; r /= T;
    int h = r % NH; int b = r / NH;
    long src = (long)(b * T + t) * 3 * NH * hs + h * hs + d;
    q[i] = qkv[src];
    k[i] = qkv[src + NH * hs];
    v[i] = qkv[src + 2 * NH * hs];
}
// the reverse: dq, dk, dv (B, NH, T, hs) -> dqkv (B, T, 3, NH, hs)
extern "C" __global__ void unpermute_qkv_kernel(float* dqkv, const float* dq, const float* dk, const float* dv, int B, int T, int NH, int hs) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)B * NH * T * hs) return;
    int d = i % hs; long r = i / hs;
    int t = r % T; r /= T;
    int h = r % NH; int b = r / NH;
    long dst = (long)(b * T + t) * 3 * NH * hs + h * hs + d;
    dqkv[dst] = dq[i];
    dqkv[dst + NH * hs] = dk[i];
    dqkv[dst + 2 * NH * hs] = dv[i];
}
// y (B, NH, T, hs) -> out (B, T, NH*hs)
extern "C" __global__ void unpermute_y_kernel(float* out, const float* y, int B, int T, int NH, int hs) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)B * NH * T * hs) return;
    int d = i % hs; long r = i / hs;
    int t = r % T; r /= T;
    int h = r % NH; int b = r / NH;
    out[(long)(b * T + t) * NH * hs + h * hs + d] = y[i];
}
// the reverse, for the gradient: dout (B, T, NH*hs) -> dy (B, NH, T, hs)
extern "C" __global__ void permute_y_kernel(float* dy, const float* dout, int B, int T, int NH, int hs) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)B * NH * T * hs) return;
    int d = i % hs; long r = i / hs;
    int t = r % T; r /= T;
    int h = r % NH; int b = r / NH;
    dy[i] = dout[(long)(b * T + t) * NH * hs + h * hs + d];
}
// att (rows of T) = causal softmax of pre-scaled scores, in place; one warp per row.
// row index = (b*NH + h)*T + t; positions after t get probability 0.
extern "C" __global__ void softmax_causal_kernel(float* att, int rows, int T) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) / WARP, lane = threadIdx.x % WARP;
    if (row >= rows) return;
    int t = row % T;
    float* a = att + (long)row * T;
    float m = NEG_INF;
    for (int i = lane; i <= t; i += WARP) m = fmaxf(m, a[i]);
    m = warp_max(m);
    float s = 0.0f;
    for (int i = lane; i <= t; i += WARP) { float e = expf(a[i] - m); a[i] = e; s += e; }
    float inv = 1.0f / warp_sum(s);
    for (int i = lane; i < T; i += WARP) a[i] = i <= t ? a[i] * inv : 0.0f;
}
// datt (in place) = att * (datt - sum(att * datt)) over each row; 0 after t.
extern "C" __global__ void softmax_backward_kernel(float* datt, const float* att, int rows, int T) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) / WARP, lane = threadIdx.x % WARP;
    if (row >= rows) return;
    int t = row % T;
    float* d = datt + (long)row * T;
    const float* a = att + (long)row * T;
    float s = 0.0f;
    for (int i = lane; i <= t; i += WARP) s += a[i] * d[i];
    s = warp_sum(s);
    for (int i = lane; i < T; i += WARP) d[i] = i <= t ? a[i] * (d[i] - s) : 0.0f;
}

// ---------------------------------------------------------------------------------------------
// gelu, tanh approximation

#define GELU_SCALE 0.7978845608028654f
// RMSNorm: one warp per row; rstd kept for the backward.
extern "C" __global__ void rmsnorm_forward_kernel(float* out, float* rstd, const float* inp, const float* w, int N, int C, float eps) {
    int row = (blockIdx.x * blockDim.x + threadIdx.x) / WARP, lane = threadIdx.x % WARP;
    if (row >= N) return;
    const float* x = inp + (long)row * C;
    float s = 0.0f;
    for (int i = lane; i < C; i += WARP) s += x[i] * x[i];
    float r = 1.0f / sqrtf(warp_sum(s) / C + eps);
    float* o = out + (long)row * C;
    for (int i = lane; i < C; i += WARP) o[i] = x[i] * r * w[i];
    if (lane == 0) rstd[row] = r;
}
// dinp += (w*dout - norm * mean(w*dout*norm)) * rstd; dw += sum_rows norm*dout, per block in
// shared memory (C floats) and added to the global sums once, as the LayerNorm backward does.
extern "C" __global__ void rmsnorm_backward_kernel(float* dinp, float* dw, const float* dout, const float* inp, const float* w, const float* rstd, int N, int C) {
    extern __shared__ float sh[];
    for (int i = threadIdx.x; i < C; i += blockDim.x) sh[i] = 0.0f;
    __syncthreads();
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, nwarps = blockDim.x / WARP;
    for (int row = blockIdx.x * nwarps + warp; row < N; row += gridDim.x * nwarps) {
        const float* x = inp + (long)row * C;
        const float* d = dout + (long)row * C;
        float r = rstd[row];
        float a = 0.0f;
        for (int i = lane; i < C; i += WARP) a += w[i] * d[i] * x[i] * r;
        float m = warp_sum(a) / C;
        float* di = dinp + (long)row * C;
        for (int i = lane; i < C; i += WARP) {
            di[i] += (w[i] * d[i] - x[i] * r * m) * r;
            atomicAdd(&sh[i], x[i] * r * d[i]);
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < C; i += blockDim.x) atomicAdd(&dw[i], sh[i]);
}
// Per-head RMSNorm (QK-norm): one warp per vector v = (row, head), the first `heads` vectors of
// hd floats of each row of `stride` floats; w (hd) is shared by the heads.
extern "C" __global__ void head_rmsnorm_forward_kernel(float* out, float* rstd, const float* inp, const float* w, int rows, int stride, int heads, int hd, float eps) {
    int v = (blockIdx.x * blockDim.x + threadIdx.x) / WARP, lane = threadIdx.x % WARP;
    if (v >= rows * heads) return;
    long off = (long)(v / heads) * stride + (long)(v % heads) * hd;
    const float* x = inp + off;
    float s = 0.0f;
    for (int i = lane; i < hd; i += WARP) s += x[i] * x[i];
    float r = 1.0f / sqrtf(warp_sum(s) / hd + eps);
    for (int i = lane; i < hd; i += WARP) out[off + i] = x[i] * r * w[i];
    if (lane == 0) rstd[v] = r;
}
// dw[i] += sum over vectors of norm_i * dout_i: block i, threads stride over the vectors, then a
// fixed-order tree sum in shared memory (deterministic). Runs before the in-place backward.
extern "C" __global__ void head_rmsnorm_dw_kernel(float* dw, const float* d, const float* inp, const float* rstd, int rows, int stride, int heads, int hd) {
    __shared__ float sh[256];
    int i = blockIdx.x;
    float a = 0.0f;
    for (int v = threadIdx.x; v < rows * heads; v += blockDim.x) {
        long off = (long)(v / heads) * stride + (long)(v % heads) * hd + i;
        a += inp[off] * rstd[v] * d[off];
    }
    sh[threadIdx.x] = a;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) dw[i] += sh[0];
}
// In place: d (dout in, dinp out) = (w*dout - norm * mean(w*dout*norm)) * rstd, one warp a vector.
extern "C" __global__ void head_rmsnorm_backward_kernel(float* d, const float* inp, const float* w, const float* rstd, int rows, int stride, int heads, int hd) {
    int v = (blockIdx.x * blockDim.x + threadIdx.x) / WARP, lane = threadIdx.x % WARP;
    if (v >= rows * heads) return;
    long off = (long)(v / heads) * stride + (long)(v % heads) * hd;
    const float* x = inp + off;
    float* dv = d + off;
    float r = rstd[v];
    float a = 0.0f;
    for (int i = lane; i < hd; i += WARP) a += w[i] * dv[i] * x[i] * r;
    float m = warp_sum(a) / hd;
    for (int i = lane; i < hd; i += WARP) dv[i] = (w[i] * dv[i] - x[i] * r * m) * r;
}
// Mixture of experts. out (M, C)[i] = inp[rows[i]]: one thread per output element.
extern "C" __global__ void gather_rows_kernel(float* out, const float* inp, const unsigned int* rows, int M, int C) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)M * C) return;
    out[i] = inp[(long)rows[i / C] * C + i % C];
}
// out (N, C)[t] = sum_j w[t, j] * ys[slots[t, j]] in choice order (w = 1 when null): one thread
// per output element, no atomics (deterministic).
extern "C" __global__ void moe_combine_kernel(float* out, const float* ys, const unsigned int* slots, const float* w, int N, int K, int C) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)N * C) return;
    long t = i / C;
    int c = i % C;
    float acc = 0.0f;
    for (int j = 0; j < K; j++) acc += (w ? w[t * K + j] : 1.0f) * ys[(long)slots[t * K + j] * C + c];
    out[i] = acc;
}
// dys[slots[t, j]] = w[t, j] * dout[t]: one thread per element of (N*K, C).
extern "C" __global__ void moe_combine_dys_kernel(float* dys, const float* dout, const unsigned int* slots, const float* w, int N, int K, int C) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)N * K * C) return;
    long tj = i / C;
    int c = i % C;
    dys[(long)slots[tj] * C + c] = w[tj] * dout[(tj / K) * C + c];
}
// dweights[t, j] = dout[t] . ys[slots[t, j]]: one warp per (token, choice).
extern "C" __global__ void moe_combine_dweights_kernel(float* dw, const float* dout, const float* ys, const unsigned int* slots, int N, int K, int C) {
    int tj = (blockIdx.x * blockDim.x + threadIdx.x) / WARP, lane = threadIdx.x % WARP;
    if (tj >= N * K) return;
    const float* d = dout + (long)(tj / K) * C;
    const float* y = ys + (long)slots[tj] * C;
    float a = 0.0f;
    for (int i = lane; i < C; i += WARP) a += d[i] * y[i];
    a = warp_sum(a);
    if (lane == 0) dw[tj] = a;
}
// Rotary positions in place: one thread per (row, head, pair i < hd/2); row r is position r mod T.
// The angle is computed in double, as the CPU kernel does, so both backends rotate alike.
extern "C" __global__ void rope_kernel(float* x, int rows, int T, int stride, int heads, int hd, float theta, float sign) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    int half = hd / 2;
    long total = (long)rows * heads * half;
    if (idx >= total) return;
    int i = idx % half;
    int h = (idx / half) % heads;
    long r = idx / ((long)half * heads);
    double a = (double)(r % T) * pow((double)theta, -2.0 * i / hd);
    float c = (float)cos(a), s = (float)sin(a) * sign;
    float* p = x + r * stride + (long)h * hd;
    float x0 = p[i], x1 = p[i + half];
    p[i] = x0 * c - x1 * s;
    p[i + half] = x1 * c + x0 * s;
}
// Grouped-query attention: one thread per output element of (N, 3*nh*hd); query head h reads
// key/value head h / (nh / kv).
extern "C" __global__ void gqa_expand_kernel(float* out, const float* inp, int N, int nh, int kv, int hd) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    long wo = 3L * nh * hd, wi = (long)(nh + 2 * kv) * hd;
    if (idx >= (long)N * wo) return;
    long r = idx / wo;
    int col = idx % wo, part = col / (nh * hd), h = (col % (nh * hd)) / hd, k = col % hd;
    long src = part == 0 ? col : (long)(part == 1 ? nh : nh + kv) * hd + (long)(h / (nh / kv)) * hd + k;
    out[idx] = inp[r * wi + src];
}
// The adjoint: one thread per input element of (N, (nh+2kv)*hd); a key/value element sums its
// group's query heads in order (no atomics, so the result is deterministic).
extern "C" __global__ void gqa_reduce_kernel(float* dinp, const float* dout, int N, int nh, int kv, int hd) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    long wo = 3L * nh * hd, wi = (long)(nh + 2 * kv) * hd;
    if (idx >= (long)N * wi) return;
    long r = idx / wi;
    int col = idx % wi;
    if (col < nh * hd) { dinp[idx] = dout[r * wo + col]; return; }
    int part = col < (nh + kv) * hd ? 1 : 2;
    int j = (col - (part == 1 ? nh : nh + kv) * hd) / hd, k = col % hd, g = nh / kv;
    float s = 0.0f;
    for (int h = j * g; h < (j + 1) * g; h++) s += dout[r * wo + (long)part * nh * hd + (long)h * hd + k];
    dinp[idx] = s;
}
// SwiGLU: out (N, F) = silu(gate) * up, inp (N, 2F) = [gate | up] per row.
extern "C" __global__ void swiglu_forward_kernel(float* out, const float* inp, int N, int F) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)N * F) return;
    long r = idx / F;
    int i = idx % F;
    float g = inp[r * 2 * F + i], u = inp[r * 2 * F + F + i];
    out[idx] = g / (1.0f + expf(-g)) * u;
}
extern "C" __global__ void swiglu_backward_kernel(float* dinp, const float* inp, const float* dout, int N, int F) {
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)N * F) return;
    long r = idx / F;
    int i = idx % F;
    float g = inp[r * 2 * F + i], u = inp[r * 2 * F + F + i], d = dout[idx];
    float sg = 1.0f / (1.0f + expf(-g));
    dinp[r * 2 * F + F + i] = g * sg * d;
    dinp[r * 2 * F + i] = d * u * sg * (1.0f + g * (1.0f - sg));
}
extern "C" __global__ void gelu_forward_kernel(float* out, const float* inp, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = inp[i];
    out[i] = 0.5f * x * (1.0f + tanhf(GELU_SCALE * (x + 0.044715f * x * x * x)));
}
extern "C" __global__ void gelu_backward_kernel(float* dinp, const float* inp, const float* dout, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = inp[i];
    float th = tanhf(GELU_SCALE * (x + 0.044715f * x * x * x));
    float sech2 = 1.0f - th * th;
    float g = 0.5f * (1.0f + th) + x * 0.5f * sech2 * GELU_SCALE * (1.0f + 3.0f * 0.044715f * x * x);
    dinp[i] = g * dout[i];
}

// ---------------------------------------------------------------------------------------------
// fused softmax + cross-entropy over a padded vocabulary: one block per row.
// logits (N, Vp) become dlogits = (softmax - onehot) * dscale; columns >= V are masked (0).
// Two passes over the row, not three: the first keeps an online (max, sum of exp) pair per
// thread, rescaling the sum when the max grows, and the pairs are merged across the block.
__device__ __forceinline__ void ms_merge(float& m, float& s, float m2, float s2) {
    float mm = fmaxf(m, m2);
    if (mm == NEG_INF) return;
    s = s * expf(m - mm) + s2 * expf(m2 - mm);
    m = mm;
}
extern "C" __global__ void crossentropy_kernel(float* logits, float* losses, const unsigned int* targets, float dscale, int N, int V, int Vp) {
    __shared__ float sm[32], ss[32];
    int row = blockIdx.x;
    if (row >= N) return;
    float* x = logits + (long)row * Vp;
    float m = NEG_INF, s = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
        float v = x[i];
        if (v > m) { s = s * expf(m - v) + 1.0f; m = v; }
        else s += expf(v - m);
    }
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffff, m, o), s2 = __shfl_xor_sync(0xffffffff, s, o);
        ms_merge(m, s, m2, s2);
    }
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, nwarps = blockDim.x / WARP;
    if (lane == 0) { sm[warp] = m; ss[warp] = s; }
    __syncthreads();
    m = lane < nwarps ? sm[lane] : NEG_INF;
    s = lane < nwarps ? ss[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffff, m, o), s2 = __shfl_xor_sync(0xffffffff, s, o);
        ms_merge(m, s, m2, s2);
    }
    int tgt = targets[row];
    if (threadIdx.x == 0) losses[row] = logf(s) + m - x[tgt];
    __syncthreads();  // every thread has read x[tgt] before it is overwritten
    float inv = 1.0f / s;
    for (int i = threadIdx.x; i < Vp; i += blockDim.x) {
        float p = i < V ? expf(x[i] - m) * inv : 0.0f;
        x[i] = i < V ? (p - (i == tgt ? 1.0f : 0.0f)) * dscale : 0.0f;
    }
}

// ---------------------------------------------------------------------------------------------
// bf16 operand copies

// bf16 bits of x, round to nearest even; NaN stays a quiet NaN (the bits of
// backend::precision::f32_to_bf16). Also the flash kernels' rounding (flash.cu).
__device__ __forceinline__ unsigned int f2bf(float x) {
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

// out = bf16(in). Grid-stride.
extern "C" __global__ void f32_to_bf16_kernel(unsigned short* out, const float* in, long n) {
    for (long i = (long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        out[i] = (unsigned short)f2bf(in[i]);
    }
}

// ---------------------------------------------------------------------------------------------
// optimizers

extern "C" __global__ void adamw_kernel(float* p, const float* g, float* m, float* v, float lr, float b1, float b2, float eps, float wd, float bc1, float bc2, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float gi = g[i];
    float mi = b1 * m[i] + (1.0f - b1) * gi;
    float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
    m[i] = mi; v[i] = vi;
    p[i] -= lr * ((mi / bc1) / (sqrtf(vi / bc2) + eps) + wd * p[i]);
}
// m = mu m + g; u = g + mu m (nesterov) or m
extern "C" __global__ void momentum_kernel(float* u, float* m, const float* g, float mu, int nesterov, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float mi = mu * m[i] + g[i];
    m[i] = mi;
    u[i] = nesterov ? g[i] + mu * mi : mi;
}
// p = keep * p - step * u, where step is lr*scale, or lr / (sqrt(ss[0]) + eps) when ss != 0
extern "C" __global__ void apply_update_kernel(float* p, const float* u, float step, float keep, const float* ss, float eps, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float s = ss ? step / (sqrtf(ss[0]) + eps) : step;
    p[i] = keep * p[i] - s * u[i];
}
