"""vidattn.lora's parts without a training run: clip discovery and decoding, the cache key, the batch order, the
objective's draws and loss, the step context in training, installing on wrapped transformers."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import vidattn
from vidattn import RadialProcessor
from vidattn.lora.batches import BatchPlan
from vidattn.lora.cache import cache_settings, valid_cache
from vidattn.lora.data import Clip, ClipError, discover, load_clip, resize_center_crop
from vidattn.lora.objective import draw_seed, flow_matching_loss, flow_settings, sample_draws
from vidattn.lora.synthetic import moving_shape_clip
from vidattn.pipelines.tiny import tiny_transformer, tiny_transformer_inputs
from vidattn.pipelines.video_io import write_video


def _clip(folder: Path, name: str, frames: int, caption: str | None = "a red car moves") -> Path:
    path = write_video(moving_shape_clip(frames, 24, 40, (200, 30, 30), (1.0, 2.0)), folder / f"{name}.mp4")
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def test_discover_folder_csv_and_jsonl(tmp_path):
    _clip(tmp_path, "a", 5)
    _clip(tmp_path, "b", 5, caption=None)
    _clip(tmp_path, "c", 5, caption="  ")
    found = discover(tmp_path)
    assert [c.path.name for c in found.clips] == ["a.mp4"] and found.clips[0].caption == "a red car moves"
    assert sorted(found.skipped) == [("b.mp4", "no caption (.txt)"), ("c.mp4", "empty caption")]
    (tmp_path / "m.csv").write_text("path,caption\na.mp4,one\nmissing.mp4,two\nb.mp4,\n")
    csv_found = discover(tmp_path / "m.csv")
    assert [(c.path.name, c.caption) for c in csv_found.clips] == [("a.mp4", "one")]
    assert [why for _, why in csv_found.skipped] == ["file not found", "empty caption"]
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": "b.mp4", "caption": "three"}) + "\n\n")
    assert [(c.path.name, c.caption) for c in discover(tmp_path / "m.jsonl").clips] == [("b.mp4", "three")]
    (tmp_path / "bad.csv").write_text("file,text\na.mp4,x\n")
    with pytest.raises(ValueError, match="'path' and 'caption'"):
        discover(tmp_path / "bad.csv")


def test_load_clip_samples_resizes_and_crops(tmp_path):
    path = _clip(tmp_path, "a", 12)
    video = load_clip(Clip(path, "x"), frames=5, height=16, width=16, stride=2)
    assert video.shape == (3, 5, 16, 16) and video.min() >= -1 and video.max() <= 1
    source = torch.from_numpy(np.stack([moving_shape_clip(12, 24, 40, (200, 30, 30), (1.0, 2.0))[i]
                                        for i in range(0, 9, 2)])).permute(0, 3, 1, 2).float() / 127.5 - 1
    expected = resize_center_crop(source, 16, 16).permute(1, 0, 2, 3)
    assert (video - expected).abs().mean() < 0.05  # equal up to the codec
    with pytest.raises(ClipError, match="too short: 12 frames, needs 13"):
        load_clip(Clip(path, "x"), frames=7, height=16, width=16, stride=2)
    (tmp_path / "bad.mp4").write_bytes(b"junk" * 100)
    with pytest.raises(ClipError, match="unreadable"):
        load_clip(Clip(tmp_path / "bad.mp4", "x"), frames=1, height=16, width=16)


def test_resize_center_crop_keeps_the_centre():
    frames = torch.zeros(1, 3, 10, 30)
    frames[..., 10:20] = 1.0  # the middle third of the width
    out = resize_center_crop(frames, 10, 10)
    assert out.shape == (1, 3, 10, 10) and bool((out == 1).all())


def test_cache_is_invalid_when_a_setting_or_a_clip_changes(tmp_path):
    path = _clip(tmp_path, "a", 5)
    clips = [Clip(path.resolve(), "a red car moves")]
    settings = cache_settings({"name": "tiny"}, clips, 5, 16, 16, 1, 16)
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "index.json").write_text(json.dumps({"settings": settings.as_dict(), "samples": [], "skipped": []}))
    assert valid_cache(folder, settings)
    assert not valid_cache(folder, cache_settings({"name": "tiny"}, clips, 9, 16, 16, 1, 16))
    assert not valid_cache(folder, cache_settings({"name": "tiny"}, [Clip(clips[0].path, "other")], 5, 16, 16, 1, 16))
    assert not valid_cache(tmp_path / "none", settings)


def test_batch_plan_is_the_same_global_batch_for_any_process_count():
    one, two = BatchPlan(10, 4, 1, seed=3), BatchPlan(10, 2, 2, seed=3)
    for position in range(7):
        assert one.global_indices(position) == two.global_indices(position)
        assert two.local(position, 0)[0] + two.local(position, 1)[0] == one.local(position, 0)[0]
        assert two.local(position, 1)[1] == [2, 3]
    epoch0 = one.global_indices(0) + one.global_indices(1)
    assert len(set(epoch0)) == 8 and one.epoch(2) == 1  # no clip twice within an epoch
    assert one.global_indices(2) != one.global_indices(0)  # a new order each epoch
    small = BatchPlan(3, 4).global_indices(0)  # fewer clips than a batch: clips repeat
    assert len(small) == 4 and sorted(set(small)) == [0, 1, 2]
    assert BatchPlan(10, 4, 1, seed=4).global_indices(0) != one.global_indices(0)


def test_draws_are_seeded_per_sample_and_shifted():
    assert draw_seed(0, 5, 0, 1) == draw_seed(0, 5, 0, 1) != draw_seed(0, 5, 0, 2)
    seeds = [draw_seed(0, 1, 0, j) for j in range(3)]
    sigmas, noise = sample_draws((2, 3), seeds, "uniform", shift=3.0)
    again, noise2 = sample_draws((2, 3), seeds[1:2], "uniform", shift=3.0)
    assert sigmas[1] == again[0] and torch.equal(noise[1], noise2[0])
    gen = torch.Generator().manual_seed(seeds[0])
    u = torch.rand(1, generator=gen)
    assert torch.allclose(sigmas[0], (3 * u / (1 + 2 * u))[0])
    many, _ = sample_draws((1,), list(range(400)), "logit_normal", shift=1.0)
    assert abs(float(many.mean()) - 0.5) < 0.05 and float(many.std()) < 0.25  # uniform has std 0.29


def test_flow_matching_loss_is_velocity_mse():
    class Echo(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict):
            self.seen = timestep
            return (hidden_states * self.w,)

    x0, noise = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    sigmas = torch.tensor([0.25, 0.75])
    model = Echo()
    loss = flow_matching_loss(model, x0, torch.zeros(2, 1, 1), sigmas, noise, 1000)
    s = sigmas.view(2, 1, 1)
    assert torch.allclose(loss, ((2 * ((1 - s) * x0 + s * noise) - (noise - x0)) ** 2).mean())
    assert torch.equal(model.seen, sigmas * 1000)


def test_flow_settings_read_the_scheduler():
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    assert flow_settings(FlowMatchEulerDiscreteScheduler(shift=3.0)) == (3.0, 1000)
    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    assert flow_settings(unipc) == (5.0, 1000) and flow_settings(unipc, 2.0) == (2.0, 1000)
    with pytest.raises(ValueError, match="not a flow-matching"):
        flow_settings(DDPMScheduler())


def test_training_calls_have_no_step_and_dense_steps_never_misfire(caplog):
    """Random per-sample timesteps in train mode: no step is counted, dense_steps is ignored (with a warning), and
    the next inference call starts a new generation."""
    model = tiny_transformer("wan").train()
    proc = RadialProcessor(block_size=16, dense_steps=1)
    inst = vidattn.apply(model, proc)
    with caplog.at_level(logging.WARNING, logger="vidattn"):
        for t in (900.0, 100.0, 500.0, 20.0):  # inference-style counting would see several generations here
            kwargs = tiny_transformer_inputs("wan", batch=2, timestep=t)
            kwargs["timestep"] = torch.tensor([t, 1000.0 - t])
            model(**kwargs)[0].mean().backward()
            assert inst.context.training and inst.context.step == -1
    assert proc.stats.dense_calls == 0 and proc.stats.sparse_calls == 8
    assert any("ignored" in r.message and "training" in r.message for r in caplog.records)
    model.eval()
    with torch.no_grad():
        model(**tiny_transformer_inputs("wan", timestep=999.0))
    assert not inst.context.training and inst.context.step == 0
    assert proc.stats.dense_reasons == {"dense step": 2}
    with inst.context.passing(training=True), torch.no_grad():  # a declared training pass, even without grads
        model(**tiny_transformer_inputs("wan", timestep=999.0))
    assert inst.context.step == -1 and proc.stats.dense_reasons == {"dense step": 2}
    vidattn.remove(model)


def _forward(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**tiny_transformer_inputs("wan", timestep=500.0))[0]


def test_apply_installs_through_compile_and_ddp_wrappers(tmp_path):
    import torch.distributed as dist

    model = tiny_transformer("wan")
    reference = vidattn.apply(model, RadialProcessor(block_size=16))
    expected = _forward(model)
    vidattn.remove(model)
    compiled = torch.compile(model)  # not run: the wrapper is what apply must see through
    inst = vidattn.apply(compiled, RadialProcessor(block_size=16))
    assert vidattn.installed(model) is inst
    vidattn.remove(compiled)
    assert vidattn.installed(model) is None
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        inst = vidattn.apply(torch.compile(ddp), RadialProcessor(block_size=16))
        assert vidattn.installed(model) is inst
        torch.testing.assert_close(_forward(ddp), expected, rtol=0, atol=0)
        assert inst.stats.sparse_calls == reference.stats.sparse_calls > 0
        vidattn.remove(ddp)
        assert vidattn.installed(model) is None
    finally:
        dist.destroy_process_group()


def test_latest_and_pruned_checkpoints(tmp_path):
    from vidattn.lora.checkpoint import latest_checkpoint, prune_checkpoints

    assert latest_checkpoint(tmp_path) is None
    for step in (5, 20, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-30.tmp").mkdir()  # an interrupted save is never a checkpoint
    assert latest_checkpoint(tmp_path).name == "checkpoint-20"
    prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-20", "checkpoint-30.tmp"]


@pytest.mark.parametrize("argv, option", [(["--methods", "dense,sparse"], "--methods"),
                                          (["--frame-scales", "1,0"], "--frame-scales"),
                                          (["--model", "tinyy"], "--model"), (["--height", "40"], "--height")])
def test_bench_train_checks_name_the_option(argv, option, capsys):
    from vidattn.cli import main

    assert main(["bench", "train", "--model", "tiny", *argv]) == 2
    assert capsys.readouterr().err.startswith(f"vidattn bench train: error: argument {option}:")


def test_step_log_keeps_records_up_to_the_resumed_step_and_plots(tmp_path):
    from PIL import Image

    from vidattn.lora.report import StepLog, _plot_without_matplotlib, plot_loss, read_log

    log = StepLog(tmp_path)
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step})
    StepLog(tmp_path, resume_step=3)  # a resumed run drops what came after its checkpoint
    assert [r["step"] for r in read_log(tmp_path / "log.jsonl")] == [1, 2, 3]
    for draw, name in ((lambda out: plot_loss(tmp_path / "log.jsonl", out)), "a.png"), (
            (lambda out: _plot_without_matplotlib([1.0, 0.5, 0.3], out)), "b.png"):
        with Image.open(draw(tmp_path / name)) as image:
            assert image.format == "PNG" and image.size[0] >= 600


def test_jsonl_caption_that_is_not_text_is_named_as_such(tmp_path):
    _clip(tmp_path, "a", 5, caption=None)
    rows = [{"path": "a.mp4", "caption": 5}, {"path": "a.mp4", "caption": None}, {"path": "a.mp4", "caption": " "}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = discover(tmp_path / "m.jsonl")
    assert not found.clips
    assert [why for _, why in found.skipped] == ["caption must be text, got int 5", "no caption", "empty caption"]


def test_cache_rebuild_clears_only_its_own_files(tmp_path):
    from vidattn.lora.cache import build_cache, foreign_files

    settings = cache_settings({"name": "tiny"}, [], 5, 16, 16, 1, 16)
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "index.json").write_text(json.dumps({"settings": {"version": 1, "frames": 9}, "samples": []}))
    (stale / "shard-00000.safetensors").write_bytes(b"old")
    (stale / "notes.md").write_text("mine")
    assert foreign_files(stale) == [] and not valid_cache(stale, settings)
    build_cache(None, [], settings, stale, torch.device("cpu"), progress=False)
    assert valid_cache(stale, settings)
    assert sorted(p.name for p in stale.iterdir()) == ["index.json", "notes.md"]
    assert (stale / "notes.md").read_text() == "mine"
    interrupted = tmp_path / "interrupted"  # shards but no index yet: a cache build's own leftovers
    interrupted.mkdir()
    (interrupted / "shard-00000.safetensors").write_bytes(b"old")
    assert foreign_files(interrupted) == []
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "index.json").write_text("{}")  # someone else's index
    (foreign / "clip.mp4").write_bytes(b"x")
    assert foreign_files(foreign) == ["clip.mp4", "index.json"]
    with pytest.raises(ValueError, match="not a vidattn cache"):
        build_cache(None, [], settings, foreign, torch.device("cpu"), progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["clip.mp4", "index.json"]


def test_training_process_group_timeout_is_generous():
    from datetime import timedelta

    from vidattn.lora.config import TrainConfig
    from vidattn.lora.train import _accelerator

    accelerator = _accelerator(TrainConfig(data="d", output_dir="o"), "cpu")
    assert accelerator.init_handler.timeout >= timedelta(hours=2)
