// Gather the finalized sub-matrices of a pruned model in one multi-threaded pass.
//
// Every output tensor is out[i, j] = src[rows[i], cols[j]] * row_scale[i] * col_scale[j]
// (1-D tensors: out[i] = src[rows[i]] * row_scale[i]); absent indices mean "every index",
// absent scales mean no multiplication. The result must be byte for byte what the plain
// PyTorch reference (shear.export.gather) produces:
//   * no scale: the source value converted to the output dtype (raw copy when equal);
//   * with scales: float32 (src * row_scale) * col_scale, in that order, then converted
//     with round-to-nearest-even (c10's conversion algorithms, as torch converts).
// The products are plain IEEE float32 multiplications; -ffp-contract=off keeps the
// compiler from fusing the fp16 rounding's multiply and add.
//
// Per row: the kept columns are packed (AVX-512 VBMI2 compress where the CPU has it, else
// one element at a time), then converted and scaled in a vectorised loop. Two entry
// points share that kernel:
//   gather_into:     into caller-provided contiguous CPU tensors;
//   gather_to_files: into files at byte offsets (pwrite from small per-thread buffers), so
//                    a safetensors file is written with no intermediate full copy.
// Work is split into chunks of about kChunkBytes of output; threads (std::thread, as many
// as the caller asks, normally torch.get_num_threads()) take chunks in file order.

#include <torch/extension.h>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SHEAR_X86 1
#include <immintrin.h>
#else
#define SHEAR_X86 0
#endif

// The build passes a hash of this file so that a stale prebuilt module can be detected.
#ifndef SHEAR_GATHER_SOURCE_HASH
#define SHEAR_GATHER_SOURCE_HASH unknown
#endif
#define SHEAR_STR2(x) #x
#define SHEAR_STR(x) SHEAR_STR2(x)

namespace {

using at::ScalarType;
using OptTensor = std::optional<at::Tensor>;

constexpr int64_t kChunkBytes = 1 << 20;
constexpr int64_t kWritebackWindow = 64 << 20;

struct Run {
  int64_t src;  // first source column
  int64_t dst;  // first output column
  int64_t len;
};

struct Spec {
  const char* src = nullptr;
  ScalarType sdt = ScalarType::Float;
  int64_t ld = 1;  // source row length in elements (1 for 1-D tensors)
  int64_t nrows = 0, ncols = 1;  // output shape (ncols = 1 for 1-D tensors)
  const int64_t* rows = nullptr;
  const int64_t* cols = nullptr;
  const float* rs = nullptr;
  const float* cs = nullptr;
  ScalarType odt = ScalarType::Float;
  int64_t out_itemsize = 4;
  // Copy runs of consecutive kept columns with memcpy when they are long enough to pay.
  bool use_runs = false;
  std::vector<Run> runs;
  // Kept-column bitmap, one word per 64-byte block of a source row (AVX-512 compress);
  // empty when that path is off. Blocks [b0, b1) hold every kept column.
  std::vector<uint32_t> bits;
  int64_t b0 = 0, b1 = 0;

