"""The CPU backend's C++ extension and its rectangle planner: builds here (keyed by source and torch version, under a
lock, outside the timed region), matches the reference and the Python loop, covers every listed block exactly once,
and fails loudly on bad input."""
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vidattn import TokenLayout, radial_pattern
from vidattn.kernels import BlockPattern, WindowPredicate, cpu_ext, sparse_attention
from vidattn.kernels import torch_backend
from vidattn.kernels.cpu_plan import plan_rects, rect_cost, strip_rects
from vidattn.kernels.reference import reference_attention

from helpers import assert_lse_close, attention_cases, python_loop, threads


def _used_extension(p):
    return any(key[0] == "ext" for key in p._cache if isinstance(key, tuple))


def test_extension_builds_on_this_machine():
    assert cpu_ext.cpu_extension(), cpu_ext.extension_error()
    assert hasattr(torch.ops.vidattn_cpu, "runs_forward")


@settings(max_examples=40, deadline=None)
@given(attention_cases(), st.sampled_from([1, 2]))
def test_extension_and_python_loop_match_reference(case, workers):
    q, k, v, p = case
    ref, ref_lse = reference_attention(q, k, v, p, return_lse=True)
    with threads(workers), torch.inference_mode():
        out, lse = sparse_attention(q, k, v, p, backend="torch", return_lse=True)
        with python_loop():
            out_py, lse_py = sparse_attention(q, k, v, p, backend="torch", return_lse=True)
    for o, l in ((out, lse), (out_py, lse_py)):
        assert (o - ref).abs().max().item() <= 1e-5
        assert_lse_close(l, ref_lse)


def _cells(rects, p):
    """Block cells covered by token rectangles, with multiplicity."""
    count = np.zeros((p.num_q_blocks, p.num_kv_blocks), dtype=np.int64)
    for q0, q1, k0, k1 in rects:
        assert 0 <= q0 < q1 <= p.q_len and 0 <= k0 < k1 <= p.kv_len
        assert q0 % p.block_q == 0 and k0 % p.block_kv == 0
        assert q1 % p.block_q == 0 or q1 == p.q_len
        assert k1 % p.block_kv == 0 or k1 == p.kv_len
        count[q0 // p.block_q:-(-q1 // p.block_q), k0 // p.block_kv:-(-k1 // p.block_kv)] += 1
    return count


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 60), st.integers(1, 60), st.sampled_from([8, 16, 128]), st.sampled_from([8, 16, 128]),
       st.floats(0.05, 1.0), st.integers(0, 2**16), st.booleans())
def test_plan_covers_every_full_block_exactly_once(nq, nk, bq, bk, density, seed, with_partial):
    g = torch.Generator().manual_seed(seed)
    q_len = nq * bq - int(torch.randint(bq, (1,), generator=g))
    kv_len = nk * bk - int(torch.randint(bk, (1,), generator=g))
    bitmap = torch.rand(1, 2, nq, nk, generator=g) < density
    partial = torch.rand(1, 2, nq, nk, generator=g) < 0.3 if with_partial else None
    p = BlockPattern.from_block_mask(bitmap, q_len=q_len, kv_len=kv_len, block_q=bq, block_kv=bk, partial=partial,
                                     predicate=(lambda qi, ki: qi >= ki) if with_partial else None)
    full = p.block_bitmap() & ~p.partial_bitmap()
    for g_, strips in enumerate(plan_rects(p)):
        count = _cells([r for strip in strips for r in strip], p)
        assert np.array_equal(count, full[0, g_].numpy().astype(np.int64))


