"""The OpenAI-compatible HTTP gateway (docs/http.md): a client of the broker like any other.

:mod:`mlx_fleet.gateway.server` runs it. Requests: :mod:`mlx_fleet.gateway.openai_schema` (chat and
completions), :mod:`mlx_fleet.gateway.responses_schema` (the Responses API) and
:mod:`mlx_fleet.gateway.openai_fields` (controls, tools, response formats, tool messages). Replies:
:mod:`mlx_fleet.gateway.openai_responses` and :mod:`mlx_fleet.gateway.responses_api`; errors:
:mod:`mlx_fleet.gateway.errors`. It imports only the client library and ``actors``.
"""
