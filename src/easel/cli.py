"""easel's command line: ``serve``, ``worker``, ``generate``, ``models``, ``jobs``, ``backends``.

Commands are thin: generation goes through :mod:`easel.client` (a server, or easel embedded
in this process), so the CLI shows progress and files and nothing else. Errors print their
code and message and exit 1; they never end in a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from easel.errors import EaselError
from easel.jobs import Event, EventType, JobState
from easel.projects.cli import project_app, reproduce
from easel.runtime import logs

if TYPE_CHECKING:
    from easel.config import Settings

DEFAULT_SERVER = "http://127.0.0.1:8000"

app = typer.Typer(
    name="easel",
    help="A self-hosted generation server: one fair queue, many backends, many clients.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
models_app = typer.Typer(
    help="Models: list what is served, build a tiny one.", no_args_is_help=True
)
jobs_app = typer.Typer(help="Jobs on a server: list, show, cancel.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(jobs_app, name="jobs")
app.add_typer(project_app, name="project")
app.command("reproduce")(reproduce)

console = Console(stderr=True, highlight=False)
log = logging.getLogger("easel")

Server = Annotated[
    str | None,
    typer.Option(envvar="EASEL_SERVER", help="Base URL of an easel server, e.g. " + DEFAULT_SERVER),
]
RemoteServer = Annotated[
    str, typer.Option(envvar="EASEL_SERVER", help="Base URL of the easel server.")
]
Backend = Annotated[str | None, typer.Option(help="Backend name, e.g. mock or diffusers.")]
Model = Annotated[str | None, typer.Option(help="A local diffusers model folder.")]
ConfigFile = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar="EASEL_CONFIG",
        help="A TOML settings file, e.g. easel.toml with [[backends]] (the fleet).",
    ),
]
RedisUrl = Annotated[
    str | None,
    typer.Option(
        "--redis",
        envvar="EASEL_REDIS_URL",
        help="redis://host:port/db: share one queue with other easel processes.",
    ),
]


@contextmanager
def _errors() -> Iterator[None]:
    """EaselErrors (4xx answers, failed jobs, an unreachable server) become exit code 1."""
    try:
        yield
    except EaselError as exc:
        _fail(exc.code, exc.message)


def _fail(code: str, message: str) -> NoReturn:
    console.print(f"[bold red]error[/] {escape(code)}: {escape(message)}")
    raise typer.Exit(1)


# -- serve --------------------------------------------------------------------------------


def _settings(config: Path | None, given: dict[str, Any]) -> Settings:
    """Defaults < the file < ``EASEL_*`` < options given; a bad file exits with its
    problems (file, key path, what is wrong), never a traceback."""
    from easel.backends import available
    from easel.backends.base import Capability
    from easel.fleet import FleetFileError, fleet_of, load_settings

    try:
        settings = load_settings(
            config,
            kinds=available(),
            capabilities=[capability.value for capability in Capability],
            **{key: value for key, value in given.items() if value is not None},
        )
        if settings.only and not settings.backends:
            raise FleetFileError(config, ["--only needs a fleet file with [[backends]]"])
        fleet_of(settings)  # --only names entries of the file
    except FleetFileError as exc:
        where = escape(str(exc.path or "settings"))
        console.print(f"[bold red]error[/] config_invalid: {where}", soft_wrap=True)
        for problem in exc.problems:
            console.print(f"  {escape(problem)}", soft_wrap=True)
        raise typer.Exit(2) from None
    if not settings.backends and settings.resolved_backend not in available():
        _fail(
            "invalid_request",
            f"unknown backend {settings.resolved_backend!r}; "
            f"available backends are: {', '.join(available())}",
        )
    _check_devices(settings)
    _preflight(settings)
    return settings


def _preflight(settings: Settings) -> None:
    """A single local backend's model checked before serving (a missing model, a pickled
    checkpoint): one line and exit 2 rather than a traceback from the server's startup."""
    if settings.backends or not settings.resolved_backend.startswith("diffusers"):
        return
    from easel.runtime.compose import backends_from

    try:
        for backend in backends_from(settings).values():
            check = getattr(backend, "preflight", None)
            if check is not None:
                check()
    except EaselError as exc:
        console.print(f"[bold red]error[/] {escape(exc.code)}: {escape(exc.message)}")
        raise typer.Exit(2) from None


