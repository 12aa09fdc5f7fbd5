// Block-sparse attention on the CPU: lists of dense rectangles (query rows x key run), each computed by
// ATen's fused CPU flash kernel and merged into fp32 accumulators by log-sum-exp:
//
//     m = max(L, l),   L' = m + log(e^{L-m} + e^{l-m}),   O' = (O e^{L-m} + o e^{l-m}) / (e^{L-m} + e^{l-m})
//
// A call flagged *windowed* covers partially kept blocks of a window predicate: its additive mask is built here from
// per-token tables (no predicate evaluated in Python, no mask materialised per call there). A query token's bounds
// ``[t0, t1) x [y0, y1) x [x0, x1)`` and a key token's coordinates ``(t, y, x)`` keep the pair iff the key lies inside
// the bounds; a key whose ``t`` is ``ALWAYS`` (a text token) is kept by every query, and a text query has bounds that
// hold every key. Rows left without a key by the mask are not merged.
//
// The rectangles of one task write only that task's query rows, so ``workers`` threads run the tasks without locks,
// pulling them (longest first, as the caller orders them) from an atomic counter. The caller sets the intra-op
// threads to 1, so each flash call runs single-threaded on its worker. The Python loop this replaces lost ~20 % to
// interpreter work and GIL hand-offs between its worker threads.
#include <ATen/ATen.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>
#include <cmath>
#include <cstdint>
#include <limits>

namespace {

// Columns of one row of ``calls``: batch range, head range, query range, key range (end exclusive), windowed flag.
enum : int64_t { B0, B1, H0, H1, Q0, Q1, K0, K1, WIN, NCOL };
// Key time coordinate of a token every query keeps (text); query bounds columns and key coordinate columns.
constexpr int32_t ALWAYS = std::numeric_limits<int32_t>::min();
enum : int64_t { T0, T1, Y0, Y1, X0, X1, NBOUND };
enum : int64_t { KT, KY, KX, NCOORD };

// Additive mask (1, 1, nq, nk) in ``dtype`` for queries [q0, q0 + nq) x keys [k0, k0 + nk); ``row_ok[i]`` is set
// when query row i keeps at least one key. ``kc`` holds the key coordinates by column (t of every key, then y,
// then x). Each bound test is one unsigned compare, ``(uint32)(c - lo) < (uint32)(hi - lo)`` (wrap-around
// arithmetic, so negative starts of truncated windows work), branch-free, so the inner loop vectorizes.
at::Tensor window_mask(const int32_t* qb, const int32_t* kc, int64_t skv, int64_t q0, int64_t nq, int64_t k0,
                       int64_t nk, at::ScalarType dtype, std::vector<char>& row_ok) {
  at::Tensor mask = at::empty({1, 1, nq, nk}, at::TensorOptions().dtype(at::kFloat));
  float* mp = mask.data_ptr<float>();
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int32_t* kt = kc + k0;
  const int32_t* ky = kc + skv + k0;
  const int32_t* kx = kc + 2 * skv + k0;
  row_ok.assign(nq, 0);
  for (int64_t i = 0; i < nq; ++i) {
    const int32_t* b = qb + (q0 + i) * NBOUND;
    const uint32_t t0 = static_cast<uint32_t>(b[T0]), tw = static_cast<uint32_t>(b[T1]) - t0;
    const uint32_t y0 = static_cast<uint32_t>(b[Y0]), yw = static_cast<uint32_t>(b[Y1]) - y0;
    const uint32_t x0 = static_cast<uint32_t>(b[X0]), xw = static_cast<uint32_t>(b[X1]) - x0;
    float* row = mp + i * nk;
    int any = 0;
    for (int64_t j = 0; j < nk; ++j) {
      const int keep = (kt[j] == ALWAYS) | ((static_cast<uint32_t>(kt[j]) - t0 < tw) &
                                            (static_cast<uint32_t>(ky[j]) - y0 < yw) &
                                            (static_cast<uint32_t>(kx[j]) - x0 < xw));
      row[j] = keep ? 0.0f : neg_inf;
      any |= keep;
    }
    row_ok[i] = static_cast<char>(any);
  }
  return dtype == at::kFloat ? mask : mask.to(dtype);
}

// Rows with ``row_ok[i] == 0`` (when given) are skipped.
void merge_rows(at::Tensor& acc, at::Tensor& lse, const at::Tensor& out, const at::Tensor& out_lse,
                int64_t b0, int64_t h0, int64_t q0, const char* row_ok) {
  const at::Tensor o = out.to(at::kFloat).contiguous();
  const at::Tensor l = out_lse.to(at::kFloat);
  const int64_t nb = o.size(0), nh = o.size(1), nq = o.size(2), d = o.size(3);
  const auto as = acc.strides();
  const auto ls = l.strides();
  const auto Ls = lse.strides();
  const float* op = o.const_data_ptr<float>();
  const float* lp = l.const_data_ptr<float>();
  float* ap = acc.data_ptr<float>();
  float* Lp = lse.data_ptr<float>();
  const float neg_inf = -std::numeric_limits<float>::infinity();
  for (int64_t b = 0; b < nb; ++b) {
    for (int64_t h = 0; h < nh; ++h) {
      for (int64_t i = 0; i < nq; ++i) {
        if (row_ok != nullptr && !row_ok[i]) continue;
        const float li = lp[b * ls[0] + h * ls[1] + i * ls[2]];
        if (li == neg_inf) continue;
        float* dst = ap + (b0 + b) * as[0] + (h0 + h) * as[1] + (q0 + i) * as[2];
        const float* src = op + ((b * nh + h) * nq + i) * d;
        float& L = Lp[(b0 + b) * Ls[0] + (h0 + h) * Ls[1] + (q0 + i) * Ls[2]];
        if (L == neg_inf) {
          std::copy(src, src + d, dst);
          L = li;
          continue;
        }
        const float m = std::max(L, li);
        const float wa = std::exp(L - m), wb = std::exp(li - m), s = wa + wb;
        const float ca = wa / s, cb = wb / s;
        for (int64_t e = 0; e < d; ++e) dst[e] = dst[e] * ca + src[e] * cb;
        L = m + std::log(s);
      }
    }
  }
}

// The checked program of one call of either op: task ranges, call rows, and the window tables when a call is
// windowed. Everything is checked here, so bad input raises instead of reading out of bounds.
struct Program {
  at::Tensor tasks, calls, q_bounds, k_coords;  // contiguous; k_coords by column
  const int64_t* tp = nullptr;
  const int64_t* cp = nullptr;
  const int32_t* qbp = nullptr;
  const int32_t* kcp = nullptr;
  int64_t num_tasks = 0, num_calls = 0, skv = 0;
};

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "vidattn ", op,
              ": CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "vidattn ", op, ": q, k, v must be 4-D");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "vidattn ", op,
              ": q, k, v must share one dtype");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == q.size(1) &&
                  v.size(1) == q.size(1) && v.size(2) == k.size(2) && k.size(3) == q.size(3),
              "vidattn ", op, ": k and v must match q's batch and heads, each other's length, q's head dim");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "vidattn ", op,
              ": q, k, v need a contiguous last dimension");
}

