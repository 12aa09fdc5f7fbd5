"""Processor base + Wan adapter: exactness against the stock processor, install paths, step policy, LoRA."""
import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

import vidattn
from vidattn import DenseProcessor, FullProcessor, SparseAttentionProcessor, TokenLayout
from vidattn.models.wan import wan_rope_layout
from vidattn.pipelines.tiny import TINY_PRESETS, tiny_transformer, tiny_transformer_inputs, tiny_wan22_pipeline
from vidattn.pipelines.tiny import tiny_wan_pipeline
from vidattn.pipelines import WanPipeline

from helpers import (
    PerturbedDense,
    RandomBlocks,
    generate_patched,
    max_diff,
    run_applied,
    run_model,
    run_with_shared_processor,
)


@pytest.fixture(scope="module")
def wan():
    return tiny_transformer("wan")


@pytest.fixture(scope="module")
def wan_inputs():
    return tiny_transformer_inputs("wan", batch=2)


def test_dense_mode_equals_stock_and_detects_perturbation(wan, wan_inputs):
    ref = run_model(wan, wan_inputs)
    out, _ = run_applied(wan, wan_inputs, DenseProcessor())
    assert max_diff(out, ref) <= 1e-6
    assert max_diff(run_applied(wan, wan_inputs, PerturbedDense())[0], ref) > 1e-6


@pytest.mark.parametrize("backend", ["reference", "torch", "flex", "triton"])
def test_all_ones_pattern_matches_dense_on_every_backend(wan, wan_inputs, backend):
    if backend == "flex":
        pytest.importorskip("torch.nn.attention.flex_attention")
    if backend == "triton":
        pytest.importorskip("triton")
    ref = run_model(wan, wan_inputs)
    out, inst = run_applied(wan, wan_inputs, FullProcessor(block_size=32, backend=backend))
    assert inst.stats.sparse_calls == len(wan.blocks) and inst.stats.dense_calls == 0
    assert max_diff(out, ref) <= 1e-5


def test_sparse_mode_equals_reference_with_same_pattern(wan, wan_inputs):
    outs = {}
    for backend in ("reference", "torch"):
        outs[backend], inst = run_applied(wan, wan_inputs, RandomBlocks(backend=backend))
        assert inst.stats.sparse_calls == len(wan.blocks)
        assert 0 < inst.stats.summary()["sparse_density"] < 1
    assert max_diff(outs["torch"], outs["reference"]) <= 1e-5
    assert max_diff(outs["torch"], run_model(wan, wan_inputs)) > 1e-4  # really sparse


def test_apply_remove_restores_exactly(wan):
    before = {name: proc for name, proc in wan.attn_processors.items()}
    hooks_before = len(wan._forward_pre_hooks)
    vidattn.apply(wan, FullProcessor())
    procs = [b.attn1.processor for b in wan.blocks]
    assert all(isinstance(p, FullProcessor) for p in procs)
    assert [p.layer_index for p in procs] == list(range(len(wan.blocks)))
    assert all(isinstance(b.attn2.processor, WanAttnProcessor) for b in wan.blocks)
    vidattn.apply(wan, DenseProcessor())  # re-apply replaces
    vidattn.remove(wan)
    after = wan.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert len(wan._forward_pre_hooks) == hooks_before
    vidattn.remove(wan)  # no-op