def _check_devices(settings: Settings) -> None:
    """Devices of local diffusers backends exist on this machine, or exit 2 saying which do."""
    wanted = []
    if not settings.backends and settings.resolved_backend.startswith("diffusers"):
        wanted.append(("device", settings.device))
    for index, spec in enumerate(settings.backends):
        device = spec.options.get("device")
        if spec.kind.startswith("diffusers") and isinstance(device, str):
            wanted.append((f"backends[{index}].options.device", device))
    if all(device in ("auto", "cpu") for _, device in wanted):
        return  # nothing to ask torch about
    try:
        from easel.backends.diffusers.devices import check_device
    except ImportError:  # the backend says what to install when it starts
        return
    for where, device in wanted:
        try:
            check_device(device)
        except ImportError:
            return
        except EaselError as exc:
            console.print(f"[bold red]error[/] invalid_device: {where}: {escape(exc.message)}")
            raise typer.Exit(2) from None


def _configure_logging(settings: Settings) -> None:
    logs.configure(settings.log_format)


def serving_line(settings: Settings) -> str:
    """What this process serves; the first thing ``easel serve`` logs."""
    if settings.backends:
        fleet = ", ".join(f"{s.name} ({s.kind}, {s.slots} slots)" for s in settings.backends)
        return f"serving a fleet of {len(settings.backends)} backends: {fleet}"
    backend = settings.resolved_backend
    if settings.model is None:
        return (
            f"serving backend {backend!r} "
            "(no model configured; pass --model DIR to run a diffusers model)"
        )
    return f"serving backend {backend!r} with model {settings.model} on device {settings.device}"


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="[default: 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(help="[default: 8000]")] = None,
    backend: Backend = None,
    model: Model = None,
    data_dir: Annotated[Path | None, typer.Option(help="[default: easel-data]")] = None,
    output_dir: Annotated[Path | None, typer.Option(help="[default: DATA_DIR/outputs]")] = None,
    db_path: Annotated[Path | None, typer.Option(help="[default: DATA_DIR/easel.db]")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, mps [default: auto]")] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(min=0, help="Jobs run at once per backend; 0: API only [default: 1]"),
    ] = None,
    grpc_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            envvar="EASEL_GRPC_PORT",
            help="Also serve Draw Things' gRPC service on this port (Draw Things uses 7859) "
            "[default: no gRPC]",
        ),
    ] = None,
    grpc_tls_cert: Annotated[
        Path | None,
        typer.Option(help="PEM certificate chain: the gRPC port speaks TLS (with --grpc-tls-key)"),
    ] = None,
    grpc_tls_key: Annotated[
        Path | None, typer.Option(help="PEM private key of --grpc-tls-cert")
    ] = None,
    redis: RedisUrl = None,
    config: ConfigFile = None,
) -> None:
    """Run the server: HTTP API, queue and workers in one process.

    Options override EASEL_* environment variables, which override the defaults.
    """
    import uvicorn

    from easel.api import create_app

    given: dict[str, Any] = {
        "host": host,
        "port": port,
        "backend": backend,
        "model": model,
        "data_dir": data_dir,
        "output_dir": output_dir,
        "db_path": db_path,
        "device": device,
        "concurrency": concurrency,
        "redis_url": redis,
    }
    if (grpc_tls_cert is None) != (grpc_tls_key is None):
        raise typer.BadParameter("--grpc-tls-cert and --grpc-tls-key go together")
    tls = (grpc_tls_cert, grpc_tls_key) if grpc_tls_cert and grpc_tls_key else None
    settings = _settings(config, given)
    if settings.redis_url is None:  # one process owns a SQLite queue: refuse before starting
        from easel.store.sqlite import own

        with _errors():
            own(settings.resolved_db_path)
    _configure_logging(settings)
    log.info(serving_line(settings))
    uvicorn.run(
        create_app(settings, grpc_port=grpc_port, grpc_tls=tls),
        host=settings.host,
        port=settings.port,
        ws="websockets-sansio",
        ws_per_message_deflate=False,  # events are small JSON: compressing costs more than it saves
        access_log=False,  # easel logs jobs; a line per request costs ~5% of admission
        log_config=None,
    )


