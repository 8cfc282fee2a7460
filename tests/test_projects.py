"""``easel project`` run as a real subprocess against a real easel server on loopback."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from PIL import Image, PngImagePlugin

from easel.config import Settings
from tests.servers import serve

README = Path(__file__).parent.parent / "README.md"

CONFIG = """\
server_url: "{server}"
name: "project_name"
default_params:
  width: 512
  height: 512
  num_steps: 30
  guidance_scale: 7.5
  scheduler_type: "dpmsolver++"
  karras_sigmas: true
  scheduler_scale: 0.7
  clip_skip: 2
  enable_attention_slicing: true
  enable_vae_slicing: true
  enable_vae_tiling: false
  enable_model_cpu_offload: true
  enable_sequential_cpu_offload: false
ollama:
  server_url: "http://localhost:11434"
  model: "llama2"
  system_message: "You are an expert at creating image generation prompts. ... exactly 77 tokens long."
  prompt: "Create a detailed and creative image generation prompt ..."
  negative_prompt: "bad quality, low resolution, blurry"
  fallback_prompt: "A high quality, detailed masterpiece showing a beautiful landscape ..."
"""  # noqa: E501 (the issue's file, verbatim)

PROMPTS = """\
prompt_sets:
  - name: "landscape"
    prompt: "A beautiful mountain landscape with a lake and trees"
    negative_prompt: "ugly, blurry, low quality"
    params: {width: 768, height: 512}
"""


def readme_project() -> tuple[str, str]:
    """config.yaml and prompts.yaml as README.md's Projects section shows them."""
    section = README.read_text().split("### Projects", 1)[1].split("\n### ", 1)[0]
    config, prompts = re.findall(r"```yaml\n(.*?)```", section, re.DOTALL)
    config = re.sub(r'server_url: "[^"]*"', 'server_url: "{server}"', config)
    return config.replace('name: "mountains"', 'name: "project_name"'), prompts


SOURCES = {"issue": (CONFIG, PROMPTS), "readme": readme_project()}


