"""Alert rules: validation and CRUD in etcd (`KeyBuilder.alert_rule(id)`, AlertRule JSON)."""

from __future__ import annotations

import math
import re
import uuid
from urllib.parse import urlsplit

from aimaas.monitor.v1 import monitor_pb2 as mpb
from services.common.errors import AlreadyExists, Conflict, InvalidArgument, NotFound
from services.common.etcd import CodecError, EtcdClient, from_json, to_json

_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MAX_NAME = 200
MAX_WEBHOOKS = 10
MAX_LABELS = 32
MAX_FOR_SECONDS = 7 * 24 * 3600

_METRIC_NAMES = {v: k for k, v in mpb.AlertMetric.items()}


def validate_rule(rule: mpb.AlertRule) -> mpb.AlertRule:
    """A normalized copy of `rule`, or InvalidArgument naming the first bad field.

    Defaults: window 1m; comparison GREATER_THAN for error rate and p99, LESS_THAN (or equal, when the
    threshold is 0: no request at all) for no-traffic. Node-down and replicas-below-min take no
    threshold or comparison (a node whose record and reports are gone; ready < min_replicas).
    """
    rule = mpb.AlertRule.FromString(rule.SerializeToString())
    if rule.id and not _ID.match(rule.id):
        raise InvalidArgument(f"rule.id {rule.id!r} must match {_ID.pattern} (lowercase letters, digits, '-', '_')")
    if not rule.name.strip():
        raise InvalidArgument("rule.name is required")
    if len(rule.name) > MAX_NAME:
        raise InvalidArgument(f"rule.name is longer than {MAX_NAME} characters")
    if rule.metric not in _METRIC_NAMES or rule.metric == mpb.ALERT_METRIC_UNSPECIFIED:
        raise InvalidArgument(
            f"rule.metric must be one of {', '.join(n for n in mpb.AlertMetric.keys() if not n.endswith('UNSPECIFIED'))}"
        )
    if rule.comparison not in mpb.Comparison.values():
        raise InvalidArgument(f"rule.comparison {rule.comparison} is not a Comparison")
    if rule.window not in mpb.Window.values():
        raise InvalidArgument(f"rule.window {rule.window} is not a Window")
    if rule.window == mpb.WINDOW_UNSPECIFIED:
        rule.window = mpb.WINDOW_1M
    if not math.isfinite(rule.threshold):
        raise InvalidArgument("rule.threshold must be a finite number")
    metric = rule.metric
    if metric == mpb.ALERT_METRIC_ERROR_RATE:
        if not 0.0 <= rule.threshold <= 1.0:
            raise InvalidArgument(f"rule.threshold of an error-rate rule is a fraction in [0, 1], got {rule.threshold}")
    elif metric == mpb.ALERT_METRIC_P99_LATENCY_MS:
        if rule.threshold <= 0:
            raise InvalidArgument(f"rule.threshold of a p99 rule is milliseconds > 0, got {rule.threshold}")
    elif metric == mpb.ALERT_METRIC_NO_TRAFFIC:
        if rule.threshold < 0:
            raise InvalidArgument(f"rule.threshold of a no-traffic rule is a rate >= 0 (qps), got {rule.threshold}")
        if rule.comparison == mpb.COMPARISON_GREATER_THAN:
            raise InvalidArgument("a no-traffic rule compares LESS_THAN its threshold")
        rule.comparison = mpb.COMPARISON_LESS_THAN
    else:
        if rule.threshold != 0 or rule.comparison != mpb.COMPARISON_UNSPECIFIED:
            raise InvalidArgument(f"a {_METRIC_NAMES[metric]} rule takes no threshold or comparison")
    if metric in (mpb.ALERT_METRIC_ERROR_RATE, mpb.ALERT_METRIC_P99_LATENCY_MS) and not rule.comparison:
        rule.comparison = mpb.COMPARISON_GREATER_THAN
    if rule.for_seconds > MAX_FOR_SECONDS:
        raise InvalidArgument(f"rule.for_seconds must be at most {MAX_FOR_SECONDS}")
    if rule.version and not rule.model:
        raise InvalidArgument("rule.version needs rule.model")
    for what, value in (("model", rule.model), ("node_id", rule.node_id)):
        if "/" in value or "\x00" in value:
            raise InvalidArgument(f"rule.{what} {value!r} must not contain '/' or NUL")
    if metric == mpb.ALERT_METRIC_NODE_DOWN and (rule.model or rule.version):
        raise InvalidArgument("a NODE_DOWN rule is scoped by node_id only")
    if metric == mpb.ALERT_METRIC_REPLICAS_BELOW_MIN and (rule.version or rule.node_id):
        raise InvalidArgument("a REPLICAS_BELOW_MIN rule is scoped by model only")
    if len(rule.webhook_urls) > MAX_WEBHOOKS:
        raise InvalidArgument(f"at most {MAX_WEBHOOKS} webhook_urls")
    for url in rule.webhook_urls:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidArgument(f"webhook url {url!r} must be an absolute http(s) URL")
    if len(rule.labels) > MAX_LABELS:
        raise InvalidArgument(f"at most {MAX_LABELS} labels")
    return rule


class RuleStore:
    def __init__(self, etcd: EtcdClient) -> None:
        self._etcd = etcd
        self._keys = etcd.keys

    def _key(self, rule_id: str) -> str:
        if not rule_id:
            raise InvalidArgument("rule id is required")
        if not _ID.match(rule_id):
            raise InvalidArgument(f"rule id {rule_id!r} must match {_ID.pattern}")
        return self._keys.alert_rule(rule_id)

    async def create(self, rule: mpb.AlertRule) -> mpb.AlertRule:
        rule = validate_rule(rule)
        if not rule.id:
            rule.id = uuid.uuid4().hex[:12]
        if not await self._etcd.create(self._key(rule.id), to_json(rule)):
            raise AlreadyExists(f"alert rule {rule.id!r} already exists")
        return rule

    async def get(self, rule_id: str) -> mpb.AlertRule:
        kv = await self._etcd.get(self._key(rule_id))
        if kv is None:
            raise NotFound(f"alert rule {rule_id!r} not found")
        return from_json(kv.value, mpb.AlertRule)

    async def list(self) -> list[mpb.AlertRule]:
        rules = []
        for kv in await self._etcd.get_prefix(self._keys.alert_rules_prefix()):
            try:
                rules.append(from_json(kv.value, mpb.AlertRule))
            except CodecError:
                continue  # a corrupt record must not hide the others
        return rules

    async def update(self, rule: mpb.AlertRule) -> mpb.AlertRule:
        if not rule.id:
            raise InvalidArgument("rule.id is required to update a rule")
        rule = validate_rule(rule)
        key = self._key(rule.id)
        current = await self._etcd.get(key)
        if current is None:
            raise NotFound(f"alert rule {rule.id!r} not found")
        if not await self._etcd.compare_and_swap(key, to_json(rule), expected_mod_revision=current.mod_revision):
            raise Conflict(f"alert rule {rule.id!r} changed concurrently; read it again and retry")
        return rule

    async def delete(self, rule_id: str) -> None:
        if not await self._etcd.delete(self._key(rule_id)):
            raise NotFound(f"alert rule {rule_id!r} not found")
