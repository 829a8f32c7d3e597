// Python bindings of the native engine: argument checks, torch tensors -> Params, the choice of
// the compiled ISA variant, torch's intra-op pool for the engines' parallel loops.
//
// This is the only TU that sees torch; it is compiled with the default flags, plus -fopenmp where
// torch's pool is OpenMP and the compiler is GCC on Linux (build.py's openmp_flags: then
// at::parallel_for's OpenMP body, which lives in torch's headers, is compiled here). The engines
// are plain C++ and never need it. The engines linked in depend on the architecture (build.py's
// OBJECTS): x86 generic + AVX2 + AVX-512, aarch64 generic + NEON, anything else generic.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "quantize.h"

using namespace selfattn;
using OptT = std::optional<at::Tensor>;
namespace py = pybind11;

namespace {

DT dt_of(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return DT::F32;
    case at::kDouble: return DT::F64;
    case at::kHalf: return DT::F16;
    case at::kBFloat16: return DT::BF16;
    case at::kBool: return DT::U8;
    case at::kByte: return DT::U8;
    case at::kLong: return DT::I64;
    default: TORCH_CHECK(false, "selfattn native: unsupported dtype ", s);
  }
  return DT::F32;
}

View view_of(const at::Tensor& t) {
  View v;
  v.p = t.data_ptr();
  v.dt = dt_of(t.scalar_type());
  for (int64_t d = 0; d < t.dim() && d < 4; d++) v.s[d] = t.size(d) == 1 ? 0 : t.stride(d);
  return v;
}

void pool_run(int64_t n, void* ctx, TaskFn fn) {
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) { fn(ctx, b, e); });
}
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
// torch's parallel_for is an OpenMP loop compiled into this TU, here without OpenMP (a compiler
// without -fopenmp, e.g. Apple's clang): it runs in the calling thread, so the engines should
// not cut work into parts for threads that do not exist
int pool_threads() { return 1; }
#else
int pool_threads() { return at::get_num_threads(); }
#endif
const Pool kPool{&pool_run, &pool_threads};

#if defined(__x86_64__) || defined(__i386__)
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
bool cpu_has_avx512() {
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vl");
}

#endif

// The engine for float32/16 compute: SELFATTN_NATIVE_ISA overrides the CPU's best (read on every
// call, so tests can switch): avx512|avx2|generic on x86, neon|generic on aarch64 (NEON is part
// of the base ISA there: no run-time check), generic elsewhere.
const Engine& float_engine() {
  const char* want = std::getenv("SELFATTN_NATIVE_ISA");
  if (want && *want) {
    std::string w(want);
    if (w == "generic") return engine_generic_f32;
#if defined(__x86_64__) || defined(__i386__)
    if (w == "avx512") {
      TORCH_CHECK(cpu_has_avx512(), "SELFATTN_NATIVE_ISA=avx512 but this CPU lacks AVX-512");
      return engine_avx512;
    }
    if (w == "avx2") {
      TORCH_CHECK(cpu_has_avx2(), "SELFATTN_NATIVE_ISA=avx2 but this CPU lacks AVX2/FMA");
      return engine_avx2;
    }
    TORCH_CHECK(false, "SELFATTN_NATIVE_ISA must be avx512, avx2 or generic, not '", w, "'");
#elif defined(__aarch64__)
    if (w == "neon") return engine_neon;
    TORCH_CHECK(false, "SELFATTN_NATIVE_ISA must be neon or generic on aarch64, not '", w, "'");
#else
    TORCH_CHECK(false, "SELFATTN_NATIVE_ISA must be generic on this architecture, not '", w, "'");
#endif
  }
#if defined(__x86_64__) || defined(__i386__)
  static const bool a512 = cpu_has_avx512(), a2 = cpu_has_avx2();
  return a512 ? engine_avx512 : a2 ? engine_avx2 : engine_generic_f32;
#elif defined(__aarch64__)
  return engine_neon;
#else
  return engine_generic_f32;
#endif
}

const Engine& engine_for(DT dt) { return dt == DT::F64 ? engine_generic_f64 : float_engine(); }

at::ScalarType acc_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

// ---- the call record ----------------------------------------------------------------------------
// Everything a kernel call needs besides its tensors, one line per field. The Python side
// (backends/native/call.py, `record`) builds it from a spec as a tuple of these fields in this
// order (a namedtuple, NativeCall); read_call() is the only place that reads it and fill() the only
// place that turns it into Params. CALL_FIELDS exports the names, so a test holds both sides to
// one list. left / right: -1 unbounded; seed0 / seed1: dropout's seed words; drop_*: where the
// call's rows sit in the numbering of a larger call (0: the call is the whole; see Params).
// k_* / v_*: quantized storage (a selfattn.QuantizedKV: codes, float32 scales, bits, group size,
// rotation) read in place instead of the k / v tensor, which then only gives the shape and
// dtype (the caller passes a zero-stride stand-in); codes None: k / v is read as it is.
// k_window / v_window: a float window after the keys (a cache's newest tokens, read by the
// decode kernel as more chunks of the same call; forward only): k and v are then its first
// Nk - Nw keys, the call's Nk is theirs plus the window's.
#define SELFATTN_CALL_FIELDS(X) \
  X(bool, causal)               \
  X(int64_t, left)              \
  X(int64_t, right)             \
  X(OptT, mask)                 \
  X(OptT, bias)                 \
  X(OptT, alibi)                \
  X(double, softcap)            \
  X(OptT, q_ids)                \
  X(OptT, kv_ids)               \
  X(double, scale)              \
  X(double, dropout_p)          \
  X(OptT, sinks)                \
  X(int64_t, start)             \
  X(int64_t, seed0)             \
  X(int64_t, seed1)             \
  X(int64_t, drop_hq)           \
  X(int64_t, drop_nq)           \
  X(int64_t, drop_b0)           \
  X(int64_t, drop_h0)           \
  X(int64_t, drop_r0)            \
  X(OptT, k_codes)              \
  X(OptT, k_scales)             \
  X(int64_t, k_bits)            \
  X(int64_t, k_group)           \
  X(bool, k_rotate)             \
  X(OptT, v_codes)              \
  X(OptT, v_scales)             \
  X(int64_t, v_bits)            \
  X(int64_t, v_group)           \
  X(bool, v_rotate)             \
  X(OptT, k_window)             \
  X(OptT, v_window)

