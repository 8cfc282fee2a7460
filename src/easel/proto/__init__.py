"""Wire formats easel speaks besides JSON: Draw Things' gRPC service (``imageservice.proto``
and the message classes generated from it) and its FlatBuffers configuration and image
tensors (:mod:`easel.proto.drawthings`)."""
