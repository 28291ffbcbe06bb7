// fastdiff._C.cpu_step: the fused step of fastdiff/engine/kernels/fused_step.py on the CPU, one pass over
// memory, with the Philox noise of philox.h drawn in the loop. No PyTorch headers: Python hands
// over data pointers, dtype codes, sizes and strides (in elements) as integers
// (fastdiff/engine/kernels/cpu_step.py), and this file trusts them; everything else it checks.
//
//   m = u + w (c - u) (times f_b)                       optional: classifier-free guidance
//   x0_hat, eps_hat = predict(x_t, m)                   epsilon / v_prediction / sample / flow
//   x0_hat = clamp(x0_hat, -r, r)  or  clamp(x0_hat, -s_b, s_b) / s_b
//   x_s = c_x0 x0_hat + c_eps eps_hat + c_xt x_t (+ c_m m) (+ c_hk Hk, k < 4) + std_ z
//   x_c = xc_xt x_t + xc_x0 x0_hat + xc_eps eps_hat (+ xc_hk Hk)
//   out = x_s;  x0_out = x0_hat;  eps_out = eps_hat;  xc_out = x_c;  model_in_out = c_in x_s
//
// in float32 whatever the input dtypes (float32, float16, bfloat16, mixed), each output rounded
// once to nearest-even as torch's .to() does. The coefficients come from row `step` of the table
// (float32 or float64, columns by csrc/columns.h), with `step` read from the step tensor's memory.

#include <atomic>
#include <condition_variable>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <tuple>
#include <type_traits>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#define FASTDIFF_HAVE_GETPID 1
#endif

#include "columns.h"
#include "common.h"
#include "philox.h"
#include "cpu_step_types.h"

