// One token through a whole Mamba-1 language model (every block, the final norm and lm_head) in one
// persistent kernel, batch 1. See mambavlm/ops/mamba_stack_step.py for the design and its measurements.
//
// Compile-time shape (nvcc -D...): MODEL_DIM (D), INNER_DIM (Di), STATE_DIM (N), DT_RANK (R), CONV_WIDTH (W),
// WEIGHT_T (__nv_bfloat16, __half or float); the build: CONSUMER_WARPS, STAGE_KB and RING_STAGES (the
// ring of shared-memory stages), MAX_CHANNELS (per block), GEMV_UNROLL (stages a consumer warp takes at a time),
// L2_AHEAD_KB and L2_HINTS (the producer's L2 prefetch past the ring, and its eviction hints).
//
// Each block (one per SM) owns a run of channels (a multiple of 8), a run of out_proj rows and a run of
// vocabulary rows. A producer warp streams that block's weight rows (in_proj's x rows, its z rows, out_proj's
// rows, layer after layer, then lm_head's) through the ring with 1-D bulk copies (cp.async.bulk, completed on
// mbarriers), and keeps the HBM fetching L2_AHEAD_KB further into the L2; the consumer warps take matrix-vector
// products from the ring. A layer's small per-channel operands (x_proj's transposed rows, dt_proj's rows, the
// conv weights, A / dt's bias / D / the conv bias, the norm weight) and the conv and SSM states arrive by seven
// more bulk copies, issued a layer ahead (in the greedy loop, after a proxy fence once a step: a bulk copy is the
// async proxy and must see the previous token's generic state writes).
//
// With `embedding` (greedy decoding), one launch runs `steps` tokens: each step's blocks publish their argmax
// keys (atomic max, then a release add on the step's count), and every block embeds the winner as the next
// step's residual stream, while the producer streams on into the next token's weights.
//
// No grid-wide barrier: what crosses blocks travels as flagged words (NCCL's LL protocol), each 64-bit word
// 32 bits of data and a 32-bit flag naming the launch and the layer, stored and loaded whole (single-copy
// atomic), so a reader polls the data itself and one L2 round trip both synchronizes and delivers it: the gated
// output y and the residual stream. x_proj's split-K sums are 64-bit atomic adds of fixed-point values
// (2^-XACC_SHIFT, so |x_proj's outputs| < 2^(55 - XACC_SHIFT)) above an arrival count in the low 8 bits: a
// word is whole when its count reaches the grid's size (< 256), and the sums do not depend on the order the
// blocks add in; each word has a 128-byte line of its own (XACC_STRIDE). The producer never waits on any of it,
// so the HBM keeps streaming the next phase's weights while the consumers wait.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#ifndef WEIGHT_T
#error "define WEIGHT_T"
#endif

typedef WEIGHT_T T;

constexpr int D = MODEL_DIM;
constexpr int DI = INNER_DIM;
constexpr int N = STATE_DIM;
constexpr int R = DT_RANK;
constexpr int W = CONV_WIDTH;
constexpr int R2 = R + 2 * N;
constexpr int PACK = N + 4;  // per channel, float32: A (N), dt_bias, D, conv bias, 0
#ifndef CONSUMER_WARPS
#define CONSUMER_WARPS 8
#endif
constexpr int NW = CONSUMER_WARPS;  // consumer warps
constexpr int CONSUMERS = 32 * NW;
constexpr int THREADS = CONSUMERS + 32;  // + the producer warp
constexpr int ES = sizeof(T);
constexpr int EPV = 16 / ES;  // elements per 16-byte vector
#ifndef STAGE_KB
#define STAGE_KB 40
#endif
constexpr int STAGE_BYTES = STAGE_KB * 1024;
#ifndef MAX_CHANNELS
#define MAX_CHANNELS 48  // per block
#endif
constexpr int MAX_PARTIALS = 1024;
constexpr int SMEM_LIMIT = 227 * 1024;

static_assert(DI % 8 == 0, "inner dim must be a multiple of 8");
static_assert(N <= 32, "state dim must fit a warp");
static_assert(D * ES <= STAGE_BYTES && DI * ES <= STAGE_BYTES, "a weight row must fit one stage");

// the most rows of `row_bytes` a stage holds that divide the consumer warps (each row split over NW / S warps)
constexpr int rows_per_stage(int row_bytes) {
  int s = NW;
  while (s > 1 && (s * row_bytes > STAGE_BYTES || NW % s != 0)) --s;
  return s;
}

constexpr int S_IN = rows_per_stage(D * ES);    // in_proj and lm_head rows per stage
constexpr int S_OUT = rows_per_stage(DI * ES);  // out_proj rows per stage

