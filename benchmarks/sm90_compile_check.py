"""Compile every launch config of the triton block-sparse kernels for sm_90a (H100/H200) on a CPU-only machine.

What it checks. For the HunyuanVideo 720p shape (batch 1, 24 heads, q_len = kv_len = 115456 = 115200 video + 256
text tokens, pattern blocks 128 x 128, padded text so ``kv_lens`` is set, a per-head CSR) it compiles, with the
installed Triton's CUDA backend and its bundled ``ptxas``, for target ``sm_90a``:

* ``fwd``, ``dkdv``, ``dq``: exactly the configs ``fit_configs(kind, ...)`` launches for that call, for head dim
  64 and 128, bf16 and fp16, with and without the window predicate (``HAS_PRED``); the forward with
  ``HAS_LSE=True, HAS_EPI=False``, plus one ``HAS_EPI=True`` variant of its first config per combination;
* ``delta`` (``bwd_delta_kernel``): its one fixed launch (``BLOCK_M=64``, Triton's default warps/stages), with
  and without ``dlse``.

Arguments are not written out by hand: the library's own ``_forward`` / ``_backward`` run on ``meta`` tensors of
the real shape (BSHD-backed views, as the diffusers processors pass them) with the launch intercepted, so every
kernel sees the argument list, strides, scalars and constexprs a real launch passes. They are specialised as a
real launch specialises them: pointers 16-byte aligned, integers equal to 1 become constants (the innermost
strides), integers divisible by 16 carry ``tt.divisibility = 16``.

How to read a row.
    regs     registers per thread (``ptxas -v``: "Used N registers"; 255 is the hardware maximum)
    spill    bytes of spill stores + spill loads (``ptxas -v``); anything > 0 FAILS the check
    stack    stack frame bytes (local memory); informational
    smem     shared memory Triton allocates for the kernel (``metadata.shared``, dynamic shared memory)
    est      ``smem_estimate(kind, config, block_d, elt)``, which ``fit_configs`` uses to prune configs, so it must
             be an upper bound: smem > est FAILS the check (the estimate under-counts that config)
    limit    smem > SMEM_LIMIT_SM90 (232448 B, the sm_90 per-block opt-in maximum) FAILS the check
    mma      wgmma.mma_async / mma.sync instruction counts in the PTX (sm_90 should use wgmma, "v3")
    notes    ptxas warnings (e.g. "wgmma ... serialized"), informational

Registers and spills come from running ``ptxas -v`` (the same binary and flags Triton uses for sm_90a) on the
kernel's PTX: Triton only fills ``n_regs`` / ``n_spills`` when a driver loads the cubin, which needs a GPU. Where
``cuobjdump`` is bundled, the register count of Triton's own cubin is read too and must agree with the rerun.

Output: a table (default) or, with ``--json``, one JSON object per compiled kernel per line, then one final line
``{"summary": {...}}``. The summary (counts, max registers, max smem, runtime) is printed last. Exit status: 0 all
good; 1 a spill, smem over the limit, smem above the estimate or a compile failure (listed before the summary);
2 the installed Triton has no CUDA backend or ``ptxas`` (one line on stderr).

Triton API: ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
options={"num_warps", "num_stages"})`` (Triton >= 3.3; checked with 3.6.0 and 3.9.0, which pick different ptxas
builds for sm_90a, so their register counts differ).

``--quick`` compiles only head dim 128 in bf16 (for CI). ``--fresh`` compiles into a temporary Triton cache
(measures a cold compile; by default Triton's cache is used, so a rerun only re-runs ``ptxas``). ``--jobs N``
compiles in N processes (default: the CPU count).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from typing import Any

ARCH = 90
SM = "sm_90a"
KINDS = ("fwd", "dkdv", "dq")
KERNEL_FNS = {
    "fwd": ("vidattn.kernels.triton_fwd", "sparse_fwd_kernel"),
    "dkdv": ("vidattn.kernels.triton_bwd", "sparse_bwd_dkdv_kernel"),
    "dq": ("vidattn.kernels.triton_bwd", "sparse_bwd_dq_kernel"),
    "delta": ("vidattn.kernels.triton_bwd", "bwd_delta_kernel"),
}

# HunyuanVideo 720p x 125 frames: 32 x 45 x 80 latent tokens + 256 text tokens, 24 heads.
BATCH, HEADS = 1, 24
FRAMES, HEIGHT, WIDTH, TEXT = 32, 45, 80, 256
VIDEO = FRAMES * HEIGHT * WIDTH          # 115200
SEQ = VIDEO + TEXT                       # 115456
VALID_TEXT = 226                          # padded prompt: kv_lens = VIDEO + VALID_TEXT (HAS_KVLENS)
BLOCK = 128
HALF_H, HALF_W = 11, 20                   # a FreeSwim-style window (HAS_PRED)

INT_FIELDS = ("block_m", "block_n", "warps", "stages", "head_dim", "registers", "spill_bytes", "smem_bytes")


class EnvironmentProblem(Exception):
    """The installed Triton cannot compile for sm_90a here (exit status 2)."""


# ----------------------------------------------------------------------------------------------- row checks
def problems(rows: Iterable[dict], smem_limit: int | None = None) -> list[str]:
    """Every failed check of ``rows`` as one line each: compile failure, spills, smem over the sm_90 limit
    (``smem_limit``, else the row's ``smem_limit``, else 232448), smem above ``smem_estimate`` (``None`` skips
    that check), ptxas/cubin register disagreement."""
    out = []
    for r in rows:
        name = row_name(r)
        limit = smem_limit or r.get("smem_limit") or 232448
        if r.get("error"):
            out.append(f"{name}: compile failed: {r['error']}")
            continue
        if r["spill_bytes"] > 0:
            out.append(f"{name}: spills {r['spill_stores']} B stores + {r['spill_loads']} B loads "
                       f"({r['registers']} registers)")
        if r["smem_bytes"] > limit:
            out.append(f"{name}: shared memory {r['smem_bytes']} B over the sm_90 limit {limit} B")
        est = r.get("smem_estimate")
        if est is not None and r["smem_bytes"] > est:
            out.append(f"{name}: shared memory {r['smem_bytes']} B above smem_estimate {est} B "
                       f"(+{r['smem_bytes'] - est} B): the estimate is not an upper bound")
        cubin_regs = r.get("cubin_registers")
        if cubin_regs is not None and cubin_regs != r["registers"]:
            out.append(f"{name}: ptxas rerun reports {r['registers']} registers but Triton's cubin has {cubin_regs}: "
                       "register/spill numbers are unreliable")
    return out


def row_name(r: dict) -> str:
    extra = "".join([" pred" if r.get("predicate") else "", " epi" if r.get("epilogue") else "",
                     " dlse" if r.get("dlse") else ""])
    return (f"{r.get('kernel')} {r.get('block_m')}x{r.get('block_n')} w{r.get('warps')} s{r.get('stages')} "
            f"{r.get('dtype')} d{r.get('head_dim')}{extra}")


# ----------------------------------------------------------------------------------------------- environment
def _ptxas_path() -> str:
    from triton.backends.nvidia import compiler as nv
    get = getattr(nv, "get_ptxas", None)
    tool = None
    if get is not None:
        try:
            tool = get(ARCH)
        except TypeError:  # older Triton: get_ptxas() without an arch
            tool = get()
    if tool is None:
        import triton.knobs as knobs
        tool = knobs.nvidia.ptxas
    path = getattr(tool, "path", None) or (tool[0] if isinstance(tool, tuple) else tool)
    if not path or not os.path.isfile(path) or not os.access(path, os.X_OK):
        raise EnvironmentProblem(f"no ptxas found for {SM} (looked at {path!r})")
    return str(path)


def _cuobjdump_path(ptxas: str) -> str | None:
    cand = os.path.join(os.path.dirname(ptxas), "cuobjdump")
    if os.path.isfile(cand) and os.access(cand, os.X_OK):
        return cand
    return shutil.which("cuobjdump")


def check_environment() -> dict:
    """Triton version, ptxas path/version, cuobjdump path; raises :class:`EnvironmentProblem`."""
    try:
        import triton
        from triton.backends import backends
    except Exception as exc:  # noqa: BLE001
        raise EnvironmentProblem(f"triton is not importable: {exc}") from None
    if "nvidia" not in backends:
        raise EnvironmentProblem(f"triton {triton.__version__} has no CUDA backend (backends: {sorted(backends)})")
    try:
        ptxas = _ptxas_path()
    except EnvironmentProblem:
        raise
    except Exception as exc:  # noqa: BLE001
        raise EnvironmentProblem(f"triton {triton.__version__}: cannot locate ptxas: {exc}") from None
    try:
        ver = subprocess.run([ptxas, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    except Exception as exc:  # noqa: BLE001
        raise EnvironmentProblem(f"ptxas at {ptxas} does not run: {exc}") from None
    m = re.search(r"release (\d+\.\d+)", ver)
    return {"triton": triton.__version__, "ptxas": ptxas, "ptxas_version": m.group(1) if m else "?",
            "ptxas_flags": " ".join(_ptxas_flags(True, None)), "cuobjdump": _cuobjdump_path(ptxas)}


# ----------------------------------------------------------------------------------------------- argument capture
def _pattern(with_pred: bool):
    """Per-head pattern of the Hunyuan shape: a band of 3 key blocks per query block plus the text column;
    with the predicate the off-diagonal band entries are partial (window predicate), padded text via kv_lens."""
    import torch
    from vidattn.kernels import BlockPattern, WindowPredicate

    n = -(-SEQ // BLOCK)
    r = torch.arange(n)
    band = (r[:, None] - r[None, :]).abs() <= 1
    mask = band.clone()
    mask[:, -1] = True
    mask = mask.expand(BATCH, HEADS, n, n).clone()
    mask[:, 1::2, :, -2] = True  # heads differ (per-head CSR, as Rectified SpaAttn's patterns)
    kv_lens = torch.tensor([VIDEO + VALID_TEXT] * BATCH, dtype=torch.int32)
    if not with_pred:
        return BlockPattern.from_block_mask(mask, q_len=SEQ, kv_len=SEQ, block_q=BLOCK, kv_lens=kv_lens)
    partial = (band & (r[:, None] != r[None, :])).expand_as(mask)
    pred = WindowPredicate.inward(FRAMES, HEIGHT, WIDTH, HALF_H, HALF_W)
    return BlockPattern.from_block_mask(mask, q_len=SEQ, kv_len=SEQ, block_q=BLOCK, partial=partial,
                                        predicate=pred, kv_lens=kv_lens)


class _Recorder:
    """Stands in for ``fn[grid]`` / ``_launch``: records the arguments instead of launching."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list, dict]] = []

    def launch(self, kind, fn, rows, bh, block_q, block_kv, config, args, meta):  # the _launch signature
        self.calls.append((kind, list(args), dict(meta, BLOCK_M=config.block_m, BLOCK_N=config.block_n)))

    def delta_kernel(self):
        rec = self

        class _Delta:
            def __getitem__(self, grid):
                return lambda *args, **kw: rec.calls.append(("delta", list(args), dict(kw)))
        return _Delta()