namespace fastdiff {
namespace cpu {

// --- the loops, once per instruction set --------------------------------------------------------------

#define FASTDIFF_KERNEL_WORDS philox::philox_words
namespace baseline {
#include "cpu_step_kernel.h"
}  // namespace baseline
#undef FASTDIFF_KERNEL_WORDS

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FASTDIFF_NO_DISPATCH)
#define FASTDIFF_X86_DISPATCH 1
// No FMA anywhere (setup.py builds with -ffp-contract=off): every copy rounds every product and
// sum, so all instruction sets give the same bits as each other and as the fp32 reference.
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#define FASTDIFF_KERNEL_WORDS philox::philox_words_avx2
#define FASTDIFF_KERNEL_F16C 1
namespace avx2 {
#include "cpu_step_kernel.h"
}  // namespace avx2
#undef FASTDIFF_KERNEL_WORDS
#undef FASTDIFF_KERNEL_F16C
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,f16c,prefer-vector-width=512")
#define FASTDIFF_KERNEL_WORDS philox::philox_words_avx512
#define FASTDIFF_KERNEL_F16C 1
#define FASTDIFF_KERNEL_AVX512 1
namespace avx512 {
#include "cpu_step_kernel.h"
}  // namespace avx512
#undef FASTDIFF_KERNEL_WORDS
#undef FASTDIFF_KERNEL_F16C
#undef FASTDIFF_KERNEL_AVX512
#pragma GCC pop_options
#endif

struct Isa {
  const char* name;
  void (*step_range)(const StepParams&, int64_t, int64_t);
  void (*randn_range)(const RandnParams&, int64_t, int64_t);
};

const Isa kIsas[] = {
    {"baseline", baseline::step_range, baseline::randn_range},
#ifdef FASTDIFF_X86_DISPATCH
    {"avx2", avx2::step_range, avx2::randn_range},
    {"avx512", avx512::step_range, avx512::randn_range},
#endif
};

int best_isa() {
#ifdef FASTDIFF_X86_DISPATCH
  __builtin_cpu_init();
  const bool f16c = __builtin_cpu_supports("f16c");
  if (f16c && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return 2;
  if (f16c && __builtin_cpu_supports("avx2")) return 1;
#endif
  return 0;
}

std::atomic<int> g_isa{-1};

const Isa& isa() {
  int i = g_isa.load(std::memory_order_relaxed);
  if (i < 0) g_isa.store(i = best_isa(), std::memory_order_relaxed);
  return kIsas[i];
}

// --- threads ---------------------------------------------------------------------------------------

// A persistent pool: the caller runs parts too and workers take the rest. Starting a thread per
// call costs ~40 us on this VM; waking a parked worker costs a few. Workers spin briefly before
// parking so that back-to-back steps (a sampling loop) do not pay the wake-up every time.
class Pool {
 public:
  static Pool& get() {
    static std::mutex creation;
    std::lock_guard<std::mutex> lock(creation);
    static Pool* pool = nullptr;
#ifdef FASTDIFF_HAVE_GETPID
    // After fork() the child has the pool object but not its threads: start a new one (leaking the
    // old one, whose mutexes may be held by threads that no longer exist).
    static pid_t owner = 0;
    if (pool != nullptr && owner != getpid()) pool = nullptr;
    if (pool == nullptr) owner = getpid();
#endif
    if (pool == nullptr) pool = new Pool();
    return *pool;
  }

  // fn(part) for part in [0, parts); returns when all are done. Serialised between callers; a
  // caller that finds the pool busy (another Python thread stepping) runs its parts itself.
  void run(int parts, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || parts <= 1) {
      for (int i = 0; i < parts; ++i) fn(i);
      return;
    }
    ensure_workers(parts - 1);
    uint32_t gen;
    {
      std::lock_guard<std::mutex> lock(mu_);
      gen = ++generation_;
      job_ = &fn;
      parts_ = parts;
      pending_.store(parts, std::memory_order_relaxed);
      work_.store(static_cast<uint64_t>(gen) << 32, std::memory_order_release);
    }
    cv_.notify_all();
    claim(gen, &fn, parts);
    for (int spin = 0; spin < kSpin && pending_.load(std::memory_order_acquire) > 0; ++spin) cpu_relax();
    if (pending_.load(std::memory_order_acquire) > 0) {
      std::unique_lock<std::mutex> lock(mu_);
      done_cv_.wait(lock, [&] { return pending_.load(std::memory_order_acquire) == 0; });
    }
  }

 private:
  // ~50 us of pause instructions (27 ns each measured on this Zen 5 VM; ~40 ns on Skylake).
  static constexpr int kSpin = 2000;

  static void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }

  // Run parts of generation `gen` while any are unclaimed. work_ holds (generation << 32 | next
  // part): a claim succeeds only while that generation is running, so `job` is still alive.
  void claim(uint32_t gen, const std::function<void(int)>* job, int parts) {
    for (uint64_t v = work_.load(std::memory_order_acquire);;) {
      if (static_cast<uint32_t>(v >> 32) != gen || static_cast<int>(v & 0xFFFFFFFFu) >= parts) return;
      if (!work_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      (*job)(static_cast<int>(v & 0xFFFFFFFFu));
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lock(mu_);
        done_cv_.notify_all();
      }
      v = work_.load(std::memory_order_acquire);
    }
  }

  void ensure_workers(int n) {
    while (workers_ < n) {
      std::thread([this] { worker(); }).detach();
      ++workers_;
    }
  }

  void worker() {
    uint32_t seen = static_cast<uint32_t>(work_.load(std::memory_order_acquire) >> 32);
    for (;;) {
      auto fresh = [&] { return static_cast<uint32_t>(work_.load(std::memory_order_acquire) >> 32) != seen; };
      bool ready = false;
      for (int spin = 0; spin < kSpin && !(ready = fresh()); ++spin) cpu_relax();
      uint32_t gen;
      const std::function<void(int)>* job;
      int parts;
      {
        std::unique_lock<std::mutex> lock(mu_);
        if (!ready) cv_.wait(lock, fresh);
        gen = generation_;
        job = job_;
        parts = parts_;
      }
      seen = gen;
      claim(gen, job, parts);
    }
  }