// shared memory, in bytes from the dynamic base
constexpr int SMALL_XP = 0;                                        // x_proj's transpose's rows (nc, R2), T
constexpr int SMALL_DT = SMALL_XP + R2 * MAX_CHANNELS * ES;        // dt_proj rows (nc, R), T
constexpr int SMALL_CW = SMALL_DT + MAX_CHANNELS * R * ES;         // conv weights (nc, W), T
constexpr int SMALL_CS = SMALL_CW + MAX_CHANNELS * W * ES;         // conv state (nc, W), T
constexpr int SMALL_PK = SMALL_CS + MAX_CHANNELS * W * ES;         // packed (nc, PACK), float
constexpr int SMALL_H = SMALL_PK + MAX_CHANNELS * PACK * 4;        // ssm state (nc, N), float
constexpr int MAX_OWN = 64;  // out_proj rows per block
constexpr int PART_FLOATS = MAX_PARTIALS > NW * R2 ? MAX_PARTIALS : NW * R2;
constexpr int SMALL_NW = SMALL_H + MAX_CHANNELS * N * 4;           // the block's RMSNorm weight (D,), T
constexpr int PART = ((SMALL_NW + D * ES) + 127) / 128 * 128;       // partial sums, float
constexpr int OWN = PART + PART_FLOATS * 4;                        // this block's residual rows, float
constexpr int XC = OWN + MAX_OWN * 4;                              // conv output (nc), float
constexpr int ZG = XC + MAX_CHANNELS * 4;                          // gate z (nc), float
constexpr int YS = ZG + MAX_CHANNELS * 4;                          // y (nc), T
constexpr int XDBL = YS + MAX_CHANNELS * 4;                        // dt_low | B | C, float
constexpr int RED = XDBL + R2 * 4;                                 // reduction scratch (NW), float
constexpr int TOKEN = (RED + NW * 4 + 7) / 8 * 8;                   // the step's token (greedy), long long
constexpr int BARS = (TOKEN + 8 + 15) / 16 * 16;                   // mbarriers
constexpr int RING_MAX_STAGES = 24;
constexpr int RING = (BARS + (2 * RING_MAX_STAGES + 1) * 8 + 1023) / 1024 * 1024;  // + the small operands' barrier
constexpr int STAGES_FIT = (SMEM_LIMIT - RING) / STAGE_BYTES;
#ifdef RING_STAGES
constexpr int STAGES = RING_STAGES;
#else
constexpr int STAGES = STAGES_FIT < RING_MAX_STAGES ? STAGES_FIT : RING_MAX_STAGES;
#endif
constexpr int SMEM_BYTES = RING + STAGES * STAGE_BYTES;
static_assert(STAGES >= 2 && STAGES <= STAGES_FIT, "the ring's stages do not fit the shared memory");

struct Layer {
  const T* in_proj;    // (2 Di, D)
  const T* out_proj;   // (D, Di)
  const T* x_proj_t;   // (Di, R2): x_proj's transpose
  const T* dt_proj;    // (Di, R)
  const T* conv_w;     // (Di, W)
  const T* norm_w;     // (D,)
  T* conv_state;       // (Di, W), oldest first
  float* ssm_state;    // (Di, N)
  const float* packed; // (Di, PACK)
};

struct Args {
  const Layer* layers;
  int steps;         // tokens this launch: 1 without `embedding`; with it, greedy tokens one after another
  int n_layers;
  const T* norm_f;   // (D,)
  const T* lm_head;  // (V, D)
  int vocab;
  float eps;
  float eps_f;
  float* residual;   // (D,) float32, in: the token's embedding; out: the final residual stream
  float* logits;     // (V,) float32
  unsigned long long* ybuf;  // (Di * ES / 4,) flagged words: y
  unsigned long long* rbuf;  // (D,) flagged words: the residual stream
  unsigned long long* xacc;  // (n_layers, R2, XACC_STRIDE): sums and counts in [..., 0], zero between launches
  unsigned* sync;    // [0]: blocks done (zero between launches), [1]: tokens so far (the flags' epoch)
  // greedy decoding in the kernel (null `embedding`: one step from `residual`): step j embeds token j (token_in
  // for j = 0), and its logits' argmax is tokens_out[j]; the argmax's key and arrival count in amax[j * AMAX_STRIDE]
  // and amax[j * AMAX_STRIDE + AMAX_STRIDE / 2], zero between launches
  const T* embedding;            // (V, D)
  const long long* token_in;     // (1,)
  long long* tokens_out;         // (steps,)
  unsigned long long* amax;      // (steps, AMAX_STRIDE)
};

__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
  asm volatile(
      "{\n .reg .pred p;\n WAIT_%=:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      " @!p bra WAIT_%=;\n}" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar))
      : "memory");
}
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(CONSUMERS) : "memory"); }

#ifndef GEMV_UNROLL
#define GEMV_UNROLL 1
#endif
constexpr int EPW = 4 / ES;  // elements of T per flagged word
#ifndef XACC_SHIFT
#define XACC_SHIFT 30
#endif
// 64-bit words from one x_proj sum to the next: one sum to a 128-byte L2 line. Packed (R2 sums in 12 lines for
// MambaVLM-2.8B), the grid's 132 x R2 atomic adds queued on 12 lines; a line each took the step to 0.971 of the
// packed layout's time, 32 bytes each 0.992 (benchmarks/RESULTS.md a14).
constexpr int XACC_STRIDE = 16;
// 64-bit words from one step's argmax slot to the next: its key and its count each on a 128-byte line of its own
constexpr int AMAX_STRIDE = 32;

// The argmax's key: a float's bits mapped to an unsigned order (NaN above everything, as torch.argmax takes NaN
// for the maximum) above the complement of its index, so the largest key is the largest value at its first index.
__device__ __forceinline__ unsigned long long argmax_key(float v, int index) {
  const unsigned b = __float_as_uint(v);
  const unsigned order = v != v ? 0xffffffffu : (b & 0x80000000u) ? ~b : b | 0x80000000u;
  return (static_cast<unsigned long long>(order) << 32) | (0xffffffffu - static_cast<unsigned>(index));
}
__device__ __forceinline__ long long argmax_index(unsigned long long key) {
  return static_cast<long long>(0xffffffffu - static_cast<unsigned>(key));
}