def capture_launches(dtype_name: str, head_dim: int, with_pred: bool, fixed: dict, epilogue: bool,
                     need_dlse: bool, _cache: dict = {}) -> list[tuple[str, list, dict]]:  # noqa: B006
    """Run the library's ``_forward`` and ``_backward`` on meta tensors with ``fixed`` configs; return the
    intercepted launches ``(kind, positional args, constexpr kwargs)``."""
    import torch
    from vidattn.kernels import Epilogue
    from vidattn.kernels import triton_attention as ta

    if with_pred not in _cache:
        _cache[with_pred] = _pattern(with_pred)
    pattern = _cache[with_pred]
    dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[dtype_name])

    def bshd():
        return torch.empty((BATCH, SEQ, HEADS, head_dim), dtype=dtype, device="meta").transpose(1, 2)

    q, k, v, dout = bshd(), bshd(), bshd(), bshd()
    nq = pattern.num_q_blocks
    epi = (Epilogue(torch.empty((BATCH, HEADS, nq), device="meta"),
                    torch.empty((BATCH, HEADS, nq, head_dim), device="meta")) if epilogue else None)
    rec = _Recorder()
    saved = ta._launch, ta.bwd_delta_kernel
    ta._launch, ta.bwd_delta_kernel = rec.launch, rec.delta_kernel()
    try:
        out, lse = ta._forward(q, k, v, pattern, q.shape[-1] ** -0.5, True, epi, fixed)
        if "dkdv" in fixed:
            dlse = torch.empty_like(lse) if need_dlse else None
            ta._backward(q, k, v, out, lse, dout, dlse, pattern, q.shape[-1] ** -0.5, None, fixed)
    finally:
        ta._launch, ta.bwd_delta_kernel = saved
    return rec.calls


