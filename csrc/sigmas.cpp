// fastdiff._C: the sigma and timestep sequences of diffusers' schedulers, in float64.
//
//   flow matching   x_t = (1 - sigma) x0 + sigma eps    FlowMatchEulerDiscreteScheduler
//   sigma space     x_t = x0 + sigma eps                 EulerDiscrete, EulerAncestralDiscrete
//   VP multistep    sigma = sqrt((1 - ab) / ab)          DPMSolverMultistep, UniPCMultistep
//
// Each function reproduces diffusers 0.42.1's set_timesteps so that the float32 cast of what it
// returns equals diffusers' float32 tensors. diffusers computes most of it in numpy float64 (so do
// we, with the same operations in the same order) but rounds to float32 in places: numpy arrays
// that hold float32 values (the training table, user lists cast with astype(float32)) keep numpy's
// arithmetic in float32, and torch ops after its final cast are float32. `Round` marks each such
// rounding. For +, -, *, / of float32 operands the double result rounded to float is the float32
// result (53 >= 2 * 24 + 2 bits), so rounding after each double op reproduces float32 exactly.
//
// Float32 transcendental functions are the exception: numpy's float32 log and torch's float32
// sqrt, log and exp are SIMD approximations that are not correctly rounded (4.4% and 17% of values
// differ in the last bit for numpy's log and torch's sqrt on an AVX-512 CPU), so values diffusers
// takes from them (the training sigmas, their log, lambda_t, float32 log-linear sigmas) are inputs
// here, computed by the Python facade (fastdiff/sigmas.py) with numpy and torch themselves.

#include "common.h"

#include <optional>
#include <utility>