  std::mutex busy_, mu_;
  std::condition_variable cv_, done_cv_;
  int workers_ = 0;
  // Written under mu_ before work_ publishes a generation.
  uint32_t generation_ = 0;
  const std::function<void(int)>* job_ = nullptr;
  int parts_ = 0;
  std::atomic<uint64_t> work_{0};
  std::atomic<int> pending_{0};
};

// Below this many elements of work (x4 with in-kernel noise) a step runs on the calling thread.
// Measured on this 2-core VM, float32, back to back (worker spinning): 2 threads break even for
// the deterministic step at 16K-32K elements (1.28x at 64K) and gain already at 4K with noise
// (1.18x; 1.53x at 16K). A worker parked between steps (a model call longer than its ~50 us
// spin) costs a wake-up on top, so the threshold sits above both break-evens: 64K elements
// deterministic, 16K noised.
constexpr int64_t kParallelWorkDefault = 1 << 16;
std::atomic<int64_t> g_parallel_work{kParallelWorkDefault};

void parallel_range(int64_t n, int64_t work_per_element, int threads,
                    const std::function<void(int64_t, int64_t)>& body) {
  const int64_t work = n * work_per_element;
  int parts = threads < 1 ? 1 : threads;
  if (work < g_parallel_work.load(std::memory_order_relaxed)) parts = 1;
  // At least one chunk per part, and no more parts than chunks.
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  if (parts > chunks) parts = static_cast<int>(chunks);
  if (parts <= 1) {
    body(0, n);
    return;
  }
  const int64_t per = (chunks + parts - 1) / parts * kChunk;
  Pool::get().run(parts, [&](int i) {
    const int64_t lo = i * per, hi = std::min(n, lo + per);
    if (lo < hi) body(lo, hi);
  });
}

// --- arguments from Python ---------------------------------------------------------------------------

// (data pointer, dtype code, strides in elements); shapes are shared and passed once.
using TensorArg = std::tuple<uintptr_t, int, std::vector<int64_t>>;

int64_t itemsize(int dtype) {
  switch (dtype) {
    case kF32: case kI32: return 4;
    case kF16: case kBF16: return 2;
    default: return 8;
  }
}

View make_view(const char* name, const std::optional<TensorArg>& arg, const std::vector<int64_t>& shape) {
  View v;
  if (!arg) return v;
  const auto& [ptr, dtype, strides] = *arg;
  if (dtype != kF32 && dtype != kF16 && dtype != kBF16)
    value_error(std::string(name) + " must be float32, float16 or bfloat16 (dtype code " + std::to_string(dtype) +
                ")");
  if (strides.size() != shape.size())
    value_error(std::string(name) + " has " + std::to_string(strides.size()) + " strides for " +
                std::to_string(shape.size()) + " dimensions");
  if (ptr == 0) value_error(std::string(name) + " has a null data pointer");
  v.ptr = reinterpret_cast<char*>(ptr);
  v.dtype = dtype;
  // Coalesce: drop size-1 dims, merge d into d + 1 where d steps over exactly d + 1's extent.
  int nd = 0;
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 1) continue;
    if (strides[d] < 0) value_error(std::string(name) + " has a negative stride");
    if (nd > 0 && v.stride[nd - 1] == strides[d] * shape[d]) {
      v.size[nd - 1] *= shape[d];
      v.stride[nd - 1] = strides[d];
    } else {
      if (nd == kMaxDims)
        value_error(std::string(name) + " has more than " + std::to_string(kMaxDims) +
                    " dimensions that do not merge (make it contiguous first)");
      v.size[nd] = shape[d];
      v.stride[nd] = strides[d];
      ++nd;
    }
  }
  if (nd == 0) {
    nd = 1;
    v.size[0] = 1;
    v.stride[0] = 1;
  }
  v.nd = nd;
  v.dense = nd == 1 && v.stride[0] == 1;
  return v;
}