__device__ __forceinline__ void store_word(unsigned long long* p, unsigned data, unsigned flag) {
  const unsigned long long w = (static_cast<unsigned long long>(flag) << 32) | data;
  asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(w) : "memory");
}
__device__ __forceinline__ void load_words(const unsigned long long* p, unsigned long long& a, unsigned long long& b) {
  asm volatile("ld.relaxed.gpu.global.v2.u64 {%0, %1}, [%2];" : "=l"(a), "=l"(b) : "l"(p) : "memory");
}
// Four flagged words at p (32-byte aligned) into d; true if all four carry `flag`.
__device__ __forceinline__ bool load_group(const unsigned long long* p, unsigned flag, unsigned d[4]) {
  unsigned long long a, b, c, e;
  load_words(p, a, b);
  load_words(p + 2, c, e);
  d[0] = static_cast<unsigned>(a);
  d[1] = static_cast<unsigned>(b);
  d[2] = static_cast<unsigned>(c);
  d[3] = static_cast<unsigned>(e);
  return static_cast<unsigned>(a >> 32) == flag && static_cast<unsigned>(b >> 32) == flag &&
         static_cast<unsigned>(c >> 32) == flag && static_cast<unsigned>(e >> 32) == flag;
}

__device__ __forceinline__ float to_f(T v) {
  if constexpr (sizeof(T) == 4) {
    return v;
  } else {
    return static_cast<float>(v);
  }
}
__device__ __forceinline__ float round_t(float v) { return to_f(static_cast<T>(v)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

struct Ring {
  char* buf;
  uint64_t* full;
  uint64_t* empty;
  int stage;
  unsigned phase;
  __device__ __forceinline__ void advance() {
    if (++stage == STAGES) {
      stage = 0;
      phase ^= 1u;
    }
  }
};

// What one block streams for a token, in order: per layer its in_proj x rows, its z rows, its out_proj rows;
// then its lm_head rows; and again for the next token. Segment k's (of a token's) first byte and length.
struct Stream {
  const Args* args;
  int steps;  // tokens
  int c0, nc, o0, no, v0, nv;
  __device__ __forceinline__ int segments() const { return 3 * args->n_layers + 1; }
  __device__ __forceinline__ const char* base(int k) const {
    if (k == 3 * args->n_layers) return reinterpret_cast<const char*>(args->lm_head + static_cast<size_t>(v0) * D);
    const Layer& L = args->layers[k / 3];
    switch (k % 3) {
      case 0: return reinterpret_cast<const char*>(L.in_proj + static_cast<size_t>(c0) * D);
      case 1: return reinterpret_cast<const char*>(L.in_proj + static_cast<size_t>(DI + c0) * D);
      default: return reinterpret_cast<const char*>(L.out_proj + static_cast<size_t>(o0) * DI);
    }
  }
  __device__ __forceinline__ long long bytes(int k) const {
    if (k == 3 * args->n_layers) return static_cast<long long>(nv) * D * ES;
    return k % 3 == 2 ? static_cast<long long>(no) * DI * ES : static_cast<long long>(nc) * D * ES;
  }
};

#ifndef L2_AHEAD_KB
#define L2_AHEAD_KB 0
#endif
#ifndef L2_HINTS
#define L2_HINTS 0
#endif
constexpr long long L2_AHEAD = static_cast<long long>(L2_AHEAD_KB) * 1024;
constexpr unsigned PREFETCH_CHUNK = 16 * 1024;

__device__ __forceinline__ void prefetch_l2(const void* src, unsigned bytes, uint64_t policy) {
#if L2_HINTS
  asm volatile("cp.async.bulk.prefetch.L2.global.L2::cache_hint [%0], %1, %2;" ::"l"(src), "r"(bytes), "l"(policy)
               : "memory");
#else
  (void)policy;
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(bytes) : "memory");
#endif
}
__device__ __forceinline__ void bulk_copy_hint(void* dst, const void* src, unsigned bytes, uint64_t* bar,
                                               uint64_t policy) {
#if L2_HINTS
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::"r"(
          smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar)), "l"(policy)
      : "memory");
#else
  (void)policy;
  bulk_copy(dst, src, bytes, bar);
#endif
}

// The L2 prefetch cursor: keeps the HBM streaming the block's rows L2_AHEAD bytes past what the ring has asked
// for, so that the stream does not stop while the consumers work between products and the ring is full.
struct Ahead {
  int k = 0;       // segment of the token
  int token = 0;   // of the launch's steps
  long long off = 0;
  long long lead = 0;  // bytes prefetched past the ring's last copy
  uint64_t policy = 0;
  __device__ __forceinline__ void fill(const Stream& st) {
    const int segs = st.segments();
    while (lead < L2_AHEAD && token < st.steps) {
      const long long left = st.bytes(k) - off;
      const unsigned n = static_cast<unsigned>(left < PREFETCH_CHUNK ? left : PREFETCH_CHUNK);
      if (n > 0) prefetch_l2(st.base(k) + off, n, policy);
      off += n;
      lead += n;
      if (off == st.bytes(k)) {
        off = 0;
        if (++k == segs) {
          k = 0;
          ++token;
        }
      }
    }
  }
};

// The producer: stream every segment through the ring, S rows a stage.
__device__ void produce_all(Ring& ring, const Stream& st) {
  const int segs = st.segments();
  Ahead ahead;
  uint64_t evict_first = 0;
#if L2_HINTS
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(ahead.policy));
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(evict_first));
#endif
  if constexpr (L2_AHEAD > 0) ahead.fill(st);
  for (int j = 0; j < st.steps; ++j) {
    for (int k = 0; k < segs; ++k) {
      constexpr int row_bytes = D * ES;
      const bool out_rows = k % 3 == 2 && k != segs - 1;
      const int rb = out_rows ? DI * ES : row_bytes;
      const int per_stage = out_rows ? S_OUT : S_IN;
      const char* src = st.base(k);
      const int rows = static_cast<int>(st.bytes(k) / rb);
      for (int r = 0; r < rows; r += per_stage) {
        const int n = rows - r < per_stage ? rows - r : per_stage;
        mbar_wait(&ring.empty[ring.stage], ring.phase ^ 1u);
        mbar_expect_tx(&ring.full[ring.stage], n * rb);
        bulk_copy_hint(ring.buf + ring.stage * STAGE_BYTES, src + static_cast<size_t>(r) * rb, n * rb,
                       &ring.full[ring.stage], evict_first);
        ring.advance();
        if constexpr (L2_AHEAD > 0) {
          ahead.lead -= n * rb;
          ahead.fill(st);
        }
      }
    }
  }
}

