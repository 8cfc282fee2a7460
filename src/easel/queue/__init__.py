"""The queue's policy, pure: fair queue and run-time estimates (``scheduler``), admission.

Decisions from data it is given, no I/O: imports only the vocabulary (``jobs``,
``errors``, ``config``), never a store, bus, runtime or API module.
"""
