"""Draw Things' gRPC ``ImageGenerationService``, served from easel's runtime.

A Draw Things client (the app's "server offload", scripts using its proto, or
:class:`easel.client.grpc.DrawThingsClient`) points at ``easel serve --grpc-port 7859`` and
its generations go through easel's fair queue like any other job. The service is described
by ``easel/proto/imageservice.proto``; methods are wired here by hand (no generated service
code), with the message classes protoc made from that file.

- ``GenerateImage`` decodes the configuration FlatBuffer (size in 64 px units, steps, seed,
  guidance, sampler, strength, batch) and the init image tensor (img2img), submits the job,
  then streams: ``text_encoded`` when it starts, ``sampling`` with a preview (an RGB tensor,
  where the backend draws previews) at every step, ``image_decoded``, the images' total
  ``download_size``, and one response per image tensor (split in 4 MiB chunks when the
  client says it can join them). Cancelling the call cancels the job.
- ``Echo`` answers ``HELLO <name>`` with the served models as ``files``.
- ``Pubkey``, ``Hours`` and ``UploadFile`` answer UNIMPLEMENTED with the reason (easel has
  no key, no compute hours, and loads models from its own folder).
- With ``tls`` (``--grpc-tls-cert``/``--grpc-tls-key``) the port speaks TLS, as Draw Things'
  gRPCServerCLI does by default.
- ``FilesExist`` answers true for every file: easel runs a model it does not serve on its
  default model, and a Draw Things client that thinks a model is missing uploads it.
- The user is the request's ``user``, else ``x-easel-user`` or ``authorization`` metadata,
  else the peer address (:func:`easel.api.compat._shared.identify`). Masks are refused. The
  configuration's ``loras`` become the job's LoRAs; its first ``controls`` entry, with the
  first hint tensor as its image, the job's ControlNet. Other configuration fields are
  ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from PIL import Image
from pydantic import ValidationError

from easel.api.compat._errors import to_grpc
from easel.api.compat._shared import identify, png_bytes, submitted
from easel.api.errors import validation_error
from easel.errors import EaselError, InvalidRequest, Unsupported
from easel.images import decode_base64_image, encode_png_base64
from easel.jobs import Event, EventType, GenerationRequest, JobKind, JobState, job_error
from easel.proto import imageservice_pb2 as pb
from easel.proto.drawthings import (
    Configuration,
    decode_configuration,
    decode_tensor,
    encode_tensor,
    tensor_shape,
)
from easel.runtime.facade import Runtime
from easel.safety.gate import service_tokens
from easel.safety.services import Permission, current_service
from easel.safety.services import identify as identify_service

log = logging.getLogger("easel.grpc")

SERVICE = "ImageGenerationService"
CHUNK_BYTES = 4 * 1024 * 1024
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Init images and results are whole tensors: a 1024x1024 one is 6 MiB."""

DECODING_AT_ONCE = 2
"""Init-image tensors decoded at the same time; the rest wait (memory stays bounded)."""

Context = grpc.aio.ServicerContext[Any, Any]
Signpost = pb.ImageGenerationSignpostProto

_background: set[asyncio.Task[None]] = set()


