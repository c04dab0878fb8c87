"""HTTP service with a web page: `app.create_app(predictor, db_path)` builds it, `server.serve(run_dir, ...)` runs it.

Nothing is imported here, so `covidcxr --help` can read `defaults` without loading the web stack or torch.
"""
