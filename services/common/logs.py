"""structlog JSON logging with the trace and span ids of the current OpenTelemetry span."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog
from opentelemetry import trace

from services.common.settings import LogSettings

# Keys whose values never reach a log line (invariant: secrets never appear in logs).
_SECRET_KEYS = frozenset(
    {"password", "secret", "secret_key", "access_key", "token", "api_key", "authorization", "bootstrap_admin_token"}
)


# An API key token (services.common.auth.tokens: `aimaas_<16 hex>_<43 base64url>`) inside any string.
_API_KEY_TOKEN = re.compile(r"aimaas_[0-9a-f]{16}_[A-Za-z0-9_-]{43}")


def _add_trace_context(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event["trace_id"] = format(context.trace_id, "032x")
        event["span_id"] = format(context.span_id, "016x")
    return event


def _redact_secrets(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    for key in event.keys() & _SECRET_KEYS:
        event[key] = "[redacted]"
    # An API key pasted into any string field (a message, a URL, an error text) is scrubbed too.
    for key, value in event.items():
        if isinstance(value, str) and "aimaas_" in value:
            event[key] = _API_KEY_TOKEN.sub("aimaas_[redacted]", value)
    return event


def configure_logging(settings: LogSettings, service: str) -> structlog.stdlib.BoundLogger:
    """Configure logging for this process (called once by the composition root)."""
    level = logging.getLevelName(settings.level)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if settings.format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_trace_context,
            _redact_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries that use stdlib logging (grpc, aetcd, urllib3) go to stderr at WARNING and above.
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    return structlog.get_logger(service=service)