// The consumers' matrix-vector product of a segment of `rows` rows of K elements (S rows per stage, each row
// split in P parts over warps): partial[row * P + part] = that part's dot with the activation slice `act`.
template <int K, int S>
struct Gemv {
  static constexpr int P = NW / S;
  static constexpr int KP = K / P;
  static constexpr int VECS = KP / EPV;        // 16-byte vectors per part
  static constexpr int VPL = (VECS + 31) / 32;  // per lane, the last lanes' last one masked where VECS % 32
  static_assert(K % P == 0 && KP % EPV == 0, "row parts must be whole 16-byte vectors");

  __device__ __forceinline__ static bool has(int lane, int i) { return VECS % 32 == 0 || lane + 32 * i < VECS; }

  float act[VPL * EPV];

  __device__ __forceinline__ int index(int part, int lane, int i, int e) const {
    return part * KP + (lane + 32 * i) * EPV + e;
  }

  // act = RMSNorm(residual) * weight over the part's slice, rounded to T. The residual is the flagged words
  // carrying `flag` (polled in the L2); without words, the token's embedding row `emb` or else `plain` (both
  // written before the launch).
  __device__ __forceinline__ void load_norm(const float* plain, const T* emb, const unsigned long long* words,
                                            unsigned flag, const T* weight, float eps, float* red, int warp,
                                            int lane) {
    const int part = warp / S;
    static_assert(VPL * EPV / 4 <= 32, "a lane's residual slice must fit a 32-bit mask of groups");
    if (words == nullptr && emb != nullptr) {
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
        const uint4 raw = has(lane, i) ? *reinterpret_cast<const uint4*>(emb + index(part, lane, i, 0)) : uint4{};
        const T* x = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int e = 0; e < EPV; ++e) act[i * EPV + e] = to_f(x[e]);
      }
    } else if (words == nullptr) {
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
#pragma unroll
        for (int e = 0; e < EPV; e += 4) {
          const float4 v = has(lane, i) ? *reinterpret_cast<const float4*>(plain + index(part, lane, i, e))
                                        : make_float4(0, 0, 0, 0);
          act[i * EPV + e] = v.x;
          act[i * EPV + e + 1] = v.y;
          act[i * EPV + e + 2] = v.z;
          act[i * EPV + e + 3] = v.w;
        }
      }
    } else {
      unsigned pending = 0;
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
        if (has(lane, i)) {
          pending |= ((1u << (EPV / 4)) - 1u) << (i * EPV / 4);
        } else {
#pragma unroll
          for (int e = 0; e < EPV; ++e) act[i * EPV + e] = 0.f;
        }
      }
      // Group after group: ptxas checks a group's flags before it issues the next group's loads (SASS), so a
      // round of polls is up to four L2 round trips. Issuing a round's loads before any check waited less here
      // (3.4 us a layer against 4.7) but the step took 1.82-1.85 ms against 1.78: the time moved to the next
      // latency-bound wait (benchmarks/RESULTS.md a12), as it did with one warp polling done words first.
      while (pending) {
        const unsigned snap = pending;
#pragma unroll
        for (int i = 0; i < VPL; ++i) {
#pragma unroll
          for (int e = 0; e < EPV; e += 4) {
            const unsigned bit = 1u << (i * EPV / 4 + e / 4);
            if (snap & bit) {
              unsigned d[4];
              if (load_group(words + index(part, lane, i, e), flag, d)) {
#pragma unroll
                for (int q = 0; q < 4; ++q) act[i * EPV + e + q] = __uint_as_float(d[q]);
                pending &= ~bit;
              }
            }
          }
        }
      }
    }
    float sq = 0.f;