def test_plan_takes_tall_rectangles_where_rows_share_runs():
    """Dense 8x8-block squares on the diagonal (queries of a frame attending their frame): one call per square."""
    n, side = 32, 8
    r = torch.arange(n)
    mask = (r[:, None] // side) == (r[None, :] // side)
    p = BlockPattern.from_block_mask(mask, q_len=n * 128, kv_len=n * 128, block_q=128)
    rects = [rect for strip in plan_rects(p)[0] for rect in strip]
    assert sorted(rects) == [(i * 1024, (i + 1) * 1024, i * 1024, (i + 1) * 1024) for i in range(n // side)]


def test_plan_keeps_row_calls_on_a_thin_band():
    """A 3-block band shares no run wide enough across 4+ rows: the rows' own calls are cheapest and kept."""
    n = 40
    r = torch.arange(n)
    strip = ((r[:8, None] - r[None, :]).abs() <= 1).numpy()
    rects = strip_rects(strip, q0=0, q_len=n * 128, block_q=128, kv_len=n * 128, block_kv=128)
    assert all(q1 - q0 == 128 for q0, q1, _, _ in rects)
    assert len(rects) == 8


def test_plan_is_never_costlier_than_row_calls_on_radial():
    p = radial_pattern(TokenLayout(21, 30, 52), block_size=128, sink_frames=1)
    planned = sum(rect_cost(q1 - q0, k1 - k0) for strip in plan_rects(p)[0] for q0, q1, k0, k1 in strip)
    rows = sum(rect_cost(q1 - q0, k1 - k0) for q0, q1, runs in torch_backend.plan_runs(p)[0] for k0, k1, _ in runs)
    assert planned < rows
    tall = sum((q1 - q0) * (k1 - k0) for strip in plan_rects(p)[0] for q0, q1, k0, k1 in strip if q1 - q0 >= 1024)
    assert tall / (p.density() * p.q_len * p.kv_len) > 0.3


def test_kv_lens_copies_share_the_plan():
    p = BlockPattern.from_block_mask(torch.rand(6, 6) < 0.5, q_len=90, kv_len=90, block_q=16)
    masked = p.with_kv_lens(torch.tensor([90, 70]))
    assert plan_rects(masked) is plan_rects(p)
    assert torch_backend.plan_runs(masked) is torch_backend.plan_runs(p)


def test_padded_keys_split_the_calls_at_each_samples_length():
    """Batch 2 with different key lengths (one ending mid-block, one short of a whole block run): the rectangles
    are cut at the shorter length and the rest is masked per sample."""
    g = torch.Generator().manual_seed(5)
    s = 200
    p = BlockPattern.full(s, block_q=32).with_kv_lens(torch.tensor([137, 60]))
    q, k, v = (torch.randn(2, 2, s, 16, generator=g) for _ in range(3))
    ref, ref_lse = reference_attention(q, k, v, p, return_lse=True)
    with torch.inference_mode():
        out, lse = sparse_attention(q, k, v, p, backend="torch", return_lse=True)
    assert (out - ref).abs().max().item() <= 1e-5
    assert_lse_close(lse, ref_lse)
    prog = torch_backend._ext_program(p, 2, 2)
    calls, masked = prog.calls, prog.masked
    assert int(calls[:, 7].max()) == 60
    assert [(k0, k1) for *_, k0, k1, _ in masked] == [(60, 137)]  # keys past every sample's length: skipped


def test_per_sample_patterns_over_several_strips_on_worker_threads():
    """Per-sample and per-head patterns (groups (2, 2)) with different key lengths, long enough for several strips
    per group, so the extension runs many tasks on two workers."""
    g = torch.Generator().manual_seed(8)
    s, bq = 1100, 16
    n = -(-s // bq)
    bitmap = torch.rand(2, 2, n, n, generator=g) < 0.3
    bitmap[..., 0] = True
    lens = torch.tensor([s - 3, s - 40], dtype=torch.int32)
    p = BlockPattern.from_block_mask(bitmap, q_len=s, kv_len=s, block_q=bq, kv_lens=lens)
    lens[0] = 5  # the pattern holds its own copy
    assert int(p.kv_lens[0]) == s - 3
    q, k, v = (torch.randn(2, 2, s, 16, generator=g) for _ in range(3))
    ref, ref_lse = reference_attention(q, k, v, p, return_lse=True)
    with threads(2), torch.inference_mode():
        out, lse = sparse_attention(q, k, v, p, backend="torch", return_lse=True)
    tasks = torch_backend._ext_program(p, 2, 2).tasks
    assert len(tasks) >= 4
    assert (out - ref).abs().max().item() <= 1e-5
    assert_lse_close(lse, ref_lse)


def test_short_sequences_split_tasks_per_head():
    """One strip shared by all heads is one task: the program is split per (sample, head) to use both threads."""
    g = torch.Generator().manual_seed(9)
    p = BlockPattern.from_block_mask(torch.rand(8, 8, generator=g) < 0.5, q_len=120, kv_len=120, block_q=16)
    q, k, v = (torch.randn(2, 3, 120, 8, generator=g) for _ in range(3))
    with threads(2), torch.inference_mode():
        out = sparse_attention(q, k, v, p, backend="torch")
    assert ("ext", 2, 3, True) in p._cache and len(p._cache[("ext", 2, 3, True)][0]) == 6
    assert (out - reference_attention(q, k, v, p)[0]).abs().max().item() <= 1e-5


def test_float64_keeps_its_precision_on_the_python_loop():
    g = torch.Generator().manual_seed(10)
    p = BlockPattern.from_block_mask(torch.rand(6, 6, generator=g) < 0.6, q_len=90, kv_len=90, block_q=16)
    q, k, v = (torch.randn(1, 2, 90, 8, generator=g, dtype=torch.float64) for _ in range(3))
    with torch.inference_mode():
        out = sparse_attention(q, k, v, p, backend="torch")
    assert out.dtype == torch.float64 and not _used_extension(p)
    assert (out - reference_attention(q, k, v, p)[0]).abs().max().item() <= 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_goes_through_the_extension(dtype):
    g = torch.Generator().manual_seed(6)
    s = 300
    p = BlockPattern.from_block_mask(torch.rand(10, 10, generator=g) < 0.5, q_len=s, kv_len=s, block_q=32)
    q, k, v = (torch.randn(1, 3, s, 32, generator=g) for _ in range(3))
    ref32 = reference_attention(q, k, v, p)[0]
    ref_lp = reference_attention(q.to(dtype), k.to(dtype), v.to(dtype), p)[0]
    with torch.inference_mode():
        out = sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), p, backend="torch")
    assert out.dtype == dtype and _used_extension(p)
    assert (out.float() - ref32).abs().max().item() <= 2 * (ref_lp.float() - ref32).abs().max().item() + 1e-3


def _op_args(s=64, d=8):
    q, k, v = (torch.randn(1, 2, s, d) for _ in range(3))
    acc = torch.zeros(1, 2, s, d)
    lse = torch.full((1, 2, s), float("-inf"))
    return q, k, v, acc, lse


def test_op_checks_its_calls_and_raises_worker_errors():
    assert cpu_ext.cpu_extension()
    op = torch.ops.vidattn_cpu.runs_forward
    q, k, v, acc, lse = _op_args()
    tasks = torch.tensor([[0, 1]])
    with pytest.raises(RuntimeError, match="lies outside"):
        op(q, k, v, acc, lse, tasks, torch.tensor([[0, 1, 0, 2, 0, 64, 0, 65, 0]]), 1.0, 2)
    with pytest.raises(RuntimeError, match="range of calls"):
        op(q, k, v, acc, lse, torch.tensor([[0, 2]]), torch.tensor([[0, 1, 0, 2, 0, 64, 0, 64, 0]]), 1.0, 2)
    with pytest.raises(RuntimeError, match="float32"):
        op(q, k, v, acc.double(), lse, tasks, torch.tensor([[0, 1, 0, 2, 0, 64, 0, 64, 0]]), 1.0, 2)
    k_bad = torch.randn(1, 2, 64, 16)  # head dims differ: the flash kernel fails inside a worker thread
    calls = torch.tensor([[0, 1, 0, 2, i * 8, i * 8 + 8, 0, 64, 0] for i in range(8)])
    with pytest.raises(RuntimeError):
        op(q, k_bad, v, acc, lse, torch.arange(9).repeat_interleave(2)[1:-1].reshape(8, 2), calls, 1.0, 2)


def test_op_has_a_fake_kernel_for_tracing():
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert cpu_ext.cpu_extension()
    with FakeTensorMode():
        q, k, v, acc, lse = _op_args()
        torch.ops.vidattn_cpu.runs_forward(q, k, v, acc, lse, torch.tensor([[0, 1]]),
                                           torch.tensor([[0, 1, 0, 2, 0, 64, 0, 64, 0]]), 1.0, 1)


def test_op_merges_split_key_runs_exactly():
    """One row of queries against [0, 20) and [20, 64) in two tasks' worth of calls equals one dense call."""
    q, k, v, acc, lse = _op_args()
    calls = torch.tensor([[0, 1, 0, 2, 0, 64, 0, 20, 0], [0, 1, 0, 2, 0, 64, 20, 64, 0]])
    torch.ops.vidattn_cpu.runs_forward(q, k, v, acc, lse, torch.tensor([[0, 2]]), calls, 8 ** -0.5, 1)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (acc - dense).abs().max().item() <= 1e-6
    expect_lse = (q @ k.transpose(-1, -2) * 8 ** -0.5).logsumexp(-1)
    assert (lse - expect_lse).abs().max().item() <= 1e-5


def test_disabled_extension_falls_back_with_a_log_line(monkeypatch, caplog):
    monkeypatch.setattr(cpu_ext, "_STATE", {})
    monkeypatch.setenv("VIDATTN_CPU_EXTENSION", "0")
    with caplog.at_level(logging.INFO, logger="vidattn.kernels"):
        assert not cpu_ext.cpu_extension()
    assert "VIDATTN_CPU_EXTENSION=0" in cpu_ext.extension_error()
    assert any("loops in Python" in r.getMessage() for r in caplog.records)
    g = torch.Generator().manual_seed(7)
    p = BlockPattern.from_block_mask(torch.rand(5, 5, generator=g) < 0.6, q_len=70, kv_len=70, block_q=16,
                                     partial=torch.rand(5, 5, generator=g) < 0.5,
                                     predicate=WindowPredicate.inward(1, 7, 10, 1, 1))
    q, k, v = (torch.randn(1, 2, 70, 8, generator=g) for _ in range(3))
    with torch.inference_mode():
        out = sparse_attention(q, k, v, p, backend="torch")
    assert (out - reference_attention(q, k, v, p)[0]).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------- the keyed build
FAKE_SOURCE = 'extern "C" int vidattn_fake_answer() { return %d; }\n'
ROOT = Path(__file__).resolve().parents[1]


def test_build_name_is_keyed_by_source_torch_version_and_flags():
    src = b"int f() { return 1; }"
    name = cpu_ext.extension_name(src, torch_version="2.5.0")
    assert name == cpu_ext.extension_name(src, torch_version="2.5.0")
    assert name.startswith("vidattn_block_sparse_cpu_") and len(name) == len("vidattn_block_sparse_cpu_") + 12
    assert name != cpu_ext.extension_name(src, torch_version="2.6.0")
    assert name != cpu_ext.extension_name(b"int f() { return 2; }", torch_version="2.5.0")
    assert name != cpu_ext.extension_name(src, torch_version="2.5.0", flags=("-O2",))
    # the default: this checkout's source and the running torch
    default = cpu_ext.extension_name()
    assert default == cpu_ext.extension_name(cpu_ext._SOURCE.read_bytes())
    assert default != cpu_ext.extension_name(torch_version="0.0.0")


def test_loaded_extension_lives_under_its_keyed_name():
    assert cpu_ext.cpu_extension(), cpu_ext.extension_error()
    name = cpu_ext.extension_name()
    lib = Path(cpu_ext._build_home(name)) / f"{name}{cpu_ext._LIB_EXT}"
    assert lib.is_file() and not list(lib.parent.glob("tmp-*"))  # the build folder was cleaned up
    assert cpu_ext.build_or_load() == lib  # loads the built library: no second build


def _fake_source(tmp_path, answer):
    src = tmp_path / f"fake{answer}.cpp"
    src.write_text(FAKE_SOURCE % answer)
    return src


def test_build_is_logged_once_and_cached_on_disk(tmp_path, monkeypatch, caplog):
    import ctypes

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    src = _fake_source(tmp_path, 41)
    with caplog.at_level(logging.INFO, logger="vidattn.kernels"):
        lib = cpu_ext.build_or_load(src, prefix="vidattn_test_fake")
        again = cpu_ext.build_or_load(src, prefix="vidattn_test_fake")
    assert lib == again and lib.parent.parent == tmp_path / "ext"
    assert ctypes.CDLL(str(lib)).vidattn_fake_answer() == 41
    building = [r for r in caplog.records if "building the CPU kernel, once per torch version" in r.getMessage()]
    assert len(building) == 1
    assert sorted(p.name for p in lib.parent.iterdir()) == ["build.lock", lib.name]


_WORKER = textwrap.dedent("""
    import ctypes, importlib.util, logging, sys, time
    from pathlib import Path
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = importlib.util.spec_from_file_location("cpu_ext", sys.argv[3])  # torch only, not all of vidattn
    cpu_ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cpu_ext)
    go = Path(sys.argv[2])
    Path(sys.argv[4]).touch()  # ready
    while not go.exists():
        time.sleep(0.01)
    lib = cpu_ext.build_or_load(Path(sys.argv[1]), prefix="vidattn_test_race")
    print("answer", ctypes.CDLL(str(lib)).vidattn_fake_answer())
""")


@pytest.mark.slow
def test_concurrent_builds_in_two_processes_both_load(tmp_path):
    """Two processes start the same build at once: one compiles under the lock, the other waits, both load."""
    src = _fake_source(tmp_path, 43)
    go = tmp_path / "go"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "VIDATTN_CPU_EXTENSION": "1"}
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(src), str(go), cpu_ext.__file__, str(r)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in ready]
    deadline = time.monotonic() + 60
    while not all(r.exists() for r in ready) and time.monotonic() < deadline and None in [p.poll() for p in procs]:
        time.sleep(0.01)
    go.touch()  # both imported: they start the build together
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert "answer 43" in out
    logs = "".join(err for _, err in results)
    assert logs.count("compiling (vidattn_test_race_") == 1
    assert logs.count("waiting for another process (vidattn_test_race_") == 1  # the other one waited on the lock
    home = next((tmp_path / "ext").iterdir())
    assert sorted(p.name for p in home.iterdir()) == ["build.lock", f"{home.name}.so"]


