"""The engine: model loading, prompt encoding, sampling and decoding, behind one interface.

Importing the package changes nothing in the process: the library settings for serving (offline hub, quiet
logs) are applied by :func:`sd3serve.engine.loading.configure_libraries` when a model is loaded.
"""
