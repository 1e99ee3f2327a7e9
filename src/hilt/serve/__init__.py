"""`hilt serve`: an OpenAI-compatible HTTP server with a web playground, on top of ``hilt.generation.engine``.

    app.py          the FastAPI app: routes, API key, limits, errors in OpenAI's shape, the page
    completions.py  /v1/completions and /v1/chat/completions: engine requests in, JSON or SSE out
    schemas.py      request and response bodies (pydantic), OpenAI's shapes
    chat.py         the chat template (Jinja) and the stop strings its role markers give
    metrics.py      Prometheus metrics
    run.py          settings, the model loader, uvicorn and a clean SIGTERM
    cli.py          `hilt serve`'s flags
    static/         the playground: plain HTML, JS and CSS, no build step, nothing fetched from elsewhere

Reference: docs/serving.md.
"""
