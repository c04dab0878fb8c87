"""HTTP service with a web page: `app.create_app(predictor, cfg)` builds it, `server.serve(cfg)` runs it; `cfg` is a
`covidcxr.config.ServeConfig`, whose module also holds the defaults `covidcxr --help` states.

Nothing is imported here, so importing a module of this package loads only what that module needs.
"""
