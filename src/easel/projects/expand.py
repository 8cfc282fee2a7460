"""Prompt expansion: an LLM writes the prompt, fitted to the text encoder's 75 tokens.

Ollama is asked through the official ``ollama`` client (``/api/chat`` or
``/api/generate``); any OpenAI-compatible server through its ``/v1/chat/completions``.
A failure or a timeout uses the configured fallback prompt, and the image's metadata
says so. Fitting counts tokens with CLIP's own BPE vocabulary (the tokenizer of every
Stable Diffusion text encoder): a model folder's ``tokenizer/`` when there is one, else
the vocabulary ``open-clip-torch`` ships (installed ``--no-deps``; never imported, the
file is read directly).
"""

from __future__ import annotations

import gzip
import importlib.util
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import httpx

from easel.projects.files import OllamaSettings

CLIP_TOKENS = 75
"""CLIP's 77 positions less the start and end tokens."""


class Tokenizer(Protocol):
    def __call__(self, text: str, *, add_special_tokens: bool) -> Any: ...


@dataclass
class Expansion:
    """The prompt to send and where it came from (stored with each image)."""

    prompt: str
    source: str
    details: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"kind": self.source, "prompt": self.prompt, **self.details}


def expand_prompt(
    settings: OllamaSettings,
    subject: str,
    *,
    tokenizer: Tokenizer | None = None,
    model_dir: Path | None = None,
) -> Expansion:
    """Ask the LLM for a prompt about ``subject``; the fallback when it fails or times out."""
    instruction = f"{settings.prompt}\n\n{subject}" if subject else settings.prompt
    details: dict[str, Any] = {
        "instruction": instruction,
        "system_message": settings.system_message,
        "llm": {"server_url": settings.server_url, "model": settings.model, "api": settings.api},
    }
    try:
        raw = _ask(settings, instruction)
    except Exception as exc:  # any failure of the LLM means the fallback
        reason = "timed out" if _timed_out(exc) else f"{type(exc).__name__}: {exc}"
        fallback = settings.fallback_prompt or subject
        return Expansion(fallback, "fallback", {**details, "reason": reason})
    cleaned = _clean(raw)
    if not cleaned:
        fallback = settings.fallback_prompt or subject
        return Expansion(fallback, "fallback", {**details, "reason": "the LLM answered nothing"})
    counter = tokenizer or clip_tokenizer(model_dir)
    if counter is None:
        details["fitted"] = "no: no CLIP vocabulary (pip install --no-deps open-clip-torch)"
        return Expansion(cleaned, "expanded", {**details, "raw": raw})
    fitted = fit_tokens(cleaned, counter)
    details |= {"raw": raw, "tokens": count_tokens(fitted, counter), "cut": fitted != cleaned}
    return Expansion(fitted, "expanded", details)


def _ask(settings: OllamaSettings, instruction: str) -> str:
    if settings.api == "openai":
        messages = [{"role": "user", "content": instruction}]
        if settings.system_message:
            messages.insert(0, {"role": "system", "content": settings.system_message})
        url = settings.server_url.rstrip("/") + "/v1/chat/completions"
        body = {"model": settings.model, "messages": messages}
        response = httpx.post(url, json=body, timeout=settings.timeout)
        response.raise_for_status()
        return str(response.json()["choices"][0]["message"]["content"])
    import ollama

    with ollama.Client(host=settings.server_url, timeout=settings.timeout) as client:
        if settings.api == "generate":
            answer = client.generate(
                model=settings.model, prompt=instruction, system=settings.system_message or None
            )
            return str(answer.response)
        chat = [{"role": "user", "content": instruction}]
        if settings.system_message:
            chat.insert(0, {"role": "system", "content": settings.system_message})
        return client.chat(model=settings.model, messages=chat).message.content or ""


def _timed_out(exc: BaseException) -> bool:
    return isinstance(exc, httpx.TimeoutException | TimeoutError)


def _clean(raw: str) -> str:
    """One line of prompt: no "Prompt:" label, no quotes around it, spaces collapsed."""
    text = re.sub(r"^\s*(?:here(?:'s| is)[^:\n]*:|prompt\s*:)", "", raw.strip(), flags=re.I)
    text = " ".join(text.split())
    return text.strip().strip("\"“”'").strip()


def count_tokens(text: str, tokenizer: Tokenizer) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit_tokens(text: str, tokenizer: Tokenizer, limit: int = CLIP_TOKENS) -> str:
    """The longest run of whole words from the start of ``text`` within ``limit`` tokens."""
    words = text.split()
    if count_tokens(text, tokenizer) <= limit:
        return text
    low, high = 0, len(words)  # words[:low] fits, words[:high] does not
    while high - low > 1:
        middle = (low + high) // 2
        if count_tokens(" ".join(words[:middle]), tokenizer) <= limit:
            low = middle
        else:
            high = middle
    return " ".join(words[:low]).rstrip(",;:")


def clip_tokenizer(model_dir: Path | None = None) -> Tokenizer | None:
    """The model folder's CLIP tokenizer, else CLIP's vocabulary from open-clip-torch;
    None when neither (or transformers) is installed."""
    try:
        from transformers import CLIPTokenizer
    except ImportError:
        return None
    if model_dir is not None and (model_dir / "tokenizer" / "vocab.json").is_file():
        return CLIPTokenizer.from_pretrained(str(model_dir / "tokenizer"))  # type: ignore[no-any-return]
    return _open_clip_tokenizer()


@cache
def _open_clip_tokenizer() -> Tokenizer | None:
    from transformers import CLIPTokenizer

    path = open_clip_vocab()
    if path is None:
        return None
    vocab, merges = clip_vocabulary(path)
    return CLIPTokenizer(vocab=vocab, merges=merges)  # type: ignore[arg-type]  # pairs work


def open_clip_vocab() -> Path | None:
    """``open_clip/bpe_simple_vocab_16e6.txt.gz``, found without importing open_clip (whose
    import needs torch and torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path
    return None


def clip_vocabulary(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's 49,408-token vocabulary and its merges from the BPE file, as CLIP builds them:
    the 256 byte symbols, the same with ``</w>``, one token per merge, start and end."""
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    pairs = [(m[0], m[1]) for m in merges]
    return {token: index for index, token in enumerate(tokens)}, pairs


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table that CLIP's BPE uses."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table  # in this order: printable bytes first, as CLIP numbers them
