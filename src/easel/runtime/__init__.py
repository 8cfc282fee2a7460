"""The running server without HTTP: composition root and facade (``facade``), the worker
loop (``worker``), its Redis parts (``scale``), the ``easel worker`` process (``process``),
the worker registry (``registry``) and logging set-up (``logs``).

Imports every layer below it (vocabulary, queue, store, events, effects, safety,
results, backends); never the API, the CLI or the client.
"""
