"""Task-model bench: text classification through the gateway's REST predict endpoint vs the
in-process floor and MLServer's Hugging Face runtime; batching on vs off.

One run, one machine, every figure next to its baseline measured in the same run:
  model     all-MiniLM-L6-v2's real weights as BertForSequenceClassification with a seeded 2-label
            head (bench/tasks/model.py), one Hugging Face directory served by every side;
  floor     in-process: the transformers (fast) tokenizer + an ONNX Runtime session on the graph
            aimaas.huggingface.export_model exported from that directory, batch 1, softmax, label;
  AIMaaS    a mesh of real processes (etcd, registry, scheduler, one inference node) and the real
            gateway in its own process (as bench/gateway starts it); the exported ONNX pushed and
            deployed twice on the node: `minilm-sentiment` (the node's batching defaults) and
            `minilm-sentiment-unbatched` (the deployment's batching config enabled=false);
            clients POST {"text": ...} to /v1/models/<name>/predict;
  MLServer  1.7.1 + mlserver-huggingface 1.7.1 from bench/.venv-mlserver-hf, its REST V2 endpoint
            (the Hugging Face runtime's natural path: JSON in, JSON out), the same directory as two
            models: without adaptive batching and with it (max_batch_size / max_batch_time);
  clients   bench/tasks/load.py (own process): keep-alive HTTP/1.1, one request in flight each.
Sequential (1 client) and concurrent (--clients, default 32) rounds alternate between the sides
so that drift on the machine hits every side alike.

Usage: python -m bench.tasks.run [--quick] [--out bench/results/tasks.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import http.client
import json
import multiprocessing
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse

import numpy as np

from bench.gateway.run import _run as run_event_loop
from bench.gateway.run import process_cpu_probe, serve_until
from bench.inference import servers as bench_servers
from bench.inference.run import _dist_version, inference_counts, machine_info
from bench.tasks import model as bench_model
from bench.tasks import stats
from tests.support.servers import free_port

REPO_ROOT = bench_servers.REPO_ROOT
DEFAULT_MLSERVER_VENV = REPO_ROOT / "bench" / ".venv-mlserver-hf"
MLSERVER_BATCHED_NAME = "minilm-sentiment-batched"
MLSERVER_INSTALL = ("python3 -m venv {venv} && {venv}/bin/pip install torch==2.13.0 mlserver==1.7.1 "
                    "mlserver-huggingface==1.7.1 'optimum[onnxruntime]==1.26.1' transformers==4.41.2")
# What the peer's venv is asked for its versions (name==version lines).
_PEER_VERSIONS = (
    "import importlib.metadata as m\n"
    "for name in ('mlserver', 'mlserver-huggingface', 'transformers', 'torch', 'tokenizers', 'optimum', "
    "'tensorflow', 'numpy'):\n"
    "    try: print(name + '==' + m.version(name))\n"
    "    except m.PackageNotFoundError: pass\n"
    "import torch; print('torch_threads==' + str(torch.get_num_threads()))\n"
)


def log(message: str) -> None:
    print(f"[bench.tasks {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ the floor


class Floor:
    """In-process text classification: transformers' fast tokenizer + ONNX Runtime, batch 1."""

    def __init__(self, model_dir: pathlib.Path, onnx_path: pathlib.Path, threads: int) -> None:
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default (one per core)
        options.inter_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.labels = [bench_model.LABELS[i] for i in range(len(bench_model.LABELS))]
        self.threads = threads

    def _feeds(self, texts: list[str]) -> dict[str, np.ndarray]:
        encoded = self.tokenizer(texts, padding=True, truncation=True, return_tensors="np")
        return {name: encoded[name].astype(np.int64, copy=False) for name in self.inputs}

    def predict(self, text: str) -> tuple[str, float]:
        logits = self.session.run(None, self._feeds([text]))[0][0]
        exp = np.exp(logits - logits.max())
        scores = exp / exp.sum()
        best = int(scores.argmax())
        return self.labels[best], float(scores[best])

    def run_for(self, seconds: float) -> tuple[list[float], float]:
        """Back-to-back predictions through the texts for `seconds`: (latencies, elapsed)."""
        perf = time.perf_counter
        latencies: list[float] = []
        texts = bench_model.TEXTS
        started = perf()
        index = 0
        while perf() - started < seconds:
            t0 = perf()
            self.predict(texts[index % len(texts)])
            latencies.append(perf() - t0)
            index += 1
        return latencies, perf() - started

    def _rate(self, batches: list[list[str]], seconds: float) -> float:
        """Texts per second running `batches` in turn (tokenized ahead: the graph's own cost)."""
        feeds = [self._feeds(batch) for batch in batches]
        perf = time.perf_counter
        done = index = 0
        started = perf()
        while perf() - started < seconds:
            self.session.run(None, feeds[index % len(feeds)])
            done += len(batches[index % len(batches)])
            index += 1
        return done / (perf() - started)

    def batch_ceiling(self, batch: int, seconds: float) -> dict:
        """What merging texts can give this model at most, in-process: texts per second at batch 1
        and at `batch`, the bench's texts merged in turn and padded to the longest of each batch
        (as the node merges them), and one text of median length repeated (merging without
        padding waste)."""
        texts = bench_model.TEXTS
        lengths = [len(self.tokenizer(text)["input_ids"]) for text in texts]
        median = sorted(range(len(texts)), key=lambda i: lengths[i])[len(texts) // 2]
        mixed = [[texts[(start + i) % len(texts)] for i in range(batch)] for start in range(0, len(texts) * batch, batch)]
        rates = {
            "batch_1_texts_per_s": self._rate([[text] for text in texts], seconds),
            "batch_n_texts_per_s": self._rate(mixed[: len(texts)], seconds),
            "median_text_batch_1_texts_per_s": self._rate([[texts[median]]], seconds / 2),
            "median_text_batch_n_texts_per_s": self._rate([[texts[median]] * batch], seconds / 2),
        }
        return {
            "what": f"ONNX Runtime ({self.threads} thread) on pre-tokenized inputs, texts per second: the bench's texts "
                    f"one at a time vs {batch} at a time padded to the longest of each batch; and the median-length text "
                    f"({lengths[median]} tokens) alone vs {batch} copies (no padding)",
            "batch": batch,
            "median_text_tokens": lengths[median],
            **{key: round(value, 1) for key, value in rates.items()},
            "ratio": stats.ratio(rates["batch_n_texts_per_s"], rates["batch_1_texts_per_s"]),
            "ratio_without_padding": stats.ratio(rates["median_text_batch_n_texts_per_s"],
                                                 rates["median_text_batch_1_texts_per_s"]),
            "tokens_per_text": {"min": min(lengths), "max": max(lengths), "mean": round(sum(lengths) / len(lengths), 1)},
            "padding_efficiency": stats.padding_efficiency(lengths, batch),
        }


# ------------------------------------------------------------------------------------ the mesh


def _gateway_process(settings_json: str, onnx_path: str, log_path: str, ready, stop, profile: str | None = None) -> None:
    """The real gateway (GatewayApp) at INFO like production; deploys the exported model twice
    (node batching defaults, and batching off), then serves until `stop` (under cProfile, written
    to `profile`, when given)."""
    sys.stderr = open(log_path, "a", buffering=1)  # noqa: SIM115 - the process's log for its lifetime

    async def main() -> None:
        from aimaas.types.v1 import types_pb2 as tpb
        from services.gateway.settings import GatewaySettings
        from tests.support.gateway import deploy, running_gateway

        settings = GatewaySettings.model_validate_json(settings_json)
        async with running_gateway(settings) as gateway:
            data = pathlib.Path(onnx_path).read_bytes()
            await deploy(gateway, bench_model.MODEL_NAME, [data], timeout=300)
            await deploy(gateway, bench_model.UNBATCHED_MODEL_NAME, [data], timeout=300,
                         batching=tpb.BatchingConfig(enabled=False))
            del data
            route = gateway.routing.table.find(bench_model.MODEL_NAME)
            ready.put(("ok", gateway.http_url, route.versions[0].replicas[0].address))
            await serve_until(stop, profile)

    try:
        run_event_loop(main())
    except BaseException:  # noqa: BLE001 - the parent must hear why instead of waiting
        ready.put(("error", traceback.format_exc(), None))
        raise


class AimaasMesh:
    """etcd + registry + scheduler + one inference node (processes) and the gateway process."""

    def __init__(self, workdir: pathlib.Path, onnx_path: pathlib.Path, profile: pathlib.Path | None = None) -> None:
        self.workdir = workdir
        self.onnx_path = onnx_path
        self.profile = profile
        self.etcd = self.mesh = self.gateway = None
        self.stop_event = None

    def start(self) -> tuple[str, int, str]:
        from services.common.settings import EtcdSettings
        from tests.support.gateway import start_mesh
        from tests.support.servers import EtcdProcess

        self.etcd = EtcdProcess(self.workdir / "etcd")
        self.etcd.start()
        etcd_settings = EtcdSettings(endpoints=self.etcd.endpoint, namespace="/bench-tasks/aimaas/v1",
                                     session_ttl_seconds=5)
        self.mesh = start_mesh(etcd_settings, self.workdir, nodes=("node-a",))
        settings = self.mesh.gateway_settings()
        settings.log.level = "INFO"
        ctx = multiprocessing.get_context("spawn")
        ready, self.stop_event = ctx.Queue(), ctx.Event()
        self.gateway = ctx.Process(target=_gateway_process, args=(
            settings.model_dump_json(), str(self.onnx_path), str(self.workdir / "gateway.log"), ready, self.stop_event,
            str(self.profile) if self.profile else None))
        self.gateway.start()
        status, url, node = ready.get(timeout=600)
        if status != "ok":
            raise RuntimeError(f"the gateway process failed:\n{url}\n{self.mesh.logs()}")
        parsed = urllib.parse.urlsplit(url)
        return parsed.hostname or "127.0.0.1", int(parsed.port or 80), node

    def cpu_probes(self) -> dict:
        return {"gateway": process_cpu_probe(self.gateway.pid),
                "node": process_cpu_probe(self.mesh.nodes["node-a"].process.pid)}

    def stop(self) -> None:
        if self.gateway is not None:
            self.stop_event.set()
            self.gateway.join(60)
            if self.gateway.is_alive():
                self.gateway.kill()
                self.gateway.join(10)
        if self.mesh is not None:
            self.mesh.stop()
        if self.etcd is not None:
            self.etcd.stop()


# ------------------------------------------------------------------------------------ MLServer


def mlserver_versions(venv: pathlib.Path) -> dict:
    python = venv / "bin" / "python"
    if not python.exists():
        return {}
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        out = subprocess.run([str(python), "-c", _PEER_VERSIONS], capture_output=True, text=True, timeout=180,
                             env={k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}})
        return stats.parse_versions(out.stdout)
    return {}


