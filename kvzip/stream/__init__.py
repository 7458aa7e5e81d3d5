"""Streaming: the serve-chunks HTTP server, its client, and the adaptive controller.

- :mod:`~kvzip.stream.server` serves the ``.kvz`` files under a root;
- :mod:`~kvzip.stream.client` streams a context into a model (:func:`stream_generate`);
- :mod:`~kvzip.stream.fetch` downloads a ``.kvz`` (:func:`fetch`);
- :mod:`~kvzip.stream.controller` decides the level of each chunk (pure);
- :mod:`~kvzip.stream.ranges` owns HTTP byte-range arithmetic (pure);
- :mod:`~kvzip.stream.http` is the distrustful HTTP range source;
- :mod:`~kvzip.stream.manifest` is the manifest, both ways.
- :mod:`~kvzip.stream.profiles` serves and fetches calibration profiles.

Importing this package imports no HTTP library; the modules above do.
"""