  int64_t row_bytes() const { return ncols * out_itemsize; }
};

bool supported(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Half || t == ScalarType::BFloat16;
}

// Element types by their storage; conversions below are written out (rather than through
// c10::Half / c10::BFloat16) so that the compiler vectorises them. They are c10's
// algorithms, so they give c10's results: exact widening, round-to-nearest-even narrowing.
struct F32 {
  using T = float;
};
struct F16 {
  using T = uint16_t;
};
struct BF16 {
  using T = uint16_t;
};

inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Source element -> float, exactly.
template <typename S>
inline float load(typename S::T v) {
  if constexpr (std::is_same_v<S, F32>) {
    return v;
  } else if constexpr (std::is_same_v<S, BF16>) {
    return f32_from_bits(static_cast<uint32_t>(v) << 16);
  } else {  // c10::detail::fp16_ieee_to_fp32_value
    const uint32_t w = static_cast<uint32_t>(v) << 16;
    const uint32_t sign = w & UINT32_C(0x80000000);
    const uint32_t two_w = w + w;
    const float normalized = f32_from_bits((two_w >> 4) + (UINT32_C(0xE0) << 23)) * f32_from_bits(UINT32_C(15) << 23);
    const float denormalized = f32_from_bits((two_w >> 17) | (UINT32_C(126) << 23)) - 0.5f;
    const uint32_t bits = two_w < (UINT32_C(1) << 27) ? f32_to_bits(denormalized) : f32_to_bits(normalized);
    return f32_from_bits(sign | bits);
  }
}

// float -> output element, round to nearest even. bf16 NaNs become nan_bits (see
// set_bf16_nan); fp16 NaNs become sign | 0x7E00, as in c10.
template <typename D>
inline typename D::T store(float v, uint16_t nan_bits) {
  if constexpr (std::is_same_v<D, F32>) {
    return v;
  } else if constexpr (std::is_same_v<D, BF16>) {  // c10::detail::round_to_nearest_even
    const uint32_t u = f32_to_bits(v);
    const uint16_t r = static_cast<uint16_t>((u + UINT32_C(0x7FFF) + ((u >> 16) & 1)) >> 16);
    return (u & UINT32_C(0x7FFFFFFF)) > UINT32_C(0x7F800000) ? nan_bits : r;
  } else {  // c10::detail::fp16_ieee_from_fp32_value (needs -ffp-contract=off: no FMA here)
    float base = (std::fabs(v) * f32_from_bits(UINT32_C(239) << 23)) * f32_from_bits(UINT32_C(17) << 23);
    const uint32_t w = f32_to_bits(v);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & UINT32_C(0x80000000);
    uint32_t bias = shl1_w & UINT32_C(0xFF000000);
    bias = bias < UINT32_C(0x71000000) ? UINT32_C(0x71000000) : bias;
    base = f32_from_bits((bias >> 1) + UINT32_C(0x07800000)) + base;
    const uint32_t bits = f32_to_bits(base);
    const uint32_t nonsign = ((bits >> 13) & UINT32_C(0x00007C00)) + (bits & UINT32_C(0x00000FFF));
    return static_cast<uint16_t>((sign >> 16) | (shl1_w > UINT32_C(0xFF000000) ? UINT32_C(0x7E00) : nonsign));
  }
}

// The bf16 bits torch writes for a NaN converted from float32. Its x86 vectorised path
// writes 0xFFFF while c10::BFloat16 (its scalar path) writes 0x7FC0; set_bf16_nan() lets
// the loader match what torch does on this machine.
std::atomic<int> g_bf16_nan{0x7FC0};

// The conversion loop is compiled for AVX-512 and AVX2 as well, picked at load time (GCC
// function multi-versioning). Results do not depend on the version: the float products
// are IEEE and -ffp-contract=off keeps FMA out; the rest is integer arithmetic.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SHEAR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SHEAR_CLONES
#endif

// out[j] = D((S(in[j]) * rs) * cs[j]) over contiguous arrays: vectorisable.
template <typename S, typename D>
SHEAR_CLONES void convert_row(const typename S::T* __restrict in, int64_t n, bool scaled, float rs, const float* __restrict cs,
                 uint16_t nan_bits, typename D::T* __restrict out) {
  if (!scaled) {
    for (int64_t j = 0; j < n; ++j) out[j] = store<D>(load<S>(in[j]), nan_bits);
  } else if (cs) {
    for (int64_t j = 0; j < n; ++j) out[j] = store<D>((load<S>(in[j]) * rs) * cs[j], nan_bits);
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = store<D>(load<S>(in[j]) * rs, nan_bits);
  }
}

// AVX-512 VBMI2 compress: the kept elements of a 64-byte block of a source row are packed
// with one instruction, instead of one load and store per element. Used when the CPU has
// it (checked at load) and set_simd() has not turned it off; both paths give the same bytes.
bool cpu_has_compress() {
#if SHEAR_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vbmi2");
#else
  return false;
#endif
}

std::atomic<bool> g_simd{cpu_has_compress()};

#if SHEAR_X86
// Plain (fast) loads and stores inside the row and the output; masked ones (slow on some
// CPUs) only where a full 64 bytes would read past the row or write past ``cap`` elements.
__attribute__((target("avx512f,avx512bw,avx512vbmi2"))) void compress_row16(const uint16_t* srow, int64_t ld,
                                                                               const uint32_t* bits, int64_t b0,
                                                                               int64_t b1, uint16_t* out,
                                                                               int64_t cap) {
  int64_t o = 0;
  for (int64_t b = b0; b < b1; ++b) {
    const uint32_t m = bits[b];
    const int64_t left = ld - b * 32;
    const __m512i v = left >= 32 ? _mm512_loadu_si512(srow + b * 32)
                                 : _mm512_maskz_loadu_epi16(static_cast<__mmask32>((UINT32_C(1) << left) - 1),
                                                            srow + b * 32);
    const __m512i packed = _mm512_maskz_compress_epi16(m, v);
    const int n = __builtin_popcount(m);
    if (o + 32 <= cap) {
      _mm512_storeu_si512(out + o, packed);
    } else {
      const __mmask32 sm = n >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((UINT32_C(1) << n) - 1);
      _mm512_mask_storeu_epi16(out + o, sm, packed);
    }
    o += n;
  }
}

__attribute__((target("avx512f"))) void compress_row32(const uint32_t* srow, int64_t ld, const uint32_t* bits,
                                                        int64_t b0, int64_t b1, uint32_t* out, int64_t cap) {
  int64_t o = 0;
  for (int64_t b = b0; b < b1; ++b) {
    const __mmask16 m = static_cast<__mmask16>(bits[b]);
    const int64_t left = ld - b * 16;
    const __m512i v = left >= 16 ? _mm512_loadu_si512(srow + b * 16)
                                 : _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << left) - 1), srow + b * 16);
    const __m512i packed = _mm512_maskz_compress_epi32(m, v);
    const int n = __builtin_popcount(static_cast<unsigned>(m));
    if (o + 16 <= cap) {
      _mm512_storeu_si512(out + o, packed);
    } else {
      const __mmask16 sm = n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
      _mm512_mask_storeu_epi32(out + o, sm, packed);
    }
    o += n;
  }
}
#endif

