"""A request-balancer bot, written exactly as such bots are (five handlers, ``run(loop)``,
executor payloads), against a real ``easel serve`` with service tokens on loopback."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from collections.abc import Iterator

import pytest
from PIL import Image

from easel.client.balancer import Executor, GenerationResponse, GeneratorClient, QueueIsFullError
from tests.servers import Process, easel_serve
from tests.test_s3 import BUCKET, Moto
from tests.test_s3 import moto as moto  # the bot asks for sync_with_s3: a real S3 is there

SERVICE_NAME = "discord"
SERVICE_TOKEN = "discord-token-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, moto: Moto) -> Iterator[Process]:
    env = {
        "EASEL_S3__BUCKET": BUCKET,
        "EASEL_S3__ENDPOINT_URL": moto.url,
        "EASEL_S3__REGION": "us-east-1",
        "EASEL_S3__ACCESS_KEY_ID": "testing",
        "EASEL_S3__SECRET_ACCESS_KEY": "testing",
        "EASEL_MOCK_STEP_DELAY": "0.05",  # 30 steps: 1.5 s, so user 1's two jobs are still there
        "EASEL_SAFETY__TOKENS": json.dumps([{"service": SERVICE_NAME, "token": SERVICE_TOKEN}]),
        "EASEL_SAFETY__DENY_WORDS": '["forbidden"]',
    }
    # the mock stands in for the balancer's engines: it declares Kandinsky payloads (it
    # runs them as plain txt2img; a real fleet has a Kandinsky pipeline or FusionBrain)
    folder = tmp_path_factory.mktemp("balancer")
    (folder / "easel.toml").write_text(
        '[[backends]]\nname = "mock"\nkind = "mock"\nexecutors = ["automatic1111", "kandinsky"]\n'
    )
    with easel_serve(folder / "data", "--config", str(folder / "easel.toml"), env=env) as p:
        yield p


def png_base64(color: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.mark.slow
async def test_a_request_balancer_bot_runs_unchanged(server: Process) -> None:
    seen: dict[str, list[GenerationResponse]] = {
        "done": [],
        "error": [],
        "queued": [],
        "generating": [],
    }
    lost: list[Exception] = []
    finished = asyncio.Queue[GenerationResponse]()

    # -- the bot, as written for the request balancer -------------------------------------
    async def connection_error_handler(exception: Exception) -> None:
        lost.append(exception)

    async def request_done_handler(response: GenerationResponse) -> None:
        seen["done"].append(response)
        await finished.put(response)

    async def request_error_handler(response: GenerationResponse) -> None:
        seen["error"].append(response)
        await finished.put(response)

    async def request_queued_handler(response: GenerationResponse) -> None:
        seen["queued"].append(response)

    async def request_generating_handler(response: GenerationResponse) -> None:
        seen["generating"].append(response)

    client = GeneratorClient(endpoint=server.url, service=SERVICE_NAME, token=SERVICE_TOKEN)
    client.register_req_done_handler(request_done_handler)
    client.register_req_error_handler(request_error_handler)
    client.register_req_generating_handler(request_generating_handler)
    client.register_req_queued_handler(request_queued_handler)
    client.register_con_error_handler(connection_error_handler)
    loop = asyncio.get_running_loop()
    client.run(loop)

    automatic1111_payload = {
        "prompt": "aloha", "steps": 30, "cfg_scale": 7, "sampler_index": "Euler a",
        "width": 128, "height": 192, "seed": 1111111111111, "hr_scale": 1,
        "hr_upscaler": "Latent", "denoising_strength": 0.7, "negative_prompt": "child, childish",
    }  # fmt: skip
    kandinsky_payload = {
        "prompt": "cat girl", "steps": 30, "guidance_scale": 4, "height": 128, "width": 128,
        "sampler": "p_sampler", "prior_cf_scale": 4, "prior_steps": "5",
        "negative_prior_prompt": "", "negative_decoder_prompt": "",
    }  # fmt: skip
    mix2img_payload = {
        "images_texts": ["first prompt", png_base64("red"), png_base64("blue"), "second prompt"],
        "weights": [0.25, 0.25, 0.25, 0.25], "steps": 30, "guidance_scale": 4,
        "height": 128, "width": 128,
    }  # fmt: skip
    try:
        await asyncio.sleep(0.2)  # let the listener connect, as the old example slept
        a1111 = await client.text2img(
            executor=Executor.AUTOMATIC1111, premium=1, moderate=1, sync_with_s3=True,
            user_id=1, chat_id=10, message_id=100, payload=automatic1111_payload,
            max_user_queue_size=2,
        )  # fmt: skip
        img2img = await client.img2img(
            executor=Executor.AUTOMATIC1111, premium=0, moderate=0, user_id=1, chat_id=10,
            message_id=101, max_user_queue_size=2,
            payload={**automatic1111_payload, "init_images": [png_base64("green")]},
        )  # fmt: skip
        with pytest.raises(QueueIsFullError):  # the cap of user 1 is 2: both are queued or running
            await client.text2img(
                executor=Executor.AUTOMATIC1111, user_id=1, chat_id=10, message_id=102,
                payload=automatic1111_payload, max_user_queue_size=2,
            )  # fmt: skip
        kandinsky = await client.text2img(
            executor=Executor.KANDINSKY, user_id=2, chat_id=20, message_id=200,
            payload=kandinsky_payload,
        )  # fmt: skip
        mixed = await client.mix2img(
            executor=Executor.KANDINSKY, premium=1, moderate=1, sync_with_s3=True, user_id=2,
            chat_id=20, message_id=201, payload=mix2img_payload, max_user_queue_size=1,
        )  # fmt: skip
        moderated = await client.text2img(
            executor=Executor.AUTOMATIC1111, moderate=1, user_id=3, chat_id=30, message_id=300,
            payload={**automatic1111_payload, "prompt": "a forbidden thing"},
        )  # fmt: skip
        assert a1111 and img2img and kandinsky and mixed is None and moderated is None
        async with asyncio.timeout(30):
            while len(seen["done"]) < 3:
                await finished.get()
    finally:
        await client.close()

    done = {r.object_id: r for r in seen["done"]}
    assert set(done) == {a1111, img2img, kandinsky}
    first = done[a1111]
    assert (
        first.service_info.user_id,
        first.service_info.chat_id,
        first.service_info.message_id,
    ) == (1, 10, 100)
    assert first.executor is Executor.AUTOMATIC1111 and first.settings.premium
    assert isinstance(first.result.content, bytes)
    with Image.open(io.BytesIO(first.result.content)) as picture:
        assert picture.size == (128, 192)
        assert "Seed: " in str(picture.info.get("parameters"))
    assert done[kandinsky].service_info.user_id == 2
    errors = [r.result.content for r in seen["error"]]
    assert any("mix" in str(text) for text in errors)  # no backend here can mix: said at once
    assert any("forbidden" in str(text) for text in errors)
    assert {r.object_id for r in seen["queued"]} >= {a1111, img2img, kandinsky}
    assert all(r.avg_time is None or r.avg_time >= 0 for r in seen["queued"])
    assert {r.object_id for r in seen["generating"]} == {a1111, img2img, kandinsky}
    assert not lost