struct Call {
#define SELFATTN_DECLARE(T, name) T name{};
  SELFATTN_CALL_FIELDS(SELFATTN_DECLARE)
#undef SELFATTN_DECLARE
};

#define SELFATTN_COUNT(T, name) +1
constexpr size_t kCallFields = 0 SELFATTN_CALL_FIELDS(SELFATTN_COUNT);
#undef SELFATTN_COUNT

// What a field of each type accepts, for messages.
template <class T>
const char* accepts();
template <>
const char* accepts<bool>() { return "a bool"; }
template <>
const char* accepts<int64_t>() { return "an int within int64"; }
template <>
const char* accepts<double>() { return "a real number"; }
template <>
const char* accepts<OptT>() { return "a torch.Tensor or None"; }

// One field of the record: bools and ints exactly (no float or None for an int), floats from any
// real; a clear error naming the field otherwise (e.g. an int beyond int64).
template <class T>
T record_field(py::handle value, const char* name) {
  py::detail::make_caster<T> caster;
  if (!caster.load(value, std::is_floating_point<T>::value)) {
    PyErr_Clear();
    TORCH_CHECK(false, "selfattn native: call record field ", name, " must be ", accepts<T>(),
                ", got ", std::string(py::repr(value)));
  }
  return py::detail::cast_op<T>(std::move(caster));
}

