"""Correctness of every fitted launch config of every triton kernel, at real size, against a chunked fp32 reference.

For each case below, the configs that ``fit_configs`` gives the call (``fwd``, ``dkdv``, ``dq``; on an H200 four of
each for 128x128 blocks) are all launched explicitly through ``triton_sparse_attention(..., configs=...)``: run ``i``
of a case launches the i-th config of each kernel (modulo its count), as

  1. a no-grad forward (the ``HAS_LSE=False`` kernel), and
  2. a forward with the LSE followed by the backward (``dkdv`` and ``dq`` kernels) of ``sum(out * g)``.

Outputs are pre-filled with NaN: during the runs ``torch.empty`` / ``torch.empty_like`` (which the kernels use for
``out``, ``lse``, ``delta``, ``dq``, ``dk``, ``dv``) return NaN-filled float tensors, so any element a kernel does not
write stays NaN and fails the check (this needs no help from the caching allocator, and works on CPU too). Every
element of ``out``, ``lse``, ``dq``, ``dk``, ``dv`` (all rows, all heads) is compared with a masked-attention
reference computed in fp32 on the GPU (TF32 off; fp64 on the CPU) in chunks of query rows, so memory stays bounded at
Wan size (32760 tokens): scores of one chunk for all heads, the reference's own backward (dV = P^T dO, dS = P (dP -
delta), dQ = dS K, dK = dS^T Q) accumulated chunk by chunk.

Pass rule, per tensor: no NaN; ``max|got - ref| / max|ref| <= tol_max`` and ``||got - ref|| / ||ref|| <= tol_fro``
with (tol_max, tol_fro) = (2e-2, 1e-2) for bf16 and (1e-2, 5e-3) for fp16; LSE: ``-inf`` exactly where the reference
has it (rows with no key), elsewhere ``|got - ref| <= 2e-3``; the output keeps the input's memory layout.

Cases (Wan2.1-1.3B 480p: 21 x 30 x 52 = 32760 tokens, blocks 128x128, the last block ragged): BHSD and BSHD radial
(bf16, d=128, 12 heads), per-head random, per-batch random (batch 2), kv_lens (batch 2, cuts inside blocks), the
window predicate with 256 text tokens (partial blocks, rows that attend nothing), the epilogue, and d=64 fp16.

One line per run: ``RUN`` case, dtype, head dim, blocks, the three configs, max abs error per tensor, PASS/FAIL.
Then ``COVERAGE`` lines (configs launched per dtype / head dim) and one ``VALIDATION`` line; exit status 1 on any
failure. ``--budget-s`` bounds the wall time: the deadline is checked before every run and inside the reference's
chunk loop; runs left are counted as skipped. ``--dry-run``: tiny sizes on the CPU under ``TRITON_INTERPRET=1``
(fp16 for both head dims: the interpreter's bf16 dot is wrong), every case and every config still launched.

``--precompile-shard I/N`` (used by gpu_check.sh, N processes in parallel) launches shard I of the same triton calls
(validation runs, the benchmark's configs at its shapes, one compiled FlexAttention call per shape and pass, timed
as its cold compile) without references, so triton's and inductor's on-disk caches are warm when the validation
and the benchmark get there.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOLS = {torch.bfloat16: (2e-2, 1e-2), torch.float16: (1e-2, 5e-3), torch.float32: (1e-4, 1e-5)}
LSE_ATOL = 2e-3
KINDS = ("fwd", "dkdv", "dq")


@dataclass(frozen=True)
class Case:
    name: str
    layout: str = "bhsd"          # memory layout of q, k, v: "bhsd" or "bshd" (views of (B, S, H, D) storage)
    dtype: str = "bf16"
    head_dim: int = 128
    batch: int = 1
    heads: int = 12
    pattern: str = "radial"       # "radial" or "random"
    groups: str = "shared"        # "shared", "per-head" or "per-batch"
    density: float = 0.25
    kv_lens: bool = False
    window: bool = False          # WindowPredicate on partial blocks, 256 text tokens after the video
    epilogue: bool = False


CASES = [
    Case("bhsd-radial"),
    Case("bshd-radial", layout="bshd"),
    Case("per-head-random", layout="bshd", pattern="random", groups="per-head"),
    Case("per-batch-random", pattern="random", groups="per-batch", batch=2, heads=6),
    Case("kv-lens", layout="bshd", pattern="random", density=0.4, batch=2, heads=6, kv_lens=True),
    Case("window-predicate", pattern="random", density=0.6, heads=8, window=True),
    Case("epilogue", epilogue=True),
    Case("d64-fp16", layout="bshd", dtype="fp16", head_dim=64, pattern="random", groups="per-head"),
]
GRID = (21, 30, 52)        # Wan2.1 480p x 81 frames, latent tokens
DRY_GRID = (2, 5, 13)      # 130 tokens: two 128-blocks, the last ragged
BLOCK = 128


@dataclass
class CaseData:
    case: Case
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    pattern: object
    epilogue: object
    configs: dict


# ---------------------------------------------------------------------------------------------------- set-up
def case_dtype(case: Case, dry: bool) -> torch.dtype:
    return torch.float16 if dry else DTYPES[case.dtype]


def device_smem_limit(device: str) -> int:
    from vidattn.kernels import triton_attention as ta

    if device == "cuda":
        try:
            return ta._smem_limit(torch.device("cuda", torch.cuda.current_device()))
        except Exception:  # noqa: BLE001
            pass
    return ta.SMEM_LIMIT_SM90


def fitted(case: Case, dry: bool, device: str) -> dict:
    from vidattn.kernels.triton_attention import fit_configs

    limit = device_smem_limit(device)
    return {kind: fit_configs(kind, block_q=BLOCK, block_kv=BLOCK, head_dim=case.head_dim,
                              dtype=case_dtype(case, dry), smem_limit=limit) for kind in KINDS}


def n_runs(configs: dict) -> int:
    return max(len(c) for c in configs.values())


def run_configs(configs: dict, i: int) -> dict:
    return {kind: configs[kind][i % len(configs[kind])] for kind in KINDS}


def build_case(case: Case, device: str, dry: bool, seed: int = 0) -> CaseData:
    from vidattn.kernels import BlockPattern, Epilogue, WindowPredicate
    from vidattn.layout import TextSegment, TokenLayout
    from vidattn.patterns import radial_pattern

    frames, height, width = DRY_GRID if dry else GRID
    text = (16 if dry else 256) if case.window else 0
    s = frames * height * width + text
    # Dry run: one head (two where the pattern differs per head), the interpreter's time grows with the programs.
    b, h, d = case.batch, ((2 if case.groups == "per-head" else 1) if dry else case.heads), case.head_dim
    dtype = case_dtype(case, dry)
    g = torch.Generator().manual_seed(seed)
    nb = -(-s // BLOCK)
    if case.pattern == "radial":
        layout = TokenLayout(frames, height, width, text=TextSegment(text, "last") if text else None)
        pattern = radial_pattern(layout, block_size=BLOCK, sink_frames=1)
    else:
        gb = b if case.groups == "per-batch" else 1
        gh = h if case.groups == "per-head" else 1
        mask = (torch.rand(gb, gh, nb, nb, generator=g) < case.density) | torch.eye(nb, dtype=torch.bool)
        partial, predicate = None, None
        if case.window:
            half = (1, 2) if dry else (6, 10)
            predicate = WindowPredicate.inward(frames, height, width, *half, video_start=0)
            partial = (torch.rand(gb, gh, nb, nb, generator=g) < 0.5) & mask
        pattern = BlockPattern.from_block_mask(mask, q_len=s, kv_len=s, block_q=BLOCK, partial=partial,
                                               predicate=predicate)
    if case.kv_lens:
        cuts = (5, 40) if dry else (77, 1000)
        pattern = pattern.with_kv_lens(torch.tensor([s - cuts[i % 2] for i in range(b)]))
    pattern = pattern.to(device)

    gd = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gd, device=device)

    qkv = []
    for _ in range(3):
        x = rand(b, s, h, d).to(dtype)  # BSHD storage
        qkv.append(x.transpose(1, 2) if case.layout == "bshd" else x.transpose(1, 2).contiguous())
    grad = rand(b, h, s, d).to(dtype)
    epilogue = None
    if case.epilogue:
        nq = pattern.num_q_blocks
        epilogue = Epilogue(scale=(torch.rand(b, h, nq, generator=g) + 0.5).to(device),
                            bias=(0.1 * torch.randn(b, h, nq, d, generator=g)).to(device))
    return CaseData(case, *qkv, grad, pattern, epilogue, fitted(case, dry, device))


# ---------------------------------------------------------------------------------------------------- reference
class Deadline(Exception):
    pass


def reference(cd: CaseData, deadline: float, chunk_bytes: int) -> dict:
    """Masked attention and its gradients for ``sum(out * g)``, fp32 (fp64 on CPU), in chunks of query rows."""
    q, k, v, pattern = cd.q, cd.k, cd.v, cd.pattern
    dev = q.device
    acc = torch.float64 if dev.type == "cpu" else torch.float32
    qf, kf, vf, gf = (t.to(acc) for t in (q, k, v, cd.g))
    b, h, sq, d = qf.shape
    skv = kf.shape[2]
    scale = d ** -0.5
    bm = pattern.block_bitmap().to(dev)
    pm = pattern.partial_bitmap().to(dev) if pattern.partial is not None else None
    pred = pattern.predicate.to(dev) if pm is not None else None
    kvl = pattern.kv_lens.to(dev) if pattern.kv_lens is not None else None
    cols = torch.arange(skv, device=dev)
    cb = cols // pattern.block_kv
    if cd.epilogue is not None:
        rows_all = torch.arange(sq, device=dev) // pattern.block_q
        ep_r = cd.epilogue.scale.to(dev, acc)[:, :, rows_all, None]
        ep_o = cd.epilogue.bias.to(dev, acc)[:, :, rows_all, :]
    out = torch.empty_like(qf)
    lse = torch.empty(b, h, sq, dtype=acc, device=dev)
    dq = torch.empty_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    step = max(16, chunk_bytes // (b * h * skv * qf.element_size()))
    for r0 in range(0, sq, step):
        if time.monotonic() > deadline:
            raise Deadline()
        r1 = min(r0 + step, sq)
        rows = torch.arange(r0, r1, device=dev)
        rb = rows // pattern.block_q
        m = bm[:, :, rb][..., cb]
        if pm is not None:
            m = m & (~pm[:, :, rb][..., cb] | pred(rows[:, None], cols[None, :]))
        if kvl is not None:
            m = m & (cols[None, :] < kvl[:, None])[:, None, None, :]
        qr = qf[:, :, r0:r1]
        s = torch.matmul(qr, kf.transpose(-1, -2)).mul_(scale)
        s.masked_fill_(~m, float("-inf"))
        del m
        lse_r = torch.logsumexp(s, -1)
        lse[:, :, r0:r1] = lse_r
        p = s.sub_(torch.where(torch.isinf(lse_r), 0.0, lse_r).unsqueeze(-1)).exp_()  # rows with no key: p = 0
        o = torch.matmul(p, vf)
        do = gf[:, :, r0:r1]
        if cd.epilogue is not None:
            out[:, :, r0:r1] = o * ep_r[:, :, r0:r1] + ep_o[:, :, r0:r1]
            do = do * ep_r[:, :, r0:r1]
        else:
            out[:, :, r0:r1] = o
        dv += torch.matmul(p.transpose(-1, -2), do)
        delta = (do * o).sum(-1, keepdim=True)
        ds = torch.matmul(do, vf.transpose(-1, -2)).sub_(delta).mul_(p)
        del p, s
        dq[:, :, r0:r1] = torch.matmul(ds, kf) * scale
        dk += torch.matmul(ds.transpose(-1, -2), qr) * scale
        del ds
    return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


# ---------------------------------------------------------------------------------------------------- runs
@contextlib.contextmanager
def nan_prefilled_empty():
    """While active, float tensors from ``torch.empty`` / ``torch.empty_like`` come back filled with NaN."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(fn):
        def make(*args, **kwargs):
            t = fn(*args, **kwargs)
            if t.is_floating_point():
                t.fill_(float("nan"))
            return t
        return make

    torch.empty, torch.empty_like = poisoned(empty), poisoned(empty_like)
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def launch(cd: CaseData, cfgs: dict) -> dict:
    """The run's triton calls (NaN-prefilled outputs): no-grad forward, then forward with LSE + backward."""
    from vidattn.kernels.triton_attention import triton_sparse_attention

    with nan_prefilled_empty():
        with torch.no_grad():
            out_ng, _ = triton_sparse_attention(cd.q, cd.k, cd.v, cd.pattern, epilogue=cd.epilogue,
                                                configs={"fwd": cfgs["fwd"]})
        leaves = [t.detach().requires_grad_() for t in (cd.q, cd.k, cd.v)]
        out, lse = triton_sparse_attention(*leaves, cd.pattern, return_lse=True, epilogue=cd.epilogue,
                                           configs=cfgs)
        dq, dk, dv = torch.autograd.grad(out, leaves, cd.g)
    if cd.q.is_cuda:
        torch.cuda.synchronize()  # surfaces asynchronous launch errors here
    return {"out_ng": out_ng, "out": out.detach(), "lse": lse.detach(), "dq": dq, "dk": dk, "dv": dv}