// out[j] = srow[cols[j]] for the raw elements of a row; ``cap`` elements from ``out`` may
// be written (the compress path writes whole blocks, then overwrites the excess).
template <typename T>
inline void gather_cols(const Spec& s, const T* srow, T* out, int64_t cap) {
#if SHEAR_X86
  if (!s.bits.empty()) {
    if constexpr (sizeof(T) == 2) {
      return compress_row16(reinterpret_cast<const uint16_t*>(srow), s.ld, s.bits.data(), s.b0, s.b1,
                            reinterpret_cast<uint16_t*>(out), cap);
    } else {
      return compress_row32(reinterpret_cast<const uint32_t*>(srow), s.ld, s.bits.data(), s.b0, s.b1,
                            reinterpret_cast<uint32_t*>(out), cap);
    }
  }
#endif
  // Raw element copies: NaN payloads survive, as with index_select.
  for (int64_t j = 0; j < s.ncols; ++j) out[j] = srow[s.cols[j]];
}

template <typename S, typename D>
void gather_rows(const Spec& s, int64_t r0, int64_t r1, char* out) {
  using ST = typename S::T;
  using DT = typename D::T;
  const ST* src = reinterpret_cast<const ST*>(s.src);
  DT* dst = reinterpret_cast<DT*>(out);
  const int64_t nc = s.ncols;
  const int64_t* cols = s.cols;
  const bool scaled = s.rs != nullptr || s.cs != nullptr;
  if (std::is_same_v<S, D> && !scaled) {
    for (int64_t i = r0; i < r1; ++i) {
      const ST* srow = src + (s.rows ? s.rows[i] : i) * s.ld;
      DT* drow = dst + (i - r0) * nc;
      if (s.use_runs) {
        for (const Run& run : s.runs) std::memcpy(drow + run.dst, srow + run.src, run.len * sizeof(DT));
      } else {
        // Rows are written in order, so a block spilling into the next row is overwritten.
        gather_cols<DT>(s, reinterpret_cast<const DT*>(srow), drow, (r1 - i) * nc);
      }
    }
    return;
  }
  // Gather the kept columns of a row into a scratch row first, then convert and scale
  // over contiguous memory (a vector loop).
  thread_local std::vector<uint32_t> scratch;
  if (cols && static_cast<int64_t>(scratch.size()) < nc) scratch.resize(nc);
  ST* tmp = reinterpret_cast<ST*>(scratch.data());
  const uint16_t nan_bits = static_cast<uint16_t>(g_bf16_nan.load(std::memory_order_relaxed));
  for (int64_t i = r0; i < r1; ++i) {
    const ST* srow = src + (s.rows ? s.rows[i] : i) * s.ld;
    const ST* in = srow;
    if (cols) {
      gather_cols<ST>(s, srow, tmp, nc);
      in = tmp;
    }
    // x * 1.0f is exact, so a missing row scale is a factor of one.
    convert_row<S, D>(in, nc, scaled, s.rs ? s.rs[i] : 1.0f, s.cs, nan_bits, dst + (i - r0) * nc);
  }
}

