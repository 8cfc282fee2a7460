"""The event bus behind one interface: in-process with resume (``bus``), Redis Streams (``redis``).

Imports the vocabulary and the queue policy only, never the runtime or the API.
"""