def compare(name: str, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> tuple[bool, float, str]:
    """(ok, max abs error, detail) of one tensor against its reference."""
    g = got.to(ref.dtype)
    nan = int(torch.isnan(g).sum())
    if name == "lse":
        inf_ref, inf_got = torch.isinf(ref), torch.isinf(g)
        mismatch = int((inf_ref != inf_got).sum()) + int((inf_ref & inf_got & (torch.sign(ref) != torch.sign(g)))
                                                       .sum())
        fin = ~inf_ref & ~inf_got & ~torch.isnan(g)
        err = float((g - ref).abs()[fin].max()) if bool(fin.any()) else 0.0
        ok = nan == 0 and mismatch == 0 and err <= LSE_ATOL
        return ok, err, f"nan={nan} inf-mismatch={mismatch}" if not ok else ""
    diff = (g - ref).abs()
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    err = float(diff.max())
    scale = float(ref.abs().max()) or 1.0
    fro = float(torch.linalg.vector_norm(torch.nan_to_num(g - ref, nan=0.0))) / \
        (float(torch.linalg.vector_norm(ref)) or 1.0)
    tol_max, tol_fro = TOLS[dtype]
    ok = nan == 0 and err / scale <= tol_max and fro <= tol_fro
    detail = ""
    if not ok:
        bad_rows = int((diff.amax(-1) > tol_max * scale).sum())
        detail = f"nan={nan} max/scale={err / scale:.2e} fro={fro:.2e} bad-rows={bad_rows}"
    return ok, err, detail


def layout_ok(cd: CaseData, out: torch.Tensor) -> bool:
    bshd_in = cd.q.stride(2) > cd.q.stride(1)
    bshd_out = out.stride(2) > out.stride(1)
    return bshd_in == bshd_out


def cfg_str(c) -> str:
    return f"{c.block_m}x{c.block_n}w{c.warps}s{c.stages}"


def case_tag(cd: CaseData, dry: bool) -> str:
    c = cd.case
    dt = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[case_dtype(c, dry)]
    b, h, s, d = cd.q.shape
    return f"{c.name:<17} {dt} d={d} B={b} H={h} S={s} blocks={cd.pattern.block_q}x{cd.pattern.block_kv}"


# ---------------------------------------------------------------------------------------------------- main modes
def validate(args: argparse.Namespace) -> int:
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("VALIDATION no CUDA device (use --dry-run on CPU)", flush=True)
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    start = time.monotonic()
    deadline = start + args.budget_s
    cases = [c for c in CASES if not args.cases or c.name in args.cases]
    plan = [(c, fitted(c, args.dry_run, device)) for c in cases]
    total = sum(n_runs(cfgs) for _, cfgs in plan)
    print(f"validation: {len(cases)} cases, {total} runs{' (fewer in a dry run)' if args.dry_run else ''} (each: "
          "no-grad forward + forward/backward), device "
          f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu (dry run, interpreter)'}, shared-memory "
          f"limit {device_smem_limit(device)} B, budget {args.budget_s:.0f} s", flush=True)
    for c, cfgs in plan:
        print(f"FITTED {c.name}: " + "; ".join(f"{k} " + " ".join(cfg_str(x) for x in cfgs[k]) for k in KINDS),
              flush=True)
    passed = failed = skipped = 0
    covered: dict[tuple, set] = {}
    expected: dict[tuple, set] = {}
    fatal = None
    for case, cfgs in plan:
        key = (case_dtype(case, args.dry_run), case.head_dim)
        for kind in KINDS:
            expected.setdefault(key + (kind,), set()).update(cfgs[kind])
        runs = n_runs(cfgs)
        todo = list(range(runs))
        if args.dry_run:  # the interpreter is slow: the cases of one (dtype, head dim) share its configs out
            group = [c for c, _ in plan if (case_dtype(c, True), c.head_dim) == key]
            pos = group.index(case)
            todo = [i for i in todo if i % len(group) == pos] or [pos % runs]
            total -= runs - len(todo)
        if fatal or time.monotonic() > deadline:
            skipped += len(todo)
            continue
        t0 = time.monotonic()
        try:
            if device == "cuda":
                torch.cuda.empty_cache()
            cd = build_case(case, device, args.dry_run, seed=CASES.index(case))  # fresh inputs per case
            ref = reference(cd, deadline, args.chunk_mb * 2**20)
        except Deadline:
            skipped += len(todo)
            print(f"SKIP {case.name}: time budget ended while computing the reference", flush=True)
            continue
        except Exception as exc:  # noqa: BLE001
            failed += len(todo)
            print(f"RUN {case.name} set-up FAIL {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()
            continue
        tag = case_tag(cd, args.dry_run)
        print(f"case {tag}: density {cd.pattern.density():.3f}, reference {time.monotonic() - t0:.1f} s", flush=True)
        dtype = case_dtype(case, args.dry_run)
        for j, i in enumerate(todo):
            if time.monotonic() > deadline:
                skipped += len(todo) - j
                print(f"SKIP {case.name}: {len(todo) - j} runs (time budget)", flush=True)
                break
            rc = run_configs(cfgs, i)
            names = " ".join(f"{k}={cfg_str(rc[k])}" for k in KINDS)
            t1 = time.monotonic()
            try:
                got = launch(cd, rc)
            except Exception as exc:  # noqa: BLE001
                failed += 1
                msg = str(exc).splitlines()[0][:160] if str(exc) else ""
                print(f"RUN {i + 1}/{runs} {tag} {names} | FAIL {type(exc).__name__}: {msg}", flush=True)
                if "CUDA" in msg or "illegal" in msg.lower():
                    fatal = msg  # the context is unusable: later runs would only repeat this error
                    skipped += len(todo) - j - 1
                    break
                continue
            results = [("out(no-grad)", *compare("out", got["out_ng"], ref["out"], dtype))]
            results += [(name, *compare(name, got[name], ref[name], dtype))
                        for name in ("out", "lse", "dq", "dk", "dv")]
            lay = layout_ok(cd, got["out"]) and layout_ok(cd, got["out_ng"])
            ok = all(r[1] for r in results) and lay
            errs = " ".join(f"{n} {e:.1e}" for n, _, e, _ in results)
            details = "; ".join(f"{n}: {dt}" for n, o, _, dt in results if not o)
            if not lay:
                details += "; output layout differs from the input's"
            print(f"RUN {i + 1}/{runs} {tag} {names} | max abs: {errs} | {time.monotonic() - t1:.2f}s "
                  f"{'PASS' if ok else 'FAIL ' + details}", flush=True)
            if ok:
                passed += 1
                for kind in KINDS:
                    covered.setdefault(key + (kind,), set()).add(rc[kind])
            else:
                failed += 1
            del got
        del cd, ref
    for (dt, d, kind), exp in sorted(expected.items(), key=lambda kv: (str(kv[0][0]), kv[0][1], kv[0][2])):
        got = covered.get((dt, d, kind), set())
        print(f"COVERAGE {str(dt).split('.')[-1]} d={d} {kind}: {len(got & exp)}/{len(exp)} fitted configs passed "
              f"in at least one case" + ("" if got >= exp else " (missing: " +
                                         ", ".join(cfg_str(c) for c in sorted(exp - got)) + ")"), flush=True)
    verdict = "FAIL" if failed else ("INCOMPLETE" if skipped else "PASS")
    print(f"VALIDATION {verdict}: {passed} runs passed, {failed} failed, {skipped} skipped (budget) of {total}; "
          f"{time.monotonic() - start:.0f} s" + (f"; stopped after a CUDA error: {fatal}" if fatal else "") +
          ("; dry run: each config once per dtype / head dim" if args.dry_run else ""), flush=True)
    return 1 if failed else 0


def precompile_tasks(dry: bool) -> list[tuple]:
    import gpu_bench

    device = "cpu" if dry else "cuda"
    tasks = [("flex", key, pass_) for key in gpu_bench.SHAPES for pass_ in gpu_bench.PASSES]
    tasks += [("validate", ci, i) for ci, c in enumerate(CASES) for i in range(n_runs(fitted(c, dry, device)))]
    from vidattn.kernels.triton_attention import fit_configs

    n_bench = max(len(fit_configs(kind, block_q=BLOCK, block_kv=BLOCK, head_dim=128, dtype=torch.bfloat16,
                                  smem_limit=device_smem_limit(device))) for kind in KINDS)
    tasks += [("bench", key, i) for key in gpu_bench.SHAPES for i in range(n_bench)]
    if dry:  # the interpreter compiles nothing: one task of each kind exercises the path
        tasks = [t for j, t in enumerate(tasks) if j == 0 or tasks[j - 1][0] != t[0]]
    return tasks


def shard_of(tasks: list[tuple], shard: int, n: int) -> list[tuple]:
    """FlexAttention compiles (the longest tasks) get a worker each when there are workers enough; the triton
    tasks are dealt round-robin to the others, in validation order."""
    flex = [t for t in tasks if t[0] == "flex"]
    rest = [t for t in tasks if t[0] != "flex"]
    if n > len(flex) + 1:
        if shard < len(flex):
            return [flex[shard]]
        return rest[shard - len(flex)::n - len(flex)]
    return tasks[shard::n]


def precompile(args: argparse.Namespace) -> int:
    import gpu_bench

    shard, n = (int(x) for x in args.precompile_shard.split("/"))
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print(f"precompile {shard}/{n}: no CUDA device", flush=True)
        return 1
    mine = shard_of(precompile_tasks(dry), shard, n)
    print(f"precompile {shard}/{n}: {len(mine)} tasks", flush=True)
    deadline = time.monotonic() + args.budget_s
    bad = 0
    built: dict = {}
    for task in mine:
        if time.monotonic() > deadline:
            print(f"precompile {shard}/{n}: time budget ended before {task}", flush=True)
            break
        t0 = time.perf_counter()
        try:
            kind = task[0]
            if kind == "validate":
                ci, i = task[1], task[2]
                if ci not in built:
                    built.clear()
                    built[ci] = build_case(CASES[ci], device, dry, seed=ci)
                cd = built[ci]
                launch(cd, run_configs(cd.configs, i))
            elif kind == "bench":
                key, i = task[1], task[2]
                shape = gpu_bench.reduced(gpu_bench.SHAPES[key]) if dry else gpu_bench.SHAPES[key]
                bench_launch(shape, i, device, dry)
            else:
                key, pass_ = task[1], task[2]
                shape = gpu_bench.reduced(gpu_bench.SHAPES[key]) if dry else gpu_bench.SHAPES[key]
                dtype = torch.float32 if dry else torch.bfloat16
                q, k, v, grad = gpu_bench.make_inputs(shape, device, dtype)
                flex_fn = gpu_bench.flex_function(compiled=not dry)
                densities = [] if dry else gpu_bench.DEFAULT_DENSITIES
                # Every pattern of the benchmark, in its order: the first call compiles; the others show whether a
                # new BlockMask recompiles (and warm the caches if it does).
                for j, (name, pattern) in enumerate(gpu_bench.build_patterns(shape, 64 if dry else BLOCK, densities,
                                                                             device)):
                    fn = gpu_bench.flex_backend(pattern, flex_fn)
                    secs = gpu_bench.first_call(gpu_bench.make_runner(fn, q, k, v, pass_, grad), device)
                    if j == 0:
                        print(f"FLEX_COMPILE {key} {pass_} {secs:.1f}", flush=True)
                    else:
                        print(f"flex first call {key} {pass_} {name}: {secs:.1f} s", flush=True)
            print(f"precompile {shard}/{n}: {task} done in {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as exc:  # noqa: BLE001
            bad += 1
            print(f"precompile {shard}/{n}: {task} FAILED after {time.perf_counter() - t0:.1f} s: "
                  f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}", flush=True)
    return 1 if bad else 0


def bench_launch(shape, i: int, device: str, dry: bool) -> None:
    """The benchmark's triton calls with the i-th fitted config of each kernel (what its autotuner compiles)."""
    import gpu_bench
    from vidattn.kernels import BlockPattern
    from vidattn.kernels.triton_attention import fit_configs, triton_sparse_attention

    block = 64 if dry else BLOCK
    dtype = torch.float32 if dry else torch.bfloat16
    q, k, v, grad = gpu_bench.make_inputs(shape, device, dtype)
    pattern = BlockPattern.full(shape.seq_len, block_q=block).to(device)
    limit = device_smem_limit(device)
    cfgs = {}
    for kind in KINDS:
        fits = fit_configs(kind, block_q=block, block_kv=block, head_dim=shape.head_dim, dtype=dtype,
                           smem_limit=limit)
        cfgs[kind] = fits[i % len(fits)]
    with torch.no_grad():
        triton_sparse_attention(q, k, v, pattern, configs={"fwd": cfgs["fwd"]})
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, _ = triton_sparse_attention(*leaves, pattern, configs=cfgs)
    torch.autograd.grad(out, leaves, grad)
    gpu_bench.sync(device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (TRITON_INTERPRET=1)")
    parser.add_argument("--budget-s", type=float, default=150.0, help="wall-clock budget (runs left are skipped)")
    parser.add_argument("--cases", default="", help="comma list of case names (default: all)")
    parser.add_argument("--chunk-mb", type=int, default=2048, help="reference scores per row chunk, MiB")
    parser.add_argument("--precompile-shard", default="", metavar="I/N",
                        help="launch shard I of N of the triton/flex calls (no checks) to fill the compile caches")
    args = parser.parse_args(argv)
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(args.cases) - {c.name for c in CASES}
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {[c.name for c in CASES]}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--dry-run needs TRITON_INTERPRET=1 in the environment (set before triton is imported)",
                  file=sys.stderr)
            return 2
    if args.precompile_shard:
        return precompile(args)
    return validate(args)


if __name__ == "__main__":
    sys.exit(main())
