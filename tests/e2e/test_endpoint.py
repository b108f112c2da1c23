"""`shell:` rules and OpenAI clients reach the resident model through each worker's endpoint:
real Snakemake, real curl and the official `openai` package, locally and on the one-node Slurm."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import Workflow

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
            "max_wait": 0.3,
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
