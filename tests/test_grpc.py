"""Draw Things' gRPC service, through stubs protoc generates from easel's proto at test time,
and through easel's own DrawThingsClient; plus the FlatBuffers and tensor codecs."""

from __future__ import annotations

import hashlib
import io
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import flatbuffers
import grpc
import httpx
import pytest
from PIL import Image

from easel.api import create_app
from easel.client.grpc import DrawThingsClient, Progress
from easel.config import Safety, Settings
from easel.errors import InvalidRequest
from easel.proto import _generate
from easel.proto.drawthings import (
    SAMPLERS,
    Configuration,
    decode_configuration,
    decode_tensor,
    encode_configuration,
    encode_tensor,
)
from easel.runtime.facade import Runtime
from tests._backends import PreviewMock
from tests.servers import easel_serve, free_port, serve


@pytest.fixture
def grpc_server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(HTTP base URL, gRPC address) of a server whose mock draws a preview per step."""
    settings = Settings(data_dir=tmp_path / "data", backend="mock")
    runtime = Runtime(settings, backends={"mock": PreviewMock(step_delay=0.0)})
    app = create_app(runtime=runtime, grpc_port=0)
    with serve(app) as url:
        yield url, f"127.0.0.1:{app.state.grpc_port}"


@pytest.fixture
def slow_grpc_server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    settings = Settings(data_dir=tmp_path / "data", backend="mock")
    runtime = Runtime(settings, backends={"mock": PreviewMock(step_delay=0.03)})
    app = create_app(runtime=runtime, grpc_port=0)
    with serve(app) as url:
        yield url, f"127.0.0.1:{app.state.grpc_port}"


def _signpost(response: Any) -> tuple[str | None, int | None]:
    if not response.HasField("current_signpost"):
        return None, None
    kind = response.current_signpost.WhichOneof("signpost")
    return kind, response.current_signpost.sampling.step if kind == "sampling" else None


def _only_job(url: str, user: str) -> dict[str, Any]:
    [job] = httpx.get(f"{url}/v1/jobs", params={"user_id": user}).json()["jobs"]
    result: dict[str, Any] = job
    return result


def test_generate_streams_progress_then_images(
    grpc_server: tuple[str, str], stubs: tuple[ModuleType, ModuleType]
) -> None:
    url, address = grpc_server
    pb, pb_grpc = stubs
    config = Configuration(
        width=128, height=64, steps=3, seed=42, guidance_scale=4.5, sampler="Euler a Trailing",
        batch_count=2,
    )  # fmt: skip
    request = pb.ImageGenerationRequest(
        prompt="a red fox",
        negative_prompt="blurry",
        configuration=encode_configuration(config),
        user="dt-user",
    )
    with grpc.insecure_channel(address) as channel:
        responses = list(pb_grpc.ImageGenerationServiceStub(channel).GenerateImage(request))

    progress = [_signpost(r) for r in responses if r.HasField("current_signpost")]
    assert progress == [
        ("text_encoded", None),
        ("sampling", 1),
        ("sampling", 2),
        ("sampling", 3),
        ("image_decoded", None),
    ]
    # every progress message lists the run's stages, sampling with the total steps
    stages = [(s.WhichOneof("signpost"), s.sampling.step) for s in responses[0].signposts]
    assert stages == [("text_encoded", 0), ("sampling", 3), ("image_decoded", 0)]
    previews = [decode_tensor(r.preview_image) for r in responses if r.HasField("preview_image")]
    assert [p.size for p in previews] == [(32, 24)] * 3

    finals = responses[len(progress) :]
    assert finals[0].download_size == sum(len(r.generated_images[0]) for r in finals[1:])
    images = [decode_tensor(r.generated_images[0]) for r in finals[1:]]
    assert [image.size for image in images] == [(128, 64), (128, 64)]

    job = _only_job(url, "dt-user")
    request_seen = job["request"]
    assert (request_seen["width"], request_seen["height"], request_seen["steps"]) == (128, 64, 3)
    assert (request_seen["seed"], request_seen["cfg_scale"]) == (42, 4.5)
    assert (request_seen["scheduler"], request_seen["batch_size"]) == ("Euler a Trailing", 2)
    assert request_seen["negative_prompt"] == "blurry"
    # the tensors carry exactly the pixels easel stored
    for index, image in enumerate(images):
        png = httpx.get(url + job["images"][index]["url"]).content
        with Image.open(io.BytesIO(png)) as stored:
            assert stored.convert("RGB").tobytes() == image.tobytes()


def test_img2img_from_a_content_addressed_tensor(
    grpc_server: tuple[str, str], stubs: tuple[ModuleType, ModuleType]
) -> None:
    url, address = grpc_server
    pb, pb_grpc = stubs
    tensor = encode_tensor(Image.new("RGB", (64, 64), (255, 0, 0)))
    config = Configuration(width=64, height=64, steps=2, seed=1, strength=0.25)
    request = pb.ImageGenerationRequest(
        prompt="bluer",
        image=hashlib.sha256(tensor).digest(),
        contents=[tensor],
        configuration=encode_configuration(config),
        user="painter",
    )
    with grpc.insecure_channel(address) as channel:
        responses = list(pb_grpc.ImageGenerationServiceStub(channel).GenerateImage(request))
    [image] = [decode_tensor(i) for r in responses for i in r.generated_images]
    red = image.getpixel((60, 60))
    assert isinstance(red, tuple) and red[0] > 150
    job = _only_job(url, "painter")
    assert (job["request"]["kind"], job["request"]["strength"]) == ("img2img", 0.25)


def test_echo_and_files_exist(
    grpc_server: tuple[str, str], stubs: tuple[ModuleType, ModuleType]
) -> None:
    pb, pb_grpc = stubs
    with grpc.insecure_channel(grpc_server[1]) as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        reply = stub.Echo(pb.EchoRequest(name="tester"))
        exists = stub.FilesExist(pb.FileListRequest(files=["mock", "sd_v1.5_f16.ckpt"]))
    assert (reply.message, list(reply.files)) == ("HELLO tester", ["mock"])
    assert list(exists.existences) == [True, True]


def test_bad_requests_are_invalid_argument(
    grpc_server: tuple[str, str], stubs: tuple[ModuleType, ModuleType]
) -> None:
    pb, pb_grpc = stubs
    good = encode_configuration(Configuration(width=64, height=64, steps=1))
    cases = [
        pb.ImageGenerationRequest(prompt="x", configuration=b"\x00\x01"),
        pb.ImageGenerationRequest(prompt="x", configuration=good, mask=b"m"),
        pb.ImageGenerationRequest(prompt="", configuration=good),
    ]
    with grpc.insecure_channel(grpc_server[1]) as channel:
        stub = pb_grpc.ImageGenerationServiceStub(channel)
        for request in cases:
            with pytest.raises(grpc.RpcError) as info:
                list(stub.GenerateImage(request))
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_cancelling_the_call_cancels_the_job(
    slow_grpc_server: tuple[str, str], stubs: tuple[ModuleType, ModuleType]
) -> None:
    url, address = slow_grpc_server
    pb, pb_grpc = stubs
    config = encode_configuration(Configuration(width=64, height=64, steps=100))
    with grpc.insecure_channel(address) as channel:
        call = pb_grpc.ImageGenerationServiceStub(channel).GenerateImage(
            pb.ImageGenerationRequest(prompt="slow", configuration=config, user="quitter")
        )
        for response in call:
            if _signpost(response) == ("sampling", 2):
                call.cancel()
                break
    deadline = time.monotonic() + 5
    while _only_job(url, "quitter")["state"] != "cancelled":
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_the_draw_things_client_against_easel(grpc_server: tuple[str, str]) -> None:
    url, address = grpc_server
    seen: list[Progress] = []
    with DrawThingsClient(address, user="client-user") as client:
        assert client.echo().message == "HELLO client-user"
        images = client.generate(
            "a red fox", width=192, height=64, steps=2, seed=9, on_progress=seen.append
        )
    assert [image.size for image in images] == [(192, 64)]
    assert [(p.stage, p.step, p.total) for p in seen] == [
        ("text_encoded", None, 2),
        ("sampling", 1, 2),
        ("sampling", 2, 2),
        ("image_decoded", None, 2),
    ]
    assert [p.preview.size for p in seen if p.preview is not None] == [(32, 24)] * 2
    assert _only_job(url, "client-user")["request"]["seed"] == 9


def test_the_committed_messages_match_the_proto(tmp_path: Path) -> None:
    """The committed ``imageservice_pb2`` describes exactly what the proto says today."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    from easel.proto import imageservice_pb2

    out = tmp_path / "set.pb"
    assert protoc.main(
        ["protoc", f"--proto_path={_generate.HERE}", f"--descriptor_set_out={out}",
         str(_generate.PROTO)]
    ) == 0  # fmt: skip
    [fresh] = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    for message in fresh.message_type:  # generated code leaves the derived json names out
        for field in message.field:
            field.ClearField("json_name")
        for nested in message.nested_type:
            for field in nested.field:
                field.ClearField("json_name")
    committed = descriptor_pb2.FileDescriptorProto.FromString(
        imageservice_pb2.DESCRIPTOR.serialized_pb
    )
    assert committed == fresh, "stale: run python -m easel.proto._generate"


