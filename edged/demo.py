"""`edged demo`: the shipped demo zoo behind a real daemon, routed per request, against baselines.

The demo starts `edged serve` as a subprocess on a temporary ipc endpoint with a temporary state
directory (so it never touches a running daemon or its learned state), then:

1. streams the eval set through `edged.client.Client` with `reference` answers: the daemon routes
   every request (MESS+), labels the reply with the manifest's checker and learns from it;
2. asks the same daemon for every distinct prompt on every model, with the `model` field (which
   bypasses routing and leaves the router alone), which gives each request's label and joules per
   model: always-largest, always-smallest and random (one seeded uniform pick per request) are
   read from those outcomes, so every policy is scored on the same requests and the same
   meter. Greedy generation makes a prompt's label per model deterministic, so a prompt that
   recurs (N above the eval set's size) reuses its first measurement. Two hindsight baselines
   come from the same outcomes, solved exactly as `edged replay` does: `static_mix`, the
   cheapest mix of two models meeting alpha over the stream (what a router that cannot read
   the request can at best do), and `task_mix`, the cheapest mix per eval-set bucket (the
   policy that knows each prompt's digit count, and every model's rate on it, in advance).

edged's energy counts every model the daemon ran for a request (exploration included). One
unrouted request per model warms the daemon up first, so no policy pays for the cold start.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edged.checkers import Checker, get_checker
from edged.client import Client, ClientError
from edged.paths import demo_zoo_dir
from edged.replay import Trace, baselines

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

POLICIES = ("edged", "largest", "smallest", "random", "static_mix", "task_mix")


class DemoError(RuntimeError):
    """The demo cannot run: missing zoo or eval set, a daemon that does not start or answer."""


@dataclass(frozen=True)
class DemoConfig:
    """What `edged demo` runs. `manifest=None` means the shipped demo zoo."""

    alpha: float = 0.8
    requests: int = 400
    seed: int = 0
    energy: str = "auto"
    manifest: Path | None = None
    #: "reference": every request carries its answer; "agreement": the daemon gets none and
    #: learns from agreement with the top model (the demo still scores against the answers)
    labels: str = "reference"
    # RouterConfig fields beyond alpha and seed. The default margin (0.07 / sqrt(t)) fades too fast
    # for a few hundred requests: the mean lands a request or two under alpha; t**-0.25 clears it.
    router: dict[str, float | int | bool | str] = field(
        default_factory=lambda: {"margin_decay": 0.25})
    #: serve the zoo's dearest model from a second `edged serve` on tcp loopback with CURVE,
    #: as a `kind = "edged"` remote entry of the routed daemon's zoo (issue 15)
    remote: bool = False
    startup_timeout_s: float = 120.0
    request_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise DemoError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.requests < 1:
            raise DemoError(f"requests must be >= 1, got {self.requests}")
        if self.labels not in ("reference", "agreement"):
            raise DemoError(f"labels must be reference or agreement, got {self.labels!r}")

    @property
    def zoo_manifest(self) -> Path:
        return self.manifest or demo_zoo_dir() / "zoo.toml"


@dataclass
class PolicyResult:
    """One policy over the request stream: per-request label, joules and serving model."""

    labels: list[bool] = field(default_factory=list)
    joules: list[float] = field(default_factory=list)
    served: list[str] = field(default_factory=list)
    #: joules spent after the replies (exploration and judge runs), for the stream as a whole
    after_reply_joules: float = 0.0
    #: models explored per request (run after the reply, not served): the routed policy only
    explored: list[list[str]] = field(default_factory=list)

    def summary(self, names: list[str]) -> dict[str, Any]:
        n = len(self.labels)
        counts = Counter(self.served)
        total = sum(self.joules) + self.after_reply_joules
        return {
            "satisfaction": sum(self.labels) / n if n else 0.0,
            "energy_j_per_request": total / n if n else 0.0,
            "after_reply_j_per_request": self.after_reply_joules / n if n else 0.0,
            "call_ratio": {name: counts[name] / n if n else 0.0 for name in names},
        }


@dataclass
class DemoResult:
    """Everything the demo measured; `to_json` is the `--json` document."""

    alpha: float
    names: list[str]
    prompts: list[str]
    policies: dict[str, PolicyResult]
    energy_method: str
    elapsed_s: float
    #: seconds per phase: "daemon_start", "routed", "baseline" (each prompt on every model)
    phases_s: dict[str, float] = field(default_factory=dict)
    #: edged's joules on the baseline pass's measurements: every model it ran for a request
    #: (served and explored) at what that prompt cost that model there. The baselines are
    #: scored on those, the routed pass is measured at another time, and on a shared machine
    #: the two phases' joules per run differed by up to 1.8x: this compares like with like.
    paired_j: float = 0.0
    #: each request's eval-set bucket (`bucket_of`), in stream order
    buckets: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        policies = {p: self.policies[p].summary(self.names) for p in POLICIES}
        if self.paired_j:
            policies["edged"]["paired_energy_j_per_request"] = self.paired_j / len(self.prompts)
        if self.buckets:
            for policy in ("edged", "task_mix"):
                policies[policy]["by_bucket"] = by_bucket(
                    self.buckets, self.policies[policy], self.names)
        return {
            "alpha": self.alpha,
            "requests": len(self.prompts),
            "policies": policies,
            "energy_method": self.energy_method,
            "elapsed_s": round(self.elapsed_s, 3),
            "phases_s": {k: round(v, 3) for k, v in self.phases_s.items()},
        }

    def timing_line(self) -> str:
        """Where the demo's seconds went (the process start and imports before it excluded)."""
        p = self.phases_s
        n, m = len(self.prompts), len(self.names)
        return (f"{self.elapsed_s:.1f} s: daemon start and model loading "
                f"{p.get('daemon_start', 0.0):.1f} s, {n} routed requests "
                f"{p.get('routed', 0.0):.1f} s, baseline pass ({n} prompts x {m} models, "
                f"each named with `model`) {p.get('baseline', 0.0):.1f} s")


