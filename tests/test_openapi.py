"""Every compatibility route is in the OpenAPI document, with its schemas."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from easel.api import create_app
from easel.config import Settings
from tests.servers import serve

JSON = "application/json"

# (method, path, request body content type or None, response content type, a response field)
ROUTES = [
    ("post", "/v1/images/generations", JSON, JSON, "data"),
    ("post", "/v1/images/edits", "multipart/form-data", JSON, "data"),
    ("post", "/sdapi/v1/txt2img", JSON, JSON, "images"),
    ("post", "/sdapi/v1/img2img", JSON, JSON, "images"),
    ("get", "/sdapi/v1/progress", None, JSON, "current_image"),
    ("post", "/sdapi/v1/interrupt", None, JSON, None),
    ("get", "/sdapi/v1/sd-models", None, JSON, "title"),
    ("get", "/sdapi/v1/samplers", None, JSON, "name"),
    ("get", "/sdapi/v1/schedulers", None, JSON, "name"),
    ("get", "/sdapi/v1/options", None, JSON, "sd_model_checkpoint"),
    ("post", "/sdapi/v1/options", JSON, JSON, "sd_model_checkpoint"),
    ("post", "/pipeline/select-device", JSON, JSON, "status"),
    ("post", "/pipeline/run", JSON, JSON, "status"),
    ("get", "/pipeline/status", None, JSON, "completed"),
    ("get", "/pipeline/image", None, "image/png", None),
    ("get", "/v1/jobs/{job_id}/events", None, "text/event-stream", None),
    ("get", "/v1/events", None, "text/event-stream", None),
]
REQUEST_FIELDS = {
    "/v1/images/generations": {"prompt", "model", "n", "size", "response_format", "quality"},
    "/v1/images/edits": {"image", "image[]", "prompt", "mask", "n", "size", "response_format"},
    "/sdapi/v1/txt2img": {"prompt", "seed", "sampler_name", "steps", "width", "n_iter"},
    "/sdapi/v1/img2img": {"prompt", "init_images", "denoising_strength"},
    "/sdapi/v1/options": {"sd_model_checkpoint"},
    "/pipeline/select-device": {"device"},
    "/pipeline/run": {"prompt", "width", "height", "num_inference_steps"},
}


@pytest.fixture(scope="module")
def document(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("openapi"), backend="mock")
    with serve(create_app(settings)) as url:
        spec: dict[str, Any] = httpx.get(f"{url}/openapi.json").json()
    return spec


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    if "items" in schema:
        schema = schema["items"]
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        resolved: dict[str, Any] = spec["components"]["schemas"][name]
        return resolved
    return schema


@pytest.mark.parametrize(("method", "path", "body", "answer", "field"), ROUTES)
def test_route_is_documented_with_schemas(
    document: dict[str, Any],
    method: str,
    path: str,
    body: str | None,
    answer: str,
    field: str | None,
) -> None:
    operation = document["paths"][path][method]
    assert operation.get("summary") and operation.get("description")
    if body is not None:
        schema = _resolve(document, operation["requestBody"]["content"][body]["schema"])
        assert REQUEST_FIELDS[path] <= set(schema["properties"])
    content = operation["responses"]["200"]["content"][answer]
    schema = _resolve(document, content["schema"])
    assert schema.get("type") in {"object", "string"} or "properties" in schema
    if field is not None:
        assert field in schema["properties"]


def test_openai_errors_are_documented_in_openais_shape(document: dict[str, Any]) -> None:
    responses = document["paths"]["/v1/images/generations"]["post"]["responses"]
    error = _resolve(document, responses["400"]["content"][JSON]["schema"])
    body = _resolve(document, error["properties"]["error"])
    assert set(body["properties"]) == {"message", "type", "param", "code"}
