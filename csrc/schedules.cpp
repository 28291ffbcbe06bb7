// fastdiff._C: noise schedules and per-step coefficient tables, in float64.
//
// Everything here depends only on the schedule configuration and the step count, so it is
// computed once on the host.  The module is plain pybind11 (no PyTorch headers): one build
// works with every torch version.  Arrays cross the boundary as numpy float64 / int64.
//
// Notation (VP diffusion): x_t = sqrt(ab_t) x0 + sigma_t eps, sigma_t^2 = 1 - ab_t,
// where ab is alpha_bar, the cumulative product of (1 - beta).  A step goes t -> s < t.

#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

// Column layout of every coefficient table.  Python reads the names from COLUMNS, the
// kernels use the indices; keep the two in sync through fastdiff/kernels/vp_step.py.
enum Col : int {
  SQRT_AB_T = 0,   // sqrt(ab_t)
  SIGMA_T = 1,     // sigma_t = sqrt(1 - ab_t)
  C_X0 = 2,        // coefficient of x0_hat in the update
  C_EPS = 3,       // coefficient of eps_hat
  C_XT = 4,        // coefficient of x_t
  STD = 5,         // standard deviation of the injected noise (0 on noise-free steps)
  C_COV = 6,       // OCM: d x_s / d x0_hat at fixed x_t, multiplies the posterior std
  COV_SCALE = 7,   // OCM: sigma_t^2 / ab_t, Sigma0 = COV_SCALE * (1 + h)
  LOG_VAR_MIN = 8, // learned_range: log of the fixed_small variance (clamped at 1e-20)
  LOG_VAR_MAX = 9, // learned_range: log of beta_{t|s}
  VAR_MAX = 10,    // cap on the total per-element variance (OCM variance clip), +inf if none
  NOISE = 11,      // 1 where the OCM / learned variance modes inject noise, 0 where they do not
  T = 12,          // the timestep t of this step
  PREV_T = 13,     // the timestep s it steps to (-1 for the final step)
  SQRT_AB_S = 14,  // sqrt(ab_s)
  SIGMA_S = 15,    // sqrt(1 - ab_s)
  NCOL = 16
};

const char* const kColumnNames[NCOL] = {
    "sqrt_ab_t", "sigma_t", "c_x0",  "c_eps",     "c_xt", "std",  "c_cov",  "cov_scale",
    "log_var_min", "log_var_max", "var_max", "noise", "t", "prev_t", "sqrt_ab_s", "sigma_s"};

[[noreturn]] void value_error(const std::string& msg) { throw py::value_error(msg); }

std::string fmt(double v) {
  std::ostringstream s;
  s.precision(17);
  s << v;
  return s.str();
}

std::vector<double> to_vec(const py::array_t<double, py::array::c_style | py::array::forcecast>& a,
                           const char* what) {
  if (a.ndim() != 1) value_error(std::string(what) + " must be one-dimensional, got " +
                                 std::to_string(a.ndim()) + " dimensions");
  return std::vector<double>(a.data(), a.data() + a.shape(0));
}

std::vector<int64_t> to_ivec(const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& a,
                             const char* what) {
  if (a.ndim() != 1) value_error(std::string(what) + " must be one-dimensional, got " +
                                 std::to_string(a.ndim()) + " dimensions");
  return std::vector<int64_t>(a.data(), a.data() + a.shape(0));
}