// The record (a tuple in CALL_FIELDS order) -> Call; needs the GIL.
Call read_call(py::handle record) {
  TORCH_CHECK(PyTuple_Check(record.ptr()) && size_t(PyTuple_GET_SIZE(record.ptr())) == kCallFields,
              "selfattn native: the call record must be a tuple of the ", kCallFields,
              " fields of CALL_FIELDS (built by selfattn.backends.native.call.record), got ",
              std::string(py::repr(record)));
  Call c;
  size_t i = 0;
#define SELFATTN_READ(T, name) \
  c.name = record_field<T>(PyTuple_GET_ITEM(record.ptr(), i), #name); \
  i++;
  SELFATTN_CALL_FIELDS(SELFATTN_READ)
#undef SELFATTN_READ
  return c;
}

// Positions stay within +-2^60 and sides within the reach of the call, so no position arithmetic
// in the engines (start + i, pos - left, pos + right + 1) can overflow int64.
constexpr int64_t kMaxPosition = int64_t(1) << 60;

struct Sides {
  int64_t left, right;
};

// A window side at least as large as every distance between a row (positions start .. start +
// nq - 1) and a key (0 .. nk - 1) restricts nothing: it becomes -1 (unbounded).
Sides window_sides(const Call& c, int64_t nq, int64_t nk) {
  TORCH_CHECK(c.left >= -1 && c.right >= -1, "selfattn native: window sides must be >= 0 or -1 ",
              "(unbounded), got left=", c.left, ", right=", c.right);
  TORCH_CHECK(c.start >= -kMaxPosition && c.start <= kMaxPosition, "selfattn native: start=",
              c.start, " is beyond +-2^60");
  TORCH_CHECK(nq >= 0 && nk >= 0 && nq <= kMaxPosition && nk <= kMaxPosition,
              "selfattn native: nq=", nq, ", nk=", nk);
  const int64_t reach = (c.start < 0 ? -c.start : c.start) + nq + nk;
  return {c.left >= reach ? -1 : c.left, c.right >= reach ? -1 : c.right};
}

// The quantized view of k or v (`name`): codes (B, H, N, X) int8 for 8 bits, (B, H, N, X / 2)
// uint8 for 4 bits, scales (B, H, N, X / group) float32, `like` the (B, H, N, X) stand-in.
// A layout that does not fit is a ValueError before any work.
View quant_view(const at::Tensor& like, const OptT& codes, const OptT& scales, int64_t bits,
                int64_t group, bool rotate, const char* name) {
  TORCH_CHECK_VALUE(scales.has_value(), "selfattn native: ", name, "_codes without ", name,
                    "_scales");
  TORCH_CHECK_VALUE(bits == 8 || bits == 4, "selfattn native: ", name, "_bits must be 8 or 4, got ",
                    bits);
  const at::Tensor& c = *codes;
  const at::Tensor& s = *scales;
  const int64_t X = like.size(3);
  TORCH_CHECK_VALUE(c.scalar_type() == (bits == 8 ? at::kChar : at::kByte), "selfattn native: ",
                    name, " codes of ", bits, " bits must be ", bits == 8 ? "int8" : "uint8",
                    ", got ", c.scalar_type());
  TORCH_CHECK_VALUE(s.scalar_type() == at::kFloat, "selfattn native: ", name,
                    " scales must be float32, got ", s.scalar_type());
  TORCH_CHECK_VALUE(c.device().is_cpu() && s.device().is_cpu(), "selfattn native: ", name,
                    " codes and scales must be CPU tensors");
  TORCH_CHECK_VALUE(group > 0 && X % group == 0 && (bits == 8 || X % 2 == 0) &&
                        (!rotate || X % 2 == 0),
                    "selfattn native: ", name, "_group=", group, " (bits=", bits, ", rotate=",
                    rotate, ") does not fit the head dim ", X);
  const int64_t cx = bits == 8 ? X : X / 2;
  TORCH_CHECK_VALUE(c.dim() == 4 && s.dim() == 4 && c.size(0) == like.size(0) &&
                        c.size(1) == like.size(1) && c.size(2) == like.size(2) &&
                        c.size(3) == cx && s.size(0) == like.size(0) &&
                        s.size(1) == like.size(1) && s.size(2) == like.size(2) &&
                        s.size(3) == X / group,
                    "selfattn native: ", name, " codes ", c.sizes(), " and scales ", s.sizes(),
                    " do not fit ", name, " ", like.sizes(), " at ", bits, " bits, groups of ",
                    group);
  View v;
  v.p = c.data_ptr();
  v.dt = bits == 8 ? DT::Q8 : DT::Q4;
  v.scales = s.data_ptr<float>();
  for (int64_t d = 0; d < 4; d++) {
    v.s[d] = c.size(d) == 1 ? 0 : c.stride(d);
    v.ss[d] = s.size(d) == 1 ? 0 : s.stride(d);
  }
  v.group = group;
  v.rotate = rotate;
  return v;
}

// Fill the shape, the inputs and the rules of Params from q, k, v and the call record; `keep`
// holds the expanded views alive.
// The float window of the call record (k_window, v_window) after the keys: Params' kw, vw and
// Nw, with the call's Nk grown by it. Only a decode-sized call without per-key rules takes one.
void fill_window(Params& P, const Call& c, at::ScalarType st) {
  TORCH_CHECK_VALUE(c.k_window.has_value() && c.v_window.has_value(),
                    "selfattn native: k_window and v_window go together");
  const at::Tensor& kw = *c.k_window;
  const at::Tensor& vw = *c.v_window;
  TORCH_CHECK_VALUE(kw.dim() == 4 && vw.dim() == 4 && kw.scalar_type() == st &&
                        vw.scalar_type() == st && kw.device().is_cpu() && vw.device().is_cpu() &&
                        kw.size(0) == P.B && vw.size(0) == P.B && kw.size(1) == P.Hkv &&
                        vw.size(1) == P.Hkv && vw.size(2) == kw.size(2) && kw.size(3) == P.D &&
                        vw.size(3) == P.Dv,
                    "selfattn native: k_window ", kw.sizes(), " and v_window ", vw.sizes(),
                    " must be CPU tensors (B, Hkv, Nw, D) and (B, Hkv, Nw, Dv) of q's dtype");
  TORCH_CHECK_VALUE(P.G * P.Nq <= 16 && P.Nq <= 4 && !c.mask && !c.bias && !c.q_ids &&
                        c.dropout_p == 0,
                    "selfattn native: a float window is read by the decode kernel only (G * Nq "
                    "<= 16, Nq <= 4, no mask, bias, segment ids or dropout); got G=", P.G,
                    ", Nq=", P.Nq);
  P.kw = view_of(kw);
  P.vw = view_of(vw);
  P.Nw = kw.size(2);
  P.Nk += P.Nw;
}

void fill(Params& P, std::vector<at::Tensor>& keep, const at::Tensor& q, const at::Tensor& k,
          const at::Tensor& v, const Call& c, bool window_ok = false) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "selfattn native: q, k, v must be 4-D");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "selfattn native: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "selfattn native: q, k, v dtypes differ");
  auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
              "selfattn native: dtype must be float32, float64, float16 or bfloat16");
  P.B = q.size(0);
  P.Hq = q.size(1);
  P.Nq = q.size(2);
  P.D = q.size(3);
  P.Hkv = k.size(1);
  P.Nk = k.size(2);
  P.Dv = v.size(3);
  TORCH_CHECK(k.size(0) == P.B && v.size(0) == P.B && v.size(1) == P.Hkv && v.size(2) == P.Nk &&
                  k.size(3) == P.D,
              "selfattn native: shapes q ", q.sizes(), " k ", k.sizes(), " v ", v.sizes(),
              " do not match");
  TORCH_CHECK(P.Hkv > 0 && P.Hq % P.Hkv == 0, "selfattn native: Hq=", P.Hq, ", Hkv=", P.Hkv);
  P.G = P.Hq / P.Hkv;
  P.dt = dt_of(st);
  P.q = view_of(q);
  P.k = view_of(k);
  P.v = view_of(v);
  if (c.k_codes) P.k = quant_view(k, c.k_codes, c.k_scales, c.k_bits, c.k_group, c.k_rotate, "k");
  if (c.v_codes) P.v = quant_view(v, c.v_codes, c.v_scales, c.v_bits, c.v_group, c.v_rotate, "v");
  if (c.k_window || c.v_window) {
    TORCH_CHECK_VALUE(window_ok, "selfattn native: only the forward reads a float window "
                      "(k_window, v_window)");
    fill_window(P, c, st);
  }
  TORCH_CHECK(std::isfinite(c.scale), "selfattn native: scale=", c.scale, " is not finite");
  TORCH_CHECK(std::isfinite(c.softcap) && c.softcap >= 0,
              "selfattn native: softcap must be finite and > 0 (0: none), got ", c.softcap);
  P.scale = c.scale;
  P.softcap = c.softcap;
  P.causal = c.causal;
  const Sides sides = window_sides(c, P.Nq, P.Nk);
  P.start = c.start;
  P.left = sides.left;
  P.right = sides.right;
  const std::vector<int64_t> full{P.B, P.Hq, P.Nq, P.Nk};
  if (c.mask) {
    TORCH_CHECK(c.mask->scalar_type() == at::kBool, "selfattn native: mask must be bool");
    keep.push_back(c.mask->expand(full));
    P.mask = view_of(keep.back());
  }
  if (c.bias) {
    TORCH_CHECK(at::isFloatingType(c.bias->scalar_type()), "selfattn native: bias must be float");
    keep.push_back(c.bias->expand(full));
    P.bias = view_of(keep.back());
  }
  if (c.alibi) {
    TORCH_CHECK(at::isFloatingType(c.alibi->scalar_type()), "selfattn native: alibi must be float");
    keep.push_back(c.alibi->expand({P.B, P.Hq}));
    P.alibi = view_of(keep.back());
  }
  TORCH_CHECK(c.q_ids.has_value() == c.kv_ids.has_value(),
              "selfattn native: q_ids and kv_ids go together");
  if (c.q_ids) {
    keep.push_back(c.q_ids->to(at::kLong).expand({P.B, P.Nq}));
    P.q_ids = view_of(keep.back());
    keep.push_back(c.kv_ids->to(at::kLong).expand({P.B, P.Nk}));
    P.kv_ids = view_of(keep.back());
  }
  TORCH_CHECK(c.dropout_p >= 0 && c.dropout_p < 1, "selfattn native: dropout_p=", c.dropout_p);
  P.dropout_p = c.dropout_p;
  if (c.sinks) {  // (Hq,) any float dtype, read as float64 (Hq numbers)
    TORCH_CHECK(at::isFloatingType(c.sinks->scalar_type()) && c.sinks->dim() == 1 &&
                    c.sinks->size(0) == P.Hq,
                "selfattn native: sinks must be a float tensor of shape (Hq,) = (", P.Hq,
                ",), got ", c.sinks->sizes());
    keep.push_back(c.sinks->detach().to(at::kDouble).contiguous());
    P.sinks = keep.back().data_ptr<double>();
  }
  P.seed0 = uint32_t(uint64_t(c.seed0));
  P.seed1 = uint32_t(uint64_t(c.seed1));
  P.drop_hq = c.drop_hq > 0 ? c.drop_hq : P.Hq;
  P.drop_nq = c.drop_nq > 0 ? c.drop_nq : P.Nq;
  P.drop_b0 = c.drop_b0;
  P.drop_h0 = c.drop_h0;
  P.drop_r0 = c.drop_r0;
  // the call's rows lie within the numbered whole, and its row numbers fit in int64
  int64_t b1 = 0, h1 = 0, r1 = 0, rows = 0;
  TORCH_CHECK(P.drop_b0 >= 0 && P.drop_h0 >= 0 && P.drop_r0 >= 0 &&
                  !__builtin_add_overflow(P.drop_b0, P.B, &b1) &&
                  !__builtin_add_overflow(P.drop_h0, P.Hq, &h1) && h1 <= P.drop_hq &&
                  !__builtin_add_overflow(P.drop_r0, P.Nq, &r1) && r1 <= P.drop_nq &&
                  !__builtin_mul_overflow(b1, P.drop_hq, &rows) &&
                  !__builtin_mul_overflow(rows, P.drop_nq, &rows),
              "selfattn native: dropout rows (drop_hq=", c.drop_hq, ", drop_nq=", c.drop_nq,
              ", drop_b0=", c.drop_b0, ", drop_h0=", c.drop_h0, ", drop_r0=", c.drop_r0,
              ") do not hold the call's B=", P.B, ", Hq=", P.Hq, ", Nq=", P.Nq);
}

