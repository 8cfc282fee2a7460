"""Audio backends: text to sound (diffusers pipelines, TangoFlux) and text to speech
(hibari, Piper). Each returns :class:`~easel.audio.AudioClip` values; the worker writes
them like images. Heavy packages are imported lazily, inside the backend that needs them.
"""
