"""Every port the run's processes listen on, loopback included, refuses anyone without the run's
TLS credentials: another user of a shared node must not be able to send the workers tasks."""

from __future__ import annotations

import ssl
import time

import psutil
import pytest
from distributed.security import Security

from snakemake_executor_plugin_sticky.head.security import run_credentials, write_credentials

from conftest import Workflow
from helpers import LLM_TEMPLATE, ONE_TEMPLATE_SNAKEFILE, ask_identity, sticky_workflow, wait_for


def listening_ports(root: psutil.Process) -> dict[int, str]:
    """TCP ports that the process and its descendants listen on, with the listener's name."""
    ports = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            for connection in process.net_connections(kind="tcp"):
                if connection.status == psutil.CONN_LISTEN:
                    ports[connection.laddr.port] = f"{process.pid} {' '.join(process.cmdline())[:80]}"
        except psutil.Error:
            pass
    return ports


def test_every_listening_port_refuses_calls_without_the_run_credentials(workflow: Workflow):
    sticky_workflow(workflow, ONE_TEMPLATE_SNAKEFILE, LLM_TEMPLATE)
    proc = workflow.popen("--sticky-workers", "2", "--config", "count=6", "sleep=30")
    try:
        wait_for(lambda: len(workflow.lines("setups-llm.txt")) == 2)
        time.sleep(1)  # the invocations are running
        ports = listening_ports(psutil.Process(proc.pid))
        # the scheduler in Snakemake, and a Nanny and a worker per worker process
        assert len(ports) >= 5, ports
        anonymous = ssl.create_default_context()  # speaks TLS, trusts anything, has no certificate
        anonymous.check_hostname, anonymous.verify_mode = False, ssl.CERT_NONE
        for port, owner in ports.items():
            for address, args in (
                (f"tcp://127.0.0.1:{port}", {}),  # a plain Dask RPC call
                (f"tls://127.0.0.1:{port}", {"ssl_context": anonymous}),
                (f"tls://127.0.0.1:{port}", Security.temporary().get_connection_args("client")),  # someone else's
            ):
                with pytest.raises((OSError, EOFError, TypeError, ValueError)):
                    reply = ask_identity(address, args)
                    pytest.fail(f"{address} ({owner}) answered without the run's credentials: {reply}")
    finally:
        proc.kill()
        proc.wait()


def test_credentials_written_for_batch_jobs_are_private(tmp_path):
    folder = tmp_path / "tls"
    on_disk = write_credentials(run_credentials(), folder)
    assert sorted(p.name for p in folder.iterdir()) == ["cert.pem", "key.pem"]
    assert folder.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in folder.iterdir())
    assert on_disk.require_encryption and on_disk.tls_client_key == str(folder / "key.pem")