def specialise(arg: Any) -> tuple[str, Any, bool]:
    """``(signature type, constant or None, divisible by 16)`` of one runtime argument, as a launch specialises it."""
    import torch
    if isinstance(arg, torch.Tensor):
        names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
                 torch.int64: "i64", torch.bool: "i1"}
        return "*" + names[arg.dtype], None, True  # allocations are >= 16-byte aligned (meta data_ptr is 0)
    if isinstance(arg, bool):
        return "u1", None, False
    if isinstance(arg, int):
        if arg == 1:
            return "constexpr", 1, False
        kind = "i32" if -2**31 <= arg < 2**31 else ("u64" if arg >= 2**63 else "i64")
        return kind, None, arg % 16 == 0
    if isinstance(arg, float):
        return "fp32", None, False
    raise TypeError(f"unsupported kernel argument {type(arg).__name__}")


def build_job(kind: str, args: list, constexprs: dict, fn) -> dict:
    """Signature / constexprs / attrs (keyed by argument name; indices added in the worker) of one launch."""
    names = list(fn.arg_names)
    if len(args) > len(names):
        raise TypeError(f"{fn.__name__}: {len(args)} positional args for {len(names)} parameters")
    sig, consts, divisible = {}, {}, []
    for name, arg in zip(names, args):
        ty, const, div = specialise(arg)
        sig[name] = ty
        if const is not None:
            consts[name] = const
        if div:
            divisible.append(name)
    for name in names[len(args):]:
        if name not in constexprs:
            raise TypeError(f"{fn.__name__}: no value for parameter {name}")
        sig[name] = "constexpr"
        consts[name] = constexprs[name]
    extra = set(constexprs) - set(names)
    if extra:
        raise TypeError(f"{fn.__name__}: unknown constexprs {sorted(extra)}")
    return {"kind": kind, "signature": sig, "constexprs": consts, "divisible": divisible}


