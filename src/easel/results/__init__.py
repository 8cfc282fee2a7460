"""Where results go: files on disk with a sidecar (``files``), S3 (``s3``), and the
metadata that makes each file reproduce its job (``metadata``: A1111 infotext).

Imports the vocabulary only (and ``backends.base`` for the result type).
"""
