"""A Draw Things gRPC client: works against easel (``easel serve --grpc-port``) and, since
both speak the same service, against a Draw Things server (the app, or gRPCServerCLI).

    from easel.client.grpc import DrawThingsClient

    with DrawThingsClient("127.0.0.1:7859") as client:
        images = client.generate("a red fox", width=512, height=512, steps=20, seed=42)
        images[0].save("fox.png")

:class:`AsyncDrawThingsClient` is the same with ``async``, and ``stream()`` besides.
Sizes are in pixels and must be multiples of 64 (Draw Things counts 64-pixel units).
A Draw Things server sends fpzip-compressed images when started with compression: reading
them needs ``pip install fpzip``. Its previews are latents, which only the model can turn
into pixels, so ``Progress.preview`` is None there; easel's previews are images.
"""

from __future__ import annotations

import asyncio
import io
import random
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from PIL.Image import Image

from easel.client._common import AsyncResource
from easel.client._drawthings_api import (
    STAGES,
    ImageGenerationConfig,
    PreviewCallback,
    StreamingProgressHandler,
    drawthings_sampler,
    png_bytes,
    save_images,
)
from easel.client._portal import Blocking
from easel.errors import (
    ERRORS,
    Cancelled,
    EaselError,
    Forbidden,
    GenerationError,
    InvalidRequest,
    NotFound,
    QueueFull,
    ServerUnreachable,
    TimedOut,
    Unauthorized,
)
from easel.proto import imageservice_pb2 as pb
from easel.proto.drawthings import (
    Configuration,
    decode_preview,
    decode_tensor,
    encode_configuration,
    encode_tensor,
)

__all__ = [
    "AsyncDrawThingsClient",
    "DrawThingsClient",
    "Echo",
    "ImageGenerationConfig",
    "Progress",
    "StreamingProgressHandler",
    "drawthings_sampler",
    "quick_generate",
    "save_images",
    "tls_credentials",
]

SERVICE = "/ImageGenerationService/"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_ADDRESS = "127.0.0.1:7859"
"""Draw Things' usual gRPC port."""


@dataclass(frozen=True)
class Progress:
    """One progress message: the stage (``text_encoded``, ``sampling``, ``image_decoded``...),
    the step while sampling, the run's total steps, and a preview when there is one."""

    stage: str | None
    step: int | None = None
    total: int | None = None
    preview: Image | None = None


@dataclass(frozen=True)
class Echo:
    message: str
    files: list[str]


ProgressCallback = Callable[[Progress], object]


