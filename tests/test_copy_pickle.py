"""Installed state survives ``torch.save``/``pickle`` and ``copy.deepcopy``: copies are independent and removable."""
import copy
import io
import pickle

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

import vidattn
from vidattn import RadialProcessor, StepContext
from vidattn.pipelines.tiny import TINY_WAN22_SETTINGS, tiny_transformer, tiny_transformer_inputs
from vidattn.pipelines.tiny import tiny_wan22_pipeline

from helpers import max_diff, run_model

SMALL = dict(block_size=16, decimation_threshold=16, backend="torch")


def _inputs(timestep=500.0):
    return tiny_transformer_inputs("wan", batch=1, frames=9, timestep=timestep)


def _processors(model):
    return [b.attn1.processor for b in model.blocks]


def _assert_stock(model, stock_out, inputs):
    assert all(isinstance(b.attn1.processor, WanAttnProcessor) for b in model.blocks)
    assert not model._forward_pre_hooks and not model._forward_pre_hooks_with_kwargs
    assert vidattn.installed(model) is None
    assert max_diff(run_model(model, inputs), stock_out) <= 1e-6


class _Pipe:
    def __init__(self, timesteps):
        self.scheduler = type("Sched", (), {"timesteps": torch.tensor(timesteps)})()


def test_torch_save_load_keeps_the_installation_and_remove_restores_stock():
    model, inputs = tiny_transformer("wan"), _inputs()
    stock = run_model(model, inputs)
    proc = RadialProcessor(decay=0.5, dense_layers=1, **SMALL)
    vidattn.apply(model, proc)
    try:
        out = run_model(model, inputs)
        assert max_diff(out, stock) > 1e-4  # really sparse
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
    finally:
        vidattn.remove(model)
    procs = _processors(loaded)
    assert all(type(p) is RadialProcessor and p.knobs() == proc.knobs() for p in procs)
    assert [p.layer_index for p in procs] == list(range(len(loaded.blocks)))
    inst = vidattn.installed(loaded)
    assert inst is not None and inst.transformers == [loaded]
    (hook,) = loaded._forward_pre_hooks.values()
    assert all(p.context is inst.context is hook.context for p in procs)
    assert max_diff(run_model(loaded, inputs), out) <= 1e-6
    assert inst.context.calls == 2 and inst.stats.dense_calls == 2  # the saved call and this one, layer 0 dense
    vidattn.remove(loaded)
    _assert_stock(loaded, stock, inputs)
    vidattn.remove(loaded)  # no-op


def test_deepcopy_is_independent_and_removable():
    model = tiny_transformer("wan")
    stock = run_model(model, _inputs())
    vidattn.apply(model, RadialProcessor(dense_steps=1, dense_layers=1, **SMALL))
    original, layers = vidattn.installed(model), len(model.blocks)
    try:
        dup = copy.deepcopy(model)
        inst = vidattn.installed(dup)
        assert inst is not None and inst is not original and inst.transformers == [dup]
        assert inst.context is not original.context and inst.stats is not original.stats
        (hook,) = dup._forward_pre_hooks.values()
        assert all(p.context is inst.context is hook.context for p in _processors(dup))
        assert all(p.context is original.context for p in _processors(model))

        for t in (900.0, 500.0):  # two steps: step 0 dense, step 1 sparse except layer 0
            run_model(dup, _inputs(t))
        assert (inst.context.step, inst.context.calls) == (1, 2)
        assert (original.context.step, original.context.calls) == (-1, 0)
        assert inst.stats.dense_calls == layers + 1 and inst.stats.sparse_calls == layers - 1
        assert inst.stats.dense_reasons == {"dense layer": 2, "dense step": layers - 1}  # layer 0 at both steps
        assert original.stats.calls == 0

        vidattn.remove(dup)
        _assert_stock(dup, stock, _inputs())
        assert vidattn.installed(model) is original and len(model._forward_pre_hooks) == 1
        assert all(isinstance(p, RadialProcessor) for p in _processors(model))
        run_model(model, _inputs(900.0))
        assert original.context.calls == 1 and original.stats.dense_calls == layers
    finally:
        vidattn.remove(model)
    _assert_stock(model, stock, _inputs())


