"""Side effects that follow the event stream: metrics, webhooks.

What they leave on a job (webhook delivery state) goes on its record with
``JobStore.annotate``, so every replica shows it and a restart keeps it.

They observe jobs; they never decide anything about them. Import the vocabulary, the
store and events interfaces only; never the runtime or the API.
"""
