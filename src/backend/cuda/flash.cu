
// ---------------------------------------------------------------------------------------------
// Flash attention (FlashAttention-2's algorithm) on bf16 tensor cores: mma.sync m16n8k16 with
// bf16 operands and fp32 accumulation, written in inline PTX (NVRTC needs no headers for it).
// The CPU reference is backend/cpu/flash.rs: the same tiles (64 keys, starting at key 0), the
// same rounding points (q, k, v, dO, P and dS are the bf16 operands; l, D, the accumulators and
// the logsumexp stay fp32).
//
// Fragments of m16n8k16 (lane = 4*g + tq): A (16x16, row-major) reg0 = (row g, cols 2tq..+1),
// reg1 = (row g+8, cols 2tq..+1), reg2 = (row g, cols 2tq+8..+9), reg3 = (row g+8, cols
// 2tq+8..+9); B (16x8, "col") reg0 = (rows 2tq..+1, col g), reg1 = (rows 2tq+8..+9, col g);
// C (16x8 f32) c0, c1 = (row g, cols 2tq, 2tq+1), c2, c3 = (row g+8, same cols). The lower
// half of a register holds the lower index. Two adjacent C tiles (16x16) are exactly one A
// fragment, which is how P and dS go from one product into the next without shared memory.
//
// Layout: qkv (B, T, 3, NH, HS) fp32; out (B, T, NH*HS); lse and D (B, NH, T).
// Block: 4 warps (128 threads) over 64 queries (forward) or 64 keys (backward).

#define FA_TILE 64
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

