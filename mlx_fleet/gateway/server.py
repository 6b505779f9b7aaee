"""The OpenAI-compatible HTTP gateway: an aiohttp server in front of the broker.

The gateway is one more client of the broker. Each HTTP request becomes one
``generate`` sent through :class:`mlx_fleet.AsyncClient`; the ZeroMQ
endpoint stays the fleet's native interface. A request's HTTP status waits for
the fleet's first answer, so refusals (unknown model, overloaded, timeout in
the queue, no live worker) get their own status even when streaming; an error
after the first token arrives in-band, as an SSE ``data: {"error": ...}`` event.

A client that goes away cancels its request in the fleet: aiohttp cancels the
handler when the connection drops (``handler_cancellation``), and closing the
AsyncClient's stream sends ``cancel``, which frees the worker's slot.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

from aiohttp import web

from actors.config import FleetConfig
from actors.curve import local_client_keys
from actors.protocol import CANCELLED, DEFAULT_LIMITS
from actors.runtime import Hooks, StartError, run_process
from actors.sockets import local_addr
from mlx_fleet.client import GRACE_S, AsyncClient, AsyncStream, Completion, FleetError, StreamChunk
from actors.protocol import BAD_REQUEST
from mlx_fleet.gateway.openai_fields import refusal
from mlx_fleet.gateway.openai_responses import FINISH_REASONS, ResponseFormat, json_bytes
from mlx_fleet.gateway.openai_schema import (
    CHAT, DEFAULT_MAX_TOKENS, OpenAIError, ParsedRequest, error_from_fleet, parse_chat_request,
    parse_completion_request,
)
from mlx_fleet.gateway.responses_api import ResponsesFormat, parse_responses_request

log = logging.getLogger("mlx_fleet.gateway")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
OPEN_PATHS = frozenset({"/health"})  # answered without the API key


@dataclass(frozen=True)
class GatewaySettings:
    """What the gateway process needs; built from the FleetConfig by :meth:`from_config`."""

    connect: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str = field(default="", repr=False)
    request_timeout_s: float = 600.0  # the broker's default; the local wait adds a grace on top
    call_timeout_s: float = 5.0  # models / status calls to the broker
    drain_timeout_s: float = 30.0  # in-flight HTTP requests may finish this long after SIGTERM
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    log_level: str = "INFO"
    curve: dict[str, bytes] | None = field(default=None, repr=False)  # CurveZMQ client keys when the broker needs them

    @classmethod
    def from_config(cls, cfg: FleetConfig) -> "GatewaySettings":
        """Settings for the gateway that `mlx-fleet up` runs beside the broker."""
        return cls(connect=local_addr(cfg.frontend), host=cfg.http_host, port=cfg.http_port, api_key=cfg.api_key,
                   request_timeout_s=cfg.request_timeout_s, drain_timeout_s=cfg.drain_timeout_s, log_level=cfg.log_level,
                   curve=local_client_keys(cfg))


class ReplyShape(Protocol):
    """What the handlers need of an API's response shapes (chat/completions, or the Responses API)."""

    id: str

    def full(self, done: Completion) -> dict[str, Any]:
        """The non-streamed body."""
        ...

    def start(self) -> bytes:
        """The opening events of a stream."""
        ...

    def chunk(self, c: StreamChunk) -> bytes:
        """The events of one fleet chunk."""
        ...

    def finish(self, done: Completion) -> bytes:
        """The closing events of a stream."""
        ...

    def error(self, body: dict[str, Any]) -> bytes:
        """An in-band error once the stream has started, and its end."""
        ...


def error_response(err: OpenAIError) -> web.Response:
    """An OpenAI-format JSON error."""
    return web.Response(status=err.status, body=json_bytes(err.body()), content_type="application/json")


def json_response(body: dict[str, Any], status: int = 200) -> web.Response:
    """A compact JSON response."""
    return web.Response(status=status, body=json_bytes(body), content_type="application/json")


def _http_error(exc: web.HTTPException, request: web.Request) -> OpenAIError:
    """aiohttp's own refusals (no route, wrong method, body too large) in OpenAI's format."""
    if exc.status == 404:
        msg = f"Invalid URL ({request.method} {request.path})"
    elif exc.status == 405:
        msg = f"Method {request.method} not allowed on {request.path}"
    else:
        msg = exc.reason or exc.text or "request refused"
    etype = "invalid_request_error" if exc.status < 500 else "server_error"
    return OpenAIError(exc.status, msg, type=etype, code=exc.reason.lower().replace(" ", "_") if exc.reason else None)