// acc-like fp32 (B, H, S, D) tensor ``t`` of the given sizes with a contiguous last dimension.
void check_f32(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef sizes) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.sizes() == sizes &&
                  (t.dim() < 4 || t.stride(3) == 1),
              "vidattn ", op, ": ", name, " must be a float32 CPU tensor of sizes ", sizes,
              (sizes.size() == 4 ? " with a contiguous last dimension" : ""));
}

Program load_program(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& tasks,
                     const at::Tensor& calls, const std::optional<at::Tensor>& q_bounds,
                     const std::optional<at::Tensor>& k_coords) {
  TORCH_CHECK(tasks.scalar_type() == at::kLong && calls.scalar_type() == at::kLong, "vidattn ", op,
              ": tasks and calls must be int64");
  TORCH_CHECK(tasks.dim() == 2 && tasks.size(1) == 2 && calls.dim() == 2 && calls.size(1) == NCOL, "vidattn ", op,
              ": tasks must be (T, 2) and calls (C, 9)");
  Program p;
  p.tasks = tasks.contiguous();
  p.calls = calls.contiguous();
  p.tp = p.tasks.const_data_ptr<int64_t>();
  p.cp = p.calls.const_data_ptr<int64_t>();
  p.num_tasks = p.tasks.size(0);
  p.num_calls = p.calls.size(0);
  p.skv = k.size(2);
  const int64_t nb = q.size(0), nh = q.size(1), sq = q.size(2);
  for (int64_t t = 0; t < p.num_tasks; ++t) {
    TORCH_CHECK(0 <= p.tp[2 * t] && p.tp[2 * t] <= p.tp[2 * t + 1] && p.tp[2 * t + 1] <= p.num_calls, "vidattn ",
                op, ": task ", t, " is not a range of calls");
  }
  bool windowed = false;
  for (int64_t c = 0; c < p.num_calls; ++c) {
    const int64_t* r = p.cp + NCOL * c;
    TORCH_CHECK(0 <= r[B0] && r[B0] < r[B1] && r[B1] <= nb && 0 <= r[H0] && r[H0] < r[H1] && r[H1] <= nh &&
                    0 <= r[Q0] && r[Q0] < r[Q1] && r[Q1] <= sq && 0 <= r[K0] && r[K0] < r[K1] && r[K1] <= p.skv,
                "vidattn ", op, ": call ", c, " lies outside q, k, v");
    windowed |= r[WIN] != 0;
  }
  if (windowed) {
    TORCH_CHECK(q_bounds.has_value() && k_coords.has_value(), "vidattn ", op,
                ": windowed calls need q_bounds and k_coords");
    TORCH_CHECK(q_bounds->scalar_type() == at::kInt && k_coords->scalar_type() == at::kInt &&
                    q_bounds->dim() == 2 && q_bounds->size(0) == sq && q_bounds->size(1) == NBOUND &&
                    k_coords->dim() == 2 && k_coords->size(0) == p.skv && k_coords->size(1) == NCOORD,
                "vidattn ", op, ": q_bounds must be int32 (Sq, 6) and k_coords int32 (Skv, 3)");
    p.q_bounds = q_bounds->contiguous();
    p.k_coords = k_coords->t().contiguous();  // by column: the mask loop reads each coordinate as its own array
    p.qbp = p.q_bounds.const_data_ptr<int32_t>();
    p.kcp = p.k_coords.const_data_ptr<int32_t>();
  }
  return p;
}

