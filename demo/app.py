"""The Gradio page: a form generated from the method registry, Generate and Compare buttons, the results.

One generation at a time per device: both buttons share one queue slot (``concurrency_id="device"``, limit 1), so
a second request waits with its queue position shown; every problem reaches the page as one line (``gr.Error``),
never as a traceback.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from vidattn.methods import METHODS

from .engine import DemoError, Pipelines, Request, check_request, generate, user_message
from .form import NO_PRESET, KnobField, fields_by_method, parse_knobs, preset_values

__all__ = ["build_app", "DEFAULT_METHOD"]

logger = logging.getLogger("vidattn.demo")
DEFAULT_METHOD = "radial"
SETTINGS = ("frames", "height", "width", "steps", "seed", "guidance", "layer", "head")


def _field(gr: Any, field: KnobField) -> Any:
    """The Gradio component of one knob."""
    elem_id = f"knob-{field.method}-{field.name}"
    if field.kind == "bool":
        return gr.Checkbox(value=bool(field.default), label=field.label, elem_id=elem_id)
    if field.kind == "choice":
        choices = ([""] if field.optional else []) + list(field.choices)
        return gr.Dropdown(choices=choices, value=field.default or "", label=field.label, elem_id=elem_id)
    if field.kind in ("int", "float") and not field.optional:
        return gr.Number(value=field.default, label=field.label, precision=0 if field.kind == "int" else None,
                         elem_id=elem_id)
    return gr.Textbox(value="" if field.default is None else str(field.default), label=field.label, elem_id=elem_id,
                      placeholder="empty: the model's default")


def _stats_text(outcome: Any, method: str) -> str:
    s, summary = outcome.settings, outcome.summary
    density = summary.get("computed_fraction")
    attention = ("not timed on this device" if outcome.attention_seconds is None
                 else f"{outcome.attention_seconds:.2f} s")
    return (f"**{method}**: {s['frames']} frames x {s['height']} x {s['width']} px, {s['steps']} steps\n\n"
            f"- wall time: {outcome.seconds:.2f} s\n- time in attention: {attention}\n"
            f"- average attention density: {'n/a' if density is None else f'{density:.3f}'} of dense "
            f"({summary['sparse_calls']} sparse / {summary['dense_calls']} dense calls)")


def _whole(name: str, value: Any) -> Optional[int]:
    """A form number that must be whole (``None`` when empty); DemoError naming the field otherwise."""
    if value in (None, ""):
        return None
    if float(value) != int(float(value)):
        raise DemoError(f"{name.capitalize()}: must be a whole number, got {value}")
    return int(float(value))


class DemoApp:
    """The handlers behind the page (one :class:`Pipelines` cache, one output folder)."""

    def __init__(self, pipelines: Pipelines, out_dir: Path) -> None:
        self.pipelines, self.out_dir = pipelines, out_dir
        self.fields = fields_by_method()
        self.order = [f for fields in self.fields.values() for f in fields]

    def request(self, values: Sequence[Any]) -> Request:
        """The :class:`Request` from the flat input values (base fields, settings, then every method's knobs)."""
        prompt, negative, model, method, preset, *rest = values
        settings = dict(zip(SETTINGS, rest[:len(SETTINGS)]))
        knob_values = dict(zip(self.order, rest[len(SETTINGS):]))
        mine = [knob_values[f] for f in self.fields.get(method, [])]
        try:
            knobs = parse_knobs(method, mine) if method in self.fields else {}
        except (ValueError, TypeError) as err:
            raise DemoError(f"Knobs: {user_message(err)}") from None
        ints = {k: _whole(k, settings[k]) for k in SETTINGS if k != "guidance"}
        guidance = None if settings["guidance"] in (None, "") else float(settings["guidance"])
        return Request(prompt=prompt or "", negative_prompt=negative or "", model=(model or "").strip(),
                       method=method, preset=None if preset in (None, "", NO_PRESET) else preset, knobs=knobs,
                       guidance=guidance, seed=ints["seed"] or 0, layer=ints["layer"] or 0, head=ints["head"] or 0,
                       **{k: ints[k] for k in ("frames", "height", "width", "steps")})

    def _run(self, work: Any, progress: Any) -> Any:
        import gradio as gr

        report = None if progress is None else (lambda done, total, desc: progress((done, max(total, 1)), desc=desc))
        try:
            return work(report)
        except DemoError as err:
            raise gr.Error(str(err), duration=None, print_exception=False) from None
        except Exception as err:  # noqa: BLE001 - the page gets one line; the console keeps the traceback
            logger.exception("vidattn demo: generation failed")
            raise gr.Error(user_message(err), duration=None, print_exception=False) from None

    def on_generate(self, *values: Any, progress: Any = None) -> tuple:
        def work(report: Any) -> tuple:
            request = self.request(values)
            outcome = generate(check_request(request), self.pipelines, self.out_dir, report)
            return (str(outcome.video), _stats_text(outcome, request.method), outcome.mask, outcome.mask_note,
                    self._layers(outcome.layer_densities))
        return self._run(work, progress)

    def on_compare(self, *values: Any, progress: Any = None) -> tuple:
        from .compare import compare

        def work(report: Any) -> tuple:
            request = self.request(values)
            result = compare(check_request(request), self.pipelines, self.out_dir, report)
            text = (f"**speedup** {result.speedup:.2f}x (dense {result.dense.seconds:.2f} s, {request.method} "
                    f"{result.method.seconds:.2f} s) · **PSNR** {result.psnr:.2f} dB · **SSIM** {result.ssim:.4f}"
                    f" (between the two videos)")
            return str(result.dense.video), str(result.method.video), text, result.difference
        return self._run(work, progress)

    @staticmethod
    def _layers(densities: list) -> Optional[Any]:
        from vidattn.pictures import layer_density_figure, render

        return render(layer_density_figure(densities)) if densities else None


def build_app(device: Optional[str] = None, dtype: Optional[str] = None, out_dir: Optional[Path] = None,
              model: str = "tiny") -> Any:
    """The Gradio ``Blocks`` of the demo (not launched). ``device`` defaults to CUDA when available; ``dtype``
    to bfloat16 on CUDA and float32 on CPU; videos go to ``out_dir`` (a new temporary folder by default)."""
    import gradio as gr
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = torch.device(device).type == "cuda"
    torch_dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if on_cuda else torch.float32)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="vidattn-demo-"))
    app = DemoApp(Pipelines(device, torch_dtype), out)
    with gr.Blocks(title="vidattn demo", analytics_enabled=False) as blocks:
        gr.Markdown("# vidattn: sparse attention for video diffusion\nGenerate with any registered method, "
                    "compare it against dense attention from the same seed, and see its attention pattern.")
        with gr.Row():
            with gr.Column(scale=1):
                inputs, method = _form(gr, app, model)
                with gr.Row():
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    both = gr.Button("Compare with dense", elem_id="compare")
            with gr.Column(scale=2):
                outputs = _results(gr)
        def on_generate(*values: Any, progress: Any = gr.Progress()) -> tuple:
            return app.on_generate(*values, progress=progress)

        def on_compare(*values: Any, progress: Any = gr.Progress()) -> tuple:
            return app.on_compare(*values, progress=progress)

        common = dict(concurrency_limit=1, concurrency_id="device")
        run.click(on_generate, inputs, outputs["generate"], api_name="generate", **common)
        both.click(on_compare, inputs, outputs["compare"], api_name="compare", **common)
    blocks.queue(default_concurrency_limit=1)
    blocks.vidattn = app
    return blocks


