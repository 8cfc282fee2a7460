"""Draw Things scripts, written as for the community Draw Things client, against a real
``easel serve`` whose gRPC port speaks TLS; and easel's stubs next to Draw Things' own."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from PIL import Image

from easel.proto import _generate
from tests.servers import Process, easel_serve, free_port


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, str, Path]]:
    """easel with gRPC over TLS (a self-signed certificate for 127.0.0.1)."""
    folder = tmp_path_factory.mktemp("dt")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    args = ["--backend", "mock", "--grpc-port", str(port)]
    args += ["--grpc-tls-cert", str(cert), "--grpc-tls-key", str(key)]
    env = {"EASEL_MOCK_PREVIEW_EVERY": "2"}
    with easel_serve(folder / "data", *args, env=env) as process:
        yield process, f"127.0.0.1:{port}", cert


def test_a_draw_things_script_runs_unchanged(
    tls_server: tuple[Process, str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    process, address, cert = tls_server
    # -- the script, as written for the Draw Things client (only the import changed) ------
    from easel.client.grpc import DrawThingsClient, ImageGenerationConfig, StreamingProgressHandler

    stages: list[tuple[str, int]] = []
    with DrawThingsClient(address, insecure=False, ssl_cert_path=str(cert)) as client:
        reply = client.echo()
        config = ImageGenerationConfig(
            model="mock", steps=8, width=128, height=64, cfg_scale=5.0, scheduler="UniPC ays",
            seed=42,
        )  # fmt: skip
        handler = StreamingProgressHandler(total_steps=config.steps)
        images = client.generate_image(
            prompt="A beautiful sunset", config=config, progress_callback=handler.on_progress
        )
        handler.on_complete()
        paths = client.save_images(images, output_dir=str(tmp_path / "out"), prefix="sunset")
        edited = client.generate_image(
            "bluer", ImageGenerationConfig(steps=2, width=64, height=64, scheduler="euler a"),
            input_image=paths[0],
            progress_callback=lambda stage, step: stages.append((stage, step)),
        )  # fmt: skip
    # -------------------------------------------------------------------------------------
    assert "mock" in reply.files
    assert paths == [str(tmp_path / "out" / "sunset_1.png")]
    with Image.open(paths[0]) as image:
        assert image.size == (128, 64)
    assert "Sampling: 8/8 (100.0%)" in capsys.readouterr().out
    assert [s for s, _ in stages][:3] == ["Text Encoded", "Image Encoded", "Sampling"]
    assert len(edited) == 1
    jobs = httpx.get(f"{process.url}/v1/jobs").json()["jobs"]
    sunset = next(j for j in jobs if j["request"]["prompt"] == "A beautiful sunset")
    assert sunset["request"]["scheduler"] == "UniPC AYS" and sunset["request"]["seed"] == 42


def test_quick_generate_tells_a_grpc_address_from_a_url(
    tls_server: tuple[Process, str, Path], tmp_path: Path
) -> None:
    process, address, cert = tls_server
    import easel
    from easel.client.grpc import quick_generate

    path = quick_generate(
        address, "a fox", steps=4, width=64, height=64, output_path=tmp_path / "fox.png",
        show_progress=False, insecure=False, ssl_cert_path=str(cert),
    )  # fmt: skip
    assert Path(path).is_file()
    [over_grpc] = easel.quick_generate(
        address, "a cat", output_path=tmp_path / "cat.png", steps=4, width=64, height=64,
        show_progress=False, insecure=False, ssl_cert_path=str(cert),
    )  # fmt: skip
    [over_http] = easel.quick_generate(
        process.url, "a dog", output_path=tmp_path / "dog.png", steps=2, width=64, height=64
    )
    assert over_grpc.is_file() and over_http.is_file()


def test_methods_easel_does_not_offer_say_why(tls_server: tuple[Process, str, Path]) -> None:
    _, address, cert = tls_server
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with grpc.secure_channel(address, credentials) as channel:
        for method in ("Pubkey", "Hours"):
            call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                f"/ImageGenerationService/{method}"
            )
            with pytest.raises(grpc.RpcError) as refused:
                call(b"", timeout=10)
            assert refused.value.code() is grpc.StatusCode.UNIMPLEMENTED
            assert "easel" in (refused.value.details() or "")
    with grpc.insecure_channel(address) as plain, pytest.raises(grpc.RpcError):
        echo: grpc.UnaryUnaryMultiCallable[bytes, bytes] = plain.unary_unary(
            "/ImageGenerationService/Echo"
        )
        echo(b"", timeout=5)  # TLS only: a plain client cannot talk


def test_easel_stubs_and_draw_things_own_stubs_share_a_process(tmp_path: Path) -> None:
    """Stubs generated (here) from a copy of Draw Things' messages under their own names."""
    from grpc_tools import protoc

    proto = tmp_path / "imageService.proto"
    proto.write_text(_generate.PROTO.read_text())
    assert protoc.main(
        ["protoc", f"--proto_path={tmp_path}", f"--python_out={tmp_path}",
         f"--grpc_python_out={tmp_path}", str(proto)]
    ) == 0  # fmt: skip
    theirs = "import imageService_pb2, imageService_pb2_grpc"
    ours = "import easel.client.grpc as ours"
    check = (
        "r = imageService_pb2.ImageGenerationRequest(prompt='x', device=imageService_pb2.LAPTOP);"
        "import easel.proto.imageservice_pb2 as pb;"
        "assert pb.ImageGenerationRequest.FromString(r.SerializeToString()).prompt == 'x';"
        "print('ok')"
    )
    for first, second in ((theirs, ours), (ours, theirs)):
        done = subprocess.run(
            [sys.executable, "-c", f"{first}; {second}; {check}"],
            cwd=tmp_path, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "ok"