def load_eval_set(path: Path) -> list[dict[str, str]]:
    """Rows of `eval.jsonl` (prompt, answer, bucket); a `DemoError` names a bad line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DemoError(f"cannot read the eval set {path}: {exc.strerror or exc}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DemoError(f"{path}:{number}: not JSON: {exc.msg}") from None
        if not isinstance(row, dict) or not all(
            isinstance(row.get(k), str) and row.get(k) for k in ("prompt", "answer")
        ):
            raise DemoError(f"{path}:{number}: needs non-empty string 'prompt' and 'answer'")
        rows.append(row)
    if not rows:
        raise DemoError(f"the eval set {path} is empty")
    return rows


def request_stream(rows: list[dict[str, str]], n: int, seed: int) -> list[dict[str, str]]:
    """`n` requests: the eval set shuffled, reshuffled on every pass when `n` exceeds it."""
    rng = random.Random(seed)
    out: list[dict[str, str]] = []
    while len(out) < n:
        batch = list(rows)
        rng.shuffle(batch)
        out.extend(batch[: n - len(out)])
    return out


@contextlib.contextmanager
def demo_daemon(config: DemoConfig) -> Iterator[str]:
    """`edged serve` on a temporary ipc endpoint and state dir; yields the endpoint."""
    manifest = config.zoo_manifest
    with tempfile.TemporaryDirectory(prefix="edged-demo-") as tmp:
        tmp_path = Path(tmp)
        endpoint = f"ipc://{tmp_path / 'edged.sock'}"
        extras = "".join(f"{key} = {json.dumps(value)}\n" for key, value in config.router.items())
        toml = (
            f"[router]\nalpha = {config.alpha!r}\nseed = {config.seed}\n{extras}\n"
            f"[energy]\nbackend = {json.dumps(config.energy)}\n"
        )
        if config.labels == "agreement":
            toml += '\n[labels]\nsources = ["agreement"]\n'

        with contextlib.ExitStack() as stack:
            if config.remote:
                manifest = stack.enter_context(_remote_tier(config, manifest, tmp_path))
            if config.manifest is not None or config.remote:  # else the daemon's default
                toml += f"\n[models]\nmanifest = {json.dumps(str(manifest.resolve()))}\n"
            (tmp_path / "edged.toml").write_text(toml, encoding="utf-8")
            proc = _serve(tmp_path / "edged.toml", endpoint, tmp_path / "state",
                          tmp_path / "serve.log")
            stack.callback(_stop, proc)
            _wait_ready(proc, endpoint, config.startup_timeout_s, tmp_path / "serve.log")
            yield endpoint


def _serve(config_file: Path, endpoint: str, state: Path, log_path: Path
           ) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "edged", "serve", "--config", str(config_file),
        "--endpoint", endpoint, "--state-dir", str(state), "--log-level", "warning",
    ]
    env = {k: v for k, v in os.environ.items() if k != "EDGED_ENDPOINT"}
    with log_path.open("wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _toml_value(value: Any) -> str:
    """A TOML value of the plain kinds a manifest holds (JSON's spelling is TOML's for them)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)