# ----------------------------------------------------------------------------------------------- compile (worker)
_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill": re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"),
}


def parse_ptxas(log: str) -> dict:
    """Registers (max over functions), stack frame, spill stores/loads (sums) and warnings of a ``ptxas -v`` log."""
    regs = [int(x) for x in _PTXAS_RE["registers"].findall(log)]
    spills = [tuple(map(int, t)) for t in _PTXAS_RE["spill"].findall(log)]
    if not regs:
        raise ValueError(f"no register count in the ptxas log:\n{log}")
    warnings = sorted({re.sub(r"\s+", " ", line.split(":", 1)[1]).strip()
                       for line in log.splitlines() if "warning" in line.lower() and ":" in line})
    return {"registers": max(regs), "stack_bytes": sum(s[0] for s in spills),
            "spill_stores": sum(s[1] for s in spills), "spill_loads": sum(s[2] for s in spills),
            "ptxas_warnings": warnings}


def _ptxas_flags(enable_fp_fusion: bool, ptx_options: str | None) -> list[str]:
    """The flags Triton's ``make_cubin`` passes for sm_90a (minus output naming), with ``-v``."""
    import inspect
    from triton.backends.nvidia.compiler import CUDABackend
    try:
        src = inspect.getsource(CUDABackend.make_cubin)
    except (OSError, TypeError):
        src = ""
    flags = ["-lineinfo", "-v"]
    if not enable_fp_fusion:
        flags.append("--fmad=false")
    flags += re.findall(r"'(--regAllocOptLevel=\d+)'", src)
    if ptx_options:
        flags += ptx_options.split()
    return flags + [f"--gpu-name={SM}"]


def _cubin_registers(cuobjdump: str | None, cubin: bytes) -> int | None:
    if not cuobjdump:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True,
                             timeout=120, check=False)
    regs = [int(x) for x in re.findall(r"REG:(\d+)", res.stdout)]
    return max(regs) if regs else None


