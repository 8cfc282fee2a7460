"""The one vocabulary: what a client asks for, what easel keeps, what it announces.

Compatibility APIs translate into :class:`GenerationRequest` at the edge; everything behind
the edge (scheduler, store, worker, backends, storage) speaks only these models.
"""

from __future__ import annotations

import random
import time
from enum import StrEnum
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from easel.errors import Cancelled, EaselError, GenerationError, InvalidRequest, error_for
from easel.payloads import Executor, fields_from

PREMIUM_PRIORITY = 10
"""The top priority tier; ``premium: true`` means this tier."""

MIN_PRIORITY = -10
MAX_SEED = 2**32 - 1

JSONValue = str | int | float | bool | None | list[Any] | dict[str, Any]

JSON_MAX_DEPTH = 32
"""Nesting a free-form JSON field may have (metadata, raw payloads, A1111's extras)."""
JSON_MAX_ITEMS = 10_000
"""Keys and list items a free-form JSON field may hold, all levels together."""


def check_json_shape(value: object, where: str) -> None:
    """Refuse free-form JSON nested deeper than :data:`JSON_MAX_DEPTH` or holding more than
    :data:`JSON_MAX_ITEMS` entries: such a value costs more to store, echo and serialize
    than any real request needs (300 levels once failed only when echoed, as a 500)."""
    items = 0
    pending: list[tuple[object, int]] = [(value, 0)]
    while pending:
        node, depth = pending.pop()
        if isinstance(node, dict | list):
            if depth >= JSON_MAX_DEPTH:
                raise ValueError(f"{where} is nested deeper than {JSON_MAX_DEPTH} levels")
            children = list(node.values()) if isinstance(node, dict) else node
            items += len(children)
            if items > JSON_MAX_ITEMS:
                raise ValueError(f"{where} holds more than {JSON_MAX_ITEMS} keys and items")
            pending.extend((child, depth + 1) for child in children)


# Seeded from os.urandom once. Ids and seeds need to be unique, not secret: access to a
# job is decided by its owner, never by knowing its id.
_random = random.Random()


def new_job_id() -> str:
    """Time-ordered ids: listing by id is listing by arrival."""
    return f"{time.time_ns() // 1_000_000:012x}{_random.getrandbits(64):016x}"


def random_seed() -> int:
    return _random.randrange(MAX_SEED + 1)


class JobKind(StrEnum):
    txt2img = "txt2img"
    img2img = "img2img"
    inpaint = "inpaint"
    mix = "mix"
    txt2audio = "txt2audio"
    txt2speech = "txt2speech"

    @property
    def is_audio(self) -> bool:
        return self in AUDIO_KINDS


AUDIO_KINDS = frozenset({JobKind.txt2audio, JobKind.txt2speech})

DEFAULT_AUDIO_SECONDS = 10.0
"""A txt2audio request without ``duration_seconds`` asks for this long a clip."""
AUDIO_STEP_SECOND_COST = 0.0262
"""Work units of one diffusion step over one second of audio. A 10 s clip's latent is about
the size of a 512x512 image's (AudioLDM: 256x16 vs 64x64), so a step costs about the same."""
SPEECH_SECOND_COST = 0.2
"""Work units of one second of speech (a speech model runs many times faster than real time)."""
SPEECH_WORDS_PER_SECOND = 3.0
"""Speaking rate at speed 1.0, for estimating a text's duration before it is spoken."""


class AudioFormat(StrEnum):
    """Containers audio results are written in; the parameters travel in each one's tags."""

    wav = "wav"
    flac = "flac"
    ogg = "ogg"
    """Ogg Vorbis."""
    opus = "opus"
    """Ogg Opus (8, 12, 16, 24 or 48 kHz: other rates are resampled to 48 kHz)."""
    mp3 = "mp3"

    @property
    def media_type(self) -> str:
        return AUDIO_MEDIA_TYPES[self]


AUDIO_MEDIA_TYPES = {
    AudioFormat.wav: "audio/wav",
    AudioFormat.flac: "audio/flac",
    AudioFormat.ogg: "audio/ogg",
    AudioFormat.opus: "audio/ogg; codecs=opus",
    AudioFormat.mp3: "audio/mpeg",
}

