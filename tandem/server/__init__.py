"""The OpenAI-compatible HTTP front end: the process edge around an in-process engine.

Owns the wire format and nothing of the engine: requests are parsed (protocol.py),
authenticated and routed (api.py), turned into `SamplingParams` and prompts
(completions.py, chat.py) and handed to an `AsyncEngine` (engine/async_engine.py), whose
thread steps the `Engine`; outputs come back as JSON or Server-Sent Events (serving.py).

    HTTP -> api.py -> completions.py / chat.py -> AsyncEngine.generate -> engine thread
         <- JSON / SSE chunks <- RequestStream (asyncio queue) <- Engine.step outputs
    engine thread -> metrics.py (Prometheus, status log)   errors.py: every error OpenAI-style

`tandem serve` (cli.py) builds the engine and runs the app under uvicorn.
"""
