"""The Redis side of delivery: how messages are taken into a batch's lane, leased, given back,
scheduled, settled with their results, and dead-lettered, with the Lua that does each inside
Redis. Knows nothing of Celery's worker or of images; ``worker/engine.py`` drives it."""