OPUS_SAMPLE_RATES = frozenset({8000, 12_000, 16_000, 24_000, 48_000})

_AUDIO_ONLY = ("duration_seconds", "sample_rate", "channels", "audio_format")
_IMAGE_ONLY = (
    "init_image", "mask_image", "controlnet", "upscale", "clip_skip", "output_format",
    "output_quality",
)  # fmt: skip


class ImageFormat(StrEnum):
    """How result images are encoded; each format carries the generation parameters."""

    png = "png"
    webp = "webp"
    jpeg = "jpeg"

    @property
    def suffix(self) -> str:
        return ".jpg" if self is ImageFormat.jpeg else f".{self.value}"

    @property
    def media_type(self) -> str:
        return f"image/{self.value}"

    @classmethod
    def of_path(cls, path: str) -> ImageFormat:
        """The format of a stored file, by the suffix easel gave it."""
        suffix = path.rpartition(".")[2].lower()
        return cls.jpeg if suffix in {"jpg", "jpeg"} else cls(suffix)


class Capability(StrEnum):
    """What a backend can do; admission refuses a request that needs one no backend has."""

    txt2img = "txt2img"
    img2img = "img2img"
    inpaint = "inpaint"
    controlnet = "controlnet"
    negative_prompt = "negative_prompt"
    seed = "seed"
    scheduler = "scheduler"
    lora = "lora"
    upscale = "upscale"
    preview = "preview"
    mix = "mix"
    txt2audio = "txt2audio"
    txt2speech = "txt2speech"


class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.queued: frozenset({JobState.running, JobState.cancelled, JobState.failed}),
    # running -> queued is a requeue (lease lost, worker stopping, transient error)
    JobState.running: frozenset(
        {JobState.queued, JobState.succeeded, JobState.failed, JobState.cancelled}
    ),
    JobState.succeeded: frozenset(),
    JobState.failed: frozenset(),
    JobState.cancelled: frozenset(),
}


