"""`hilt serve`: an OpenAI-compatible HTTP server with a web playground, on top of ``hilt.generation.engine``.

    app.py          the FastAPI app: routes, API key, limits, errors in OpenAI's shape, the page
    completions.py  /v1/completions and /v1/chat/completions: engine requests in, JSON or SSE out
    dispatch.py     what both share: a body's choices as engine requests, their outputs merged, server-sent events
    logprobs.py     the logprob entries: each token's text as the client saw it, the prompt's scores for echo
    schemas.py      request and response bodies (pydantic), OpenAI's shapes
    chat.py         the chat template (Jinja) and the stop strings its role markers give
    metrics.py      Prometheus metrics
    run.py          settings, the model loader, uvicorn and a clean SIGTERM
    static/         the playground: plain HTML, JS and CSS, no build step, nothing fetched from elsewhere

Reference: docs/serving.md.
"""
