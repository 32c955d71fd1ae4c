"""The Gradio demo page: a thin form over :class:`sdtrt.client.Client` (no model code here).

Controls and their ranges come from the served model's spec, so the page always offers what the server takes.
Generated PNGs carry the A1111 infotext and are also saved under outputs/txt2img-images/, as A1111 does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sdtrt.client.client import Client, ServerError
from sdtrt.errors import InvalidRequest
from sdtrt.outputs import save_png

TITLE = "sdtrt: Stable Diffusion on Triton"


def _slider(gr, spec, name: str, label: str, step: float | None = None, maximum: float | None = None, **kw):
    field = spec.field(name)
    return gr.Slider(minimum=field.minimum, maximum=maximum if maximum is not None else field.maximum,
                     value=field.default, step=step or field.multiple_of or 1, label=label, **kw)


def build_ui(client: Client, outputs: Path = Path("outputs")):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    spec = client.spec  # the default model's ranges and defaults shape the controls
    titles = {s.title: key for key, s in client.catalog.models.items()}
    title = spec.title
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"## {TITLE}\nServer `{client.url}` ({client.protocol}), model **{title}**")
        # The checkpoint picker shows when the server has several models (`sdtrt models`).
        checkpoint = gr.Dropdown(choices=list(titles), value=title, label="Stable Diffusion checkpoint",
                                 visible=len(titles) > 1)
        last_seeds = gr.State([])
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=3, placeholder="a lighthouse on a cliff, (oil painting:1.2)")
                negative = gr.Textbox(label="Negative prompt", lines=2)
            generate = gr.Button("Generate", variant="primary", scale=1)
        with gr.Row():
            with gr.Column():
                with gr.Row():
                    sampler = gr.Dropdown(choices=list(spec.field("sampler").choices), value=spec.field("sampler").default,
                                          label="Sampling method")
                    schedule = gr.Dropdown(choices=list(spec.field("schedule_type").choices),
                                           value=spec.field("schedule_type").default, label="Schedule type")
                steps = _slider(gr, spec, "steps", "Sampling steps")
                width = _slider(gr, spec, "width", "Width")
                height = _slider(gr, spec, "height", "Height")
                batch = _slider(gr, spec, "batch_size", "Batch size")
                cfg = _slider(gr, spec, "guidance_scale", "CFG Scale", step=0.5)
                with gr.Row():
                    seed = gr.Number(value=-1, label="Seed", precision=0, minimum=-1, scale=4)
                    random_seed = gr.Button("Random seed", scale=1)
                    reuse_seed = gr.Button("Reuse last seed", scale=1)
            with gr.Column():
                gallery = gr.Gallery(label="Output", columns=2, height="auto", format="png")
                info = gr.Textbox(label="Generation parameters (A1111 infotext)", lines=4, interactive=False)

        def run(model_title, prompt_text, negative_text, sampler_name, schedule_type, steps_n, width_px, height_px,
                batch_n, cfg_scale, seed_value, progress=gr.Progress()):
            progress(0, desc="waiting for the server")
            try:
                result = client.txt2img(prompt_text, model=titles.get(model_title), negative_prompt=negative_text,
                                        sampler=sampler_name,
                                        schedule_type=schedule_type, steps=int(steps_n), width=int(width_px),
                                        height=int(height_px), batch_size=int(batch_n), guidance_scale=float(cfg_scale),
                                        seed=int(seed_value))
            except (InvalidRequest, ServerError) as exc:
                raise gr.Error(str(exc)) from None
            files = [str(save_png(image, s, text, outputs / "txt2img-images"))
                     for image, s, text in zip(result.images, result.seeds, result.infotexts)]
            return [(f, f"seed {s}") for f, s in zip(files, result.seeds)], result.infotexts[0], result.seeds

        inputs = [checkpoint, prompt, negative, sampler, schedule, steps, width, height, batch, cfg, seed]
        generate.click(run, inputs=inputs, outputs=[gallery, info, last_seeds])
        prompt.submit(run, inputs=inputs, outputs=[gallery, info, last_seeds])
        random_seed.click(lambda: -1, outputs=seed)
        reuse_seed.click(lambda seeds: seeds[0] if seeds else -1, inputs=last_seeds, outputs=seed)

        def show_info(_images: Any, evt: gr.SelectData) -> Any:
            """The infotext of the picture clicked in the gallery (read back from its PNG)."""
            from sdtrt.outputs import read_infotext

            value = evt.value if isinstance(evt.value, dict) else {}
            path = (value.get("image") or {}).get("path")
            return read_infotext(path) if path else gr.update()

        gallery.select(show_info, inputs=gallery, outputs=info)
    return demo


def offline_theme():
    """Gradio's default theme with system fonts: the stock one fetches Google Fonts, which offline and
    air-gapped deployments cannot reach (the page then waits on them)."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def serve_ui(client: Client, host: str, port: int, outputs: Path = Path("outputs"),
             auth: dict[str, str] | None = None) -> None:
    """Serve the page; with ``auth`` (user -> password) it asks for a login first (Gradio's, as A1111's
    ``--gradio-auth``)."""
    demo = build_ui(client, outputs)
    demo.queue(default_concurrency_limit=4).launch(server_name=host, server_port=port, share=False,
                                                   theme=offline_theme(), allowed_paths=[str(outputs.resolve())],
                                                   auth=list(auth.items()) if auth else None)