def compile_job(job: dict) -> dict:
    """Compile one kernel for sm_90a and measure it; never raises (errors go to ``row['error']``)."""
    import importlib
    import inspect
    import warnings

    t0 = time.perf_counter()
    row = dict(job["row"])
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        mod, name = KERNEL_FNS[row["kernel"]]
        fn = getattr(importlib.import_module(mod), name)
        names = list(fn.arg_names)
        params = inspect.signature(ASTSource).parameters
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in job["divisible"]}
        key = "constexprs" if "constexprs" in params else "constants"
        src = ASTSource(fn=fn, signature=job["signature"], attrs=attrs, **{key: job["constexprs"]})
        options = {} if job["warps"] is None else {"num_warps": job["warps"], "num_stages": job["stages"]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Triton 3.9's FP-fusion default notice
            kernel = triton.compile(src, target=GPUTarget("cuda", ARCH, 32), options=options)
        md = kernel.metadata
        row["warps"], row["stages"] = int(md.num_warps), int(md.num_stages)
        ptx = kernel.asm["ptx"]
        with tempfile.TemporaryDirectory() as tmp:
            ptx_path = os.path.join(tmp, "k.ptx")
            with open(ptx_path, "w") as f:
                f.write(ptx)
            cmd = [job["ptxas"], *_ptxas_flags(bool(getattr(md, "enable_fp_fusion", True)),
                                              getattr(md, "ptx_options", None)),
                   ptx_path, "-o", os.path.join(tmp, "k.cubin")]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        if res.returncode:
            raise RuntimeError(f"ptxas rerun failed ({res.returncode}): {res.stderr.strip()[-500:]}")
        row.update(parse_ptxas(res.stdout + res.stderr))
        row["spill_bytes"] = row["spill_stores"] + row["spill_loads"]
        row["smem_bytes"] = int(md.shared)
        row["wgmma"] = len(re.findall(r"\bwgmma\.mma_async\b", ptx))
        row["mma_sync"] = len(re.findall(r"\bmma\.sync\b", ptx))
        row["cubin_registers"] = _cubin_registers(job.get("cuobjdump"), kernel.asm["cubin"])
        row["error"] = None
    except Exception as exc:  # noqa: BLE001 - a compile failure is a row, not a crash
        msg = " ".join(str(exc).split())
        row["error"] = f"{type(exc).__name__}: {msg[:400]}"
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


# ----------------------------------------------------------------------------------------------- plan
def plan(quick: bool, env: dict) -> list[dict]:
    """All compile jobs: per (dtype, head dim, predicate) the fitted configs of each kind, the epilogue variant
    of the first forward config, and the delta kernel (with and without dlse, once per dtype/head dim)."""
    import importlib

    import torch
    from vidattn.kernels import triton_attention as ta

    if type(ta.sparse_fwd_kernel).__name__ != "JITFunction":
        raise EnvironmentProblem("the kernels were imported as Triton interpreter functions; unset TRITON_INTERPRET")
    fns = {k: getattr(importlib.import_module(m), n) for k, (m, n) in KERNEL_FNS.items()}
    limit = ta.SMEM_LIMIT_SM90
    dtypes = ("bf16",) if quick else ("bf16", "fp16")
    dims = (128,) if quick else (64, 128)
    jobs = []

    def add(call, cfg, dtype_name, d, elt, index=0):
        kind, args, constexprs = call
        spec = build_job(kind, args, constexprs, fns[kind])
        block_d = constexprs["BLOCK_D"]
        row = {"kernel": kind, "block_m": constexprs["BLOCK_M"], "block_n": constexprs.get("BLOCK_N", 0),
               "warps": None if cfg is None else cfg.warps, "stages": None if cfg is None else cfg.stages,
               "dtype": dtype_name, "head_dim": d, "predicate": bool(constexprs.get("HAS_PRED", False)),
               "epilogue": bool(constexprs.get("HAS_EPI", False)), "dlse": bool(constexprs.get("HAS_DLSE", False)),
               "smem_estimate": None if cfg is None else ta.smem_estimate(kind, cfg, block_d, elt),
               "smem_limit": limit, "config_index": index}
        # delta: no config, Triton's default num_warps / num_stages (as its launch); filled in from the metadata
        jobs.append({**spec, "row": row, "warps": row["warps"], "stages": row["stages"], "ptxas": env["ptxas"],
                     "cuobjdump": env["cuobjdump"]})

    for dtype_name in dtypes:
        dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[dtype_name])
        elt = torch.empty((), dtype=dtype).element_size()
        for d in dims:
            fitted = {kind: ta.fit_configs(kind, block_q=BLOCK, block_kv=BLOCK, head_dim=d, dtype=dtype,
                                           smem_limit=limit) for kind in KINDS}
            for pred in (False, True):
                # One forward + backward per config index (kinds with fewer configs repeat their last one).
                for i in range(max(map(len, fitted.values()))):
                    fixed = {kind: cfgs[min(i, len(cfgs) - 1)] for kind, cfgs in fitted.items()}
                    first = i == 0 and not pred
                    for dlse in (False, True) if first else (False,):
                        calls = {c[0]: c for c in capture_launches(dtype_name, d, pred, fixed, False, dlse)}
                        if first:
                            add(calls["delta"], None, dtype_name, d, elt)
                        if dlse:
                            continue
                        for kind in KINDS:
                            if i < len(fitted[kind]):
                                add(calls[kind], fitted[kind][i], dtype_name, d, elt, i)
                # The epilogue variant of the first forward config.
                calls = {c[0]: c for c in capture_launches(dtype_name, d, pred, {"fwd": fitted["fwd"][0]}, True,
                                                           False)}
                add(calls["fwd"], fitted["fwd"][0], dtype_name, d, elt)
    return jobs


