// Python bindings of the CPU kernels: rspo_kernels._cpu. Thin on purpose: check the buffers,
// release the GIL, call the kernel. std::invalid_argument surfaces as ValueError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "rspo_kernels.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(_OPENMP) && defined(__unix__)
#include <pthread.h>
#endif

namespace py = pybind11;

namespace {

void require(bool ok, const std::string& message) {
    if (!ok) throw std::invalid_argument(message);
}

// values: 1-D contiguous float32/float64; offsets: 1-D contiguous int64 of G + 1 entries ending at
// len(values); out: writeable, contiguous, same dtype, `out_len` entries. Returns G.
int64_t check_buffers(const py::array& values, const py::array& offsets, const py::array& out, bool per_group) {
    const auto contiguous = py::array::c_style;
    require(values.ndim() == 1 && (values.flags() & contiguous), "values must be a 1-D contiguous array");
    require(values.dtype().is(py::dtype::of<float>()) || values.dtype().is(py::dtype::of<double>()),
            "values must be float32 or float64");
    require(offsets.ndim() == 1 && (offsets.flags() & contiguous) && offsets.dtype().is(py::dtype::of<int64_t>()),
            "offsets must be a 1-D contiguous int64 array");
    require(offsets.shape(0) >= 1, "offsets must have at least one entry");
    const int64_t num_groups = offsets.shape(0) - 1;
    const int64_t* off = static_cast<const int64_t*>(offsets.data());
    require(off[num_groups] == values.shape(0), "offsets[-1] must equal len(values)");
    require(out.ndim() == 1 && (out.flags() & contiguous) && out.writeable(), "out must be a writeable 1-D contiguous array");
    require(out.dtype().is(values.dtype()), "out must have the dtype of values");
    require(out.shape(0) == (per_group ? num_groups : values.shape(0)),
            per_group ? "out must have one entry per group" : "out must have the length of values");
    return num_groups;
}

template <typename T, typename Kernel>
void run(const py::array& values, const py::array& offsets, py::array& out, int64_t num_groups, Kernel kernel) {
    const T* v = static_cast<const T*>(values.data());
    const int64_t* off = static_cast<const int64_t*>(offsets.data());
    T* o = static_cast<T*>(out.mutable_data());
    py::gil_scoped_release release;
    kernel(v, off, num_groups, o);
}

template <typename Call>
void dispatch(const py::array& values, const py::array& offsets, py::array& out, bool per_group, Call call) {
    const int64_t num_groups = check_buffers(values, offsets, out, per_group);
    if (values.dtype().is(py::dtype::of<float>())) {
        run<float>(values, offsets, out, num_groups, [&](const float* v, const int64_t* off, int64_t g, float* o) { call(v, off, g, o); });
    } else {
        run<double>(values, offsets, out, num_groups, [&](const double* v, const int64_t* off, int64_t g, double* o) { call(v, off, g, o); });
    }
}

int64_t weights(const py::array& values, const py::array& offsets, int64_t k, const std::string& objective,
                const std::string& estimator, py::array out, bool validate) {
    const rspo::Objective obj = rspo::parse_objective(objective);
    const rspo::Estimator est = rspo::parse_estimator(estimator);
    int64_t bad = -1;
    dispatch(values, offsets, out, false, [&](auto v, auto off, int64_t g, auto o) {
        bad = rspo::grouped_weights(v, off, g, k, obj, est, validate, o);
    });
    return bad;
}

void pass_at_k(const py::array& values, const py::array& offsets, int64_t k, py::array out) {
    dispatch(values, offsets, out, true, [&](auto v, auto off, int64_t g, auto o) { rspo::pass_at_k_metric(v, off, g, k, o); });
}

void max_at_k(const py::array& values, const py::array& offsets, int64_t k, py::array out) {
    dispatch(values, offsets, out, true, [&](auto v, auto off, int64_t g, auto o) { rspo::max_at_k_metric(v, off, g, k, o); });
}

int64_t first_invalid(const py::array& values, bool binary) {
    require(values.ndim() == 1 && (values.flags() & py::array::c_style), "values must be a 1-D contiguous array");
    const int64_t n = values.shape(0);
    if (values.dtype().is(py::dtype::of<float>())) {
        const float* v = static_cast<const float*>(values.data());
        py::gil_scoped_release release;
        return rspo::first_invalid(v, n, binary);
    }
    require(values.dtype().is(py::dtype::of<double>()), "values must be float32 or float64");
    const double* v = static_cast<const double*>(values.data());
    py::gil_scoped_release release;
    return rspo::first_invalid(v, n, binary);
}

#if defined(_OPENMP) && defined(__unix__)
// A forked child inherits the parent's OpenMP runtime but not its worker threads: GNU libgomp's
// next parallel region waits for them forever (multiprocessing's default "fork" start method on
// Linux, DataLoader workers). Like torch, make the child single-threaded; it can raise the count
// again with omp_set_num_threads once it has its own runtime state (a fresh exec).
void single_threaded_after_fork() { omp_set_num_threads(1); }
#endif

}  // namespace

PYBIND11_MODULE(_cpu, m) {
#if defined(_OPENMP) && defined(__unix__)
    pthread_atfork(nullptr, nullptr, single_threaded_after_fork);
#endif
    m.doc() = "C++ CPU kernels of rspo_kernels (see csrc/rspo_kernels.hpp).";
    m.def("weights", &weights, py::arg("values"), py::arg("offsets"), py::arg("k"), py::arg("objective"),
          py::arg("estimator"), py::arg("out"), py::arg("validate") = false,
          "Write the per-sample weights of (objective, estimator) for grouped rewards into out. With "
          "validate=True, return the index of the first reward that is not finite (max@k) or not exactly 0 or 1 "
          "(pass@k), checked in the kernel's own read where it can be, else -1 (out is then unspecified).");
    m.def("pass_at_k", &pass_at_k, py::arg("values"), py::arg("offsets"), py::arg("k"), py::arg("out"),
          "Write the unbiased pass@k of each group of binary rewards into out.");
    m.def("max_at_k", &max_at_k, py::arg("values"), py::arg("offsets"), py::arg("k"), py::arg("out"),
          "Write the unbiased max@k of each group into out.");
    m.def("first_invalid", &first_invalid, py::arg("values"), py::arg("binary"),
          "Index of the first non-finite value (or, with binary=True, the first value not exactly 0 or 1); "
          "-1 if there is none. One pass, for the public API's value checks on CPU tensors.");
#ifdef _OPENMP
    m.attr("openmp") = true;
    m.def("max_threads", []() { return omp_get_max_threads(); }, "OpenMP threads a parallel kernel may use.");
#else
    m.attr("openmp") = false;
    m.def("max_threads", []() { return 1; }, "OpenMP threads a parallel kernel may use.");
#endif
}
