// Python bindings: argument checks (one-line ValueError / TypeError messages),
// output allocation, and the GIL released around the kernels.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <initializer_list>
#include <string>

#include "kernels.h"
#include "memory.h"
#include "threads.h"

namespace nb = nanobind;
using namespace nb::literals;
using ovseg::Buffer;

namespace {

using Array = nb::ndarray<nb::ro>;

[[noreturn]] void value_error(const std::string& message) { throw nb::value_error(message.c_str()); }
[[noreturn]] void type_error(const std::string& message) { throw nb::type_error(message.c_str()); }

std::string py_type(nb::handle h) { return nb::type_name(h.type()).c_str(); }

std::string dtype_name(nb::dlpack::dtype dt) {
  using Code = nb::dlpack::dtype_code;
  switch (static_cast<Code>(dt.code)) {
    case Code::Bool: return "bool";
    case Code::Int: return "int" + std::to_string(dt.bits);
    case Code::UInt: return "uint" + std::to_string(dt.bits);
    case Code::Float: return "float" + std::to_string(dt.bits);
    case Code::Complex: return "complex" + std::to_string(dt.bits);
    default: return "dtype code " + std::to_string(dt.code);
  }
}

template <class T> std::string dtype_name() { return dtype_name(nb::dtype<T>()); }

std::string shape_str(const Array& a) {
  std::string s = "(";
  for (size_t i = 0; i < a.ndim(); ++i)
    s += std::to_string(a.shape(i)) + (a.ndim() == 1 ? "," : i + 1 < a.ndim() ? ", " : "");
  return s + ")";
}

std::string dims(std::initializer_list<int64_t> d) {
  std::string s = "(";
  size_t i = 0;
  for (int64_t v : d) s += std::to_string(v) + (++i < d.size() ? ", " : "");
  return s + ")";
}

// A C-contiguous, non-empty CPU array of T with `ndim` dimensions.
template <class T>
Array array_arg(nb::handle h, const std::string& name, size_t ndim, const char* layout) {
  Array a;
  if (!nb::try_cast(h, a, false)) {
    if (nb::hasattr(h, "shape") && nb::hasattr(h, "dtype"))
      value_error(name + " could not be read as a CPU array; pass np.ascontiguousarray(" + name + ")");
    type_error(name + " must be a numpy array " + layout + " of " + dtype_name<T>() + ", got " + py_type(h));
  }
  if (a.device_type() != nb::device::cpu::value)
    type_error(name + " must be a CPU (numpy) array");
  if (a.dtype() != nb::dtype<T>())
    type_error(name + " must have dtype " + dtype_name<T>() + ", got " + dtype_name(a.dtype()));
  if (a.ndim() != ndim)
    value_error(name + " must be " + std::to_string(ndim) + "-D " + layout + ", got shape " + shape_str(a));
  for (size_t i = 0; i < ndim; ++i)
    if (a.shape(i) == 0)
      value_error(name + " must not be empty, got shape " + shape_str(a));
  int64_t expect = 1;
  for (size_t i = ndim; i-- > 0;) {
    if (a.shape(i) != 1 && a.stride(i) != expect)
      value_error(name + " must be C-contiguous; pass np.ascontiguousarray(" + name + ")");
    expect *= static_cast<int64_t>(a.shape(i));
  }
  return a;
}

template <class T> const T* ptr(const Array& a) { return static_cast<const T*>(a.data()); }
int64_t dim(const Array& a, size_t i) { return static_cast<int64_t>(a.shape(i)); }

// h as a Python int: anything with __index__ except bool.
nb::object index_arg(nb::handle h, const std::string& name) {
  if (PyBool_Check(h.ptr()) || !PyIndex_Check(h.ptr()))
    type_error(name + " must be an int, got " + py_type(h));
  nb::object i = nb::steal(PyNumber_Index(h.ptr()));
  if (!i.is_valid()) throw nb::python_error();
  return i;
}

int64_t int_arg(nb::handle h, const std::string& name) {
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(index_arg(h, name).ptr(), &overflow);
  if (overflow) value_error(name + " is out of range");
  return v;
}

int64_t int_at_least(nb::handle h, const std::string& name, int64_t lo) {
  const int64_t v = int_arg(h, name);
  if (v < lo)
    value_error(name + " must be >= " + std::to_string(lo) + ", got " + std::to_string(v));
  return v;
}

uint64_t uint64_arg(nb::handle h, const std::string& name) {
  const nb::object i = index_arg(h, name);
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(i.ptr(), &overflow);
  if (overflow < 0 || (overflow == 0 && v < 0))
    value_error(name + " must be >= 0, got " + nb::str(i).c_str());
  if (overflow == 0) return static_cast<uint64_t>(v);
  const unsigned long long u = PyLong_AsUnsignedLongLong(i.ptr());
  if (PyErr_Occurred()) {
    PyErr_Clear();
    value_error(name + " must be < 2**64");
  }
  return u;
}

double float_arg(nb::handle h, const std::string& name) {
  if (!PyFloat_Check(h.ptr()) && !PyLong_Check(h.ptr()) && !nb::hasattr(h, "__float__"))
    type_error(name + " must be a float, got " + py_type(h));
  const double v = PyFloat_AsDouble(h.ptr());
  if (v == -1.0 && PyErr_Occurred()) throw nb::python_error();
  if (!std::isfinite(v)) value_error(name + " must be finite, got " + std::to_string(v));
  return v;
}

void check_finite(const float* p, int64_t n, const std::string& name) {
  if (!ovseg::all_finite(p, n)) value_error(name + " contains NaN or Inf");
}

// Output array owned by a capsule that frees the tracked buffer.
template <class T>
nb::object wrap(Buffer<T>& buf, std::initializer_list<size_t> shape,
                nb::dlpack::dtype dt = nb::dtype<T>()) {
  void* p = buf.release();
  nb::capsule owner(p, [](void* q) noexcept { ovseg::tracked_free(q); });
  return nb::cast(nb::ndarray<nb::numpy>(p, shape, owner, {}, dt));
}

// ---- upsample_argmax / pooling ----

// scores [K, h, w] and the output size (out_h, out_w).
struct ScoresCall {
  Array scores;
  int64_t K = 0, h = 0, w = 0, out_h = 0, out_w = 0;
};

ScoresCall parse_scores(nb::handle scores, nb::handle out_h, nb::handle out_w) {
  ScoresCall c;
  c.scores = array_arg<float>(scores, "scores", 3, "[K, h, w]");
  c.K = dim(c.scores, 0);
  c.h = dim(c.scores, 1);
  c.w = dim(c.scores, 2);
  c.out_h = int_at_least(out_h, "out_h", 1);
  c.out_w = int_at_least(out_w, "out_w", 1);
  return c;
}

// The int32 label map [out_h, out_w]; call with the GIL released.
void argmax_into(const ScoresCall& c, int32_t* labels) {
  check_finite(ptr<float>(c.scores), c.K * c.h * c.w, "scores");
  ovseg::upsample_argmax(ptr<float>(c.scores), c.K, c.h, c.w, c.out_h, c.out_w, labels);
}

nb::object upsample_argmax(nb::handle scores, nb::handle out_h, nb::handle out_w) {
  const ScoresCall c = parse_scores(scores, out_h, out_w);
  Buffer<int32_t> labels(c.out_h * c.out_w);
  {
    nb::gil_scoped_release release;
    argmax_into(c, labels.data());
  }
  return wrap(labels, {size_t(c.out_h), size_t(c.out_w)});
}

nb::tuple pool_from_scores(nb::handle scores, nb::handle features, nb::handle out_h,
                           nb::handle out_w) {
  const ScoresCall s = parse_scores(scores, out_h, out_w);
  const Array f = array_arg<float>(features, "features", 3, "[hf, wf, D]");
  const int64_t H = s.out_h, W = s.out_w, K = s.K, D = dim(f, 2);
  Buffer<int32_t> labels(H * W);
  Buffer<float> emb(K * D), areas(K);
  {
    nb::gil_scoped_release release;
    argmax_into(s, labels.data());
    if (!ovseg::pool_segments(labels.data(), H, W, ptr<float>(f), dim(f, 0), dim(f, 1), D, K,
                              emb.data(), areas.data()))
      throw nb::value_error("features contains NaN or Inf");
  }
  return nb::make_tuple(wrap(emb, {size_t(K), size_t(D)}), wrap(areas, {size_t(K)}),
                        wrap(labels, {size_t(H), size_t(W)}));
}

// ---- k-means ----

nb::tuple kmeans(nb::handle x_, nb::handle k_, nb::handle max_iter_, nb::handle seed_,
                 nb::handle init_, nb::handle tol_) {
  const Array x = array_arg<float>(x_, "x", 2, "[N, D]");
  const int64_t N = dim(x, 0), D = dim(x, 1);
  const int64_t k = int_at_least(k_, "k", 1);
  const int64_t max_iter = int_at_least(max_iter_, "max_iter", 0);
  const uint64_t seed = uint64_arg(seed_, "seed");
  const double tol = float_arg(tol_, "tol");
  if (tol < 0.0) value_error("tol must be >= 0, got " + std::to_string(tol));
  Array init;
  if (!init_.is_none()) {
    init = array_arg<float>(init_, "init", 2, "[k, D]");
    if (dim(init, 0) != k || dim(init, 1) != D)
      value_error("init must have shape (k, D) = " + dims({k, D}) + ", got " + shape_str(init));
  }
  Buffer<float> centres(k * D), scores(N * k);
  Buffer<int32_t> assign(N);
  {
    nb::gil_scoped_release release;
    check_finite(ptr<float>(x), N * D, "x");
    if (init.is_valid()) {
      check_finite(ptr<float>(init), k * D, "init");
      for (int64_t j = 0; j < k; ++j) {
        const float* row = ptr<float>(init) + j * D;
        if (std::all_of(row, row + D, [](float v) { return v == 0.0f; }))
          value_error("init row " + std::to_string(j) + " is all zeros");
      }
    }
    ovseg::spherical_kmeans(ptr<float>(x), N, D, k, max_iter, seed,
                            init.is_valid() ? ptr<float>(init) : nullptr, tol, centres.data(),
                            assign.data(), scores.data());
  }
  return nb::make_tuple(wrap(centres, {size_t(k), size_t(D)}), wrap(assign, {size_t(N)}),
                        wrap(scores, {size_t(N), size_t(k)}));
}

}  // namespace