// the backward passes' saved forward results and output gradient against the call's shape
void check_saved(const Params& P, const at::Tensor& dout, const at::Tensor& out,
                 const at::Tensor& lse) {
  const std::vector<int64_t> qshape{P.B, P.Hq, P.Nq, P.Dv}, rows{P.B, P.Hq, P.Nq};
  TORCH_CHECK(dout.sizes() == at::IntArrayRef(qshape) && out.sizes() == at::IntArrayRef(qshape),
              "selfattn native: dout / out must be (B, Hq, Nq, Dv)");
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(rows), "selfattn native: lse must be (B, Hq, Nq)");
  TORCH_CHECK(at::isFloatingType(dout.scalar_type()) && at::isFloatingType(out.scalar_type()) &&
                  at::isFloatingType(lse.scalar_type()),
              "selfattn native: dout, out and lse must be float");
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v, const Call& call, bool need_out,
                                            bool out_acc) {
  Params P;
  std::vector<at::Tensor> keep;
  fill(P, keep, q, k, v, call, true);
  // out_acc: the output in the accumulation dtype (float32 for 16-bit inputs), for a backward
  // whose D = rowsum(dO * O) must not see a rounded O, and for ring attention's merges
  auto out_opts = out_acc ? q.options().dtype(acc_type(q.scalar_type())) : q.options();
  P.out_dt = dt_of(out_opts.dtype().toScalarType());
  at::Tensor out = need_out ? at::empty({P.B, P.Hq, P.Nq, P.Dv}, out_opts)
                            : at::empty({0}, out_opts);
  at::Tensor lse = at::empty({P.B, P.Hq, P.Nq}, q.options().dtype(acc_type(q.scalar_type())));
  P.need_out = need_out;
  P.out = need_out ? out.data_ptr() : nullptr;
  P.lse = lse.data_ptr();
  if (P.B * P.Hq * P.Nq > 0) {
    if (P.Nk == 0) {
      if (need_out) out.zero_();
      if (call.sinks)  // no key at all: the lse is the sink (docs/api.md, step 6)
        lse.copy_(call.sinks->detach().to(lse.scalar_type()).view({1, P.Hq, 1}).expand_as(lse));
      else
        lse.fill_(-INFINITY);
    } else {
      engine_for(P.dt).forward(P, kPool);
    }
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, OptT, OptT> backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dlse, const Call& call,
    bool need_dbias, bool need_dalibi) {
  TORCH_CHECK_VALUE(!call.k_codes && !call.v_codes,
                    "selfattn native: no backward through quantized keys or values (they hold "
                    "no gradient: dequantize them for a gradient of q)");
  Params P;
  std::vector<at::Tensor> keep;
  fill(P, keep, q, k, v, call);
  const OptT& bias = call.bias;
  const OptT& alibi = call.alibi;
  check_saved(P, dout, out, lse);
  const std::vector<int64_t> rows{P.B, P.Hq, P.Nq};
  auto acc = q.options().dtype(acc_type(q.scalar_type()));
  P.dout = view_of(dout);
  P.o = view_of(out);
  P.lse_in = view_of(lse);
  if (dlse.numel() > 0) {
    TORCH_CHECK(dlse.sizes() == at::IntArrayRef(rows), "selfattn native: dlse must be (B, Hq, Nq)");
    P.dlse = view_of(dlse);
  }
  at::Tensor dq = at::empty({P.B, P.Hq, P.Nq, P.D}, acc);
  at::Tensor dk = at::empty({P.B, P.Hkv, P.Nk, P.D}, acc);
  at::Tensor dv = at::empty({P.B, P.Hkv, P.Nk, P.Dv}, acc);
  OptT dbias, dalibi;
  if (need_dbias) {
    TORCH_CHECK(bias.has_value(), "selfattn native: need_dbias without a bias");
    TORCH_CHECK(bias->dim() <= 4, "selfattn native: bias must have at most 4 dims");
    dbias = at::empty(bias->sizes(), acc);
    for (int d = 0; d < 4; d++) {
      int64_t off = 4 - bias->dim();
      P.bias_shape[d] = d < off ? 1 : bias->size(d - off);
    }
    P.dbias = dbias->data_ptr();
  }
  if (need_dalibi) {
    TORCH_CHECK(alibi.has_value(), "selfattn native: need_dalibi without alibi slopes");
    dalibi = at::empty(alibi->sizes(), acc);
    P.alibi_b = alibi->dim() == 2 ? alibi->size(0) : 1;
    P.dalibi = dalibi->data_ptr();
  }
  P.dq = dq.data_ptr();
  P.dk = dk.data_ptr();
  P.dv = dv.data_ptr();
  if (P.B * P.Hq * P.Nq == 0 || P.Nk == 0) {
    dq.zero_();
    dk.zero_();
    dv.zero_();
    if (dbias) dbias->zero_();
    if (dalibi) dalibi->zero_();
  } else {
    engine_for(P.dt).backward(P, kPool);
  }
  return {dq, dk, dv, dbias, dalibi};
}

// Forward mode in one pass (jvp.h): (out, lse, tout, tlse) of the call and the tangents tq, tk,
// tv (shaped like q, k, v), tbias (like the bias) and talibi (like the slopes), None for zero;
// out in q's dtype (the accumulation dtype with out_acc), the rest in the accumulation dtype.
// None when the engine declines (a non-finite row of k, v, tk or tv).
using JvpResult = std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>>;
JvpResult jvp(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptT& tq,
              const OptT& tk, const OptT& tv, const OptT& tbias, const OptT& talibi,
              const Call& call, bool out_acc) {
  TORCH_CHECK_VALUE(!call.k_codes && !call.v_codes,
                    "selfattn native: no forward mode through quantized keys or values");
  Params P;
  std::vector<at::Tensor> keep;
  fill(P, keep, q, k, v, call);
  auto tangent = [&](const OptT& t, const at::Tensor& like, const char* name) -> View {
    if (!t) return View{};
    TORCH_CHECK_VALUE(t->sizes() == like.sizes() && at::isFloatingType(t->scalar_type()) &&
                          t->device().is_cpu(),
                      "selfattn native: the tangent of ", name, " must be a float CPU tensor of ",
                      "shape ", like.sizes(), ", got ", t->scalar_type(), " ", t->sizes());
    return view_of(*t);
  };
  P.tq = tangent(tq, q, "q");
  P.tk = tangent(tk, k, "k");
  P.tv = tangent(tv, v, "v");
  if (tbias) {
    TORCH_CHECK_VALUE(call.bias && tbias->sizes() == call.bias->sizes() &&
                          at::isFloatingType(tbias->scalar_type()),
                      "selfattn native: the tangent of the bias must be a float tensor shaped ",
                      "like the bias");
    keep.push_back(tbias->expand({P.B, P.Hq, P.Nq, P.Nk}));
    P.tbias = view_of(keep.back());
  }
  if (talibi) {
    TORCH_CHECK_VALUE(call.alibi && talibi->sizes() == call.alibi->sizes() &&
                          at::isFloatingType(talibi->scalar_type()),
                      "selfattn native: the tangent of the slopes must be a float tensor shaped ",
                      "like the slopes");
    keep.push_back(talibi->expand({P.B, P.Hq}));
    P.talibi = view_of(keep.back());
  }
  auto acc = q.options().dtype(acc_type(q.scalar_type()));
  auto out_opts = out_acc ? acc : q.options();
  P.out_dt = dt_of(out_opts.dtype().toScalarType());
  at::Tensor out = at::empty({P.B, P.Hq, P.Nq, P.Dv}, out_opts);
  at::Tensor lse = at::empty({P.B, P.Hq, P.Nq}, acc);
  at::Tensor tout = at::empty({P.B, P.Hq, P.Nq, P.Dv}, acc);
  at::Tensor tlse = at::empty({P.B, P.Hq, P.Nq}, acc);
  P.need_out = true;
  P.out = out.data_ptr();
  P.lse = lse.data_ptr();
  P.tout = tout.data_ptr();
  P.tlse = tlse.data_ptr();
  if (P.B * P.Hq * P.Nq > 0) {
    if (P.Nk == 0) {  // no key: out and every tangent 0 (a sink's own tangent is the caller's)
      out.zero_();
      tout.zero_();
      tlse.zero_();
      if (call.sinks)
        lse.copy_(call.sinks->detach().to(lse.scalar_type()).view({1, P.Hq, 1}).expand_as(lse));
      else
        lse.fill_(-INFINITY);
    } else if (!engine_for(P.dt).jvp(P, kPool)) {
      return std::nullopt;
    }
  }
  return std::make_tuple(out, lse, tout, tlse);
}

// The double backward of a gradient penalty in one pass (hessian.h): the VJP of the first-order
// backward with cotangents gq, gk, gv of dq, dk, dv (None: zero), the forward's own backward of
// the out and lse gradients folded in. Returns the gradients of q, k, v, of dout (need_dout) and
// of dlse (when dlse is given; empty: none) in the accumulation dtype; None when the engine
// declines (a non-finite row of k, v, gk or gv). No softcap, dropout or quantized operands.
using HessResult = std::optional<std::tuple<at::Tensor, at::Tensor, at::Tensor, OptT, OptT>>;
HessResult hessian(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                   const at::Tensor& dlse, const OptT& gq, const OptT& gk, const OptT& gv,
                   const Call& call, bool need_dout) {
  TORCH_CHECK_VALUE(!call.k_codes && !call.v_codes && call.softcap == 0.0 &&
                        call.dropout_p == 0.0,
                    "selfattn native: the fused double backward takes no quantized operands, "
                    "softcap or dropout");
  Params P;
  std::vector<at::Tensor> keep;
  fill(P, keep, q, k, v, call);
  check_saved(P, dout, out, lse);
  const std::vector<int64_t> qshape{P.B, P.Hq, P.Nq, P.Dv}, rows{P.B, P.Hq, P.Nq};
  auto acc = q.options().dtype(acc_type(q.scalar_type()));
  auto cot = [&](const OptT& t, const at::Tensor& like, const char* name) -> View {
    if (!t) {
      keep.push_back(at::zeros(like.sizes(), acc));
    } else {
      TORCH_CHECK_VALUE(t->sizes() == like.sizes() && at::isFloatingType(t->scalar_type()) &&
                            t->device().is_cpu(),
                        "selfattn native: the cotangent of d", name, " must be a float CPU ",
                        "tensor of shape ", like.sizes(), ", got ", t->scalar_type(), " ",
                        t->sizes());
      keep.push_back(*t);
    }
    return view_of(keep.back());
  };
  P.tq = cot(gq, q, "q");
  P.tk = cot(gk, k, "k");
  P.tv = cot(gv, v, "v");
  P.dout = view_of(dout);
  P.o = view_of(out);
  P.lse_in = view_of(lse);
  OptT dlse_bar, dout_bar;
  if (dlse.numel() > 0) {
    TORCH_CHECK(dlse.sizes() == at::IntArrayRef(rows), "selfattn native: dlse must be (B, Hq, Nq)");
    P.dlse = view_of(dlse);
    dlse_bar = at::empty(rows, acc);
    P.tlse = dlse_bar->data_ptr();
  }
  if (need_dout) {
    dout_bar = at::empty(qshape, acc);
    P.tout = dout_bar->data_ptr();
  }
  at::Tensor dq = at::empty({P.B, P.Hq, P.Nq, P.D}, acc);
  at::Tensor dk = at::empty({P.B, P.Hkv, P.Nk, P.D}, acc);
  at::Tensor dv = at::empty({P.B, P.Hkv, P.Nk, P.Dv}, acc);
  P.dq = dq.data_ptr();
  P.dk = dk.data_ptr();
  P.dv = dv.data_ptr();
  if (P.B * P.Hq * P.Nq == 0 || P.Nk == 0) {
    for (at::Tensor t : {dq, dk, dv}) t.zero_();
    if (dout_bar) dout_bar->zero_();
    if (dlse_bar) dlse_bar->zero_();
  } else if (!engine_for(P.dt).hessian(P, kPool)) {
    return std::nullopt;
  }
  return std::make_tuple(dq, dk, dv, dout_bar, dlse_bar);
}

// P = exp(s - lse) for every row of q (B, Hq, Nq, D) against k, under the call's rules (its
// dropout fields are ignored: probabilities are before dropout); float32 (B, Hq, Nq, Nk), zero
// where a key is hidden or the row's lse is -inf.
at::Tensor probabilities(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse,
                         const Call& call) {
  Params P;
  std::vector<at::Tensor> keep;
  at::Tensor no_v = k.narrow(3, 0, 0);  // the values are never read
  Call rules = call;
  rules.dropout_p = 0.0;
  rules.drop_hq = rules.drop_nq = rules.drop_b0 = rules.drop_h0 = rules.drop_r0 = 0;
  rules.v_codes.reset();
  rules.v_scales.reset();
  fill(P, keep, q, k, no_v, rules);
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == P.B && lse.size(1) == P.Hq && lse.size(2) == P.Nq,
              "selfattn native: lse must be (B, Hq, Nq)");
  TORCH_CHECK(at::isFloatingType(lse.scalar_type()), "selfattn native: lse must be float");
  at::Tensor probs = at::zeros({P.B, P.Hq, P.Nq, P.Nk}, q.options().dtype(at::kFloat));
  P.need_out = false;
  P.lse_in = view_of(lse);
  P.probs = probs.data_ptr();
  if (probs.numel() > 0) engine_for(P.dt).probabilities(P, kPool);
  return probs;
}

