// The one list of coefficient-table columns.
//
// Every solver step is  x_s = c_x0 x0_hat + c_eps eps_hat + c_xt x_t + c_m m + sum_k c_hk Hk + std z
// (m the model output as it came, H0..H3 history tensors), and a predictor-corrector step also
// writes the corrected sample  x_c = xc_xt x_t + xc_x0 x0_hat + xc_eps eps_hat + sum_k xc_hk Hk
// on a Gaussian path x_t = a_t x0 + b_t eps (see docs/design.md).  A table is [rows, NCOL]
// float64, one row per step.  C++ indexes rows through the enum below, Python reads the names
// from fastdiff._C.COLUMNS, and the Triton kernel and the C++ CPU step read the same indices,
// generated from this list: a column has one name everywhere.
#pragma once

#define FASTDIFF_COLUMNS(X)                                                                      \
  X(A_T, "a_t")                 /* x_t = a_t x0 + b_t eps: sqrt(ab_t) on VP, 1 - sigma on flow */ \
  X(B_T, "b_t")                 /* sigma_t on VP and flow */                                      \
  X(C_X0, "c_x0")               /* coefficient of x0_hat in the update */                         \
  X(C_EPS, "c_eps")             /* coefficient of eps_hat */                                      \
  X(C_XT, "c_xt")               /* coefficient of x_t */                                          \
  X(C_M, "c_m")                 /* coefficient of the raw model output (flow Euler: s - t) */    \
  X(C_H0, "c_h0")               /* coefficient of history tensor 0 (multistep solvers) */         \
  X(C_H1, "c_h1")               /* coefficient of history tensor 1 */                             \
  X(C_H2, "c_h2")               /* coefficient of history tensor 2 */                             \
  X(C_H3, "c_h3")               /* coefficient of history tensor 3 */                             \
  X(STD, "std")                 /* std of the injected noise (0 on noise-free steps) */           \
  X(C_COV, "c_cov")             /* OCM: d x_s / d x0_hat at fixed x_t */                          \
  X(COV_SCALE, "cov_scale")     /* OCM: b_t^2 / a_t^2, Sigma0 = cov_scale (1 + h) */              \
  X(LOG_VAR_MIN, "log_var_min") /* learned_range: log of the fixed_small variance */              \
  X(LOG_VAR_MAX, "log_var_max") /* learned_range: log of beta_{t|s} */                            \
  X(VAR_MAX, "var_max")         /* cap on the total per-element variance, +inf if none */         \
  X(NOISE, "noise")             /* 1 where the OCM / learned variance modes inject noise */       \
  X(T, "t")                     /* the timestep t of this step */                                 \
  X(PREV_T, "prev_t")           /* the timestep s it steps to (-1 for the final step) */          \
  X(A_S, "a_s")                 /* a at s */                                                      \
  X(B_S, "b_s")                 /* b at s */                                                      \
  X(C_IN, "c_in")               /* scale of the next model input written by the step, 0: none */ \
  X(XC_XT, "xc_xt")             /* corrected sample x_c (UniPC's corrector): coefficient of x_t */ \
  X(XC_X0, "xc_x0")             /* x_c: coefficient of x0_hat */                                  \
  X(XC_EPS, "xc_eps")           /* x_c: coefficient of eps_hat */                                 \
  X(XC_H0, "xc_h0")             /* x_c: coefficient of history tensor 0 */                        \
  X(XC_H1, "xc_h1")             /* x_c: coefficient of history tensor 1 */                        \
  X(XC_H2, "xc_h2")             /* x_c: coefficient of history tensor 2 */                        \
  X(XC_H3, "xc_h3")             /* x_c: coefficient of history tensor 3 */

namespace fastdiff {

enum Col : int {
#define FASTDIFF_ENUM(name, str) name,
  FASTDIFF_COLUMNS(FASTDIFF_ENUM)
#undef FASTDIFF_ENUM
  NCOL
};

// History tensors a step reads: columns c_h0..c_h3 and xc_h0..xc_h3.
constexpr int kHistorySlots = 4;

inline const char* const kColumnNames[NCOL] = {
#define FASTDIFF_NAME(name, str) str,
    FASTDIFF_COLUMNS(FASTDIFF_NAME)
#undef FASTDIFF_NAME
};

}  // namespace fastdiff
