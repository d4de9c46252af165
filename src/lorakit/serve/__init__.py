"""Serving many adapters on one base model: mixed-adapter batches, an adapter store,
batched generation and an OpenAI-compatible HTTP server."""
