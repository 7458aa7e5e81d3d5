"""Streaming: serve-chunks HTTP server, client and adaptive controller."""
