"""Settings, in one place: defaults here, overridden by ``EASEL_*`` env vars or a TOML file.

``EASEL_CONFIG=/path/easel.toml`` names the file; env vars win over it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from easel import constants as redis_keys
from easel.fleet import BackendSpec, Routing

settings_file: ContextVar[Path | None] = ContextVar("easel_settings_file", default=None)
"""The TOML file ``--config`` named (set by :func:`easel.fleet.load_settings`); it wins
over ``EASEL_CONFIG``."""


class Limits(BaseModel):
    """What one request may ask for; admission refuses more with ``invalid_request``."""

    model_config = ConfigDict(extra="forbid")

    max_pixels: int = Field(default=2048 * 2048, description="width x height")
    max_side: int = 4096
    max_steps: int = 150
    max_batch_size: int = 8
    max_prompt_length: int = 4000
    max_init_image_bytes: int = 20 * 1024 * 1024
    max_metadata_bytes: int = Field(
        default=64 * 1024, ge=0, description="A request's free-form metadata, as JSON."
    )
    max_audio_seconds: float = Field(default=60.0, gt=0, description="txt2audio duration.")
    max_speech_characters: int = Field(default=4096, ge=1, description="txt2speech text.")


class DiffusersOptions(BaseModel):
    """How the diffusers backend loads and runs models (``EASEL_DIFFUSERS__*``)."""

    model_config = ConfigDict(extra="forbid")

    hf_cache: bool | str = Field(
        default=True, description="Also serve models already in the Hugging Face cache."
    )
    dtype: str | None = Field(default=None, description="fp32, fp16 or bf16 (default by device).")
    offload: Literal["none", "model", "sequential"] = "none"
    attention_slicing: bool = False
    vae_slicing: bool = False
    vae_tiling: bool = False
    channels_last: bool = False
    fuse_qkv: bool = False
    compile: Literal["off", "regional", "full"] = "off"
    memory_budget: str | None = Field(
        default=None, description="Loaded pipelines kept within this, e.g. 12GB."
    )
    preview_every: int = Field(default=0, ge=0, description="Previews every K steps (0: off).")
    preview_vae: str | None = Field(default=None, description="A local tiny autoencoder.")

    @model_validator(mode="before")
    @classmethod
    def _common_names(cls, data: Any) -> Any:
        """The memory knobs as diffusers servers name them (``enable_vae_slicing``, ...)."""
        if not isinstance(data, dict) or not KNOB_ALIASES.keys() & data.keys():
            return data
        data = dict(data)
        for alias, name in KNOB_ALIASES.items():
            if alias not in data:
                continue
            value = data.pop(alias)
            if name == "offload":
                on = str(value).casefold() in ("1", "true", "yes", "on")
                wanted = "model" if alias == "enable_model_cpu_offload" else "sequential"
                if not on:
                    continue
                if data.get("offload") not in (None, "none", wanted):
                    raise ValueError(
                        f"{alias} asks for offload {wanted!r}, but offload is "
                        f"{data['offload']!r}: choose one"
                    )
                data["offload"] = wanted
            else:
                data[name] = value
        return data

    allow_pickle: bool = Field(
        default=False,
        description="Load pickled .bin weights of diffusers folders (they can run code).",
    )
    warmup: list[str] = Field(
        default_factory=list, description="Sizes compiled at start, e.g. 1024x1024."
    )


KNOB_ALIASES: dict[str, str] = {
    "enable_attention_slicing": "attention_slicing",
    "enable_vae_slicing": "vae_slicing",
    "enable_vae_tiling": "vae_tiling",
    "enable_model_cpu_offload": "offload",
    "enable_sequential_cpu_offload": "offload",
}
"""diffusers servers' names of the memory knobs (the pipeline methods they call) -> easel's
``[diffusers]`` settings; ``enable_*_cpu_offload: true`` sets ``offload``."""


class TokenSetting(BaseModel):
    """One service's token (``EASEL_TOKENS='[{"service": "bot", "token": "..."}]'``)."""

    model_config = ConfigDict(extra="forbid")

    service: str = Field(
        min_length=1,
        pattern=r"^[^/]+$",
        description="The service's name; no '/' (queue accounts are 'service/user').",
    )
    token: SecretStr = Field(min_length=16)
    scopes: list[Literal["submit", "read", "admin"]] = Field(default=["submit", "read"])


