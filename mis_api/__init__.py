"""The Score API's requests, their checks and the scoring core over the engine interface:
what the service (serve_app) and the offline tools (mis_score: `score`, `batch`) share, below
both. Pure Python and pydantic: importing it loads no Ray and no JAX."""
