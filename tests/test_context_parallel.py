"""Context parallelism (vidattn.parallel): 2- and 4-process gloo runs against the single-process result.

One ``torchrun --nproc_per_node 4`` launch of this file (``__main__``: :func:`worker`) runs every distributed case
and rank 0 writes a JSON of every rank's results; the tests read it. Degree-2 cases run in two CP groups of two
processes (ranks 0-1, 2-3); Ulysses x Ring uses all four. The tiny Wan transformer (2 heads, 256 video tokens,
16-token blocks) runs under diffusers' context parallelism (``vidattn.parallel.enable_context_parallel``) with
Radial, Rectified (Gilbert order: the token order is applied before the split) and the FreeSwim window (spatial
tiles), and is compared with the same weights in one process; so are Ulysses gradients and dense plans. The tiny
HunyuanVideo (joint ``[video | text]`` attention, vidattn's CP plan; two samples with 12 and 8 valid text tokens)
runs Radial under Ulysses and Ring, Rectified under Ulysses, and a dense first layer (the key mask cut per rank).
The ring math also runs on its own with text and padded keys. Pure parts (shard patterns, the LSE merge, ``--cp``
parsing) are tested in-process.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vidattn import BlockPattern, TextSegment, TokenLayout, radial_pattern, sparse_attention, window_pattern
from vidattn.parallel import joint_order, merge_partial, parse_cp, row_pattern, shard_pattern

GRID = dict(frames=16, height=8, width=8)  # latent; 16 x 4 x 4 = 256 tokens after Wan's 2x2 patching
HUNYUAN = dict(batch=2, **GRID)  # 256 video + 16 text tokens (8 per rank); valid text 12 and 8 tokens


# ------------------------------------------------------------------------------------------------ the worker
def _processors() -> dict:
    from vidattn import FreeSwimProcessor, RadialProcessor, RectifiedProcessor

    class PerCallFreeSwim(FreeSwimProcessor):  # plans built per call, inside the Ulysses op
        static_pattern = False

    window = dict(base_rows=2, base_cols=2, temporal=2, block_size=16, tiles=(2, 2))
    return {
        "radial": lambda: RadialProcessor(decay=0.3, block_size=16, decimation_threshold=16),
        "rectified": lambda: RectifiedProcessor(drop_rate=0.75, block_size=16),
        "window": lambda: FreeSwimProcessor(**window),
        "percall": lambda: PerCallFreeSwim(**window),
    }


def _run(method: str, spec, inputs: dict, branch=None):
    """``(output, stats)`` of a fresh tiny Wan with ``method`` under ``spec`` (None: one process), in a FreeSwim
    ``branch`` pass if given ("full": a dense plan). The window method is applied before parallelism is enabled,
    the others after: both orders must work."""
    import vidattn
    from vidattn.pipelines.tiny import tiny_transformer
    from vidattn.parallel import enable_context_parallel

    model = tiny_transformer("wan")
    inst = vidattn.apply(model, _processors()[method]()) if method == "window" else None
    if spec is not None:
        enable_context_parallel(model, spec)
    inst = inst or vidattn.apply(model, _processors()[method]())
    with torch.no_grad(), inst.context.passing(branch=branch):
        out = model(**inputs)[0]
    return out, inst.stats.summary()


def _run_hunyuan(method: str, spec, inputs: dict, **knobs) -> tuple[torch.Tensor, dict]:
    """``(output, stats)`` of the tiny HunyuanVideo with ``method`` (and ``knobs``) under ``spec`` (None: one
    process)."""
    import vidattn
    from vidattn import RadialProcessor
    from vidattn.pipelines.tiny import tiny_transformer
    from vidattn.parallel import enable_context_parallel

    model = tiny_transformer("hunyuan")
    if spec is not None:
        enable_context_parallel(model, spec)
    processor = (RadialProcessor(decay=0.3, block_size=16, decimation_threshold=16, **knobs) if method == "radial"
                 else _processors()[method]())
    inst = vidattn.apply(model, processor)
    with torch.no_grad():
        return model(**inputs)[0], inst.stats.summary()


def _hunyuan_cases() -> dict:
    """Every Hunyuan case: max difference to one process and the sparse statistics of the CP run."""
    from diffusers import ContextParallelConfig

    from vidattn.pipelines.tiny import tiny_transformer_inputs

    inputs = tiny_transformer_inputs("hunyuan", **HUNYUAN)
    found = {}
    for name, method, knobs, kinds in (("radial", "radial", {}, ("ulysses", "ring")),
                                       ("rectified", "rectified", {}, ("ulysses",)),
                                       ("dense-layer", "radial", {"dense_layers": 1}, ("ulysses", "ring"))):
        ref = _run_hunyuan(method, None, inputs, **knobs)[0]
        for kind in kinds:
            out, stats = _run_hunyuan(method, f"{kind}:2", inputs, **knobs)
            found[f"hunyuan-{name}-{kind}"] = {"diff": (out - ref).abs().max().item(),
                                               "sparse": stats["sparse_calls"], "dense": stats["dense_calls"],
                                               "density": stats["sparse_density"]}
    odd = tiny_transformer_inputs("hunyuan", text_len=15, **HUNYUAN)
    found["hunyuan-odd-text"] = _error(lambda: _run_hunyuan("radial", "ulysses:2", odd))
    both = ContextParallelConfig(ulysses_degree=2, ring_degree=2)
    found["hunyuan-ulysses-ring"] = _error(lambda: _run_hunyuan("radial", both, inputs))
    return found


def _error(fn) -> str:
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the message is the result
        return f"{type(err).__name__}: {err}"
    return "no error"


def _ring_math(rank: int, world: int) -> dict:
    """ring_attention on its own over every process: a joint layout with padded text (kv_lens) and the window
    predicate."""
    from vidattn.parallel import ring_attention

    layout = TokenLayout(3, 4, 8, text=TextSegment(32, "last", valid=(20, 9)))
    radial = radial_pattern(layout, decay=0.5, block_size=8, decimation_threshold=8)
    radial = radial.with_kv_lens(torch.tensor(layout.key_lengths()))
    window = window_pattern(TokenLayout(3, 4, 8), base_rows=2, base_cols=4, block_size=8)  # 3/4 frame per shard
    found = {}
    for name, pattern in (("radial_text", radial), ("window", window)):
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(2, pattern.q_len, 2, 16, generator=g) for _ in range(3))
        ref = sparse_attention(q, k, v, pattern, layout="bshd")
        n = pattern.q_len // world
        rows = slice(rank * n, (rank + 1) * n)
        out = ring_attention(q[:, rows], k[:, rows], v[:, rows], pattern)
        found[name] = (out - ref[:, rows]).abs().max().item()
    return found


def _grad_diff(spec, inputs: dict) -> float:
    """Relative difference of the weight gradients of ``sum(out**2)`` under ``spec`` (summed over the CP group's
    ranks: each holds its shard's share) against one process: the Ulysses op's backward."""
    import torch.distributed as dist

    import vidattn
    from vidattn.pipelines.tiny import tiny_transformer
    from vidattn.parallel import enable_context_parallel

    grads = []
    for cp in (None, spec):
        model = tiny_transformer("wan")
        configs = enable_context_parallel(model, cp) if cp else []
        vidattn.apply(model, _processors()["radial"]())
        model(**inputs)[0].square().sum().backward()
        flat = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        if configs:
            dist.all_reduce(flat, group=configs[0]._flattened_mesh.get_group())
        grads.append(flat)
    return ((grads[1] - grads[0]).norm() / grads[0].norm()).item()


def worker(path: str) -> None:
    import torch.distributed as dist
    from diffusers import ContextParallelConfig

    from vidattn.pipelines.tiny import tiny_transformer, tiny_transformer_inputs
    from vidattn.parallel import enable_context_parallel

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    inputs = tiny_transformer_inputs("wan", **GRID)
    results: dict = {}
    refs: dict = {}
    for method, kinds in (("radial", ("ulysses", "ring")), ("rectified", ("ulysses",)),
                          ("window", ("ulysses", "ring"))):
        ref = refs[method] = _run(method, None, inputs)[0]
        for kind in kinds:
            out, stats = _run(method, f"{kind}:2", inputs)
            results[f"{method}-{kind}"] = {"diff": (out - ref).abs().max().item(), "sparse": stats["sparse_calls"],
                                           "density": stats["sparse_density"]}
    results["ulysses-ring"] = {"diff": (_run("radial", ContextParallelConfig(ulysses_degree=2, ring_degree=2),
                                             inputs)[0] - refs["radial"]).abs().max().item()}
    results["ulysses-grad"] = _grad_diff("ulysses:2", inputs)
    for method in ("window", "percall"):  # dense plans: diffusers' CP attention / the dense op inside Ulysses
        ref = _run(method, None, inputs, "full")[0]
        results[f"{method}-full"] = (_run(method, "ulysses:2", inputs, "full")[0] - ref).abs().max().item()
    results["rectified-ring"] = _error(lambda: _run("rectified", "ring:2", inputs))
    results["ring-unaligned"] = _error(lambda: _run("radial", "ring:2", tiny_transformer_inputs("wan")))
    results["odd-tokens"] = _error(lambda: _run("radial", "ulysses:2", tiny_transformer_inputs(
        "wan", frames=1, height=6, width=6)))
    three = tiny_transformer("wan")
    three.register_to_config(num_attention_heads=3)  # only the config is read by the check
    results["heads"] = _error(lambda: enable_context_parallel(three, "ulysses:2"))
    results["no-plan"] = _error(lambda: enable_context_parallel(tiny_transformer("cogvideox"), "ulysses:2"))
    results.update(_hunyuan_cases())
    results["ring-math"] = _ring_math(rank, dist.get_world_size())
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if rank == 0:
        Path(path).write_text(json.dumps(gathered))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ the tests
@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list:
    out = tmp_path_factory.mktemp("cp") / "results.json"
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--standalone",
           __file__, str(out)]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", ["radial-ulysses", "radial-ring", "rectified-ulysses", "window-ulysses",
                                  "window-ring"])
def test_two_processes_equal_one(results, case):
    for rank in results:
        found = rank[case]
        assert found["diff"] <= 1e-5, found
        assert found["sparse"] > 0 and found["density"] < 0.7, found  # the sparse path ran, and skipped blocks


@pytest.mark.parametrize("case", ["radial-ulysses", "radial-ring", "rectified-ulysses", "dense-layer-ulysses",
                                  "dense-layer-ring"])
def test_hunyuan_with_text_two_processes_equal_one(results, case):
    """Joint [video | text] attention split by vidattn's CP plan, per-sample padded text: equal to one process."""
    for rank in results:
        found = rank[f"hunyuan-{case}"]
        assert found["diff"] <= 1e-5, found
        assert found["sparse"] > 0 and found["density"] < 0.7, found
        assert found["dense"] == (1 if case.startswith("dense-layer") else 0), found  # the masked dense path ran


def test_ulysses_times_ring_on_four_processes_equals_one(results):
    assert all(rank["ulysses-ring"]["diff"] <= 1e-5 for rank in results)


def test_dense_plans_under_ulysses_equal_one_process(results):
    assert all(rank["window-full"] <= 1e-5 and rank["percall-full"] <= 1e-5 for rank in results)


def test_ulysses_gradients_equal_one_process(results):
    assert all(rank["ulysses-grad"] <= 1e-5 for rank in results)


def test_ring_math_with_text_and_window(results):
    for rank in results:
        for name, diff in rank["ring-math"].items():
            assert diff <= 1e-5, (name, diff)


@pytest.mark.parametrize("case,words", [
    ("rectified-ring", ["ring", "ulysses"]),
    ("ring-unaligned", ["whole blocks", "120"]),
    ("odd-tokens", ["divisible by 2", "9 video tokens"]),
    ("heads", ["3 attention heads"]),
    ("no-plan", ["_cp_plan"]),
    ("hunyuan-odd-text", ["15 text tokens", "divide by 2"]),
    ("hunyuan-ulysses-ring", ["ulysses:N or ring:N", "not both"]),
])
def test_clear_errors(results, case, words):
    message = results[0][case]
    assert message.startswith(("ValueError", "RuntimeError")), message
    assert all(w in message for w in words), message


def test_shard_patterns_tile_the_global_pattern():
    layout = TokenLayout(2, 4, 8, text=TextSegment(32, "last", valid=(4,)))
    pattern = window_pattern(layout.without_valid(), base_rows=2, base_cols=2, block_size=8)
    pattern = pattern.with_kv_lens(torch.tensor(layout.key_lengths()))
    n = pattern.q_len // 4
    dense = pattern.to_dense()
    for i in range(4):
        for j in range(4):
            sub = shard_pattern(pattern, i, j, n)
            want = dense[..., i * n:(i + 1) * n, j * n:(j + 1) * n]
            got = torch.zeros_like(want) if sub is None else sub.to_dense()
            assert torch.equal(got, want), (i, j)
    assert shard_pattern(pattern, 0, 3, n) is None  # keys past the valid text: an empty pair is skipped


def test_row_patterns_and_joint_order():
    """Ring with joint text: query-row slices of the global pattern (the last one ends in a partial block), and the
    order that puts gathered [video chunk | text chunk] pieces back in [video | text] order."""
    layout = TokenLayout(2, 4, 8, text=TextSegment(20, "last", valid=(13,)))
    pattern = radial_pattern(layout.without_valid(), decay=0.5, block_size=8, decimation_threshold=8)
    pattern = pattern.with_kv_lens(torch.tensor(layout.key_lengths()))
    dense = pattern.to_dense()
    for start, length in ((0, 32), (32, 32), (64, 20)):
        sub = row_pattern(pattern, start, length)
        want = dense[..., start:start + length, :]
        assert torch.equal(torch.zeros_like(want) if sub is None else sub.to_dense(), want), start
    with pytest.raises(ValueError, match="block boundary"):
        row_pattern(pattern, 4, 8)
    perm, inverse = joint_order(2, 3, 2, "cpu")  # gathered: v0 v0 v0 t0 t0 | v1 v1 v1 t1 t1
    assert perm.tolist() == [0, 1, 2, 5, 6, 7, 3, 4, 8, 9] and torch.equal(perm[inverse], torch.arange(10))


@pytest.mark.parametrize("backend", ["torch", "flex"])  # flex: what CUDA runs for shifted predicates
def test_shard_pairs_merged_equal_global_attention(backend):
    """The ring's arithmetic in one process: each query shard merges its (query, key) shard pairs."""
    pattern = window_pattern(TokenLayout(3, 4, 8, text=TextSegment(32, "last")), base_rows=2, base_cols=4,
                             block_size=8).with_kv_lens(torch.tensor([101]))
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 128, 2, 16, generator=g) for _ in range(3))
    ref = sparse_attention(q, k, v, pattern, layout="bshd")
    n = 32
    for i in range(4):
        out = lse = None
        for j in range(4):
            sub = shard_pattern(pattern, i, j, n)
            if sub is not None:
                part = sparse_attention(q[:, i * n:(i + 1) * n], k[:, j * n:(j + 1) * n], v[:, j * n:(j + 1) * n],
                                        sub, layout="bshd", return_lse=True, backend=backend)
                out, lse = merge_partial(out, lse, *part)
        assert (out - ref[:, i * n:(i + 1) * n]).abs().max().item() <= 1e-5, i