// numpy's compiled loops (np.interp, linspace) do not fuse a*b + c on x86-64; keep ours unfused too
// (GCC contracts by default where FMA is baseline, e.g. aarch64).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace fastdiff {
namespace {

using Vec = std::vector<double>;
using OptVec = std::optional<DoubleArray>;

// Rounds to float32 where diffusers computes in float32 (f32), the identity otherwise.
struct Round {
  bool f32;
  double operator()(double x) const { return f32 ? static_cast<double>(static_cast<float>(x)) : x; }
};
constexpr Round kF64{false};
constexpr Round kF32{true};

// --- checks --------------------------------------------------------------------------------

void check_steps(int64_t n) {
  if (n < 1) value_error("num_inference_steps must be >= 1, got " + std::to_string(n));
}

void check_finite(const Vec& v, const char* what) {
  for (size_t i = 0; i < v.size(); ++i)
    if (!std::isfinite(v[i]))
      value_error(std::string(what) + " must be finite, got " + what + "[" + std::to_string(i) + "] = " + fmt(v[i]));
}

void check_in(const Vec& v, const char* what, double lo, double hi) {
  check_finite(v, what);
  for (size_t i = 0; i < v.size(); ++i)
    if (v[i] < lo || v[i] > hi)
      value_error(std::string(what) + " must lie in [" + fmt(lo) + ", " + fmt(hi) + "], got " + what + "[" +
                  std::to_string(i) + "] = " + fmt(v[i]));
}

void check_choice(const std::string& v, const char* what, std::initializer_list<const char*> ok) {
  std::string list;
  for (const char* o : ok) {
    if (v == o) return;
    list += std::string(list.empty() ? "'" : ", '") + o + "'";
  }
  value_error(std::string("unknown ") + what + " '" + v + "': expected one of " + list);
}

void check_one_sigma_kind(bool karras, bool exponential, bool beta) {
  if (int(karras) + int(exponential) + int(beta) > 1)
    value_error(std::string("at most one of use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas may be "
                            "set, got") + (karras ? " use_karras_sigmas" : "") +
                (exponential ? " use_exponential_sigmas" : "") + (beta ? " use_beta_sigmas" : ""));
}

// The ends of a converted schedule: karras takes their 7th root (>= 0), exponential their log (> 0).
void check_sigma_range(double sigma_min, double sigma_max, bool exponential) {
  for (auto [name, v] : {std::pair<const char*, double>{"sigma_min", sigma_min}, {"sigma_max", sigma_max}}) {
    if (exponential && !(std::isfinite(v) && v > 0.0))
      value_error(std::string(name) + " must be finite and > 0 with use_exponential_sigmas (its log is taken), got " +
                  fmt(v));
    if (!(std::isfinite(v) && v >= 0.0)) value_error(std::string(name) + " must be finite and >= 0, got " + fmt(v));
  }
}

Vec opt_vec(const OptVec& a, const char* what) { return a ? to_vec(*a, what) : Vec{}; }

// --- numpy's rules -------------------------------------------------------------------------

// np.linspace(start, stop, num): y_i = i * ((stop - start) / (num - 1)) + start, the last = stop.
Vec np_linspace(double start, double stop, int64_t num) {
  Vec y(static_cast<size_t>(num));
  if (num == 1) {
    y[0] = start;
    return y;
  }
  const double step = (stop - start) / static_cast<double>(num - 1);
  for (int64_t i = 0; i < num; ++i) y[i] = static_cast<double>(i) * step + start;
  y[num - 1] = stop;
  return y;
}

// np.arange(start, stop, step) for float steps: ceil((stop - start) / step) values; element 1 is
// start + step, element i >= 2 is start + i * delta with delta = (start + step) - start. For some
// (N, K) the trailing rule np.arange(N, 0, -N / K) has K + 1 values (e.g. 1000, 61: the last rounds
// to 0, a timestep -1); diffusers keeps them, so do we.
Vec np_arange(double start, double stop, double step) {
  const double len = std::ceil((stop - start) / step);
  Vec y(len > 0 ? static_cast<size_t>(len) : 0);
  if (y.empty()) return y;
  y[0] = start;
  if (y.size() == 1) return y;
  y[1] = start + step;
  const double delta = y[1] - start;
  for (size_t i = 2; i < y.size(); ++i) y[i] = start + static_cast<double>(i) * delta;
  return y;
}

// np.interp(x, arange(len(fp)), fp).
double np_interp(double x, const Vec& fp) {
  const int64_t n = static_cast<int64_t>(fp.size());
  if (n == 1 || !(x > 0.0)) return std::isnan(x) ? x : fp[0];
  if (x >= static_cast<double>(n - 1)) return fp[n - 1];
  const int64_t j = static_cast<int64_t>(std::floor(x));
  if (static_cast<double>(j) == x) return fp[j];
  const double slope = (fp[j + 1] - fp[j]) / 1.0;
  double r = slope * (x - static_cast<double>(j)) + fp[j];
  if (std::isnan(r)) {
    r = slope * (x - static_cast<double>(j + 1)) + fp[j + 1];
    if (std::isnan(r) && fp[j] == fp[j + 1]) r = fp[j];
  }
  return r;
}

// astype(np.int64) / .to(torch.int64) of a float: truncation toward zero.
int64_t trunc_int(double v, const char* what) {
  if (!std::isfinite(v)) value_error(std::string(what) + " must be finite, got " + fmt(v));
  return static_cast<int64_t>(v);
}

std::vector<int64_t> trunc_ints(const Vec& v, const char* what) {
  std::vector<int64_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = trunc_int(v[i], what);
  return out;
}

Vec flipped(Vec v) {
  std::reverse(v.begin(), v.end());
  return v;
}

// --- the inverse regularized incomplete beta function ----------------------------------------

// lgamma(x) - ((x - 1/2) log x - x + log sqrt(2 pi)) for x >= 10: the Stirling series, to 1e-17.
double lgamma_corr(double x) {
  const double c[] = {1.0 / 12, -1.0 / 360, 1.0 / 1260, -1.0 / 1680, 1.0 / 1188, -691.0 / 360360, 1.0 / 156,
                      -3617.0 / 122400};
  const double r = 1.0 / x, r2 = r * r;
  double sum = 0.0;
  for (int k = 7; k >= 0; --k) sum = sum * r2 + c[k];
  return sum * r;
}

// log B(a, b). For a large argument, lgamma(q) - lgamma(p + q) cancels to a small difference of two
// large numbers (1e-13 relative lost at p = 0.05, q = 20); written with the Stirling corrections the
// large parts combine through log1p without cancelling.
double log_beta(double a, double b) {
  const double p = std::min(a, b), q = std::max(a, b);
  const double log_sqrt_2pi = 0.91893853320467274178;
  if (p >= 10.0)
    return -0.5 * std::log(q) + log_sqrt_2pi + lgamma_corr(p) + lgamma_corr(q) - lgamma_corr(p + q) +
           (p - 0.5) * std::log(p / (p + q)) + q * std::log1p(-p / (p + q));
  if (q >= 10.0)
    return std::lgamma(p) + lgamma_corr(q) - lgamma_corr(p + q) + p - p * std::log(p + q) +
           (q - 0.5) * std::log1p(-p / (p + q));
  return std::lgamma(p) + std::lgamma(q) - std::lgamma(p + q);
}

// Continued fraction of I_x(a, b) (modified Lentz); converges quickly for x < (a + 1) / (a + b + 2).
double beta_cf(double a, double b, double x) {
  const double tiny = 1e-300;
  auto guard = [tiny](double v) { return std::fabs(v) < tiny ? tiny : v; };
  double c = 1.0, d = 1.0 / guard(1.0 - (a + b) * x / (a + 1.0)), h = d;
  for (int m = 1; m <= 10000; ++m) {
    const double m2 = 2.0 * m;
    double aa = m * (b - m) * x / ((a - 1.0 + m2) * (a + m2));
    d = 1.0 / guard(1.0 + aa * d);
    c = guard(1.0 + aa / c);
    h *= d * c;
    aa = -(a + m) * (a + b + m) * x / ((a + m2) * (a + 1.0 + m2));
    d = 1.0 / guard(1.0 + aa * d);
    c = guard(1.0 + aa / c);
    const double del = d * c;
    h *= del;
    if (std::fabs(del - 1.0) < 1e-16) break;
  }
  return h;
}

// {I_x(a, b), 1 - I_x(a, b)}, each computed directly on its own side of the mean (so the small one
// keeps its relative precision).
std::pair<double, double> ibeta_pair(double a, double b, double x) {
  if (x <= 0.0) return {0.0, 1.0};
  if (x >= 1.0) return {1.0, 0.0};
  // x^a (1 - x)^b / B(a, b), the power of the small variable by pow: exp(a log x) errs by |a log x|
  // ulps, which the inversion divides by a (7e-14 at a = 0.05, x = 1e-121).
  const double lb = log_beta(a, b);
  double front = x <= 0.5 ? std::pow(x, a) * std::exp(b * std::log1p(-x) - lb)
                          : std::pow(1.0 - x, b) * std::exp(a * std::log(x) - lb);
  if (!(front >= std::numeric_limits<double>::min())) front = std::exp(a * std::log(x) + b * std::log1p(-x) - lb);
  if (x < (a + 1.0) / (a + b + 2.0)) {
    const double i = front * beta_cf(a, b, x) / a;
    return {i, 1.0 - i};
  }
  const double j = front * beta_cf(b, a, 1.0 - x) / b;
  return {1.0 - j, j};
}

void check_beta_shape(double a, double b) {
  if (!(std::isfinite(a) && a > 0.0 && std::isfinite(b) && b > 0.0))
    value_error("the beta distribution needs finite a > 0 and b > 0, got a = " + fmt(a) + ", b = " + fmt(b));
}

// A starting point for I_x(a, b) = p: Abramowitz & Stegun 26.5.22 for a, b >= 1, the two power-law
// tails of the density otherwise.
double beta_ppf_guess(double p, double a, double b) {
  if (a >= 1.0 && b >= 1.0) {
    const double pp = p < 0.5 ? p : 1.0 - p;
    const double t = std::sqrt(-2.0 * std::log(pp));
    double z = (2.30753 + t * 0.27061) / (1.0 + t * (0.99229 + t * 0.04481)) - t;
    if (p < 0.5) z = -z;
    const double al = (z * z - 3.0) / 6.0;
    const double h = 2.0 / (1.0 / (2.0 * a - 1.0) + 1.0 / (2.0 * b - 1.0));
    const double w = z * std::sqrt(al + h) / h -
                     (1.0 / (2.0 * b - 1.0) - 1.0 / (2.0 * a - 1.0)) * (al + 5.0 / 6.0 - 2.0 / (3.0 * h));
    return a / (a + b * std::exp(2.0 * w));
  }
  const double t = std::exp(a * std::log(a / (a + b))) / a;
  const double u = std::exp(b * std::log(b / (a + b))) / b;
  const double w = t + u;
  return p < t / w ? std::pow(a * w * p, 1.0 / a) : 1.0 - std::pow(b * w * (1.0 - p), 1.0 / b);
}

// z in (0, 1/2] with I_z(a, b) = p_lo, 1 - I_z(a, b) = p_hi (p_lo + p_hi = 1, the smaller of them
// exact): Halley steps inside a bisection bracket, the residual taken on the smaller tail, where
// ibeta_pair has full relative precision.
double beta_solve_lower(double a, double b, double p_lo, double p_hi) {
  const bool use_hi = p_hi < p_lo;
  const double lbeta = log_beta(a, b);
  double lo = 0.0, hi = 0.5;
  double z = beta_ppf_guess(p_lo, a, b);
  if (!(z > 0.0 && z < 0.5)) z = 0.25;
  for (int it = 0; it < 300; ++it) {
    const auto [i, j] = ibeta_pair(a, b, z);
    const double f = use_hi ? p_hi - j : i - p_lo;  // increasing in z either way
    if (f == 0.0) return z;
    if (f < 0.0) lo = z; else hi = z;
    const double u = f / std::exp((a - 1.0) * std::log(z) + (b - 1.0) * std::log1p(-z) - lbeta);
    const double curv = (a - 1.0) / z - (b - 1.0) / (1.0 - z);  // f'' / f'
    const double denom = 1.0 - 0.5 * u * curv;
    double next = z - ((std::isfinite(denom) && denom > 0.5) ? u / denom : u);
    if (!(next > lo && next < hi)) next = lo > 0.0 ? std::sqrt(lo * hi) : 0.5 * hi;
    if (!(next > lo && next < hi)) next = 0.5 * (lo + hi);
    if (std::fabs(next - z) <= 2e-16 * z || next == z) return next;
    z = next;
  }
  return z;
}

// x with I_x(a, b) = p, the inverse regularized incomplete beta function (scipy.stats.beta.ppf).
// Solved for min(x, 1 - x): beyond 1/2 as 1 - z with I_z(b, a) = 1 - p, so x near 1 is as precise
// as x near 0.
double beta_ppf_one(double p, double a, double b) {
  if (!(p >= 0.0 && p <= 1.0)) value_error("beta_ppf needs p in [0, 1], got " + fmt(p));
  if (p == 0.0) return 0.0;
  if (p == 1.0) return 1.0;
  if (a == b && p == 0.5) return 0.5;  // the median by symmetry (the iteration stops ~2 ulps off)
  const double q = 1.0 - p;  // exact for p >= 1/2, the case where the residual reads it
  if (p <= ibeta_pair(a, b, 0.5).first) return beta_solve_lower(a, b, p, q);
  return 1.0 - beta_solve_lower(b, a, q, p);
}

// --- sigma schedules (k-diffusion's, as diffusers' _convert_to_* write them) -----------------

// Karras et al. (2022), eq. 5: sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho, rho 7.
Vec karras_sigmas(double sigma_min, double sigma_max, int64_t n) {
  const double rho = 7.0;
  const double min_inv = std::pow(sigma_min, 1.0 / rho), max_inv = std::pow(sigma_max, 1.0 / rho);
  Vec s = np_linspace(0.0, 1.0, n);
  for (auto& r : s) r = std::pow(max_inv + r * (min_inv - max_inv), rho);
  return s;
}

// Evenly spaced in log sigma.
Vec exponential_sigmas(double sigma_min, double sigma_max, int64_t n) {
  Vec s = np_linspace(std::log(sigma_max), std::log(sigma_min), n);
  for (auto& v : s) v = std::exp(v);
  return s;
}

// Lee et al. (2024), "Beta Sampling is All You Need": sigma_min + F^-1(1 - i/(n-1)) (sigma_max - sigma_min)
// with F the Beta(0.6, 0.6) distribution function.
Vec beta_sigmas(double sigma_min, double sigma_max, int64_t n) {
  Vec s = np_linspace(0.0, 1.0, n);
  for (auto& v : s) v = sigma_min + beta_ppf_one(1.0 - v, 0.6, 0.6) * (sigma_max - sigma_min);
  return s;
}

// Lu et al. (2022), DPM-Solver: uniform in lambda between the ends (rho = 1, as diffusers has it).
Vec lu_lambdas(double lambda_min, double lambda_max, int64_t n) {
  Vec l = np_linspace(0.0, 1.0, n);
  for (auto& r : l) r = lambda_max + r * (lambda_min - lambda_max);
  return l;
}

// diffusers' _sigma_to_t: the fractional training index of log_sigma, interpolated linearly in
// log sigma between the two training entries around it (clamped to the table's ends). `table`
// rounds like the training table (low - high is float32 there: exact by Sterbenz but where log sigma
// crosses 0, and even there ~1e-8 of a step, below a float32 timestep's ulp), `point` like log_sigma.
double sigma_to_t(double log_sigma, const Vec& log_sigmas, Round table, Round point) {
  const int64_t n = static_cast<int64_t>(log_sigmas.size());
  int64_t low_idx = 0;  // the last index with log_sigmas[k] <= log_sigma, else 0
  for (int64_t k = 0; k < n; ++k)
    if (point(log_sigma - log_sigmas[k]) >= 0.0) low_idx = k;
  low_idx = std::min(low_idx, n - 2);
  const double low = log_sigmas[low_idx], high = log_sigmas[low_idx + 1];
  double w = point(point(low - log_sigma) / table(low - high));
  w = w < 0.0 ? 0.0 : (w > 1.0 ? 1.0 : w);
  return point(1.0 - w) * static_cast<double>(low_idx) + w * static_cast<double>(low_idx + 1);
}

double log_clamped(double sigma) { return std::log(std::max(sigma, 1e-10)); }

Vec sigmas_to_t(const Vec& sigmas, const Vec& log_sigmas, Round table) {
  Vec t(sigmas.size());
  for (size_t i = 0; i < sigmas.size(); ++i) t[i] = sigma_to_t(log_clamped(sigmas[i]), log_sigmas, table, kF64);
  return t;
}

// --- flow-matching shifts ----------------------------------------------------------------------

// SD3 (Esser et al., 2024), eq. 23: sigma' = s sigma / (1 + (s - 1) sigma).
Vec shift_sigmas(Vec s, double shift, Round P) {
  for (auto& v : s) v = P(P(P(shift) * v) / P(1.0 + P(P(shift - 1.0) * v)));
  return s;
}

// Resolution-dependent shift (Flux): exponential e^mu / (e^mu + (1/sigma - 1)), linear
// mu / (mu + (1/sigma - 1)); diffusers' exponent sigma is always 1.
Vec time_shift(Vec s, double mu, const std::string& type, Round P) {
  const double m = P(type == "exponential" ? std::exp(mu) : mu);
  for (auto& v : s) v = P(m / P(m + P(P(1.0 / v) - 1.0)));
  return s;
}

// LTX-Video's stretch: 1 - (1 - sigma) / scale with scale chosen so the last sigma is shift_terminal.
Vec stretch_to_terminal(Vec s, double shift_terminal, Round P) {
  const double omz_last = P(1.0 - s.back());
  if (omz_last == 0.0) value_error("shift_terminal needs the last sigma before stretching below 1, got 1");
  const double scale = P(omz_last / P(1.0 - shift_terminal));
  for (auto& v : s) v = P(1.0 - P(P(1.0 - v) / scale));
  return s;
}

void check_mu(const std::optional<double>& mu, bool use_dynamic_shifting, const std::string& time_shift_type) {
  check_choice(time_shift_type, "time_shift_type", {"exponential", "linear"});
  if (use_dynamic_shifting && !mu) value_error("mu is required when use_dynamic_shifting is True");
  if (!use_dynamic_shifting && mu)
    value_error("mu is only used with use_dynamic_shifting=True, got mu = " + fmt(*mu) +
                " with use_dynamic_shifting=False");
  if (mu && !std::isfinite(*mu)) value_error("mu must be finite, got " + fmt(*mu));
  if (mu && time_shift_type == "linear" && !(*mu > 0.0))
    value_error("with time_shift_type 'linear', mu must be > 0, got " + fmt(*mu));
}

void check_shift(double shift, const char* what) {
  if (!(std::isfinite(shift) && shift > 0.0)) value_error(std::string(what) + " must be > 0, got " + fmt(shift));
}

// shift_terminal: None or 0 (diffusers tests its truth value) is off, else in (0, 1).
bool use_terminal(const std::optional<double>& st) {
  if (!st || *st == 0.0) return false;
  if (!(*st > 0.0 && *st < 1.0)) value_error("shift_terminal must lie in (0, 1) (None or 0: off), got " + fmt(*st));
  return true;
}

// --- flow matching: FlowMatchEulerDiscreteScheduler ----------------------------------------------

// The sigmas the scheduler holds after __init__ (torch float32): sigma = t / N for t = N..1, shifted
// by `shift` unless use_dynamic_shifting; timesteps = sigma * N. Their ends are sigma_max / sigma_min.
std::pair<Vec, Vec> flow_train(int64_t num_train_timesteps, double shift, bool use_dynamic_shifting) {
  check_num_train(num_train_timesteps);
  check_shift(shift, "shift");
  const int64_t n = num_train_timesteps;
  Vec s(n), t(n);
  for (int64_t i = 0; i < n; ++i) s[i] = kF32(static_cast<double>(n - i) / static_cast<double>(n));
  if (!use_dynamic_shifting) s = shift_sigmas(s, shift, kF32);
  for (int64_t i = 0; i < n; ++i) t[i] = kF32(s[i] * static_cast<double>(n));
  return {s, t};
}

py::tuple flow_train_sigmas(int64_t num_train_timesteps, double shift, bool use_dynamic_shifting) {
  const auto [s, t] = flow_train(num_train_timesteps, shift, use_dynamic_shifting);
  return py::make_tuple(from_vec(s), from_vec(t));
}

// FlowMatchEulerDiscreteScheduler.set_timesteps. Returns (sigmas with the terminal 0 appended, or 1
// with invert_sigmas; timesteps). Without sigmas / timesteps lists: timesteps linspace(sigma_max N,
// sigma_min N, n) from the init-time (shifted) training sigmas, sigma = t / N, shifted (again) by
// shift or mu, stretched to shift_terminal, converted to karras / exponential / beta, in float64.
// A sigmas or timesteps list is cast to float32 first and numpy then shifts it in float32.
py::tuple flow_sigmas(int64_t num_train_timesteps, std::optional<int64_t> num_inference_steps, double shift,
                      bool use_dynamic_shifting, std::optional<double> mu, const std::string& time_shift_type,
                      std::optional<double> shift_terminal, bool use_karras_sigmas, bool use_exponential_sigmas,
                      bool use_beta_sigmas, bool invert_sigmas, const OptVec& sigmas_in, const OptVec& timesteps_in,
                      std::optional<double> sigma_min, std::optional<double> sigma_max) {
  check_num_train(num_train_timesteps);
  check_shift(shift, "shift");
  check_mu(mu, use_dynamic_shifting, time_shift_type);
  check_one_sigma_kind(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas);
  const bool terminal = use_terminal(shift_terminal);
  const double N = static_cast<double>(num_train_timesteps);
  const Vec user_s = opt_vec(sigmas_in, "sigmas"), user_t = opt_vec(timesteps_in, "timesteps");
  if (sigmas_in) check_in(user_s, "sigmas", 0.0, 1.0);
  if (timesteps_in) check_in(user_t, "timesteps", 0.0, N);
  if (sigmas_in && timesteps_in && user_s.size() != user_t.size())
    value_error("sigmas and timesteps must have the same length, got " + std::to_string(user_s.size()) + " and " +
                std::to_string(user_t.size()));
  int64_t n;
  if (num_inference_steps) {
    n = *num_inference_steps;
    for (auto [given, len, what] : {std::tuple{bool(sigmas_in), user_s.size(), "sigmas"},
                                    std::tuple{bool(timesteps_in), user_t.size(), "timesteps"}})
      if (given && static_cast<int64_t>(len) != n)
        value_error(std::string(what) + " must have num_inference_steps = " + std::to_string(n) +
                    " entries, got " + std::to_string(len));
  } else {
    if (!sigmas_in && !timesteps_in) value_error("num_inference_steps, sigmas or timesteps is required");
    n = static_cast<int64_t>(sigmas_in ? user_s.size() : user_t.size());
  }
  check_steps(n);

  // 1. sigmas before shifting; a user list makes numpy's arithmetic float32 from here to the cast.
  const Round P{sigmas_in || timesteps_in};
  Vec ts32(user_t.size());
  for (size_t i = 0; i < user_t.size(); ++i) ts32[i] = kF32(user_t[i]);
  Vec s(n);
  if (sigmas_in) {
    for (int64_t i = 0; i < n; ++i) s[i] = kF32(user_s[i]);
  } else if (timesteps_in) {
    for (int64_t i = 0; i < n; ++i) s[i] = kF32(ts32[i] / N);
  } else {
    const Vec train = flow_train(num_train_timesteps, shift, use_dynamic_shifting).first;
    const double smax = sigma_max ? *sigma_max : train.front(), smin = sigma_min ? *sigma_min : train.back();
    check_in({smin, smax}, "sigma_min / sigma_max", 0.0, 1.0);
    s = np_linspace(smax * N, smin * N, n);
    for (auto& v : s) v = v / N;
  }
  // 2. shift, 3. stretch, 4. convert.
  s = use_dynamic_shifting ? time_shift(s, *mu, time_shift_type, P) : shift_sigmas(s, shift, P);
  if (terminal) s = stretch_to_terminal(s, *shift_terminal, P);
  if (use_karras_sigmas || use_exponential_sigmas || use_beta_sigmas) {
    check_sigma_range(s.back(), s.front(), use_exponential_sigmas);
    s = use_karras_sigmas ? karras_sigmas(s.back(), s.front(), n)
        : use_exponential_sigmas ? exponential_sigmas(s.back(), s.front(), n)
                                 : beta_sigmas(s.back(), s.front(), n);
  }
  // 5. diffusers casts to float32; timesteps = sigma * N in float32. 6. invert (in float32), append.
  Vec t(n);
  for (int64_t i = 0; i < n; ++i) t[i] = timesteps_in ? ts32[i] : kF32(kF32(s[i]) * N);
  if (invert_sigmas) {
    for (int64_t i = 0; i < n; ++i) {
      s[i] = kF32(1.0 - kF32(s[i]));
      t[i] = kF32(s[i] * N);
    }
  }
  s.push_back(invert_sigmas ? 1.0 : 0.0);
  return py::make_tuple(from_vec(s), from_vec(t));
}

// The pipelines' calculate_shift (Flux, SD3, ...): mu linear in the image sequence length, base_shift
// at base_seq_len and max_shift at max_seq_len.
double calculate_shift(double image_seq_len, double base_seq_len, double max_seq_len, double base_shift,
                       double max_shift) {
  for (double v : {image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift})
    if (!std::isfinite(v)) value_error("calculate_shift needs finite arguments, got " + fmt(v));
  if (max_seq_len == base_seq_len)
    value_error("max_seq_len and base_seq_len must differ, got " + fmt(max_seq_len) + " and " + fmt(base_seq_len));
  const double m = (max_shift - base_shift) / (max_seq_len - base_seq_len);
  const double b = base_shift - m * base_seq_len;
  return image_seq_len * m + b;
}

// diffusers' index_for_timestep: the position of `timestep` in the schedule; the second one where
// it occurs more than once (so a schedule entered mid-way does not skip a sigma).
int64_t index_for_timestep(const DoubleArray& timesteps, double timestep) {
  const Vec ts = to_vec(timesteps, "timesteps");
  std::vector<int64_t> hits;
  for (size_t i = 0; i < ts.size() && hits.size() < 2; ++i)
    if (ts[i] == timestep) hits.push_back(static_cast<int64_t>(i));
  if (hits.empty()) value_error("timestep " + fmt(timestep) + " is not in the schedule's timesteps");
  return hits.size() > 1 ? hits[1] : hits[0];
}

// --- the VP training table -------------------------------------------------------------------------

struct Table {
  Vec sigmas, log_sigmas;
  double final_sigma;
  Round P;
};

// sigmas[t] = sqrt((1 - ab_t) / ab_t) at every training step, their log, and the sigma of ab_0
// (final_sigmas_type "sigma_min"). diffusers' values are float32 (float32 = True): the facade takes
// them from torch and numpy, whose float32 sqrt and log round differently from IEEE.
Table make_table(const DoubleArray& sigmas, const DoubleArray& log_sigmas, double final_sigma, bool float32) {
  Table tb{to_vec(sigmas, "train_sigmas"), to_vec(log_sigmas, "log_sigmas"), final_sigma, Round{float32}};
  if (tb.sigmas.size() < 2)
    value_error("the training table needs at least 2 sigmas, got " + std::to_string(tb.sigmas.size()));
  if (tb.log_sigmas.size() != tb.sigmas.size())
    value_error("train_sigmas and log_sigmas must have the same length, got " + std::to_string(tb.sigmas.size()) +
                " and " + std::to_string(tb.log_sigmas.size()));
  for (size_t i = 0; i < tb.sigmas.size(); ++i)
    if (!(tb.sigmas[i] > 0.0 && std::isfinite(tb.sigmas[i])))
      value_error("train_sigmas must be finite and > 0 (alphas_cumprod in (0, 1)), got train_sigmas[" +
                  std::to_string(i) + "] = " + fmt(tb.sigmas[i]));
  if (!(final_sigma >= 0.0 && std::isfinite(final_sigma)))
    value_error("final_sigma must be finite and >= 0, got " + fmt(final_sigma));
  return tb;
}

// float64 table from alphas_cumprod: (sigmas, log_sigmas, lambda_t = log sqrt(ab) - log sqrt(1 - ab), sigma at ab_0).
py::tuple vp_train_table(const DoubleArray& alphas_cumprod) {
  const Vec ab = to_vec(alphas_cumprod, "alphas_cumprod");
  if (ab.empty()) value_error("alphas_cumprod must not be empty");
  Vec s(ab.size()), ls(ab.size()), lam(ab.size());
  for (size_t i = 0; i < ab.size(); ++i) {
    if (!(ab[i] > 0.0 && ab[i] < 1.0))
      value_error("alphas_cumprod must lie in the open interval (0, 1), got alphas_cumprod[" + std::to_string(i) +
                  "] = " + fmt(ab[i]));
    s[i] = std::sqrt((1.0 - ab[i]) / ab[i]);
    ls[i] = std::log(s[i]);
    lam[i] = std::log(std::sqrt(ab[i])) - std::log(std::sqrt(1.0 - ab[i]));
  }
  return py::make_tuple(from_vec(s), from_vec(ls), from_vec(lam), s[0]);
}

double final_sigma_of(const std::string& final_sigmas_type, double sigma_min_value) {
  check_choice(final_sigmas_type, "final_sigmas_type", {"zero", "sigma_min"});
  return final_sigmas_type == "sigma_min" ? sigma_min_value : 0.0;
}

// --- sigma space: EulerDiscreteScheduler / EulerAncestralDiscreteScheduler ------------------------

// The Euler schedulers' timesteps (float32 in diffusers): linspace over [0, N - 1]; leading multiples
// of N // n plus steps_offset; trailing round(arange(N, 0, -N / n)) - 1.
Vec euler_timesteps(int64_t N, int64_t n, const std::string& spacing, int64_t steps_offset, Round P) {
  check_choice(spacing, "timestep_spacing", {"linspace", "leading", "trailing"});
  Vec t;
  if (spacing == "linspace") {
    t = flipped(np_linspace(0.0, static_cast<double>(N - 1), n));
    for (auto& v : t) v = P(v);
  } else if (spacing == "leading") {
    const int64_t ratio = N / n;
    for (int64_t i = n - 1; i >= 0; --i) t.push_back(P(static_cast<double>(i * ratio + steps_offset)));
  } else {
    t = np_arange(static_cast<double>(N), 0.0, -(static_cast<double>(N) / static_cast<double>(n)));
    for (auto& v : t) v = P(std::nearbyint(v) - 1.0);
  }
  return t;
}

// log-linear interpolation, n + 1 sigmas from sigma_max down to sigma_min evenly in log sigma; as
// torch.linspace (first half start + step i, second half end - step (n - i)), in float64. diffusers'
// float32 values come from torch (its float32 exp is not correctly rounded) through the facade.
Vec log_linear_sigmas(const Table& tb, int64_t n) {
  const int64_t steps = n + 1;
  const double start = tb.log_sigmas.back(), end = tb.log_sigmas.front();
  const double step = (end - start) / static_cast<double>(steps - 1);
  Vec s(steps);
  for (int64_t i = 0; i < steps; ++i)
    s[i] = std::exp(i < steps / 2 ? start + step * static_cast<double>(i)
                                  : end - step * static_cast<double>(steps - i - 1));
  return s;
}

// EulerDiscreteScheduler.set_timesteps without a sigmas list. Returns (sigmas + [final], timesteps).
py::tuple euler_sigmas(const DoubleArray& train_sigmas, const DoubleArray& log_sigmas, double final_sigma,
                       bool float32, std::optional<int64_t> num_inference_steps, const std::string& timestep_spacing,
                       int64_t steps_offset, const std::string& interpolation_type, bool use_karras_sigmas,
                       bool use_exponential_sigmas, bool use_beta_sigmas, std::optional<double> sigma_min,
                       std::optional<double> sigma_max, const std::string& final_sigmas_type,
                       const OptVec& timesteps_in, const OptVec& log_linear_in) {
  const Table tb = make_table(train_sigmas, log_sigmas, final_sigma, float32);
  const int64_t N = static_cast<int64_t>(tb.sigmas.size());
  check_one_sigma_kind(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas);
  check_choice(interpolation_type, "interpolation_type", {"linear", "log_linear"});
  const double last = final_sigma_of(final_sigmas_type, tb.final_sigma);
  const bool convert = use_karras_sigmas || use_exponential_sigmas || use_beta_sigmas;
  Vec t;
  int64_t n;
  if (timesteps_in) {
    if (num_inference_steps) value_error("give num_inference_steps or timesteps, not both");
    if (convert)
      value_error("timesteps cannot be given with use_karras_sigmas, use_exponential_sigmas or use_beta_sigmas");
    t = to_vec(*timesteps_in, "timesteps");
    check_finite(t, "timesteps");
    for (auto& v : t) v = tb.P(v);
    n = static_cast<int64_t>(t.size());
    check_steps(n);
  } else {
    if (!num_inference_steps) value_error("num_inference_steps, timesteps or sigmas is required");
    n = *num_inference_steps;
    check_steps(n);
    t = euler_timesteps(N, n, timestep_spacing, steps_offset, tb.P);
  }
  Vec s;
  if (interpolation_type == "linear") {
    for (double v : t) s.push_back(np_interp(v, tb.sigmas));
  } else if (log_linear_in) {
    s = to_vec(*log_linear_in, "log_linear_sigmas");
    if (static_cast<int64_t>(s.size()) != n + 1)
      value_error("log_linear_sigmas must hold num_inference_steps + 1 = " + std::to_string(n + 1) + " values, got " +
                  std::to_string(s.size()));
    check_in(s, "log_linear_sigmas", 0.0, std::numeric_limits<double>::max());
  } else {
    if (tb.P.f32) value_error("float32 tables need log_linear_sigmas from torch (its float32 exp is not IEEE's)");
    s = log_linear_sigmas(tb, n);
  }
  if (convert) {
    const double smin = sigma_min ? *sigma_min : s.back(), smax = sigma_max ? *sigma_max : s.front();
    check_sigma_range(smin, smax, use_exponential_sigmas);
    s = use_karras_sigmas ? karras_sigmas(smin, smax, n)
        : use_exponential_sigmas ? exponential_sigmas(smin, smax, n)
                                 : beta_sigmas(smin, smax, n);
    t = sigmas_to_t(s, tb.log_sigmas, tb.P);
  }
  s.push_back(last);
  return py::make_tuple(from_vec(s), from_vec(t));
}

// EulerDiscreteScheduler.set_timesteps(sigmas=[...]): the list (with its final sigma) is cast to
// float32 and each but the last mapped to a timestep by _sigma_to_t, in numpy float32.
// log_sigma[i] = log(max(sigmas[i], 1e-10)) as numpy computes it (float32: numpy's own log).
py::tuple euler_sigmas_from_list(const DoubleArray& sigmas_in, const DoubleArray& log_sigma_in,
                                 const DoubleArray& train_sigmas, const DoubleArray& log_sigmas, bool float32) {
  const Table tb = make_table(train_sigmas, log_sigmas, 0.0, float32);
  Vec s = to_vec(sigmas_in, "sigmas");
  const Vec ls = to_vec(log_sigma_in, "log_sigma");
  if (s.size() < 2)
    value_error("sigmas must hold at least 2 values (the last is the final sigma), got " + std::to_string(s.size()));
  if (ls.size() != s.size())
    value_error("sigmas and log_sigma must have the same length, got " + std::to_string(s.size()) + " and " +
                std::to_string(ls.size()));
  check_in(s, "sigmas", 0.0, std::numeric_limits<double>::max());
  for (auto& v : s) v = tb.P(v);
  Vec t(s.size() - 1);
  for (size_t i = 0; i + 1 < s.size(); ++i) t[i] = sigma_to_t(ls[i], tb.log_sigmas, tb.P, tb.P);
  return py::make_tuple(from_vec(s), from_vec(t));
}

// --- VP multistep: DPMSolverMultistepScheduler, UniPCMultistepScheduler --------------------------

// Integer timesteps of the multistep schedulers, n of the n + 1 points of the range [0, last): linspace
// round(linspace(0, last - 1, n + 1))[::-1][:-1]; leading multiples of last // (n + 1) plus steps_offset;
// trailing round(arange(last, 0, -N / n)) - 1 (step from N, not from last).
std::vector<int64_t> multistep_timesteps(int64_t N, int64_t last, int64_t n, const std::string& spacing,
                                         int64_t steps_offset) {
  check_choice(spacing, "timestep_spacing", {"linspace", "leading", "trailing"});
  std::vector<int64_t> t;
  if (spacing == "linspace") {
    const Vec y = np_linspace(0.0, static_cast<double>(last - 1), n + 1);
    for (int64_t i = n; i >= 1; --i) t.push_back(static_cast<int64_t>(std::nearbyint(y[i])));
  } else if (spacing == "leading") {
    const int64_t ratio = last / (n + 1);
    for (int64_t i = n; i >= 1; --i) t.push_back(i * ratio + steps_offset);
  } else {
    for (double v : np_arange(static_cast<double>(last), 0.0, -(static_cast<double>(N) / static_cast<double>(n))))
      t.push_back(static_cast<int64_t>(std::nearbyint(v)) - 1);
  }
  return t;
}

// DPMSolver's lambda_min_clipped: the timesteps stop below the first t whose lambda_t falls under it
// (torch.searchsorted over the flipped lambdas, comparing in their dtype).
int64_t dpm_last_timestep(const Vec& lambdas, double lambda_min_clipped, Round P) {
  const double clip = P(lambda_min_clipped);
  int64_t clipped = 0;
  for (auto it = lambdas.rbegin(); it != lambdas.rend() && *it < clip; ++it) ++clipped;
  const int64_t last = static_cast<int64_t>(lambdas.size()) - clipped;
  if (last < 1)
    value_error("lambda_min_clipped = " + fmt(lambda_min_clipped) + " clips every timestep (the largest lambda_t is " +
                fmt(lambdas.front()) + ")");
  return last;
}

py::tuple dpm_sigmas(const DoubleArray& train_sigmas, const DoubleArray& log_sigmas, const DoubleArray& lambdas_in,
                     double final_sigma, bool float32, std::optional<int64_t> num_inference_steps,
                     const std::string& timestep_spacing, int64_t steps_offset, double lambda_min_clipped,
                     bool use_karras_sigmas, bool use_exponential_sigmas, bool use_beta_sigmas, bool use_lu_lambdas,
                     bool use_flow_sigmas, double flow_shift, const std::string& final_sigmas_type, bool round_t,
                     const std::optional<IntArray>& timesteps_in) {
  const Table tb = make_table(train_sigmas, log_sigmas, final_sigma, float32);
  const Vec lambdas = to_vec(lambdas_in, "lambdas");
  const int64_t N = static_cast<int64_t>(tb.sigmas.size());
  if (lambdas.size() != tb.sigmas.size())
    value_error("lambdas must have one entry per training step (" + std::to_string(N) + "), got " +
                std::to_string(lambdas.size()));
  check_one_sigma_kind(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas);
  check_shift(flow_shift, "flow_shift");
  if (std::isnan(lambda_min_clipped)) value_error("lambda_min_clipped must not be NaN");
  const double last_sigma = final_sigma_of(final_sigmas_type, tb.final_sigma);
  std::vector<int64_t> t;
  int64_t n;
  if (timesteps_in) {
    if (num_inference_steps) value_error("give num_inference_steps or timesteps, not both");
    for (auto [on, name] : {std::pair{use_karras_sigmas, "use_karras_sigmas"}, {use_lu_lambdas, "use_lu_lambdas"},
                            {use_exponential_sigmas, "use_exponential_sigmas"}, {use_beta_sigmas, "use_beta_sigmas"},
                            {use_flow_sigmas, "use_flow_sigmas"}})
      if (on) value_error(std::string("timesteps cannot be given with ") + name);
    t = to_ivec(*timesteps_in, "timesteps");
    n = static_cast<int64_t>(t.size());
    check_steps(n);
    for (size_t i = 0; i < t.size(); ++i)
      if (t[i] < 0 || t[i] >= N)
        value_error("timesteps must lie in [0, " + std::to_string(N) + "), got timesteps[" + std::to_string(i) +
                    "] = " + std::to_string(t[i]));
  } else {
    if (!num_inference_steps) value_error("num_inference_steps or timesteps is required");
    n = *num_inference_steps;
    check_steps(n);
    t = multistep_timesteps(N, dpm_last_timestep(lambdas, lambda_min_clipped, tb.P), n, timestep_spacing, steps_offset);
  }
  // diffusers' precedence: karras, lu, exponential, beta, flow, else the table at the timesteps.
  Vec s;
  auto to_t = [&](const Vec& sig, bool rounded) {
    Vec tt = sigmas_to_t(sig, tb.log_sigmas, tb.P);
    if (rounded) for (auto& v : tt) v = std::nearbyint(v);
    t = trunc_ints(tt, "timesteps");
  };
  if (use_karras_sigmas) {
    s = karras_sigmas(tb.sigmas.front(), tb.sigmas.back(), n);
    to_t(s, round_t);
  } else if (use_lu_lambdas) {
    s = lu_lambdas(tb.log_sigmas.front(), tb.log_sigmas.back(), n);
    for (auto& v : s) v = std::exp(v);
    to_t(s, round_t);
  } else if (use_exponential_sigmas || use_beta_sigmas) {
    s = use_exponential_sigmas ? exponential_sigmas(tb.sigmas.front(), tb.sigmas.back(), n)
                               : beta_sigmas(tb.sigmas.front(), tb.sigmas.back(), n);
    to_t(s, false);
  } else if (use_flow_sigmas) {
    Vec a = np_linspace(1.0, 1.0 / static_cast<double>(N), n + 1);
    for (auto& v : a) v = 1.0 - v;
    a = flipped(shift_sigmas(a, flow_shift, kF64));
    s.assign(a.begin(), a.end() - 1);
    Vec tt(s.size());
    for (size_t i = 0; i < s.size(); ++i) tt[i] = s[i] * static_cast<double>(N);
    t = trunc_ints(tt, "timesteps");
  } else {
    for (int64_t v : t) s.push_back(np_interp(static_cast<double>(v), tb.sigmas));
  }
  s.push_back(last_sigma);
  return py::make_tuple(from_vec(s), from_ivec(t));
}

py::tuple unipc_sigmas(const DoubleArray& train_sigmas, const DoubleArray& log_sigmas, double final_sigma,
                       bool float32, std::optional<int64_t> num_inference_steps, const std::string& timestep_spacing,
                       int64_t steps_offset, bool use_karras_sigmas, bool use_exponential_sigmas, bool use_beta_sigmas,
                       bool use_flow_sigmas, double flow_shift, bool use_dynamic_shifting, std::optional<double> mu,
                       const std::string& time_shift_type, std::optional<double> shift_terminal,
                       const std::string& final_sigmas_type, std::optional<double> sigma_min,
                       std::optional<double> sigma_max, const OptVec& sigmas_in) {
  const Table tb = make_table(train_sigmas, log_sigmas, final_sigma, float32);
  const int64_t N = static_cast<int64_t>(tb.sigmas.size());
  check_one_sigma_kind(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas);
  check_shift(flow_shift, "flow_shift");
  check_mu(mu, use_dynamic_shifting, time_shift_type);
  check_choice(final_sigmas_type, "final_sigmas_type", {"zero", "sigma_min"});
  const bool zero = final_sigmas_type == "zero";
  if (shift_terminal && !use_flow_sigmas)
    value_error("shift_terminal is only supported with use_flow_sigmas=True");
  const bool terminal = use_terminal(shift_terminal);
  const Vec user = opt_vec(sigmas_in, "sigmas");
  int64_t n;
  if (sigmas_in) {
    if (!use_flow_sigmas) value_error("sigmas can only be given with use_flow_sigmas=True");
    if (num_inference_steps && *num_inference_steps != static_cast<int64_t>(user.size()))
      value_error("sigmas must have num_inference_steps = " + std::to_string(*num_inference_steps) +
                  " entries, got " + std::to_string(user.size()));
    check_in(user, "sigmas", 0.0, 1.0);
    n = static_cast<int64_t>(user.size());
  } else {
    if (!num_inference_steps) value_error("num_inference_steps or sigmas is required");
    n = *num_inference_steps;
  }
  check_steps(n);
  std::vector<int64_t> t = multistep_timesteps(N, N, n, timestep_spacing, steps_offset);
  Vec s;
  if (use_karras_sigmas || use_exponential_sigmas || use_beta_sigmas) {
    // From the training table, or the user's (flow) list: its log in float64, flipped.
    Vec in = sigmas_in ? user : tb.sigmas, logs = tb.log_sigmas;
    Round table = tb.P;
    if (sigmas_in) {
      if (!(use_karras_sigmas && use_flow_sigmas) && user.size() < 2)
        value_error("use_exponential_sigmas / use_beta_sigmas with a sigmas list map sigmas to timesteps through "
                    "the list's log, which needs at least 2 sigmas, got 1");
      logs = user;
      for (auto& v : logs) v = std::log(v);
      table = kF64;
    }
    in = flipped(in);
    const double smin = sigma_min ? *sigma_min : in.back(), smax = sigma_max ? *sigma_max : in.front();
    check_sigma_range(smin, smax, use_exponential_sigmas);
    s = use_karras_sigmas ? karras_sigmas(smin, smax, n)
        : use_exponential_sigmas ? exponential_sigmas(smin, smax, n)
                                 : beta_sigmas(smin, smax, n);
    Vec tt;
    if (use_karras_sigmas && use_flow_sigmas) {
      for (auto& v : s) v = v / (v + 1.0);
      for (double v : s) tt.push_back(v * static_cast<double>(N));
    } else {
      tt = sigmas_to_t(s, logs, table);
      if (use_karras_sigmas) for (auto& v : tt) v = std::nearbyint(v);
    }
    t = trunc_ints(tt, "timesteps");
    s.push_back(zero ? 0.0 : s.back());
  } else if (use_flow_sigmas) {
    if (sigmas_in) {
      s = user;
    } else {
      s = np_linspace(1.0, 1.0 / static_cast<double>(N), n + 1);
      s.pop_back();
    }
    s = use_dynamic_shifting ? time_shift(s, *mu, time_shift_type, kF64) : shift_sigmas(s, flow_shift, kF64);
    if (terminal) s = stretch_to_terminal(s, *shift_terminal, kF64);
    if (std::fabs(s[0] - 1.0) < 1e-6) s[0] -= 1e-6;
    Vec tt;
    for (double v : s) tt.push_back(v * static_cast<double>(N));
    t = trunc_ints(tt, "timesteps");
    s.push_back(zero ? 0.0 : s.back());
  } else {
    for (int64_t v : t) s.push_back(np_interp(static_cast<double>(v), tb.sigmas));
    s.push_back(zero ? 0.0 : tb.final_sigma);
  }
  return py::make_tuple(from_vec(s), from_ivec(t));
}

// _sigma_to_alpha_sigma_t of DPMSolver / UniPC and lambda_t = log alpha_t - log sigma_t:
// VP (sigma space) alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma alpha_t; flow alpha_t = 1 - sigma.
py::tuple alpha_sigma_lambda(const DoubleArray& sigmas_in, bool flow) {
  const Vec s = to_vec(sigmas_in, "sigmas");
  check_in(s, "sigmas", 0.0, flow ? 1.0 : std::numeric_limits<double>::max());
  Vec a(s.size()), b(s.size()), l(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    a[i] = flow ? 1.0 - s[i] : 1.0 / std::sqrt(s[i] * s[i] + 1.0);
    b[i] = flow ? s[i] : s[i] * a[i];
    l[i] = std::log(a[i]) - std::log(b[i]);
  }
  return py::make_tuple(from_vec(a), from_vec(b), from_vec(l));
}

py::array_t<double> beta_ppf(const DoubleArray& p_in, double a, double b) {
  check_beta_shape(a, b);
  Vec p = to_vec(p_in, "p");
  for (auto& v : p) v = beta_ppf_one(v, a, b);
  return from_vec(p);
}

py::array_t<double> beta_cdf(const DoubleArray& x_in, double a, double b) {
  check_beta_shape(a, b);
  Vec x = to_vec(x_in, "x");
  check_in(x, "x", 0.0, 1.0);
  for (auto& v : x) v = ibeta_pair(a, b, v).first;
  return from_vec(x);
}

}  // namespace