def start_mlserver(workdir: pathlib.Path, venv: pathlib.Path, model_dir: pathlib.Path, max_batch_size: int,
                   max_batch_time_s: float) -> tuple[bench_servers.ServerProcess, int]:
    """MLServer with the model twice (without and with adaptive batching); (process, HTTP port)."""
    if not bench_servers.mlserver_executable(venv).exists():
        raise bench_servers.ServerStartError(
            f"MLServer's Hugging Face runtime is not installed at {venv}: " + MLSERVER_INSTALL.format(venv=venv))
    http_port, grpc_port = free_port(), free_port()
    repository = workdir / "mlserver-repo"
    repository.mkdir(parents=True)
    (repository / "settings.json").write_text(json.dumps(stats.mlserver_settings(http_port, grpc_port), indent=2))
    for name, batch, delay in ((bench_model.MODEL_NAME, 0, 0.0), (MLSERVER_BATCHED_NAME, max_batch_size, max_batch_time_s)):
        folder = repository / name
        folder.mkdir()
        settings = stats.mlserver_model_settings(name, str(model_dir), max_batch_size=batch, max_batch_time_s=delay)
        (folder / "model-settings.json").write_text(json.dumps(settings, indent=2))
    server = bench_servers.mlserver_server(repository, workdir, venv, grpc_port)
    # TensorFlow, imported by the runtime, is chatty on stderr and slow to start.
    server.env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return server, http_port