class LoraSpec(BaseModel):
    """A LoRA from the models directory, applied to this request only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="A LoRA listed by GET /v1/models.")
    weight: float = Field(default=1.0, ge=-4, le=4)


class ControlNetSpec(BaseModel):
    """A ControlNet from the models directory and its conditioning image."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="A ControlNet listed by GET /v1/models.")
    image: str = Field(description="Base64 PNG/JPEG/WebP control map (depth, canny edges...).")
    scale: float = Field(default=1.0, ge=0, le=4)
    start: float = Field(default=0.0, ge=0, le=1)
    end: float = Field(default=1.0, ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.start >= self.end:
            raise ValueError("controlnet.start must be before controlnet.end")
        return self


class UpscaleSpec(BaseModel):
    """A latent upscale ("hires fix"): a second pass at ``factor`` times the size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    factor: float = Field(default=2.0, gt=1, le=4)
    strength: float = Field(default=0.5, gt=0, le=1)
    steps: int | None = Field(default=None, gt=0, description="Default: the request's steps.")


class MixItem(BaseModel):
    """One ingredient of a mix: an image or a prompt, with its weight."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str | None = None
    prompt: str | None = None
    weight: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _one_of(self) -> Self:
        if (self.image is None) == (self.prompt is None):
            raise ValueError("each mix item needs exactly one of image or prompt")
        return self


_STYLE_KEYS = frozenset(
    {"scheduler_type", "karras_sigmas", "use_karras_sigmas", "timestep_spacing"}
)


class GenerationRequest(BaseModel):
    """Everything needed to run, queue and reproduce one generation."""

    model_config = ConfigDict(extra="forbid")

    kind: JobKind = JobKind.txt2img
    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    width: int = Field(default=512, gt=0)
    height: int = Field(default=512, gt=0)
    steps: int = Field(default=20, gt=0)
    cfg_scale: float = Field(default=7.0, ge=0, le=50)
    scheduler: str | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    strength: float = Field(default=0.75, ge=0, le=1)
    init_image: str | None = Field(
        default=None, description="Base64 PNG/JPEG/WebP (a data: URL is accepted); img2img only."
    )
    mask_image: str | None = Field(
        default=None, description="Base64 mask for inpainting: white is repainted."
    )
    loras: list[LoraSpec] = Field(default_factory=list)
    controlnet: ControlNetSpec | None = None
    clip_skip: int | None = Field(
        default=None, ge=1, le=12, description="CLIP layers skipped from the end (1: none)."
    )
    upscale: UpscaleSpec | None = None
    mix: list[MixItem] = Field(default_factory=list, max_length=8)
    duration_seconds: float | None = Field(
        default=None,
        gt=0,
        description=f"Seconds of audio (txt2audio; default {DEFAULT_AUDIO_SECONDS:g}).",
    )
    sample_rate: int | None = Field(
        default=None,
        ge=8000,
        le=192_000,
        description="Audio samples per second (default: the model's).",
    )
    channels: int | None = Field(
        default=None, ge=1, le=2, description="1 (mono) or 2 (stereo); default: the model's."
    )
    voice: str | None = Field(
        default=None, max_length=200, description="txt2speech: a voice the backend lists."
    )
    speed: float = Field(default=1.0, ge=0.25, le=4.0, description="txt2speech: 1.0 is normal.")
    audio_format: AudioFormat | None = Field(
        default=None, description="Audio results' container (default wav)."
    )
    preview_every: int | None = Field(
        default=None, ge=0, description="A preview every this many steps (0: none)."
    )
    batch_size: int = Field(default=1, gt=0)
    output_format: ImageFormat | None = Field(
        default=None, description="png, webp or jpeg (default: the server's output format)."
    )
    output_quality: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="JPEG/WebP quality (default: the server's); ignored for PNG.",
    )
    model: str | None = None
    backend: str | None = Field(
        default=None, description="Run on this backend of the fleet (GET /v1/backends)."
    )
    tags: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="Run on a backend carrying all of these tags (the fleet file's tags).",
    )
    fallback: bool | list[str] = Field(
        default=False,
        description="When the named backend is down or fails transiently, move to another "
        "eligible backend (true: any; a list: these).",
    )
    user_id: str = Field(default="anonymous", min_length=1, max_length=200)
    priority: int = Field(default=0, ge=MIN_PRIORITY, le=PREMIUM_PRIORITY)
    premium: bool = Field(default=False, description="Shorthand for the top priority tier.")
    max_user_queue_size: int | None = Field(default=None, gt=0)
    moderate: bool = Field(
        default=False, description="Check the prompts against the server's moderation first."
    )
    metadata: dict[str, JSONValue] = Field(default_factory=dict)
    include_images: bool = Field(
        default=False,
        description="Put the result files, base64, in the succeeded event (when they are "
        "small enough; else only their URLs): for clients that want no second request.",
    )
    sync_with_s3: bool = Field(
        default=False,
        description="Announce succeeded only once the images are on S3, with their URLs.",
    )
    webhook_url: str | None = Field(
        default=None,
        max_length=2000,
        description="Events of this job are POSTed here, signed (host must be allowed).",
    )
    executor: Executor | None = Field(
        default=None, description="The engine API that ``payload`` is written for."
    )
    payload: dict[str, Any] | None = Field(
        default=None,
        description="A raw engine payload (an Automatic1111 txt2img/img2img body, a ComfyUI "
        "API workflow): a backend of that kind gets it unchanged but for the seed; the easel "
        "fields are read from it (limits apply to them; other backends run them).",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_payload(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("payload") is None:
            return data
        if data.get("executor") is None:
            raise ValueError("a payload needs executor: " + ", ".join(Executor))
        if not isinstance(data["payload"], dict):
            raise ValueError("payload must be a JSON object")
        found = fields_from(Executor(data["executor"]), data["payload"])
        for key, value in found.items():
            if data.get(key) is not None and data[key] != value and key != "seed":
                raise ValueError(
                    f"{key} is given both in the request and in the payload; give it once"
                )
        return {**found, **{k: v for k, v in data.items() if v is not None}}

    @model_validator(mode="before")
    @classmethod
    def _text_is_the_prompt(cls, data: Any) -> Any:
        """txt2speech reads ``text``: it is the request's prompt under its speech name."""
        if isinstance(data, dict) and "text" in data and data.get("kind") == "txt2speech":
            if "prompt" in data:
                raise ValueError("give the words to speak as text or as prompt, not both")
            data = {**data, "prompt": data["text"]}
            del data["text"]
        return data

    @model_validator(mode="before")
    @classmethod
    def _diffusers_server_style(cls, data: Any) -> Any:
        """``scheduler_type: "dpmsolver++"`` + ``karras_sigmas: true`` (the style of diffusers
        servers' configs) is the scheduler "DPM++ 2M Karras"."""
        if not isinstance(data, dict) or not _STYLE_KEYS & data.keys():
            return data
        from easel.samplers import from_diffusers_style

        data = dict(data)
        style = {key: data.pop(key) for key in _STYLE_KEYS if key in data}
        kind = style.pop("scheduler_type", None) or data.get("scheduler")
        if kind is None:
            raise ValueError(f"{', '.join(sorted(style))} needs scheduler_type (or scheduler)")
        if data.get("scheduler") not in (None, kind):
            raise ValueError("give scheduler or scheduler_type, not both")
        karras = bool(style.get("karras_sigmas") or style.get("use_karras_sigmas"))
        spacing = style.get("timestep_spacing")
        try:
            data["scheduler"] = from_diffusers_style(
                str(kind),
                karras_sigmas=karras,
                timestep_spacing=None if spacing is None else str(spacing),
            )
        except InvalidRequest as exc:
            raise ValueError(exc.message) from None
        return data

    @field_validator("metadata", "payload")
    @classmethod
    def _bounded_json(cls, value: Any, info: Any) -> Any:
        check_json_shape(value, info.field_name)
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8 (got {value}); try {value - value % 8 or 8}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.premium:
            self.priority = PREMIUM_PRIORITY
        if "kind" not in self.model_fields_set:  # the images given say what kind it is
            if self.mix:
                self.kind = JobKind.mix
            elif self.mask_image is not None:
                self.kind = JobKind.inpaint
            elif self.init_image is not None:
                self.kind = JobKind.img2img
        if self.kind is JobKind.txt2img and self.init_image is not None:
            raise ValueError("init_image is only used by img2img; set kind to img2img")
        if self.kind in {JobKind.img2img, JobKind.inpaint} and not self.init_image:
            raise ValueError(f"{self.kind} needs init_image (base64 PNG, JPEG or WebP)")
        if self.kind is JobKind.inpaint and not self.mask_image:
            raise ValueError("inpaint needs mask_image (white = repaint)")
        if self.kind is JobKind.mix and not self.mix:
            raise ValueError("a mix needs mix items (images or prompts, with weights)")
        self._fields_fit_kind()
        return self

    def _fields_fit_kind(self) -> None:
        """Refuse fields the kind has no use for, rather than ignore them silently."""
        if self.kind.is_audio:
            wrong = [f for f in _IMAGE_ONLY if getattr(self, f) is not None]
            wrong += ["loras"] if self.loras else []
            wrong += ["mix"] if self.mix else []
            if self.kind is JobKind.txt2speech and self.negative_prompt:
                wrong.append("negative_prompt")
            if wrong:
                raise ValueError(f"{', '.join(wrong)} cannot be used by {self.kind}")
        else:
            wrong = [f for f in _AUDIO_ONLY if getattr(self, f) is not None]
            if wrong:
                raise ValueError(
                    f"{', '.join(wrong)} are for audio; set kind to txt2audio or txt2speech"
                )
        if self.kind is not JobKind.txt2speech:
            wrong = ["voice"] if self.voice is not None else []
            wrong += ["speed"] if self.speed != 1.0 else []
            if wrong:
                raise ValueError(f"{', '.join(wrong)} are for txt2speech only")
        elif self.duration_seconds is not None:
            raise ValueError("speech lasts as long as its text takes; leave duration_seconds out")
        if (
            self.audio_format is AudioFormat.opus
            and self.sample_rate is not None
            and self.sample_rate not in OPUS_SAMPLE_RATES
        ):
            rates = ", ".join(map(str, sorted(OPUS_SAMPLE_RATES)))
            raise ValueError(f"opus holds only these sample rates: {rates}; or ask for flac")

    @property
    def seeds(self) -> list[int]:
        """One seed per image: image i of a batch is reproducible alone with seed + i."""
        base = self.seed if self.seed is not None else 0
        return [(base + i) % (MAX_SEED + 1) for i in range(self.batch_size)]

    @property
    def audio_seconds(self) -> float:
        """Seconds of audio per result: asked for (txt2audio) or estimated from the words."""
        if self.kind is JobKind.txt2speech:
            words = max(len(self.prompt.split()), 1)
            return words / (SPEECH_WORDS_PER_SECOND * self.speed)
        if self.kind is JobKind.txt2audio:
            return self.duration_seconds or DEFAULT_AUDIO_SECONDS
        return 0.0

    @property
    def cost(self) -> float:
        """Work units, proportional to the time a run takes: pixel-steps for images (upscale
        pass too), audio-second-steps for sound, seconds of speech for speech."""
        if self.kind is JobKind.txt2audio:
            return self.steps * self.audio_seconds * AUDIO_STEP_SECOND_COST * self.batch_size
        if self.kind is JobKind.txt2speech:
            return self.audio_seconds * SPEECH_SECOND_COST * self.batch_size
        pixel_steps = float(self.steps * self.width * self.height)
        if self.upscale is not None:
            steps = (self.upscale.steps or self.steps) * self.upscale.strength
            pixel_steps += steps * self.width * self.height * self.upscale.factor**2
        return pixel_steps * self.batch_size / 1e6

    @property
    def output_size(self) -> tuple[int, int]:
        """Width and height of the images, after any upscale."""
        factor = self.upscale.factor if self.upscale is not None else 1
        return int(self.width * factor), int(self.height * factor)


class ImageRef(BaseModel):
    """Where a result lives; ``path`` is relative to the server's output dir."""

    index: int
    seed: int
    width: int
    height: int
    path: str
    url: str
    remote_url: str | None = Field(
        default=None, description="The object on S3 (presigned when so configured)."
    )


class AudioRef(BaseModel):
    """One stored audio result; ``path`` is relative to the server's output dir."""

    index: int
    seed: int
    duration_seconds: float
    sample_rate: int
    channels: int
    format: AudioFormat
    media_type: str
    path: str
    url: str
    remote_url: str | None = Field(
        default=None, description="The object on S3 (presigned when so configured)."
    )
    clap_score: float | None = Field(
        default=None, description="Text/audio similarity (CLAP), when a CLAP model is set."
    )


class JobError(BaseModel):
    code: str
    message: str


class Attempt(BaseModel):
    """One run of a job: where, by whom, when, and how it ended."""

    backend: str
    worker: str
    started_at: float | None = None
    ended_at: float | None = None
    error: JobError | None = Field(default=None, description="None: the run succeeded.")


class WebhookState(StrEnum):
    """The latest delivery's outcome."""

    delivered = "delivered"
    retrying = "retrying"
    dead = "dead"
    """An event was given up on (attempts spent, or refused with a 4xx): a dead letter."""


class WebhookDelivery(BaseModel):
    """Where a job's webhook deliveries stand (written by whichever replica delivered)."""

    url: str
    state: WebhookState | None = Field(default=None, description="The latest outcome.")
    delivered: bool = Field(default=False, description="The latest event reached the URL.")
    events: int = Field(default=0, description="Events delivered so far.")
    attempts: int = Field(default=0, description="POSTs made, retries included.")
    dead_letters: int = Field(default=0, description="Events given up on (never delivered).")
    last_error: str | None = None


class Job(BaseModel):
    id: str = Field(default_factory=new_job_id)
    request: GenerationRequest
    state: JobState = JobState.queued
    backend: str = Field(description="The backend chosen at admission.")
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = Field(
        default=0,
        description="Runs started, including the current one: how many; each one's record "
        "(backend, worker, started_at, ended_at, error) is in ``runs``.",
    )
    service: str | None = Field(default=None, description="The service that submitted it.")
    worker_id: str | None = None
    images: list[ImageRef] = Field(default_factory=list)
    audio: list[AudioRef] = Field(default_factory=list)
    error: JobError | None = None
    upload_error: str | None = Field(
        default=None, description="Why the S3 upload failed; the local images remain."
    )
    webhook: WebhookDelivery | None = None
    runs: list[Attempt] = Field(
        default_factory=list,
        description="Every attempt so far, oldest first: [{backend, worker, started_at, "
        "ended_at, error}] (``attempts`` is their count, the current run included).",
    )

    @property
    def user_id(self) -> str:
        return self.request.user_id


class JobView(Job):
    """A job as the API shows it: the record plus where it stands in the queue."""

    position: int | None = Field(
        default=None, description="Jobs that run before this one (0: next); queued jobs only."
    )
    eta_seconds: float | None = Field(
        default=None,
        description="Expected seconds until done (wait + run), from measured run times.",
    )
    wait_eta_seconds: float | None = Field(
        default=None, description="Expected seconds until it starts (0 once running)."
    )
    run_eta_seconds: float | None = Field(
        default=None, description="Expected seconds of its own run (what is left, if running)."
    )
    eta_low_seconds: float | None = Field(
        default=None, description="Until done, optimistic (p10 of measured run times)."
    )
    eta_high_seconds: float | None = Field(
        default=None, description="Until done, pessimistic (p90 of measured run times)."
    )
    average_seconds: float | None = Field(
        default=None, description="Measured average run time of jobs like this one."
    )
    waiting_reason: str | None = Field(
        default=None,
        description="Why a queued job cannot start now (its backend is down or has no live "
        "worker); None while it just waits its turn.",
    )


class EventType(StrEnum):
    queued = "queued"
    started = "started"
    progress = "progress"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    uploaded = "uploaded"
    upload_failed = "upload_failed"


class Phase(StrEnum):
    """What a running job waits for before its first step, said on its ``started`` event."""

    loading_model = "loading_model"
    """The backend loads the job's model first (it is not in memory, or is being loaded)."""


FINAL_EVENTS = frozenset({EventType.succeeded, EventType.failed, EventType.cancelled})
"""The events that end a job: exactly one of them is its last."""

EVENT_FOR_STATE: dict[JobState, EventType] = {
    JobState.queued: EventType.queued,
    JobState.running: EventType.started,
    JobState.succeeded: EventType.succeeded,
    JobState.failed: EventType.failed,
    JobState.cancelled: EventType.cancelled,
}
"""The event that announces a job entering each state."""


class Event(BaseModel):
    """One change of one job. ``id`` orders all events of a bus; resume after it."""

    id: int = 0
    type: EventType
    job_id: str
    user_id: str
    at: float = Field(default_factory=time.time)
    step: int | None = None
    total: int | None = None
    position: int | None = None
    eta_seconds: float | None = None
    wait_eta_seconds: float | None = None
    run_eta_seconds: float | None = None
    eta_low_seconds: float | None = None
    eta_high_seconds: float | None = None
    average_seconds: float | None = None
    images: list[ImageRef] | None = None
    audio: list[AudioRef] | None = None
    error: JobError | None = None
    upload_error: str | None = None
    preview: str | None = Field(default=None, description="Base64 JPEG of the work so far.")
    content: list[str] | None = Field(
        default=None, description="succeeded, with include_images: each result file, base64."
    )
    phase: Phase | None = Field(
        default=None,
        description="started: what the job waits for before its first step (loading_model: "
        "its backend loads the model first); the first progress event ends it.",
    )
    model: str | None = Field(default=None, description="The model the phase is about.")

    service: str | None = None

    @classmethod
    def of(cls, job: Job, type: EventType, **fields: Any) -> Event:
        return cls(type=type, job_id=job.id, user_id=job.user_id, service=job.service, **fields)


def final_event(job: Job) -> Event:
    """The terminal event of a finished job, rebuilt from its record (for lost history)."""
    if job.state not in FINAL_STATES:
        raise ValueError(f"job {job.id} is {job.state}, not finished")
    return Event.of(job, EVENT_FOR_STATE[job.state], images=job.images or None, error=job.error)


def job_error(job: Job) -> EaselError:
    """Why a job did not succeed, as the exception a caller that wanted its images gets."""
    if job.state is JobState.cancelled:
        return Cancelled(f"job {job.id} was cancelled")
    if job.error is None:
        return GenerationError(f"job {job.id} ended {job.state}")
    return error_for(job.error.code, job.error.message, unknown=GenerationError)
