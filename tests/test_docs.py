"""The operator docs and deployment examples say only what tiamat does.

- docs/migrating-from-gunicorn.md: its tiamat column is generated from the settings table
  (``python tests/test_docs.py --gunicorn-table`` rewrites it); the test fails when stale.
- Every tiamat flag named in the docs, the migration tables and the deployment examples
  exists in ``tiamat --help`` (or the control subcommands' help).
- The deployment examples have the properties docs/deployment.md promises (exec-form CMD,
  non-root, grace period > graceful timeout, socket activation ...), and the Dockerfile's
  command line really serves and stops gracefully on TERM.

(The settings reference, docs/settings.md, is generated and tested elsewhere.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
from conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DEPLOY = ROOT / "examples" / "deploy"
PROSE = ("getting-started.md", "worker-classes.md", "deployment.md")
GUNICORN_DOC = DOCS / "migrating-from-gunicorn.md"
UVICORN_DOC = DOCS / "migrating-from-uvicorn.md"
_FLAG = re.compile(r"(?<![\w./-])(--?[A-Za-z][\w-]*)")
_CODE = re.compile(r"`([^`\n]+)`")


# --- the generated tiamat column ---------------------------------------------------------------
def tiamat_cell(gunicorn_name: str) -> str:
    """What the tiamat column says for a gunicorn setting, from tiamat's settings table."""
    from tiamat.config import IGNORED_GUNICORN_KEYS
    from tiamat.settings import BY_KEY

    setting = BY_KEY.get(gunicorn_name)
    if setting is None:
        return "ignored" if gunicorn_name in IGNORED_GUNICORN_KEYS else "—"
    flags = setting.flags + setting.off_flags
    if flags:
        return ", ".join(f"`{flag}`" for flag in flags)
    return f"`{setting.name}` (config file)"


def _table(text: str, marker: str) -> list[list[str]]:
    """The rows (cells stripped) of the table between ``<!-- marker:start/end -->``."""
    body = text.split(f"<!-- {marker}:start -->", 1)[1].split(f"<!-- {marker}:end -->", 1)[0]
    rows = [line for line in body.strip().splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in rows[2:]]


def regenerate_gunicorn_table(text: str) -> str:
    start, rest = text.split("<!-- gunicorn-table:start -->\n", 1)
    table, end = rest.split("<!-- gunicorn-table:end -->", 1)
    lines = table.strip("\n").splitlines()
    out = lines[:2]
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        cells[2] = tiamat_cell(cells[0].strip("`"))
        out.append("| " + " | ".join(cells) + " |")
    return f"{start}<!-- gunicorn-table:start -->\n" + "\n".join(out) + "\n<!-- gunicorn-table:end -->" + end