@app.command()
def worker(
    redis: RedisUrl = None,
    backend: Backend = None,
    model: Model = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, mps [default: auto]")] = None,
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="Jobs run at once [default: 1]")
    ] = None,
    output_dir: Annotated[
        Path | None, typer.Option(help="Shared with the API processes [default: DATA_DIR/outputs]")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="[default: easel-data]")] = None,
    heartbeat_seconds: Annotated[
        float | None, typer.Option(min=0.01, help="Lease heartbeat [default: 5]")
    ] = None,
    lease_seconds: Annotated[
        float | None,
        typer.Option(
            min=0.01, help="A silent worker's job goes back after this [default: 1.2 x heartbeat]"
        ),
    ] = None,
    grace_seconds: Annotated[
        float | None, typer.Option(min=0, help="On SIGTERM, time for running jobs [default: 30]")
    ] = None,
    config: ConfigFile = None,
    only: Annotated[
        str | None,
        typer.Option(help="Run only these backends of the fleet file, e.g. gpu0,gpu1."),
    ] = None,
) -> None:
    """Run jobs from a shared Redis queue: no HTTP, one process per GPU host (or per GPU).

    SIGTERM stops claiming at once; running jobs get the grace period, then go back to the
    queue without spending an attempt.
    """
    from easel.runtime.process import run_worker_process

    given: dict[str, Any] = {
        "redis_url": redis,
        "backend": backend,
        "model": model,
        "device": device,
        "concurrency": concurrency,
        "output_dir": output_dir,
        "data_dir": data_dir,
        "heartbeat_seconds": heartbeat_seconds,
        "lease_seconds": lease_seconds,
        "shutdown_grace_seconds": grace_seconds,
        "only": [name.strip() for name in only.split(",") if name.strip()] if only else None,
    }
    settings = _settings(config, given)
    if settings.redis_url is None:
        _fail("invalid_request", "easel worker needs --redis URL (or EASEL_REDIS_URL)")
    if "lease_seconds" not in settings.model_fields_set:
        # leases of 1.2 heartbeats, reaped every half lease: a hung worker's job is back
        # in the queue within 1.8 heartbeats of its last one
        settings = settings.model_copy(update={"lease_seconds": settings.heartbeat_seconds * 1.2})
    _configure_logging(settings)
    log.info(serving_line(settings).replace("serving", "worker for", 1))
    asyncio.run(run_worker_process(settings))


# -- generate -----------------------------------------------------------------------------