// The statistics outputs asked for, allocated and pointed to by P; None where not asked. The
// engines write every element; a call they do not run (no rows or no keys) gets what a row
// that sees nothing gets: zeros, top-k indices -1 (`seen_nothing`).
struct StatsOut {
  OptT col_sum, col_max, entropy, topk_p, topk_index;
  void seen_nothing() {
    for (OptT* t : {&col_sum, &col_max, &entropy, &topk_p})
      if (*t) (*t)->zero_();
    if (topk_index) topk_index->fill_(-1);
  }
};
StatsOut stats_outputs(Params& P, const at::Tensor& q, bool col_sum, bool col_max, bool entropy,
                       int64_t topk) {
  TORCH_CHECK(topk >= 0, "selfattn native: topk must be >= 0, got ", topk);
  auto f32 = q.options().dtype(at::kFloat);
  StatsOut o;
  if (col_sum) {
    o.col_sum = at::empty({P.B, P.Hq, P.Nk}, f32);
    P.col_sum = o.col_sum->data_ptr<float>();
  }
  if (col_max) {
    o.col_max = at::empty({P.B, P.Hq, P.Nk}, f32);
    P.col_max = o.col_max->data_ptr<float>();
  }
  if (entropy) {
    o.entropy = at::empty({P.B, P.Hq, P.Nq}, f32);
    P.entropy = o.entropy->data_ptr<float>();
  }
  if (topk > 0) {
    o.topk_p = at::empty({P.B, P.Hq, P.Nq, topk}, f32);
    o.topk_index = at::empty({P.B, P.Hq, P.Nq, topk}, q.options().dtype(at::kLong));
    P.topk_p = o.topk_p->data_ptr<float>();
    P.topk_index = o.topk_index->data_ptr<int64_t>();
  }
  P.topk = topk;
  return o;
}
using StatsTuple = std::tuple<OptT, OptT, OptT, OptT, OptT>;
StatsTuple as_tuple(const StatsOut& o) {
  return {o.col_sum, o.col_max, o.entropy, o.topk_p, o.topk_index};
}