def test_merge_partial_equals_one_softmax():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 64, 2, 8, generator=g) for _ in range(3))
    mask = torch.rand(4, 4, generator=g) < 0.5
    mask[1] = False  # a query block that sees no key at all
    full = BlockPattern.from_block_mask(mask, q_len=64, kv_len=64, block_q=16)
    ref = sparse_attention(q, k, v, full, layout="bshd")
    out = lse = None
    for j in (2, 0, 3, 1):  # any order of key shards
        cols = torch.zeros_like(mask)
        cols[:, j] = mask[:, j]
        part = BlockPattern.from_block_mask(cols, q_len=64, kv_len=64, block_q=16)
        o, l = sparse_attention(q, k, v, part, layout="bshd", return_lse=True)
        out, lse = merge_partial(out, lse, o, l)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max().item() <= 1e-6
    assert torch.isinf(lse[:, :, 16:32]).all()


def test_parse_cp():
    assert parse_cp("ulysses:8") == ("ulysses", 8)
    assert parse_cp("ring:2") == ("ring", 2)
    for bad in ("ulysses", "ring:1", "tree:2", "ulysses:x"):
        with pytest.raises(ValueError, match="ulysses:N or ring:N"):
            parse_cp(bad)


if __name__ == "__main__":
    worker(sys.argv[1])