# ------------------------------------------------------------------------------------ clients


def ask_all(side: str, host: str, port: int, model: str) -> list[tuple[str, float]]:
    """Every text once, one after another: the answers (and warm-up)."""
    connection = http.client.HTTPConnection(host, port, timeout=60)
    answers = []
    try:
        for text in bench_model.TEXTS:
            body = stats.request_body(side, text)
            connection.request("POST", stats.request_path(side, model), body, {"content-type": "application/json"})
            response = connection.getresponse()
            data = response.read()
            if response.status != 200:
                raise RuntimeError(f"{side} {model} answered HTTP {response.status}: {data[:300]!r}")
            answers.append(stats.parse_answer(side, data))
    finally:
        connection.close()
    return answers


def load_round(side: str, model: str, host: str, port: int, clients: int, warmup: float, duration: float,
               workdir: pathlib.Path, tag: str, probes: dict) -> dict:
    """One measured window of `clients` closed-loop clients (own process), with the CPU each probed
    server process spent inside it."""
    start_at = time.time() + warmup
    out = workdir / f"load-{tag}.json"
    argv = [sys.executable, "-m", "bench.tasks.load", "--side", side, "--model", model, "--host", host,
            "--port", str(port), "--clients", str(clients), "--start-at", repr(start_at), "--duration", str(duration),
            "--out", str(out)]
    worker = subprocess.Popen(argv, cwd=REPO_ROOT, stdin=subprocess.DEVNULL)
    try:
        time.sleep(max(0.0, start_at - time.time()))
        before = {name: probe() for name, probe in probes.items()}
        time.sleep(max(0.0, start_at + duration - time.time()))
        cpu = {name: probe() - before[name] for name, probe in probes.items()}
        code = worker.wait(timeout=duration + 120)
        if code != 0:
            raise RuntimeError(f"load worker for {tag} exited with {code}")
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)
    result = json.loads(out.read_text())
    result["server_cpu_s"] = cpu
    return result


