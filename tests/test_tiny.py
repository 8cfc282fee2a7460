"""The tiny offline pipeline is a real diffusers folder, and its weights follow its seed."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("diffusers")

from easel.errors import InvalidRequest
from easel.tiny import make_tiny_pipeline


def _weights(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*.safetensors"))
    }


def test_folder_loads_offline_as_stable_diffusion(tiny_model_dir: Path) -> None:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_model_dir, local_files_only=True)  # type: ignore[no-untyped-call]

    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.vae_scale_factor == 8
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.scheduler.config.steps_offset == 1
    assert pipe.safety_checker is None


def test_tokenizer_takes_any_text(tiny_model_dir: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    ids = tokenizer(
        "Ünïcode, emoji 🦊 and  spaces", padding="max_length", truncation=True
    ).input_ids

    assert len(ids) == 77
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids[1 : ids.index(tokenizer.eos_token_id)]


def test_weights_are_deterministic_in_seed(tmp_path: Path) -> None:
    first = _weights(make_tiny_pipeline(tmp_path / "a", seed=3))
    again = _weights(make_tiny_pipeline(tmp_path / "b", seed=3))
    other = _weights(make_tiny_pipeline(tmp_path / "c", seed=4))

    assert first.keys() == again.keys() == other.keys()
    assert len(first) == 3  # text encoder, unet, vae
    assert first == again
    assert all(first[name] != other[name] for name in first)


def test_builder_leaves_global_rng_alone(tmp_path: Path) -> None:
    import torch

    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    make_tiny_pipeline(tmp_path / "tiny")

    assert torch.equal(torch.rand(4), expected)


def test_unknown_family_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="use one of: sd, sd2, sdxl, sd3, flux"):
        make_tiny_pipeline(tmp_path / "x", family="sd4")