#pragma unroll
    for (int i = 0; i < VPL * EPV; ++i) sq = fmaf(act[i], act[i], sq);
    sq = warp_sum(sq);
    if constexpr (P > 1) {  // the parts' sums: one warp of each part
      if (lane == 0) red[warp] = sq;
      consumers_sync();
      sq = 0.f;
#pragma unroll
      for (int p = 0; p < P; ++p) sq += red[p * S];
      consumers_sync();
    }
    const float rstd = 1.f / sqrtf(sq / D + eps);
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      const uint4 raw = has(lane, i) ? *reinterpret_cast<const uint4*>(weight + index(part, lane, i, 0)) : uint4{};
      const T* w = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int e = 0; e < EPV; ++e) act[i * EPV + e] = round_t(act[i * EPV + e] * rstd * to_f(w[e]));
    }
  }

  // act = v over the part's slice, v a vector of T other blocks wrote as flagged words carrying `flag`
  // (EPW elements a word; polled in the L2)
  __device__ __forceinline__ void load_vector(const unsigned long long* words, unsigned flag, int warp, int lane) {
    const int part = warp / S;
    static_assert(VPL <= 32, "a lane's vectors must fit a 32-bit mask");
    unsigned pending = 0;
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      if (has(lane, i)) {
        pending |= 1u << i;
      } else {
#pragma unroll
        for (int e = 0; e < EPV; ++e) act[i * EPV + e] = 0.f;
      }
    }
    while (pending) {
      const unsigned snap = pending;
#pragma unroll
      for (int i = 0; i < VPL; ++i) {
        if (snap & (1u << i)) {
          unsigned d[4];  // one 16-byte vector of T: four words
          if (load_group(words + index(part, lane, i, 0) / EPW, flag, d)) {
            const T* x = reinterpret_cast<const T*>(d);
#pragma unroll
            for (int e = 0; e < EPV; ++e) act[i * EPV + e] = to_f(x[e]);
            pending &= ~(1u << i);
          }
        }
      }
    }
  }

  // this lane's products with one stage's tile of this warp's row part (two chains for the FMA latency)
  __device__ __forceinline__ float dot(const uint4* tile, int lane) const {
    float acc[2] = {0.f, 0.f};
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      const uint4 raw = has(lane, i) ? tile[32 * i] : uint4{};
      const T* w = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int e = 0; e < EPV; ++e) acc[e & 1] = fmaf(to_f(w[e]), act[i * EPV + e], acc[e & 1]);
    }
    return acc[0] + acc[1];
  }

  // U stages at a time: each is released as soon as its products are in registers, and the U warp sums
  // interleave, so a warp's shuffle latencies overlap instead of adding up stage after stage. Where all U
  // stages are whole and hold this warp's row, the loop runs without bounds checks (38 instructions a stage a
  // warp, not 50: the consumers' issue rate, not the HBM, bounds the products, benchmarks/RESULTS.md a13).
  __device__ __forceinline__ void run(Ring& ring, int rows, float* partial, int warp, int lane) {
    constexpr int U = GEMV_UNROLL;
    const int s = warp % S;
    const int part = warp / S;
    const char* mine = ring.buf + (s * K + part * KP) * ES + lane * 16;  // this lane's first vector in a stage
    for (int r = 0; r < rows; r += S * U) {
      float sums[U];
      if (r + S * U <= rows) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          mbar_wait(&ring.full[ring.stage], ring.phase);
          sums[u] = dot(reinterpret_cast<const uint4*>(mine + ring.stage * STAGE_BYTES), lane);
          __syncwarp();
          if (lane == 0) mbar_arrive(&ring.empty[ring.stage]);
          ring.advance();
        }
      } else {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          sums[u] = 0.f;
          const int first = r + u * S;
          if (first < rows) {
            mbar_wait(&ring.full[ring.stage], ring.phase);
            if (first + s < rows) sums[u] = dot(reinterpret_cast<const uint4*>(mine + ring.stage * STAGE_BYTES), lane);
            __syncwarp();
            if (lane == 0) mbar_arrive(&ring.empty[ring.stage]);
            ring.advance();
          }
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
        for (int u = 0; u < U; ++u) sums[u] += __shfl_xor_sync(0xffffffffu, sums[u], o);
      }
      if (lane == 0) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int row = r + u * S + s;
          if (row < rows) partial[row * P + part] = sums[u];
        }
      }
    }
  }

  // the row's sum over its parts, after a consumers_sync
  __device__ __forceinline__ static float total(const float* partial, int row) {
    float v = 0.f;
#pragma unroll
    for (int p = 0; p < P; ++p) v += partial[row * P + p];
    return v;
  }
};

constexpr int CPW = (MAX_CHANNELS + NW - 1) / NW;  // channels per consumer warp, at most
static_assert(MAX_CHANNELS <= CONSUMERS, "a block's channels must have a consumer thread each");
constexpr int RPL = (R2 + 31) / 32;                // x_proj outputs per lane

