// fastdiff._C: per-step coefficient tables for every solver, in float64 (see columns.h).
//
// Everything here depends only on the schedule configuration and the step count, so it is
// computed once on the host. A step goes t -> s < t.

#include "columns.h"
#include "common.h"

namespace fastdiff {
namespace {

struct StepAlphas {
  double ab_t, ab_s;
};

struct TableInput {
  std::vector<double> ab;
  std::vector<int64_t> t, s;
};

TableInput table_input(const DoubleArray& alphas_cumprod,
                       const IntArray& timesteps,
                       const IntArray& prev_timesteps,
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

// OCM's Sigma0 = cov_scale (1 + h) with cov_scale = b_t^2 / a_t^2 has no value where a_t = 0 (pure
// noise: sigma = 1 on the flow path, zero terminal SNR on VP). A huge finite cov_scale gives the
// limit the clamp defines: Sigma0 = cov_max where h > -1 and 0 where h = -1 (inf * 0 would be NaN).
constexpr double kPureNoiseCovScale = 1e30;

// OCM: at fixed x_t, x_s moves with x0_hat by c_x0 - c_eps a_t / b_t (eps_hat is tied to x0_hat
// through x_t = a_t x0 + b_t eps), minus c_m / b_t for a flow-velocity term (u = (x_t - x0) / b_t).
void set_c_cov(double* row) {
  row[C_COV] = row[B_T] > 0.0 ? row[C_X0] - row[C_EPS] * row[A_T] / row[B_T] - row[C_M] / row[B_T] : row[C_X0];
}

void fill_common(double* row, const TableInput& in, size_t i, const StepAlphas& a) {
  row[A_T] = std::sqrt(a.ab_t);
  row[B_T] = std::sqrt(1.0 - a.ab_t);
  row[A_S] = std::sqrt(a.ab_s);
  row[B_S] = std::sqrt(std::max(1.0 - a.ab_s, 0.0));
  row[COV_SCALE] = a.ab_t > 0.0 ? (1.0 - a.ab_t) / a.ab_t : kPureNoiseCovScale;
  row[VAR_MAX] = std::numeric_limits<double>::infinity();
  row[T] = static_cast<double>(in.t[i]);
  row[PREV_T] = static_cast<double>(in.s[i] >= 0 ? in.s[i] : -1);
  set_c_cov(row);
}

py::array_t<double> new_table(size_t k) {
  py::array_t<double> out({static_cast<py::ssize_t>(k), static_cast<py::ssize_t>(NCOL)});
  std::fill(out.mutable_data(), out.mutable_data() + k * NCOL, 0.0);
  return out;
}

// OCM (Ou et al., 2024): the step keeps the base sampler's mean and widens its noise by the
// posterior variance of x0_hat, c_cov^2 Sigma0, on every step but the last (which returns the
// mean, even where the base sampler injects none, e.g. DDIM at eta = 0). clip_pixels > 0 caps the
// variance of the second-to-last step at (clip_pixels * 2/255 * sqrt(pi/2))^2 (Analytic-DPM's
// clip, also in the OCM code): the mean absolute noise is then at most clip_pixels widths of an
// 8-bit pixel on data in [-1, 1].
double second_to_last_var_cap(double clip_pixels) {
  return std::pow(clip_pixels * 2.0 / 255.0 * std::sqrt(M_PI / 2.0), 2.0);
}

void apply_ocm(py::array_t<double>& out, double clip_pixels) {
  if (!(clip_pixels >= 0.0)) value_error("clip_pixels must be >= 0 (0: no cap), got " + fmt(clip_pixels));
  const size_t k = static_cast<size_t>(out.shape(0));
  double* tab = out.mutable_data();
  for (size_t i = 0; i < k; ++i) tab[i * NCOL + NOISE] = i + 1 < k ? 1.0 : 0.0;
  if (clip_pixels > 0.0 && k >= 2) tab[(k - 2) * NCOL + VAR_MAX] = second_to_last_var_cap(clip_pixels);
}

// DDIM (Song et al., 2021), eq. 12: x_s = sqrt(ab_s) x0 + sqrt(1 - ab_s - lambda^2) eps + lambda z,
// lambda^2 = eta^2 (1 - ab_s)/(1 - ab_t) (1 - ab_t/ab_s).
py::array_t<double> ddim_table(const DoubleArray& alphas_cumprod,
                               const IntArray& timesteps,
                               const IntArray& prev_timesteps,
                               double eta, double final_alpha_cumprod, bool ocm, double clip_pixels) {
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
  if (ocm) apply_ocm(out, clip_pixels);
  return out;
}

// DDPM ancestral step (Ho et al., 2020), posterior q(x_s | x_t, x0):
// mean = sqrt(ab_s) beta_{t|s} / (1 - ab_t) x0 + sqrt(ab_t/ab_s) (1 - ab_s)/(1 - ab_t) x_t.
// variance_type picks the noise: fixed_small = beta_tilde, fixed_large = beta_{t|s}, their _log
// variants (same values, diffusers' naming), learned / learned_range (the kernel reads the
// model's variance; LOG_VAR_MIN / LOG_VAR_MAX hold the interpolation ends).
// noise_rule: "last" injects no noise on the final step; "t_zero" (diffusers) none where t == 0.
py::array_t<double> ddpm_table(const DoubleArray& alphas_cumprod,
                               const IntArray& timesteps,
                               const IntArray& prev_timesteps,
                               const std::string& variance_type, double final_alpha_cumprod,
                               const std::string& noise_rule, bool ocm, double clip_pixels) {
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
  if (ocm) apply_ocm(out, clip_pixels);
  return out;
}

// Multistep consistency sampling (Song et al., 2023, Alg. 1) on a VP schedule: the model's x0
// estimate is re-noised to s, x_s = sqrt(ab_s) x0 + sigma_s z; the final step returns x0.
py::array_t<double> consistency_table(
    const DoubleArray& alphas_cumprod,
    const IntArray& timesteps,
    const IntArray& prev_timesteps) {
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

// --- the rectified-flow path: x_t = (1 - sigma) x0 + sigma eps, model output u = eps - x0 ------------

// sigmas: [K + 1] descending in [0, 1] (the terminal value last, as diffusers keeps them);
// timesteps: [K] what the model is called with (sigma * num_train_timesteps in diffusers).
// kind "euler": x_s = x_t + (sigma_s - sigma_t) u, the ODE step (DDIM at eta = 0 on this path);
// "stochastic": x_s = (1 - sigma_s) x0_hat + sigma_s z (diffusers' stochastic_sampling);
// "ddim": x_s = a_s x0_hat + sqrt(b_s^2 - lambda^2) eps_hat + lambda z with lambda^2 = eta^2 times
// the variance of the path's posterior q(x_s | x_t, x0), b_s^2 (b_t^2 - (a_t/a_s)^2 b_s^2) / b_t^2
// (eta = 1: ancestral sampling on the flow path).
// ocm widens the noise by c_cov^2 Sigma0, Sigma0 = (b_t^2 / a_t^2)(1 + h) (second-order Tweedie on
// the path), as on the VP path.
py::array_t<double> flow_table(const DoubleArray& sigmas_in, const DoubleArray& timesteps_in, const std::string& kind,
                               double eta, bool ocm, double clip_pixels) {
  const auto sig = to_vec(sigmas_in, "sigmas");
  const auto ts = to_vec(timesteps_in, "timesteps");
  if (sig.size() < 2) value_error("sigmas must hold at least 2 values (the steps and the terminal sigma)");
  if (ts.size() + 1 != sig.size())
    value_error("timesteps must have one value fewer than sigmas (the terminal sigma has none), got " +
                std::to_string(ts.size()) + " timesteps and " + std::to_string(sig.size()) + " sigmas");
  if (kind != "euler" && kind != "stochastic" && kind != "ddim")
    value_error("unknown flow step kind '" + kind + "': expected 'euler', 'stochastic' or 'ddim'");
  for (size_t i = 0; i < sig.size(); ++i) {
    if (!(sig[i] >= 0.0 && sig[i] <= 1.0))
      value_error("sigmas must lie in [0, 1], got sigmas[" + std::to_string(i) + "] = " + fmt(sig[i]));
    // Euler and the stochastic step are plain formulas in any direction (diffusers' invert_sigmas
    // runs them upwards); the posterior step and OCM are defined from noise towards data only.
    if (i > 0 && (kind == "ddim" || ocm) && !(sig[i] < sig[i - 1]))
      value_error("sigmas must be strictly descending for the '" + kind + "' step, got sigmas[" +
                  std::to_string(i - 1) + "] = " + fmt(sig[i - 1]) + " and sigmas[" + std::to_string(i) + "] = " +
                  fmt(sig[i]));
  }
  for (size_t i = 0; i < ts.size(); ++i)
    if (!std::isfinite(ts[i])) value_error("timesteps must be finite, got timesteps[" + std::to_string(i) + "]");
  if (!(std::isfinite(eta) && eta >= 0.0)) value_error("eta must be a finite number >= 0, got " + fmt(eta));
  const size_t k = ts.size();
  auto out = new_table(k);
  double* tab = out.mutable_data();
  for (size_t i = 0; i < k; ++i) {
    double* row = tab + i * NCOL;
    const double s_t = sig[i], s_s = sig[i + 1];
    const double a_t = 1.0 - s_t, b_t = s_t, a_s = 1.0 - s_s, b_s = s_s;
    row[A_T] = a_t;
    row[B_T] = b_t;
    row[A_S] = a_s;
    row[B_S] = b_s;
    if (kind == "euler") {
      row[C_XT] = 1.0;
      row[C_M] = s_s - s_t;
    } else if (kind == "stochastic") {
      row[C_X0] = a_s;
      row[STD] = b_s;
    } else {
      const double alpha_ts = a_s > 0.0 ? a_t / a_s : 0.0;
      const double var_ts = b_t * b_t - alpha_ts * alpha_ts * b_s * b_s;
      const double posterior = b_t > 0.0 ? std::max(var_ts, 0.0) * b_s * b_s / (b_t * b_t) : 0.0;
      const double lam2 = eta * eta * posterior;
      row[C_X0] = a_s;
      row[C_EPS] = std::sqrt(std::max(b_s * b_s - lam2, 0.0));
      row[STD] = std::sqrt(lam2);
    }
    row[NOISE] = i + 1 < k ? 1.0 : 0.0;
    row[COV_SCALE] = a_t > 0.0 ? (b_t * b_t) / (a_t * a_t) : kPureNoiseCovScale;
    row[VAR_MAX] = std::numeric_limits<double>::infinity();
    row[LOG_VAR_MIN] = row[LOG_VAR_MAX] = std::log(std::max(row[STD] * row[STD], 1e-20));
    row[T] = ts[i];
    row[PREV_T] = i + 1 < k ? ts[i + 1] : -1.0;
    set_c_cov(row);
  }
  if (ocm) apply_ocm(out, clip_pixels);
  return out;
}

// --- DPM-Solver++ multistep (Lu et al., 2022, "DPM-Solver++"), as diffusers' DPMSolverMultistepScheduler ---

// The sigmas [K + 1] (the final one last) and timesteps [K] of a multistep or sigma-space table:
// finite, >= 0 (<= 1 on the flow path), 0 only at the end.
void read_sigma_steps(const DoubleArray& sigmas_in, const DoubleArray& timesteps_in, bool flow,
                      std::vector<double>& sig, std::vector<double>& ts) {
  sig = to_vec(sigmas_in, "sigmas");
  ts = to_vec(timesteps_in, "timesteps");
  if (sig.size() < 2) value_error("sigmas must hold at least 2 values (the steps and the final sigma)");
  if (ts.size() + 1 != sig.size())
    value_error("timesteps must have one value fewer than sigmas, got " + std::to_string(ts.size()) +
                " timesteps and " + std::to_string(sig.size()) + " sigmas");
  for (size_t i = 0; i < sig.size(); ++i) {
    const bool ok = std::isfinite(sig[i]) && sig[i] >= 0.0 && (!flow || sig[i] <= 1.0);
    if (!ok) value_error("sigmas must be finite and >= 0 (<= 1 on the flow path), got sigmas[" + std::to_string(i) +
                         "] = " + fmt(sig[i]));
    if (i + 1 < sig.size() && !(sig[i] > 0.0))
      value_error("only the final sigma may be 0, got sigmas[" + std::to_string(i) + "] = 0");
  }
}

// One path point: alpha, sigma (x = alpha x0 + sigma eps) and lambda = log(alpha / sigma).
struct PathPoint {
  double alpha, sigma, lambda;
};

// sigma is diffusers' sigma: sqrt((1 - ab) / ab) on a VP schedule (then alpha = 1 / sqrt(sigma^2 + 1),
// sigma_t = sigma alpha), or the flow sigma (alpha = 1 - sigma, sigma_t = sigma).
PathPoint path_point(double sigma, bool flow) {
  PathPoint p;
  if (flow) {
    p.alpha = 1.0 - sigma;
    p.sigma = sigma;
  } else {
    p.alpha = 1.0 / std::sqrt(sigma * sigma + 1.0);
    p.sigma = sigma * p.alpha;
  }
  p.lambda = std::log(p.alpha) - std::log(p.sigma);  // +inf at sigma = 0
  return p;
}

// Rows for sigmas [K + 1] (the final sigma last): x_s = c_xt x_t + c_x0 D0 + (D1 terms) + std z with
// D0 = x0_hat (this step's data prediction) and D1 = (x0_hat - H0) / r0, H0 the previous step's
// x0_hat, r0 = h_prev / h. Second-order rows need H0; first-order rows ignore it (c_h0 = 0).
// Row 0 (no history yet) and the last row where diffusers lowers the order are first order.
// Rows K .. 2K-1 repeat every step at first order: a loop that begins mid-schedule (img2img) steps at first order first, as
// diffusers' lower_order_nums does, by reading row K + i.
py::array_t<double> dpm_table(const DoubleArray& sigmas_in, const DoubleArray& timesteps_in, bool flow,
                              const std::string& algorithm, const std::string& solver_type, int order,
                              bool lower_order_final, bool euler_at_final, bool final_sigma_zero) {
  std::vector<double> sig, ts;
  read_sigma_steps(sigmas_in, timesteps_in, flow, sig, ts);
  const bool sde = algorithm == "sde-dpmsolver++";
  if (!sde && algorithm != "dpmsolver++")
    value_error("algorithm_type must be 'dpmsolver++' or 'sde-dpmsolver++', got '" + algorithm + "'");
  const bool heun = solver_type == "heun";
  if (!heun && solver_type != "midpoint")
    value_error("solver_type must be 'midpoint' or 'heun', got '" + solver_type + "'");
  if (order != 1 && order != 2) value_error("solver_order must be 1 or 2, got " + std::to_string(order));
  const size_t k = ts.size();
  auto out = new_table(2 * k);
  double* tab = out.mutable_data();
  for (size_t rep = 0; rep < 2; ++rep) {
    for (size_t i = 0; i < k; ++i) {
      double* row = tab + (rep * k + i) * NCOL;
      const PathPoint s0 = path_point(sig[i], flow), t = path_point(sig[i + 1], flow);
      const bool lower_final = i + 1 == k && (euler_at_final || (lower_order_final && k < 15) || final_sigma_zero);
      const bool second = rep == 0 && order == 2 && i > 0 && !lower_final;
      const double h = t.lambda - s0.lambda;  // +inf onto sigma = 0
      const double e1 = std::isinf(h) ? -1.0 : std::expm1(-h);        // exp(-h) - 1
      const double e2 = std::isinf(h) ? -1.0 : std::expm1(-2.0 * h);  // exp(-2h) - 1
      const double ratio = t.sigma / s0.sigma;
      double a, b = 0.0;  // coefficients of D0 and D1
      if (!sde) {
        row[C_XT] = ratio;
        a = -t.alpha * e1;
        if (second) b = heun ? t.alpha * (e1 / h + 1.0) : -0.5 * t.alpha * e1;
      } else {
        row[C_XT] = std::isinf(h) ? 0.0 : ratio * std::exp(-h);
        a = -t.alpha * e2;
        if (second) b = heun ? t.alpha * (e2 / (2.0 * h) + 1.0) : -0.5 * t.alpha * e2;
        row[STD] = t.sigma * std::sqrt(std::max(-e2, 0.0));
      }
      double c_h0 = 0.0;
      if (second) {
        const PathPoint s1 = path_point(sig[i - 1], flow);
        const double r0 = (s0.lambda - s1.lambda) / h;
        a += b / r0;
        c_h0 = -b / r0;
      }
      row[C_X0] = a;
      row[C_H0] = c_h0;
      row[A_T] = s0.alpha;
      row[B_T] = s0.sigma;
      row[A_S] = t.alpha;
      row[B_S] = t.sigma;
      row[NOISE] = i + 1 < k ? 1.0 : 0.0;
      row[COV_SCALE] = s0.alpha > 0.0 ? (s0.sigma * s0.sigma) / (s0.alpha * s0.alpha) : kPureNoiseCovScale;
      row[VAR_MAX] = std::numeric_limits<double>::infinity();
      row[LOG_VAR_MIN] = row[LOG_VAR_MAX] = std::log(std::max(row[STD] * row[STD], 1e-20));
      row[T] = ts[i];
      row[PREV_T] = i + 1 < k ? ts[i + 1] : -1.0;
      set_c_cov(row);
    }
  }
  return out;
}

// --- Euler and Euler-ancestral in sigma space (Karras et al., 2022; k-diffusion; diffusers) --------

// The VE path x = x0 + sigma eps (diffusers' EulerDiscreteScheduler: the model sees x / sqrt(sigma^2 + 1)).
// x0_hat = x - sigma eps_hat is the kernel's epsilon conversion with a = 1, b = sigma; diffusers'
// v-prediction x0_hat = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) v is its v conversion with
// a = 1 / (sigma^2 + 1), b = sigma / sqrt(sigma^2 + 1). The step x_s = x + (x - x0_hat) / sigma * dt,
// dt = sigma_down - sigma, is c_xt = sigma_down / sigma, c_x0 = 1 - sigma_down / sigma; ancestral adds
// sigma_up z (sigma_up^2 = sigma_s^2 (sigma^2 - sigma_s^2) / sigma^2, sigma_down^2 = sigma_s^2 - sigma_up^2).
// c_in = 1 / sqrt(sigma_s^2 + 1): the step writes the next model input already scaled.
py::array_t<double> euler_table(const DoubleArray& sigmas_in, const DoubleArray& timesteps_in,
                                const std::string& prediction_type, bool ancestral) {
  std::vector<double> sig, ts;
  read_sigma_steps(sigmas_in, timesteps_in, false, sig, ts);
  const bool v = prediction_type == "v_prediction";
  if (!v && prediction_type != "epsilon" && prediction_type != "sample")
    value_error("prediction_type must be 'epsilon', 'v_prediction' or 'sample' in sigma space, got '" +
                prediction_type + "'");
  const size_t k = ts.size();
  auto out = new_table(k);
  double* tab = out.mutable_data();
  for (size_t i = 0; i < k; ++i) {
    double* row = tab + i * NCOL;
    const double s = sig[i], sn = sig[i + 1];
    double down = sn, up = 0.0;
    if (ancestral) {
      up = std::sqrt(std::max(sn * sn * (s * s - sn * sn) / (s * s), 0.0));
      down = std::sqrt(std::max(sn * sn - up * up, 0.0));
    }
    row[A_T] = v ? 1.0 / (s * s + 1.0) : 1.0;
    row[B_T] = v ? s / std::sqrt(s * s + 1.0) : s;
    row[C_XT] = down / s;
    row[C_X0] = 1.0 - down / s;
    row[STD] = up;
    row[C_IN] = 1.0 / std::sqrt(sn * sn + 1.0);
    row[A_S] = 1.0;
    row[B_S] = sn;
    row[NOISE] = i + 1 < k ? 1.0 : 0.0;
    row[COV_SCALE] = s * s;
    row[VAR_MAX] = std::numeric_limits<double>::infinity();
    row[LOG_VAR_MIN] = row[LOG_VAR_MAX] = std::log(std::max(up * up, 1e-20));
    row[T] = ts[i];
    row[PREV_T] = i + 1 < k ? ts[i + 1] : -1.0;
    set_c_cov(row);
  }
  return out;
}


// --- UniPC (Zhao, Bai, Rao, Zhou & Lu, 2023), as diffusers' UniPCMultistepScheduler (B(h): bh1, bh2) ---

// One UniP (predictor) or UniC (corrector) update from point s0 to point t, in the form
//   x_t = base_x X + sum_k cm[k] M_{s0 - k} + c_new M_new
// with M the data predictions (predict_x0) or the noise predictions, X the sample at s0 and M_new
// the prediction at t (the corrector's D1_t term; 0 for the predictor). Order p uses the points
// s0 - 1 .. s0 - p + 1 as diffusers does (rks, the R matrix of powers, the b vector of phi
// functions, rho = 1/2 at predictor order 2 and corrector order 1, else solved).
struct UniUpdate {
  double base_x = 0.0, c_new = 0.0;
  std::vector<double> cm;
};

// Gaussian elimination with partial pivoting on a small dense system (UniPC's R rho = b).
std::vector<double> solve_small(std::vector<std::vector<double>> a, std::vector<double> b) {
  const size_t n = b.size();
  for (size_t c = 0; c < n; ++c) {
    size_t piv = c;
    for (size_t r = c + 1; r < n; ++r)
      if (std::fabs(a[r][c]) > std::fabs(a[piv][c])) piv = r;
    if (!(std::fabs(a[piv][c]) > 0.0)) value_error("UniPC: singular R matrix (two steps at the same lambda)");
    std::swap(a[c], a[piv]);
    std::swap(b[c], b[piv]);
    for (size_t r = c + 1; r < n; ++r) {
      const double f = a[r][c] / a[c][c];
      for (size_t j = c; j < n; ++j) a[r][j] -= f * a[c][j];
      b[r] -= f * b[c];
    }
  }
  std::vector<double> x(n);
  for (size_t c = n; c-- > 0;) {
    double v = b[c];
    for (size_t j = c + 1; j < n; ++j) v -= a[c][j] * x[j];
    x[c] = v / a[c][c];
  }
  return x;
}

UniUpdate uni_update(const std::vector<PathPoint>& pts, size_t s0, size_t t, int order, bool corrector, bool bh2,
                     bool predict_x0) {
  const PathPoint &p0 = pts[s0], &pt = pts[t];
  UniUpdate u;
  u.cm.assign(static_cast<size_t>(order), 0.0);
  const double h = pt.lambda - p0.lambda;
  const double mult = predict_x0 ? pt.alpha : pt.sigma;
  if (std::isinf(h)) {
    // Onto sigma = 0 (the final step): the first-order limit, x0_hat. diffusers' float32 formulas
    // give NaN there for bh1 and for noise prediction (0 * inf), and divide by r = 0 at order > 1.
    if (predict_x0) {
      u.cm[0] = pt.alpha;  // sigma_t / sigma_s0 -> 0, h_phi_1 -> -1
    } else {
      u.base_x = pt.alpha / p0.alpha;  // alpha_t / alpha_s0 x - sigma_t (e^h - 1) eps -> alpha_t x0_hat
      u.cm[0] = -pt.alpha * p0.sigma / p0.alpha;
    }
    return u;
  }
  if (h == 0.0) {
    // Onto the same point (flow sigmas with final_sigmas_type "sigma_min" repeat the last sigma): the
    // identity, the limit of every order (diffusers divides by h = 0 there at order > 1).
    u.base_x = 1.0;
    return u;
  }
  const double hh = predict_x0 ? -h : h;
  const double hphi1 = std::expm1(hh);
  const double bh = bh2 ? std::expm1(hh) : hh;
  u.base_x = predict_x0 ? pt.sigma / p0.sigma : pt.alpha / p0.alpha;
  std::vector<double> rks;
  for (int k = 1; k < order; ++k) rks.push_back((pts[s0 - k].lambda - p0.lambda) / h);
  rks.push_back(1.0);
  std::vector<std::vector<double>> r(order, std::vector<double>(order));
  std::vector<double> b(order);
  double hphik = hphi1 / hh - 1.0, fact = 1.0;
  for (int i = 1; i <= order; ++i) {
    for (int c = 0; c < order; ++c) r[i - 1][c] = std::pow(rks[c], i - 1);
    b[i - 1] = hphik * fact / bh;
    fact *= i + 1;
    hphik = hphik / hh - 1.0 / fact;
  }
  std::vector<double> rho;  // predictor: order - 1 values (D_k); corrector: order (D_k, then D1_t)
  if (!corrector) {
    if (order == 2) {
      rho = {0.5};
    } else if (order > 2) {
      std::vector<std::vector<double>> rr(order - 1, std::vector<double>(order - 1));
      for (int i = 0; i + 1 < order; ++i)
        for (int c = 0; c + 1 < order; ++c) rr[i][c] = r[i][c];
      rho = solve_small(rr, std::vector<double>(b.begin(), b.end() - 1));
    }
  } else {
    rho = order == 1 ? std::vector<double>{0.5} : solve_small(r, b);
  }
  // x_t = base_x X - mult hphi1 M0 - mult bh (sum_k rho_k (M_k - M0) / r_k + rho_last (M_new - M0))
  u.cm[0] = -mult * hphi1;
  for (int k = 1; k < order; ++k) {
    const double w = mult * bh * rho[k - 1] / rks[k - 1];
    u.cm[k] -= w;
    u.cm[0] += w;
  }
  if (corrector) {
    u.c_new = -mult * bh * rho[order - 1];
    u.cm[0] -= u.c_new;
  }
  return u;
}

// Rows for sigmas [K + 1] (the final sigma last). Step i converts the model output at point i
// into M_i (x0_hat, or eps_hat with predict_x0 false; thresholded as diffusers does), corrects
// the sample at i with UniC (order of step i - 1's predictor) unless disabled, and predicts the
// sample at i + 1 with UniP, in one combination of the same inputs:
//   history H0 .. H_{p-1} = M_{i-1} .. M_{i-p} (p = solver_order), and with `corrected_input`
//   H_p = the corrected sample of step i - 1, whose own correction x_c the row writes (xc_*
//   columns): diffusers' last_sample, exactly, whatever a caller does to the samples between
//   steps (the drop-in). A row reads at most p + 1 tensors.
// Without `corrected_input` the correction is expressed from x_t itself: x_t is the previous
// predictor's output, and UniC and that UniP share their base terms, so
//   x_c = x_t + c_new M_i + sum_k (cm_C[k] - cm_P[k]) M_{i-1-k}
// (one history tensor fewer and no second output: the native loops, which own their samples).
// `begin`: the row where the loop starts (img2img): orders warm up from there (rows before it are
// those of a loop from row 0).
py::array_t<double> unipc_table(const DoubleArray& sigmas_in, const DoubleArray& timesteps_in, bool flow, int order,
                                const std::string& solver_type, bool lower_order_final,
                                const std::vector<int64_t>& disable_corrector, bool predict_x0, int64_t begin,
                                bool corrected_input) {
  std::vector<double> sig, ts;
  read_sigma_steps(sigmas_in, timesteps_in, flow, sig, ts);
  const bool bh2 = solver_type == "bh2";
  if (!bh2 && solver_type != "bh1") value_error("solver_type must be 'bh1' or 'bh2', got '" + solver_type + "'");
  if (order < 1 || order > 3) value_error("solver_order must be 1, 2 or 3, got " + std::to_string(order));
  const size_t k = ts.size();
  if (begin < 0 || begin >= static_cast<int64_t>(k))
    value_error("begin must be a step index in [0, " + std::to_string(k) + "), got " + std::to_string(begin));
  if (flow && sig[0] >= 1.0)
    value_error("UniPC on flow sigmas needs sigmas below 1 (lambda = log((1 - sigma) / sigma)); diffusers moves a "
                "first sigma of 1 to 1 - 1e-6");
  std::vector<PathPoint> pts;
  for (double s : sig) pts.push_back(path_point(s, flow));
  const auto taken = [&](size_t i) -> int64_t { return static_cast<int64_t>(i) >= begin ? i - begin : i; };
  const auto pred_order = [&](size_t i) -> int {
    int p = lower_order_final ? std::min<int64_t>(order, static_cast<int64_t>(k - i)) : order;
    p = static_cast<int>(std::min<int64_t>(p, taken(i) + 1));
    if (std::isinf(pts[i + 1].lambda)) p = 1;  // onto sigma = 0: first order (see uni_update)
    return p;
  };
  const int x_col = predict_x0 ? C_X0 : C_EPS, xc_col = predict_x0 ? XC_X0 : XC_EPS;
  const int hist[kHistorySlots] = {C_H0, C_H1, C_H2, C_H3};
  const int xc_hist[kHistorySlots] = {XC_H0, XC_H1, XC_H2, XC_H3};
  auto out = new_table(k);
  double* tab = out.mutable_data();
  for (size_t i = 0; i < k; ++i) {
    double* row = tab + i * NCOL;
    const bool correct = taken(i) >= 1 && std::find(disable_corrector.begin(), disable_corrector.end(),
                                                     static_cast<int64_t>(i) - 1) == disable_corrector.end();
    // x_c = xc_xt x_t + xc_m M_i + sum_j xc_h[j] H_j
    double xc_xt = 1.0, xc_m = 0.0, xc_h[kHistorySlots] = {0.0, 0.0, 0.0, 0.0};
    if (correct) {
      const int pc = pred_order(i - 1);
      const UniUpdate c = uni_update(pts, i - 1, i, pc, true, bh2, predict_x0);
      xc_m = c.c_new;
      for (int j = 0; j < pc; ++j) xc_h[j] = c.cm[j];
      if (corrected_input) {
        xc_xt = 0.0;
        xc_h[order] = c.base_x;  // the slot after the predictions
      } else {
        const UniUpdate p = uni_update(pts, i - 1, i, pc, false, bh2, predict_x0);
        for (int j = 0; j < pc; ++j) xc_h[j] -= p.cm[j];
      }
    }
    const UniUpdate p = uni_update(pts, i, i + 1, pred_order(i), false, bh2, predict_x0);
    row[C_XT] = p.base_x * xc_xt;
    row[x_col] = p.base_x * xc_m + p.cm[0];
    for (int j = 0; j < kHistorySlots; ++j)
      row[hist[j]] = p.base_x * xc_h[j] + (j + 1 < static_cast<int>(p.cm.size()) ? p.cm[j + 1] : 0.0);
    row[XC_XT] = xc_xt;
    row[xc_col] = xc_m;
    for (int j = 0; j < kHistorySlots; ++j) row[xc_hist[j]] = xc_h[j];
    row[A_T] = pts[i].alpha;
    row[B_T] = pts[i].sigma;
    row[A_S] = pts[i + 1].alpha;
    row[B_S] = pts[i + 1].sigma;
    row[COV_SCALE] = pts[i].alpha > 0.0 ? (pts[i].sigma * pts[i].sigma) / (pts[i].alpha * pts[i].alpha)
                                        : kPureNoiseCovScale;
    row[VAR_MAX] = std::numeric_limits<double>::infinity();
    row[LOG_VAR_MIN] = row[LOG_VAR_MAX] = std::log(1e-20);
    row[T] = ts[i];
    row[PREV_T] = i + 1 < k ? ts[i + 1] : -1.0;
    set_c_cov(row);
  }
  return out;
}

}  // namespace

void register_tables(py::module_& m) {
  m.def("ddim_table", &ddim_table, py::arg("alphas_cumprod"), py::arg("timesteps"), py::arg("prev_timesteps"),
        py::arg("eta"), py::arg("final_alpha_cumprod"), py::arg("ocm") = false, py::arg("clip_pixels") = 0.0,
        "DDIM coefficient table [K, NCOL]; ocm=True widens the noise by the x0_hat covariance (OCM-DDIM).");
  m.def("ddpm_table", &ddpm_table, py::arg("alphas_cumprod"), py::arg("timesteps"), py::arg("prev_timesteps"),
        py::arg("variance_type"), py::arg("final_alpha_cumprod") = 1.0, py::arg("noise_rule") = "last",
        py::arg("ocm") = false, py::arg("clip_pixels") = 0.0,
        "DDPM coefficient table [K, NCOL]; ocm=True widens the noise by the x0_hat covariance (OCM-DDPM).");
  m.def("consistency_table", &consistency_table, py::arg("alphas_cumprod"), py::arg("timesteps"),
        py::arg("prev_timesteps"), "Multistep consistency sampling table [K, NCOL].");
  m.def("flow_table", &flow_table, py::arg("sigmas"), py::arg("timesteps"), py::arg("kind") = "euler",
        py::arg("eta") = 0.0, py::arg("ocm") = false, py::arg("clip_pixels") = 0.0,
        "Rectified-flow coefficient table [K, NCOL] from K + 1 sigmas (euler / stochastic / ddim, optional OCM).");
  m.def("dpm_table", &dpm_table, py::arg("sigmas"), py::arg("timesteps"), py::arg("flow") = false,
        py::arg("algorithm_type") = "dpmsolver++", py::arg("solver_type") = "midpoint", py::arg("solver_order") = 2,
        py::arg("lower_order_final") = true, py::arg("euler_at_final") = false, py::arg("final_sigma_zero") = true,
        "DPM-Solver++ multistep table [2K, NCOL]: rows 0..K-1 as a loop from the first step, K..2K-1 first order.");
  m.def("euler_table", &euler_table, py::arg("sigmas"), py::arg("timesteps"), py::arg("prediction_type") = "epsilon",
        py::arg("ancestral") = false, "Euler / Euler-ancestral table in sigma space [K, NCOL] (c_in: next input scale).");
  m.def("unipc_table", &unipc_table, py::arg("sigmas"), py::arg("timesteps"), py::arg("flow") = false,
        py::arg("solver_order") = 2, py::arg("solver_type") = "bh2", py::arg("lower_order_final") = true,
        py::arg("disable_corrector") = std::vector<int64_t>{}, py::arg("predict_x0") = true, py::arg("begin") = 0,
        py::arg("corrected_input") = false,
        "UniPC predictor-corrector table [K, NCOL]; corrected_input: the corrector reads the previous corrected "
        "sample (history slot solver_order) and writes its own (xc_* columns), as diffusers' last_sample.");
  m.def("second_to_last_var_cap", &second_to_last_var_cap, py::arg("clip_pixels"),
        "OCM's variance cap of the second-to-last step for a clip of clip_pixels 8-bit pixel widths.");
}

}  // namespace fastdiff