# --- which flags exist ----------------------------------------------------------------------------
def _help() -> str:
    return subprocess.run([sys.executable, "-m", "tiamat", "--help"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60, check=True).stdout


@cache
def known_flags() -> frozenset[str]:
    """Every flag of ``tiamat`` (from a real ``tiamat --help``) and of its control
    subcommands (their help texts, built in-process: the same click commands)."""
    import click

    from tiamat.control import SUBCOMMANDS, control_cli

    text = _help()
    for name in SUBCOMMANDS:
        command = control_cli.commands[name]
        with click.Context(command, info_name=name) as ctx:
            text += command.get_help(ctx)
    return frozenset(_FLAG.findall(text))


def _unknown(flags: list[str]) -> list[str]:
    known = known_flags()
    return sorted({flag for flag in flags if flag not in known})


def _flags_in_code(text: str) -> list[str]:
    """Flags in inline code that is a tiamat flag or command, and in ``tiamat ...`` lines of
    fenced blocks."""
    flags: list[str] = []
    in_block = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            if line.lstrip().startswith("tiamat "):
                flags += _FLAG.findall(line.split("#", 1)[0])
            continue
        for span in _CODE.findall(line):
            if span.startswith("-") or span.startswith("tiamat "):
                flags += _FLAG.findall(span)
    return flags


# --- tests ----------------------------------------------------------------------------------------
def test_gunicorn_table_is_generated_from_the_settings_table():
    text = GUNICORN_DOC.read_text()
    assert regenerate_gunicorn_table(text) == text, (
        "docs/migrating-from-gunicorn.md is stale: run python tests/test_docs.py --gunicorn-table")
    rows = _table(text, "gunicorn-table")
    assert len(rows) > 100
    names = [row[0].strip("`") for row in rows]
    assert len(names) == len(set(names)), "a gunicorn setting is listed twice"
    # the headline difference is spelled out
    pid_row = next(row for row in rows if row[0] == "`pidfile`")
    assert pid_row[2] == "`--pid`" and "--port" in pid_row[3]


def test_every_flag_in_the_migration_tables_exists():
    gunicorn_rows = _table(GUNICORN_DOC.read_text(), "gunicorn-table")
    uvicorn_rows = _table(UVICORN_DOC.read_text(), "uvicorn-table")
    assert len(uvicorn_rows) > 40
    flags: list[str] = []
    for row in gunicorn_rows + uvicorn_rows:
        for cell in (row[2] if row in gunicorn_rows else row[1], row[-1]):
            for span in _CODE.findall(cell):
                flags += _FLAG.findall(span)
    assert flags
    assert _unknown(flags) == []


def test_every_tiamat_flag_in_the_prose_docs_exists():
    flags: list[str] = []
    for name in (*PROSE, GUNICORN_DOC.name, UVICORN_DOC.name):
        text = (DOCS / name).read_text()
        if name in (GUNICORN_DOC.name, UVICORN_DOC.name):  # prose only: tables checked above
            text = re.sub(r"<!-- (\w+)-table:start -->.*<!-- \1-table:end -->", "", text,
                          flags=re.S)
            text = "\n".join(line for line in text.splitlines()
                             if "uvicorn" not in line.lower() and "gunicorn" not in line.lower())
        flags += _flags_in_code(text)
    assert len(flags) > 40
    assert _unknown(flags) == []


def test_docs_link_to_files_that_exist():
    for name in (*PROSE, GUNICORN_DOC.name, UVICORN_DOC.name):
        for target in re.findall(r"\]\(([^)#]+)\)", (DOCS / name).read_text()):
            if not target.startswith("http"):
                assert (DOCS / target).exists(), f"{name} links to missing {target}"


# --- the deployment examples ------------------------------------------------------------------------
def _dockerfile_cmd() -> list[str]:
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if line.startswith("CMD ")]
    assert len(lines) == 1
    cmd = json.loads(lines[0][4:])  # exec form: a JSON array, no shell in between
    assert isinstance(cmd, list) and cmd[0] == "tiamat"
    return cmd


def test_dockerfile_exec_form_non_root_and_graceful():
    text = (DEPLOY / "Dockerfile").read_text()
    cmd = _dockerfile_cmd()
    assert _unknown(_FLAG.findall(" ".join(cmd[1:]))) == []
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^STOPSIGNAL\s+SIGTERM", text, re.M)
    graceful = float(cmd[cmd.index("--graceful-timeout") + 1])
    assert graceful < 10  # docker stop's default timeout


def test_dockerfile_command_serves_and_stops_gracefully_on_term(tmp_path):
    """The image's command line, run here: it serves, exposes metrics, and exits 0 on TERM."""
    cmd = _dockerfile_cmd()[1:]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        metrics_port = probe.getsockname()[1]
    replace = {"--bind": f"127.0.0.1:{port}", "--metrics-bind": f"127.0.0.1:{metrics_port}",
               "--control-socket": str(tmp_path / "ctl.sock")}
    args = [replace.get(cmd[i - 1], arg) if i else arg for i, arg in enumerate(cmd)]
    proc = subprocess.Popen([sys.executable, "-m", "tiamat", *args], cwd=ROOT / "examples",
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, env={**os.environ, "WEB_CONCURRENCY": "2"})
    try:
        def answers(p: int, path: str) -> bytes:
            try:
                with socket.create_connection(("127.0.0.1", p), timeout=2) as sock:
                    sock.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
                    return sock.recv(65536)
            except OSError:
                return b""

        wait_for(lambda: answers(port, "/").startswith(b"HTTP/1.1 200"), timeout=20)
        assert b"tiamat_workers_target 2" in answers(metrics_port, "/metrics")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        assert proc.stdout is not None
        proc.stdout.close()