// GREEDY: greedy tokens from token_in, `steps` of them (ONE: one, its step count known at compile time, so
// without the loop's registers); otherwise one step from `residual`
template <bool GREEDY, bool ONE>
__global__ void __launch_bounds__(THREADS, 1) mamba_stack_step_kernel(const Args args) {
  extern __shared__ __align__(1024) char smem[];
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int G = gridDim.x;
  const int g = blockIdx.x;

  Stream st;
  st.args = &args;
  st.steps = GREEDY && !ONE ? args.steps : 1;
  const int groups = DI / 8;
  st.c0 = (g * groups / G) * 8;
  st.nc = ((g + 1) * groups / G) * 8 - st.c0;
  st.o0 = g * D / G;
  st.no = (g + 1) * D / G - st.o0;
  st.v0 = static_cast<int>(static_cast<long long>(g) * args.vocab / G);
  st.nv = static_cast<int>(static_cast<long long>(g + 1) * args.vocab / G) - st.v0;
  const int c0 = st.c0, nc = st.nc, o0 = st.o0, no = st.no, v0 = st.v0, nv = st.nv;

  Ring ring;
  ring.buf = smem + RING;
  ring.full = reinterpret_cast<uint64_t*>(smem + BARS);
  ring.empty = ring.full + RING_MAX_STAGES;
  ring.stage = 0;
  ring.phase = 0;
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&ring.full[s], 1);
      mbar_init(&ring.empty[s], NW);
    }
    mbar_init(ring.empty + RING_MAX_STAGES, 1);  // the small operands'
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == NW) {  // the producer
    if (lane == 0) produce_all(ring, st);
    return;
  }

  T* s_xp = reinterpret_cast<T*>(smem + SMALL_XP);
  T* s_dt = reinterpret_cast<T*>(smem + SMALL_DT);
  T* s_cw = reinterpret_cast<T*>(smem + SMALL_CW);
  T* s_cs = reinterpret_cast<T*>(smem + SMALL_CS);
  float* s_h = reinterpret_cast<float*>(smem + SMALL_H);
  float* s_pk = reinterpret_cast<float*>(smem + SMALL_PK);
  T* s_nw = reinterpret_cast<T*>(smem + SMALL_NW);
  float* partial = reinterpret_cast<float*>(smem + PART);
  float* own = reinterpret_cast<float*>(smem + OWN);
  float* xc = reinterpret_cast<float*>(smem + XC);
  float* zg = reinterpret_cast<float*>(smem + ZG);
  float* xdbl = reinterpret_cast<float*>(smem + XDBL);
  T* ys = reinterpret_cast<T*>(smem + YS);
  float* red = reinterpret_cast<float*>(smem + RED);
  long long* s_token = reinterpret_cast<long long*>(smem + TOKEN);
  // the flags: step j's layer l words carry (epoch + j) * (n_layers + 1) + l + 1 (mod 2^32), never those of the
  // token before, nor the zeros the buffers start with
  unsigned epoch;
  asm volatile("ld.relaxed.gpu.global.u32 %0, [%1];" : "=r"(epoch) : "l"(args.sync + 1) : "memory");
  const int nl = args.n_layers;
  constexpr bool greedy = GREEDY;
  const int steps = GREEDY && !ONE ? args.steps : 1;

  using GIn = Gemv<D, S_IN>;
  using GOut = Gemv<DI, S_OUT>;

  // a layer's small operands: x_proj's transposed rows, dt_proj's rows, conv weights and state, the packed
  // float32 table, the SSM state and the norm weight; seven 1-D bulk copies by one thread, completed on their
  // own mbarrier (every size a multiple of 16 bytes: c0 and nc are multiples of 8, D of 8), issued for layer
  // l + 1 once layer l's state update is done (greedy: layer 0's for the next step once this step's argmax is
  // out, behind every consumer thread's proxy fence, so that the copies (the async proxy) see this step's state
  // writes)
  uint64_t* small_bar = ring.empty + RING_MAX_STAGES;
  unsigned small_phase = 0;
  auto issue_small = [&](const Layer& L) {
    if (tid != 0) return;
    const unsigned xp = nc * R2 * ES, dt = nc * R * ES, cw = nc * W * ES, pk = nc * PACK * 4, h = nc * N * 4;
    mbar_expect_tx(small_bar, xp + dt + 2 * cw + pk + h + D * ES);
    bulk_copy(s_xp, L.x_proj_t + static_cast<size_t>(c0) * R2, xp, small_bar);
    bulk_copy(s_dt, L.dt_proj + static_cast<size_t>(c0) * R, dt, small_bar);
    bulk_copy(s_cw, L.conv_w + static_cast<size_t>(c0) * W, cw, small_bar);
    bulk_copy(s_cs, L.conv_state + static_cast<size_t>(c0) * W, cw, small_bar);
    bulk_copy(s_pk, L.packed + static_cast<size_t>(c0) * PACK, pk, small_bar);
    bulk_copy(s_h, L.ssm_state + static_cast<size_t>(c0) * N, h, small_bar);
    bulk_copy(s_nw, L.norm_w, D * ES, small_bar);
  };
  if (nl > 0) issue_small(args.layers[0]);

  for (int j = 0; j < steps; ++j) {
    const unsigned flag0 = (epoch + static_cast<unsigned>(j)) * static_cast<unsigned>(nl + 1) + 1u;
    if (greedy) {
      if (tid == 0) {
        long long token;
        if (j == 0) {
          token = *args.token_in;
        } else {  // the previous step's argmax, once every block's share is in
          const unsigned long long* slot = args.amax + static_cast<size_t>(j - 1) * AMAX_STRIDE;
          unsigned long long count, key;
          do {
            asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(count) : "l"(slot + AMAX_STRIDE / 2) : "memory");
          } while (count != static_cast<unsigned long long>(G));
          asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(key) : "l"(slot) : "memory");
          token = argmax_index(key);
          if (g == 0) args.tokens_out[j - 1] = token;
        }
        *s_token = token;
      }
      consumers_sync();
    }
    // the token's embedding row (greedy; else the residual written before the launch), from the shared token
    // where it is used rather than held across the step (registers are the kernel's limit)
    auto embedding = [&]() -> const T* {
      return greedy ? args.embedding + static_cast<size_t>(*s_token) * D : nullptr;
    };
    for (int o = tid; o < no; o += CONSUMERS) own[o] = greedy ? to_f(embedding()[o0 + o]) : args.residual[o0 + o];

    for (int l = 0; l < nl; ++l) {
      const Layer& L = args.layers[l];
      mbar_wait(small_bar, small_phase);  // this layer's small operands (issued during the previous layer)
      small_phase ^= 1u;
      // P1: RMSNorm, in_proj's x rows, the conv update, x_proj's share (split-K), in_proj's z rows
      GIn gin;
      gin.load_norm(args.residual, l == 0 ? embedding() : nullptr, l == 0 ? nullptr : args.rbuf, flag0 + l - 1, s_nw,
                    args.eps, red, warp, lane);
      if (g == 0 && l > 0) {  // every block has read layer l - 1's x_proj sums: zero them for the next step
        for (int r = tid; r < R2; r += CONSUMERS) args.xacc[((l - 1) * R2 + r) * XACC_STRIDE] = 0ull;
      }
      gin.run(ring, nc, partial, warp, lane);
      consumers_sync();
      if (tid < nc) {
        const int c = tid;
        const float x_new = round_t(GIn::total(partial, c));
        float out = s_pk[c * PACK + N + 2];  // conv bias
        T* state = L.conv_state + static_cast<size_t>(c0 + c) * W;
#pragma unroll
        for (int i = 0; i < W; ++i) {
          const float win = i + 1 < W ? to_f(s_cs[c * W + i + 1]) : x_new;
          state[i] = static_cast<T>(win);
          out = fmaf(win, to_f(s_cw[c * W + i]), out);
        }
        out = out / (1.f + expf(-out));  // SiLU
        xc[c] = round_t(out);
      }
      consumers_sync();
      {  // x_proj's share: warp w sums its channels (w, w + NW, ...) for every output, then the warps' sums
        float acc[RPL];
#pragma unroll
        for (int i = 0; i < RPL; ++i) acc[i] = 0.f;
#pragma unroll
        for (int k = 0; k < CPW; ++k) {
          const int c = warp + NW * k;
          if (c < nc) {
            const float x = xc[c];
#pragma unroll
            for (int i = 0; i < RPL; ++i) {
              const int r = lane + 32 * i;
              if (r < R2) acc[i] = fmaf(to_f(s_xp[c * R2 + r]), x, acc[i]);
            }
          }
        }
#pragma unroll
        for (int i = 0; i < RPL; ++i) {
          const int r = lane + 32 * i;
          if (r < R2) partial[warp * R2 + r] = acc[i];
        }
        consumers_sync();
        for (int r = tid; r < R2; r += CONSUMERS) {
          float v = 0.f;
#pragma unroll
          for (int w = 0; w < NW; ++w) v += partial[w * R2 + r];
          const long long q = __float2ll_rn(v * (1ll << XACC_SHIFT));  // fixed point; the count in the low byte
          asm volatile("red.relaxed.gpu.global.add.u64 [%0], %1;" ::"l"(args.xacc + (l * R2 + r) * XACC_STRIDE),
                       "l"((static_cast<unsigned long long>(q) << 8) + 1ull)
                       : "memory");
        }
      }
      consumers_sync();
      gin.run(ring, nc, partial, warp, lane);
      consumers_sync();
      for (int c = tid; c < nc; c += CONSUMERS) zg[c] = round_t(GIn::total(partial, c));

      // P2: dt_proj + softplus, the selective state update, y = (C h + D x) silu(z); warp w: channels w + NW k
      for (int r = tid; r < R2; r += CONSUMERS) {  // x_proj's sums, once every block's share is in
        unsigned long long w;
        do {
          asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];"
                       : "=l"(w)
                       : "l"(args.xacc + (l * R2 + r) * XACC_STRIDE)
                       : "memory");
        } while ((w & 0xffull) != (static_cast<unsigned>(G) & 0xffu));
        xdbl[r] = static_cast<float>(__ll2double_rn(static_cast<long long>(w) >> 8) * (1.0 / (1ll << XACC_SHIFT)));
      }
      consumers_sync();
      {
        float dt[CPW];
#pragma unroll
        for (int k = 0; k < CPW; ++k) {
          const int c = warp + NW * k;
          float v = 0.f;
          if (c < nc) {
            for (int i = lane; i < R; i += 32) v = fmaf(to_f(s_dt[c * R + i]), xdbl[i], v);
          }
          dt[k] = v;
        }
#pragma unroll
        for (int k = 0; k < CPW; ++k) {
          const int c = warp + NW * k;
          const float v = warp_sum(dt[k]) + (c < nc ? s_pk[c * PACK + N] : 0.f);
          dt[k] = v <= 20.f ? logf(1.f + expf(v)) : v;
        }
#pragma unroll
        for (int k = 0; k < CPW; ++k) {
          const int c = warp + NW * k;
          float contrib = 0.f;
          if (c < nc && lane < N) {
            const float x = xc[c];
            const float h = s_h[c * N + lane] * expf(dt[k] * s_pk[c * PACK + lane]) + dt[k] * xdbl[R + lane] * x;
            L.ssm_state[static_cast<size_t>(c0 + c) * N + lane] = h;
            contrib = h * xdbl[R + N + lane];
          }
          dt[k] = contrib;
        }
#pragma unroll
        for (int k = 0; k < CPW; ++k) {
          const int c = warp + NW * k;
          const float sum = warp_sum(dt[k]);
          if (c < nc && lane == 0) {
            const float x = xc[c];
            const float z = zg[c];
            const float y = (sum + s_pk[c * PACK + N + 1] * x) * z / (1.f + expf(-z));
            ys[c] = static_cast<T>(y);
          }
        }
      }
      consumers_sync();  // the small operands are read: the next layer's (or the next step's first) may land
      for (int i = tid; i < nc / EPW; i += CONSUMERS) {
        store_word(args.ybuf + c0 / EPW + i, reinterpret_cast<const unsigned*>(ys)[i], flag0 + l);
      }
      if (l + 1 < nl) issue_small(args.layers[l + 1]);

      // P3: out_proj + the residual add
      GOut gout;
      gout.load_vector(args.ybuf, flag0 + l, warp, lane);
      gout.run(ring, no, partial, warp, lane);
      consumers_sync();
      for (int o = tid; o < no; o += CONSUMERS) {
        own[o] += round_t(GOut::total(partial, o));
        store_word(args.rbuf + o0 + o, __float_as_uint(own[o]), flag0 + l);
      }
    }

    // the final norm and lm_head
    GIn gin;
    gin.load_norm(args.residual, nl == 0 ? embedding() : nullptr, nl == 0 ? nullptr : args.rbuf, flag0 + nl - 1,
                  args.norm_f, args.eps_f, red, warp, lane);
    if (g == 0 && nl > 0) {
      for (int r = tid; r < R2; r += CONSUMERS) args.xacc[((nl - 1) * R2 + r) * XACC_STRIDE] = 0ull;
    }
    // the final residual rows, over the embedding every block read at layer 0 (which each block is past: its
    // last rows are in)
    if (!greedy) {
      for (int o = tid; o < no; o += CONSUMERS) args.residual[o0 + o] = own[o];
    }
    const bool write_logits = !greedy || j + 1 == steps;
    unsigned long long best = 0;  // this thread's argmax key
    constexpr int CHUNK = MAX_PARTIALS / GIn::P;  // lm_head's rows in chunks that fit the partial sums
    for (int v = 0; v < nv; v += CHUNK) {
      const int rows = nv - v < CHUNK ? nv - v : CHUNK;
      gin.run(ring, rows, partial, warp, lane);
      consumers_sync();
      for (int o = tid; o < rows; o += CONSUMERS) {
        const float logit = round_t(GIn::total(partial, o));
        if (write_logits) args.logits[v0 + v + o] = logit;
        if (greedy) best = max(best, argmax_key(logit, v0 + v + o));
      }
      consumers_sync();
    }
    if (greedy) {  // the block's argmax into the step's slot, then its arrival (release: the key first)
      // this thread's state writes of the step before the next step's bulk copies of the states (async proxy),
      // which tid 0 issues after the barrier below (a fence after each layer's writes cost ~1 us a layer); one
      // step a launch needs none (the launch's end orders them)
      if (j + 1 < steps) asm volatile("fence.proxy.async.global;" ::: "memory");
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) best = max(best, __shfl_xor_sync(0xffffffffu, best, o));
      unsigned long long* keys = reinterpret_cast<unsigned long long*>(partial);
      if (lane == 0) keys[warp] = best;
      consumers_sync();
      if (tid == 0) {
        for (int w = 0; w < NW; ++w) best = max(best, keys[w]);
        unsigned long long* slot = args.amax + static_cast<size_t>(j) * AMAX_STRIDE;
        atomicMax(slot, best);
        asm volatile("red.release.gpu.global.add.u64 [%0], 1;" ::"l"(slot + AMAX_STRIDE / 2) : "memory");
        if (j + 1 < steps && nl > 0) issue_small(args.layers[0]);
      }
    }
  }

  // the last block out: the last step's token, the argmax slots zeroed, the count reset and the epoch advanced
  if (tid == 0) {
    unsigned done;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(done) : "l"(args.sync) : "memory");
    if (done == static_cast<unsigned>(G) - 1) {
      if (greedy) {
        unsigned long long key;
        const unsigned long long* last = args.amax + static_cast<size_t>(steps - 1) * AMAX_STRIDE;
        asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];" : "=l"(key) : "l"(last) : "memory");
        args.tokens_out[steps - 1] = argmax_index(key);
        for (int j = 0; j < steps; ++j) {
          args.amax[static_cast<size_t>(j) * AMAX_STRIDE] = 0ull;
          args.amax[static_cast<size_t>(j) * AMAX_STRIDE + AMAX_STRIDE / 2] = 0ull;
        }
      }
      atomicExch(args.sync, 0u);
      atomicAdd(args.sync + 1, static_cast<unsigned>(steps));
    }
  }
}

