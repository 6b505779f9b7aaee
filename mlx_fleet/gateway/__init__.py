"""The OpenAI-compatible HTTP gateway (docs/http.md): a client of the broker like any other.

:mod:`mlx_fleet.gateway.server` runs it; :mod:`mlx_fleet.gateway.openai_schema` reads requests
and :mod:`mlx_fleet.gateway.openai_responses` shapes replies. It imports only the client
library and ``actors``.
"""
