"""A text/audio similarity score for audio results, from a local CLAP model.

CLAP embeds a text and a sound in one space; the cosine of the two embeddings says how well a
clip matches its prompt (higher is closer; about 0.2-0.5 for good matches with LAION's CLAP).
Set ``clap_model`` to a local transformers folder (``ClapModel`` + ``ClapProcessor``, e.g. a
copy of ``laion/clap-htsat-unfused``) and every audio result gets ``clap_score`` on its ref
and in its sidecar. The model loads on first use, in the worker's thread; nothing downloads.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from easel.audio import AudioClip, conform
from easel.errors import ModelNotFound


class ClapScorer:
    def __init__(self, path: Path | str, device: str = "cpu") -> None:
        self.path = Path(path).expanduser()
        if not (self.path / "config.json").is_file():
            raise ModelNotFound(
                f"clap_model {str(path)!r} is not a local transformers folder (no config.json)"
            )
        self.device = device
        self._parts: tuple[Any, Any] | None = None
        self._lock = threading.Lock()

    def _load(self) -> tuple[Any, Any]:
        if self._parts is None:
            from transformers import ClapModel, ClapProcessor

            processor = ClapProcessor.from_pretrained(self.path, local_files_only=True)
            model = ClapModel.from_pretrained(self.path, local_files_only=True)
            model.to(self.device)  # type: ignore[arg-type]
            model.eval()  # type: ignore[no-untyped-call]
            self._parts = (processor, model)
        return self._parts

    def score(self, prompt: str, clip: AudioClip) -> float:
        """Cosine similarity of the prompt's and the clip's CLAP embeddings; blocks."""
        import torch

        with self._lock:
            processor, model = self._load()
            rate = int(processor.feature_extractor.sampling_rate)
            mono = conform(clip, sample_rate=rate, channels=1).samples[:, 0]
            inputs = processor(
                text=[prompt], audio=[mono], sampling_rate=rate, return_tensors="pt", padding=True
            ).to(self.device)
            with torch.no_grad():
                text = model.get_text_features(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                )
                sound = model.get_audio_features(
                    input_features=inputs["input_features"], is_longer=inputs.get("is_longer")
                )
            text = text if torch.is_tensor(text) else text.pooler_output
            sound = sound if torch.is_tensor(sound) else sound.pooler_output
            return round(float(torch.nn.functional.cosine_similarity(text, sound)[0]), 4)