def test_shared_instance_reads_layout_from_rope(wan, wan_inputs):
    ref = run_model(wan, wan_inputs)
    proc = FullProcessor(block_size=32)
    out = run_with_shared_processor(wan, wan_inputs, proc)
    assert proc.stats.sparse_calls == len(wan.blocks)  # attn2 took the stock path
    assert max_diff(out, ref) <= 1e-5
    x = wan_inputs["hidden_states"]
    p_t, p_h, p_w = wan.config.patch_size
    grid = (x.shape[2] // p_t, x.shape[3] // p_h, x.shape[4] // p_w)
    rope = wan.rope(x)
    assert wan_rope_layout(rope, grid[0] * grid[1] * grid[2]) == TokenLayout(*grid)


@pytest.mark.parametrize("grid", [(1, 3, 5), (4, 1, 7), (3, 6, 1), (2, 4, 4)])
def test_rope_read_back_on_odd_grids(wan, grid):
    x = torch.zeros(1, 16, grid[0], grid[1] * 2, grid[2] * 2)
    assert wan_rope_layout(wan.rope(x), grid[0] * grid[1] * grid[2]) == TokenLayout(*grid)


def test_lora_projections_work_through_the_processor():
    peft = pytest.importorskip("peft")
    model = tiny_transformer("wan", seed=3)
    inputs = tiny_transformer_inputs("wan", batch=1)
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                      target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    ref = run_model(model, inputs)
    model.disable_adapters()
    no_lora = run_model(model, inputs)
    model.enable_adapters()
    assert max_diff(ref, no_lora) > 1e-4
    vidattn.apply(model, FullProcessor(block_size=32, backend="torch"))
    try:
        assert max_diff(run_model(model, inputs), ref) <= 1e-5
        out = model(**inputs)[0]
        out.square().mean().backward()
        grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n and "attn1" in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    finally:
        vidattn.remove(model)


def _count_modes(pipe, processor, **call):
    seen = []

    def make_spy(orig):
        def spy(self, layout):
            reason = orig(self, layout)
            seen.append((self.context.step, self.context.branch, self.layer_index, reason))
            return reason
        return spy

    inst = generate_patched(pipe, processor, SparseAttentionProcessor, "dense_reason", make_spy, **call)
    return inst, seen


@pytest.fixture(scope="module")
def toy_pipe():
    return tiny_wan_pipeline("toy", seed=0)


def test_step_policy_counts_with_cfg(toy_pipe):
    settings = dict(TINY_PRESETS["toy"], num_inference_steps=3)
    proc = FullProcessor(block_size=16, dense_steps=1, dense_layers=1, dense_last_steps=1)
    inst, seen = _count_modes(toy_pipe, proc, **settings)
    layers = len(toy_pipe.transformer.blocks)
    assert len(seen) == 3 * 2 * layers  # 3 steps x (cond, uncond) x layers
    assert sorted({(s, b) for s, b, _, _ in seen}) == [(s, b) for s in range(3) for b in range(2)]
    for step, _, layer, reason in seen:
        expect = "dense layer" if layer < 1 else "dense step" if step < 1 else "dense last step" if step == 2 \
            else None
        assert reason == expect
    stats = inst.stats.summary()
    assert stats["sparse_calls"] == 2 * (layers - 1) and stats["dense_calls"] == len(seen) - stats["sparse_calls"]


def test_pipeline_video_identical_in_dense_mode_and_set_attn_processor(toy_pipe):
    settings = dict(TINY_PRESETS["toy"])

    def run():
        return toy_pipe("a fox", output_type="np", generator=torch.Generator().manual_seed(0), **settings).frames

    ref = run()
    assert isinstance(toy_pipe, WanPipeline)
    toy_pipe.set_attn_processor(DenseProcessor())
    try:
        dense = run()
        assert toy_pipe.attention_stats["dense_calls"] > 0
    finally:
        toy_pipe.reset_attn_processor()
    assert abs(dense - ref).max() <= 1e-6
    toy_pipe.set_attn_processor(FullProcessor(block_size=16))
    try:
        full = run()
    finally:
        toy_pipe.reset_attn_processor()
    assert abs(full - ref).max() <= 1e-4
    assert toy_pipe.attention_stats is None


def test_wan22_both_transformers_share_one_context():
    pipe = tiny_wan22_pipeline(seed=0)
    settings = {k: v for k, v in TINY_PRESETS["toy"].items()}
    inst, seen = _count_modes(pipe, FullProcessor(block_size=16, dense_steps=1), **settings)
    assert len(inst.transformers) == 2
    assert {s for s, _, _, _ in seen} == {0, 1}
    assert all((reason == "dense step") == (step == 0) for step, _, _, reason in seen)


def test_from_pretrained_round_trip(tmp_path, toy_pipe):
    toy_pipe.save_pretrained(tmp_path / "tiny")
    loaded = WanPipeline.from_pretrained(tmp_path / "tiny")
    assert type(loaded) is WanPipeline
    inst = loaded.set_attn_processor(FullProcessor())
    assert inst.transformers == [loaded.transformer]
    loaded.reset_attn_processor()


def test_bad_knobs_are_named():
    for kw in ("dense_steps", "dense_layers", "dense_last_steps"):
        with pytest.raises(ValueError, match=kw):
            FullProcessor(**{kw: -1})
    with pytest.raises(ValueError, match="backend"):
        FullProcessor(backend="cuda-magic")
    with pytest.raises(ValueError, match="block_size"):
        FullProcessor(block_size=0)
    with pytest.raises(TypeError, match="processor"):
        vidattn.apply(tiny_transformer("wan"), WanAttnProcessor())


def test_reapply_gives_fresh_stats_and_remove_clears_context(wan, wan_inputs):
    proc = FullProcessor(block_size=32)
    first = vidattn.apply(wan, proc)
    run_model(wan, wan_inputs)
    vidattn.remove(wan)
    assert proc.context is None
    second = vidattn.apply(wan, proc)
    run_model(wan, wan_inputs)
    vidattn.remove(wan)
    assert first.stats.calls == second.stats.calls == len(wan.blocks)


def test_apply_on_a_compiled_transformer_installs_on_the_original():
    model = tiny_transformer("wan")
    compiled = torch.compile(model)
    inst = vidattn.apply(compiled, FullProcessor())
    try:
        assert inst.transformers == [model] and isinstance(model.blocks[0].attn1.processor, FullProcessor)
    finally:
        vidattn.remove(compiled)
    assert isinstance(model.blocks[0].attn1.processor, WanAttnProcessor)