def summarize(results: list[dict], duration: float) -> dict:
    """One summary of the measured windows of one side (req/s over the windows' total time)."""
    window = duration * len(results)
    rounds = [(r["latencies_s"], duration, r["errors"]) for r in results]
    summary = stats.merge_rounds(rounds)
    summary["elapsed_s"] = round(window, 3)
    summary["rps_per_round"] = [round(len(r["latencies_s"]) / duration, 1) for r in results]
    summary["unanswered"] = sum(r.get("unfinished", 0) for r in results)
    samples = sorted({s for r in results for s in r.get("error_samples", [])})
    if samples:
        summary["error_samples"] = samples[:5]
    done = max(1, summary["requests"])
    client_cpu = sum(r.get("client_cpu_s", 0.0) for r in results)
    summary["client_cpu_us_per_request"] = round(client_cpu / done * 1e6, 1)
    cpu: dict[str, float] = {}
    for r in results:
        for name, seconds in (r.get("server_cpu_s") or {}).items():
            cpu[name] = cpu.get(name, 0.0) + seconds
    if cpu:
        summary["server_cpu_us_per_request"] = {name: round(s / done * 1e6, 1) for name, s in cpu.items()}
        summary["server_cpu_cores_busy"] = round(sum(cpu.values()) / window, 2)
    return summary


