// Helpers shared by the fastdiff._C sources: errors that name the constraint, numpy <-> vector.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastdiff {

namespace py = pybind11;

using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;
using IntArray = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

[[noreturn]] inline void value_error(const std::string& msg) { throw py::value_error(msg); }

inline std::string fmt(double v) {
  std::ostringstream s;
  s.precision(17);
  s << v;
  return s.str();
}

inline std::vector<double> to_vec(const DoubleArray& a,
                           const char* what) {
  if (a.ndim() != 1) value_error(std::string(what) + " must be one-dimensional, got " +
                                 std::to_string(a.ndim()) + " dimensions");
  return std::vector<double>(a.data(), a.data() + a.shape(0));
}

inline std::vector<int64_t> to_ivec(const IntArray& a,
                             const char* what) {
  if (a.ndim() != 1) value_error(std::string(what) + " must be one-dimensional, got " +
                                 std::to_string(a.ndim()) + " dimensions");
  return std::vector<int64_t>(a.data(), a.data() + a.shape(0));
}

inline py::array_t<double> from_vec(const std::vector<double>& v) {
  py::array_t<double> out(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

inline py::array_t<int64_t> from_ivec(const std::vector<int64_t>& v) {
  py::array_t<int64_t> out(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

// The upper bound keeps the per-timestep tables of the drop-ins ([N, NCOL] float64) small and
// every allocation sized by N far from max_size() (fastdiff.engine.schedule.MAX_TRAIN_TIMESTEPS).
constexpr int64_t kMaxTrainTimesteps = int64_t(1) << 20;

inline void check_num_train(int64_t n) {
  if (n < 1 || n > kMaxTrainTimesteps)
    value_error("num_train_timesteps must be an int in [1, 2**20], got " + std::to_string(n));
}

// np.linspace(start, stop, num): y_i = i * ((stop - start) / (num - 1)) + start, last = stop.
inline std::vector<double> linspace(double start, double stop, int64_t num) {
  std::vector<double> y(num);
  if (num == 1) {
    y[0] = start;
    return y;
  }
  const double step = (stop - start) / static_cast<double>(num - 1);
  for (int64_t i = 0; i < num; ++i) y[i] = static_cast<double>(i) * step + start;
  y[num - 1] = stop;
  return y;
}

inline void check_betas(const std::vector<double>& betas, bool allow_last_one) {
  if (betas.empty()) value_error("betas must not be empty");
  for (size_t i = 0; i < betas.size(); ++i) {
    const double b = betas[i];
    const bool last = i + 1 == betas.size();
    const bool ok = std::isfinite(b) && b > 0.0 && (b < 1.0 || (allow_last_one && last && b == 1.0));
    if (!ok)
      value_error("every beta must lie in the open interval (0, 1), got betas[" + std::to_string(i) +
                  "] = " + fmt(b));
  }
}


}  // namespace fastdiff
