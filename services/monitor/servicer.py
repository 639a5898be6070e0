"""gRPC transport of the monitor (aimaas.monitor.v1.MonitorService): translation and validation only."""

from __future__ import annotations

import asyncio

import grpc

from aimaas.monitor.v1 import monitor_pb2 as mpb
from aimaas.monitor.v1 import monitor_pb2_grpc
from services.common.errors import InvalidArgument, Unavailable
from services.monitor.aggregation import MetricsStore
from services.monitor.alerts import AlertView
from services.monitor.rules import RuleStore

# Bounds of what one report may carry (a reporter has one delta per loaded model version).
MAX_DELTAS_PER_REPORT = 10_000


class MonitorServicer(monitor_pb2_grpc.MonitorServiceServicer):
    def __init__(
        self,
        store: MetricsStore,
        rules: RuleStore,
        alerts: AlertView,
        *,
        window_seconds: dict[int, float],
    ) -> None:
        self._store = store
        self._rules = rules
        self._alerts = alerts
        self._windows = window_seconds
        self._stopping = asyncio.Event()

    def stop_streams(self) -> None:
        """End every ReportStats stream cleanly (OK) and every WatchAlerts stream, so a stopping server
        does not wait out its grace period for streams that never end by themselves; reporters reopen."""
        self._stopping.set()
        self._alerts.close_subscribers()

    async def ReportStats(self, request_iterator, context) -> mpb.ReportStatsResponse:  # noqa: N802
        accepted = 0
        iterator = request_iterator.__aiter__()
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                receive = asyncio.ensure_future(iterator.__anext__())
                await asyncio.wait({receive, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not receive.done():
                    receive.cancel()
                    break
                try:
                    request = receive.result()
                except StopAsyncIteration:
                    break
                if len(request.deltas) > MAX_DELTAS_PER_REPORT:
                    raise InvalidArgument(f"a report carries at most {MAX_DELTAS_PER_REPORT} deltas")
                accepted += self._store.ingest(request)
        finally:
            stopping.cancel()
        return mpb.ReportStatsResponse(accepted_deltas=accepted)

    def _window(self, window: int) -> float:
        if window == mpb.WINDOW_UNSPECIFIED:
            window = mpb.WINDOW_1M
        seconds = self._windows.get(window)
        if seconds is None:
            raise InvalidArgument(f"unknown window {window}; use WINDOW_1M, WINDOW_5M or WINDOW_1H")
        return seconds

    async def QueryMetrics(self, request: mpb.QueryMetricsRequest, context) -> mpb.QueryMetricsResponse:  # noqa: N802
        seconds = self._window(request.window)
        if request.version and not request.model:
            raise InvalidArgument("version needs model")
        response = mpb.QueryMetricsResponse(window=request.window or mpb.WINDOW_1M)
        response.as_of.GetCurrentTime()
        response.samples.extend(
            await self._store.aquery(
                model=request.model, version=request.version, node=request.node_id, window_seconds=seconds
            )
        )
        return response

    async def GetLoadSignal(self, request: mpb.GetLoadSignalRequest, context) -> mpb.GetLoadSignalResponse:  # noqa: N802
        if not request.model or not request.version:
            raise InvalidArgument("model and version are required")
        signal = self._store.load_signal(request.model, request.version)
        return mpb.GetLoadSignalResponse(
            in_flight_per_replica=signal.in_flight_per_replica,
            mean_queue_time_ms=signal.mean_queue_time_ms,
            qps=signal.qps,
            reporting_replicas=signal.reporting_replicas,
            age_seconds=signal.age_seconds,
        )

    # -- rules -----------------------------------------------------------------------------------------

    async def CreateAlertRule(self, request, context) -> mpb.CreateAlertRuleResponse:  # noqa: N802
        if not request.HasField("rule"):
            raise InvalidArgument("rule is required")
        return mpb.CreateAlertRuleResponse(rule=await self._rules.create(request.rule))

    async def GetAlertRule(self, request, context) -> mpb.GetAlertRuleResponse:  # noqa: N802
        return mpb.GetAlertRuleResponse(rule=await self._rules.get(request.id))

    async def ListAlertRules(self, request, context) -> mpb.ListAlertRulesResponse:  # noqa: N802
        return mpb.ListAlertRulesResponse(rules=await self._rules.list())

    async def UpdateAlertRule(self, request, context) -> mpb.UpdateAlertRuleResponse:  # noqa: N802
        if not request.HasField("rule"):
            raise InvalidArgument("rule is required")
        return mpb.UpdateAlertRuleResponse(rule=await self._rules.update(request.rule))

    async def DeleteAlertRule(self, request, context) -> mpb.DeleteAlertRuleResponse:  # noqa: N802
        await self._rules.delete(request.id)
        return mpb.DeleteAlertRuleResponse()

    # -- alerts ----------------------------------------------------------------------------------------

    async def ListAlerts(self, request: mpb.ListAlertsRequest, context) -> mpb.ListAlertsResponse:  # noqa: N802
        if not self._alerts.synced.is_set():
            raise Unavailable("alert state not loaded yet (metadata store unreachable); retry shortly")
        return mpb.ListAlertsResponse(alerts=self._alerts.list(request.include_resolved))

    async def WatchAlerts(self, request: mpb.WatchAlertsRequest, context):  # noqa: N802
        if not self._alerts.synced.is_set():
            raise Unavailable("alert state not loaded yet (metadata store unreachable); retry shortly")
        queue = self._alerts.subscribe()
        try:
            for alert in self._alerts.list(include_resolved=False):
                yield mpb.WatchAlertsResponse(alert=alert)
            while True:
                alert = await queue.get()
                if alert is None:
                    raise Unavailable("alert watch ended (the server is stopping or the client fell behind); watch again")
                yield mpb.WatchAlertsResponse(alert=alert)
        finally:
            self._alerts.unsubscribe(queue)


def register(servicer: MonitorServicer):
    def _add(server: grpc.aio.Server) -> None:
        monitor_pb2_grpc.add_MonitorServiceServicer_to_server(servicer, server)

    return _add