class ImageGenerationService:
    """The methods of the service; each takes a request message and the call context."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.tokens = service_tokens(runtime.settings.safety)
        self._decoding = asyncio.Semaphore(DECODING_AT_ONCE)

    def _init_pixels(self, width: int, height: int) -> int:
        """The largest init image a request of this size takes: its own size (up to 4x
        the area, for a source that is resized down), never past the server's limit."""
        return min(self.runtime.settings.limits.max_pixels, max(4 * width * height, 64 * 64))

    async def _authorize(self, context: Context, permission: str) -> None:
        """With tokens configured, the call must carry one (``authorization: Bearer <t>``
        metadata); the service then owns the jobs of this call, as over HTTP."""
        if not self.tokens:
            return
        metadata = {key: value for key, value in context.invocation_metadata() or ()}
        kind, _, token = str(metadata.get("authorization", "")).partition(" ")
        service = identify_service(self.tokens, token.strip() if kind.lower() == "bearer" else None)
        if service is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "a valid service token is required"
            )
        elif not service.may(permission):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"service {service.name!r} lacks the {permission!r} scope",
            )
        current_service.set(service)

    def served(self) -> list[str]:
        return [m.name for m in self.runtime.served_models()]

    async def echo(self, request: pb.EchoRequest, context: Context) -> pb.EchoReply:
        await self._authorize(context, Permission.read)
        return pb.EchoReply(message=f"HELLO {request.name}", files=self.served())

    async def files_exist(
        self, request: pb.FileListRequest, context: Context
    ) -> pb.FileExistenceResponse:
        await self._authorize(context, Permission.read)
        files = [*request.files, *request.files_with_hash]
        return pb.FileExistenceResponse(
            files=files,
            existences=[True] * len(files),
            hashes=[b""] * len(request.files_with_hash),
        )

    async def generate_image(
        self, request: pb.ImageGenerationRequest, context: Context
    ) -> AsyncIterator[pb.ImageGenerationResponse]:
        await self._authorize(context, Permission.submit)
        try:
            generation = await self._translate(request, context)
            async with submitted(self.runtime, generation) as run:
                job_id = run.view.id
                try:
                    async for event in run.events:
                        if (update := await _update(event, generation)) is not None:
                            yield update
                        if event.type is EventType.started and generation.kind is JobKind.img2img:
                            yield _signpost(generation, image_encoded=Signpost.ImageEncoded())
                except BaseException:
                    _cancel_later(self.runtime, job_id)  # the client went away
                    raise
            job = await self.runtime.get(job_id)
        except EaselError as exc:
            await context.abort(*to_grpc(exc))
        if job.state is not JobState.succeeded:
            await context.abort(*to_grpc(job_error(job)))
        tensors = await _tensors(await png_bytes(self.runtime, job))
        yield pb.ImageGenerationResponse(download_size=sum(len(t) for t in tensors))
        for tensor in tensors:
            for response in _chunks(tensor, request.chunked):
                yield response

    async def _translate(
        self, request: pb.ImageGenerationRequest, context: Context
    ) -> GenerationRequest:
        """The Draw Things request -> easel's one vocabulary."""
        if request.HasField("mask"):
            raise Unsupported("masks (inpainting) are not supported yet; send the image alone")
        config = decode_configuration(request.configuration)
        metadata = {key: value for key, value in context.invocation_metadata() or ()}
        fields: dict[str, Any] = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "width": config.width,
            "height": config.height,
            "steps": config.steps,
            "cfg_scale": config.guidance_scale,
            "scheduler": config.sampler,
            "seed": config.seed,
            "batch_size": config.batch_count * config.batch_size,
            "model": config.model if config.model in self.served() else None,
            "user_id": identify(
                explicit=request.user,
                header=_text(metadata.get("x-easel-user")),
                authorization=_text(metadata.get("authorization")),
                host=_peer_host(context.peer()),
            ),
            "metadata": {"api": "drawthings"},
        }
        if request.HasField("image"):
            tensor = _unwrap(request.image, request.contents)
            most = self._init_pixels(config.width, config.height)
            width, height, _ = tensor_shape(tensor)  # the header alone: before any decoding
            if width * height > most:
                raise InvalidRequest(
                    f"the image tensor is {width}x{height}; a {config.width}x{config.height} "
                    f"request takes an image of at most {most} pixels (send it at its size)"
                )
            fields["kind"] = JobKind.img2img
            async with self._decoding:  # a few at a time: decoding is the memory cost
                fields["init_image"] = await asyncio.to_thread(
                    lambda: encode_png_base64(decode_tensor(tensor, most))
                )
            fields["strength"] = config.strength
        fields["loras"] = [{"name": lora.file, "weight": lora.weight} for lora in config.loras]
        if config.controls:
            fields["controlnet"] = await self._control(request, config)
        try:
            return GenerationRequest.model_validate(fields)
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None

    async def _control(
        self, request: pb.ImageGenerationRequest, config: Configuration
    ) -> dict[str, Any]:
        """The first ``Control`` of the configuration and its hint image (easel runs one
        ControlNet a job: more are refused, as is a control without an image)."""
        if len(config.controls) > 1:
            raise Unsupported("easel runs one ControlNet a job; send one control")
        tensors = [t.tensor for hint in request.hints for t in hint.tensors if t.tensor]
        if not tensors:
            raise InvalidRequest(
                f"control {config.controls[0].file!r} has no input image; send it in hints"
            )
        tensor = _unwrap(tensors[0], request.contents)
        most = self._init_pixels(config.width, config.height)
        width, height, _ = tensor_shape(tensor)
        if width * height > most:
            raise InvalidRequest(
                f"the hint tensor is {width}x{height}; a {config.width}x{config.height} "
                f"request takes a hint of at most {most} pixels"
            )
        async with self._decoding:
            image = await asyncio.to_thread(lambda: encode_png_base64(decode_tensor(tensor, most)))
        control = config.controls[0]
        return {
            "name": control.file,
            "image": image,
            "scale": control.weight,
            "start": control.guidance_start,
            "end": control.guidance_end,
        }