__device__ __forceinline__ unsigned int pack2(float lo, float hi) {
    return f2bf(lo) | (f2bf(hi) << 16);
}
__device__ __forceinline__ unsigned int join2(unsigned short lo, unsigned short hi) {
    return (unsigned int)lo | ((unsigned int)hi << 16);
}
// d += a * b
__device__ __forceinline__ void mma16816(float* d, const unsigned int* a, unsigned int b0, unsigned int b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A fragments (16 rows x 64 cols) from eight C tiles: pa[kc] covers columns 16kc..16kc+15.
__device__ __forceinline__ void c_to_a(unsigned int (*pa)[4], float (*s)[4]) {
#pragma unroll
    for (int kc = 0; kc < 4; kc++) {
        pa[kc][0] = pack2(s[2 * kc][0], s[2 * kc][1]);
        pa[kc][1] = pack2(s[2 * kc][2], s[2 * kc][3]);
        pa[kc][2] = pack2(s[2 * kc + 1][0], s[2 * kc + 1][1]);
        pa[kc][3] = pack2(s[2 * kc + 1][2], s[2 * kc + 1][3]);
    }
}

// q, k, v (or dO) as bf16 in a head-major layout (B, NH, T, HS), so that a tile is one contiguous
// block read with 16-byte loads: qkv (B, T, parts, NH, HS) fp32 -> dst (parts, B, NH, T, HS).
// Two elements per thread (HS is even).
extern "C" __global__ void heads_to_bf16_kernel(unsigned int* dst, const float* src, int B, int T, int parts, int NH, int HS) {
    long n = (long)B * NH * T * HS;
    long pairs = parts * n / 2;
    for (long k = (long)blockIdx.x * blockDim.x + threadIdx.x; k < pairs; k += (long)gridDim.x * blockDim.x) {
        long i = 2 * k;
        int part = i / n;
        long r = i % n;
        int d = r % HS; r /= HS;
        int t = r % T; r /= T;
        int h = r % NH; int b = r / NH;
        const float* x = src + (((long)b * T + t) * parts + part) * NH * HS + h * HS + d;
        dst[k] = pack2(x[0], x[1]);
    }
}

// Tile loads: 64 rows x HS bf16 of a head-major matrix, as 16-byte chunks, CH per thread
// (128 threads), into registers (the next tile is fetched while the current one computes) and
// then into shared memory with row stride HS + 8 halves.
template <int HS>
__device__ __forceinline__ void tile_fetch(uint4* reg, const unsigned short* src, int row0, int T) {
    const int CH = FA_TILE * HS / 8 / 128;
#pragma unroll
    for (int i = 0; i < CH; i++) {
        int ch = threadIdx.x + i * 128;
        int r = ch / (HS / 8), col = (ch % (HS / 8)) * 8;
        int row = row0 + r;
        uint4 z;
        z.x = z.y = z.z = z.w = 0u;
        reg[i] = row < T ? *(const uint4*)&src[(long)row * HS + col] : z;
    }
}
template <int HS>
__device__ __forceinline__ void tile_store(unsigned short* dst, const uint4* reg) {
    const int CH = FA_TILE * HS / 8 / 128, SK = HS + 8;
#pragma unroll
    for (int i = 0; i < CH; i++) {
        int ch = threadIdx.x + i * 128;
        int r = ch / (HS / 8), col = (ch % (HS / 8)) * 8;
        *(uint4*)&dst[r * SK + col] = reg[i];
    }
}

// A fragments of rows row0 + g and row0 + g + 8 of a head-major bf16 (T, HS) matrix.
template <int HS>
__device__ __forceinline__ void load_a_bf16(unsigned int (*fr)[4], const unsigned short* m, int row0, int T, int g, int tq) {
    int r0 = row0 + g, r1 = r0 + 8;
    bool v0 = r0 < T, v1 = r1 < T;
#pragma unroll
    for (int kc = 0; kc < HS / 16; kc++) {
        int d0 = kc * 16 + 2 * tq, d1 = d0 + 8;
        fr[kc][0] = v0 ? *(const unsigned int*)&m[(long)r0 * HS + d0] : 0u;
        fr[kc][1] = v1 ? *(const unsigned int*)&m[(long)r1 * HS + d0] : 0u;
        fr[kc][2] = v0 ? *(const unsigned int*)&m[(long)r0 * HS + d1] : 0u;
        fr[kc][3] = v1 ? *(const unsigned int*)&m[(long)r1 * HS + d1] : 0u;
    }
}

// grid (ceil(T/64), B*NH), block 128: 64 queries, 16 per warp. q16/k16/v16: head-major bf16.
template <int HS>
__device__ void flash_fwd(float* out, float* lse, const unsigned short* q16, const unsigned short* k16, const unsigned short* v16, int T, int NH) {
    const int SK = HS + 8, CH = FA_TILE * HS / 8 / 128;
    __shared__ __align__(16) unsigned short Ks[FA_TILE * (HS + 8)];
    __shared__ __align__(16) unsigned short Vs[FA_TILE * (HS + 8)];
    const int C = NH * HS;
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, tq = lane & 3;
    const int q0 = blockIdx.x * FA_TILE + warp * 16;
    const int r0 = q0 + g, r1 = r0 + 8;
    const long head = (long)bh * T * HS;
    unsigned int qa[HS / 16][4];
    load_a_bf16<HS>(qa, q16 + head, q0, T, g, tq);
    float o[HS / 8][4];
#pragma unroll
    for (int n = 0; n < HS / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.0f, l1 = 0.0f;  // base-2 units
    const float sl2 = rsqrtf((float)HS) * LOG2E;
    const int last = min(blockIdx.x * FA_TILE + FA_TILE - 1, T - 1) / FA_TILE;
    uint4 kreg[CH], vreg[CH];
    tile_fetch<HS>(kreg, k16 + head, 0, T);
    tile_fetch<HS>(vreg, v16 + head, 0, T);
    for (int kt = 0; kt <= last; kt++) {
        __syncthreads();
        tile_store<HS>(Ks, kreg);
        tile_store<HS>(Vs, vreg);
        __syncthreads();
        if (kt < last) {
            tile_fetch<HS>(kreg, k16 + head, (kt + 1) * FA_TILE, T);
            tile_fetch<HS>(vreg, v16 + head, (kt + 1) * FA_TILE, T);
        }
        if (kt * FA_TILE > q0 + 15) continue;  // every key of the tile is after this warp's queries
        float s[8][4];
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
            for (int kc = 0; kc < HS / 16; kc++) {
                const unsigned short* kr = &Ks[(nt * 8 + g) * SK + kc * 16 + 2 * tq];
                mma16816(s[nt], qa[kc], *(const unsigned int*)kr, *(const unsigned int*)(kr + 8));
            }
        }
        float mx0 = NEG_INF, mx1 = NEG_INF;
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int key = kt * FA_TILE + nt * 8 + 2 * tq + (e & 1);
                int row = e < 2 ? r0 : r1;
                float v = s[nt][e] * sl2;
                if (key > row || key >= T) v = NEG_INF;
                s[nt][e] = v;
                if (e < 2) mx0 = fmaxf(mx0, v);
                else mx1 = fmaxf(mx1, v);
            }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 2));
        float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        // A row with no key yet keeps max -inf: nothing to rescale, every p is 0.
        float a0 = mn0 == NEG_INF ? 1.0f : exp2f(m0 - mn0);
        float a1 = mn1 == NEG_INF ? 1.0f : exp2f(m1 - mn1);
        l0 *= a0;
        l1 *= a1;