py::array_t<double> from_vec(const std::vector<double>& v) {
  py::array_t<double> out(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

py::array_t<int64_t> from_ivec(const std::vector<int64_t>& v) {
  py::array_t<int64_t> out(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), out.mutable_data());
  return out;
}

void check_num_train(int64_t n) {
  if (n < 1) value_error("num_train_timesteps must be >= 1, got " + std::to_string(n));
}

// np.linspace(start, stop, num): y_i = i * ((stop - start) / (num - 1)) + start, last = stop.
std::vector<double> linspace(double start, double stop, int64_t num) {
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

void check_betas(const std::vector<double>& betas, bool allow_last_one) {
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

py::array_t<double> validate_betas(const py::array_t<double, py::array::c_style | py::array::forcecast>& b) {
  auto betas = to_vec(b, "betas");
  check_betas(betas, false);
  return from_vec(betas);
}

// Lin et al. (2024), "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1:
// shift and scale sqrt(ab) so that its last value is exactly 0 and its first is unchanged.
py::array_t<double> rescale_zero_terminal_snr(
    const py::array_t<double, py::array::c_style | py::array::forcecast>& b) {
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

py::array_t<double> alphas_cumprod(const py::array_t<double, py::array::c_style | py::array::forcecast>& b) {
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
    const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& t, int64_t num_train_timesteps) {
  check_num_train(num_train_timesteps);
  auto ts = to_ivec(t, "timesteps");
  check_custom(ts, num_train_timesteps);
  return from_ivec(ts);
}

// --- coefficient tables ------------------------------------------------------------------

struct StepAlphas {
  double ab_t, ab_s;
};

struct TableInput {
  std::vector<double> ab;
  std::vector<int64_t> t, s;
};

TableInput table_input(const py::array_t<double, py::array::c_style | py::array::forcecast>& alphas_cumprod,
                       const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& timesteps,
                       const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& prev_timesteps,
                       double final_alpha_cumprod) {
  TableInput in{to_vec(alphas_cumprod, "alphas_cumprod"), to_ivec(timesteps, "timesteps"),
                to_ivec(prev_timesteps, "prev_timesteps")};
  const int64_t n = static_cast<int64_t>(in.ab.size());
  if (n == 0) value_error("alphas_cumprod must not be empty");
  for (int64_t i = 0; i < n; ++i)
    if (!(in.ab[i] >= 0.0 && in.ab[i] <= 1.0))
      value_error("alphas_cumprod must lie in [0, 1], got alphas_cumprod[" + std::to_string(i) + "] = " +
                  fmt(in.ab[i]));
  if (in.t.empty()) value_error("timesteps must not be empty");
  if (in.t.size() != in.s.size())
    value_error("timesteps and prev_timesteps must have the same length, got " + std::to_string(in.t.size()) +
                " and " + std::to_string(in.s.size()));
  for (size_t i = 0; i < in.t.size(); ++i) {
    if (in.t[i] < 0 || in.t[i] >= n)
      value_error("timesteps must lie in [0, " + std::to_string(n) + "), got timesteps[" + std::to_string(i) +
                  "] = " + std::to_string(in.t[i]));
    if (in.s[i] >= n)
      value_error("prev_timesteps must be < " + std::to_string(n) + " (negative means the final step), got " +
                  "prev_timesteps[" + std::to_string(i) + "] = " + std::to_string(in.s[i]));
  }
  if (!(final_alpha_cumprod > 0.0 && final_alpha_cumprod <= 1.0))
    value_error("final_alpha_cumprod must lie in (0, 1], got " + fmt(final_alpha_cumprod));
  return in;
}

StepAlphas alphas_at(const TableInput& in, size_t i, double final_ab) {
  return {in.ab[in.t[i]], in.s[i] >= 0 ? in.ab[in.s[i]] : final_ab};
}

void fill_common(double* row, const TableInput& in, size_t i, const StepAlphas& a) {
  row[SQRT_AB_T] = std::sqrt(a.ab_t);
  row[SIGMA_T] = std::sqrt(1.0 - a.ab_t);
  row[SQRT_AB_S] = std::sqrt(a.ab_s);
  row[SIGMA_S] = std::sqrt(std::max(1.0 - a.ab_s, 0.0));
  row[COV_SCALE] = a.ab_t > 0.0 ? (1.0 - a.ab_t) / a.ab_t : std::numeric_limits<double>::infinity();
  row[VAR_MAX] = std::numeric_limits<double>::infinity();
  row[T] = static_cast<double>(in.t[i]);
  row[PREV_T] = static_cast<double>(in.s[i] >= 0 ? in.s[i] : -1);
  // OCM: at fixed x_t, x_s moves with x0_hat by c_x0 - c_eps * sqrt(ab_t) / sigma_t (eps_hat is
  // tied to x0_hat through x_t = sqrt(ab_t) x0 + sigma_t eps).
  row[C_COV] = row[SIGMA_T] > 0.0 ? row[C_X0] - row[C_EPS] * row[SQRT_AB_T] / row[SIGMA_T] : row[C_X0];
}

py::array_t<double> new_table(size_t k) {
  py::array_t<double> out({static_cast<py::ssize_t>(k), static_cast<py::ssize_t>(NCOL)});
  std::fill(out.mutable_data(), out.mutable_data() + k * NCOL, 0.0);
  return out;
}

// DDIM (Song et al., 2021), eq. 12: x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - lambda^2) eps + lambda z,
// lambda^2 = eta^2 (1 - ab_s)/(1 - ab_t) (1 - ab_t/ab_s).
py::array_t<double> ddim_table(const py::array_t<double, py::array::c_style | py::array::forcecast>& alphas_cumprod,
                               const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& timesteps,
                               const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& prev_timesteps,
                               double eta, double final_alpha_cumprod) {
  if (!(std::isfinite(eta) && eta >= 0.0)) value_error("eta must be a finite number >= 0, got " + fmt(eta));
  auto in = table_input(alphas_cumprod, timesteps, prev_timesteps, final_alpha_cumprod);
  auto out = new_table(in.t.size());
  double* tab = out.mutable_data();
  for (size_t i = 0; i < in.t.size(); ++i) {
    const auto a = alphas_at(in, i, final_alpha_cumprod);
    double* row = tab + i * NCOL;
    const double beta_ts = 1.0 - a.ab_t / a.ab_s;
    const double var = a.ab_t < 1.0 ? (1.0 - a.ab_s) / (1.0 - a.ab_t) * beta_ts : 0.0;
    const double std_dev = eta * std::sqrt(std::max(var, 0.0));
    row[C_X0] = std::sqrt(a.ab_s);
    row[C_EPS] = std::sqrt(std::max(1.0 - a.ab_s - std_dev * std_dev, 0.0));
    row[C_XT] = 0.0;
    row[STD] = std_dev;
    // NOISE gates the variance modes that add to the table std (OCM widens even eta = 0):
    // every step but the final one.
    row[NOISE] = in.s[i] >= 0 ? 1.0 : 0.0;
    row[LOG_VAR_MIN] = std::log(std::max(var, 1e-20));
    row[LOG_VAR_MAX] = std::log(std::max(beta_ts, 1e-20));
    fill_common(row, in, i, a);
  }
  return out;
}

// DDPM ancestral step (Ho et al., 2020), posterior q(x_s | x_t, x0):
// mean = sqrt(ab_s) beta_{t|s} / (1 - ab_t) x0 + sqrt(ab_t/ab_s) (1 - ab_s)/(1 - ab_t) x_t.
// variance_type picks the noise: fixed_small = beta_tilde, fixed_large = beta_{t|s}, their _log
// variants (same values, diffusers' naming), learned / learned_range (the kernel reads the
// model's variance; LOG_VAR_MIN / LOG_VAR_MAX hold the interpolation ends).
// noise_rule: "last" injects no noise on the final step; "t_zero" (diffusers) none where t == 0.
py::array_t<double> ddpm_table(const py::array_t<double, py::array::c_style | py::array::forcecast>& alphas_cumprod,
                               const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& timesteps,
                               const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& prev_timesteps,
                               const std::string& variance_type, double final_alpha_cumprod,
                               const std::string& noise_rule) {
  const bool small = variance_type == "fixed_small" || variance_type == "fixed_small_log";
  const bool large = variance_type == "fixed_large" || variance_type == "fixed_large_log";
  const bool learned = variance_type == "learned" || variance_type == "learned_range";
  if (!small && !large && !learned)
    value_error("unknown variance_type '" + variance_type +
                "': expected 'fixed_small', 'fixed_small_log', 'fixed_large', 'fixed_large_log', 'learned' "
                "or 'learned_range'");
  if (noise_rule != "last" && noise_rule != "t_zero")
    value_error("unknown noise_rule '" + noise_rule + "': expected 'last' or 't_zero'");
  auto in = table_input(alphas_cumprod, timesteps, prev_timesteps, final_alpha_cumprod);
  auto out = new_table(in.t.size());
  double* tab = out.mutable_data();
  for (size_t i = 0; i < in.t.size(); ++i) {
    const auto a = alphas_at(in, i, final_alpha_cumprod);
    double* row = tab + i * NCOL;
    const double one_m_t = 1.0 - a.ab_t;
    const double alpha_ts = a.ab_t / a.ab_s;
    const double beta_ts = 1.0 - alpha_ts;
    const double beta_tilde = one_m_t > 0.0 ? (1.0 - a.ab_s) / one_m_t * beta_ts : 0.0;
    const double var_small = std::max(beta_tilde, 1e-20);  // diffusers clamps at 1e-20
    row[C_X0] = one_m_t > 0.0 ? std::sqrt(a.ab_s) * beta_ts / one_m_t : 0.0;
    row[C_XT] = one_m_t > 0.0 ? std::sqrt(alpha_ts) * (1.0 - a.ab_s) / one_m_t : 0.0;
    row[C_EPS] = 0.0;
    const bool noise = noise_rule == "last" ? in.s[i] >= 0 : in.t[i] > 0;
    row[NOISE] = noise ? 1.0 : 0.0;
    row[STD] = noise ? std::sqrt(small ? var_small : (large ? beta_ts : var_small)) : 0.0;
    row[LOG_VAR_MIN] = std::log(var_small);
    row[LOG_VAR_MAX] = std::log(std::max(beta_ts, 1e-20));
    fill_common(row, in, i, a);
  }
  return out;
}

// Multistep consistency sampling (Song et al., 2023, Alg. 1) on a VP schedule: the model's x0
// estimate is re-noised to s, x_s = sqrt(ab_s) x0 + sigma_s z; the final step returns x0.
py::array_t<double> consistency_table(
    const py::array_t<double, py::array::c_style | py::array::forcecast>& alphas_cumprod,
    const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& timesteps,
    const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& prev_timesteps) {
  auto in = table_input(alphas_cumprod, timesteps, prev_timesteps, 1.0);
  auto out = new_table(in.t.size());
  double* tab = out.mutable_data();
  for (size_t i = 0; i < in.t.size(); ++i) {
    const auto a = alphas_at(in, i, 1.0);
    double* row = tab + i * NCOL;
    const bool final_step = in.s[i] < 0;
    row[C_X0] = final_step ? 1.0 : std::sqrt(a.ab_s);
    row[C_EPS] = 0.0;
    row[C_XT] = 0.0;
    row[STD] = final_step ? 0.0 : std::sqrt(1.0 - a.ab_s);
    row[NOISE] = final_step ? 0.0 : 1.0;
    row[LOG_VAR_MIN] = row[LOG_VAR_MAX] = std::log(std::max(row[STD] * row[STD], 1e-20));
    fill_common(row, in, i, a);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastdiff._C: float64 noise schedules, timesteps and per-step coefficient tables";
  py::list names;
  for (int i = 0; i < NCOL; ++i) names.append(kColumnNames[i]);
  m.attr("COLUMNS") = py::tuple(names);
  m.attr("NCOL") = static_cast<int>(NCOL);
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
  m.def("ddim_table", &ddim_table, py::arg("alphas_cumprod"), py::arg("timesteps"), py::arg("prev_timesteps"),
        py::arg("eta"), py::arg("final_alpha_cumprod"), "DDIM coefficient table [K, NCOL].");
  m.def("ddpm_table", &ddpm_table, py::arg("alphas_cumprod"), py::arg("timesteps"), py::arg("prev_timesteps"),
        py::arg("variance_type"), py::arg("final_alpha_cumprod") = 1.0, py::arg("noise_rule") = "last",
        "DDPM coefficient table [K, NCOL].");
  m.def("consistency_table", &consistency_table, py::arg("alphas_cumprod"), py::arg("timesteps"),
        py::arg("prev_timesteps"), "Multistep consistency sampling table [K, NCOL].");
}
