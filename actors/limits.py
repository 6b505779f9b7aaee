"""The decoder's bounds, and the error a message that breaks the protocol raises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Limits:
    """Bounds enforced when decoding. Every field has a unit in its name.

    ``max_frame_bytes`` bounds every frame. The broker's client endpoint has it as
    ZeroMQ's ``MAXMSGSIZE``, so a larger frame from a client never reaches the
    decoder: ZeroMQ drops the connection that sent it.
    """

    max_frame_bytes: int = 4 * 1024 * 1024
    max_prompt_chars: int = 1_000_000
    max_prompt_tokens: int = 131_072
    max_messages: int = 1024
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    max_tokens_limit: int = 32_768
    max_id_chars: int = 256
    max_map_keys: int = 512  # logit_bias may hold 300 entries, a JSON schema many properties
    max_logit_bias_entries: int = 300
    max_grammar_bytes: int = 256 * 1024  # a grammar map, msgpack-encoded
    max_choices: int = 256  # strings of a `choice` grammar
    max_tools: int = 128
    max_tools_bytes: int = 512 * 1024  # the tools list, msgpack-encoded

    @property
    def max_array_items(self) -> int:
        """The longest array the decoder builds: the longest any field may hold."""
        return max(self.max_prompt_tokens, self.max_messages)

    def unpack_bounds(self) -> dict[str, Any]:
        """msgpack ``unpackb``/``Unpacker`` keyword arguments that enforce these bounds."""
        return {
            "strict_map_key": True,
            "max_str_len": self.max_frame_bytes,
            "max_bin_len": self.max_frame_bytes,
            "max_array_len": self.max_array_items,
            "max_map_len": self.max_map_keys,
            "max_ext_len": 0,
        }


DEFAULT_LIMITS = Limits()


class ProtocolError(Exception):
    """A message that cannot be accepted; carries the protocol error code."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
