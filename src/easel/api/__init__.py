"""HTTP and websocket views of the runtime (FastAPI)."""

from easel.api.app import create_app

__all__ = ["create_app"]
