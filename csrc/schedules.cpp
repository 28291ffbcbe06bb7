// fastdiff._C: noise schedules (betas, alpha_bar) and timestep selection, in float64.
//
// Notation (VP diffusion): x_t = sqrt(ab_t) x0 + sigma_t eps, sigma_t^2 = 1 - ab_t,
// where ab is alpha_bar, the cumulative product of (1 - beta).

#include "common.h"

namespace fastdiff {
namespace {

// --- schedules ---------------------------------------------------------------------------

py::array_t<double> make_betas(const std::string& name, int64_t num_train_timesteps,
                               double beta_start, double beta_end) {
  check_num_train(num_train_timesteps);
  const int64_t n = num_train_timesteps;
  std::vector<double> betas(n);
  if (name == "linear") {
    betas = linspace(beta_start, beta_end, n);
  } else if (name == "scaled_linear") {
    if (beta_start < 0.0 || beta_end < 0.0)
      value_error("scaled_linear needs beta_start >= 0 and beta_end >= 0, got " + fmt(beta_start) +
                  " and " + fmt(beta_end));
    betas = linspace(std::sqrt(beta_start), std::sqrt(beta_end), n);
    for (auto& b : betas) b = b * b;
  } else if (name == "squaredcos_cap_v2" || name == "cosine") {
    // Nichol & Dhariwal (2021): ab(t) = cos^2((t + 0.008) / 1.008 * pi / 2), betas capped at 0.999.
    auto ab = [](double t) {
      const double c = std::cos((t + 0.008) / 1.008 * M_PI / 2.0);
      return c * c;
    };
    for (int64_t i = 0; i < n; ++i) {
      const double t1 = static_cast<double>(i) / static_cast<double>(n);
      const double t2 = static_cast<double>(i + 1) / static_cast<double>(n);
      betas[i] = std::min(1.0 - ab(t2) / ab(t1), 0.999);
    }
  } else if (name == "sigmoid") {
    auto x = linspace(-6.0, 6.0, n);
    for (int64_t i = 0; i < n; ++i)
      betas[i] = 1.0 / (1.0 + std::exp(-x[i])) * (beta_end - beta_start) + beta_start;
  } else {
    value_error("unknown beta_schedule '" + name +
                "': expected one of 'linear', 'scaled_linear', 'squaredcos_cap_v2' (alias 'cosine'), "
                "'sigmoid', or explicit betas");
  }
  check_betas(betas, false);
  return from_vec(betas);
}

py::array_t<double> validate_betas(const DoubleArray& b) {
  auto betas = to_vec(b, "betas");
  check_betas(betas, false);
  return from_vec(betas);
}

// Lin et al. (2024), "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1:
// shift and scale sqrt(ab) so that its last value is exactly 0 and its first is unchanged.
py::array_t<double> rescale_zero_terminal_snr(
    const DoubleArray& b) {
  auto betas = to_vec(b, "betas");
  check_betas(betas, false);
  const size_t n = betas.size();
  if (n < 2) value_error("zero-terminal-SNR rescaling needs at least 2 betas, got " + std::to_string(n));
  std::vector<double> s(n);
  double ab = 1.0;
  for (size_t i = 0; i < n; ++i) {
    ab *= 1.0 - betas[i];
    s[i] = std::sqrt(ab);
  }
  const double s0 = s[0], sT = s[n - 1];
  if (!(s0 > sT)) value_error("zero-terminal-SNR rescaling needs alpha_bar to decrease over the schedule");
  std::vector<double> ab_new(n), out(n);
  for (size_t i = 0; i < n; ++i) {
    const double v = (s[i] - sT) * (s0 / (s0 - sT));
    ab_new[i] = v * v;
  }
  out[0] = 1.0 - ab_new[0];
  for (size_t i = 1; i < n; ++i) out[i] = 1.0 - ab_new[i] / ab_new[i - 1];
  return from_vec(out);
}

py::array_t<double> alphas_cumprod(const DoubleArray& b) {
  auto betas = to_vec(b, "betas");
  check_betas(betas, true);
  std::vector<double> ab(betas.size());
  double acc = 1.0;
  for (size_t i = 0; i < betas.size(); ++i) {
    acc *= 1.0 - betas[i];
    ab[i] = acc;
  }
  return from_vec(ab);
}

// --- timesteps ---------------------------------------------------------------------------

// The spacing rules of diffusers' schedulers, reproduced exactly (numpy's round-half-even).
py::array_t<int64_t> make_timesteps(int64_t num_train_timesteps, int64_t num_steps,
                                    const std::string& spacing, int64_t steps_offset) {
  check_num_train(num_train_timesteps);
  if (num_steps < 1) value_error("the number of sampling steps must be >= 1, got " + std::to_string(num_steps));
  if (num_steps > num_train_timesteps)
    value_error("the number of sampling steps (" + std::to_string(num_steps) +
                ") must not exceed num_train_timesteps (" + std::to_string(num_train_timesteps) + ")");
  std::vector<int64_t> ts;
  ts.reserve(num_steps + 1);
  if (spacing == "linspace") {
    auto y = linspace(0.0, static_cast<double>(num_train_timesteps - 1), num_steps);
    for (int64_t i = num_steps - 1; i >= 0; --i) ts.push_back(static_cast<int64_t>(std::nearbyint(y[i])));
  } else if (spacing == "leading") {
    const int64_t ratio = num_train_timesteps / num_steps;
    for (int64_t i = num_steps - 1; i >= 0; --i) ts.push_back(i * ratio + steps_offset);
  } else if (spacing == "trailing") {
    // np.round(np.arange(N, 0, -N / K)) - 1 with numpy's arange fill rule (start + i * delta,
    // delta = (start + step) - start). numpy's length ceil(N / (N / K)) is K + 1 for some (N, K)
    // (e.g. 1000, 61) through rounding, which puts a timestep -1 at the end; we keep exactly K.
    const double start = static_cast<double>(num_train_timesteps);
    const double step = -start / static_cast<double>(num_steps);
    const double delta = (start + step) - start;
    for (int64_t i = 0; i < num_steps; ++i) {
      const double v = i == 0 ? start : start + static_cast<double>(i) * delta;
      ts.push_back(static_cast<int64_t>(std::nearbyint(v)) - 1);
    }
  } else {
    value_error("unknown timestep_spacing '" + spacing + "': expected 'leading', 'trailing' or 'linspace'");
  }
  for (auto t : ts)
    if (t < 0 || t >= num_train_timesteps)
      value_error("timestep_spacing '" + spacing + "' with steps_offset " + std::to_string(steps_offset) +
                  " gives timestep " + std::to_string(t) + ", outside [0, " +
                  std::to_string(num_train_timesteps) + ")");
  return from_ivec(ts);
}

void check_custom(const std::vector<int64_t>& ts, int64_t num_train_timesteps) {
  if (ts.empty()) value_error("timesteps must not be empty");
  for (size_t i = 0; i < ts.size(); ++i) {
    if (ts[i] < 0 || ts[i] >= num_train_timesteps)
      value_error("timesteps must lie in [0, num_train_timesteps=" + std::to_string(num_train_timesteps) +
                  "), got timesteps[" + std::to_string(i) + "] = " + std::to_string(ts[i]));
    if (i > 0 && ts[i] >= ts[i - 1])
      value_error("timesteps must be strictly descending, got timesteps[" + std::to_string(i - 1) + "] = " +
                  std::to_string(ts[i - 1]) + " and timesteps[" + std::to_string(i) + "] = " +
                  std::to_string(ts[i]));
  }
}

py::array_t<int64_t> validate_timesteps(
    const IntArray& t, int64_t num_train_timesteps) {
  check_num_train(num_train_timesteps);
  auto ts = to_ivec(t, "timesteps");
  check_custom(ts, num_train_timesteps);
  return from_ivec(ts);
}

}  // namespace

void register_schedules(py::module_& m) {
  m.def("make_betas", &make_betas, py::arg("name"), py::arg("num_train_timesteps"), py::arg("beta_start"),
        py::arg("beta_end"), "Betas of a named schedule, float64.");
  m.def("validate_betas", &validate_betas, py::arg("betas"), "Check explicit betas lie in (0, 1).");
  m.def("rescale_zero_terminal_snr", &rescale_zero_terminal_snr, py::arg("betas"),
        "Rescale betas to zero terminal SNR (Lin et al., 2024).");
  m.def("alphas_cumprod", &alphas_cumprod, py::arg("betas"), "Cumulative product of (1 - beta).");
  m.def("make_timesteps", &make_timesteps, py::arg("num_train_timesteps"), py::arg("num_steps"),
        py::arg("spacing"), py::arg("steps_offset") = 0, "Descending timesteps for a spacing rule.");
  m.def("validate_timesteps", &validate_timesteps, py::arg("timesteps"), py::arg("num_train_timesteps"),
        "Check an explicit timestep list: strictly descending, inside [0, num_train_timesteps).");
}

}  // namespace fastdiff