# ------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short smoke run (figures are rough)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("bench/results/tasks.json"))
    parser.add_argument("--mlserver-venv", type=pathlib.Path, default=DEFAULT_MLSERVER_VENV)
    parser.add_argument("--skip-mlserver", action="store_true", help="AIMaaS and the floor only")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients of the concurrent rounds")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 3; quick 1)")
    parser.add_argument("--seq-seconds", type=float, help="measured seconds per side and sequential round (default 8; quick 2)")
    parser.add_argument("--conc-seconds", type=float, help="measured seconds per side and concurrent round (default 10; quick 3)")
    parser.add_argument("--warmup-seconds", type=float, help="warm-up before each window (default 3; quick 1)")
    parser.add_argument("--profile", type=pathlib.Path, help="write a cProfile of the gateway process (measurements) here")
    parser.add_argument("--mlserver-max-batch-size", type=int, default=32, help="MLServer adaptive batching: max_batch_size")
    parser.add_argument("--mlserver-max-batch-time-ms", type=float, default=5.0,
                        help="MLServer adaptive batching: max_batch_time (how long a batch waits to fill)")
    args = parser.parse_args(argv)
    defaults = {"rounds": (1, 3), "seq_seconds": (2.0, 8.0), "conc_seconds": (3.0, 10.0), "warmup_seconds": (1.0, 3.0)}
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if not (1 <= args.rounds <= 20 and 0 < args.seq_seconds <= 600 and 0 < args.conc_seconds <= 600
            and 0 <= args.warmup_seconds <= 120 and 1 <= args.clients <= 1024
            and 2 <= args.mlserver_max_batch_size <= 1024 and 0 <= args.mlserver_max_batch_time_ms <= 10_000):
        parser.error("out-of-range --rounds/--seq-seconds/--conc-seconds/--warmup-seconds/--clients/--mlserver-*")
    return args