# -- codecs -----------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_configuration_round_trips(sampler: str) -> None:
    config = Configuration(
        width=768, height=512, seed=2**32 - 1, steps=30, guidance_scale=4.5, strength=0.6,
        model="sd_v1.5_f16.ckpt", sampler=sampler, batch_count=2, batch_size=3,
    )  # fmt: skip
    assert decode_configuration(encode_configuration(config)) == config


def test_configuration_fields_sit_where_draw_things_puts_them() -> None:
    """A table written by hand at Draw Things' field ids (not by easel's encoder)."""
    builder = flatbuffers.Builder(64)
    model = builder.CreateString("x.ckpt")
    builder.StartObject(11)
    builder.PrependUint16Slot(1, 12, 0)  # start_width: 12 x 64 px
    builder.PrependUint16Slot(2, 8, 0)  # start_height
    builder.PrependUint32Slot(3, 1234, 0)  # seed
    builder.PrependUint32Slot(4, 25, 0)  # steps
    builder.PrependFloat32Slot(5, 6.5, 0.0)  # guidance_scale
    builder.PrependUOffsetTRelativeSlot(7, model, 0)  # model
    builder.PrependInt8Slot(8, 1, 0)  # sampler: EulerA
    builder.PrependUint32Slot(10, 2, 1)  # batch_size
    builder.Finish(builder.EndObject())
    config = decode_configuration(bytes(builder.Output()))
    assert (config.width, config.height, config.seed, config.steps) == (768, 512, 1234, 25)
    assert (config.guidance_scale, config.model, config.sampler) == (6.5, "x.ckpt", "Euler a")
    assert (config.batch_count, config.batch_size, config.strength) == (1, 2, 0.0)


