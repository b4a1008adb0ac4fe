"""The worker package's ``imgq`` commands, one module each: ``worker``, ``health``,
``classify``, ``dlq``, ``models``, ``verify``. The drift and rollout packages keep their own
commands beside the code they drive (``drift/review.py``, ``rollout/cli.py``, ...)."""
