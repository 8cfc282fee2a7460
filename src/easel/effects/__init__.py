"""Side effects that follow the event stream: metrics, webhooks, per-job notes.

They observe jobs; they never decide anything about them. Import the vocabulary, the
store and events interfaces only; never the runtime or the API.
"""