def test_build_is_not_counted_as_attention_time(monkeypatch):
    """The first sparse CPU call builds the extension: that time is outside the call's recorded seconds."""
    from vidattn import FullProcessor, TokenLayout

    def slow_failing_build():
        time.sleep(0.6)
        raise RuntimeError("no compiler in this test")

    monkeypatch.setattr(cpu_ext, "_STATE", {})
    monkeypatch.setattr(cpu_ext, "_build", slow_failing_build)
    proc = FullProcessor(block_size=16, backend="torch")
    layout = TokenLayout(2, 4, 4)
    q, k, v = (torch.randn(1, 32, 2, 8) for _ in range(3))
    with torch.inference_mode():
        proc.attend(q, k, v, layout, lambda q, k, v, scale=None: q)
    assert proc.stats.sparse_calls == 1
    assert proc.stats.sparse_seconds < 0.3
    assert cpu_ext._STATE["seconds"] >= 0.6 and "no compiler" in cpu_ext.extension_error()


def test_one_thread_per_call_is_reentrant_and_thread_safe():
    """Nested and concurrent entries (two threads training at once) leave the intra-op thread count as it was."""
    import threading

    before = torch.get_num_threads()
    gate = threading.Barrier(2)

    def enter_twice() -> None:
        with torch_backend._one_thread_per_call():
            gate.wait()
            with torch_backend._one_thread_per_call():
                assert torch.get_num_threads() == 1
            gate.wait()

    workers = [threading.Thread(target=enter_twice) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert torch.get_num_threads() == before
