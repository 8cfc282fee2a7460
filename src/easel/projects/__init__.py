"""Projects: a folder with ``config.yaml`` and ``prompts.yaml``, run from the terminal.

The format is the one diffusers FastAPI servers use (``default_params`` with
``num_steps``, ``scheduler_type``, ``enable_*`` knobs; named prompt sets); easel reads it
as written and maps every key to its own request and settings (:mod:`.files`), runs a
prompt set's jobs together (:mod:`.run`), optionally has an LLM write the prompt
(:mod:`.expand`) and re-submits any image from its metadata (:mod:`.reproduce`).
"""

from easel.projects.files import Project, ProjectFileError, load_project

__all__ = ["Project", "ProjectFileError", "load_project"]
