"""The local diffusers backend: pipelines of every family, schedulers, LoRA, ControlNet,
previews, batching; ``models`` finds models in folders, single files and the HF cache.

torch and diffusers are imported lazily, inside the functions that need them.
"""

from easel.backends.diffusers._quiet import quiet_library_logs

quiet_library_logs()
