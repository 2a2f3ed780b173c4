"""`tvmdeploy serve`: bundles over HTTP (KServe v2, a text route per task, OpenAI embeddings).

Needs the `serve` extra (starlette, uvicorn, prometheus_client). Like the rest of the runtime it
never imports the compiler. What each module holds: docs/design.md § Serving.
"""

from .app import create_app
from .server import load_models, model_names, serve

__all__ = ["create_app", "load_models", "model_names", "serve"]