NB_MODULE(_native, m) {
  m.doc() = "ovseg native core: fused segment pooling, label-map rendering, spherical k-means";

  m.def("upsample_argmax", &upsample_argmax, "scores"_a, "out_h"_a, "out_w"_a);

  m.def("pool_segments_from_scores", &pool_from_scores, "scores"_a, "features"_a, "out_h"_a,
        "out_w"_a);

  m.def("spherical_kmeans", &kmeans, "x"_a, "k"_a, "max_iter"_a = 10, "seed"_a = 0,
        "init"_a = nb::none(), "tol"_a = 1e-4);

  m.def("set_num_threads", [](nb::handle n) {
    const int64_t v = int_at_least(n, "n", 1);
    if (v > 1024) value_error("n must be <= 1024, got " + std::to_string(v));
    ovseg::set_num_threads(static_cast<int>(v));
  }, "n"_a);
  m.def("get_num_threads", [] { return ovseg::num_threads(); });

  m.def("default_palette",
        [](nb::handle k_) {
          const int64_t k = int_at_least(k_, "k", 1);
          Buffer<uint8_t> p(k * 3);
          ovseg::default_palette(k, p.data());
          return wrap(p, {size_t(k), 3});
        },
        "k"_a);

  m.def("peak_allocated_bytes", [](bool reset) { return ovseg::tracked_peak_bytes(reset); },
        "reset"_a = true);
}