def _form(gr: Any, app: DemoApp, model: str) -> tuple[list, Any]:
    """The input components (flat, in :meth:`DemoApp.request`'s order) and the method dropdown."""
    prompt = gr.Textbox(value="a red fox running through fresh snow", label="Prompt", elem_id="prompt")
    negative = gr.Textbox(value="", label="Negative prompt", elem_id="negative")
    model_box = gr.Textbox(value=model, label="Model: 'tiny' (offline), a hub id or a local diffusers folder",
                           elem_id="model")
    names = list(app.fields)
    start = DEFAULT_METHOD if DEFAULT_METHOD in names else names[0]
    method = gr.Dropdown(choices=names, value=start, label="Method", elem_id="method", info=METHODS[start].help)
    preset = gr.Dropdown(choices=[NO_PRESET, *METHODS[start].presets], value=NO_PRESET, label="Preset",
                         elem_id="preset")
    groups, knob_boxes = {}, {}
    for name, fields in app.fields.items():
        with gr.Group(visible=name == start) as group:
            knob_boxes[name] = [_field(gr, f) for f in fields]
        groups[name] = group
    from vidattn.validation import check_model

    defaults = check_model(model).defaults  # the starting model's own settings (read, not loaded)
    with gr.Row():
        settings = [gr.Number(value=defaults.get(key), label=label, precision=0, elem_id=elem)
                    for key, label, elem in (("num_frames", "Frames", "frames"), ("height", "Height", "height"),
                                             ("width", "Width", "width"), ("num_inference_steps", "Steps", "steps"))]
    with gr.Row():
        settings.append(gr.Number(value=0, label="Seed", precision=0, elem_id="seed"))
        settings.append(gr.Number(value=defaults.get("guidance_scale"), label="Guidance", elem_id="guidance"))
        settings.append(gr.Number(value=0, label="Mask layer", precision=0, elem_id="layer"))
        settings.append(gr.Number(value=0, label="Mask head", precision=0, elem_id="head"))

    def switch(chosen: str) -> list:
        return [gr.update(info=METHODS[chosen].help),
                gr.update(choices=[NO_PRESET, *METHODS[chosen].presets], value=NO_PRESET),
                *[gr.update(visible=n == chosen) for n in groups]]

    method.change(switch, method, [method, preset, *groups.values()], queue=False)
    all_knobs = [box for boxes in knob_boxes.values() for box in boxes]

    def fill(chosen: str, picked: str) -> list:
        values = dict(zip(knob_boxes[chosen], preset_values(chosen, picked)))
        return [gr.update(value=values[box]) if box in values else gr.update() for box in all_knobs]

    preset.change(fill, [method, preset], all_knobs, queue=False)
    return [prompt, negative, model_box, method, preset, *settings, *all_knobs], method


def _results(gr: Any) -> dict:
    """The output components of both buttons."""
    gr.Markdown("## Result")
    video = gr.Video(label="Video", elem_id="video", autoplay=False, height=320)
    stats = gr.Markdown(elem_id="stats")
    mask = gr.Image(label="Block mask of the chosen layer and head", elem_id="mask", type="numpy", show_label=False)
    note = gr.Markdown(elem_id="mask-note")
    layers = gr.Image(label="Attention density per layer", elem_id="layers", type="numpy", show_label=False)
    gr.Markdown("## Compare with dense")
    with gr.Row():
        dense = gr.Video(label="Dense", elem_id="dense-video", height=280)
        sparse = gr.Video(label="Method", elem_id="method-video", height=280)
    numbers = gr.Markdown(elem_id="compare-stats")
    diff = gr.Image(label="Difference of one frame", elem_id="difference", type="numpy", height=360, show_label=False)
    return {"generate": [video, stats, mask, note, layers], "compare": [dense, sparse, numbers, diff]}
