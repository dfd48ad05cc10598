"""A small client for the span API: build ``Context``s here, post them to a server.

    from spanctx import Context
    from spanctx.serve.client import Client

    client = Client("http://127.0.0.1:8000")
    doc = Context().append(open("manual.txt").read())
    reply = client.generate(doc.append("Question: ..."), max_tokens=64)
    print(reply.text, reply.cached_tokens)

For plain chat and completions use the official ``openai`` package against ``/v1``.
Only the standard library (``urllib``) is needed.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence

import attrs

from ..core.spans import Context
from .protocol import context_to_json

__all__ = ["Client", "Reply", "ServerError"]


class ServerError(RuntimeError):
    """The server's error reply: HTTP ``status`` and its ``{"error": ...}`` body."""

    def __init__(self, status: int, error: dict) -> None:
        super().__init__(f"HTTP {status}: {error.get('message')}")
        self.status, self.error = status, error


@attrs.frozen
class Reply:
    text: str
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


class Client:
    """Posts contexts to a spanctx server at ``url`` (``http://host:port``)."""

    def __init__(self, url: str, *, timeout: float = 600.0) -> None:
        self.url, self.timeout = url.rstrip("/"), timeout

    def generate(self, ctx: Context, *, max_tokens: int | None = None, adapter: str | None = None,
                 repair: str | None = None, cache_salt: str | None = None, **sampling) -> Reply:
        """Generate after ``ctx`` (spans, parallel groups, chat messages); ``sampling``:
        temperature, top_p, seed, stop."""
        body = self._body(ctx, max_tokens, adapter, repair, cache_salt, sampling)
        out = self._post("/v1/spanctx/generate", body)
        usage = out["usage"]
        return Reply(out["text"], out["finish_reason"], usage["prompt_tokens"],
                     usage["prompt_tokens_details"]["cached_tokens"], usage["completion_tokens"])

    def stream(self, ctx: Context, *, max_tokens: int | None = None, adapter: str | None = None,
               repair: str | None = None, cache_salt: str | None = None, **sampling) -> Iterator[str]:
        """Text pieces as the server decodes them; leaving the loop closes the connection,
        which cancels the request on the server."""
        body = {**self._body(ctx, max_tokens, adapter, repair, cache_salt, sampling), "stream": True}
        with self._open("/v1/spanctx/generate", body) as response:
            for line in response:
                line = line.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise ServerError(500, chunk["error"])
                text = chunk["choices"][0]["text"]
                if text:
                    yield text

    def check(self, ctx: Context, requirements: Sequence[str], *, adapter: str | None = None) -> list[dict]:
        """One verdict per requirement (``requirement``, ``passed``, ``probability``, tokens)."""
        body = {"context": context_to_json(ctx), "requirements": list(requirements), "adapter": adapter}
        return self._post("/v1/spanctx/check", body)["verdicts"]

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=self.timeout) as response:
            return json.load(response)

    @staticmethod
    def _body(ctx, max_tokens, adapter, repair, cache_salt, sampling) -> dict:
        body = {"context": context_to_json(ctx), "max_tokens": max_tokens, "adapter": adapter, "repair": repair,
                "cache_salt": cache_salt, **sampling}
        return {k: v for k, v in body.items() if v is not None}

    def _post(self, path: str, body: dict) -> dict:
        with self._open(path, body) as response:
            return json.load(response)

    def _open(self, path: str, body: dict):
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            try:
                error = json.load(exc).get("error", {})
            except ValueError:
                error = {"message": exc.reason}
            raise ServerError(exc.code, error) from None