class AsyncDrawThingsClient(AsyncResource):
    """Draw Things' ``ImageGenerationService`` over grpc.aio; errors become ``EaselError``."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        user: str = "easel",
        shared_secret: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = None,
    ) -> None:
        """``credentials``: ``grpc.ssl_channel_credentials(...)`` for a TLS server (Draw
        Things' gRPCServerCLI uses TLS unless started with ``--no-tls``)."""
        self.address = address
        self.user = user
        self.shared_secret = shared_secret
        self.timeout = timeout
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(address, options=options)
        else:
            self._channel = grpc.aio.secure_channel(address, credentials, options=options)
        self._generate = self._channel.unary_stream(
            SERVICE + "GenerateImage",
            request_serializer=pb.ImageGenerationRequest.SerializeToString,
            response_deserializer=pb.ImageGenerationResponse.FromString,
        )
        self._echo = self._channel.unary_unary(
            SERVICE + "Echo",
            request_serializer=pb.EchoRequest.SerializeToString,
            response_deserializer=pb.EchoReply.FromString,
        )
        self._files_exist = self._channel.unary_unary(
            SERVICE + "FilesExist",
            request_serializer=pb.FileListRequest.SerializeToString,
            response_deserializer=pb.FileExistenceResponse.FromString,
        )

    async def aclose(self) -> None:
        await self._channel.close()

    async def echo(self, name: str | None = None) -> Echo:
        """Liveness; ``files`` are the models the server offers."""
        request = pb.EchoRequest(name=name or self.user)
        if self.shared_secret is not None:
            request.shared_secret = self.shared_secret
        try:
            reply: pb.EchoReply = await self._echo(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _error(self.address, exc) from exc
        return Echo(message=reply.message, files=list(reply.files))

    async def stream(
        self,
        prompt: str,
        *,
        negative_prompt: str = "",
        image: Image | None = None,
        config: Configuration | None = None,
        **fields: Any,
    ) -> AsyncIterator[Progress | list[Image]]:
        """:class:`Progress` as the server reports it, then the images (one list, last).

        ``fields`` are :class:`~easel.proto.drawthings.Configuration` fields (``width``,
        ``steps``, ``seed``...) and override ``config``; a missing seed is drawn at random.
        """
        given = config
        config = replace(config or Configuration(), **fields)
        if given is None and "seed" not in fields:
            config = replace(config, seed=random.randrange(2**32))
        request = pb.ImageGenerationRequest(
            prompt=prompt,
            negative_prompt=negative_prompt,
            configuration=encode_configuration(config),
            user=self.user,
            device=pb.LAPTOP,
            chunked=True,
        )
        if image is not None:
            request.image = await asyncio.to_thread(encode_tensor, image)
        if self.shared_secret is not None:
            request.shared_secret = self.shared_secret
        tensors: list[bytes] = []
        partial_tensor = b""
        total: int | None = None
        try:
            async for response in self._generate(request, timeout=self.timeout):
                if response.signposts:
                    total = _total(response.signposts) or total
                if response.HasField("current_signpost"):
                    yield await _progress(response, total)
                for data in response.generated_images:
                    partial_tensor += data
                    if response.chunk_state == pb.LAST_CHUNK:
                        tensors.append(partial_tensor)
                        partial_tensor = b""
        except grpc.RpcError as exc:
            raise _error(self.address, exc) from exc
        yield await asyncio.to_thread(lambda: [decode_tensor(t) for t in tensors])

    async def files_exist(self, files: list[str]) -> dict[str, bool]:
        request = pb.FileListRequest(files=files)
        if self.shared_secret is not None:
            request.shared_secret = self.shared_secret
        try:
            reply = await self._files_exist(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise _error(self.address, exc) from exc
        return dict(zip(reply.files, reply.existences, strict=False))

    async def generate_image(
        self,
        prompt: str,
        config: ImageGenerationConfig,
        negative_prompt: str = "",
        input_image: Image | bytes | str | None = None,
        progress_callback: Callable[[str, int], object] | None = None,
        preview_callback: PreviewCallback | None = None,
    ) -> list[bytes]:
        """See :meth:`DrawThingsClient.generate_image`."""
        image = None
        if input_image is not None:
            image = (await _image_of(input_image)).resize((config.width, config.height))
        images: list[Image] = []
        stream = self.stream(
            prompt, negative_prompt=negative_prompt, image=image,
            config=config.to_configuration(),
        )  # fmt: skip
        async for item in stream:
            if isinstance(item, Progress):
                if progress_callback is not None and item.stage in STAGES:
                    progress_callback(STAGES[item.stage], item.step or 0)
                if preview_callback is not None and item.preview is not None:
                    preview_callback(await asyncio.to_thread(png_bytes, item.preview))
            else:
                images = item
        return await asyncio.to_thread(lambda: [png_bytes(i) for i in images])

    async def generate(
        self,
        prompt: str,
        *,
        on_progress: ProgressCallback | None = None,
        **params: Any,
    ) -> list[Image]:
        """Generate and return the images; ``on_progress`` gets each :class:`Progress`.
        ``params`` are those of :meth:`stream`."""
        images: list[Image] = []
        async for item in self.stream(prompt, **params):
            if isinstance(item, Progress):
                if on_progress is not None:
                    on_progress(item)
            else:
                images = item
        return images


def tls_credentials(
    *, insecure: bool = True, verify_ssl: bool = False, ssl_cert_path: str | None = None
) -> grpc.ChannelCredentials | None:
    """The Draw Things client's TLS options -> gRPC credentials (None: plain text).
    ``ssl_cert_path`` names the PEM of a self-signed server (gRPCServerCLI's own)."""
    if insecure and ssl_cert_path is None:
        return None
    roots = Path(ssl_cert_path).read_bytes() if ssl_cert_path else None
    return grpc.ssl_channel_credentials(root_certificates=roots)


async def _image_of(image: Image | bytes | str) -> Image:
    from PIL import Image as PILImage

    def load() -> Image:
        if isinstance(image, bytes):
            with PILImage.open(io.BytesIO(image)) as opened:
                return opened.convert("RGB")
        if isinstance(image, str):
            with PILImage.open(image) as opened:
                return opened.convert("RGB")
        return image

    return await asyncio.to_thread(load)


class DrawThingsClient(Blocking[AsyncDrawThingsClient]):
    """The blocking :class:`AsyncDrawThingsClient`, run on a private event loop thread.

    Also the Draw Things client's script API: ``DrawThingsClient(address, insecure=False,
    ssl_cert_path=...)`` for TLS, ``generate_image(prompt, config, progress_callback=...)``,
    ``save_images``, ``files_exist``.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        insecure: bool = True,
        verify_ssl: bool = False,
        enable_compression: bool = False,
        ssl_cert_path: str | None = None,
        **options: Any,
    ) -> None:
        if "credentials" not in options:
            options["credentials"] = tls_credentials(
                insecure=insecure, verify_ssl=verify_ssl, ssl_cert_path=ssl_cert_path
            )
        super().__init__(partial(AsyncDrawThingsClient, address, **options))

    def echo(self, name: str | None = None) -> Echo:
        return self._portal.call(self._async.echo, name)

    def generate(
        self, prompt: str, *, on_progress: ProgressCallback | None = None, **params: Any
    ) -> list[Image]:
        """See :meth:`AsyncDrawThingsClient.generate`; ``on_progress`` runs on the client's
        event loop thread."""
        call = partial(self._async.generate, prompt, on_progress=on_progress, **params)
        return self._portal.call(call)

    def generate_image(
        self,
        prompt: str,
        config: ImageGenerationConfig,
        negative_prompt: str = "",
        input_image: Image | bytes | str | None = None,
        progress_callback: Callable[[str, int], object] | None = None,
        preview_callback: PreviewCallback | None = None,
        **_ignored: Any,
    ) -> list[bytes]:
        """The Draw Things client's call: the images as PNG bytes. ``progress_callback``
        gets ``(stage, step)`` ("Sampling", 3), ``preview_callback`` each preview as PNG."""
        call = partial(
            self._async.generate_image, prompt, config, negative_prompt=negative_prompt,
            input_image=input_image, progress_callback=progress_callback,
            preview_callback=preview_callback,
        )  # fmt: skip
        return self._portal.call(call)

    def files_exist(self, files: list[str]) -> dict[str, bool]:
        return self._portal.call(self._async.files_exist, files)

    @staticmethod
    def save_images(
        images: list[bytes], output_dir: str | Path = ".", prefix: str = "generated"
    ) -> list[str]:
        """Write ``{prefix}_{n}.png`` files; returns their paths."""
        return save_images(images, output_dir, prefix)


def quick_generate(
    server_address: str,
    prompt: str,
    model: str = "",
    steps: int = 16,
    width: int = 512,
    height: int = 512,
    cfg_scale: float = 5.0,
    scheduler: str = "UniPC ays",
    output_path: str | Path = "output.png",
    show_progress: bool = True,
    **client_options: Any,
) -> str:
    """One image from a Draw Things gRPC server (or easel's) to ``output_path``; returns it."""
    config = ImageGenerationConfig(
        model=model, steps=steps, width=width, height=height, cfg_scale=cfg_scale,
        scheduler=scheduler,
    )  # fmt: skip
    handler = StreamingProgressHandler(steps) if show_progress else None
    with DrawThingsClient(server_address, **client_options) as client:
        images = client.generate_image(
            prompt, config, progress_callback=handler.on_progress if handler else None
        )
    if handler is not None:
        handler.on_complete()
    if not images:
        raise EaselError(f"{server_address} returned no image", code="generation_failed")
    target = Path(output_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(images[0])
    return str(target)


def _total(signposts: Iterable[pb.ImageGenerationSignpostProto]) -> int | None:
    for signpost in signposts:
        if signpost.WhichOneof("signpost") == "sampling":
            return int(signpost.sampling.step)
    return None


async def _progress(response: pb.ImageGenerationResponse, total: int | None) -> Progress:
    current = response.current_signpost
    stage = current.WhichOneof("signpost")
    step = current.sampling.step if stage == "sampling" else None
    preview = None
    if response.HasField("preview_image"):
        preview = await asyncio.to_thread(decode_preview, response.preview_image)
    return Progress(stage=stage, step=step, total=total, preview=preview)


_CLASSES: dict[grpc.StatusCode, type[EaselError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.UNAUTHENTICATED: Unauthorized,
    grpc.StatusCode.PERMISSION_DENIED: Forbidden,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: QueueFull,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAVAILABLE: ServerUnreachable,
    grpc.StatusCode.DEADLINE_EXCEEDED: TimedOut,
}


def _error(address: str, exc: grpc.RpcError) -> EaselError:
    """A gRPC status -> the catalogue's exception. easel's server starts its details with
    the error's code (``queue_full: ...``); any other server gets the class of its status."""
    status = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
    details = (exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)) or ""
    code, _, message = details.partition(": ")
    if code in ERRORS:
        return ERRORS[code](f"{address}: {message}")
    cls = _CLASSES.get(status, GenerationError) if status else EaselError
    return cls(f"{address}: {details or status}")
