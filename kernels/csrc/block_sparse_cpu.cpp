// Block-sparse attention forward on the CPU: lists of dense rectangles (query rows x key run), each computed by
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

// q, k, v: (B, H, S, D) of one floating dtype, last dimension contiguous. acc: fp32 (B, H, Sq, Dv), last dimension
// contiguous, and lse: fp32 (B, H, Sq), both holding the running result (lse -inf where nothing was merged yet).
// tasks: int64 (T, 2) ranges of rows of calls; calls: int64 (C, 9), see the enum above; q_bounds int32 (Sq, 6) and
// k_coords int32 (Skv, 3), needed (and only read) when a call is windowed. Everything is checked here,
// so bad input raises instead of reading out of bounds. The caller's thread-local state (grad and inference mode,
// dispatch keys) is carried into the workers.
void runs_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor acc, at::Tensor lse,
                  const at::Tensor& tasks, const at::Tensor& calls, double scale, int64_t num_workers,
                  const std::optional<at::Tensor>& q_bounds, const std::optional<at::Tensor>& k_coords) {
  TORCH_CHECK(q.device().is_cpu(), "vidattn runs_forward: CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "vidattn runs_forward: q, k, v must be 4-D");
  TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu() && acc.device().is_cpu() && lse.device().is_cpu(),
              "vidattn runs_forward: CPU tensors only");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "vidattn runs_forward: q, k, v must share one dtype");
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == q.size(1) &&
                  v.size(1) == q.size(1) && v.size(2) == k.size(2) && k.size(3) == q.size(3),
              "vidattn runs_forward: k and v must match q's batch and heads, each other's length, q's head dim");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && acc.stride(3) == 1,
              "vidattn runs_forward: q, k, v and acc need a contiguous last dimension");
  TORCH_CHECK(acc.scalar_type() == at::kFloat && lse.scalar_type() == at::kFloat,
              "vidattn runs_forward: acc and lse must be float32");
  TORCH_CHECK(tasks.scalar_type() == at::kLong && calls.scalar_type() == at::kLong,
              "vidattn runs_forward: tasks and calls must be int64");
  TORCH_CHECK(tasks.dim() == 2 && tasks.size(1) == 2 && calls.dim() == 2 && calls.size(1) == NCOL,
              "vidattn runs_forward: tasks must be (T, 2) and calls (C, 9)");
  const at::Tensor t_c = tasks.contiguous();
  const at::Tensor c_c = calls.contiguous();
  const int64_t* tp = t_c.const_data_ptr<int64_t>();
  const int64_t* cp = c_c.const_data_ptr<int64_t>();
  const int64_t num_tasks = t_c.size(0), num_calls = c_c.size(0);
  const int64_t nb = q.size(0), nh = q.size(1), sq = q.size(2), skv = k.size(2);
  TORCH_CHECK(acc.dim() == 4 && acc.size(0) == nb && acc.size(1) == nh && acc.size(2) == sq &&
                  acc.size(3) == v.size(3) && lse.dim() == 3 && lse.size(0) == nb && lse.size(1) == nh &&
                  lse.size(2) == sq,
              "vidattn runs_forward: acc must be (B, H, Sq, Dv) and lse (B, H, Sq) of q and v");
  for (int64_t t = 0; t < num_tasks; ++t) {
    TORCH_CHECK(0 <= tp[2 * t] && tp[2 * t] <= tp[2 * t + 1] && tp[2 * t + 1] <= num_calls,
                "vidattn runs_forward: task ", t, " is not a range of calls");
  }
  bool windowed = false;
  for (int64_t c = 0; c < num_calls; ++c) {
    const int64_t* r = cp + NCOL * c;
    TORCH_CHECK(0 <= r[B0] && r[B0] < r[B1] && r[B1] <= nb && 0 <= r[H0] && r[H0] < r[H1] && r[H1] <= nh &&
                    0 <= r[Q0] && r[Q0] < r[Q1] && r[Q1] <= sq && 0 <= r[K0] && r[K0] < r[K1] && r[K1] <= skv,
                "vidattn runs_forward: call ", c, " lies outside q, k, v");
    windowed |= r[WIN] != 0;
  }
  at::Tensor qb_c, kc_c;
  const int32_t* qbp = nullptr;
  const int32_t* kcp = nullptr;
  if (windowed) {
    TORCH_CHECK(q_bounds.has_value() && k_coords.has_value(),
                "vidattn runs_forward: windowed calls need q_bounds and k_coords");
    TORCH_CHECK(q_bounds->scalar_type() == at::kInt && k_coords->scalar_type() == at::kInt &&
                    q_bounds->dim() == 2 && q_bounds->size(0) == sq && q_bounds->size(1) == NBOUND &&
                    k_coords->dim() == 2 && k_coords->size(0) == skv && k_coords->size(1) == NCOORD,
                "vidattn runs_forward: q_bounds must be int32 (Sq, 6) and k_coords int32 (Skv, 3)");
    qb_c = q_bounds->contiguous();
    kc_c = k_coords->t().contiguous();  // by column: the mask loop reads each coordinate as its own array
    qbp = qb_c.const_data_ptr<int32_t>();
    kcp = kc_c.const_data_ptr<int32_t>();
  }
  std::atomic<int64_t> next{0};
  const at::ThreadLocalState caller_state;
  const int64_t workers = std::min<int64_t>(std::max<int64_t>(num_workers, 1), std::max<int64_t>(num_tasks, 1));
  std::exception_ptr error;
  std::mutex error_lock;
  auto work = [&]() {
    try {
      at::ThreadLocalStateGuard state(caller_state);
      std::vector<char> row_ok;
      for (int64_t t = next++; t < num_tasks; t = next++) {
        for (int64_t c = tp[2 * t]; c < tp[2 * t + 1]; ++c) {
          const int64_t* r = cp + NCOL * c;
          const at::Tensor qc = q.slice(0, r[B0], r[B1]).slice(1, r[H0], r[H1]).slice(2, r[Q0], r[Q1]);
          const at::Tensor kc = k.slice(0, r[B0], r[B1]).slice(1, r[H0], r[H1]).slice(2, r[K0], r[K1]);
          const at::Tensor vc = v.slice(0, r[B0], r[B1]).slice(1, r[H0], r[H1]).slice(2, r[K0], r[K1]);
          std::optional<at::Tensor> mask;
          if (r[WIN]) {
            const int64_t nq = r[Q1] - r[Q0], nk = r[K1] - r[K0];
            mask = window_mask(qbp, kcp, skv, r[Q0], nq, r[K0], nk, q.scalar_type(), row_ok)
                       .expand({r[B1] - r[B0], 1, nq, nk});
          }
          auto res = at::_scaled_dot_product_flash_attention_for_cpu(qc, kc, vc, 0.0, false, mask, scale);
          merge_rows(acc, lse, std::get<0>(res), std::get<1>(res), r[B0], r[H0], r[Q0],
                     r[WIN] ? row_ok.data() : nullptr);
        }
      }
    } catch (...) {
      std::lock_guard<std::mutex> hold(error_lock);
      if (!error) error = std::current_exception();
      next = num_tasks;
    }
  };
  std::vector<std::thread> pool;
  try {
    for (int64_t w = 1; w < workers; ++w) pool.emplace_back(work);
  } catch (const std::system_error&) {
    // No thread to spare: the threads already started and this one share the tasks.
  }
  work();
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace

TORCH_LIBRARY(vidattn_cpu, m) {
  m.def("runs_forward(Tensor q, Tensor k, Tensor v, Tensor(a!) acc, Tensor(b!) lse, Tensor tasks, Tensor calls, "
        "float scale, int workers, Tensor? q_bounds=None, Tensor? k_coords=None) -> ()");
}

TORCH_LIBRARY_IMPL(vidattn_cpu, CPU, m) { m.impl("runs_forward", &runs_forward); }