def _toml_table(header: str, table: dict[str, Any]) -> str:
    return header + "\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items())


@contextlib.contextmanager
def _remote_tier(config: DemoConfig, manifest: Path, tmp: Path) -> Iterator[Path]:
    """A second `edged serve` with the zoo's dearest model on tcp loopback with CURVE; yields
    the routed daemon's manifest: the cheaper models local, the dearest a remote entry."""
    import socket

    import zmq.auth

    data = tomllib.loads(manifest.read_text(encoding="utf-8"))
    models = [dict(m) for m in data.get("models", [])]
    if len(models) < 2:
        raise DemoError(f"--remote needs a zoo of two models or more ({manifest})")
    for m in models:
        if "path" in m and not Path(m["path"]).is_absolute():
            m["path"] = str((manifest.parent / m["path"]).resolve())
    keys = tmp / "keys"
    keys.mkdir(mode=0o700)
    (keys / "clients").mkdir()
    server_pub, server_secret = zmq.auth.create_certificates(keys, "server")
    client_pub, client_secret = zmq.auth.create_certificates(keys, "client")
    (keys / "clients" / "client.key").write_bytes(Path(client_pub).read_bytes())
    for secret in (server_secret, client_secret):
        os.chmod(secret, 0o600)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    top = models[-1]
    head = "".join(f"{k} = {_toml_value(v)}\n" for k, v in data.items()
                   if k not in ("zoo", "models"))
    zoo = _toml_table("[zoo]", data["zoo"]) if isinstance(data.get("zoo"), dict) else ""

    def entries(items: list[dict[str, Any]]) -> str:
        out = ""
        for m in items:
            gen = m.pop("generation", None)
            out += _toml_table("[[models]]", m)
            if gen:
                out += _toml_table("[models.generation]", gen)
        return out

    (tmp / "remote-zoo.toml").write_text(head + zoo + entries([dict(top)]), encoding="utf-8")
    (tmp / "remote.toml").write_text(
        f"[server]\ncurve_secret_key = {json.dumps(str(server_secret))}\n"
        f"curve_client_keys = {json.dumps(str(keys / 'clients'))}\n"
        f"[energy]\nbackend = {json.dumps(config.energy)}\n"
        f"[models]\nmanifest = {json.dumps(str(tmp / 'remote-zoo.toml'))}\n", encoding="utf-8")
    remote = {"name": top["name"], "kind": "edged", "endpoint": endpoint, "model": top["name"],
              "curve_server_key": str(server_pub), "curve_client_cert": str(client_secret)}
    if "generation" in top:
        remote["generation"] = top["generation"]
    routed = tmp / "zoo.toml"
    routed.write_text(head + zoo + entries([*models[:-1], remote]), encoding="utf-8")
    proc = _serve(tmp / "remote.toml", endpoint, tmp / "remote-state", tmp / "remote.log")
    try:
        _wait_ready(proc, endpoint, config.startup_timeout_s, tmp / "remote.log",
                    curve_server_key=server_pub, curve_client_cert=client_secret)
        yield routed
    finally:
        _stop(proc)


