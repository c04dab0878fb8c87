"""HTTP service with a web page: `create_app(predictor, db_path)` builds it, `serve(run_dir, ...)` runs it."""

from covidcxr.deploy.serve.app import PredictorLike, background_server, create_app, serve

__all__ = ["PredictorLike", "background_server", "create_app", "serve"]
