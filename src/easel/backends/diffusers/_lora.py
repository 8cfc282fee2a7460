"""LoRAs per request, on a loaded model, without reloading it.

A LoRA changes modules that every request on the model shares (``from_pipe`` copies share
the UNet and text encoders), so requests wanting the same LoRAs at the same weights run
together and a request wanting others waits until they are done. Switching deletes the
adapters no longer wanted, loads the new ones (peft layers, the base weights untouched) and
sets the weights; a request with no LoRA gets the model with every adapter unloaded, so its
pixels are those of the plain model.
"""

from __future__ import annotations

import importlib.util
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from easel.backends.diffusers.models import ModelEntry, ModelFormat
from easel.errors import GenerationError, Unsupported

Wanted = Sequence[tuple[ModelEntry, float]]


def require_peft() -> None:
    if importlib.util.find_spec("peft") is None:
        raise Unsupported("LoRAs need the peft package on this server (pip install peft)")


class LoraGate:
    """The LoRA set applied to one loaded pipeline, and who is using it."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self._cond = threading.Condition()
        self._active: tuple[tuple[str, float], ...] = ()
        self._users = 0
        self._adapters: dict[str, str] = {}  # model name -> adapter name

    @property
    def active(self) -> tuple[tuple[str, float], ...]:
        return self._active

    @contextmanager
    def use(self, wanted: Wanted) -> Iterator[None]:
        key = tuple((entry.name, weight) for entry, weight in wanted)
        with self._cond:
            while self._users and self._active != key:
                self._cond.wait()
            if self._active != key:
                self._active = ()  # until the switch has fully succeeded
                self._switch(wanted)
                self._active = key
            self._users += 1
        try:
            yield
        finally:
            with self._cond:
                self._users -= 1
                self._cond.notify_all()

    def _switch(self, wanted: Wanted) -> None:
        pipe = self.pipe
        names = {entry.name for entry, _ in wanted}
        try:
            if not names:
                if self._adapters:
                    pipe.unload_lora_weights()  # back to the plain modules
                    self._adapters.clear()
                return
            stale = [a for n, a in self._adapters.items() if n not in names]
            if stale:
                pipe.delete_adapters(stale)
                self._adapters = {n: a for n, a in self._adapters.items() if n in names}
            for entry, _ in wanted:
                if entry.name not in self._adapters:
                    adapter = _adapter_name(entry.name)
                    _load(pipe, entry, adapter)
                    self._adapters[entry.name] = adapter
            pipe.set_adapters(
                [self._adapters[entry.name] for entry, _ in wanted],
                adapter_weights=[weight for _, weight in wanted],
            )
        except Exception as exc:
            # A half-applied set must not leak into the next request: start from scratch.
            self._adapters.clear()
            with suppress(Exception):
                pipe.unload_lora_weights()
            raise GenerationError(f"could not apply LoRAs {sorted(names)}: {exc}") from exc


def _adapter_name(name: str) -> str:
    return "easel_" + re.sub(r"\W", "_", name)


def _load(pipe: Any, entry: ModelEntry, adapter: str) -> None:
    if entry.format is ModelFormat.single_file:
        pipe.load_lora_weights(
            str(entry.path.parent), weight_name=entry.path.name, adapter_name=adapter
        )
    else:
        pipe.load_lora_weights(str(entry.path), adapter_name=adapter)