def _log_tail(log_path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait_ready(proc: subprocess.Popen[bytes], endpoint: str, timeout_s: float,
                log_path: Path, **curve: Any) -> None:
    deadline = time.monotonic() + timeout_s
    with Client(endpoint, timeout_s=1.0, retries=0, **curve) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DemoError(f"edged serve exited with code {proc.returncode}:\n"
                                f"{_log_tail(log_path)}")
            try:
                if client.request("health").get("status") == "serving":
                    return
            except ClientError:
                time.sleep(0.2)
    raise DemoError(f"edged serve did not answer on {endpoint} within {timeout_s:.0f} s:\n"
                    f"{_log_tail(log_path)}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the daemon drains and exits 0), then SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _joules(body: dict[str, Any]) -> float:
    energy = body.get("energy")
    return float(energy["joules"]) if isinstance(energy, dict) else 0.0


Progress = Callable[[str], None]


def run_demo(config: DemoConfig, progress: Progress | None = None) -> DemoResult:
    """Start the daemon, run the routed stream and the per-model pass, return the outcomes."""
    if not config.zoo_manifest.is_file():
        raise DemoError(f"no zoo manifest at {config.zoo_manifest} (set EDGED_DEMO_ZOO or --zoo)")
    zoo_dir = config.zoo_manifest.parent
    rows = request_stream(load_eval_set(zoo_dir / "eval.jsonl"), config.requests, config.seed)
    say = progress or (lambda line: None)
    started = time.monotonic()
    phases: dict[str, float] = {}
    with demo_daemon(config) as endpoint, Client(
        endpoint, timeout_s=config.request_timeout_s, retries=0
    ) as client:
        names = [str(m["name"]) for m in client.models()]
        for name in names:  # first runs are slow (allocations, caches): keep them out of the tally
            client.generate(rows[0]["prompt"], model=name)
        mark = time.monotonic()
        phases["daemon_start"] = mark - started
        before = _after_reply_joules(client)
        check = get_checker(_manifest_checker(config.zoo_manifest))
        edged, method = _routed(client, rows, names, config.alpha, say,
                                None if config.labels == "reference" else check)
        edged.after_reply_joules = _after_reply_joules(client, wait=True) - before
        phases["routed"] = time.monotonic() - mark
        mark = time.monotonic()
        per_model = _per_model(client, rows, names, say, check)
        phases["baseline"] = time.monotonic() - mark
    policies = {"edged": edged}
    for policy, pick in (("largest", lambda _i: names[-1]), ("smallest", lambda _i: names[0])):
        policies[policy] = _replay(rows, per_model, pick)
    rng = random.Random(config.seed)
    picks = [rng.choice(names) for _ in rows]
    policies["random"] = _replay(rows, per_model, picks.__getitem__)
    policies.update(hindsight(rows, names, per_model, config.alpha))
    return DemoResult(
        alpha=config.alpha, names=names, prompts=[r["prompt"] for r in rows], policies=policies,
        energy_method=method, elapsed_s=time.monotonic() - started, phases_s=phases,
        paired_j=paired_joules(rows, edged, per_model), buckets=[bucket_of(r) for r in rows],
    )


def bucket_of(row: dict[str, str]) -> str:
    """The eval-set row's bucket (its kind of prompt), "all" where the set has none."""
    return row.get("bucket") or "all"


def hindsight(rows: list[dict[str, str]], names: list[str],
              per_model: dict[tuple[str, str], tuple[bool, float]],
              alpha: float) -> dict[str, PolicyResult]:
    """`static_mix` and `task_mix` on the baseline pass's outcomes, in stream order: the
    replay's exact hindsight plans, with each row's eval-set `bucket` as its kind (rows
    without one share a single kind, where task_mix is static_mix)."""
    trace = Trace(
        benchmark="demo", models=tuple(names), texts=tuple(r["prompt"] for r in rows),
        labels=np.array([[per_model[(r["prompt"], n)][0] for n in names] for r in rows], float),
        energy_j=np.array([[per_model[(r["prompt"], n)][1] for n in names] for r in rows]),
        latency_s=np.zeros((len(rows), len(names))),
        kinds=tuple(bucket_of(r) for r in rows),
    )
    outcomes = {
        "static_mix": baselines.static_mix(trace, baselines.static_mix_plan(trace, alpha)),
        "task_mix": baselines.task_mix(trace, baselines.task_mix_plan(trace, alpha)),
    }
    return {policy: PolicyResult(labels=[bool(x) for x in o.satisfaction],
                                 joules=o.energy_j.tolist(),
                                 served=[names[i] for i in o.ran.argmax(axis=1)])
            for policy, o in outcomes.items()}


def by_bucket(buckets: list[str], result: PolicyResult,
              names: list[str]) -> dict[str, dict[str, Any]]:
    """Per eval-set bucket (one per request, in stream order): requests, satisfaction and each
    model's share of them: does the policy send each kind of prompt where it is right?"""
    out: dict[str, dict[str, Any]] = {}
    for bucket in sorted(set(buckets)):
        at = [i for i, b in enumerate(buckets) if b == bucket]
        counts = Counter(result.served[i] for i in at)
        out[bucket] = {
            "requests": len(at),
            "satisfaction": sum(result.labels[i] for i in at) / len(at),
            "call_ratio": {name: counts[name] / len(at) for name in names},
        }
    return out


def paired_joules(rows: list[dict[str, str]], routed: PolicyResult,
                  per_model: dict[tuple[str, str], tuple[bool, float]]) -> float:
    """The routed policy's joules on the baseline pass's measurements: for each request, the
    served model and every explored one, at what that prompt cost that model there."""
    return sum(per_model[(row["prompt"], name)][1]
               for row, served, explored in zip(rows, routed.served, routed.explored,
                                                strict=True)
               for name in (served, *explored))


def _manifest_checker(manifest: Path) -> str:
    data = tomllib.loads(manifest.read_text(encoding="utf-8"))
    return str(data.get("checker", "exact"))


def _after_reply_joules(client: Client, wait: bool = False, timeout_s: float = 300.0) -> float:
    """Joules of every exploration and judge run so far (they run after the replies); with
    `wait`, once none is queued or running."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = client.stats()
        busy = stats.get("exploration", {})
        if not wait or not (busy.get("queued") or busy.get("running")):
            break
        if time.monotonic() > deadline:
            raise DemoError(f"explorations still running after {timeout_s:.0f} s: {busy}")
        time.sleep(0.05)
    return sum(float(m.get("exploration_joules") or 0.0) + float(m.get("judge_joules") or 0.0)
               for m in stats.get("models", {}).values())


def _routed(client: Client, rows: list[dict[str, str]], names: list[str], alpha: float,
            say: Progress, check: Checker | None = None) -> tuple[PolicyResult, str]:
    """The routed stream. With `check`, requests go without their answer (the daemon labels
    by agreement) and the served text is scored here; else the daemon's reference label."""
    result, method = PolicyResult(), ""
    for i, row in enumerate(rows, 1):
        if check is None:
            body = client.generate(row["prompt"], reference=row["answer"])
            labels = body.get("labels") or {}
            satisfied = bool(labels.get(str(body["model"]), False))
        else:
            body = client.generate(row["prompt"])
            satisfied = bool(check(str(body.get("text", "")), row["answer"]))
        model = str(body["model"])
        joules = _joules(body)
        result.labels.append(satisfied)
        result.joules.append(joules)
        result.served.append(model)
        result.explored.append([str(e["model"]) for e in body.get("exploration") or []
                                if isinstance(e, dict) and "model" in e])
        q = float(body.get("route", {}).get("q", 0.0) or 0.0)
        method = (body.get("energy") or {}).get("method", method)
        sat = sum(result.labels) / i
        counts = Counter(result.served)
        mix = " ".join(f"{n} {counts[n] / i:.0%}" for n in names)
        say(f"routed {i}/{len(rows)}  satisfaction {sat:.3f} (alpha {alpha:.2f})  "
            f"Q {q:.2f}  energy {sum(result.joules):.2f} J  | {mix}")
    return result, method


def _per_model(client: Client, rows: list[dict[str, str]], names: list[str],
               say: Progress, check: Checker) -> dict[tuple[str, str], tuple[bool, float]]:
    """(prompt, model) -> (label, joules), each measured once through the daemon (the
    model named, so no routing and nothing learned) and scored here with `check`."""
    distinct = list(dict.fromkeys(r["prompt"] for r in rows))
    answers = {r["prompt"]: r["answer"] for r in rows}
    out: dict[tuple[str, str], tuple[bool, float]] = {}
    total = len(distinct) * len(names)
    for name in names:
        for prompt in distinct:
            body = client.generate(prompt, model=name)
            out[(prompt, name)] = (bool(check(str(body.get("text", "")), answers[prompt])),
                                   _joules(body))
            say(f"baselines {len(out)}/{total}  (every distinct prompt on {', '.join(names)})")
    return out


def _replay(rows: list[dict[str, str]], per_model: dict[tuple[str, str], tuple[bool, float]],
            pick: Callable[[int], str]) -> PolicyResult:
    result = PolicyResult()
    for i, row in enumerate(rows):
        name = pick(i)
        label, joules = per_model[(row["prompt"], name)]
        result.labels.append(label)
        result.joules.append(joules)
        result.served.append(name)
    return result


def format_table(result: DemoResult) -> str:
    """The comparison table: satisfaction, SLA, energy per request, ratio to always-largest."""
    doc = result.to_json()
    largest = doc["policies"]["largest"]["energy_j_per_request"] or float("nan")
    head = (f"{'policy':<10} {'satisfaction':>12} {'SLA':>5} {'J/request':>10} "
            f"{'vs largest':>10}  mix")
    lines = [head, "-" * len(head)]
    for policy in POLICIES:
        p = doc["policies"][policy]
        sla = "met" if p["satisfaction"] >= result.alpha else "MISS"
        mix = " ".join(f"{n} {r:.0%}" for n, r in p["call_ratio"].items())
        lines.append(
            f"{policy:<10} {p['satisfaction']:>12.3f} {sla:>5} {p['energy_j_per_request']:>10.4f} "
            f"{p['energy_j_per_request'] / largest:>10.2f}  {mix}"
        )
    paired = doc["policies"]["edged"].get("paired_energy_j_per_request")
    if paired:
        task = doc["policies"]["task_mix"]["energy_j_per_request"] or float("nan")
        lines.append(f"edged on the baseline pass's joules (paired with the baselines): "
                     f"{paired:.4f} J/request, {paired / largest:.2f} x largest, "
                     f"{paired / task:.2f} x task_mix")
    lines.append("static_mix, task_mix: hindsight, the cheapest mix meeting alpha over the "
                 "stream, and per bucket")
    for policy in ("edged", "task_mix"):
        for bucket, b in doc["policies"][policy].get("by_bucket", {}).items():
            mix = " ".join(f"{n} {r:.0%}" for n, r in b["call_ratio"].items())
            lines.append(f"  {policy:<8} {bucket:>4}: satisfaction {b['satisfaction']:.2f} "
                         f"over {b['requests']:>3}  {mix}")
    return "\n".join(lines)


def write_plot(result: DemoResult, path: Path) -> None:
    """Running satisfaction vs alpha (left) and energy per request per policy (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = range(1, len(result.prompts) + 1)
    colors = {"edged": "tab:green", "largest": "tab:red", "smallest": "tab:blue",
              "random": "tab:gray", "static_mix": "tab:olive", "task_mix": "tab:purple"}
    for policy in POLICIES:
        labels = result.policies[policy].labels
        running, total = [], 0
        for i, ok in enumerate(labels, 1):
            total += ok
            running.append(total / i)
        left.plot(x, running, label=policy, color=colors[policy],
                  linewidth=2.2 if policy == "edged" else 1.2)
    left.axhline(result.alpha, color="black", linestyle="--", linewidth=1, label="alpha (SLA)")
    left.set_xlabel("request")
    left.set_ylabel("running mean satisfaction")
    left.set_ylim(0, 1.02)
    left.legend(loc="lower right", fontsize=8)
    left.set_title("satisfaction on the same requests")
    doc = result.to_json()["policies"]
    energy = [doc[p]["energy_j_per_request"] for p in POLICIES]
    bars = right.bar(POLICIES, energy, color=[colors[p] for p in POLICIES])
    for bar, policy in zip(bars, POLICIES, strict=True):
        right.annotate(f"sat {doc[policy]['satisfaction']:.2f}",
                       (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                       ha="center", va="bottom", fontsize=8)
    right.set_ylabel(f"J per request ({result.energy_method})")
    right.set_title("energy per request")
    fig.suptitle(f"edged demo: {len(result.prompts)} requests, alpha {result.alpha}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
