"""Every command line of the README and the docs, run as written, with `mlx-fleet up`'s defaults.

Each test starts the fleet the docs start, on the default endpoints (clients on
``tcp://127.0.0.1:5555``, workers on ``:5556``, metric events on ``:5557``, Prometheus
on ``:9464``, HTTP on ``:8000``), runs the commands the docs run against it, through
``bash`` with ``.venv/bin`` first on the PATH (the README's ``. .venv/bin/activate``),
and checks what they print. tests/documented.py lists which test runs which command;
tests/unit/test_documented_commands.py keeps that list and the docs in step.

The default endpoints must be free: these tests fail, naming the port, when another
fleet holds one.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlx_fleet.client import Client, FleetError
from tests.documented import ROOT, as_run, documented_commands
from tests.integration.fleets import workers_of
from tests.integration.processes import FleetProcess
from tests.integration.terminal import Terminal
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

DEFAULT_PORTS = (5555, 5556, 5557, 9464, 8000)
FRONTEND = "tcp://127.0.0.1:5555"
HTTP = "http://127.0.0.1:8000"
BUSY = (FleetError,)  # a status call may time out while the fleet comes up


def documented(text: str) -> str:
    """``text`` exactly as one command line of the docs shows it (fails when the docs changed)."""
    shown = {c.text for c in documented_commands()}
    assert text in shown, f"the docs no longer show {text!r}; update this test and tests/documented.py"
    return text


def shell_env(**extra: str) -> dict[str, str]:
    """The test's environment with the repository's .venv/bin first on the PATH, as after `activate`."""
    env = {**os.environ, **extra}
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run(text: str, *, cwd: Path = ROOT, timeout_s: float = 120.0, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    """One documented command line, run by bash to completion."""
    return subprocess.run(["bash", "-c", text], cwd=cwd, capture_output=True, text=True, timeout=timeout_s,
                          env=env or shell_env())


def ports_free() -> None:
    for port in DEFAULT_PORTS:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ binds: a closing connection is no conflict
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                pytest.fail(f"port {port} is taken: these tests run `mlx-fleet up` on its default endpoints")


@pytest.fixture
def fleet_logs(tmp_path: Path) -> Iterator[list[FleetProcess]]:
    """Processes a test starts; stopped (SIGTERM: drain, exit 0) at its end, their logs shown on failure."""
    ports_free()
    procs: list[FleetProcess] = []
    yield procs
    for proc in reversed(procs):
        proc.stop(timeout_s=30)


def start(procs: list[FleetProcess], text: str, tmp_path: Path, *, cwd: Path = ROOT,
          env: dict[str, str] | None = None) -> FleetProcess:
    """Start a long-running documented command (``up``, ``worker``) in the background."""
    name = re.sub(r"\W+", "-", text)[:60]
    proc = FleetProcess.shell(text, cwd=cwd, log_path=tmp_path / f"{name}.log", env=env or shell_env()).start()
    procs.append(proc)
    return proc


def wait_ready(client: Client, model: str, replicas: int, proc: FleetProcess, timeout_s: float = 300.0) -> None:
    """Until ``model`` has ``replicas`` registered workers; fails at once, with the log, if ``proc`` exits."""
    def ready() -> bool:
        assert proc.proc is not None and proc.proc.poll() is None, f"exited: {proc.log()[-3000:]}"
        return len(workers_of(client, model)) >= replicas

    wait_for(ready, timeout_s, f"{replicas} replica(s) of {model!r}", ignoring=BUSY)


def python_blocks(path: Path) -> list[str]:
    """The fenced ``python`` blocks of a Markdown file."""
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.M | re.S)


def http_json(text: str) -> dict:
    """Run a documented curl command and parse its JSON answer."""
    done = run(text)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# ---- the README's tour, on SmolLM2 ------------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.slow
def test_the_tour_on_smollm2(fleet_logs: list[FleetProcess], tmp_path: Path, smollm2_file: Path) -> None:
    up = start(fleet_logs, documented("scripts/up.sh"), tmp_path)
    paris = "The capital of France is Paris."
    with Client(FRONTEND, timeout_s=120) as client:
        wait_ready(client, "chat", 1, up)

    term = Terminal(["/bin/bash", "-c", documented("mlx-fleet chat")], env=shell_env())
    try:
        at = term.expect(">>> ", timeout_s=60)
        term.type("What is the capital of France?\n")
        at = term.expect(paris, after=at, timeout_s=120)
        term.expect(">>> ", after=at)
        term.type("/bye\n")
        assert term.wait() == 0
    finally:
        term.kill()

    one = run(documented('echo "What is the capital of France?" | mlx-fleet chat'))
    assert one.returncode == 0 and one.stdout.strip() == paris, (one.stdout, one.stderr)
    gen = run(documented('mlx-fleet generate --chat --model chat "What is the capital of France?"'))
    assert gen.returncode == 0 and gen.stdout.strip() == paris, (gen.stdout, gen.stderr)
    nope = run(documented('mlx-fleet generate --model nope "x"'))
    assert nope.returncode == 1 and "unknown_model" in nope.stderr and len(nope.stderr.strip().splitlines()) == 1
    status = run(documented("mlx-fleet status"))
    assert status.returncode == 0 and "chat" in status.stdout and "BLAS in use" in status.stdout, status.stdout

    reply = http_json(documented(
        "curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{\"model\": "
        "\"chat\", \"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}], "
        "\"max_tokens\": 32, \"temperature\": 0}'"))
    assert reply["choices"][0]["message"]["content"] == paris

    # The README's Python examples, as written: the client library and the openai package.
    for code in python_blocks(ROOT / "README.md"):
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0 and done.stdout.strip(), (code, done.stdout, done.stderr)

    up.proc.send_signal(2) if up.proc else None  # Ctrl-C drains and exits 0
    assert up.proc is not None and up.proc.wait(60) == 0, up.log()[-3000:]


# ---- docs/clients.md: generate with a grammar or logprobs, on the demo model ----------------------


def test_the_clients_doc_generate_flags(fleet_logs: list[FleetProcess], tmp_path: Path) -> None:
    up = start(fleet_logs, documented("mlx-fleet up"), tmp_path)
    with Client(FRONTEND, timeout_s=60) as client:
        wait_ready(client, "demo", 1, up)
    (tmp_path / "city.json").write_text(json.dumps(
        {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}))
    city = run(documented('mlx-fleet generate --model demo --json-schema city.json "A city:"'), cwd=tmp_path)
    assert city.returncode == 0 and isinstance(json.loads(city.stdout)["city"], str), (city.stdout, city.stderr)
    phone = run(documented('mlx-fleet generate --model demo --regex "[0-9]{3}-[0-9]{4}" "A phone number:"'))
    assert phone.returncode == 0 and re.fullmatch("[0-9]{3}-[0-9]{4}", phone.stdout.strip()), phone
    choice = run(documented('mlx-fleet generate --model demo --choice yes,no "Is it raining?"'))
    assert choice.returncode == 0 and choice.stdout.strip() in ("yes", "no"), choice
    lps = run(documented('mlx-fleet generate --model demo --max-tokens 5 --logprobs 2 "The capital of France is"'))
    assert lps.returncode == 0 and len([ln for ln in lps.stderr.splitlines() if "top:" in ln]) == 5, lps.stderr
    assert up.stop(timeout_s=60) == 0, up.log()[-3000:]


# ---- docs/http.md, on the demo model ----------------------------------------------------------


def test_the_http_doc(fleet_logs: list[FleetProcess], tmp_path: Path) -> None:
    up = start(fleet_logs, documented("mlx-fleet up"), tmp_path)
    with Client(FRONTEND, timeout_s=60) as client:
        wait_ready(client, "demo", 1, up)
    chat = http_json(documented(
        "curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{\"model\": \"demo\", "
        "\"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}], \"max_tokens\": 32}'"))
    assert chat["object"] == "chat.completion" and chat["usage"]["completion_tokens"] > 0
    streamed = run(documented(
        "curl -N http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{\"model\": "
        "\"demo\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}], \"stream\": true, "
        "\"stream_options\": {\"include_usage\": true}}'"))
    events = [line[6:] for line in streamed.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] > 0, streamed.stdout[-500:]
    text = http_json(documented(
        "curl http://127.0.0.1:8000/v1/completions -d '{\"model\": \"demo\", \"prompt\": \"Once upon a time\", "
        "\"max_tokens\": 16, \"temperature\": 0}'"))
    assert text["object"] == "text_completion" and text["usage"]["completion_tokens"] == 16
    models = http_json(documented("curl http://127.0.0.1:8000/v1/models"))
    assert [m["id"] for m in models["data"]] == ["demo"]
    # the blocks that ask model "chat" (SmolLM2 with tools) run in test_openai_tools.py
    for code in [c for c in python_blocks(ROOT / "docs" / "http.md") if 'model="chat"' not in c]:
        done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0 and done.stdout.strip(), (code, done.stdout, done.stderr)
    assert up.stop(timeout_s=60) == 0, up.log()[-3000:]

    # "with MLX_FLEET_API_KEY=sk-local set on the fleet"
    up = start(fleet_logs, documented("mlx-fleet up"), tmp_path, env=shell_env(MLX_FLEET_API_KEY="sk-local"))
    with Client(FRONTEND, timeout_s=60) as client:
        wait_ready(client, "demo", 1, up)
    keyed = http_json(documented('curl http://127.0.0.1:8000/v1/models -H "Authorization: Bearer sk-local"'))
    assert [m["id"] for m in keyed["data"]] == ["demo"]
    refused = http_json(documented("curl http://127.0.0.1:8000/v1/models"))
    assert refused["error"]["code"] == "missing_api_key", refused


@pytest.mark.slow
def test_the_conformance_suite_against_a_running_fleet(fleet_logs: list[FleetProcess], tmp_path: Path) -> None:
    """docs/protocol.md: the conformance suite pointed at a fleet that is already running."""
    up = start(fleet_logs, documented("mlx-fleet up"), tmp_path)
    with Client(FRONTEND, timeout_s=60) as client:
        wait_ready(client, "demo", 1, up)
    suite = run(documented(".venv/bin/python -m pytest -q tests/conformance --connect tcp://127.0.0.1:5555"),
                timeout_s=420)
    assert suite.returncode == 0 and " passed" in suite.stdout, suite.stdout[-3000:]
    assert up.stop(timeout_s=60) == 0, up.log()[-3000:]


# ---- several models and replicas, and models at runtime -------------------------------------


def test_several_models_and_replicas_then_load_and_unload(fleet_logs: list[FleetProcess], tmp_path: Path) -> None:
    up = start(fleet_logs, documented("mlx-fleet up --model chat=demo-small --model tiny=demo --replicas chat=2"),
               tmp_path)
    with Client(FRONTEND, timeout_s=60) as client:
        wait_ready(client, "chat", 2, up)
        wait_ready(client, "tiny", 1, up)
    # README, Watching a fleet: the live view on a terminal (q quits), and its plain lines off one.
    term = Terminal(["/bin/bash", "-c", documented("mlx-fleet top")], env=shell_env())
    try:
        at = term.expect("RUN/CAP", timeout_s=60)
        for wid in ("chat-0", "chat-1", "tiny-0"):
            term.expect(wid, after=at)
        term.type("q")
        assert term.wait() == 0
    finally:
        term.kill()
    plain = run(documented("mlx-fleet top --iterations 1 | cat"))
    assert plain.returncode == 0 and "  replica=chat-1 state=ready" in plain.stdout, (plain.stdout, plain.stderr)
    assert "model=tiny state=ready" in plain.stdout
    loaded = run(documented("mlx-fleet load extra=demo --replicas 2"), timeout_s=300)
    assert loaded.returncode == 0, (loaded.stdout, loaded.stderr)
    with Client(FRONTEND, timeout_s=60) as client:
        assert len(workers_of(client, "extra")) == 2  # load returned once both were ready
    gen = run(documented('mlx-fleet generate --model extra --max-tokens 8 "Hello"'))
    assert gen.returncode == 0 and gen.stdout.strip(), (gen.stdout, gen.stderr)
    unloaded = run(documented("mlx-fleet unload extra"), timeout_s=120)
    assert unloaded.returncode == 0, (unloaded.stdout, unloaded.stderr)
    with Client(FRONTEND, timeout_s=60) as client:
        wait_for(lambda: "extra" not in client.models(), 60, "extra to be gone", ignoring=BUSY)


# ---- sharding on one machine -------------------------------------------------------------------


def test_a_sharded_model_on_this_machine_answers_as_mlx_lm_does(fleet_logs: list[FleetProcess], tmp_path: Path,
                                                                 demo_small_loaded: tuple) -> None:
    from actors.curve import load_client_keys
    from tests.integration.reference import greedy_reference

    up = start(fleet_logs, documented("mlx-fleet up --model big=demo-small --shards big=2"), tmp_path)
    model, tokenizer = demo_small_loaded
    ids = tokenizer.encode("The quick brown fox")
    with Client(FRONTEND, timeout_s=120) as client:
        wait_ready(client, "big", 1, up)
        row = workers_of(client, "big")["big-0"]
        assert len(row["ranks"]) == 2
        for max_tokens in (1, 24):
            done = client.generate(model="big", prompt_tokens=ids, max_tokens=max_tokens)
            assert done.token_ids == greedy_reference(model, tokenizer, ids, max_tokens)[0]


# ---- machines: CurveZMQ, remote workers, a group of ranks from a hostfile ----------------------


@pytest.mark.slow
def test_workers_and_a_sharded_group_join_over_curve(fleet_logs: list[FleetProcess], tmp_path: Path,
                                                     demo_small_loaded: tuple) -> None:
    from actors.curve import load_client_keys
    from tests.integration.reference import greedy_reference

    keys = run(documented("mlx-fleet keys keys/"), cwd=tmp_path)
    assert keys.returncode == 0, keys.stderr
    up = start(fleet_logs, documented("mlx-fleet up --backend tcp://0.0.0.0:5556 --curve-server-secret "
                                      "keys/broker.key_secret --curve-authorized-dir keys/authorized"),
               tmp_path, cwd=tmp_path)
    worker = start(fleet_logs, as_run(documented(
        "mlx-fleet worker --connect tcp://BROKER_HOST:5556 --model chat=demo-small "
        "--curve-secret keys/worker.key_secret --curve-server-key keys/broker.key")), tmp_path, cwd=tmp_path)
    status_cmd = documented("mlx-fleet status --curve-secret keys/client.key_secret --curve-server-key keys/broker.key")

    def status_shows_the_worker() -> bool:
        for proc in (up, worker):
            assert proc.proc is not None and proc.proc.poll() is None, f"exited: {proc.log()[-3000:]}"
        shown = run(status_cmd, cwd=tmp_path)
        return shown.returncode == 0 and re.search(r"\bchat\b", shown.stdout) is not None and "ready" in shown.stdout

    wait_for(status_shows_the_worker, 180, "the remote worker in `mlx-fleet status`")
    assert worker.stop(timeout_s=30) == 0, worker.log()[-3000:]

    (tmp_path / "hosts.json").write_text(json.dumps(
        {"backend": "ring", "hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]},
                                      {"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}]}))
    model, tokenizer = demo_small_loaded
    ids = tokenizer.encode("Once upon a time")
    want = greedy_reference(model, tokenizer, ids, 16)[0]
    forms = [
        [documented("mlx-fleet worker --connect tcp://BROKER_HOST:5556 --model big=demo-small --shards 2 "
                    "--hostfile hosts.json --curve-secret keys/worker.key_secret --curve-server-key keys/broker.key")],
        [documented("mlx-fleet worker --connect tcp://BROKER_HOST:5556 --model big=demo-small --shards 2 "
                    "--hostfile hosts.json --rank 0 --curve-secret keys/worker.key_secret "
                    "--curve-server-key keys/broker.key"),
         documented("mlx-fleet worker --connect tcp://BROKER_HOST:5556 --model big=demo-small --shards 2 "
                    "--hostfile hosts.json --rank 1 --curve-secret keys/worker.key_secret "
                    "--curve-server-key keys/broker.key")],
        [documented("mlx.launch --backend ring --hostfile hosts.json -- mlx-fleet worker --connect "
                    "tcp://BROKER_HOST:5556 --model big=demo-small --shards 2 --curve-secret keys/worker.key_secret "
                    "--curve-server-key keys/broker.key")],
    ]
    creds = load_client_keys(str(tmp_path / "keys" / "client.key_secret"), str(tmp_path / "keys" / "broker.key"))
    for form in forms:
        group = [start(fleet_logs, as_run(text), tmp_path, cwd=tmp_path) for text in form]
        with Client(FRONTEND, timeout_s=120, curve=creds) as client:
            wait_ready(client, "big", 1, group[0])
            assert client.generate(model="big", prompt_tokens=ids, max_tokens=16).token_ids == want
            for proc in group:
                if proc.cmd[-1].startswith("exec mlx.launch"):
                    proc.stop_group()  # mlx.launch has no stop of its own: its whole process group is stopped
                else:
                    assert proc.stop(timeout_s=30) == 0, proc.log()[-3000:]
            wait_for(lambda: not workers_of(client, "big"), 60, "the group to leave", ignoring=BUSY)
    assert up.stop(timeout_s=60) == 0, up.log()[-3000:]