class Safety(BaseModel):
    """Who may call, how often, and what they may ask for (``EASEL_SAFETY__*``)."""

    model_config = ConfigDict(extra="forbid")

    tokens: list[TokenSetting] = Field(
        default_factory=list, description="When any is set, every route but /health needs one."
    )
    user_rate: float | None = Field(default=None, gt=0, description="Submissions/s per user.")
    user_burst: int = Field(default=10, ge=1)
    service_rate: float | None = Field(default=None, gt=0, description="Submissions/s each.")
    service_burst: int = Field(default=50, ge=1)
    service_max_active: int | None = Field(
        default=None, ge=1, description="Queued+running jobs per service (all replicas)."
    )
    deny_words: list[str] = Field(default_factory=list, description="Whole words refused.")
    deny_patterns: list[str] = Field(default_factory=list, description="Regexes refused.")
    moderation_url: str | None = Field(
        default=None, description='An HTTP classifier: POST {"input"} -> {"flagged", "reason"}.'
    )
    moderate_all: bool = Field(
        default=False, description="Moderate every request, not only those asking for it."
    )
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)


class S3Settings(BaseModel):
    """Results also go to an S3-compatible store (``EASEL_S3__*``); off unless a bucket is set.

    Credentials left unset come from boto3's usual chain (``AWS_*`` env vars, profiles, roles).
    """

    model_config = ConfigDict(extra="forbid")

    bucket: str | None = None
    prefix: str = Field(default="easel/", description="Prepended to every object key.")
    endpoint_url: str | None = Field(default=None, description="Default: AWS for the region.")
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    presign_seconds: int = Field(
        default=3600, ge=0, description="URLs handed out are presigned for this long (0: plain)."
    )
    max_attempts: int = Field(default=5, ge=1, description="Uploads tried, retries included.")
    retry_base_seconds: float = Field(default=1.0, ge=0, description="First retry backoff.")
    timeout_seconds: float = Field(default=10.0, gt=0, description="Per S3 call.")


