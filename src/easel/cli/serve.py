"""``easel serve`` and ``easel worker``: settings checked before anything starts (a bad file,
an unknown backend, a missing model or device: one line each, exit 2), then the server or
the Redis worker process."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from easel.cli._output import ExitCode, console, errors, fail, usage
from easel.errors import EaselError
from easel.runtime import logs

if TYPE_CHECKING:
    from easel.config import Settings

log = logging.getLogger("easel")

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
LogFormat = Annotated[
    str | None,
    typer.Option(
        "--log-format",
        help="text (a line per record) or json (an object per line) [default: text]",
        show_default=False,
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
        raise typer.Exit(ExitCode.usage) from None
    if not settings.backends and settings.resolved_backend not in available():
        fail(
            "invalid_request",
            f"unknown backend {settings.resolved_backend!r}; "
            f"available backends are: {', '.join(available())}",
            ExitCode.usage,
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
        fail(exc.code, exc.message, ExitCode.usage)


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
            fail("invalid_device", f"{where}: {exc.message}", ExitCode.usage)


def _configure_logging(settings: Settings) -> None:
    logs.configure(settings.log_format)
    logs.quiet_connection_lines()


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
    log_format: LogFormat = None,
    mock_step_delay: Annotated[
        float | None,
        typer.Option(min=0, help="The mock backend's seconds per step [default: 0.02]"),
    ] = None,
    mock_load_seconds: Annotated[
        float | None,
        typer.Option(
            min=0, help="The mock's seconds to load a model (its first, each switch) [default: 0]"
        ),
    ] = None,
    mock_preview_every: Annotated[
        int | None,
        typer.Option(min=0, help="The mock sends a preview every K steps [default: 0, none]"),
    ] = None,
) -> None:
    """Run the server: HTTP API, queue and workers in one process.

    Options override EASEL_* environment variables, which override the file (--config),
    which overrides the defaults. Logs one line per job state change.

    Example: easel serve --model models/sd15 --port 8000 --log-format json
    """
    from easel.api import create_app
    from easel.api.limits import WebSocketProtocol
    from easel.api.server import run as run_server

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
        "log_format": log_format,
        "mock_step_delay": mock_step_delay,
        "mock_load_seconds": mock_load_seconds,
        "mock_preview_every": mock_preview_every,
    }
    if (grpc_tls_cert is None) != (grpc_tls_key is None):
        usage("--grpc-tls-cert and --grpc-tls-key go together")
    tls = (grpc_tls_cert, grpc_tls_key) if grpc_tls_cert and grpc_tls_key else None
    settings = _settings(config, given)
    if settings.redis_url is None:  # one process owns a SQLite queue: refuse before starting
        from easel.store.sqlite import own

        with errors():
            own(settings.resolved_db_path)
    _configure_logging(settings)
    log.info(serving_line(settings))
    run_server(  # SIGTERM: the grace for running jobs, then streams end (api/server.py)
        create_app(settings, grpc_port=grpc_port, grpc_tls=tls),
        grace=settings.shutdown_grace_seconds,
        host=settings.host,
        port=settings.port,
        ws=WebSocketProtocol,  # every handshake answered, refused ones included
        ws_per_message_deflate=False,  # events are small JSON: compressing costs more than it saves
        access_log=False,  # easel logs jobs; a line per request costs ~5% of admission
        log_config=None,
    )


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
    log_format: LogFormat = None,
) -> None:
    """Run jobs from a shared Redis queue: no HTTP, one process per GPU host (or per GPU).

    SIGTERM stops claiming at once; running jobs get the grace period, then go back to the
    queue without spending an attempt.

    Example: easel worker --redis redis://127.0.0.1:6379/0 --model models/sd15
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
        "log_format": log_format,
        "only": [name.strip() for name in only.split(",") if name.strip()] if only else None,
    }
    settings = _settings(config, given)
    if settings.redis_url is None:
        usage("easel worker needs --redis URL (or EASEL_REDIS_URL)")
    if "lease_seconds" not in settings.model_fields_set:
        # leases of 1.2 heartbeats, reaped every half lease: a hung worker's job is back
        # in the queue within 1.8 heartbeats of its last one
        settings = settings.model_copy(update={"lease_seconds": settings.heartbeat_seconds * 1.2})
    _configure_logging(settings)
    log.info(serving_line(settings).replace("serving", "worker for", 1))
    asyncio.run(run_worker_process(settings))