@contextmanager
def _progress_bar() -> Iterator[Callable[[Event], None]]:
    """A rich progress bar fed by the job's events; yields the event callback."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("submitting", total=None)

        def on_event(event: Event) -> None:
            if event.type is EventType.queued:
                where = f" (position {event.position})" if event.position is not None else ""
                progress.update(task, description=f"queued{where}")
            elif event.type is EventType.started:
                progress.update(task, description="generating")
            elif event.type is EventType.progress:
                progress.update(task, completed=event.step, total=event.total)
            else:
                progress.update(task, description=event.type.value)

        yield on_event


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    server: Server = None,
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
) -> None:
    """Generate images (or, with --audio or --speech, sound): on a server with --server,
    else right here (no server needed).

    Prints the path of each result and of its JSON sidecar (what reproduces it).
    """
    from easel.quick import generate_files

    if audio and speech:
        _fail("invalid_request", "choose --audio or --speech, not both")

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
    output_dir.mkdir(parents=True, exist_ok=True)
    with _errors(), _progress_bar() as on_event:
        job, paths = asyncio.run(
            generate_files(
                params,
                output_dir,
                server=server,
                backend=backend,
                model=model,
                data_dir=data_dir,
                on_event=on_event,
            )
        )
    if job.state is not JobState.succeeded:
        error = job.error
        _fail(error.code if error else job.state.value, error.message if error else "no images")
    for path in paths:
        typer.echo(path)
        typer.echo(path.with_suffix(".json"))


# -- models -------------------------------------------------------------------------------


@models_app.command("make-tiny")
def make_tiny(
    directory: Annotated[Path, typer.Argument(help="Where to write the diffusers folder.")],
    family: Annotated[
        str,
        typer.Option(
            help="sd, sdxl, sd3, flux, flux-dev, kandinsky22, kandinsky3 or stable-audio."
        ),
    ] = "sd",
) -> None:
    """Build a tiny random pipeline of a model family: real code paths, noise for images."""
    try:
        from easel.tiny import make_tiny_pipeline
    except ImportError as exc:
        _fail("missing_dependency", f"{exc}; install easel[diffusers]")
    with _errors():
        typer.echo(make_tiny_pipeline(directory, family=family))


@models_app.command("list")
def list_models(
    server: Server = None,
    models_dir: Annotated[
        Path | None, typer.Option(envvar="EASEL_MODELS_DIR", help="A folder of models.")
    ] = None,
) -> None:
    """What a server serves; without --server, the models found on this machine.

    Columns: kind, name, family, base model, size, state (loaded / on disk), description and
    what it was merged from (``NAME.json`` beside the model).
    """
    table = Table(
        "backend", "kind", "model", "family", "base model", "size", "state", "description",
        "merged from",
    )  # fmt: skip
    rows: list[tuple[str, ...]] = []
    if server is None:
        from easel.backends.diffusers.models import ModelRegistry

        registry = ModelRegistry(models_dir)
        for entry in sorted(registry.entries(), key=lambda e: (e.kind, e.name)):
            rows.append(
                (
                    "diffusers", entry.kind, entry.name, entry.family, entry.base_model or "",
                    _size(entry.size_bytes), "on disk", entry.description or "",
                    ", ".join(entry.merged_from),
                )
            )  # fmt: skip
    else:
        from easel.client import Client

        with _errors(), Client(server) as client:
            listing = client.models()
        for model in listing.models:
            rows.append(
                (
                    model.backend, model.kind, model.name, model.family, model.base_model or "",
                    _size(model.size_bytes), model.state.replace("_", " "),
                    model.description or "", ", ".join(model.merged_from),
                )
            )  # fmt: skip
    if not rows:
        where = f"server {server}" if server else f"models dir {models_dir or '(none given)'}"
        console.print(
            f"no models found ({where}); put diffusers folders or .safetensors checkpoints in "
            "a models dir and pass --models-dir, or build one: easel models make-tiny DIR"
        )
        return
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    Console().print(table)


@app.command("backends")
def list_backends(server: RemoteServer = DEFAULT_SERVER) -> None:
    """The fleet of a server: each backend's kind, state, slots, loaded models and speed."""
    from easel.client import Client

    with _errors(), Client(server) as client:
        listing = client.backends()
    table = Table(
        "backend", "kind", "state", "where", "slots", "models (loaded*)", "tags", "queued",
        "speed", "last error",
    )  # fmt: skip
    for b in listing.backends:
        models = ", ".join(m + ("*" if m in b.loaded_models else "") for m in b.models)
        table.add_row(
            b.name, b.kind, b.state, b.where, f"{b.slots_in_use}/{b.slots}", models,
            ", ".join(b.tags), f"{b.queued_work:g}", "" if b.speed is None else f"{b.speed:.3g}",
            b.last_error or "",
        )  # fmt: skip
    Console().print(table)


def _size(size_bytes: int | None) -> str:
    return f"{size_bytes / 1e6:,.0f} MB" if size_bytes else ""


# -- jobs ---------------------------------------------------------------------------------


@jobs_app.command("list")
def list_jobs(
    server: RemoteServer = DEFAULT_SERVER,
    user_id: str | None = None,
    state: JobState | None = None,
    limit: int = 20,
) -> None:
    """Newest first."""
    from easel.client import Client

    with _errors(), Client(server) as client:
        jobs = client.list(user_id=user_id, state=state, limit=limit)
    table = Table(Column("id", no_wrap=True, min_width=24), "state", "user", "backend", "images")
    table.add_column("prompt", overflow="ellipsis", no_wrap=True)
    for job in jobs:
        row = (job.id, job.state.value, job.user_id, job.backend, str(len(job.images)))
        table.add_row(*row, escape(job.request.prompt))
    Console().print(table)


@jobs_app.command("get")
def get_job(job_id: str, server: RemoteServer = DEFAULT_SERVER) -> None:
    """The job record as JSON."""
    from easel.client import Client

    with _errors(), Client(server) as client:
        job = client.get(job_id)
    typer.echo(job.model_dump_json(indent=2))


@jobs_app.command("cancel")
def cancel_job(job_id: str, server: RemoteServer = DEFAULT_SERVER) -> None:
    """Cancel a queued job at once, or a running one at its next step."""
    from easel.client import Client

    with _errors(), Client(server) as client:
        job = client.cancel(job_id)
    typer.echo(f"{job.id} {job.state.value}")