void register_sigmas(py::module_& m) {
  using py::arg;
  m.def("calculate_shift", &calculate_shift, arg("image_seq_len"), arg("base_seq_len") = 256,
        arg("max_seq_len") = 4096, arg("base_shift") = 0.5, arg("max_shift") = 1.15,
        "mu for dynamic shifting, linear in the image sequence length (the pipelines' calculate_shift).");
  m.def("flow_train_sigmas", &flow_train_sigmas, arg("num_train_timesteps"), arg("shift"),
        arg("use_dynamic_shifting"), "FlowMatchEulerDiscreteScheduler's init-time (sigmas, timesteps).");
  m.def("flow_sigmas", &flow_sigmas, arg("num_train_timesteps"), arg("num_inference_steps"), arg("shift"),
        arg("use_dynamic_shifting"), arg("mu"), arg("time_shift_type"), arg("shift_terminal"),
        arg("use_karras_sigmas"), arg("use_exponential_sigmas"), arg("use_beta_sigmas"), arg("invert_sigmas"),
        arg("sigmas"), arg("timesteps"), arg("sigma_min"), arg("sigma_max"),
        "FlowMatchEulerDiscreteScheduler.set_timesteps: (sigmas + [terminal], timesteps).");
  m.def("index_for_timestep", &index_for_timestep, arg("timesteps"), arg("timestep"),
        "Position of a timestep in a schedule (the second where it repeats), as diffusers' index_for_timestep.");
  m.def("vp_train_table", &vp_train_table, arg("alphas_cumprod"),
        "float64 (sigmas, log_sigmas, lambdas, final_sigma) of a VP schedule's training steps.");
  m.def("euler_sigmas", &euler_sigmas, arg("train_sigmas"), arg("log_sigmas"), arg("final_sigma"), arg("float32"),
        arg("num_inference_steps"), arg("timestep_spacing"), arg("steps_offset"), arg("interpolation_type"),
        arg("use_karras_sigmas"), arg("use_exponential_sigmas"), arg("use_beta_sigmas"), arg("sigma_min"),
        arg("sigma_max"), arg("final_sigmas_type"), arg("timesteps"), arg("log_linear_sigmas"),
        "EulerDiscreteScheduler.set_timesteps: (sigmas + [final], timesteps).");
  m.def("euler_sigmas_from_list", &euler_sigmas_from_list, arg("sigmas"), arg("log_sigma"), arg("train_sigmas"),
        arg("log_sigmas"), arg("float32"),
        "EulerDiscreteScheduler.set_timesteps(sigmas=...): (sigmas, timesteps).");
  m.def("dpm_sigmas", &dpm_sigmas, arg("train_sigmas"), arg("log_sigmas"), arg("lambdas"), arg("final_sigma"),
        arg("float32"), arg("num_inference_steps"), arg("timestep_spacing"), arg("steps_offset"),
        arg("lambda_min_clipped"), arg("use_karras_sigmas"), arg("use_exponential_sigmas"), arg("use_beta_sigmas"),
        arg("use_lu_lambdas"), arg("use_flow_sigmas"), arg("flow_shift"), arg("final_sigmas_type"), arg("round_t"),
        arg("timesteps"), "DPMSolverMultistepScheduler.set_timesteps: (sigmas + [final], int64 timesteps).");
  m.def("unipc_sigmas", &unipc_sigmas, arg("train_sigmas"), arg("log_sigmas"), arg("final_sigma"), arg("float32"),
        arg("num_inference_steps"), arg("timestep_spacing"), arg("steps_offset"), arg("use_karras_sigmas"),
        arg("use_exponential_sigmas"), arg("use_beta_sigmas"), arg("use_flow_sigmas"), arg("flow_shift"),
        arg("use_dynamic_shifting"), arg("mu"), arg("time_shift_type"), arg("shift_terminal"),
        arg("final_sigmas_type"), arg("sigma_min"), arg("sigma_max"), arg("sigmas"),
        "UniPCMultistepScheduler.set_timesteps: (sigmas + [final], int64 timesteps).");
  m.def("alpha_sigma_lambda", &alpha_sigma_lambda, arg("sigmas"), arg("flow"),
        "(alpha_t, sigma_t, lambda_t) of sigmas: VP alpha = 1/sqrt(sigma^2 + 1), flow alpha = 1 - sigma.");
  m.def("beta_ppf", &beta_ppf, arg("p"), arg("a"), arg("b"),
        "Inverse of the regularized incomplete beta function I_x(a, b) (scipy.stats.beta.ppf).");
  m.def("beta_cdf", &beta_cdf, arg("x"), arg("a"), arg("b"), "The regularized incomplete beta function I_x(a, b).");
}

}  // namespace fastdiff
