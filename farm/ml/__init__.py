"""Model adapters: tiny presets, generators (diffusers), moderation layers, validators, scorers, a cache.

Only this package (and farm.gpu_pinning) imports torch; it takes plain typed arguments and knows nothing of
Flask, Celery, SQL or the manifest. Submodules are imported explicitly (``from farm.ml.generator import
Generator``) so that importing ``farm.ml`` stays cheap.
"""