def easel(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The CLI as a user runs it: a separate process (this worktree's easel first)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("EASEL_")}
    return subprocess.run(
        [sys.executable, "-m", "easel", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def make_project(root: Path, server: str, prompts: str = PROMPTS, config: str = CONFIG) -> Path:
    project = root / "project_name"
    project.mkdir(parents=True)
    (project / "config.yaml").write_text(config.replace("{server}", server))
    (project / "prompts.yaml").write_text(prompts)
    return project


@pytest.mark.parametrize("source", SOURCES)
def test_the_format_runs_a_batch_into_the_layout(source: str, server: str, tmp_path: Path) -> None:
    config, prompts = SOURCES[source]
    make_project(tmp_path / "projects", server, prompts=prompts, config=config)
    listed = easel("project", "list", "projects/project_name", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "landscape" in listed.stdout

    result = easel(
        "project", "run", "--input", "projects", "--project", "project_name",
        "--prompt", "landscape", "--batch", "3", "--seed", "5", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "scheduler_scale is not applied" in result.stderr  # named, never dropped silently
    runs = list((tmp_path / "outputs" / "project_name" / "landscape").iterdir())
    assert len(runs) == 1 and runs[0].name.endswith("_mock")
    images = sorted((runs[0] / "images").glob("*.png"))
    metadata = sorted((runs[0] / "metadata").glob("*.yaml"))
    assert [p.stem for p in images] == [p.stem for p in metadata] == ["001", "002", "003"]
    assert [str(tmp_path / p) for p in result.stdout.split()] == [str(p) for p in images]
    records = [yaml.safe_load(p.read_text()) for p in metadata]
    assert sorted(r["seed"] for r in records) == [5, 6, 7]
    first = records[0]
    assert first["prompt"] == "A beautiful mountain landscape with a lake and trees"
    assert first["negative_prompt"] == "ugly, blurry, low quality"
    assert first["backend"] == "mock" and first["server"] == server
    params = first["parameters"]
    assert (params["width"], params["height"], params["steps"]) == (768, 512, 30)
    assert params["cfg_scale"] == 7.5 and params["clip_skip"] == 3
    assert params["scheduler"] == "DPM++ 2M Karras"
    assert first["not_applied"].keys() == {"scheduler_scale"}
    assert first["timings"]["run_seconds"] is not None
    with Image.open(images[0]) as image:
        assert image.size == (768, 512)
        assert "Seed: " in image.info["parameters"]


def test_an_invalid_prompts_file_names_file_key_and_problem(tmp_path: Path) -> None:
    bad = PROMPTS.replace("params: {width: 768", "params: {widht: 768").replace(
        'name: "landscape"', 'name: "landscape"\n    prompt_typo: 1'
    )
    project = make_project(tmp_path, "http://127.0.0.1:9", prompts=bad)
    result = easel("project", "run", str(project), "--prompt", "landscape", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(project / "prompts.yaml") in result.stderr.replace("\n", "")
    assert "prompt_sets.0.params.widht: unknown key" in result.stderr
    assert "prompt_sets.0.prompt_typo: unknown key" in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_an_unknown_prompt_set_and_an_unreachable_server(tmp_path: Path) -> None:
    project = make_project(tmp_path, "http://127.0.0.1:9")
    missing = easel("project", "run", str(project), "--prompt", "nope", cwd=tmp_path)
    assert missing.returncode == 2 and "landscape" in missing.stderr
    down = easel("project", "run", str(project), "--all", cwd=tmp_path)
    assert down.returncode == 3, down.stderr
    assert "Traceback" not in down.stderr


TINY_CONFIG = """\
server_url: "{server}"
name: "tiny"
default_params:
  width: 64
  height: 64
  num_steps: 2
  guidance_scale: 5.0
  scheduler_type: "dpmsolver++"
  karras_sigmas: true
  clip_skip: 1
"""


@pytest.fixture
def tiny_server(tiny_model_dir: Path, tmp_path: Path) -> Iterator[str]:
    """A real easel server running the tiny diffusers pipeline on loopback."""
    from easel.api import create_app

    settings = Settings(
        data_dir=tmp_path / "server", backend="diffusers", model=str(tiny_model_dir)
    )
    with serve(create_app(settings)) as url:
        yield url


def _pixels(path: Path) -> bytes:
    with Image.open(path) as image:
        return image.convert("RGB").tobytes()


@pytest.mark.slow
def test_reproduce_gives_identical_pixels(tiny_server: str, tmp_path: Path) -> None:
    make_project(tmp_path, tiny_server, config=TINY_CONFIG)
    run = easel("project", "run", "project_name", "--all", "--batch", "2", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    first, second = (tmp_path / line for line in run.stdout.split())
    assert _pixels(first) != _pixels(second)  # two seeds, two images

    again = easel("reproduce", str(second), "--server", tiny_server, "--json", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert report["source"].endswith("metadata/002.yaml")
    assert report["backend"] == "diffusers"
    assert _pixels(tmp_path / report["images"][0]) == _pixels(second)

    # any A1111-style infotext alone: the parameters chunk and nothing else beside it
    with Image.open(second) as image:
        infotext = image.info["parameters"]
        bare = PngImagePlugin.PngInfo()
        bare.add_text("parameters", infotext)
        image.save(tmp_path / "bare.png", pnginfo=bare)
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in infotext
    from_text = easel("reproduce", "bare.png", "--server", tiny_server, "--json", cwd=tmp_path)
    assert from_text.returncode == 0, from_text.stderr
    report = json.loads(from_text.stdout)
    assert report["source"] == "the image's infotext"
    assert report["request"]["scheduler"] == "DPM++ 2M Karras"
    assert _pixels(tmp_path / report["images"][0]) == _pixels(second)


def test_reproduce_of_an_image_without_parameters_exits_2(tmp_path: Path) -> None:
    """Nothing ran: the image given cannot be reproduced, a usage error."""
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    result = easel("reproduce", "plain.png", cwd=tmp_path)
    assert result.returncode == 2
    assert "carries no generation parameters" in result.stderr
    assert "Traceback" not in result.stderr


def test_without_server_url_the_project_runs_embedded(tmp_path: Path) -> None:
    config = CONFIG.replace('server_url: "{server}"\n', "").replace(
        "width: 512\n  height: 512\n  num_steps: 30", "width: 64\n  height: 64\n  num_steps: 2"
    )
    prompts = PROMPTS.replace("{width: 768, height: 512}", "{}")
    make_project(tmp_path, "unused", prompts=prompts, config=config)
    result = easel("project", "run", "project_name", "--prompt", "landscape", "--batch", "2",
                   "--seed", "1", "--json", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    jobs = json.loads(result.stdout)["jobs"]
    assert [job["state"] for job in jobs] == ["succeeded", "succeeded"]
    record = yaml.safe_load((tmp_path / jobs[1]["metadata"][0]).read_text())
    assert record["server"] == "embedded" and record["seed"] == 2
    # the memory knobs are applied to the embedded runtime, mapped by easel's own table
    assert record["diffusers_settings"] == {
        "attention_slicing": True, "vae_slicing": True, "offload": "model"
    }  # fmt: skip


@pytest.fixture
def paced_server(tmp_path: Path) -> Iterator[str]:
    """A mock backend at 0.1 s a step, one job at a time, that takes a second to load its
    model before the first job: a run's display has time to show each phase."""
    from easel.api import create_app

    settings = Settings(
        data_dir=tmp_path / "paced", mock_step_delay=0.1, mock_load_seconds=1.0, backend="mock"
    )
    with serve(create_app(settings)) as url:
        yield url


@pytest.mark.slow
def test_the_display_in_a_terminal_moves_through_queued_loading_steps_and_done(
    paced_server: str, tmp_path: Path
) -> None:
    """A real terminal (tmux): the run's display as a user sees it, screen by screen."""
    if shutil.which("tmux") is None:
        pytest.fail("tmux is not installed (.ci/run installs it)")
    config = TINY_CONFIG.replace("num_steps: 2", "num_steps: 10")
    make_project(tmp_path, paced_server, config=config)
    session = f"easel-{os.getpid()}"
    command = (
        f"cd {tmp_path} && PYTHONPATH={os.environ.get('PYTHONPATH', '')} {sys.executable} "
        "-m easel project run project_name --all --batch 2; echo EXIT=$?; sleep 30"
    )
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", session, "-x", "120", "-y", "20"], check=True
    )
    seen: list[str] = []
    try:
        subprocess.run(["tmux", "send-keys", "-t", session, command, "Enter"], check=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            screen = subprocess.run(
                ["tmux", "capture-pane", "-p", "-t", session], capture_output=True, text=True
            ).stdout
            seen.append(screen)
            if re.search(r"EXIT=\d", screen):
                break
            time.sleep(0.05)  # a terminal has no event to await: its screen is polled
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
    screens = "\n".join(seen)
    assert "EXIT=0" in seen[-1], seen[-1]
    assert "job 2 queued position 0" in screens  # next in line behind the running job
    # the worker says the backend loads its model first (the mock's second); the second
    # job finds it in memory: no loading phase, however briefly a screen might catch one
    assert "job 1 loading model mock" in screens
    assert "job 2 loading model" not in screens
    assert re.search(r"job \d steps .*\d+/10", screens)
    assert "job 2 succeeded" in seen[-1] and "jobs done" in seen[-1] and "2/2" in seen[-1]
