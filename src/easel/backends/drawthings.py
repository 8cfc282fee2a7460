"""A Draw Things gRPC server (the app, gRPCServerCLI, or another easel) as a backend.

A job is one server-streaming ``ImageGenerationService/GenerateImage`` call, built with
easel's own proto messages and FlatBuffers code (:mod:`easel.proto.drawthings`): the
configuration (size in 64-pixel units, steps, seed, guidance, sampler, strength, model,
batch) and, for img2img, the init image as a tensor. Its stream maps onto easel's events:
each ``sampling`` signpost is a progress step (the total from the ``signposts`` plan), a
``preview_image`` that is RGB becomes a preview (Draw Things' own previews are latents,
which only the model can decode: skipped), and the final tensors, joined from their
chunks, are the images. Cancelling the job cancels the call; the server stops its run.

``Echo`` is the health check and lists the models (``files``); TLS is optional (Draw
Things' gRPCServerCLI uses TLS unless started with ``--no-tls``): ``tls = true``, with
``root_certificates`` naming a PEM file for a self-signed server.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import grpc

from easel.backends.base import (
    Backend,
    Capability,
    GenerationResult,
    ModelInfo,
    RunContext,
)
from easel.errors import (
    BackendUnavailable,
    Cancelled,
    EngineError,
    EngineRefused,
    GenerationError,
    InvalidRequest,
    Unsupported,
)
from easel.images import decode_base64_image
from easel.jobs import GenerationRequest, JobKind
from easel.proto import imageservice_pb2 as pb
from easel.proto.drawthings import (
    SAMPLERS,
    SIZE_UNIT,
    Configuration,
    Control,
    LoRA,
    decode_preview,
    decode_tensor,
    encode_configuration,
    encode_tensor,
)
from easel.samplers import DRAWTHINGS_SAMPLERS, SamplerName, parse_sampler

SERVICE = "/ImageGenerationService/"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)


def sampler_name(name: str) -> str:
    """easel's sampler name -> Draw Things' ("UniPC ays" -> "UniPC AYS"), from the one
    sampler table (:mod:`easel.samplers`)."""
    try:
        index = parse_sampler(name).drawthings
    except InvalidRequest as exc:
        raise Unsupported(f"Draw Things cannot run sampler {name!r}: {exc.message}") from None
    if index is None:
        raise Unsupported(
            f"Draw Things has no sampler {name!r}; its samplers are: {', '.join(SAMPLERS)}"
        )
    return SAMPLERS[index]


HINT_TYPES = (
    "depth", "scribble", "pose", "color", "lineart", "softedge", "seg", "inpaint", "ip2p",
    "shuffle", "mlsd", "tile", "blur", "lowquality", "gray",
)  # fmt: skip
"""The ``hint_type`` values of Draw Things' control inputs (its ``ControlInputType``
names, lower-case); any other control image is ``custom``."""


def hint_type(control: str) -> str:
    """The hint type for a ControlNet, from the kind its name says ("sd15-depth" ->
    "depth", "xl-openpose" -> "pose"; a canny map is a custom image, as Draw Things makes
    its own canny)."""
    name = control.casefold()
    return next((kind for kind in HINT_TYPES if kind in name), "custom")


class DrawThingsBackend(Backend):
    kind = "drawthings"
    capabilities = frozenset(
        {
            Capability.txt2img,
            Capability.img2img,
            Capability.negative_prompt,
            Capability.seed,
            Capability.scheduler,
            Capability.preview,
            Capability.lora,
            Capability.controlnet,
        }
    )

    def __init__(
        self,
        *,
        address: str,
        name: str | None = None,
        tls: bool = False,
        root_certificates: str | None = None,
        shared_secret_env: str | None = None,
        timeout: float = 600.0,
        concurrency: int = 1,
        models: list[str] | None = None,
        device: str | None = None,  # given to every kind by the runtime; unused here
    ) -> None:
        from easel.backends._remote import secret_from_env

        self.name = name or self.kind
        self.address = address
        self.timeout = timeout
        self.shared_secret = secret_from_env(shared_secret_env, f"backend {self.name!r}")
        self.configured_models = list(models or [])
        self.engine_models: list[str] = []
        self.credentials: grpc.ChannelCredentials | None = None
        if tls or root_certificates:
            roots = Path(root_certificates).read_bytes() if root_certificates else None
            self.credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        self._slots = asyncio.Semaphore(concurrency)
        self._channel: grpc.aio.Channel | None = None

    def __repr__(self) -> str:
        return f"<DrawThingsBackend {self.name!r} {self.address}>"

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            options = [
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ]
            if self.credentials is None:
                self._channel = grpc.aio.insecure_channel(self.address, options=options)
            else:
                self._channel = grpc.aio.secure_channel(
                    self.address, self.credentials, options=options
                )
        return self._channel

    async def start(self) -> None:
        with contextlib.suppress(GenerationError):
            await self.health()

    async def health(self) -> None:
        """``Echo``; refreshes the model list. Raises ``BackendUnavailable`` when down."""
        echo = self.channel.unary_unary(
            SERVICE + "Echo",
            request_serializer=pb.EchoRequest.SerializeToString,
            response_deserializer=pb.EchoReply.FromString,
        )
        request = pb.EchoRequest(name="easel")
        if self.shared_secret is not None:
            request.shared_secret = self.shared_secret
        try:
            reply = await echo(request, timeout=min(self.timeout, 10.0))
        except grpc.aio.AioRpcError as exc:
            raise self.error_for(exc) from exc
        self.engine_models = list(reply.files)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def models(self) -> list[ModelInfo]:
        names = list(dict.fromkeys([*self.configured_models, *self.engine_models]))
        return [ModelInfo(name=n, backend=self.name, family="remote") for n in names]

    def check(self, request: GenerationRequest) -> None:
        super().check(request)
        for side in ("width", "height"):
            if getattr(request, side) % SIZE_UNIT:
                raise Unsupported(
                    f"backend {self.name!r} (Draw Things) needs {side} a multiple of {SIZE_UNIT}"
                )

    def sampler_refusal(self, sampler: SamplerName, model: str | None) -> str | None:
        """Draw Things runs the samplers of its ``SamplerType`` enum."""
        return None if sampler.drawthings is not None else "Draw Things has no such sampler"

    def samplers(self, model: str | None = None) -> list[str]:
        """Its ``SamplerType`` samplers, schedule included ("DPM++ 2M Karras")."""
        return list(DRAWTHINGS_SAMPLERS)

    def error_for(self, exc: grpc.aio.AioRpcError) -> GenerationError:
        message = f"backend {self.name!r} ({self.address}): {exc.details() or exc.code().name}"
        if exc.code() in _TRANSIENT:
            return BackendUnavailable(message)
        if exc.code() is grpc.StatusCode.INVALID_ARGUMENT:
            return EngineRefused(message)
        return EngineError(message)

    def request_for(self, request: GenerationRequest) -> pb.ImageGenerationRequest:
        config = Configuration(
            width=request.width,
            height=request.height,
            seed=request.seed or 0,
            steps=request.steps,
            guidance_scale=request.cfg_scale,
            strength=request.strength if request.kind is JobKind.img2img else 1.0,
            model=request.model,
            sampler=sampler_name(request.scheduler) if request.scheduler else SAMPLERS[0],
            batch_size=request.batch_size,
            loras=tuple(LoRA(file=lora.name, weight=lora.weight) for lora in request.loras),
            controls=(
                ()
                if request.controlnet is None
                else (
                    Control(
                        file=request.controlnet.name,
                        weight=request.controlnet.scale,
                        guidance_start=request.controlnet.start,
                        guidance_end=request.controlnet.end,
                    ),
                )
            ),
        )
        message = pb.ImageGenerationRequest(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            configuration=encode_configuration(config),
            user=request.user_id,
            device=pb.LAPTOP,
            chunked=True,
        )
        if self.shared_secret is not None:
            message.shared_secret = self.shared_secret
        return message

    async def generate(self, request: GenerationRequest, context: RunContext) -> GenerationResult:
        try:
            message = self.request_for(request)
        except InvalidRequest as exc:
            raise EngineRefused(f"backend {self.name!r}: {exc.message}") from exc
        if request.kind is JobKind.img2img and request.init_image:
            init = request.init_image
            message.image = await asyncio.to_thread(
                lambda: encode_tensor(
                    decode_base64_image(init).resize((request.width, request.height))
                )
            )
        if (control := request.controlnet) is not None:  # its input image: a hint
            hint = await asyncio.to_thread(
                lambda: encode_tensor(
                    decode_base64_image(control.image).resize((request.width, request.height))
                )
            )
            message.hints.append(
                pb.HintProto(
                    hint_type=hint_type(control.name),
                    tensors=[pb.TensorAndWeight(tensor=hint, weight=1.0)],
                )
            )
        async with self._slots:
            tensors = await self._run(message, request.steps, context)
        images = await asyncio.to_thread(lambda: [decode_tensor(t) for t in tensors])
        if not images:
            raise EngineError(f"backend {self.name!r}: the server returned no images")
        return GenerationResult(
            images=images,
            seeds=request.seeds[: len(images)],
            model=request.model,
            info={"engine": self.kind},
        )

    async def _run(
        self, message: pb.ImageGenerationRequest, steps: int, context: RunContext
    ) -> list[bytes]:
        stream = self.channel.unary_stream(
            SERVICE + "GenerateImage",
            request_serializer=pb.ImageGenerationRequest.SerializeToString,
            response_deserializer=pb.ImageGenerationResponse.FromString,
        )
        call = stream(message, timeout=self.timeout)
        tensors: list[bytes] = []

        async def read() -> None:
            partial = b""
            total = steps
            async for response in call:
                for signpost in response.signposts:
                    if signpost.WhichOneof("signpost") == "sampling":
                        total = int(signpost.sampling.step) or total
                current = response.current_signpost
                if (
                    response.HasField("current_signpost")
                    and current.WhichOneof("signpost") == "sampling"
                ):
                    preview = None
                    if response.HasField("preview_image"):
                        preview = await asyncio.to_thread(decode_preview, response.preview_image)
                    context.progress(int(current.sampling.step), total, preview)
                for data in response.generated_images:
                    partial += data
                    if response.chunk_state == pb.LAST_CHUNK:
                        tensors.append(partial)
                        partial = b""

        reader = asyncio.create_task(read())
        try:
            while True:
                done, _ = await asyncio.wait({reader}, timeout=0.1)
                if done:
                    reader.result()
                    return tensors
                if context.cancelled:
                    call.cancel()
                    raise Cancelled("the job was cancelled")
        except grpc.aio.AioRpcError as exc:
            raise self.error_for(exc) from exc
        finally:
            if not reader.done():
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