// [first byte, last byte + 1) that a view touches.
std::pair<uintptr_t, uintptr_t> byte_range(const View& v) {
  int64_t hi = 0;
  for (int d = 0; d < v.nd; ++d) hi += (v.size[d] - 1) * v.stride[d];
  const uintptr_t p = reinterpret_cast<uintptr_t>(v.ptr);
  return {p, p + static_cast<uintptr_t>((hi + 1) * itemsize(v.dtype))};
}

bool same_view(const View& a, const View& b) {
  if (a.ptr != b.ptr || a.dtype != b.dtype || a.nd != b.nd) return false;
  for (int d = 0; d < a.nd; ++d)
    if (a.size[d] != b.size[d] || a.stride[d] != b.stride[d]) return false;
  return true;
}

// An output's elements must not overlap each other (e.g. a stride-0 dim from expand()). The test
// is sufficient, not necessary: strides sorted ascending each step over the extent below them.
void check_no_internal_overlap(const char* name, const View& v) {
  std::vector<std::pair<int64_t, int64_t>> dims;
  for (int d = 0; d < v.nd; ++d)
    if (v.size[d] > 1) dims.emplace_back(v.stride[d], v.size[d]);
  std::sort(dims.begin(), dims.end());
  int64_t extent = 1;
  for (const auto& [stride, size] : dims) {
    if (stride < extent)
      value_error(std::string(name) +
                  " has elements that share memory (e.g. a stride-0 dimension from expand()); "
                  "give a tensor with its own storage");
    extent = stride * (size - 1) + extent;
  }
}

// Outputs may be exactly an input (same memory, layout and dtype: in place), never overlap one
// partially, and never overlap each other. Each chunk reads all of its inputs before writing, and
// chunks are disjoint, so exact aliasing is safe.
void check_overlaps(const std::vector<std::pair<const char*, const View*>>& inputs,
                    const std::vector<std::pair<const char*, const View*>>& outputs) {
  auto overlap = [](const View& a, const View& b) {
    const auto ra = byte_range(a), rb = byte_range(b);
    return ra.first < rb.second && rb.first < ra.second;
  };
  for (size_t i = 0; i < outputs.size(); ++i) {
    const View& o = *outputs[i].second;
    if (!o) continue;
    check_no_internal_overlap(outputs[i].first, o);
    for (const auto& [name, in] : inputs)
      if (*in && overlap(o, *in) && !same_view(o, *in))
        value_error(std::string(outputs[i].first) + " partially overlaps " + name +
                    " in memory: an output may be an input itself (in place) but not a different view of "
                    "its storage");
    for (size_t j = i + 1; j < outputs.size(); ++j)
      if (*outputs[j].second && overlap(o, *outputs[j].second))
        value_error(std::string(outputs[i].first) + " and " + outputs[j].first +
                    " overlap in memory: outputs must be distinct tensors");
  }
}

// All views share one dense layout (e.g. all channels_last) with dim 0 outermost: walk them in
// storage order, without index arithmetic. Not with in-kernel noise, keyed by the logical index.
bool shared_dense_layout(const std::vector<const std::vector<int64_t>*>& strides, const std::vector<int64_t>& shape,
                         int64_t n) {
  const std::vector<int64_t>& ref = *strides[0];
  for (const auto* s : strides)
    if (*s != ref) return false;
  std::vector<std::pair<int64_t, int64_t>> dims;
  for (size_t d = 0; d < shape.size(); ++d)
    if (shape[d] != 1) dims.emplace_back(ref[d], shape[d]);
  std::sort(dims.begin(), dims.end());
  int64_t expected = 1;
  for (const auto& [stride, size] : dims) {
    if (stride != expected) return false;
    expected *= size;
  }
  return shape.empty() || shape[0] <= 1 || ref[0] == n / shape[0];
}

template <typename T>
T read_scalar(uintptr_t ptr) {
  T v;
  std::memcpy(&v, reinterpret_cast<const void*>(ptr), sizeof(T));
  return v;
}

