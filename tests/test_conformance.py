"""Conformance across families and installation ways: gradient checkpointing equals plain backprop (with the sparse
path taken), the README's "Installation ways per family" table is what happens, the shared-instance RoPE
read-back on real pipelines' tables, and "no token layout" calls are warned about once and counted in the stats and
in ``vidattn generate``'s sidecar."""
import inspect
import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline

import vidattn
import vidattn.pipelines as vp
from vidattn import FullProcessor, RadialProcessor, TokenLayout
from vidattn.models import adapter_for_transformer
from vidattn.models.rope import banded_rope_layout
from vidattn.pipelines.tiny import FAMILIES, tiny_transformer, tiny_transformer_inputs

pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast")  # diffusers' Mochi RoPE, on CPU

ROOT = Path(__file__).resolve().parents[1]
PER_SAMPLE = {"mochi"}  # Mochi attends once per sample
BATCH = 2


def _self_attention(model):
    return [m for _, m in adapter_for_transformer(model).self_attention_modules(model)]


def _attention_calls(family, model):
    return len(_self_attention(model)) * (BATCH if family in PER_SAMPLE else 1)


def _radial():
    return RadialProcessor(block_size=16, decimation_threshold=16, backend="torch")


class _Shared:
    """One processor instance installed by hand, as a diffusers user would (Mochi: ``attn1.processor = proc``)."""

    def __init__(self, model, proc):
        self.model, self.proc = model, proc
        if hasattr(model, "set_attn_processor"):
            self.stock = dict(model.attn_processors)
            model.set_attn_processor(proc)
        else:
            self.stock = [(m, m.processor) for m in _self_attention(model)]
            for m, _ in self.stock:
                m.processor = proc

    @property
    def stats(self):
        return self.proc.stats

    def undo(self):
        if isinstance(self.stock, dict):
            self.model.set_attn_processor(dict(self.stock))
        else:
            for m, p in self.stock:
                m.processor = p


class _Applied:
    def __init__(self, model, proc):
        self.model = model
        self.stats = vidattn.apply(model, proc).stats

    def undo(self):
        vidattn.remove(self.model)


class _Pipeline:
    """The family's ``vidattn.pipelines`` drop-in pipeline around ``model`` (other components left out: the
    transformer is called directly), installed with ``pipe.set_attn_processor``."""

    CLASSES = {"wan": "WanPipeline", "hunyuan": "HunyuanVideoPipeline", "cogvideox": "CogVideoXPipeline",
               "ltx": "LTXPipeline", "mochi": "MochiPipeline"}

    def __init__(self, model, proc, family):
        cls = getattr(vp, self.CLASSES[family])
        required = [name for name, p in inspect.signature(cls.__init__).parameters.items()
                    if name != "self" and p.default is inspect.Parameter.empty]
        self.pipe = cls(**{name: None for name in required if name != "transformer"}, transformer=model)
        self.stats = self.pipe.set_attn_processor(proc).stats  # the Installation, as vidattn.apply returns

    def undo(self):
        self.pipe.reset_attn_processor()


WAYS = {"apply": lambda model, proc, family: _Applied(model, proc),
        "pipeline": lambda model, proc, family: _Pipeline(model, proc, family),
        "shared": lambda model, proc, family: _Shared(model, proc)}


# ---------------------------------------------------------------------------------------------- A: checkpointing
def _loss_and_grads(family, way, checkpointing):
    model = tiny_transformer(family).train()
    inputs = tiny_transformer_inputs(family, batch=BATCH)
    if checkpointing:
        model.enable_gradient_checkpointing()
    installed = WAYS[way](model, _radial(), family)
    try:
        out = model(**inputs)[0]
        target = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        loss = (out - target).pow(2).mean()
        loss.backward()
    finally:
        installed.undo()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, installed.stats.summary(), _attention_calls(family, model)