class OutputSettings(BaseModel):
    """How result images are encoded when a request does not say (``EASEL_OUTPUT__*``)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["png", "webp", "jpeg"] = Field(
        default="png", description="Like A1111's samples_format."
    )
    png_compress_level: int = Field(
        default=1,
        ge=0,
        le=9,
        description="zlib level: 0 is fastest and largest; 1 (the default) encodes a "
        "1024x1024 result ~25% faster than 6 for ~10% more bytes.",
    )
    png_strategy: Literal["default", "filtered", "huffman_only", "rle", "fixed"] = Field(
        default="rle",
        description="zlib strategy for PNG: rle (the default) is as fast as level 1 or "
        "faster and smaller on generated images (flat areas become runs); default is "
        "zlib's own (slower; smaller only at higher levels on smooth images).",
    )
    jpeg_quality: int = Field(default=92, ge=1, le=100)
    webp_quality: int = Field(default=90, ge=1, le=100)
    webp_lossless: bool = False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EASEL_", env_nested_delimiter="__")

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("easel-data")
    db_path: Path | None = Field(default=None, description="Default: DATA_DIR/easel.db")
    output_dir: Path | None = Field(default=None, description="Default: DATA_DIR/outputs")

    backend: str | None = Field(
        default=None, description="Default: diffusers when a model is given, else mock."
    )
    model: str | None = Field(
        default=None, description="A local diffusers folder or .safetensors checkpoint."
    )
    clap_model: Path | None = Field(
        default=None,
        description="A local CLAP folder (transformers): audio results get a clap_score.",
    )
    models_dir: Path | None = Field(
        default=None, description="A folder of models, LoRAs and ControlNets to serve."
    )
    diffusers: DiffusersOptions = Field(default_factory=DiffusersOptions)
    device: str = "auto"
    concurrency: int = Field(
        default=1, ge=0, description="Jobs run at once per backend; 0 serves the API only."
    )
    mock_step_delay: float = Field(default=0.02, ge=0, description="Seconds per mock step.")
    mock_seconds_per_megapixel_step: float = Field(
        default=0.0, ge=0, description="A realistic mock: seconds per step per megapixel."
    )
    mock_overhead_seconds: float = Field(default=0.0, ge=0, description="Per mock call.")
    mock_load_seconds: float = Field(
        default=0.0, ge=0, description="Seconds the mock takes to load a model (its first too)."
    )
    mock_models: list[str] = Field(
        default_factory=list, description="More model names the mock serves (with 'mock')."
    )
    mock_preview_every: int = Field(
        default=0, ge=0, description="The mock sends a preview every K steps (0: none)."
    )
    mock_folder: Path | None = Field(
        default=None, description="The mock serves the pictures of this folder, by seed."
    )

    max_user_queue_size: int = Field(default=10, ge=1, description="Queued+running per user.")
    max_user_queue_size_limit: int = Field(
        default=1000, ge=1, description="The most a request's max_user_queue_size may raise it."
    )
    max_queue_size: int | None = Field(default=100_000, ge=1, description="All queued jobs.")
    aging_seconds: float | None = Field(
        default=600.0, gt=0, description="A job waiting this long joins the top tier."
    )
    user_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Share of service per user inside a tier (1.0): 'service/user' for one "
        "service's user, a bare user id for that id in every service.",
    )
    batch_limit: int = Field(
        default=1, ge=1, description="Compatible jobs run as one pipeline call, at most."
    )
    eta_update_seconds: float = Field(
        default=1.0,
        gt=0,
        description="How often waiting jobs' ETAs are recomputed (an update is announced "
        "when one moved materially, at most every 3 of these intervals per job).",
    )
    results_depth: int = Field(
        default=2,
        ge=0,
        description="Backend calls whose results are finished (encoded, written, announced) "
        "while the backend runs the next job; 0 finishes each before claiming the next.",
    )
    results_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="How much lower the CPU priority of the threads that encode and write "
        "results is (Linux, per thread): under contention the event loop and the backends' "
        "threads go first. 0: the same priority.",
    )
    max_attempts: int = Field(default=3, ge=1, description="Runs per job, retries included.")
    retry_base_seconds: float = Field(default=2.0, ge=0, description="First retry backoff.")
    lease_seconds: float = Field(default=30.0, gt=0)
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    limits: Limits = Field(default_factory=Limits)
    safety: Safety = Field(default_factory=Safety)
    log_format: Literal["text", "json"] = Field(
        default="text", description="json: one JSON object per line, with job and user ids."
    )

    # scaling out: with a Redis URL, the store, the events and the worker registry live there
    redis_url: str | None = Field(
        default=None, description="redis://host:port/db: share one queue between processes."
    )
    redis_prefix: str = Field(
        default=redis_keys.DEFAULT_PREFIX, description="Prefix of every Redis key."
    )
    redis_socket_timeout: float = Field(
        default=redis_keys.SOCKET_TIMEOUT_SECONDS,
        gt=0,
        description="A Redis call never waits longer (then 503).",
    )
    redis_durability: Literal["auto", "waitaof", "off"] = Field(
        default="auto", description="auto: WAITAOF when AOF is on without appendfsync always."
    )
    retention_seconds: float = Field(
        default=redis_keys.RETENTION_SECONDS,
        gt=0,
        description="Finished jobs are kept this long (Redis).",
    )
    event_stream_maxlen: int = Field(
        default=redis_keys.EVENT_STREAM_MAXLEN,
        ge=1000,
        description="Recent events kept for resuming (Redis).",
    )
    s3: S3Settings = Field(default_factory=S3Settings)
    output: OutputSettings = Field(default_factory=OutputSettings)
    webhook_allowed_hosts: list[str] = Field(
        default_factory=list, description="Hosts webhooks may go to (empty: webhooks refused)."
    )
    webhook_secret: SecretStr | None = Field(
        default=None, description="Signs webhook bodies (HMAC-SHA256); required for webhooks."
    )
    webhook_max_attempts: int = Field(default=5, ge=1, description="POSTs per event, at most.")
    webhook_retry_base_seconds: float = Field(default=1.0, ge=0, description="First backoff.")
    webhook_timeout_seconds: float = Field(default=10.0, gt=0, description="Per POST.")
    backends: list[BackendSpec] = Field(
        default_factory=list,
        description="The fleet ([[backends]] in the TOML file); empty: one backend from "
        "backend/model/models_dir.",
    )
    routing: Routing = Field(default_factory=Routing)
    only: list[str] = Field(
        default_factory=list,
        description="Run only these backends of the fleet (easel worker --only a,b).",
    )
    shutdown_grace_seconds: float = Field(
        default=30.0, ge=0, description="On SIGTERM, running jobs get this long to finish."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = settings_file.get() or os.environ.get("EASEL_CONFIG")
        if path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(path)))
        return tuple(sources)

    @model_validator(mode="after")
    def _no_unknown_env_vars(self) -> Self:
        if unknown := unknown_env_vars(os.environ):
            raise ValueError(
                f"unknown environment variable(s) {', '.join(unknown)}: no such setting. Valid "
                f"EASEL_* variables: {', '.join(valid_env_vars())} (nested with __, e.g. "
                "EASEL_DIFFUSERS__VAE_TILING)"
            )
        return self

    @property
    def resolved_db_path(self) -> Path:
        return self.db_path or self.data_dir / "easel.db"

    @property
    def resolved_output_dir(self) -> Path:
        return self.output_dir or self.data_dir / "outputs"

    @property
    def resolved_backend(self) -> str:
        return self.backend or ("diffusers" if self.model or self.models_dir else "mock")


OTHER_ENV_VARS = frozenset(
    {
        "EASEL_CONFIG",
        "EASEL_SERVER",
        "EASEL_TOKEN",
        "EASEL_GRPC_PORT",
        "EASEL_REDIS_URL",
        "EASEL_MODELS_DIR",
    }
)
"""``EASEL_*`` variables that are not settings: read by the command line."""
_IGNORED_ENV_PREFIXES = ("EASEL_TEST_",)


def valid_env_vars() -> list[str]:
    """The top-level ``EASEL_*`` names (nested ones add ``__FIELD``)."""
    return sorted({f"EASEL_{name.upper()}" for name in Settings.model_fields} | OTHER_ENV_VARS)


def unknown_env_vars(environ: Mapping[str, str]) -> list[str]:
    """``EASEL_*`` variables that name no setting (a typo would otherwise be ignored)."""
    unknown = []
    for key in environ:
        upper = key.upper()
        if not upper.startswith("EASEL_") or upper in OTHER_ENV_VARS:
            continue
        if upper.startswith(_IGNORED_ENV_PREFIXES):
            continue
        if not _known_path(Settings, upper.removeprefix("EASEL_").lower().split("__")):
            unknown.append(key)
    return sorted(unknown)


def _known_path(model: type[BaseModel], parts: list[str]) -> bool:
    head, rest = parts[0], parts[1:]
    if model is DiffusersOptions and head in KNOB_ALIASES and not rest:
        return True
    field = model.model_fields.get(head)
    if field is None:
        return False
    if not rest:
        return True
    annotation = field.annotation
    return (
        isinstance(annotation, type)
        and issubclass(annotation, BaseModel)
        and _known_path(annotation, rest)
    )


def valid_keys_at(loc: tuple[int | str, ...]) -> list[str] | None:
    """The keys valid where a settings error at ``loc`` (pydantic's path) points, so that an
    unknown key can be answered with the valid ones; None where that is not a settings table."""
    model: type[BaseModel] = Settings
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            args = getattr(annotation, "__args__", ())  # list[Model]
            annotation = next((a for a in args if isinstance(a, type)), None)
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return None
        model = annotation
    keys = list(model.model_fields)
    if model is DiffusersOptions:
        keys += list(KNOB_ALIASES)
    return keys