int64_t read_index(const char* name, uintptr_t ptr, int dtype) {
  if (ptr == 0) value_error(std::string(name) + " has a null data pointer");
  if (dtype == kI32) return read_scalar<int32_t>(ptr);
  if (dtype == kI64) return read_scalar<int64_t>(ptr);
  value_error(std::string(name) + " must be int32 or int64 (dtype code " + std::to_string(dtype) + ")");
}

Coef read_row(uintptr_t table, int dtype, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride,
              int64_t step) {
  if (table == 0) value_error("table has a null data pointer");
  if (cols != NCOL)
    value_error("table must have " + std::to_string(NCOL) + " columns (csrc/columns.h), got " + std::to_string(cols));
  if (dtype != kF32 && dtype != kF64) value_error("table must be float32 or float64");
  if (step < 0 || step >= rows)
    value_error("step index " + std::to_string(step) + " is out of range for a table of " + std::to_string(rows) +
                " rows");
  float r[NCOL];
  for (int c = 0; c < NCOL; ++c) {
    const int64_t off = step * row_stride + c * col_stride;
    // float64 tables round each coefficient to float32 once, as table.float() does for the kernel.
    r[c] = dtype == kF32 ? read_scalar<float>(table + off * 4) : static_cast<float>(read_scalar<double>(table + off * 8));
  }
  Coef k;
  k.a_t = r[A_T];
  k.b_t = r[B_T];
  k.c_x0 = r[C_X0];
  k.c_eps = r[C_EPS];
  k.c_xt = r[C_XT];
  k.c_m = r[C_M];
  const int hist_cols[kMaxHistory] = {C_H0, C_H1, C_H2, C_H3};
  const int xc_hist_cols[kMaxHistory] = {XC_H0, XC_H1, XC_H2, XC_H3};
  for (int j = 0; j < kMaxHistory; ++j) {
    k.c_h[j] = r[hist_cols[j]];
    k.xc_h[j] = r[xc_hist_cols[j]];
  }
  k.xc_xt = r[XC_XT];
  k.xc_x0 = r[XC_X0];
  k.xc_eps = r[XC_EPS];
  k.std = r[STD];
  k.c_cov = r[C_COV];
  k.cov_scale = r[COV_SCALE];
  k.log_var_min = r[LOG_VAR_MIN];
  k.log_var_max = r[LOG_VAR_MAX];
  k.var_max = r[VAR_MAX];
  k.noise = r[NOISE];
  k.c_in = r[C_IN];
  return k;
}

int64_t numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t s : shape) {
    if (s < 0) value_error("sizes must be >= 0");
    n *= s;
  }
  return n;
}