def make_middlewares(settings: GatewaySettings) -> list[Any]:
    """Error formatting (outermost), then bearer-token auth when an API key is set."""

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except OpenAIError as err:
            return error_response(err)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(_http_error(exc, request))
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return error_response(OpenAIError(500, "internal error in the gateway (see its log)", type="server_error", code="internal"))

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in OPEN_PATHS:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise OpenAIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
                                  code="missing_api_key")
            if not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
                raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return await handler(request)

    return [errors, auth] if settings.api_key else [errors]


class Gateway:
    """The request handlers; one AsyncClient shared by every request."""

    def __init__(self, client: AsyncClient, settings: GatewaySettings) -> None:
        self.client = client
        self.settings = settings
        self.started_s = int(time.time())

    # ---- generation ---------------------------------------------------------------------

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        parsed = parse_chat_request(await _json_body(request), default_max_tokens=self.settings.default_max_tokens)
        return await self._generate(request, parsed, self._format(parsed, "chatcmpl-"))

    async def handle_completion(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/completions."""
        parsed = parse_completion_request(await _json_body(request), default_max_tokens=self.settings.default_max_tokens)
        return await self._generate(request, parsed, self._format(parsed, "cmpl-"))

    async def handle_responses(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/responses (stateless: nothing is stored)."""
        body = await _json_body(request)
        parsed = parse_responses_request(body, default_max_tokens=self.settings.default_max_tokens)
        fmt = ResponsesFormat(body, parsed, response_id="resp_" + uuid.uuid4().hex, created_s=int(time.time()))
        return await self._generate(request, parsed, fmt)

    @staticmethod
    def _format(parsed: ParsedRequest, id_prefix: str) -> ResponseFormat:
        o = parsed.options
        return ResponseFormat(parsed.kind, completion_id=id_prefix + uuid.uuid4().hex, model=parsed.model,
                              created_s=int(time.time()), include_usage=parsed.include_usage, n=int(o.get("n", 1)),
                              top_logprobs=bool(o.get("top_logprobs")) or (parsed.kind != CHAT and "logprobs" in o))

    async def _generate(self, request: web.Request, parsed: ParsedRequest, fmt: ReplyShape) -> web.StreamResponse:
        rid = uuid.uuid4().hex
        stream = self.client.stream(model=parsed.model, request_id=rid, stream=parsed.stream, **parsed.options)
        # Leaving the stream early (error, disconnect, cancellation) sends `cancel` to the fleet.
        async with stream:
            try:
                first = await anext(stream, None)  # the status waits for the fleet's first answer
                if not parsed.stream:
                    done = await _completion(stream)
                    _raise_if_cancelled(done)
                    return json_response(fmt.full(done))
            except FleetError as exc:
                log.info("request %s refused: %s", fmt.id, exc)
                return error_response(_fleet_error(exc, parsed))
            except asyncio.CancelledError:
                log.info("client of %s went away; cancelling it in the fleet", fmt.id)
                raise
            return await self._stream(request, fmt, stream, first, parsed)

    async def _stream(self, request: web.Request, fmt: ReplyShape, stream: AsyncStream,
                      first: StreamChunk | None, parsed: ParsedRequest) -> web.StreamResponse:
        if first is None and stream.completion is not None:
            _raise_if_cancelled(stream.completion)  # still time for a proper status
        resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
        await resp.prepare(request)
        pending = fmt.start()
        chunk = first
        try:
            try:
                while chunk is not None:
                    event = fmt.chunk(chunk)
                    if event:
                        await resp.write(pending + event)
                        pending = b""
                    chunk = await anext(stream, None)
            except FleetError as exc:
                log.info("request %s failed mid-stream: %s", fmt.id, exc)
                await resp.write(pending + fmt.error(_fleet_error(exc, parsed).body()))
            else:
                done = stream.completion
                if done is not None and done.finish_reason in FINISH_REASONS:
                    await resp.write(pending + fmt.finish(done))
                else:
                    await resp.write(pending + fmt.error(_cancelled_error().body()))
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError) as exc:
            log.info("client of %s went away mid-stream; cancelling it in the fleet", fmt.id)
            if isinstance(exc, asyncio.CancelledError):
                raise
        return resp

    # ---- models and health -----------------------------------------------------------------

    async def _models(self) -> list[dict[str, Any]]:
        try:
            return await self.client.models(timeout_s=self.settings.call_timeout_s)
        except FleetError as exc:
            raise error_from_fleet(exc.code, f"cannot list models: {exc.message}") from None

    def _model_card(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.started_s, "owned_by": "mlx-fleet"}

    async def handle_models(self, request: web.Request) -> web.Response:
        """GET /v1/models: the fleet's models."""
        return json_response({"object": "list", "data": [self._model_card(m["name"]) for m in await self._models()]})

    async def handle_model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{model}."""
        name = request.match_info["model"]
        if not any(m["name"] == name for m in await self._models()):
            raise OpenAIError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return json_response(self._model_card(name))

    async def handle_health(self, request: web.Request) -> web.Response:
        """GET /health: 200 when the broker answers, with each model's ready workers; else 503."""
        try:
            models = await self.client.models(timeout_s=min(2.0, self.settings.call_timeout_s))
        except FleetError as exc:
            return json_response({"status": "unavailable", "error": exc.message}, status=503)
        return json_response({"status": "ok", "models": {m["name"]: {"workers_ready": m["workers_ready"]} for m in models}})