def software_info() -> dict:
    import onnxruntime
    import tokenizers
    import torch
    import transformers

    commit = None
    with contextlib.suppress(Exception):
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "services", "aimaas"], capture_output=True, text=True,
                               cwd=REPO_ROOT, timeout=10).stdout.strip()
        commit = head + ("+uncommitted services/ or aimaas/ changes" if dirty else "")
    return {"aimaas_commit": commit, "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "torch": torch.__version__, "grpcio": _dist_version("grpcio")}


def node_settings() -> dict:
    with contextlib.suppress(Exception):
        from services.inference.settings import BatchingDefaults

        return {"batching_defaults": BatchingDefaults().model_dump(),
                "env_from_tests_support_scheduler": {"AIMAAS_INFERENCE__INTRA_OP_THREADS": "1",
                                                     "AIMAAS_INFERENCE__INTER_OP_THREADS": "1"}}
    return {}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report: dict = {
        "schema_version": stats.SCHEMA_VERSION,
        "benchmark": "task models: text-classification through the gateway REST predict endpoint vs the in-process "
                     "floor and MLServer's Hugging Face runtime; batching on vs off",
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": machine_info(),
        "software": software_info(),
    }
    mlserver_error: str | None = "skipped (--skip-mlserver)" if args.skip_mlserver else None
    with tempfile.TemporaryDirectory(prefix="aimaas-bench-tasks-") as tmp, contextlib.ExitStack() as stack:
        workdir = pathlib.Path(tmp)
        log("building the classifier from all-MiniLM-L6-v2 and exporting it to ONNX")
        model_dir = bench_model.build_classifier(workdir / "minilm-sentiment")
        from aimaas.huggingface import export_model

        started = time.monotonic()
        exported = export_model(str(model_dir), workdir / "minilm-sentiment.onnx")
        report["model"] = {**bench_model.describe(model_dir, exported.path),
                           "export_s": round(time.monotonic() - started, 1),
                           "export_max_abs_error_vs_pytorch": exported.max_abs_error,
                           "max_length": exported.manifest.max_length}

        floors = {"floor": Floor(model_dir, exported.path, threads=1),
                  "floor_default_threads": Floor(model_dir, exported.path, threads=0)}
        expected = [floors["floor"].predict(text) for text in bench_model.TEXTS]

        log("starting etcd, registry, scheduler, one inference node and the gateway; deploying twice")
        mesh = AimaasMesh(workdir, exported.path, args.profile)
        stack.callback(mesh.stop)
        started = time.monotonic()
        host, port, node = mesh.start()
        startup = {"aimaas_mesh_and_two_deployments": round(time.monotonic() - started, 1)}
        log(f"gateway REST at {host}:{port}, node at {node}")
        aimaas_probes = mesh.cpu_probes()

        mlserver = None
        ml_notes: list[str] = []
        ml_port = 0
        ml_versions = mlserver_versions(args.mlserver_venv)
        if not args.skip_mlserver:
            try:
                candidate, ml_port = start_mlserver(workdir, args.mlserver_venv, model_dir, args.mlserver_max_batch_size,
                                                    args.mlserver_max_batch_time_ms / 1000)
                stack.callback(candidate.stop)
                candidate.start()
                waited = candidate.wait_ready(bench_model.MODEL_NAME, "1", timeout=240)
                candidate.wait_ready(MLSERVER_BATCHED_NAME, "1", timeout=60)
                startup["mlserver"] = round(waited, 1)
                log(f"MLServer ready on HTTP port {ml_port} after {waited:.1f} s")
                mlserver = candidate
                ml_notes = stats.mlserver_log_notes(candidate.log_tail(200_000))
            except (bench_servers.ServerStartError, OSError) as error:
                mlserver_error = str(error)
                log(f"MLServer unavailable, AIMaaS-side figures only: {mlserver_error.splitlines()[0]}")
        ml_probes = {"mlserver": mlserver.cpu_seconds} if mlserver else {}

        # Sides: (report key, client kind, model, host, port, CPU probes).
        node_host, _, node_port = node.rpartition(":")
        aimaas_on = ("aimaas_batching_on", stats.AIMAAS, bench_model.MODEL_NAME, host, port, aimaas_probes)
        aimaas_oip = ("aimaas_oip", stats.AIMAAS_OIP, bench_model.MODEL_NAME, host, port, aimaas_probes)
        node_grpc = ("node_grpc", stats.NODE_GRPC, bench_model.MODEL_NAME, node_host, int(node_port), aimaas_probes)
        aimaas_off = ("aimaas_batching_off", stats.AIMAAS, bench_model.UNBATCHED_MODEL_NAME, host, port, aimaas_probes)
        ml_plain = ("mlserver_no_batching", stats.MLSERVER, bench_model.MODEL_NAME, "127.0.0.1", ml_port, ml_probes)
        ml_batched = ("mlserver_adaptive_batching", stats.MLSERVER, MLSERVER_BATCHED_NAME, "127.0.0.1", ml_port, ml_probes)
        http_sides = [aimaas_on, aimaas_off] + ([ml_plain, ml_batched] if mlserver else [])

        correctness = {}
        for key, side, name, side_host, side_port, _ in [*http_sides, aimaas_oip]:
            try:
                correctness[key] = stats.answers_match(ask_all(side, side_host, side_port, name), expected)
            except Exception as error:  # noqa: BLE001 - recorded; the side is then measured as it answers
                correctness[key] = {"match": False, "reason": str(error)[:500]}
            log(f"answers of {key} vs in-process: {correctness[key]}")

        # ---- sequential: the floors in-process, AIMaaS (batching on: the default; task endpoint and OIP endpoint)
        # and MLServer without adaptive batching
        seq_sides = [aimaas_on, aimaas_oip, node_grpc] + ([ml_plain] if mlserver else [])
        seq_results: dict[str, list] = {key: [] for key in [*floors, *(s[0] for s in seq_sides)]}
        for round_index in range(args.rounds):
            order = list(floors) + seq_sides
            if round_index % 2:
                order.reverse()
            for entry in order:
                if isinstance(entry, str):
                    latencies, elapsed = floors[entry].run_for(args.seq_seconds)
                    seq_results[entry].append((latencies, elapsed, 0))
                    log(f"sequential round {round_index + 1} {entry}: {len(latencies) / elapsed:.1f} req/s")
                    continue
                key, side, name, side_host, side_port, probes = entry
                result = load_round(side, name, side_host, side_port, 1, args.warmup_seconds, args.seq_seconds, workdir,
                                    f"seq-{key}-{round_index}", probes)
                seq_results[key].append(result)
                log(f"sequential round {round_index + 1} {key}: {len(result['latencies_s']) / args.seq_seconds:.1f} req/s, "
                    f"{result['errors']} errors")

        floor_summaries = {key: stats.merge_rounds(seq_results[key]) for key in floors}
        aimaas_seq = summarize(seq_results[aimaas_on[0]], args.seq_seconds)
        oip_seq = summarize(seq_results[aimaas_oip[0]], args.seq_seconds)
        node_seq = summarize(seq_results[node_grpc[0]], args.seq_seconds)
        ml_seq = summarize(seq_results[ml_plain[0]], args.seq_seconds) if mlserver else None
        floor = floor_summaries["floor"]
        report["sequential"] = {
            "what": "one client, one request in flight, texts in turn; the floor in the bench process",
            "seconds_per_round": args.seq_seconds, "rounds": args.rounds,
            "floor": {**floor, "what": "transformers fast tokenizer + ONNX Runtime, 1 thread (the node's setting), batch 1"},
            "floor_default_threads": {**floor_summaries["floor_default_threads"],
                                      "what": "the same, ONNX Runtime's default threads (one per core)"},
            "aimaas": {**aimaas_seq, "what": "gateway POST /v1/models/minilm-sentiment/predict, node batching defaults"},
            "aimaas_oip": {**oip_seq, "what": "the same deployment through the gateway's OIP REST endpoint "
                                              "/v2/models/minilm-sentiment/infer, JSON, BYTES text, label and score "
                                              "outputs: what the task endpoint's own edge path costs"},
            "ratio_p50_aimaas_over_aimaas_oip": stats.p50_ratio(aimaas_seq, oip_seq),
            "node_grpc": {**node_seq, "what": "the inference node itself (no gateway), tritonclient.grpc.aio, BYTES text, "
                                              "label and score outputs"},
            "ratio_p50_aimaas_over_node_grpc": stats.p50_ratio(aimaas_seq, node_seq),
            "ratio_p50_aimaas_oip_over_node_grpc": stats.p50_ratio(oip_seq, node_seq),
            "mlserver": None if ml_seq is None else {**ml_seq, "what": "MLServer REST V2 /v2/models/minilm-sentiment/infer, "
                                                                        "no adaptive batching (its default)"},
            "ratio_rps_aimaas_over_floor": stats.rps_ratio(aimaas_seq, floor),
            "aimaas_overhead_p50_ms": None if aimaas_seq["p50_ms"] is None
            else round(aimaas_seq["p50_ms"] - floor["p50_ms"], 3),
            "ratio_rps_aimaas_over_mlserver": stats.rps_ratio(aimaas_seq, ml_seq),
            "ratio_p50_mlserver_over_aimaas": stats.p50_ratio(ml_seq, aimaas_seq),
            "ratio_rps_mlserver_over_floor": stats.rps_ratio(ml_seq, floor),
        }

        # ---- concurrent: AIMaaS batching on / off, MLServer with / without adaptive batching
        node_url = node
        counts_before = inference_counts(node_url, bench_model.MODEL_NAME)
        conc_results: dict[str, list] = {s[0]: [] for s in http_sides}
        for round_index in range(args.rounds):
            order = list(http_sides) if round_index % 2 == 0 else list(reversed(http_sides))
            for key, side, name, side_host, side_port, probes in order:
                result = load_round(side, name, side_host, side_port, args.clients, args.warmup_seconds, args.conc_seconds,
                                    workdir, f"conc-{key}-{round_index}", probes)
                conc_results[key].append(result)
                log(f"{args.clients} clients round {round_index + 1} {key}: "
                    f"{len(result['latencies_s']) / args.conc_seconds:.1f} req/s, {result['errors']} errors, "
                    f"{result['unfinished']} unanswered")
        counts_after = inference_counts(node_url, bench_model.MODEL_NAME)
        conc = {key: summarize(results, args.conc_seconds) for key, results in conc_results.items()}
        if counts_before and counts_after and counts_after[1] > counts_before[1]:
            # Includes the warm-up traffic of the windows: a property of the batcher under this load.
            conc["aimaas_batching_on"]["avg_server_batch_size"] = round(
                (counts_after[0] - counts_before[0]) / (counts_after[1] - counts_before[1]), 2)
        best_name, best = stats.best_of({k: conc.get(k) for k in ("mlserver_adaptive_batching", "mlserver_no_batching")})
        on, off = conc["aimaas_batching_on"], conc["aimaas_batching_off"]
        report["concurrent"] = {
            "what": f"{args.clients} closed-loop keep-alive HTTP/1.1 clients in one client process, one request in "
                    "flight each, sharing the machine with the servers",
            "clients": args.clients, "seconds_per_round": args.conc_seconds, "warmup_s_per_round": args.warmup_seconds,
            "rounds": args.rounds,
            **conc,
            "mlserver_best_config": best_name,
            "mlserver_best": best,
            "ratio_rps_batching_on_over_off": stats.rps_ratio(on, off),
            "ratio_p50_batching_off_over_on": stats.p50_ratio(off, on),
            "ratio_rps_aimaas_over_mlserver_best": stats.rps_ratio(on, best),
            "ratio_rps_aimaas_over_mlserver_adaptive_batching": stats.rps_ratio(on, conc.get("mlserver_adaptive_batching")),
            "ratio_rps_aimaas_over_mlserver_no_batching": stats.rps_ratio(on, conc.get("mlserver_no_batching")),
            "ratio_rps_aimaas_batching_off_over_mlserver_best": stats.rps_ratio(off, best),
        }
        log("measuring the in-process batching ceiling")
        report["in_process"] = {
            "batch_ceiling": floors["floor"].batch_ceiling(32, 3.0 if args.quick else 6.0),
            "answers": [{"text_words": len(t.split()), "label": label, "score": round(score, 6)}
                        for t, (label, score) in zip(bench_model.TEXTS, expected)],
        }
    report["correctness"] = correctness
    report["mlserver_error"] = mlserver_error
    report["setup"] = {
        "aimaas": {"processes": "etcd, registry, scheduler, 1 inference node (tests/support/gateway.py start_mesh), "
                                "gateway (GatewayApp, INFO access log) in its own process",
                   "deployments": {bench_model.MODEL_NAME: "node batching defaults",
                                   bench_model.UNBATCHED_MODEL_NAME: "deployment batching {enabled: false}"},
                   "node": node_settings()},
        "mlserver": {"venv": str(args.mlserver_venv), "versions": ml_versions,
                     "path": "REST V2 POST /v2/models/<name>/infer, input 'array_inputs' BYTES [1] content_type str",
                     "settings": stats.mlserver_settings(0, 0) | {"http_port": "free", "grpc_port": "free"},
                     "models": {bench_model.MODEL_NAME: "no adaptive batching",
                                MLSERVER_BATCHED_NAME: f"adaptive batching max_batch_size {args.mlserver_max_batch_size}, "
                                                       f"max_batch_time {args.mlserver_max_batch_time_ms / 1000} s"},
                     "framework": "pt (PyTorch, the runtime's default path), device cpu",
                     "log_notes": ml_notes},
        "client": "bench/tasks/load.py: asyncio streams (uvloop), keep-alive HTTP/1.1, one request in flight per client",
    }
    report["server_startup_s"] = startup
    report["software"]["mlserver"] = ml_versions
    report["targets"] = stats.targets_section(
        report["sequential"]["ratio_rps_aimaas_over_mlserver"], report["concurrent"]["ratio_rps_aimaas_over_mlserver_best"],
        report["concurrent"]["ratio_rps_batching_on_over_off"], clients=args.clients, mlserver_error=mlserver_error)
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    problems = stats.validate_report(report)
    if problems:
        raise RuntimeError(f"report failed its own schema: {problems}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(stats.headline(report))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