void cpu_step(const std::vector<int64_t>& shape, const TensorArg& x, const TensorArg& model_output,
              const std::optional<TensorArg>& aux, const std::optional<TensorArg>& noise,
              const std::vector<TensorArg>& history, const TensorArg& out, const std::optional<TensorArg>& x0_out,
              const std::optional<TensorArg>& eps_out, const std::optional<TensorArg>& xc_out,
              const std::optional<TensorArg>& model_in_out,
              uintptr_t table, int table_dtype, int64_t table_rows, int64_t table_cols, int64_t table_row_stride,
              int64_t table_col_stride, uintptr_t step, int step_dtype, int prediction,
              std::optional<double> clip_range, uintptr_t thresholds, int64_t thresholds_stride,
              bool recompute_eps, uintptr_t seed, int seed_dtype, int64_t index_offset, int var_mode,
              double cov_max, int num_threads, int64_t run_len, int64_t run_stride,
              const std::optional<TensorArg>& guidance_cond, uintptr_t guidance_scale, uintptr_t guidance_factor,
              int64_t guidance_factor_stride) {
  StepParams p;
  p.n = numel(shape);
  if (p.n == 0) return;
  p.per_sample = shape.empty() || shape[0] == 0 ? p.n : p.n / shape[0];
  if (prediction < kEpsilon || prediction > kFlow) value_error("unknown prediction code " + std::to_string(prediction));
  if (var_mode < kVarTable || var_mode > kVarLearned) value_error("unknown var_mode code " + std::to_string(var_mode));
  if (noise && seed != 0) value_error("give either noise (a tensor) or seed (in-kernel noise), not both");
  if (var_mode != kVarTable && (noise || seed != 0) && !aux)
    value_error("var_mode " + std::to_string(var_mode) + " needs aux");
  if (index_offset < 0) value_error("index_offset must be >= 0, got " + std::to_string(index_offset));
  if (clip_range && !(*clip_range > 0.0)) value_error("clip_range must be > 0, got " + fmt(*clip_range));

  if (table_rows < 1) value_error("table must have at least one row");
  // An index outside the table reads its nearest row (and keys the noise by it), as on every
  // backend: fastdiff.step's contract, without a clamp op before the call.
  const int64_t step_index = std::min(std::max<int64_t>(read_index("step", step, step_dtype), 0), table_rows - 1);
  p.coef = read_row(table, table_dtype, table_rows, table_cols, table_row_stride, table_col_stride, step_index);
  p.prediction = prediction;
  p.var_mode = var_mode;
  p.clip = clip_range.has_value();
  p.clip_range = static_cast<float>(clip_range.value_or(1.0));
  p.cov_max = static_cast<float>(cov_max);
  p.recompute_eps = recompute_eps;
  p.thresholds = reinterpret_cast<const float*>(thresholds);
  p.thresholds_stride = thresholds_stride;
  p.index_offset = index_offset;
  if (run_len < 0 || run_stride < 0 || (run_len > 0 && run_stride < run_len))
    value_error("a shard's runs need run_len >= 0 and run_stride >= run_len, got " + std::to_string(run_len) + " and " +
                std::to_string(run_stride));
  p.run_len = run_len;
  p.run_stride = run_stride;
  if (noise) p.noise_mode = kNoiseTensor;
  if (seed != 0) {
    p.noise_mode = kNoisePhilox;
    p.keys = philox::Keys(static_cast<uint64_t>(read_index("seed", seed, seed_dtype)));
    p.step_counter = static_cast<uint32_t>(static_cast<uint64_t>(step_index));
    p.stream = philox::kStreamStep;
  }

  p.x = make_view("x", x, shape);
  p.m = make_view("model_output", model_output, shape);
  if (p.noise_mode != kNoiseNone && var_mode != kVarTable) p.aux = make_view("aux", aux, shape);
  p.z = make_view("noise", noise, shape);
  if (history.size() > static_cast<size_t>(kMaxHistory))
    value_error("history holds at most " + std::to_string(kMaxHistory) + " tensors, got " +
                std::to_string(history.size()));
  static const char* const hist_names[kMaxHistory] = {"history[0]", "history[1]", "history[2]", "history[3]"};
  p.n_hist = static_cast<int>(history.size());
  for (int k = 0; k < p.n_hist; ++k) p.h[k] = make_view(hist_names[k], history[k], shape);
  p.out = make_view("out", out, shape);
  p.x0 = make_view("x0_out", x0_out, shape);
  p.eps = make_view("eps_out", eps_out, shape);
  p.xc = make_view("xc_out", xc_out, shape);
  p.model_in = make_view("model_in_out", model_in_out, shape);
  p.g = make_view("guidance_cond", guidance_cond, shape);
  if (p.g && guidance_scale == 0) value_error("guidance_cond needs guidance_scale (a float32 element)");
  if (p.g) p.guidance_scale = read_scalar<float>(guidance_scale);
  p.guidance_factor = p.g ? reinterpret_cast<const float*>(guidance_factor) : nullptr;
  p.guidance_factor_stride = guidance_factor_stride;
  std::vector<std::pair<const char*, const View*>> ins = {
      {"x", &p.x}, {"model_output", &p.m}, {"aux", &p.aux}, {"noise", &p.z}, {"guidance_cond", &p.g}};
  for (int k = 0; k < p.n_hist; ++k) ins.push_back({hist_names[k], &p.h[k]});
  check_overlaps(ins, {{"out", &p.out}, {"x0_out", &p.x0}, {"eps_out", &p.eps}, {"xc_out", &p.xc},
                       {"model_in_out", &p.model_in}});

  std::vector<View*> views = {&p.x, &p.m, &p.aux, &p.z, &p.out, &p.x0, &p.eps, &p.xc, &p.model_in, &p.g};
  for (int k = 0; k < p.n_hist; ++k) views.push_back(&p.h[k]);
  bool all_dense = true;
  for (View* v : views)
    if (*v && !v->dense) all_dense = false;
  if (!all_dense && p.noise_mode != kNoisePhilox) {
    std::vector<const std::vector<int64_t>*> strides;
    for (const auto* a : {&x, &model_output, &out}) strides.push_back(&std::get<2>(*a));
    for (const auto* a : {&noise, &x0_out, &eps_out, &xc_out, &model_in_out, &guidance_cond})
      if (*a) strides.push_back(&std::get<2>(**a));
    for (const auto& h : history) strides.push_back(&std::get<2>(h));
    if (p.aux) strides.push_back(&std::get<2>(*aux));
    if (shared_dense_layout(strides, shape, p.n))
      for (View* v : views)
        if (*v) v->dense = true;
  }

  // Work per element relative to the deterministic step (sets the single-thread threshold).
  const int64_t work = p.noise_mode == kNoisePhilox ? 4 : 1;
  const auto step_range = isa().step_range;
  py::gil_scoped_release release;
  parallel_range(p.n, work, num_threads, [&](int64_t lo, int64_t hi) { step_range(p, lo, hi); });
}

