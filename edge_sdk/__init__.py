"""fedser edge SDK: classify speech emotion on the device, learn from its user, federate signed deltas.

Runs on a Raspberry Pi-class CPU with numpy, ai-edge-litert (or tflite-runtime), cryptography and
requests; never imports TensorFlow, librosa or numba. Importing this package imports nothing heavy.

Overview
--------
``edge_sdk.device.Device``
    One device: ``enroll``, ``classify`` / ``classify_file``, ``feedback``, ``personalize``,
    ``make_update``, ``flush_outbox``, ``pull_model``, ``sync``, ``status``.
``edge_sdk.model``
    ``TFLiteModel`` (the ``infer`` / ``head`` / ``train`` / ``get_weights`` / ``set_weights``
    signatures) and ``ModelMetadata``.
``edge_sdk.features``
    ``FeatureConfig`` and the numpy MFCC / log-mel that training's librosa features are tested against.
``edge_sdk.wire``, ``edge_sdk.manifest``, ``edge_sdk.signing``
    The versioned contracts shared with the aggregator: update envelope, signed manifest, Ed25519 keys.
``edge_sdk.store``
    ``FeedbackStore``: predictions, feedback and the durable outbox in one SQLite file.
``edge_sdk.storage``
    ``atomic_write`` and ``StateLock`` (one process at a time changes a state folder).
``edge_sdk.errors``
    ``FedserError`` and its subclasses.
"""

__version__ = "0.1.0"