UNIMPLEMENTED = {
    "Pubkey": "easel publishes no key: Draw Things' signed requests (its compute-unit proxy) "
    "do not apply; authenticate with a service token (authorization: Bearer <token>)",
    "Hours": "easel keeps no Draw Things compute hours; its queue has per-user caps and "
    "priority tiers instead (GET /v1/queue)",
    "UploadFile": "easel serves the models of its own models folder (easel models); upload "
    "a model there instead of over gRPC",
}
"""Draw Things methods easel does not offer, each refused with the reason."""


def _refusal(method: str) -> Any:
    async def refuse(request: Any, context: Context) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method}: {UNIMPLEMENTED[method]}")

    return refuse


M = TypeVar("M", bound=Message)
R = TypeVar("R")


async def _parse(kind: type[M], raw: bytes, context: Context) -> M:
    """The request message, parsed here rather than by gRPC (whose failure is ``UNKNOWN``
    with a Python class name): a corrupt one is ``INVALID_ARGUMENT`` with a sentence."""
    try:
        return kind.FromString(raw)
    except (DecodeError, ValueError, TypeError):
        name = kind.DESCRIPTOR.name
        await context.abort(*to_grpc(InvalidRequest(f"the request is not a valid {name}")))
        raise  # abort raised already; this line is never reached


def _unary(
    kind: type[M], method: Callable[[M, Context], Awaitable[R]]
) -> Callable[[bytes, Context], Awaitable[R]]:
    async def handle(raw: bytes, context: Context) -> R:
        return await method(await _parse(kind, raw, context), context)

    return handle


def _streaming(
    kind: type[M], method: Callable[[M, Context], AsyncIterator[R]]
) -> Callable[[bytes, Context], AsyncIterator[R]]:
    async def handle(raw: bytes, context: Context) -> AsyncIterator[R]:
        async for item in method(await _parse(kind, raw, context), context):
            yield item

    return handle


def service_handler(runtime: Runtime) -> grpc.GenericRpcHandler:
    """The service's methods, by the names Draw Things clients call."""
    service = ImageGenerationService(runtime)
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Pubkey": grpc.unary_unary_rpc_method_handler(_refusal("Pubkey")),
            "Hours": grpc.unary_unary_rpc_method_handler(_refusal("Hours")),
            "UploadFile": grpc.stream_stream_rpc_method_handler(_refusal("UploadFile")),
            "GenerateImage": grpc.unary_stream_rpc_method_handler(
                _streaming(pb.ImageGenerationRequest, service.generate_image),
                response_serializer=pb.ImageGenerationResponse.SerializeToString,
            ),
            "Echo": grpc.unary_unary_rpc_method_handler(
                _unary(pb.EchoRequest, service.echo),
                response_serializer=pb.EchoReply.SerializeToString,
            ),
            "FilesExist": grpc.unary_unary_rpc_method_handler(
                _unary(pb.FileListRequest, service.files_exist),
                response_serializer=pb.FileExistenceResponse.SerializeToString,
            ),
        },
    )


