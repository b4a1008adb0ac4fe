"""The handlers a worker can serve, one task kind per module (see ``worker/handler.py``):
``classify`` (``imgq.classify``, the model) and ``null`` (``imgq.null``, for measuring the engine).
"""