void cpu_randn(const std::vector<int64_t>& shape, const TensorArg& out, int64_t seed, int64_t index_offset,
               int64_t step, int64_t stream, int num_threads, int64_t run_len, int64_t run_stride) {
  RandnParams p;
  const int64_t n = numel(shape);
  if (n == 0) return;
  if (index_offset < 0) value_error("index_offset must be >= 0, got " + std::to_string(index_offset));
  p.out = make_view("out", out, shape);
  check_no_internal_overlap("out", p.out);
  p.index_offset = index_offset;
  if (run_len < 0 || run_stride < 0 || (run_len > 0 && run_stride < run_len))
    value_error("a shard's runs need run_len >= 0 and run_stride >= run_len, got " + std::to_string(run_len) + " and " +
                std::to_string(run_stride));
  p.run_len = run_len;
  p.run_stride = run_stride;
  p.keys = philox::Keys(static_cast<uint64_t>(seed));
  p.step_counter = static_cast<uint32_t>(static_cast<uint64_t>(step));
  p.stream = static_cast<uint32_t>(static_cast<uint64_t>(stream));
  const auto randn_range = isa().randn_range;
  py::gil_scoped_release release;
  parallel_range(n, 4, num_threads, [&](int64_t lo, int64_t hi) { randn_range(p, lo, hi); });
}

}  // namespace cpu