// attention_stats' reductions of P = exp(s - lse) for every row of q (B, Hq, Nq, D) against k
// under the call's rules (dropout ignored, as for probabilities): (col_sum, col_max, entropy,
// topk_p, topk_index), None where not asked.
StatsTuple stats(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse, const Call& call,
                 bool col_sum, bool col_max, bool entropy, int64_t topk) {
  Params P;
  std::vector<at::Tensor> keep;
  at::Tensor no_v = k.narrow(3, 0, 0);  // the values are never read
  Call rules = call;
  rules.dropout_p = 0.0;
  rules.drop_hq = rules.drop_nq = rules.drop_b0 = rules.drop_h0 = rules.drop_r0 = 0;
  fill(P, keep, q, k, no_v, rules);
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == P.B && lse.size(1) == P.Hq && lse.size(2) == P.Nq,
              "selfattn native: lse must be (B, Hq, Nq)");
  TORCH_CHECK(at::isFloatingType(lse.scalar_type()), "selfattn native: lse must be float");
  StatsOut o = stats_outputs(P, q, col_sum, col_max, entropy, topk);
  P.need_out = false;
  P.lse_in = view_of(lse);
  if (P.B * P.Hq * P.Nq > 0 && P.Nk > 0)
    engine_for(P.dt).stats(P, kPool);
  else
    o.seen_nothing();
  return as_tuple(o);
}