def test_kubernetes_deployment_timing():
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load((DEPLOY / "kubernetes.yaml").read_text())
    assert doc["kind"] == "Deployment"
    pod = doc["spec"]["template"]["spec"]
    container = pod["containers"][0]
    command = container["command"]
    assert command[0] == "tiamat"
    assert _unknown([arg.split("=", 1)[0] for arg in command if arg.startswith("-")]) == []
    options = dict(arg.split("=", 1) for arg in command if arg.startswith("--") and "=" in arg)
    graceful = float(options["--graceful-timeout"])
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + graceful
    assert container["readinessProbe"]["httpGet"]["port"] == "http"
    liveness = container["livenessProbe"]["httpGet"]
    assert liveness["path"] == "/metrics" and liveness["port"] == "metrics"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert options["--metrics-bind"].endswith(f":{ports['metrics']}")
    assert options["--bind"].endswith(f":{ports['http']}")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert doc["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def _unit(name: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in (DEPLOY / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key, []).append(value)
    return sections


def test_systemd_units_socket_activation_and_reload():
    sock = _unit("tiamat.socket")
    service = _unit("tiamat.service")
    assert sock["Socket"]["ListenStream"]
    assert "tiamat.socket" in service["Unit"]["Requires"][0]
    svc = service["Service"]
    assert svc["Type"] == ["notify"] and svc["NotifyAccess"] == ["all"]
    assert svc["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert svc["KillMode"] == ["mixed"]
    exec_start = svc["ExecStart"][0].split()
    assert exec_start[0].endswith("/tiamat")
    assert "--bind" not in exec_start and "-b" not in exec_start  # the socket comes from systemd
    assert _unknown(_FLAG.findall(" ".join(exec_start[1:]))) == []
    graceful = float(exec_start[exec_start.index("--graceful-timeout") + 1])
    assert float(svc["TimeoutStopSec"][0]) > graceful
    assert set(svc["RestartPreventExitStatus"][0].split()) == {"3", "4"}


def test_nginx_snippet_points_at_the_systemd_socket():
    text = (DEPLOY / "nginx.conf").read_text()
    assert text.count("{") == text.count("}")
    assert re.search(r"upstream tiamat \{", text)
    listen = _unit("tiamat.socket")["Socket"]["ListenStream"][0]
    assert f"server unix:{listen}" in text
    assert "proxy_pass http://tiamat;" in text


if __name__ == "__main__":
    if sys.argv[1:] == ["--gunicorn-table"]:
        sys.path.insert(0, str(ROOT))
        GUNICORN_DOC.write_text(regenerate_gunicorn_table(GUNICORN_DOC.read_text()))
        print(f"rewrote {GUNICORN_DOC}")
    else:
        print("usage: python tests/test_docs.py --gunicorn-table", file=sys.stderr)
        sys.exit(2)


def test_metrics_table_matches_what_the_master_exports():
    from tiamat import metrics

    snap = metrics.Snapshot(status=[0] * 6, count=0, sum_seconds=0.0,
                            buckets=[0] * (len(metrics.BUCKETS) + 1), in_flight=0,
                            workers={"idle": 1}, target=1, restarts={"timeout": 0},
                            backlog={"127.0.0.1:8000": (0, 128)}, balance={0: (1, 0.5)})
    exported = set(re.findall(r"^# TYPE (\S+) ", metrics.render_prometheus(snap), re.M))
    documented = set(re.findall(r"^\| `(tiamat_\w+)` \|", (DOCS / "deployment.md").read_text(), re.M))
    assert documented == exported


def test_cli_knows_every_control_subcommand() -> None:
    """tiamat.cli repeats the subcommand names (so a server start need not import control)."""
    from tiamat import cli, control

    assert cli.SUBCOMMANDS == control.SUBCOMMANDS
