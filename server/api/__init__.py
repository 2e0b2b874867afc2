"""The HTTP server: OpenAI-compatible routes, bank administration, health and metrics.

``create_app(settings, engine, banks=None)`` (app.py) builds the FastAPI app; ``moleserve serve``
(server/commands/serve.py) runs it under uvicorn.
"""