// The windowed call's mask, expanded to its batch (std::nullopt for a plain call); fills ``row_ok``.
std::optional<at::Tensor> call_mask(const Program& p, const int64_t* r, at::ScalarType dtype,
                                    std::vector<char>& row_ok) {
  if (!r[WIN]) return std::nullopt;
  const int64_t nq = r[Q1] - r[Q0], nk = r[K1] - r[K0];
  return window_mask(p.qbp, p.kcp, p.skv, r[Q0], nq, r[K0], nk, dtype, row_ok).expand({r[B1] - r[B0], 1, nq, nk});
}

at::Tensor rows_of(const at::Tensor& t, const int64_t* r, int64_t s0, int64_t s1) {
  return t.slice(0, r[B0], r[B1]).slice(1, r[H0], r[H1]).slice(2, r[s0], r[s1]);
}

// Runs ``work(worker, task)`` for every task on ``num_workers`` threads (this one included) pulling tasks from an
// atomic counter, with the caller's thread-local state (grad and inference mode, dispatch keys); the first error is
// re-thrown here after every thread has stopped.
template <typename Work>
void run_tasks(int64_t num_tasks, int64_t num_workers, const Work& work) {
  std::atomic<int64_t> next{0};
  const at::ThreadLocalState caller_state;
  const int64_t workers = std::min<int64_t>(std::max<int64_t>(num_workers, 1), std::max<int64_t>(num_tasks, 1));
  std::exception_ptr error;
  std::mutex error_lock;
  auto loop = [&](int64_t worker) {
    try {
      at::ThreadLocalStateGuard state(caller_state);
      for (int64_t t = next++; t < num_tasks; t = next++) work(worker, t);
    } catch (...) {
      std::lock_guard<std::mutex> hold(error_lock);
      if (!error) error = std::current_exception();
      next = num_tasks;
    }
  };
  std::vector<std::thread> pool;
  try {
    for (int64_t w = 1; w < workers; ++w) pool.emplace_back(loop, w);
  } catch (const std::system_error&) {
    // No thread to spare: the threads already started and this one share the tasks.
  }
  loop(0);
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

// q, k, v: (B, H, S, D) of one floating dtype, last dimension contiguous. acc: fp32 (B, H, Sq, Dv), last dimension
// contiguous, and lse: fp32 (B, H, Sq), both holding the running result (lse -inf where nothing was merged yet).
// tasks: int64 (T, 2) ranges of rows of calls; calls: int64 (C, 9), see the enum above; q_bounds int32 (Sq, 6) and
// k_coords int32 (Skv, 3), needed (and only read) when a call is windowed.
void runs_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor acc, at::Tensor lse,
                  const at::Tensor& tasks, const at::Tensor& calls, double scale, int64_t num_workers,
                  const std::optional<at::Tensor>& q_bounds, const std::optional<at::Tensor>& k_coords) {
  const char* op = "runs_forward";
  check_qkv(op, q, k, v);
  check_f32(op, "acc", acc, {q.size(0), q.size(1), q.size(2), v.size(3)});
  check_f32(op, "lse", lse, {q.size(0), q.size(1), q.size(2)});
  const Program p = load_program(op, q, k, tasks, calls, q_bounds, k_coords);
  run_tasks(p.num_tasks, num_workers, [&](int64_t, int64_t t) {
    std::vector<char> row_ok;
    for (int64_t c = p.tp[2 * t]; c < p.tp[2 * t + 1]; ++c) {
      const int64_t* r = p.cp + NCOL * c;
      const auto mask = call_mask(p, r, q.scalar_type(), row_ok);
      auto res = at::_scaled_dot_product_flash_attention_for_cpu(rows_of(q, r, Q0, Q1), rows_of(k, r, K0, K1),
                                                                 rows_of(v, r, K0, K1), 0.0, false, mask, scale);
      merge_rows(acc, lse, std::get<0>(res), std::get<1>(res), r[B0], r[H0], r[Q0], r[WIN] ? row_ok.data() : nullptr);
    }
  });
}