async def start_server(
    runtime: Runtime,
    host: str,
    port: int,
    tls: tuple[Path, Path] | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Serve the service on ``host:port`` (0: any free port) in this event loop; returns the
    server and the port it bound. ``tls``: (certificate chain, private key) PEM files."""
    # a request is no larger than an HTTP body may be (``safety.max_body_bytes``)
    receive = min(MAX_MESSAGE_BYTES, runtime.settings.safety.max_body_bytes)
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", receive),
        ]
    )
    server.add_generic_rpc_handlers((service_handler(runtime),))
    if tls is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        chain, key = (path.read_bytes() for path in tls)
        credentials = grpc.ssl_server_credentials([(key, chain)])
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    if not bound:
        raise OSError(f"could not serve gRPC on {host}:{port}; is the port in use?")
    await server.start()
    log.info(
        "serving Draw Things gRPC (ImageGenerationService) on %s:%d%s",
        host, bound, " with TLS" if tls else "",
    )  # fmt: skip
    return server, bound


# -- translation out ---------------------------------------------------------------------


def _expected(generation: GenerationRequest) -> list[pb.ImageGenerationSignpostProto]:
    signposts = [Signpost(text_encoded=Signpost.TextEncoded())]
    if generation.kind is JobKind.img2img:
        signposts.append(Signpost(image_encoded=Signpost.ImageEncoded()))
    signposts.append(Signpost(sampling=Signpost.Sampling(step=generation.steps)))
    signposts.append(Signpost(image_decoded=Signpost.ImageDecoded()))
    return signposts


def _signpost(generation: GenerationRequest, **current: Any) -> pb.ImageGenerationResponse:
    return pb.ImageGenerationResponse(
        current_signpost=Signpost(**current), signposts=_expected(generation)
    )


async def _update(event: Event, generation: GenerationRequest) -> pb.ImageGenerationResponse | None:
    """One easel event -> the Draw Things progress message, if it has one."""
    if event.type is EventType.started:
        current = Signpost(text_encoded=Signpost.TextEncoded())
    elif event.type is EventType.progress:
        current = Signpost(sampling=Signpost.Sampling(step=event.step or 0))
    elif event.type is EventType.succeeded:
        current = Signpost(image_decoded=Signpost.ImageDecoded())
    else:
        return None
    response = pb.ImageGenerationResponse(current_signpost=current, signposts=_expected(generation))
    if event.preview:
        preview = event.preview
        response.preview_image = await asyncio.to_thread(
            lambda: encode_tensor(decode_base64_image(preview))
        )
    return response


async def _tensors(pngs: list[bytes]) -> list[bytes]:
    def convert() -> list[bytes]:
        tensors = []
        for png in pngs:
            with Image.open(io.BytesIO(png)) as image:
                tensors.append(encode_tensor(image))
        return tensors

    return await asyncio.to_thread(convert)


def _chunks(tensor: bytes, chunked: bool) -> list[pb.ImageGenerationResponse]:
    """One response per image; in 4 MiB pieces when the client joins chunks."""
    if not chunked or len(tensor) <= CHUNK_BYTES:
        return [pb.ImageGenerationResponse(generated_images=[tensor], scale_factor=1)]
    pieces = range(0, len(tensor), CHUNK_BYTES)
    return [
        pb.ImageGenerationResponse(
            generated_images=[tensor[start : start + CHUNK_BYTES]],
            scale_factor=1,
            chunk_state=pb.LAST_CHUNK if start + CHUNK_BYTES >= len(tensor) else pb.MORE_CHUNKS,
        )
        for start in pieces
    ]


def _unwrap(data: bytes, contents: list[bytes] | Any) -> bytes:
    """A 32-byte value names a blob of ``contents`` by its sha256 (content addressing)."""
    if len(data) != 32:
        return data
    for blob in contents:
        if hashlib.sha256(blob).digest() == data:
            return bytes(blob)
    raise InvalidRequest("the image names a content hash that the request does not carry")


def _cancel_later(runtime: Runtime, job_id: str) -> None:
    """Cancel a job from a handler that is itself being cancelled (it cannot await)."""

    async def cancel() -> None:
        with contextlib.suppress(EaselError):
            await runtime.cancel(job_id)

    task = asyncio.get_running_loop().create_task(cancel())
    _background.add(task)
    task.add_done_callback(_background.discard)


def _peer_host(peer: str) -> str:
    """``ipv4:127.0.0.1:5000`` / ``ipv6:[::1]:5000`` -> the address."""
    _, _, rest = peer.partition(":")
    host, _, _ = rest.rpartition(":")
    return host.strip("[]") or peer


def _text(value: str | bytes | None) -> str | None:
    return value.decode(errors="replace") if isinstance(value, bytes) else value