template <typename S>
void dispatch_out(const Spec& s, int64_t r0, int64_t r1, char* out) {
  switch (s.odt) {
    case ScalarType::Float:
      return gather_rows<S, F32>(s, r0, r1, out);
    case ScalarType::Half:
      return gather_rows<S, F16>(s, r0, r1, out);
    case ScalarType::BFloat16:
      return gather_rows<S, BF16>(s, r0, r1, out);
    default:
      TORCH_CHECK(false, "shear gather: unsupported output dtype ", s.odt);
  }
}

void gather_chunk(const Spec& s, int64_t r0, int64_t r1, char* out) {
  switch (s.sdt) {
    case ScalarType::Float:
      return dispatch_out<F32>(s, r0, r1, out);
    case ScalarType::Half:
      return dispatch_out<F16>(s, r0, r1, out);
    case ScalarType::BFloat16:
      return dispatch_out<BF16>(s, r0, r1, out);
    default:
      TORCH_CHECK(false, "shear gather: unsupported source dtype ", s.sdt);
  }
}

// Checks one index or scale vector and returns its data pointer (or nullptr).
template <typename T>
const T* vector_ptr(const OptTensor& t, ScalarType want, int64_t expect_len, int64_t bound, const char* what,
                    size_t k) {
  if (!t.has_value() || !t->defined()) return nullptr;
  const at::Tensor& v = *t;
  TORCH_CHECK(v.device().is_cpu(), "shear gather: tensor ", k, ": ", what, " must be on the CPU");
  TORCH_CHECK(v.scalar_type() == want, "shear gather: tensor ", k, ": ", what, " must be ", want, ", got ",
              v.scalar_type());
  TORCH_CHECK(v.dim() == 1 && v.is_contiguous(), "shear gather: tensor ", k, ": ", what,
              " must be a contiguous 1-D tensor");
  if (expect_len >= 0) {
    TORCH_CHECK(v.numel() == expect_len, "shear gather: tensor ", k, ": ", what, " has ", v.numel(),
                " entries, expected ", expect_len);
  }
  const T* p = v.data_ptr<T>();
  if constexpr (std::is_same_v<T, int64_t>) {
    for (int64_t i = 0; i < v.numel(); ++i) {
      TORCH_CHECK(p[i] >= 0 && p[i] < bound, "shear gather: tensor ", k, ": ", what, " index ", p[i],
                  " out of range [0, ", bound, ")");
      // The compress path packs kept columns in source order.
      TORCH_CHECK(i == 0 || p[i] > p[i - 1], "shear gather: tensor ", k, ": ", what,
                  " must be strictly increasing");
    }
  }
  return p;
}