// forward (out in q's dtype, lse) and the statistics of the same call: a decode step computes
// them in its own pass, any other call in a statistics pass after the forward.
std::tuple<at::Tensor, at::Tensor, OptT, OptT, OptT, OptT, OptT> forward_stats(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Call& call, bool col_sum,
    bool col_max, bool entropy, int64_t topk) {
  Params P;
  std::vector<at::Tensor> keep;
  fill(P, keep, q, k, v, call);
  TORCH_CHECK(P.dropout_p == 0, "selfattn native: forward_stats takes no dropout");
  P.out_dt = P.dt;
  at::Tensor out = at::empty({P.B, P.Hq, P.Nq, P.Dv}, q.options());
  at::Tensor lse = at::empty({P.B, P.Hq, P.Nq}, q.options().dtype(acc_type(q.scalar_type())));
  StatsOut o = stats_outputs(P, q, col_sum, col_max, entropy, topk);
  P.need_out = true;
  P.out = out.data_ptr();
  P.lse = lse.data_ptr();
  const bool rows = P.B * P.Hq * P.Nq > 0;
  if (rows && P.Nk > 0) {
    engine_for(P.dt).forward(P, kPool);
  } else {
    out.zero_();
    if (rows && call.sinks)  // no key at all: the lse is the sink, as in forward
      lse.copy_(call.sinks->detach().to(lse.scalar_type()).view({1, P.Hq, 1}).expand_as(lse));
    else
      lse.fill_(-INFINITY);
    o.seen_nothing();
  }
  return {out, lse, o.col_sum, o.col_max, o.entropy, o.topk_p, o.topk_index};
}

// The key bounds of each block of `block` rows of an (nq, nk) call under the record's causal /
// window rules (its start, causal, left, right).
at::Tensor bounds(const Call& call, int64_t nq, int64_t nk, int64_t block) {
  const Sides sides = window_sides(call, nq, nk);
  const int64_t start = call.start;
  TORCH_CHECK(block > 0, "selfattn native: block must be positive, got ", block);
  block = imin(block, imax(nq, 1));  // one block holds every row (and cdiv cannot overflow)
  int64_t nb = cdiv(nq, block);
  at::Tensor out = at::empty({nb, 4}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < nb; i++) {
    int64_t i0 = i * block, i1 = imin(nq, i0 + block);
    Bounds b = key_bounds(start + i0, start + i1 - 1, nk, call.causal, sides.left, sides.right);
    o[4 * i] = b.lo;
    o[4 * i + 1] = b.hi;
    o[4 * i + 2] = b.full_lo;
    o[4 * i + 3] = b.full_hi;
  }
  return out;
}