extern "C" {

// Shared memory per block (bytes), threads per block, ring stages and the per-block limits of this build.
int mamba_stack_step_smem_bytes() { return SMEM_BYTES; }
int mamba_stack_step_threads() { return THREADS; }
int mamba_stack_step_stages() { return STAGES; }
int mamba_stack_step_max_channels() { return MAX_CHANNELS; }
int mamba_stack_step_max_rows() { return MAX_OWN; }
int mamba_stack_step_xacc_stride() { return XACC_STRIDE; }
int mamba_stack_step_amax_stride() { return AMAX_STRIDE; }

// Raise the kernel's shared-memory limit; returns a cudaError_t.
int mamba_stack_step_configure() {
  for (const void* kernel : {reinterpret_cast<const void*>(mamba_stack_step_kernel<false, true>),
                             reinterpret_cast<const void*>(mamba_stack_step_kernel<true, true>),
                             reinterpret_cast<const void*>(mamba_stack_step_kernel<true, false>)}) {
    const cudaError_t error =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES);
    if (error != cudaSuccess) return static_cast<int>(error);
  }
  return 0;
}

// Launch on `stream` with `grid` blocks (all resident: at most one per multiprocessor); returns a cudaError_t.
// Without `embedding`: one step from `residual` (its logits; residual overwritten with the final residual
// stream). With it: `steps` greedy tokens from token_in into tokens_out, the last step's logits.
int mamba_stack_step_launch(const void* layers, int n_layers, const void* norm_f, const void* lm_head, int vocab,
                            float eps, float eps_f, float* residual, float* logits, void* ybuf, void* rbuf,
                            void* xacc, unsigned* sync, const void* embedding, const void* token_in,
                            void* tokens_out, void* amax, int steps, int grid, int cooperative, void* stream) {
  if (grid < 1 || grid > 255) return static_cast<int>(cudaErrorInvalidValue);  // x_proj's counts: 8 bits
  if (steps < 1 || (embedding == nullptr && steps != 1)) return static_cast<int>(cudaErrorInvalidValue);
  Args args;
  args.layers = static_cast<const Layer*>(layers);
  args.steps = steps;
  args.embedding = static_cast<const T*>(embedding);
  args.token_in = static_cast<const long long*>(token_in);
  args.tokens_out = static_cast<long long*>(tokens_out);
  args.amax = static_cast<unsigned long long*>(amax);
  args.n_layers = n_layers;
  args.norm_f = static_cast<const T*>(norm_f);
  args.lm_head = static_cast<const T*>(lm_head);
  args.vocab = vocab;
  args.eps = eps;
  args.eps_f = eps_f;
  args.residual = residual;
  args.logits = logits;
  args.ybuf = static_cast<unsigned long long*>(ybuf);
  args.rbuf = static_cast<unsigned long long*>(rbuf);
  args.xacc = static_cast<unsigned long long*>(xacc);
  args.sync = sync;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(THREADS);
  config.dynamicSmemBytes = SMEM_BYTES;
  config.stream = static_cast<cudaStream_t>(stream);
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeCooperative;
  attribute[0].val.cooperative = cooperative;
  config.attrs = attribute;
  config.numAttrs = 1;
  if (embedding == nullptr) {
    return static_cast<int>(cudaLaunchKernelEx(&config, mamba_stack_step_kernel<false, true>, args));
  }
  if (steps == 1) return static_cast<int>(cudaLaunchKernelEx(&config, mamba_stack_step_kernel<true, true>, args));
  return static_cast<int>(cudaLaunchKernelEx(&config, mamba_stack_step_kernel<true, false>, args));
}
}