#pragma unroll
        for (int n = 0; n < HS / 8; n++) {
            o[n][0] *= a0; o[n][1] *= a0; o[n][2] *= a1; o[n][3] *= a1;
        }
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float mn = e < 2 ? mn0 : mn1;
                float p = (mn == NEG_INF || s[nt][e] == NEG_INF) ? 0.0f : exp2f(s[nt][e] - mn);
                if (e < 2) l0 += p;
                else l1 += p;
                s[nt][e] = p;
            }
        }
        unsigned int pa[4][4];
        c_to_a(pa, s);
#pragma unroll
        for (int on = 0; on < HS / 8; on++) {
#pragma unroll
            for (int kc = 0; kc < 4; kc++) {
                int kr = kc * 16 + 2 * tq, col = on * 8 + g;
                unsigned int b0 = join2(Vs[kr * SK + col], Vs[(kr + 1) * SK + col]);
                unsigned int b1 = join2(Vs[(kr + 8) * SK + col], Vs[(kr + 9) * SK + col]);
                mma16816(o[on], pa[kc], b0, b1);
            }
        }
        m0 = mn0;
        m1 = mn1;
    }
    l0 += __shfl_xor_sync(0xffffffff, l0, 1);
    l0 += __shfl_xor_sync(0xffffffff, l0, 2);
    l1 += __shfl_xor_sync(0xffffffff, l1, 1);
    l1 += __shfl_xor_sync(0xffffffff, l1, 2);
    float i0 = 1.0f / l0, i1 = 1.0f / l1;
    float* ob = out + (long)b * T * C + h * HS;
#pragma unroll
    for (int on = 0; on < HS / 8; on++) {
        int d = on * 8 + 2 * tq;
        if (r0 < T) { ob[(long)r0 * C + d] = o[on][0] * i0; ob[(long)r0 * C + d + 1] = o[on][1] * i0; }
        if (r1 < T) { ob[(long)r1 * C + d] = o[on][2] * i1; ob[(long)r1 * C + d + 1] = o[on][3] * i1; }
    }
    if (tq == 0) {
        if (r0 < T) lse[(long)bh * T + r0] = (m0 + log2f(l0)) * LN2;
        if (r1 < T) lse[(long)bh * T + r1] = (m1 + log2f(l1)) * LN2;
    }
}

extern "C" __global__ void __launch_bounds__(128) flash_fwd_64_kernel(float* out, float* lse, const unsigned short* q16, const unsigned short* k16, const unsigned short* v16, int T, int NH) {
    flash_fwd<64>(out, lse, q16, k16, v16, T, NH);
}
extern "C" __global__ void __launch_bounds__(128) flash_fwd_128_kernel(float* out, float* lse, const unsigned short* q16, const unsigned short* k16, const unsigned short* v16, int T, int NH) {
    flash_fwd<128>(out, lse, q16, k16, v16, T, NH);
}