std::vector<Spec> make_specs(const std::vector<at::Tensor>& srcs, const std::vector<OptTensor>& rows,
                             const std::vector<OptTensor>& cols, const std::vector<OptTensor>& row_scales,
                             const std::vector<OptTensor>& col_scales, const std::vector<int64_t>& out_dtypes) {
  const size_t n = srcs.size();
  TORCH_CHECK(rows.size() == n && cols.size() == n && row_scales.size() == n && col_scales.size() == n &&
                  out_dtypes.size() == n,
              "shear gather: every argument list must have one entry per tensor (", n, ")");
  std::vector<Spec> specs(n);
  for (size_t k = 0; k < n; ++k) {
    const at::Tensor& t = srcs[k];
    Spec& s = specs[k];
    TORCH_CHECK(t.defined(), "shear gather: tensor ", k, " is undefined");
    TORCH_CHECK(t.device().is_cpu(), "shear gather: tensor ", k, " must be on the CPU (gather CUDA tensors on the "
                "device first)");
    TORCH_CHECK(supported(t.scalar_type()), "shear gather: tensor ", k, " has dtype ", t.scalar_type(),
                "; supported: float32, float16, bfloat16");
    TORCH_CHECK(t.dim() == 1 || t.dim() == 2, "shear gather: tensor ", k, " must be 1-D or 2-D, got ", t.dim(),
                "-D");
    TORCH_CHECK(t.is_contiguous(), "shear gather: tensor ", k, " must be contiguous");
    s.odt = static_cast<ScalarType>(out_dtypes[k]);
    TORCH_CHECK(supported(s.odt), "shear gather: tensor ", k, ": unsupported output dtype ", s.odt);
    s.out_itemsize = static_cast<int64_t>(c10::elementSize(s.odt));
    s.src = static_cast<const char*>(t.const_data_ptr());
    s.sdt = t.scalar_type();
    const int64_t n0 = t.size(0);
    const int64_t n1 = t.dim() == 2 ? t.size(1) : 1;
    s.ld = n1;
    s.rows = vector_ptr<int64_t>(rows[k], ScalarType::Long, -1, n0, "rows", k);
    s.nrows = s.rows ? rows[k]->numel() : n0;
    if (t.dim() == 1) {
      TORCH_CHECK(!(cols[k].has_value() && cols[k]->defined()), "shear gather: tensor ", k,
                  " is 1-D and cannot take column indices");
      TORCH_CHECK(!(col_scales[k].has_value() && col_scales[k]->defined()), "shear gather: tensor ", k,
                  " is 1-D and cannot take a column scale");
    }
    s.cols = vector_ptr<int64_t>(cols[k], ScalarType::Long, -1, n1, "cols", k);
    s.ncols = s.cols ? cols[k]->numel() : n1;
    s.rs = vector_ptr<float>(row_scales[k], ScalarType::Float, s.nrows, 0, "row_scale", k);
    s.cs = vector_ptr<float>(col_scales[k], ScalarType::Float, s.ncols, 0, "col_scale", k);
    if (s.sdt == s.odt && !s.rs && !s.cs) {
      if (!s.cols) {
        s.runs.push_back({0, 0, s.ncols});
      } else {
        for (int64_t j = 0; j < s.ncols; ++j) {
          if (!s.runs.empty() && s.runs.back().src + s.runs.back().len == s.cols[j]) {
            ++s.runs.back().len;
          } else {
            s.runs.push_back({s.cols[j], j, 1});
          }
        }
      }
      // memcpy per run pays once runs average a cache line or so.
      s.use_runs = !s.cols || static_cast<int64_t>(s.runs.size()) * 16 <= s.ncols;
    }
    if (s.cols && !s.use_runs && s.ncols > 0 && g_simd.load()) {
      const int64_t per = 64 / static_cast<int64_t>(c10::elementSize(s.sdt));  // elements per block
      std::vector<uint32_t> bits((n1 + per - 1) / per, 0);
      for (int64_t j = 0; j < s.ncols; ++j) bits[s.cols[j] / per] |= UINT32_C(1) << (s.cols[j] % per);
      const int64_t nonempty = std::count_if(bits.begin(), bits.end(), [](uint32_t w) { return w != 0; });
      // A block costs a few element copies: worth it unless the kept columns are sparse.
      if (s.ncols >= 4 * nonempty) {
        s.bits = std::move(bits);
        s.b0 = s.cols[0] / per;
        s.b1 = s.cols[s.ncols - 1] / per + 1;
      }
    }
  }
  return specs;
}

