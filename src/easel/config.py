"""Settings, in one place: defaults here, overridden by ``EASEL_*`` env vars or a TOML file.

``EASEL_CONFIG=/path/easel.toml`` names the file; env vars win over it.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class Limits(BaseModel):
    """What one request may ask for; admission refuses more with ``invalid_request``."""

    max_pixels: int = Field(default=2048 * 2048, description="width x height")
    max_side: int = 4096
    max_steps: int = 150
    max_batch_size: int = 8
    max_prompt_length: int = 4000
    max_init_image_bytes: int = 20 * 1024 * 1024


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
    model: str | None = Field(default=None, description="A local diffusers folder.")
    device: str = "auto"
    concurrency: int = Field(
        default=1, ge=0, description="Jobs run at once per backend; 0 serves the API only."
    )
    mock_step_delay: float = Field(default=0.02, ge=0, description="Seconds per mock step.")

    max_user_queue_size: int = Field(default=10, ge=1, description="Queued+running per user.")
    max_user_queue_size_limit: int = Field(
        default=1000, ge=1, description="The most a request's max_user_queue_size may raise it."
    )
    max_queue_size: int | None = Field(default=100_000, ge=1, description="All queued jobs.")
    aging_seconds: float | None = Field(
        default=600.0, gt=0, description="A job waiting this long joins the top tier."
    )
    user_weights: dict[str, float] = Field(
        default_factory=dict, description="Share of service per user inside a tier (1.0)."
    )
    batch_limit: int = Field(
        default=1, ge=1, description="Compatible jobs run as one pipeline call, at most."
    )
    max_attempts: int = Field(default=3, ge=1, description="Runs per job, retries included.")
    retry_base_seconds: float = Field(default=2.0, ge=0, description="First retry backoff.")
    lease_seconds: float = Field(default=30.0, gt=0)
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    limits: Limits = Field(default_factory=Limits)

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
        if path := os.environ.get("EASEL_CONFIG"):
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(path)))
        return tuple(sources)

    @property
    def resolved_db_path(self) -> Path:
        return self.db_path or self.data_dir / "easel.db"

    @property
    def resolved_output_dir(self) -> Path:
        return self.output_dir or self.data_dir / "outputs"

    @property
    def resolved_backend(self) -> str:
        return self.backend or ("diffusers" if self.model else "mock")