// D (B, NH, T) = rowsum(dout * out) per head: one warp per (b, h, t).
extern "C" __global__ void flash_rowdot_kernel(float* D, const float* dout, const float* out, int B, int T, int NH, int HS) {
    long row = ((long)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    int lane = threadIdx.x % WARP;
    if (row >= (long)B * NH * T) return;
    int t = row % T;
    long bh = row / T;
    int h = bh % NH, b = bh / NH;
    long off = ((long)b * T + t) * NH * HS + h * HS;
    float s = 0.0f;
    for (int d = lane; d < HS; d += WARP) s += dout[off + d] * out[off + d];
    s = warp_sum(s);
    if (lane == 0) D[row] = s;
}

// grid (ceil(T/64), B*NH), block 128: 64 keys, 16 per warp; loops over the query tiles at or
// after its key tile. dqkv must be zeroed first: dQ is accumulated with atomics (blocks of
// several key tiles add to the same queries); dK and dV are stored. q16/k16/v16/g16 (dO):
// head-major bf16. Dynamic shared memory: flash_bwd_smem on the host.
template <int HS>
__device__ void flash_bwd(float* dqkv, const unsigned short* q16, const unsigned short* k16, const unsigned short* v16, const unsigned short* g16, const float* lse, const float* Dg, int T, int NH) {
    extern __shared__ __align__(16) unsigned char smem[];
    const int SK = HS + 8, SS = FA_TILE + 8, CH = FA_TILE * HS / 8 / 128;
    unsigned short* Qs = (unsigned short*)smem;
    unsigned short* Gs = Qs + FA_TILE * SK;
    unsigned short* Ks = Gs + FA_TILE * SK;
    unsigned short* Ss = Ks + FA_TILE * SK;
    float* Ls = (float*)(Ss + FA_TILE * SS);
    float* Ds = Ls + FA_TILE;
    const int C = NH * HS, C3 = 3 * C;
    const int bh = blockIdx.y, b = bh / NH, h = bh % NH;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, tq = lane & 3;
    const int kb = blockIdx.x;
    const int k0 = kb * FA_TILE + warp * 16;
    const long head = (long)bh * T * HS;
    float* dbase = dqkv + (long)b * T * C3 + h * HS;
    uint4 qreg[CH], greg[CH];
    tile_fetch<HS>(qreg, k16 + head, kb * FA_TILE, T);
    tile_store<HS>(Ks, qreg);
    unsigned int ka[HS / 16][4], va[HS / 16][4];
    load_a_bf16<HS>(ka, k16 + head, k0, T, g, tq);
    load_a_bf16<HS>(va, v16 + head, k0, T, g, tq);
    float dk[HS / 8][4], dv[HS / 8][4];
#pragma unroll
    for (int n = 0; n < HS / 8; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[n][e] = dv[n][e] = 0.0f;
    const float scale = rsqrtf((float)HS), sl2 = scale * LOG2E;
    const int nqt = (T + FA_TILE - 1) / FA_TILE;
    tile_fetch<HS>(qreg, q16 + head, kb * FA_TILE, T);
    tile_fetch<HS>(greg, g16 + head, kb * FA_TILE, T);
    for (int qt = kb; qt < nqt; qt++) {
        __syncthreads();
        tile_store<HS>(Qs, qreg);
        tile_store<HS>(Gs, greg);
        for (int r = threadIdx.x; r < FA_TILE; r += blockDim.x) {
            int q = qt * FA_TILE + r;
            Ls[r] = q < T ? lse[(long)bh * T + q] * LOG2E : 0.0f;
            Ds[r] = q < T ? Dg[(long)bh * T + q] : 0.0f;
        }
        __syncthreads();
        if (qt + 1 < nqt) {
            tile_fetch<HS>(qreg, q16 + head, (qt + 1) * FA_TILE, T);
            tile_fetch<HS>(greg, g16 + head, (qt + 1) * FA_TILE, T);
        }
        // S^T (16 keys x 64 queries) = K Q^T and dP^T = V dO^T
        float st[8][4], dpt[8][4];
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) st[nt][e] = dpt[nt][e] = 0.0f;
#pragma unroll
            for (int kc = 0; kc < HS / 16; kc++) {
                const unsigned short* qr = &Qs[(nt * 8 + g) * SK + kc * 16 + 2 * tq];
                mma16816(st[nt], ka[kc], *(const unsigned int*)qr, *(const unsigned int*)(qr + 8));
                const unsigned short* gr = &Gs[(nt * 8 + g) * SK + kc * 16 + 2 * tq];
                mma16816(dpt[nt], va[kc], *(const unsigned int*)gr, *(const unsigned int*)(gr + 8));
            }
        }
        // P^T = exp(s - lse), causal; dS^T = P^T (dP^T - D)
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int key = k0 + g + (e >= 2 ? 8 : 0);
                int qi = nt * 8 + 2 * tq + (e & 1);
                int q = qt * FA_TILE + qi;
                float p = (q < key || q >= T || key >= T) ? 0.0f : exp2f(st[nt][e] * sl2 - Ls[qi]);
                st[nt][e] = p;
                dpt[nt][e] = p * (dpt[nt][e] - Ds[qi]);
            }
        }
        unsigned int pa[4][4], sa[4][4];
        c_to_a(pa, st);
        c_to_a(sa, dpt);
        // dV += P^T dO ; dK += dS^T Q (scaled at the end)