// The backward of the same program (``vidattn.kernels.cpu_autograd``): each call's fused flash backward fed the
// global output ``out`` and log-sum-exp ``lse`` rows (+inf where a row attends to nothing) gives exactly that
// rectangle's terms of dQ, dK, dV, added into fp32 (B, H, S, D) accumulators. A task owns its query rows (as in the
// forward), so every worker adds into dq itself; rectangles of different tasks share keys, so each worker adds its
// dK, dV terms into its own buffers (worker 0 into dk, dv), summed into them at the end.
void runs_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse, at::Tensor dq, at::Tensor dk, at::Tensor dv,
                   const at::Tensor& tasks, const at::Tensor& calls, double scale, int64_t num_workers,
                   const std::optional<at::Tensor>& q_bounds, const std::optional<at::Tensor>& k_coords) {
  const char* op = "runs_backward";
  check_qkv(op, q, k, v);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type()
                  && out.scalar_type() == q.scalar_type() && grad_out.stride(3) == 1 && out.stride(3) == 1,
              "vidattn ", op, ": grad_out and out must be like q (same sizes and dtype, contiguous last dimension)");
  check_f32(op, "lse", lse, {q.size(0), q.size(1), q.size(2)});
  check_f32(op, "dq", dq, q.sizes());
  check_f32(op, "dk", dk, k.sizes());
  check_f32(op, "dv", dv, v.sizes());
  const Program p = load_program(op, q, k, tasks, calls, q_bounds, k_coords);
  const int64_t workers = std::min<int64_t>(std::max<int64_t>(num_workers, 1), std::max<int64_t>(p.num_tasks, 1));
  std::vector<std::array<at::Tensor, 2>> grads(workers);
  grads[0] = {dk, dv};
  for (int64_t w = 1; w < workers; ++w) grads[w] = {at::zeros_like(dk), at::zeros_like(dv)};
  run_tasks(p.num_tasks, workers, [&](int64_t w, int64_t t) {
    std::vector<char> row_ok;
    auto& g = grads[w];
    for (int64_t c = p.tp[2 * t]; c < p.tp[2 * t + 1]; ++c) {
      const int64_t* r = p.cp + NCOL * c;
      const auto mask = call_mask(p, r, q.scalar_type(), row_ok);
      auto res = at::_scaled_dot_product_flash_attention_for_cpu_backward(
          rows_of(grad_out, r, Q0, Q1), rows_of(q, r, Q0, Q1), rows_of(k, r, K0, K1), rows_of(v, r, K0, K1),
          rows_of(out, r, Q0, Q1), rows_of(lse, r, Q0, Q1), 0.0, false, mask, scale);
      rows_of(dq, r, Q0, Q1).add_(std::get<0>(res));
      rows_of(g[0], r, K0, K1).add_(std::get<1>(res));
      rows_of(g[1], r, K0, K1).add_(std::get<2>(res));
    }
  });
  for (int64_t w = 1; w < workers; ++w) {
    dk.add_(grads[w][0]);
    dv.add_(grads[w][1]);
  }
}

}  // namespace

TORCH_LIBRARY(vidattn_cpu, m) {
  m.def("runs_forward(Tensor q, Tensor k, Tensor v, Tensor(a!) acc, Tensor(b!) lse, Tensor tasks, Tensor calls, "
        "float scale, int workers, Tensor? q_bounds=None, Tensor? k_coords=None) -> ()");
  m.def("runs_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor(a!) dq, "
        "Tensor(b!) dk, Tensor(c!) dv, Tensor tasks, Tensor calls, float scale, int workers, Tensor? q_bounds=None, "
        "Tensor? k_coords=None) -> ()");
}

TORCH_LIBRARY_IMPL(vidattn_cpu, CPU, m) {
  m.impl("runs_forward", &runs_forward);
  m.impl("runs_backward", &runs_backward);
}