def test_pickle_drops_the_pipeline_reference():
    pipe = _Pipe([1000.0, 500.0])
    ctx = StepContext(pipeline=pipe)
    ctx.observe(500.0, (1, 2, 3))
    assert ctx.step == 1 and ctx.num_steps == 2
    loaded = pickle.loads(pickle.dumps(ctx))
    assert loaded.pipeline is None and ctx.pipeline() is pipe
    assert (loaded.step, loaded.calls, loaded.grid, loaded.timestep) == (1, 1, (1, 2, 3), 500.0)
    loaded.observe(250.0, None)  # counts on without a scheduler
    assert loaded.step == 2 and loaded.num_steps is None

    twin = copy.deepcopy(ctx)  # the pipeline is not copied with it: the copy counts steps itself
    assert twin.pipeline is None and twin.step == 1
    both = copy.deepcopy({"pipe": pipe, "ctx": ctx})  # copied together: the copy refers to the copied pipeline
    assert both["ctx"].pipeline() is both["pipe"] and both["pipe"] is not pipe

    proc = RadialProcessor(**SMALL).for_layer(3, ctx)
    clone = pickle.loads(pickle.dumps(proc))
    assert clone.layer_index == 3 and clone.knobs() == proc.knobs() and clone.context.pipeline is None


def test_wan22_copies_and_pickles_keep_experts_apart():
    pipe = tiny_wan22_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    inst = vidattn.apply(pipe, RadialProcessor(**SMALL))
    try:
        assert inst.transformers == [pipe.transformer, pipe.transformer_2]
        assert vidattn.installed(pipe.transformer_2) is inst
        dup = copy.deepcopy(pipe)
        dinst = vidattn.installed(dup)
        assert dinst is not None and dinst is not inst and dinst.transformers == [dup.transformer, dup.transformer_2]
        for target in (pipe.transformer, pipe.transformer_2):  # the pipeline shares one installation
            (hook,) = target._forward_pre_hooks.values()
            assert hook.context is inst.context and inst.context.pipeline() is pipe
        assert vidattn.installed(dup.transformer_2) is dinst and dinst.context.pipeline() is dup
        assert all(p.context is dinst.context for t in dinst.transformers for p in _processors(t))
        dup("a fox", output_type="latent", generator=torch.Generator().manual_seed(0), **TINY_WAN22_SETTINGS)
        assert dinst.context.calls == 4 and inst.context.calls == 0
        assert dinst.stats.sparse_calls == 4 * len(dup.transformer.blocks) and inst.stats.calls == 0
        vidattn.remove(dup)
        assert dinst.originals == [] and vidattn.installed(dup.transformer_2) is None
        assert not dup.transformer._forward_pre_hooks and not dup.transformer_2._forward_pre_hooks
        assert vidattn.installed(pipe) is inst and len(pipe.transformer_2._forward_pre_hooks) == 1

        high = pickle.loads(pickle.dumps(pipe.transformer))  # one expert: the other is not carried along
        hinst = vidattn.installed(high)
        assert hinst.transformers == [high] and hinst.context.pipeline is None
        vidattn.remove(high)
        assert not high._forward_pre_hooks and isinstance(high.blocks[0].attn1.processor, WanAttnProcessor)
        assert vidattn.installed(pipe) is inst and len(pipe.transformer._forward_pre_hooks) == 1
    finally:
        vidattn.remove(pipe)
    assert inst.originals == [] and not pipe.transformer._forward_pre_hooks
    assert isinstance(pipe.transformer_2.blocks[0].attn1.processor, WanAttnProcessor)


def test_unpickled_hook_id_is_never_reused_and_remove_spares_user_hooks():
    """In a new process torch counts hook ids from 0 again: a loaded installation must not have its StepHook
    replaced by the next hook a user registers, nor remove that user's hook (simulated by resetting the counter)."""
    import io

    from torch.utils.hooks import RemovableHandle

    from vidattn.api import StepHook
    from vidattn.pipelines.tiny import tiny_transformer

    model = tiny_transformer("wan")
    vidattn.apply(model, RadialProcessor(block_size=16, decimation_threshold=16))
    hook_id = next(k for k, h in model._forward_pre_hooks.items() if isinstance(h, StepHook))
    buf = io.BytesIO()
    torch.save(model, buf)
    vidattn.remove(model)
    saved = RemovableHandle.next_id
    try:
        RemovableHandle.next_id = hook_id  # a fresh process's counter, reaching the saved id
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        handles = [loaded.register_forward_pre_hook(lambda m, a, k: None, with_kwargs=True) for _ in range(3)]
        hooks = list(loaded._forward_pre_hooks.values())
        assert sum(isinstance(h, StepHook) for h in hooks) == 1 and len(hooks) == 4
        vidattn.remove(loaded)
        assert all(h.id in loaded._forward_pre_hooks for h in handles)
        assert not any(isinstance(h, StepHook) for h in loaded._forward_pre_hooks.values())
    finally:
        RemovableHandle.next_id = max(RemovableHandle.next_id, saved)
