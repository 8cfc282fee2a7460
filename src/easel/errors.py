"""easel's one error hierarchy.

Every error a client can cause or see carries a machine-readable ``code`` and the HTTP
status the API answers with; one handler renders them as
``{"error": {"code": ..., "message": ...}}``. The same codes are recorded on failed jobs.

    EaselError
    ├── InvalidRequest          422 invalid_request
    │   └── Unsupported         422 unsupported
    ├── UnsupportedMediaType    415 unsupported_media_type
    ├── NotFound                404 not_found
    │   ├── JobNotFound         404 job_not_found
    │   ├── ImageNotFound       404 image_not_found
    │   └── ModelNotFound       404 model_not_found
    ├── JobFinished             409 job_finished
    ├── QueueFull               429 queue_full
    │   └── UserQueueFull       429 user_queue_full
    ├── StoreUnavailable        503 store_unavailable
    └── GenerationError         500 generation_failed   (recorded on the job, not an HTTP answer)
        ├── Cancelled           499 cancelled
        ├── LeaseLost           409 lease_lost
        ├── BackendUnavailable  503 backend_unavailable (transient: worth a retry)
        └── EngineError         502 engine_error        (a remote engine refused or failed)
            └── EngineRefused   422 engine_refused      (its safety system or validation)
"""

from __future__ import annotations


class EaselError(Exception):
    code: str = "error"
    status: int = 500
    retryable: bool = False
    """Transient: the same job may succeed if run again later."""

    def __init__(self, message: str, *, code: str | None = None, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, object]:
        """The API's error body: code, message and any details (such as a count)."""
        return {"code": self.code, "message": self.message, **self.details}


class InvalidRequest(EaselError):
    code = "invalid_request"
    status = 422


class Unsupported(InvalidRequest):
    code = "unsupported"


class UnsupportedMediaType(EaselError):
    code = "unsupported_media_type"
    status = 415


class NotFound(EaselError):
    code = "not_found"
    status = 404


class JobNotFound(NotFound):
    code = "job_not_found"


class ImageNotFound(NotFound):
    code = "image_not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class JobFinished(EaselError):
    code = "job_finished"
    status = 409


class QueueFull(EaselError):
    code = "queue_full"
    status = 429


class UserQueueFull(QueueFull):
    code = "user_queue_full"


class StoreUnavailable(EaselError):
    code = "store_unavailable"
    status = 503


class GenerationError(EaselError):
    code = "generation_failed"
    status = 500


class Cancelled(GenerationError):
    code = "cancelled"
    status = 499


class LeaseLost(GenerationError):
    code = "lease_lost"
    status = 409


class BackendUnavailable(GenerationError):
    code = "backend_unavailable"
    status = 503
    retryable = True


class EngineError(GenerationError):
    """A remote engine (Automatic1111, ComfyUI, an OpenAI-compatible API...) failed the job
    for good; the message carries the engine's own text."""

    code = "engine_error"
    status = 502


class EngineRefused(EngineError):
    """A remote engine refused the request itself (its safety system, its validation):
    running it again would be refused again."""

    code = "engine_refused"
    status = 422