def test_damaged_configurations_are_invalid_requests() -> None:
    with pytest.raises(InvalidRequest):
        decode_configuration(b"\x00" * 3)
    with pytest.raises(InvalidRequest):
        decode_configuration(b"\xff\xff\xff\x7f" + b"\x00" * 8)
    with pytest.raises(InvalidRequest):
        encode_configuration(Configuration(width=500))


def test_tensors_round_trip_every_pixel_value() -> None:
    values = bytes(v for i in range(256) for v in (i, 255 - i, (i * 7) % 256))
    image = Image.frombytes("RGB", (16, 16), values)
    tensor = encode_tensor(image)
    header = struct.unpack_from("<17I", tensor)
    assert header[5:9] == (1, 16, 16, 3)  # batch, height, width, channels
    assert len(tensor) == 68 + 16 * 16 * 3 * 2
    assert decode_tensor(tensor).tobytes() == values
    with pytest.raises(InvalidRequest):
        decode_tensor(tensor[:100])


def test_easel_serve_serves_grpc_on_the_port_given(tmp_path: Path) -> None:
    port = free_port()
    with (
        easel_serve(tmp_path / "data", "--grpc-port", str(port)),
        DrawThingsClient(f"127.0.0.1:{port}") as client,
    ):
        assert client.echo("cli").files == ["mock"]
        [image] = client.generate("a fox", width=64, height=64, steps=1)
    assert image.size == (64, 64)


def test_with_tokens_configured_grpc_needs_one_too(tmp_path: Path) -> None:
    from easel.proto import imageservice_pb2 as pb

    token = "grpc-reader-0123456789"
    settings = Settings(
        data_dir=tmp_path / "data",
        backend="mock",
        safety=Safety.model_validate(
            {"tokens": [{"service": "viewer", "token": token, "scopes": ["read"]}]}
        ),
    )
    app = create_app(settings, grpc_port=0)
    with serve(app), grpc.insecure_channel(f"127.0.0.1:{app.state.grpc_port}") as channel:
        echo = channel.unary_unary(
            "/ImageGenerationService/Echo",
            request_serializer=pb.EchoRequest.SerializeToString,
            response_deserializer=pb.EchoReply.FromString,
        )
        with pytest.raises(grpc.RpcError) as refused:
            echo(pb.EchoRequest(name="x"), timeout=10)
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        auth = (("authorization", f"Bearer {token}"),)
        reply = echo(pb.EchoRequest(name="x"), metadata=auth)
        assert reply.message == "HELLO x"
        generate = channel.unary_stream(
            "/ImageGenerationService/GenerateImage",
            request_serializer=pb.ImageGenerationRequest.SerializeToString,
            response_deserializer=pb.ImageGenerationResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as denied:
            list(generate(pb.ImageGenerationRequest(prompt="x"), metadata=auth, timeout=10))
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