# ----------------------------------------------------------------------------------------------- output
_ORDER = {"fwd": 0, "dkdv": 1, "dq": 2, "delta": 3}


def _sort_key(r: dict) -> tuple:
    """dtype, head dim, kernel, predicate, then fit_configs order (epilogue / dlse variants last)."""
    return (r["dtype"], r["head_dim"], _ORDER[r["kernel"]], r["predicate"], r["epilogue"], r["dlse"],
            r.get("config_index", 0))


def format_table(rows: list[dict]) -> str:
    head = ["kernel", "dtype", "d", "pred", "epi", "tile", "warps", "stages", "regs", "spill", "stack", "smem",
            "est", "mma", "status / notes"]
    lines = []
    for r in rows:
        if r.get("error"):
            cells = [r["kernel"], r["dtype"], str(r["head_dim"]), _yn(r["predicate"]), _yn(r["epilogue"] or r["dlse"]),
                     f"{r['block_m']}x{r['block_n']}", str(r["warps"]), str(r["stages"]), "-", "-", "-", "-",
                     str(r["smem_estimate"] or "-"), "-", "COMPILE FAILED: " + r["error"][:120]]
        else:
            bad = problems([r], r["smem_limit"])
            notes = "; ".join(w[:90] for w in r["ptxas_warnings"])
            mma = "v3" if r["wgmma"] and not r["mma_sync"] else ("v2" if r["mma_sync"] and not r["wgmma"] else
                                                                  ("v2+v3" if r["wgmma"] else "-"))
            cells = [r["kernel"], r["dtype"], str(r["head_dim"]), _yn(r["predicate"]),
                     "dlse" if r["dlse"] else _yn(r["epilogue"]), f"{r['block_m']}x{r['block_n']}", str(r["warps"]),
                     str(r["stages"]), str(r["registers"]),
                     f"{r['spill_stores']}/{r['spill_loads']}" if r["spill_bytes"] else "0", str(r["stack_bytes"]),
                     str(r["smem_bytes"]), str(r["smem_estimate"] if r["smem_estimate"] is not None else "-"), mma,
                     ("FAIL " if bad else "ok ") + notes]
        lines.append(cells)
    widths = [max(len(head[i]), *(len(c[i]) for c in lines)) if lines else len(head[i]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) if i in (0, 1, 5, 14) else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def _yn(x: bool) -> str:
    return "yes" if x else "no"


def summarise(rows: list[dict], env: dict, seconds: float, jobs: int) -> dict:
    ok = [r for r in rows if not r.get("error")]
    limit = rows[0]["smem_limit"] if rows else 232448
    top_regs = max(ok, key=lambda r: r["registers"], default=None)
    top_smem = max(ok, key=lambda r: r["smem_bytes"], default=None)
    found = problems(rows, limit)
    return {
        "target": SM, "triton": env["triton"], "ptxas": env["ptxas_version"],
        "ptxas_cmd": f"{os.path.basename(env['ptxas'])} {env.get('ptxas_flags', '')}".strip(), "kernels": len(rows),
        "compiled": len(ok), "failed": len(rows) - len(ok),
        "spilling": sum(1 for r in ok if r["spill_bytes"] > 0),
        "over_smem_limit": sum(1 for r in ok if r["smem_bytes"] > limit),
        "above_estimate": sum(1 for r in ok if r["smem_estimate"] is not None and r["smem_bytes"] > r["smem_estimate"]),
        "max_registers": top_regs["registers"] if top_regs else None,
        "max_registers_kernel": row_name(top_regs) if top_regs else None,
        "max_smem_bytes": top_smem["smem_bytes"] if top_smem else None,
        "max_smem_kernel": row_name(top_smem) if top_smem else None,
        "smem_limit": limit, "problems": len(found), "seconds": round(seconds, 1),
        "compile_cpu_s": round(sum(r.get("compile_s", 0.0) for r in rows), 1), "jobs": jobs,
        "ok": not found,
    }


def summary_text(s: dict) -> str:
    return (f"{s['target']} compile check (triton {s['triton']}, ptxas {s['ptxas']}: {s['ptxas_cmd']}): "
            f"{s['compiled']}/{s['kernels']} "
            f"kernels compiled, {s['failed']} failed, {s['spilling']} spilling, {s['over_smem_limit']} over the smem "
            f"limit, {s['above_estimate']} above smem_estimate; max registers {s['max_registers']} "
            f"({s['max_registers_kernel']}); max smem {s['max_smem_bytes']} of {s['smem_limit']} B "
            f"({s['max_smem_kernel']}); {s['seconds']} s on {s['jobs']} process(es) -> "
            + ("OK" if s["ok"] else f"FAIL ({s['problems']} problem(s))"))


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="one JSON object per kernel per line, then the summary")
    ap.add_argument("--quick", action="store_true", help="only head dim 128, bf16 (CI)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: CPU count)")
    ap.add_argument("--fresh", action="store_true", help="compile into a temporary Triton cache (cold compile)")
    args = ap.parse_args(argv)

    # The kernels must be JIT functions, not interpreter ones; set before triton is first imported.
    os.environ.pop("TRITON_INTERPRET", None)
    tmp_cache = None
    if args.fresh:
        tmp_cache = tempfile.mkdtemp(prefix="sm90_triton_cache_")
        os.environ["TRITON_CACHE_DIR"] = tmp_cache
    t0 = time.perf_counter()
    try:
        try:
            env = check_environment()
            jobs = plan(args.quick, env)
        except EnvironmentProblem as exc:
            print(f"sm90_compile_check: cannot compile for {SM}: {exc}", file=sys.stderr)
            return 2
        n_proc = max(1, min(args.jobs, len(jobs)))
        if n_proc == 1:
            rows = [compile_job(j) for j in jobs]
        else:
            import multiprocessing as mp
            with ProcessPoolExecutor(n_proc, mp_context=mp.get_context("spawn")) as pool:
                rows = list(pool.map(compile_job, jobs))
    finally:
        if tmp_cache:
            shutil.rmtree(tmp_cache, ignore_errors=True)
    rows.sort(key=_sort_key)
    for r in rows:
        r["problems"] = problems([r], r["smem_limit"])
    summary = summarise(rows, env, time.perf_counter() - t0, n_proc)
    found = problems(rows, summary["smem_limit"])
    if args.json:
        for r in rows:
            print(json.dumps(r), flush=True)
        for p in found:
            print(f"PROBLEM: {p}", file=sys.stderr)
        print(json.dumps({"summary": summary}), flush=True)
    else:
        print(format_table(rows))
        print()
        for p in found:
            print(f"PROBLEM: {p}")
        print(summary_text(summary), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
