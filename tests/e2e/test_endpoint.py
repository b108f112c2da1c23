"""`shell:` rules and OpenAI clients reach the resident model through each worker's endpoint:
real Snakemake, real curl and the official `openai` package, locally and on the one-node Slurm."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import psutil
import pytest

from conftest import Workflow, interrupt
from helpers import start_kept_worker, start_scheduler, stop_groups, wait_for

DASK = str(Path(sys.executable).with_name("dask"))

ECHO = """
    import time
    from functools import partial


    def setup(prefix="echo"):
        return {"prefix": prefix}


    def answer(state, requests):
        out = []
        for r in requests:
            text = r["messages"][-1]["content"] if "messages" in r else r["prompt"]
            if "boom" in text:
                raise ValueError("the template cannot answer boom")
            if "slow" in text:
                time.sleep(1.0)
            out.append(f"{state['prefix']}: {text.upper()}")
        return out


    def serve(state):
        return {
            "model": "echo-model",
            "chat": partial(answer, state),
            "completions": partial(answer, state),
            "embeddings": lambda inputs: [[float(len(s)), 0.5] for s in inputs],
            "max_batch": 16,
            "max_wait": 1.0,  # long enough for a neighbour's request to come on a loaded machine
        }
"""

ASK = """
    \"\"\"A command-line tool on the official openai client: ask.py KIND TEXT.\"\"\"
    import sys

    import openai

    client = openai.OpenAI()  # OPENAI_BASE_URL and OPENAI_API_KEY from the environment
    kind, text = sys.argv[1], sys.argv[2]
    messages = [{"role": "user", "content": text}]
    if kind == "chat":
        print(client.chat.completions.create(model="echo-model", messages=messages).choices[0].message.content)
    elif kind == "stream":
        chunks = client.chat.completions.create(model="echo-model", messages=messages, stream=True)
        print("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    elif kind == "completion":
        print(client.completions.create(model="echo-model", prompt=text).choices[0].text)
    elif kind == "embedding":
        print(client.embeddings.create(model="echo-model", input=text).data[0].embedding)
"""

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]

SNAKEFILE = """
    config["sticky"] = {{"echo": {{"setup": "echo.py", "slots": int(config.get("slots", 4))}}}}
    WORDS = {words!r}
    KINDS = ["chat", "stream", "completion", "embedding"]

    rule all:
        input:
            expand("out/curl/{{w}}.txt", w=WORDS),
            expand("out/{{kind}}/{{w}}.txt", kind=KINDS, w=WORDS[:2]),
            "out/script/alpha.txt",
            "out/models.json",

    rule curl:
        output: "out/curl/{{w}}.txt"
        log: "logs/curl/{{w}}.log"
        resources: sticky="echo"
        shell:
            \"\"\"
            curl -sS --fail-with-body "$OPENAI_BASE_URL/chat/completions" -H "Authorization: Bearer $OPENAI_API_KEY" \\\\
              -H 'Content-Type: application/json' \\\\
              -d '{{{{"model": "echo-model", "messages": [{{{{"role": "user", "content": "{{wildcards.w}}"}}}}]}}}}' \\\\
              2> {{log}} | jq -r '.choices[0].message.content' > {{output}}
            \"\"\"

    rule client:
        output: "out/{{kind}}/{{w}}.txt"
        wildcard_constraints: kind="chat|stream|completion|embedding"
        resources: sticky="echo"
        shell: "{python} ask.py {{wildcards.kind}} {{wildcards.w:q}} > {{output}}"

    rule script:
        output: "out/script/{{w}}.txt"
        resources: sticky="echo"
        script: "client.py"

    rule models:
        output: "out/models.json"
        resources: sticky="echo"
        shell: 'curl -sS --fail-with-body -H "Authorization: Bearer $OPENAI_API_KEY" "$OPENAI_BASE_URL/models" > {{output}}'
"""

CLIENT_SCRIPT = """
    import openai

    client = openai.OpenAI()
    answer = client.chat.completions.create(
        model="echo-model", messages=[{"role": "user", "content": snakemake.wildcards.w}]
    )
    with open(snakemake.output[0], "w") as f:
        print(answer.choices[0].message.content, file=f)
"""


def endpoint_workflow(workflow: Workflow) -> Workflow:
    workflow.write("echo.py", ECHO)
    workflow.write("ask.py", ASK)
    workflow.write("client.py", CLIENT_SCRIPT)
    workflow.write("Snakefile", SNAKEFILE.format(words=WORDS, python=sys.executable))
    return workflow


def model_calls(workflow: Workflow) -> dict:
    return json.loads(workflow.read(".snakemake/sticky/report.json"))["templates"]["echo"]["model_calls"]


def check_answers(workflow: Workflow) -> None:
    for word in WORDS:
        assert workflow.read(f"out/curl/{word}.txt") == f"echo: {word.upper()}\n"
    for kind in ("chat", "stream", "completion"):
        for word in WORDS[:2]:
            assert workflow.read(f"out/{kind}/{word}.txt") == f"echo: {word.upper()}\n", kind
    assert json.loads(workflow.read("out/embedding/alpha.txt")) == [5.0, 0.5]
    assert workflow.read("out/script/alpha.txt") == "echo: ALPHA\n"
    models = json.loads(workflow.read("out/models.json"))
    assert [m["id"] for m in models["data"]] == ["echo-model"]


def test_shell_rules_and_scripts_reach_the_endpoint_with_curl_and_the_openai_client(workflow: Workflow):
    run = endpoint_workflow(workflow).run()
    assert run.returncode == 0, run.output
    check_answers(workflow)
    calls = model_calls(workflow)
    assert calls["items"] >= 8 + 8 + 1 and calls["mean_batch"] > 1, calls  # concurrent requests share calls
    assert workflow.leftover_processes() == []


@pytest.mark.usefixtures("slurm")
def test_the_endpoint_serves_shell_rules_of_slurm_workers(workflow: Workflow):
    run = endpoint_workflow(workflow).run(
        "--sticky-cluster",
        "slurm",
        "--sticky-interface",
        "lo",
        "--sticky-max-workers",
        "1",
        "--jobs",
        "4",
        "--config",
        "slots=2",
        cores=1,
    )
    assert run.returncode == 0, run.output
    check_answers(workflow)
    assert model_calls(workflow)["mean_batch"] > 1


CHAT_ONLY = """
    def setup():
        return {}


    def serve(state):
        return {"model": "chat-only", "chat": lambda requests: ["yes" for _ in requests]}
"""

PROBE = r"""
    code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
    url="$OPENAI_BASE_URL"
    auth=(-H "Authorization: Bearer $OPENAI_API_KEY" -H "Content-Type: application/json")
    chat() { printf '{"model": "%s", "messages": [{"role": "user", "content": "%s"}]}' "$1" "$2"; }
    echo "no_key $(code "$url/models")"
    echo "wrong_key $(code -H 'Authorization: Bearer not-the-key' "$url/models")"
    echo "no_key_post $(code -d "$(chat echo-model hi)" "$url/chat/completions")"
    echo "malformed $(code "${auth[@]}" -d '{"model": ' "$url/chat/completions")"
    echo "no_messages $(code "${auth[@]}" -d '{"model": "echo-model"}' "$url/chat/completions")"
    echo "no_model $(code "${auth[@]}" -d '{"messages": [{"role": "user", "content": "x"}]}' "$url/chat/completions")"
    echo "bad_prompt $(code "${auth[@]}" -d '{"model": "echo-model", "prompt": [1, 2]}' "$url/completions")"
    echo "unknown_model $(code "${auth[@]}" -d "$(chat gpt-9 hi)" "$url/chat/completions")"
    echo "unknown_path $(code "${auth[@]}" -d '{}' "$url/audio/speech")"
    { printf '{"model": "echo-model", "prompt": "'; head -c 5000000 /dev/zero | tr '\0' a; printf '"}'; } > big.json
    echo "too_large $(code "${auth[@]}" --data-binary @big.json "$url/completions")"
    echo "raises $(code "${auth[@]}" -d "$(chat echo-model boom)" "$url/chat/completions")"
    echo "after $(code "${auth[@]}" -d "$(chat echo-model fine)" "$url/chat/completions")"
"""

UNSERVED = r"""
    code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
    auth=(-H "Authorization: Bearer $OPENAI_API_KEY" -H "Content-Type: application/json")
    echo "embeddings $(code "${auth[@]}" -d '{"model": "chat-only", "input": "x"}' "$OPENAI_BASE_URL/embeddings")"
    echo "completions $(code "${auth[@]}" -d '{"model": "chat-only", "prompt": "x"}' "$OPENAI_BASE_URL/completions")"
"""

SHARED_CALL = """
    import http.client, json, os, socket, threading, time
    from urllib.parse import urlparse

    import psutil

    base = urlparse(os.environ["OPENAI_BASE_URL"])
    headers = {"Authorization": f"Bearer {os.environ['OPENAI_API_KEY']}", "Content-Type": "application/json"}
    results = {}


    def ask(name, text, stream=False, leave=False):
        conn = http.client.HTTPConnection(base.hostname, base.port, timeout=60)
        body = {"model": "echo-model", "messages": [{"role": "user", "content": text}], "stream": stream}
        conn.request("POST", base.path + "/chat/completions", json.dumps(body), headers)
        response = conn.getresponse()
        if leave:  # the first event, then the client is gone
            results[name] = [response.status, response.read(6).decode()]
            conn.sock.shutdown(socket.SHUT_RDWR)
            conn.close()
            return
        results[name] = [response.status, json.loads(response.read()) if not stream else response.read().decode()]


    slow = threading.Thread(target=ask, args=("slow", "slow one"))
    slow.start()
    time.sleep(0.4)  # the slow call holds the device: the next three wait, and share one call
    others = [
        threading.Thread(target=ask, args=("boom", "boom")),
        threading.Thread(target=ask, args=("fine", "fine")),
        threading.Thread(target=ask, args=("left", "left mid-stream"), kwargs={"stream": True, "leave": True}),
    ]
    for t in others:
        t.start()
    for t in [slow, *others]:
        t.join()
    ask("later", "later")
    refused = []
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                try:
                    socket.create_connection((a.address, base.port), timeout=5).close()
                except OSError:
                    refused.append(a.address)
                else:
                    results.setdefault("reachable_from", []).append(a.address)
    results["refused_on"] = refused
    with open(snakemake.output[0], "w") as f:
        json.dump(results, f)
"""

ECHO_LOGGING = ECHO.replace(
    "        out = []\n",
    "        out = []\n        with open('calls.log', 'a') as f:\n            print(repr([r.get('messages', [{}])[-1].get('content') for r in requests]), file=f)\n",
)

BAD_INPUT_SNAKEFILE = """
    config["sticky"] = {"echo": {"setup": "echo.py", "slots": 2}, "chatonly": {"setup": "chat_only.py"}}

    rule all:
        input: "probe.txt", "unserved.txt", "shared.json"

    rule probe:
        output: "probe.txt"
        resources: sticky="echo"
        shell: "bash probe.sh > {output}"

    rule unserved:
        output: "unserved.txt"
        resources: sticky="chatonly"
        shell: "bash unserved.sh > {output}"

    rule shared:
        output: "shared.json"
        resources: sticky="echo"
        script: "shared_call.py"
"""


def test_the_endpoint_answers_bad_requests_with_openai_errors_and_harms_nothing_else(workflow: Workflow):
    workflow.write("echo.py", ECHO_LOGGING)
    workflow.write("chat_only.py", CHAT_ONLY)
    workflow.write("probe.sh", PROBE)
    workflow.write("unserved.sh", UNSERVED)
    workflow.write("shared_call.py", SHARED_CALL)
    workflow.write("Snakefile", BAD_INPUT_SNAKEFILE)
    run = workflow.run()
    assert run.returncode == 0, run.output
    codes = dict(line.split() for line in workflow.read("probe.txt").splitlines())
    assert codes == {
        "no_key": "401",
        "wrong_key": "401",
        "no_key_post": "401",
        "malformed": "400",
        "no_messages": "400",
        "no_model": "400",
        "bad_prompt": "400",
        "unknown_model": "404",
        "unknown_path": "404",
        "too_large": "413",
        "raises": "500",
        "after": "200",
    }
    assert dict(line.split() for line in workflow.read("unserved.txt").splitlines()) == {
        "embeddings": "501",
        "completions": "501",
    }
    shared = json.loads(workflow.read("shared.json"))
    assert shared["slow"][0] == 200 and shared["fine"][0] == 200 and shared["later"][0] == 200
    assert shared["fine"][1]["choices"][0]["message"]["content"] == "echo: FINE"
    status, error = shared["boom"]
    assert status == 500 and "cannot answer boom" in error["error"]["message"], error
    assert shared["left"][0] == 200 and shared["left"][1].startswith("data: ")
    calls = [line for line in workflow.read("calls.log").splitlines()]
    assert any("'boom'" in c and "'fine'" in c for c in calls), calls  # the failing request shared a call
    assert "reachable_from" not in shared  # loopback only
    assert workflow.leftover_processes() == []


SHELL_SNAKEFILE = """
    config["sticky"] = {"plain": {"setup": "plain.py", "slots": 2}}
    shell.prefix("set -euo pipefail; export PREFIXED=yes; ")
    GREETING = "hello"

    rule all:
        input: "out/env.txt", "out/with space/named.txt", "out/log.txt", "out/params-a.txt", "out/long.txt"

    rule long_command:
        output: "out/long.txt"
        params: long="x" * 200000
        resources: sticky="plain"
        shell: "echo {params.long} | wc -c > {output}"

    rule env:
        output: "out/env.txt"
        threads: 2
        resources: sticky="plain", tmpdir="scratch"
        shell: 'echo "omp=$OMP_NUM_THREADS tmp=$TMPDIR {resources.tmpdir} prefixed=$PREFIXED cwd=$(basename $PWD)" > {output}'

    rule quoted:
        output: "out/with space/named.txt"
        resources: sticky="plain"
        shell: "echo quoted > {output:q}; echo beside > {output:q}.idx"

    rule logged:
        output: "out/log.txt"
        log: "logs/logged.log"
        resources: sticky="plain"
        shell: "(echo to-output; echo to-log >&2) > {output} 2> {log}"

    rule params:
        output: "out/params-{w}.txt"
        params: x=lambda wildcards: wildcards.w * 3
        resources: sticky="plain"
        shell: "echo {params.x} {wildcards.w} {threads} {GREETING} {rule} > {output}"

    rule pipefail:
        output: "out/pipefail.txt"
        resources: sticky="plain"
        shell: "false | true; echo reached > {output}"

    rule unset:
        output: "out/unset.txt"
        resources: sticky="plain"
        shell: "echo $NO_SUCH_VARIABLE > {output}"

    rule status:
        output: "out/status.txt"
        resources: sticky="plain"
        shell: "touch {output}; exit 3"
"""

PLAIN = """
    def setup():
        return {}
"""


def shell_outputs(workflow: Workflow) -> dict[str, str]:
    out = workflow.root / "out"
    return {str(p.relative_to(out)): p.read_text() for p in sorted(out.rglob("*")) if p.is_file()}


def test_shell_rules_keep_snakemakes_shell_semantics_as_under_the_local_executor(workflow: Workflow):
    workflow.write("plain.py", PLAIN)
    workflow.write("Snakefile", SHELL_SNAKEFILE)
    (workflow.root / "scratch").mkdir()
    failing = ["out/pipefail.txt", "out/unset.txt", "out/status.txt"]
    results = {}
    for executor in ("local", "sticky"):
        ok = workflow.run(executor=executor)
        assert ok.returncode == 0, ok.output
        bad = workflow.run(*failing, "--keep-going", executor=executor)
        assert bad.returncode != 0
        results[executor] = (shell_outputs(workflow), workflow.read("logs/logged.log"))
        assert not any((workflow.root / f).exists() for f in failing), executor
        if executor == "sticky":
            assert "returned non-zero exit status 3" in bad.output, bad.output
        for path in (workflow.root / "out", workflow.root / "logs"):
            __import__("shutil").rmtree(path)
    assert results["sticky"] == results["local"]
    outputs, log = results["sticky"]
    assert outputs["env.txt"] == f"omp=2 tmp=scratch scratch prefixed=yes cwd={workflow.root.name}\n"
    assert outputs["with space/named.txt.idx"] == "beside\n" and log == "to-log\n"
    assert outputs["params-a.txt"] == "aaa a 1 hello params\n"
    assert outputs["long.txt"].strip() == "200001"  # a command longer than an argument may be


def test_a_run_rule_that_is_sticky_is_refused_naming_the_rule(workflow: Workflow):
    workflow.write("plain.py", PLAIN)
    workflow.write(
        "Snakefile",
        """
        config["sticky"] = {"plain": {"setup": "plain.py"}}
        rule inline:
            output: "x.txt"
            resources: sticky="plain"
            run:
                open(output[0], "w").write("x")
        """,
    )
    run = workflow.run()
    assert run.returncode != 0
    assert "Rule 'inline' is sticky (template 'plain') but its body is run:" in run.output, run.output
    assert "shell command as a child of the worker (shell:)" in run.output


def test_a_shell_rule_past_its_runtime_is_ended_with_what_it_started_and_its_worker_goes_on(workflow: Workflow):
    workflow.write("plain.py", PLAIN)
    workflow.write(
        "Snakefile",
        """
        config["sticky"] = {"plain": {"setup": "plain.py", "slots": 1}}
        rule all:
            input: "hung.txt", "after.txt"
        rule hung:
            output: "hung.txt"
            priority: 10
            resources: sticky="plain"
            shell: "sleep 300 & sleep 300; touch {output}"
        rule after:
            output: "after.txt"
            resources: sticky="plain"
            shell: "echo after > {output}"
        """,
    )
    run = workflow.run("--keep-going", "--sticky-invocation-timeout", "3", "--sticky-workers", "1")
    assert run.returncode != 0
    assert "ran past its limit of 3 s and was ended" in run.output, run.output
    assert not (workflow.root / "hung.txt").exists()
    assert workflow.read("after.txt") == "after\n"  # the same worker ran the job queued behind
    report = json.loads(workflow.read(".snakemake/sticky/report.json"))
    assert len(report["templates"]["plain"]["workers"]) == 1
    assert workflow.leftover_processes() == []  # the sleeps ended with the command


def test_ctrl_c_ends_a_running_shell_rule_and_what_it_started(workflow: Workflow):
    workflow.write("plain.py", PLAIN)
    workflow.write(
        "Snakefile",
        """
        config["sticky"] = {"plain": {"setup": "plain.py"}}
        rule long:
            output: "long.txt"
            resources: sticky="plain"
            shell: "sleep 300 & echo started > started.txt; sleep 300; touch {output}"
        """,
    )
    proc = workflow.popen(pipe=True)
    wait_for(lambda: (workflow.root / "started.txt").exists(), timeout=120)
    interrupt(proc)
    output, _ = proc.communicate(timeout=60)  # a pipe: no orphan holds it open
    assert proc.returncode != 0
    assert workflow.leftover_processes(wait_s=10) == [], output
    assert not (workflow.root / "long.txt").exists()


def listening_ports(pid: int) -> set[int]:
    """The TCP ports a process and its children listen on."""
    parent = psutil.Process(pid)
    ports = set()
    for process in [parent, *parent.children(recursive=True)]:
        try:
            ports |= {c.laddr.port for c in process.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            pass
    return ports


def test_an_attached_worker_serves_during_the_run_and_stops_serving_after_it(workflow: Workflow):
    endpoint_workflow(workflow)
    scheduler, scheduler_file = start_scheduler(workflow)
    worker = None
    try:
        worker = start_kept_worker(workflow, scheduler_file, "sticky-echo=2", threads=2)
        wait_for(lambda: len(listening_ports(worker.pid)) >= 2)  # the Nanny's port and the worker's
        before = listening_ports(worker.pid)
        run = workflow.run("--sticky-scheduler", str(scheduler_file), "--config", "slots=2", cores=2)
        assert run.returncode == 0, run.output
        check_answers(workflow)
        wait_for(lambda: listening_ports(worker.pid) == before)  # the endpoint closed with the run
        assert worker.poll() is None, "the user's worker still runs"
    finally:
        stop_groups(worker, scheduler)


OWN_SERVER = """
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


    class Models(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"data": [{"id": "own-server", "key": self.headers["Authorization"]}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)


    def setup():
        server = ThreadingHTTPServer(("127.0.0.1", 0), Models)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return {"server": server}


    def serve(state):
        return {"base_url": f"http://127.0.0.1:{state['server'].server_port}/v1", "api_key": "engine-key"}


    def teardown(state):
        state["server"].shutdown()
"""


def test_an_engines_own_server_is_handed_on_to_the_invocations(workflow: Workflow):
    workflow.write("engine.py", OWN_SERVER)
    workflow.write(
        "Snakefile",
        """
        config["sticky"] = {"engine": {"setup": "engine.py"}}
        rule models:
            output: "models.json"
            resources: sticky="engine"
            shell: 'curl -sS --fail-with-body -H "Authorization: Bearer $OPENAI_API_KEY" "$OPENAI_BASE_URL/models" > {output}'
        """,
    )
    run = workflow.run()
    assert run.returncode == 0, run.output
    assert json.loads(workflow.read("models.json"))["data"] == [{"id": "own-server", "key": "Bearer engine-key"}]
    assert workflow.leftover_processes() == []