struct Item {
  size_t spec;
  int64_t r0, r1;
};

std::vector<Item> make_items(const std::vector<Spec>& specs) {
  std::vector<Item> items;
  for (size_t k = 0; k < specs.size(); ++k) {
    const Spec& s = specs[k];
    const int64_t rb = std::max<int64_t>(s.row_bytes(), 1);
    const int64_t per = std::max<int64_t>(1, kChunkBytes / rb);
    for (int64_t r = 0; r < s.nrows; r += per) items.push_back({k, r, std::min(s.nrows, r + per)});
  }
  return items;
}

// Runs fn(item, thread index) over the items on num_threads threads; the first error wins.
template <typename Fn>
void run_parallel(const std::vector<Item>& items, int64_t num_threads, Fn fn) {
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(num_threads, static_cast<int64_t>(items.size())));
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex mu;
  std::string error;
  auto worker = [&](int64_t tid) {
    try {
      for (size_t i = next++; i < items.size() && !failed.load(); i = next++) fn(items[i], tid);
    } catch (const c10::Error& e) {
      std::lock_guard<std::mutex> lock(mu);
      if (!failed.exchange(true)) error = e.what_without_backtrace();
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lock(mu);
      if (!failed.exchange(true)) error = e.what();
    }
  };
  if (nt == 1) {
    worker(0);
  } else {
    std::vector<std::thread> threads;
    threads.reserve(nt);
    for (int64_t t = 0; t < nt; ++t) threads.emplace_back(worker, t);
    for (auto& th : threads) th.join();
  }
  TORCH_CHECK(!failed.load(), error);
}

void gather_into(const std::vector<at::Tensor>& srcs, const std::vector<OptTensor>& rows,
                 const std::vector<OptTensor>& cols, const std::vector<OptTensor>& row_scales,
                 const std::vector<OptTensor>& col_scales, const std::vector<at::Tensor>& outs,
                 int64_t num_threads) {
  TORCH_CHECK(outs.size() == srcs.size(), "shear gather: expected ", srcs.size(), " outputs, got ", outs.size());
  std::vector<int64_t> dtypes;
  for (const auto& o : outs) dtypes.push_back(static_cast<int64_t>(o.scalar_type()));
  std::vector<Spec> specs = make_specs(srcs, rows, cols, row_scales, col_scales, dtypes);
  std::vector<char*> base(outs.size());
  for (size_t k = 0; k < outs.size(); ++k) {
    const at::Tensor& o = outs[k];
    TORCH_CHECK(o.device().is_cpu() && o.is_contiguous(), "shear gather: output ", k,
                " must be a contiguous CPU tensor");
    TORCH_CHECK(o.numel() == specs[k].nrows * specs[k].ncols, "shear gather: output ", k, " has ", o.numel(),
                " elements, expected ", specs[k].nrows * specs[k].ncols);
    base[k] = static_cast<char*>(o.data_ptr());
  }
  const std::vector<Item> items = make_items(specs);
  pybind11::gil_scoped_release no_gil;
  run_parallel(items, num_threads, [&](const Item& it, int64_t) {
    const Spec& s = specs[it.spec];
    gather_chunk(s, it.r0, it.r1, base[it.spec] + it.r0 * s.row_bytes());
  });
}