#pragma unroll
        for (int on = 0; on < HS / 8; on++) {
#pragma unroll
            for (int kc = 0; kc < 4; kc++) {
                int qr = kc * 16 + 2 * tq, col = on * 8 + g;
                mma16816(dv[on], pa[kc], join2(Gs[qr * SK + col], Gs[(qr + 1) * SK + col]), join2(Gs[(qr + 8) * SK + col], Gs[(qr + 9) * SK + col]));
                mma16816(dk[on], sa[kc], join2(Qs[qr * SK + col], Qs[(qr + 1) * SK + col]), join2(Qs[(qr + 8) * SK + col], Qs[(qr + 9) * SK + col]));
            }
        }
        // dS (queries x keys) into shared, bf16, for dQ = dS K
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int qi = nt * 8 + 2 * tq + (e & 1);
                int kl = warp * 16 + g + (e >= 2 ? 8 : 0);
                Ss[qi * SS + kl] = (unsigned short)f2bf(dpt[nt][e]);
            }
        }
        __syncthreads();
        // dQ (this warp's 16 queries x HS) = dS (16 x 64 keys) K (64 keys x HS) * scale
        float dq[HS / 8][4];
#pragma unroll
        for (int n = 0; n < HS / 8; n++) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;
#pragma unroll
        for (int kc = 0; kc < 4; kc++) {
            unsigned int a[4];
            const unsigned short* sr = &Ss[(warp * 16 + g) * SS + kc * 16 + 2 * tq];
            a[0] = *(const unsigned int*)sr;
            a[1] = *(const unsigned int*)(sr + 8 * SS);
            a[2] = *(const unsigned int*)(sr + 8);
            a[3] = *(const unsigned int*)(sr + 8 * SS + 8);
#pragma unroll
            for (int on = 0; on < HS / 8; on++) {
                int kr = kc * 16 + 2 * tq, col = on * 8 + g;
                mma16816(dq[on], a, join2(Ks[kr * SK + col], Ks[(kr + 1) * SK + col]), join2(Ks[(kr + 8) * SK + col], Ks[(kr + 9) * SK + col]));
            }
        }
        int qa0 = qt * FA_TILE + warp * 16 + g, qa1 = qa0 + 8;
#pragma unroll
        for (int on = 0; on < HS / 8; on++) {
            int d = on * 8 + 2 * tq;
            if (qa0 < T) { atomicAdd(&dbase[(long)qa0 * C3 + d], dq[on][0] * scale); atomicAdd(&dbase[(long)qa0 * C3 + d + 1], dq[on][1] * scale); }
            if (qa1 < T) { atomicAdd(&dbase[(long)qa1 * C3 + d], dq[on][2] * scale); atomicAdd(&dbase[(long)qa1 * C3 + d + 1], dq[on][3] * scale); }
        }
    }
    int ka0 = k0 + g, ka1 = ka0 + 8;
#pragma unroll
    for (int on = 0; on < HS / 8; on++) {
        int d = on * 8 + 2 * tq;
        if (ka0 < T) {
            dbase[(long)ka0 * C3 + C + d] = dk[on][0] * scale; dbase[(long)ka0 * C3 + C + d + 1] = dk[on][1] * scale;
            dbase[(long)ka0 * C3 + 2 * C + d] = dv[on][0]; dbase[(long)ka0 * C3 + 2 * C + d + 1] = dv[on][1];
        }
        if (ka1 < T) {
            dbase[(long)ka1 * C3 + C + d] = dk[on][2] * scale; dbase[(long)ka1 * C3 + C + d + 1] = dk[on][3] * scale;
            dbase[(long)ka1 * C3 + 2 * C + d] = dv[on][2]; dbase[(long)ka1 * C3 + 2 * C + d + 1] = dv[on][3];
        }
    }
}

extern "C" __global__ void __launch_bounds__(128) flash_bwd_64_kernel(float* dqkv, const unsigned short* q16, const unsigned short* k16, const unsigned short* v16, const unsigned short* g16, const float* lse, const float* D, int T, int NH) {
    flash_bwd<64>(dqkv, q16, k16, v16, g16, lse, D, T, NH);
}
extern "C" __global__ void __launch_bounds__(128) flash_bwd_128_kernel(float* dqkv, const unsigned short* q16, const unsigned short* k16, const unsigned short* v16, const unsigned short* g16, const float* lse, const float* D, int T, int NH) {
    flash_bwd<128>(dqkv, q16, k16, v16, g16, lse, D, T, NH);
}
