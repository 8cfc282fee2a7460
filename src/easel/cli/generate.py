"""``easel generate``: a prompt to files, on a server or embedded in this process."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Annotated, Any

import typer

from easel.cli._display import job_display, starting_text
from easel.cli._output import AsJson, Server, Token, emit, errors, exit_for, usage
from easel.cli.serve import Backend, Model
from easel.jobs import JobState


def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    server: Server = None,
    token: Token = None,
    backend: Backend = None,
    model: Model = None,
    width: int = 512,
    height: int = 512,
    steps: int = 20,
    seed: int | None = None,
    negative_prompt: str | None = None,
    cfg_scale: float | None = None,
    scheduler: str | None = None,
    batch_size: int = 1,
    strength: Annotated[float | None, typer.Option(help="img2img: how much to change.")] = None,
    init_image: Annotated[
        Path | None, typer.Option(exists=True, dir_okay=False, help="img2img: the start image.")
    ] = None,
    output_dir: Annotated[
        Path, typer.Option(help="Where results and sidecars go (made if missing).")
    ] = Path("outputs"),
    user_id: str | None = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Embedded runs only [default: a temporary directory]")
    ] = None,
    audio: Annotated[
        bool, typer.Option("--audio", help="Make sound from the prompt (txt2audio).")
    ] = False,
    speech: Annotated[
        bool, typer.Option("--speech", help="Speak the prompt (txt2speech).")
    ] = False,
    duration: Annotated[
        float | None, typer.Option(help="--audio: seconds of sound [default: 10]")
    ] = None,
    voice: Annotated[str | None, typer.Option(help="--speech: a voice the backend has.")] = None,
    speed: Annotated[float | None, typer.Option(help="--speech: 1.0 is normal.")] = None,
    sample_rate: Annotated[int | None, typer.Option(help="Audio samples per second.")] = None,
    channels: Annotated[int | None, typer.Option(help="Audio: 1 (mono) or 2 (stereo).")] = None,
    audio_format: Annotated[
        str | None, typer.Option(help="Audio: wav, flac, ogg, opus or mp3 [default: wav]")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Generate images (or, with --audio or --speech, sound): on a server with --server,
    else right here (no server needed).

    Prints the path of each result and of its JSON sidecar (what reproduces it).

    Example: easel generate "a red fox" --steps 30 --seed 1 --server http://127.0.0.1:8000
    """
    from easel.quick import generate_files

    if audio and speech:
        usage("choose --audio or --speech, not both")

    given: dict[str, Any] = {
        "prompt": prompt,
        "width": width,
        "height": height,
        "steps": steps,
        "seed": seed,
        "negative_prompt": negative_prompt,
        "cfg_scale": cfg_scale,
        "scheduler": scheduler,
        "batch_size": batch_size,
        "strength": strength,
        "user_id": user_id,
    }
    if audio or speech:
        for name in ("width", "height"):
            del given[name]
        given |= {
            "kind": "txt2speech" if speech else "txt2audio",
            "duration_seconds": duration,
            "voice": voice,
            "speed": speed,
            "sample_rate": sample_rate,
            "channels": channels,
            "audio_format": audio_format,
        }
        if speech:
            given["steps"] = None
    params = {key: value for key, value in given.items() if value is not None}
    if init_image is not None:
        params["init_image"] = base64.b64encode(init_image.read_bytes()).decode()
    with errors():
        output_dir.mkdir(parents=True, exist_ok=True)
    with errors(), job_display("generate", 1, starting_text(server, model)) as on_event:
        job, paths = asyncio.run(
            generate_files(
                params,
                output_dir,
                server=server,
                backend=backend,
                model=model,
                data_dir=data_dir,
                token=token,
                on_event=on_event,
            )
        )
    if as_json:
        files = [{"file": str(p), "sidecar": str(p.with_suffix(".json"))} for p in paths]
        emit({"job_id": job.id, "state": job.state.value, "files": files, "error": job.error})
    elif job.state is JobState.succeeded:
        for path in paths:
            typer.echo(path)
            typer.echo(path.with_suffix(".json"))
    exit_for([job])