std::string isa(const std::string& dtype) {
  return engine_for(dtype == "float64" ? DT::F64 : DT::F32).name;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "selfattn native CPU attention engine";
  // Each function reads the call record with the GIL held, then releases it for the work.
  m.def(
      "forward",
      [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, py::handle call,
         bool need_out, bool out_acc) {
        const Call c = read_call(call);
        py::gil_scoped_release nogil;
        return forward(q, k, v, c, need_out, out_acc);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("call"), py::arg("need_out") = true,
      py::arg("out_acc") = false);
  m.def(
      "backward",
      [](const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
         const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dlse, py::handle call,
         bool need_dbias, bool need_dalibi) {
        const Call c = read_call(call);
        py::gil_scoped_release nogil;
        return backward(dout, q, k, v, out, lse, dlse, c, need_dbias, need_dalibi);
      },
      py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
      py::arg("dlse"), py::arg("call"), py::arg("need_dbias") = false,
      py::arg("need_dalibi") = false);
  m.def(
      "jvp",
      [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptT& tq,
         const OptT& tk, const OptT& tv, const OptT& tbias, const OptT& talibi, py::handle call,
         bool out_acc) {
        const Call c = read_call(call);
        py::gil_scoped_release nogil;
        return jvp(q, k, v, tq, tk, tv, tbias, talibi, c, out_acc);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("tq"), py::arg("tk"), py::arg("tv"),
      py::arg("tbias"), py::arg("talibi"), py::arg("call"), py::arg("out_acc") = false);
  m.def(
      "hessian",
      [](const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
         const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dlse, const OptT& gq,
         const OptT& gk, const OptT& gv, py::handle call, bool need_dout) {
        const Call c = read_call(call);
        py::gil_scoped_release nogil;
        return hessian(dout, q, k, v, out, lse, dlse, gq, gk, gv, c, need_dout);
      },
      py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"),
      py::arg("dlse"), py::arg("gq"), py::arg("gk"), py::arg("gv"), py::arg("call"),
      py::arg("need_dout") = true);
  m.def(
      "probabilities",
      [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse, py::handle call) {
        const Call c = read_call(call);
        py::gil_scoped_release nogil;
        return probabilities(q, k, lse, c);
      },
      py::arg("q"), py::arg("k"), py::arg("lse"), py::arg("call"));
  m.def(
      "stats",
      [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse, py::handle call,
         bool col_sum, bool col_max, bool entropy, int64_t topk) {
        const Call c = read_call(call);
        py::gil_scoped_release nogil;
        return stats(q, k, lse, c, col_sum, col_max, entropy, topk);
      },
      py::arg("q"), py::arg("k"), py::arg("lse"), py::arg("call"), py::arg("col_sum"),
      py::arg("col_max"), py::arg("entropy"), py::arg("topk"));
  m.def(
      "forward_stats",
      [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, py::handle call,
         bool col_sum, bool col_max, bool entropy, int64_t topk) {
        const Call c = read_call(call);
        py::gil_scoped_release nogil;
        return forward_stats(q, k, v, c, col_sum, col_max, entropy, topk);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("call"), py::arg("col_sum"),
      py::arg("col_max"), py::arg("entropy"), py::arg("topk"));
  m.def(
      "bounds",
      [](py::handle call, int64_t nq, int64_t nk, int64_t block) {
        return bounds(read_call(call), nq, nk, block);
      },
      py::arg("call"), py::arg("nq"), py::arg("nk"), py::arg("block"));
  m.def(
      "quantize",
      [](const at::Tensor& x, int64_t bits, int64_t group, bool rotate) -> py::object {
        // keys or values (..., D), contiguous float32 / float64 on the CPU (quantize.h)
        TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 1,
                    "selfattn native quantize: a contiguous CPU tensor (..., D)");
        TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                    "selfattn native quantize: float32 or float64, got ", x.scalar_type());
        const int64_t D = x.size(-1);
        TORCH_CHECK((bits == 8 || bits == 4) && D > 0 && group > 0 && D % group == 0 &&
                        ((bits == 8 && !rotate) || D % 2 == 0),
                    "selfattn native quantize: bits 8 or 4, a group dividing D (even for 4 "
                    "bits or rotate), got bits=", bits, " group=", group, " D=", D);
        std::vector<int64_t> cshape(x.sizes().begin(), x.sizes().end());
        std::vector<int64_t> sshape = cshape;
        cshape.back() = bits == 8 ? D : D / 2;
        sshape.back() = D / group;
        at::Tensor codes = at::empty(cshape, x.options().dtype(bits == 8 ? at::kChar : at::kByte));
        at::Tensor scales = at::empty(sshape, x.options().dtype(at::kFloat));
        const int64_t rows = D ? x.numel() / D : 0;
        bool ok;
        {
          py::gil_scoped_release nogil;
          ok = x.scalar_type() == at::kFloat
                   ? quantize_rows<float>(x.data_ptr<float>(), rows, D, int(bits), group, rotate,
                                          codes.data_ptr(), scales.data_ptr<float>())
                   : quantize_rows<double>(x.data_ptr<double>(), rows, D, int(bits), group,
                                           rotate, codes.data_ptr(), scales.data_ptr<float>());
        }
        if (!ok) return py::none();  // a non-finite value: torch's rules (quantize_kv) decide
        return py::make_tuple(codes, scales);
      },
      py::arg("x"), py::arg("bits"), py::arg("group"), py::arg("rotate"));
  m.def("isa", &isa, py::arg("dtype") = "float32");
  py::tuple fields(kCallFields);
  size_t i = 0;
#define SELFATTN_NAME(T, name) fields[i++] = py::str(#name);
  SELFATTN_CALL_FIELDS(SELFATTN_NAME)
#undef SELFATTN_NAME
  m.attr("CALL_FIELDS") = fields;
}