async def _json_body(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except (ValueError, UnicodeDecodeError) as exc:
        raise OpenAIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


async def _completion(stream: AsyncStream) -> Completion:
    """Read a request to its end (raises FleetError on an error)."""
    async for _ in stream:
        pass
    if stream.completion is None:
        raise FleetError("internal", "the fleet ended the request without a terminal message")
    return stream.completion


def _fleet_error(exc: FleetError, parsed: ParsedRequest) -> OpenAIError:
    """A fleet error as HTTP; a ``bad_request`` names the request parameter at fault where it can."""
    if exc.code == BAD_REQUEST:
        return refusal(exc.message, parsed.params)
    return error_from_fleet(exc.code, exc.message)


def _cancelled_error() -> OpenAIError:
    return error_from_fleet(CANCELLED, "the fleet cancelled this request before it finished")


def _raise_if_cancelled(done: Completion) -> None:
    if done.finish_reason not in FINISH_REASONS:
        raise _cancelled_error()


def make_app(client: AsyncClient, settings: GatewaySettings) -> web.Application:
    """The aiohttp application: routes, error format and auth."""
    gw = Gateway(client, settings)
    # A prompt may be up to max_prompt_chars; leave room for JSON escapes.
    app = web.Application(middlewares=make_middlewares(settings), client_max_size=DEFAULT_LIMITS.max_frame_bytes)
    app.add_routes([
        web.post("/v1/chat/completions", gw.handle_chat),
        web.post("/v1/completions", gw.handle_completion),
        web.post("/v1/responses", gw.handle_responses),
        web.get("/v1/models", gw.handle_models),
        web.get("/v1/models/{model}", gw.handle_model),
        web.get("/health", gw.handle_health),
    ])
    return app


async def serve(settings: GatewaySettings, stop: asyncio.Event, *, on_ready: Callable[[], None] | None = None) -> None:
    """Serve until ``stop`` is set, then let in-flight requests finish (``drain_timeout_s``)."""
    client = AsyncClient(settings.connect, timeout_s=settings.request_timeout_s + GRACE_S, curve=settings.curve)
    runner = web.AppRunner(make_app(client, settings), handler_cancellation=True, access_log=None,
                           shutdown_timeout=settings.drain_timeout_s)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
        if on_ready is not None:
            on_ready()
        await stop.wait()
    finally:
        await runner.cleanup()
        await client.close()


class GatewayProcess:
    """The gateway process's actor: one asyncio loop that serves until a stop is requested."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._stop_requested = False

    def start(self) -> None:
        """Warn about a gateway open to the network without a key."""
        if self.settings.host not in ("127.0.0.1", "localhost", "::1") and not self.settings.api_key:
            log.warning("the HTTP gateway binds %s with no API key: anyone who can reach it can use the fleet "
                        "(set MLX_FLEET_API_KEY or --api-key)", self.settings.host)

    def run(self) -> None:
        """Serve until ``request_stop``; a port that cannot be bound is a StartError."""
        s = self.settings
        try:
            asyncio.run(self._main())
        except OSError as exc:
            raise StartError(f"cannot bind the HTTP gateway to {s.host}:{s.port}: {exc.strerror or exc}; "
                             "change --http-port or http_port (0 turns the gateway off)") from None

    async def _main(self) -> None:
        s = self.settings
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        if self._stop_requested:
            self._stop.set()
        auth = "bearer token required" if s.api_key else "no auth"
        await serve(s, self._stop, on_ready=lambda: log.info(
            "OpenAI-compatible gateway on http://%s:%d/v1 (%s), broker %s", s.host, s.port, auth, s.connect))

    def request_stop(self) -> None:
        """Signal-safe: wake the loop to drain and stop."""
        self._stop_requested = True
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)

    def close(self) -> None:
        """Nothing outlives the loop: ``serve`` closes the client and the server."""


def run_gateway(cfg: FleetConfig) -> None:
    """Process entry point (spawned by the supervisor when ``http_port`` is not 0)."""

    def hooks() -> Hooks:
        gw = GatewayProcess(GatewaySettings.from_config(cfg))
        return Hooks(start=gw.start, run=gw.run, close=gw.close, request_stop=gw.request_stop)

    run_process("gateway", cfg.log_level, hooks)
