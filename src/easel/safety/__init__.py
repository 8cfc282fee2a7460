"""Who may do what, and what is refused before it costs anything: service tokens and
scopes (``services``), rate limits (``ratelimit``), moderation (``moderation``), and the
gate that applies them at admission (``gate``).

Imports the vocabulary and the events interface only; never the runtime or the API.
"""
