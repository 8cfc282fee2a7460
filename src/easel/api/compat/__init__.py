"""Other servers' APIs translated at the edge into easel's one vocabulary: OpenAI images,
Automatic1111, the text-to-image pipeline microservice, Draw Things gRPC.

``_shared`` is the one translation seam they all use (served models, failed job -> error,
waiting for a job).
"""
