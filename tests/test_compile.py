"""torch.compile with vidattn processors (issue: full-graph and regional compilation): host-side facts (step, layout,
pattern) are prepared in the transformer's forward pre-hook, outside the graph, and the sparse kernels run as one
opaque op, so ``fullgraph=True`` captures the whole transformer and repeated blocks share one graph."""
import pytest
import torch
from torch._dynamo.utils import counters

import vidattn
from vidattn import DenseProcessor, FullProcessor, RadialProcessor
from vidattn.pipelines.tiny import tiny_transformer, tiny_transformer_inputs

from helpers import max_diff, run_model

PROCESSORS = {
    "dense": lambda: DenseProcessor(),
    "full": lambda: FullProcessor(block_size=32),
    "radial": lambda: RadialProcessor(block_size=16, decimation_threshold=16),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _models(family):
    model = tiny_transformer(family)
    return model, tiny_transformer_inputs(family, batch=2)


def _timestep(inputs, value):
    t = inputs["timestep"]
    return {**inputs, "timestep": torch.full_like(t, value)}


@pytest.mark.parametrize("family", ["wan", "hunyuan", "cogvideox", "ltx"])
@pytest.mark.parametrize("method", sorted(PROCESSORS))
def test_fullgraph_compile_equals_eager(family, method):
    model, inputs = _models(family)
    inst = vidattn.apply(model, PROCESSORS[method]())
    try:
        eager = run_model(model, inputs)
        sparse_calls = inst.stats.sparse_calls
        assert sparse_calls == (0 if method == "dense" else inst.stats.calls)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        assert max_diff(run_model(compiled, inputs), eager) <= 1e-5
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        vidattn.remove(model)


def test_fullgraph_inductor_radial_wan_equals_eager_and_follows_dense_steps():
    """Inductor, and the step policy read from the pre-hook: step 0 dense (equals stock), step 1 sparse."""
    model, inputs = _models("wan")
    stock = run_model(model, _timestep(inputs, 900.0))
    vidattn.apply(model, RadialProcessor(block_size=16, decimation_threshold=16, dense_steps=1))
    try:
        eager = [run_model(model, _timestep(inputs, t)) for t in (900.0, 800.0)]
        compiled = torch.compile(model, fullgraph=True)
        got = [run_model(compiled, _timestep(inputs, t)) for t in (900.0, 800.0)]
        assert max_diff(got[0], eager[0]) <= 1e-4 and max_diff(got[1], eager[1]) <= 1e-4
        assert max_diff(eager[0], stock) <= 1e-6
        assert max_diff(got[1], got[0]) > 1e-3  # the second step really took the sparse path
    finally:
        vidattn.remove(model)


@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_shared_dense_processor_compiles_fullgraph(family):
    model, inputs = _models(family)
    stock_procs = dict(model.attn_processors)
    ref = run_model(model, inputs)
    model.set_attn_processor(DenseProcessor())
    try:
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        assert max_diff(run_model(compiled, inputs), ref) <= 1e-5
    finally:
        model.set_attn_processor(stock_procs)


@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_regional_compile_shares_one_graph_across_blocks(family):
    model, inputs = _models(family)
    inst = vidattn.apply(model, RadialProcessor(block_size=16, decimation_threshold=16, dense_layers=0))
    try:
        eager = run_model(model, inputs)
        model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        got = run_model(model, inputs)
        again = run_model(model, _timestep(inputs, 500.0))
        assert max_diff(got, eager) <= 1e-5 and again.shape == got.shape
        block_classes = len(model._repeated_blocks) if family == "hunyuan" else 1
        assert counters["stats"]["unique_graphs"] <= block_classes
        assert inst.stats.sparse_calls > 0
    finally:
        vidattn.remove(model)


@pytest.mark.parametrize("family", ["wan", "cogvideox", "ltx"])
def test_export_radial_equals_eager(family):
    """torch.export (non-strict): the pre-hook reads no step from fake tensors; the sparse op is exported opaque."""
    model = tiny_transformer(family)
    inputs = tiny_transformer_inputs(family, batch=1)
    inst = vidattn.apply(model, RadialProcessor(block_size=16, decimation_threshold=16))
    try:
        eager = run_model(model, inputs)
        assert inst.stats.sparse_calls == inst.stats.calls > 0
        with torch.no_grad():
            program = torch.export.export(model, (), kwargs=inputs)
        assert max_diff(run_model(program.module(), inputs), eager) <= 1e-5
    finally:
        vidattn.remove(model)


def test_mochi_plain_compile_equals_eager():
    """Mochi attends per sample on its valid text (a data-dependent split): plain torch.compile, with graph breaks."""
    model, inputs = _models("mochi")
    inst = vidattn.apply(model, RadialProcessor(block_size=16, decimation_threshold=16))
    try:
        eager = run_model(model, inputs)
        assert inst.stats.sparse_calls > 0 and inst.stats.dense_calls == 0
        compiled = torch.compile(model, backend="aot_eager")
        assert max_diff(run_model(compiled, inputs), eager) <= 1e-5
    finally:
        vidattn.remove(model)


@pytest.mark.parametrize("make", [lambda: vidattn.RectifiedProcessor(block_size=16),
                                  lambda: vidattn.FreeSwimProcessor(2, 3, block_size=16)],
                         ids=["rectified", "freeswim"])
def test_dynamic_plans_under_plain_compile(make):
    """Methods whose plans are built per call (and the split-point hooks of a token order) compile with graph
    breaks at the attention calls and give the eager result."""
    model = tiny_transformer("wan")
    inputs = tiny_transformer_inputs("wan", batch=2)
    vidattn.apply(model, make())
    try:
        with torch.no_grad():
            eager = model(**inputs)[0]
            compiled = torch.compile(model)(**inputs)[0]
    finally:
        vidattn.remove(model)
    assert (eager - compiled).abs().max().item() < 1e-5
