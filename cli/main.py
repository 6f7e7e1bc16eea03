"""Entry point of the `compress` command.

Commands parse options, build a stage config, call one library function, print a summary and
write the outputs. Heavy imports (torch, transformers) happen inside command bodies so that
``compress --help`` is instant. A `CompressError` becomes one line on stderr and its exit code
(2 for bad input, 1 for a `ResultError`).

Exit codes, the same for every command: 0 success; 1 the work ran but its result failed its
check (an export past tolerance) or a job of a batch failed; 2 bad input (a bad option,
manifest or recipe, a missing model or file, an output that cannot be written), always before
any work where it can be known; 130 interrupted (Ctrl-C); 143 terminated (SIGTERM).
"""

from __future__ import annotations

import signal
import sys
import threading

import click

from compressor.errors import CompressError, Terminated
from compressor.io import stop_requested
from compressor.pipeline.events import LOG_FORMATS

#: Exit codes, documented in the README and in ``compress --help``.
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, as a shell reports a process SIGTERM ended


def _terminate(signum, frame):
    stop_requested.set()  # for where the exception below is swallowed (see compressor.io)
    raise Terminated


class CompressGroup(click.Group):
    """Turns user errors raised anywhere in a command into one clear line; a declared stage
    without a command of its own is a command too (`cli.stages`), registered before or after import."""

    def list_commands(self, ctx):
        from cli.stages import declared_stages

        return sorted(set(super().list_commands(ctx)) | set(declared_stages()))

    def get_command(self, ctx, cmd_name):
        from cli.stages import stage_command

        # the registry first: a stage declared again (in a test) gets its command built again
        return stage_command(cmd_name) or super().get_command(ctx, cmd_name)

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _terminate)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:  # Ctrl-C or end of input at a prompt
            click.echo("compress: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except click.ClickException as e:
            # click prints usage plus the error over several lines; one line is enough. Every
            # click error (a bad option, a file option that cannot be opened) is bad input.
            click.echo(f"compress: error: {e.format_message()}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        if stop_requested.is_set():  # the command finished, but a SIGTERM came that was swallowed
            click.echo("compress: terminated", err=True)
            sys.exit(EXIT_TERMINATED)
        sys.exit(rv if isinstance(rv, int) else EXIT_OK)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CompressError as e:
            if ctx.params.get("log_format") == "jsonl":
                from compressor.pipeline.events import EventLog

                EventLog("jsonl").emit("error", message=str(e), exit_code=e.exit_code)
            else:
                click.echo(f"compress: error: {e}", err=True)
            sys.exit(e.exit_code)
        except Terminated:
            click.echo("compress: terminated", err=True)
            sys.exit(EXIT_TERMINATED)
        except KeyboardInterrupt:
            click.echo("compress: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)


@click.group(cls=CompressGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="compress", prog_name="compress")
@click.option("--log-format", type=click.Choice(LOG_FORMATS), default="text", show_default=True,
              envvar="COMPRESS_LOG_FORMAT",
              help="Progress and errors on stderr: text, or jsonl (one JSON object per line, for pipelines).")
def cli(log_format):
    """Compress pretrained Transformers: analyze layer similarity, share layers, prune,
    quantize, fine-tune and export to ONNX; run recipes and batches of them.

    MODEL is a local Hugging Face folder, a hub id, or a short alias (bert-base, gpt2, ...);
    leave it out to use the bundled all-MiniLM-L6-v2.

    Exit codes: 0 success; 1 a result failed its check (an export past tolerance) or a batch
    job failed; 2 bad input; 130 interrupted; 143 terminated.
    """
    from compressor.io import return_freed_memory
    from compressor.progress import set_format

    set_format(log_format)  # the long steps' progress lines follow the errors' format
    return_freed_memory()


def log_format() -> str:
    """The global ``--log-format`` of the running command (``text`` outside one)."""
    ctx = click.get_current_context(silent=True)
    return (ctx.find_root().params.get("log_format") if ctx is not None else None) or "text"


def emit_result(result: str, json_path: str | None) -> bool:
    """Handle ``--json``: ``-`` prints the result (and the caller prints nothing else), a path
    gets it written atomically. Returns True when the result went to stdout."""
    if json_path == "-":
        click.echo(result)
        return True
    if json_path:
        from compressor.io import write_text_atomic

        write_text_atomic(json_path, result)
    return False


def echo_rows(rows: list[tuple[str, str]], output: str | None = None) -> None:
    """A command's summary as aligned ``label  value`` lines, then where it wrote."""
    width = max(len(k) for k, _ in rows)
    for label, value in rows:
        click.echo(f"{label:<{width}}  {value}")
    if output:
        click.echo(f"wrote {output}")


def main():
    cli(prog_name="compress")


from cli import analyze as _analyze  # noqa: E402,F401  (registers the commands)
from cli import data as _data  # noqa: E402,F401
from cli import evaluate as _evaluate  # noqa: E402,F401
from cli import export as _export  # noqa: E402,F401
from cli import finetune as _finetune  # noqa: E402,F401
from cli import inspect as _inspect  # noqa: E402,F401
from cli import pipeline as _pipeline  # noqa: E402,F401
from cli import report as _report  # noqa: E402,F401
from cli.stages import declared_commands  # noqa: E402

cli.commands.update(declared_commands())  # share, prune, ...: the stages declared so far

if __name__ == "__main__":  # python -m cli.main (torchrun -m cli.main): the commands register on cli.main's group
    from cli.main import main as _main

    _main()