@pytest.mark.parametrize("way", ["apply", "shared"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_equals_plain_backprop_on_the_sparse_path(family, way):
    """diffusers' ``test_gradient_checkpointing_equivalence`` with a vidattn processor taking the sparse path.

    Before the RoPE read-back ran without autograd, Mochi with a shared instance raised ``CheckpointError``
    (a different number of tensors saved by the forward and by the recomputation, a cache hit)."""
    loss, grads, stats, calls = _loss_and_grads(family, way, checkpointing=False)
    loss_ckpt, grads_ckpt, stats_ckpt, _ = _loss_and_grads(family, way, checkpointing=True)
    # the sparse path was taken on every self-attention call, with a pattern that really is sparse
    assert stats["sparse_calls"] == calls and stats["dense_calls"] == 0
    assert 0 < stats["sparse_density"] < 1
    assert stats_ckpt["dense_calls"] == 0
    assert stats_ckpt["sparse_calls"] > calls  # the recomputation ran attention again: checkpointing was active
    assert (loss - loss_ckpt).abs().item() <= 1e-5 * loss.abs().item()
    assert grads.keys() == grads_ckpt.keys() and grads
    for name, g in grads.items():
        scale = max(g.abs().max().item(), 1e-12)
        assert (g - grads_ckpt[name]).abs().max().item() <= 1e-5 * scale, name


def test_rope_read_back_runs_without_autograd():
    """Mochi's rotary table is built from the trainable ``pos_frequencies``: reading the layout back saves no
    tensor for backward, cache miss or hit."""
    model = tiny_transformer("mochi")
    cos, sin = model.rope(model.pos_frequencies, 5, 6, 8, dtype=torch.float32)
    assert cos.requires_grad
    proc = FullProcessor()
    saved = []
    seen = {}

    def read_back(rotary_emb, seq_len):
        seen["grad"] = torch.is_grad_enabled()
        seen["requires_grad"] = [t.requires_grad for t in rotary_emb]
        from vidattn.models.mochi import mochi_rope_layout

        return mochi_rope_layout(rotary_emb, seq_len)

    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        for _ in range(2):  # a miss, then a hit
            assert proc.cached_rope_layout((cos, sin), 240, read_back) == TokenLayout(5, 6, 8)
    assert saved == [] and seen == {"grad": False, "requires_grad": [False, False]}


# ------------------------------------------------------------------- B: installation ways per family (README table)
def _cogvideox_without_rope():
    """A CogVideoX-2b-style tiny model: no rotary embedding (``use_rotary_positional_embeddings=False``)."""
    def build():
        return CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
            text_embed_dim=16, num_layers=2, sample_height=12, sample_width=16, sample_frames=17, patch_size=2,
            max_text_seq_length=16, use_rotary_positional_embeddings=False,
        ).eval()

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build()
    return model, dict(tiny_transformer_inputs("cogvideox", batch=BATCH), image_rotary_emb=None)


def _mochi(pos_frequencies):
    model = tiny_transformer("mochi")
    with torch.no_grad():
        if pos_frequencies == "zeros":
            model.pos_frequencies.zero_()
        else:  # re-initialised at another scale than tiny_transformer's N(0, 0.1)
            torch.nn.init.uniform_(model.pos_frequencies, -1.0, 1.0, generator=torch.Generator().manual_seed(7))
    return model, tiny_transformer_inputs("mochi", batch=BATCH)


# README row label (start of the first cell) -> (family, builder of (model, inputs))
SCENARIOS = {
    "Wan": ("wan", lambda: (tiny_transformer("wan"), tiny_transformer_inputs("wan", batch=BATCH))),
    "HunyuanVideo": ("hunyuan", lambda: (tiny_transformer("hunyuan"), tiny_transformer_inputs("hunyuan", batch=BATCH))),
    "CogVideoX with RoPE": ("cogvideox", lambda: (tiny_transformer("cogvideox"),
                                                  tiny_transformer_inputs("cogvideox", batch=BATCH))),
    "CogVideoX without RoPE": ("cogvideox", _cogvideox_without_rope),
    "LTX-Video": ("ltx", lambda: (tiny_transformer("ltx"), tiny_transformer_inputs("ltx", batch=BATCH))),
    "Mochi, trained": ("mochi", lambda: _mochi("trained")),
    "Mochi, untrained": ("mochi", lambda: _mochi("zeros")),
}
# README column header (a substring of it) -> installation way
COLUMNS = {"vidattn.apply": "apply", "vidattn pipelines": "pipeline", "stock": "shared"}


def _readme_table():
    """``{(row label, way): "sparse" | "dense"}`` from README's "Installation ways per family" table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Installation ways per family", 1)[1]
    all_lines = section.splitlines()
    start = next(i for i, line in enumerate(all_lines) if line.startswith("|"))
    end = next((i for i in range(start, len(all_lines)) if not all_lines[i].startswith("|")), len(all_lines))
    lines = all_lines[start:end]  # the first table of the section
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    ways = {i: way for i, h in enumerate(header) for key, way in COLUMNS.items() if key in h}
    assert sorted(ways.values()) == sorted(COLUMNS.values()), header
    table = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        label = next(key for key in SCENARIOS if cells[0].startswith(key))
        for i, way in ways.items():
            table[label, way] = re.match(r"\W*(\w+)", cells[i]).group(1)
    return table


def test_readme_table_covers_every_scenario_and_way():
    table = _readme_table()
    assert set(table) == {(label, way) for label in SCENARIOS for way in COLUMNS.values()}
    assert set(table.values()) <= {"sparse", "dense"}


@pytest.mark.parametrize("way", list(COLUMNS.values()))
@pytest.mark.parametrize("label", list(SCENARIOS))
def test_installation_way_behaves_as_the_readme_table_says(label, way):
    family, build = SCENARIOS[label]
    model, inputs = build()
    installed = WAYS[way](model, FullProcessor(block_size=32, backend="torch"), family)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        installed.undo()
    stats = installed.stats.summary()
    calls = _attention_calls(family, model)
    if _readme_table()[label, way] == "sparse":
        assert stats["sparse_calls"] == calls and stats["dense_calls"] == 0
    else:
        assert stats["sparse_calls"] == 0 and stats["dense_reasons"] == {"no token layout": calls}


def _cogvideox_pipeline_rope(config, height, width, latent_frames):
    """The rotary table ``CogVideoXPipeline`` builds for ``config`` (its own method, unbound)."""
    fake = SimpleNamespace(vae_scale_factor_spatial=8, transformer=SimpleNamespace(config=SimpleNamespace(**config)))
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(fake, height, width, latent_frames, "cpu")


COGVIDEOX_5B = dict(patch_size=2, patch_size_t=None, sample_width=90, sample_height=60, attention_head_dim=64)
COGVIDEOX_15 = dict(patch_size=2, patch_size_t=2, sample_width=170, sample_height=96, attention_head_dim=64)


@pytest.mark.parametrize("config,height,width,latent_frames,grid", [
    (COGVIDEOX_5B, 480, 720, 13, (13, 30, 45)),   # CogVideoX-5b's default size
    (COGVIDEOX_5B, 720, 480, 4, (4, 45, 30)),
    (COGVIDEOX_5B, 320, 512, 5, (5, 20, 32)),     # smaller than the sample size: a cropped RoPE
    (COGVIDEOX_15, 768, 1360, 21, (11, 48, 85)),  # CogVideoX1.5-5b's default size (patch_size_t 2)
    (COGVIDEOX_15, 480, 720, 13, (7, 30, 45)),
])
def test_cogvideox_pipeline_rope_reads_back_the_grid(config, height, width, latent_frames, grid):
    """The layout a shared instance reads from the RoPE CogVideoXPipeline really passes (5b and 1.5 configs)."""
    cos, sin = _cogvideox_pipeline_rope(config, height, width, latent_frames)
    assert banded_rope_layout((cos, sin), cos.shape[0]) == TokenLayout(*grid)


def test_cogvideox_shared_instance_with_the_pipelines_rope_is_sparse():
    """Tiny CogVideoX (RoPE on), one shared instance, the rotary table built by CogVideoXPipeline's own method at a
    size other than the sample size: every self-attention call is sparse with the right grid."""
    model = tiny_transformer("cogvideox")
    config = {k: getattr(model.config, k) for k in COGVIDEOX_5B}
    inputs = tiny_transformer_inputs("cogvideox", batch=BATCH, frames=3, height=8, width=12)  # grid 3 x 4 x 6
    inputs["image_rotary_emb"] = _cogvideox_pipeline_rope(config, 8 * 8, 12 * 8, 3)
    layouts = []

    class Recording(FullProcessor):
        def attend(self, q, k, v, layout, dense_fn):
            layouts.append(layout)
            return super().attend(q, k, v, layout, dense_fn)

    installed = _Shared(model, Recording(block_size=32, backend="torch"))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        installed.undo()
    assert installed.stats.sparse_calls == _attention_calls("cogvideox", model) and installed.stats.dense_calls == 0
    assert {(lay.frames, lay.height, lay.width) for lay in layouts} == {(3, 4, 6)}


@pytest.mark.parametrize("init", ["normal", "uniform", "kaiming"])
def test_mochi_shared_instance_reads_randomly_initialised_rope(init):
    model = tiny_transformer("mochi")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        if init == "normal":
            model.pos_frequencies.normal_(0.0, 1.0, generator=g)
        elif init == "uniform":
            model.pos_frequencies.uniform_(-0.5, 0.5, generator=g)
        else:
            torch.nn.init.kaiming_uniform_(model.pos_frequencies, generator=g)
    installed = _Shared(model, FullProcessor(block_size=32, backend="torch"))
    try:
        with torch.no_grad():
            model(**tiny_transformer_inputs("mochi", batch=BATCH))
    finally:
        installed.undo()
    assert installed.stats.sparse_calls == _attention_calls("mochi", model) and installed.stats.dense_calls == 0


# ------------------------------------------------------------------------------ B: the "no token layout" warning
@pytest.mark.parametrize("label,title,pipeline,why", [
    ("CogVideoX without RoPE", "CogVideoX", "CogVideoXPipeline", "no rotary embedding"),
    ("Mochi, untrained", "Mochi", "MochiPipeline", "pos_frequencies are zero"),
])
def test_no_layout_warning_names_family_and_fix_once_and_stats_count_it(caplog, label, title, pipeline, why):
    family, build = SCENARIOS[label]
    model, inputs = build()
    proc = FullProcessor(block_size=32, backend="torch")
    installed = _Shared(model, proc)
    try:
        with caplog.at_level(logging.WARNING, logger="vidattn"), torch.no_grad():
            model(**inputs)
            model(**inputs)
    finally:
        installed.undo()
    records = [r for r in caplog.records if r.name == "vidattn" and "token layout" in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == logging.WARNING  # once per processor
    message = records[0].getMessage()
    for part in (f"vidattn: {title} attention", why, "run dense", "no token layout", "vidattn.apply(pipe, processor)",
                 f"vidattn.pipelines.{pipeline}", "set_attn_processor"):
        assert part in message, part
    assert proc.stats.summary()["dense_reasons"] == {"no token layout": 2 * _attention_calls(family, model)}
    assert proc.stats.sparse_calls == 0


def test_generate_sidecar_records_no_token_layout_calls(tmp_path, monkeypatch, caplog):
    """``vidattn generate``'s JSON sidecar carries the stats, "no token layout" calls included (forced here: the
    Wan adapter finds no grid in the forward inputs and no layout in the rotary table)."""
    pytest.importorskip("imageio.v3")
    from vidattn.models import wan
    from vidattn.pipelines.generate import GenerationRequest, generate_video

    monkeypatch.setattr(wan.WanAdapter, "grid", lambda self, transformer, args, kwargs: None)
    monkeypatch.setattr(wan, "wan_rope_layout", lambda rotary_emb, seq_len: None)
    request = GenerationRequest(prompt="a fox", model="tiny", frames=9, steps=2, device="cpu")
    with caplog.at_level(logging.WARNING, logger="vidattn"):
        sidecar = generate_video(request, _radial(), tmp_path / "fox.mp4")
    on_disk = json.loads((tmp_path / "fox.json").read_text())
    calls = 2 * 2 * 2  # 2 steps x CFG (cond, uncond) x 2 layers
    for meta in (sidecar, on_disk):
        assert meta["attention"]["sparse_calls"] == 0
        assert meta["attention"]["dense_reasons"] == {"no token layout": calls}
    messages = [r.getMessage() for r in caplog.records if "token layout" in r.getMessage()]
    assert len(messages) == 1 and "Wan attention" in messages[0] and "gave no token grid" in messages[0]
