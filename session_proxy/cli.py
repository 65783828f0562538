"""Command line: ``session-proxy serve`` (the sidecar), ``exec`` (a client), ``jobs`` (background
jobs: ``exec --background`` starts one), ``mcp`` (stdio MCP).

``serve`` exit codes: 0 after a clean stop; 2 when the configuration cannot work (an invalid
setting, a backend or token file that cannot be used); 1 when it cannot listen. A start-up
failure prints one line per problem on stderr, each starting ``session-proxy:``, and nothing else.

``exec`` exit codes: the command's own code; 128+N when signal N killed it; 124 when it ran
out of time (like coreutils ``timeout``); 125 when the proxy refused, was unreachable or ended
the command for another reason (the message says which).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Final

from pydantic import ValidationError

from . import __version__
from .settings import Settings, env_name, flag_name

EXIT_USAGE: Final = 2  # also: the configuration cannot work
EXIT_CANNOT_LISTEN: Final = 1


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        help_text = f"{field.description} (env {env_name(name)})"
        if field.annotation is bool:
            parser.add_argument(
                flag_name(name), dest=name, action="store_const", const="true", help=help_text
            )
        else:
            parser.add_argument(flag_name(name), dest=name, metavar="VALUE", help=help_text)


def settings_from(flags: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    """The settings from parsed ``serve`` flags and an environment (see ``Settings.load``)."""
    given = {name: getattr(flags, name, None) for name in Settings.model_fields}
    return Settings.load(given, environ)


def describe_settings_error(error: ValidationError) -> str:
    """One line per invalid setting, naming its flag and variable, what was given and why."""
    lines = []
    for problem in error.errors(include_url=False):
        message = str(problem["msg"]).removeprefix("Value error, ")
        if problem["loc"]:
            name = str(problem["loc"][0])
            given = problem.get("input")
            lines.append(f"invalid setting {flag_name(name)} / {env_name(name)} (got {given!r}): {message}")
        else:
            lines.append(f"invalid settings: {message}")
    return "\n".join(lines)


def _serve(flags: argparse.Namespace) -> int:
    from . import logs
    from .app import StartupFailed
    from .server import ProxyServer

    try:
        settings = settings_from(flags, os.environ)
    except ValidationError as error:
        return _start_up_failed(describe_settings_error(error), EXIT_USAGE)
    logs.configure(settings.log_format, settings.log_level)
    try:
        server = ProxyServer(settings)
        asyncio.run(server.run())
    except StartupFailed as error:
        return _start_up_failed(str(error), EXIT_USAGE)
    except OSError as error:
        return _start_up_failed(f"cannot listen: {error}", EXIT_CANNOT_LISTEN)
    return 0


def _start_up_failed(problems: str, code: int) -> int:
    for line in problems.splitlines() or [""]:
        print(f"session-proxy: {line}", file=sys.stderr)
    return code


def _parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"session-proxy exec: -e expects NAME=VALUE, got {pair!r}")
        env[name] = value
    return env


def _exec(flags: argparse.Namespace) -> int:
    from .exec_command import run_exec_command

    command = list(flags.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        print(
            "session-proxy exec: no command given (usage: exec [options] -- CMD ARGS...)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    stdin = sys.stdin.buffer.read() if flags.interactive else None
    run = run_exec_command
    if flags.background:
        from .job_command import start_background as run
    return asyncio.run(
        run(
            command,
            url=flags.url,
            workdir=flags.workdir,
            env=_parse_env(flags.env),
            stdin=stdin,
            timeout=flags.timeout,
        )
    )


def _mcp(flags: argparse.Namespace) -> int:
    from . import logs
    from .client import ProxyClientError
    from .mcp.arguments import ToolOptions
    from .mcp.stdio import serve_stdio

    environ = dict(os.environ)
    workdir = flags.mcp_workdir or environ.get(env_name("mcp_workdir")) or None
    chars = flags.mcp_max_output_chars or environ.get(env_name("mcp_max_output_chars")) or "30000"
    if workdir is not None and not workdir.startswith("/"):
        print(f"session-proxy mcp: --mcp-workdir must be absolute, got {workdir!r}", file=sys.stderr)
        return EXIT_USAGE
    if not chars.isdigit() or int(chars) < 1000:
        print(f"session-proxy mcp: --mcp-max-output-chars must be >= 1000, got {chars!r}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure("text", "warning")  # stderr: stdout carries the protocol
    try:
        asyncio.run(serve_stdio(flags.url, ToolOptions(workdir=workdir, max_output_chars=int(chars))))
    except ProxyClientError as error:
        print(f"session-proxy mcp: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        pass
    return 0


def _jobs(flags: argparse.Namespace) -> int:
    from . import job_command

    if flags.action == "list":
        return asyncio.run(job_command.list_jobs(url=flags.url))
    if flags.action == "kill":
        return asyncio.run(job_command.kill_job(flags.job_id, url=flags.url))
    return asyncio.run(job_command.job_output(flags.job_id, url=flags.url, follow=flags.action == "follow"))


def _add_jobs_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    jobs = commands.add_parser("jobs", help="list, read and end background jobs (exec --background)")
    jobs.add_argument("--url", help="proxy URL or unix:/path (env SESSION_PROXY_URL)")
    actions = jobs.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="one line per job: id, state, bytes written, command")
    for action, help_text in (
        ("output", "print the job's output kept so far"),
        ("follow", "print the job's output until it ends; exit with its code"),
        ("kill", "end the job and everything it started"),
    ):
        actions.add_parser(action, help=help_text).add_argument("job_id")
    jobs.set_defaults(run=_jobs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="session-proxy", description="Exec sidecar for AI agents on Kubernetes."
    )
    parser.add_argument("--version", action="version", version=f"session-proxy {__version__}")
    commands = parser.add_subparsers(dest="subcommand", required=True)

    serve = commands.add_parser("serve", help="run the proxy")
    _add_setting_flags(serve)
    serve.set_defaults(run=_serve)

    execute = commands.add_parser(
        "exec", help="run a command through a proxy", usage="%(prog)s [options] -- CMD ARGS..."
    )
    execute.add_argument("--url", help="proxy URL or unix:/path (env SESSION_PROXY_URL)")
    execute.add_argument("--workdir", help="absolute working directory")
    execute.add_argument("--timeout", type=float, help="seconds")
    execute.add_argument("-e", "--env", action="append", default=[], metavar="NAME=VALUE")
    execute.add_argument(
        "-i", "--interactive", action="store_true", help="send this process's stdin to the command"
    )
    execute.add_argument(
        "--background", action="store_true", help="start it as a background job; print its id"
    )
    execute.add_argument("command", nargs=argparse.REMAINDER)
    execute.set_defaults(run=_exec)
    _add_jobs_parser(commands)

    mcp = commands.add_parser("mcp", help="serve the MCP tools over stdio, forwarding to a proxy")
    mcp.add_argument("--url", help="proxy URL or unix:/path (env SESSION_PROXY_URL)")
    mcp.add_argument(
        "--mcp-workdir", help="default working directory of exec (env SESSION_PROXY_MCP_WORKDIR)"
    )
    mcp.add_argument(
        "--mcp-max-output-chars",
        help="cut exec results longer than this in the middle (env SESSION_PROXY_MCP_MAX_OUTPUT_CHARS)",
    )
    mcp.set_defaults(run=_mcp)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    flags = build_parser().parse_args(argv)
    result: int = flags.run(flags)
    return result


if __name__ == "__main__":
    sys.exit(main())