void gather_to_files(const std::vector<at::Tensor>& srcs, const std::vector<OptTensor>& rows,
                     const std::vector<OptTensor>& cols, const std::vector<OptTensor>& row_scales,
                     const std::vector<OptTensor>& col_scales, const std::vector<int64_t>& out_dtypes,
                     const std::vector<int64_t>& fds, const std::vector<int64_t>& offsets, int64_t num_threads) {
  TORCH_CHECK(fds.size() == srcs.size() && offsets.size() == srcs.size(),
              "shear gather: expected one file descriptor and offset per tensor");
  std::vector<Spec> specs = make_specs(srcs, rows, cols, row_scales, col_scales, out_dtypes);
  for (size_t k = 0; k < specs.size(); ++k) {
    TORCH_CHECK(fds[k] >= 0 && offsets[k] >= 0, "shear gather: bad file descriptor or offset for tensor ", k);
  }
  const std::vector<Item> items = make_items(specs);
  int64_t max_bytes = 0;
  for (const Item& it : items) max_bytes = std::max(max_bytes, (it.r1 - it.r0) * specs[it.spec].row_bytes());
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(num_threads, static_cast<int64_t>(items.size())));
  std::vector<std::vector<char>> buffers(nt, std::vector<char>(static_cast<size_t>(max_bytes)));
  pybind11::gil_scoped_release no_gil;
  run_parallel(items, nt, [&](const Item& it, int64_t tid) {
    const Spec& s = specs[it.spec];
    char* buf = buffers[tid].data();
    const int64_t n = (it.r1 - it.r0) * s.row_bytes();
    gather_chunk(s, it.r0, it.r1, buf);
    int64_t done = 0;
    const int64_t off = offsets[it.spec] + it.r0 * s.row_bytes();
    while (done < n) {
      const ssize_t w = ::pwrite(static_cast<int>(fds[it.spec]), buf + done, static_cast<size_t>(n - done),
                                 static_cast<off_t>(off + done));
      if (w < 0 && errno == EINTR) continue;
      TORCH_CHECK(w > 0, "shear gather: writing tensor ", it.spec, " failed: ",
                  w < 0 ? std::strerror(errno) : "no progress");
      done += w;
    }
#if defined(__linux__)
    // When this chunk completes a 64 MiB window of the file, start writing that window
    // back, so that the disk works while later chunks are gathered and the final fsync
    // has less to wait for. Only a hint: pages not written yet go at fsync, and errors
    // surface there.
    const int64_t boundary = (off + n) / kWritebackWindow * kWritebackWindow;
    if (boundary > off && boundary >= kWritebackWindow) {
      ::sync_file_range(static_cast<int>(fds[it.spec]), boundary - kWritebackWindow, kWritebackWindow,
                        SYNC_FILE_RANGE_WRITE);
    }
#endif
  });
}

bool set_simd(bool enabled) {
  g_simd.store(enabled && cpu_has_compress());
  return g_simd.load();
}

void set_bf16_nan(int64_t bits) {
  TORCH_CHECK(bits >= -1 && bits <= 0xFFFF, "shear gather: bf16 NaN bits must be -1 or a 16-bit value");
  g_bf16_nan.store(bits < 0 ? 0x7FC0 : static_cast<int>(bits));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "shear: multi-threaded gather of finalized sub-matrices for export";
  m.def("gather_into", &gather_into, "Gather every spec into the given contiguous CPU tensors",
        pybind11::arg("srcs"), pybind11::arg("rows"), pybind11::arg("cols"), pybind11::arg("row_scales"),
        pybind11::arg("col_scales"), pybind11::arg("outs"), pybind11::arg("num_threads"));
  m.def("gather_to_files", &gather_to_files,
        "Gather every spec into files at byte offsets (pwrite from per-thread chunk buffers)",
        pybind11::arg("srcs"), pybind11::arg("rows"), pybind11::arg("cols"), pybind11::arg("row_scales"),
        pybind11::arg("col_scales"), pybind11::arg("out_dtypes"), pybind11::arg("fds"), pybind11::arg("offsets"),
        pybind11::arg("num_threads"));
  m.def("set_simd", &set_simd,
        "Use the AVX-512 compress path where the CPU has it (default); returns whether it is on",
        pybind11::arg("enabled"));
  m.def("simd", []() { return g_simd.load(); }, "Whether the AVX-512 compress path is on");
  m.def("set_bf16_nan", &set_bf16_nan, "Bits written for a NaN converted to bf16 (-1: c10's 0x7FC0)",
        pybind11::arg("bits"));
  m.attr("SOURCE_HASH") = SHEAR_STR(SHEAR_GATHER_SOURCE_HASH);
  // Output dtypes travel as these codes (at::ScalarType values).
  m.attr("FLOAT32") = static_cast<int64_t>(ScalarType::Float);
  m.attr("FLOAT16") = static_cast<int64_t>(ScalarType::Half);
  m.attr("BFLOAT16") = static_cast<int64_t>(ScalarType::BFloat16);
}
