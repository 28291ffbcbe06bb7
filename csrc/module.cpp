// fastdiff._C: the compiled part of fastdiff. Plain pybind11, no PyTorch headers: one build
// works with every torch version. Arrays cross the boundary as numpy float64 / int64.

#include "columns.h"
#include "common.h"

namespace fastdiff {
void register_schedules(py::module_& m);
void register_tables(py::module_& m);
void register_sigmas(py::module_& m);
void register_cpu_step(py::module_& m);
}  // namespace fastdiff

PYBIND11_MODULE(_C, m) {
  using namespace fastdiff;
  m.doc() = "fastdiff._C: float64 noise schedules, timesteps and per-step coefficient tables";
  py::list names;
  for (int i = 0; i < NCOL; ++i) names.append(kColumnNames[i]);
  m.attr("COLUMNS") = py::tuple(names);
  m.attr("NCOL") = static_cast<int>(NCOL);
  register_schedules(m);
  register_tables(m);
  register_sigmas(m);
  register_cpu_step(m);
}