void register_cpu_step(py::module_& m) {
  using namespace cpu;
  py::dict dtypes;
  dtypes["float32"] = static_cast<int>(kF32);
  dtypes["float16"] = static_cast<int>(kF16);
  dtypes["bfloat16"] = static_cast<int>(kBF16);
  dtypes["float64"] = static_cast<int>(kF64);
  dtypes["int32"] = static_cast<int>(kI32);
  dtypes["int64"] = static_cast<int>(kI64);
  m.attr("CPU_DTYPES") = dtypes;
  py::dict preds;
  preds["epsilon"] = static_cast<int>(kEpsilon);
  preds["v_prediction"] = static_cast<int>(kVPrediction);
  preds["sample"] = static_cast<int>(kSample);
  preds["flow"] = static_cast<int>(kFlow);
  m.attr("CPU_PREDICTIONS") = preds;
  py::dict modes;
  modes["table"] = static_cast<int>(kVarTable);
  modes["ocm"] = static_cast<int>(kVarOcm);
  modes["learned_range"] = static_cast<int>(kVarLearnedRange);
  modes["learned"] = static_cast<int>(kVarLearned);
  m.attr("CPU_VAR_MODES") = modes;
  m.attr("CPU_CHUNK") = kChunk;
  m.attr("CPU_PARALLEL_WORK") = kParallelWorkDefault;
  m.def("_set_cpu_parallel_work", [](int64_t w) {
    if (w < 0) value_error("the parallel threshold must be >= 0");
    g_parallel_work.store(w);
  }, py::arg("work"), "Benchmarks: elements of work (x4 for in-kernel noise) below which a step runs on one thread.");

  m.def("cpu_step", &cpu_step, py::arg("shape"), py::arg("x"), py::arg("model_output"), py::arg("aux"),
        py::arg("noise"), py::arg("history"), py::arg("out"), py::arg("x0_out"), py::arg("eps_out"), py::arg("xc_out"),
        py::arg("model_in_out"),
        py::arg("table"), py::arg("table_dtype"), py::arg("table_rows"), py::arg("table_cols"),
        py::arg("table_row_stride"), py::arg("table_col_stride"), py::arg("step"), py::arg("step_dtype"),
        py::arg("prediction"), py::arg("clip_range"), py::arg("thresholds"), py::arg("thresholds_stride"),
        py::arg("recompute_eps"), py::arg("seed"), py::arg("seed_dtype"), py::arg("index_offset"),
        py::arg("var_mode"), py::arg("cov_max"), py::arg("num_threads"), py::arg("run_len") = 0,
        py::arg("run_stride") = 0, py::arg("guidance_cond") = py::none(), py::arg("guidance_scale") = 0,
        py::arg("guidance_factor") = 0, py::arg("guidance_factor_stride") = 1,
        "The fused step on raw CPU buffers (use fastdiff.step with backend='cpp'). Tensors are "
        "(data_ptr, dtype code, strides) tuples sharing `shape`; pointers are trusted. With guidance_cond "
        "(c), model_output is u and the step uses u + w (c - u), w the float32 at guidance_scale, times "
        "guidance_factor[b] (float32, per sample) when that pointer is not 0.");
  m.def("cpu_randn", &cpu_randn, py::arg("shape"), py::arg("out"), py::arg("seed"), py::arg("index_offset"),
        py::arg("step"), py::arg("stream"), py::arg("num_threads"), py::arg("run_len") = 0, py::arg("run_stride") = 0,
        "Fill `out` with philox.py's normals for global indices index_offset + i (row-major i), or of a "
        "shard's runs (run_len elements, run_stride apart).");
  m.def("_cpu_box_muller", [](uintptr_t words, int64_t groups, uintptr_t out) {
    // Test hook: normals of given Philox words (words[4 g + l]: lane l of group g), so that tests
    // can check the transform on every one of the 2^23 uniforms. Pointers are trusted.
    const uint32_t* w = reinterpret_cast<const uint32_t*>(words);
    float* o = reinterpret_cast<float*>(out);
    py::gil_scoped_release release;
    for (int64_t g = 0; g < groups; ++g) philox::box_muller4(w[4 * g], w[4 * g + 1], w[4 * g + 2], w[4 * g + 3], o + 4 * g);
  }, py::arg("words"), py::arg("groups"), py::arg("out"));
  m.def("cpu_isa", [] { return std::string(isa().name); },
        "The instruction set the CPU step's loops run with (baseline, avx2 or avx512).");
  m.def("cpu_isas", [] {
    py::list names;
    for (const Isa& i : kIsas) names.append(i.name);
    return names;
  }, "Every instruction-set copy of the loops compiled into this build.");
  m.def("set_cpu_isa", [](const std::string& name) {
    const int best = best_isa();
    for (int i = 0; i <= best; ++i)
      if (name == kIsas[i].name) {
        g_isa.store(i);
        return;
      }
    value_error("instruction set '" + name + "' is not available here (best: " + kIsas[best].name + ")");
  }, py::arg("name"), "Force a copy of the loops no wider than the CPU supports (tests, benchmarks).");
}

}  // namespace fastdiff
