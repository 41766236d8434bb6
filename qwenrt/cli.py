"""The ``qwenrt`` command: a thin layer of options over the package."""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from qwenrt import __version__
from qwenrt.errors import ArtifactError, ModelNotFoundError, QwenrtError
from qwenrt.manifest import ARTIFACT_KEYS
from qwenrt.paths import default_model_dir, model_to_read
from qwenrt.runtimes import batching_engine_names, converted_engine_names, engine_class


def _fail(message: str, code: int) -> None:
    click.echo(f"qwenrt: error: {message}", err=True)
    sys.exit(code)


def _registered_engines() -> list[str]:
    """Every engine the registry knows that runs a converted artifact; the command line names no
    engine itself. An engine module that cannot be imported is the user's one-line error."""
    try:
        return converted_engine_names()
    except QwenrtError as exc:
        _fail(str(exc), exc.exit_code)
        raise


RUNTIMES = _registered_engines()
RUNTIME_CHOICE = click.Choice(
    sorted({*RUNTIMES, *(alias for name in RUNTIMES for alias in engine_class(name).aliases)})
)
RUNTIMES_HELP = "; ".join(f"{name}: {engine_class(name).description}" for name in RUNTIMES)


def main() -> None:
    """Entry point: every failure ends in one line on standard error and a non-zero exit."""
    # --debug is accepted anywhere on the line: the advice "run with --debug" is followed
    # by adding it to the end of the command that failed, not by moving it before the command.
    from qwenrt.supervise import SUPERVISED, die_with_parent, run_supervised, wants_supervision

    if wants_supervision(sys.argv[1:]):
        # The engine runs in a child: if native code crashes there, this process still explains.
        sys.exit(run_supervised(sys.argv[1:]))
    if os.environ.get(SUPERVISED) == "1":
        die_with_parent()
    args = sys.argv[1:]
    debug = "--debug" in args
    args = [arg for arg in args if arg != "--debug"]
    warnings.showwarning = lambda message, *args, **kwargs: click.echo(f"qwenrt: warning: {message}", err=True)
    try:
        cli.main(args=args, prog_name="qwenrt", standalone_mode=False)
    except click.exceptions.Abort:
        _interrupted()
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx is not None else "qwenrt"
        _fail(f"{exc.format_message()} (see '{command} --help')", exc.exit_code)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except Exception as exc:
        if debug:
            traceback.print_exc()
        _report(exc)


def _interrupted() -> None:
    click.echo("\nqwenrt: interrupted", err=True)
    sys.exit(130)


def _report(exc: Exception) -> None:
    """One line for any exception that reached the top, saying what it means for the user."""
    if _caused_by_ctrl_c(exc):
        _interrupted()
    if isinstance(exc, QwenrtError):
        _fail(str(exc), exc.exit_code)
    if isinstance(exc, BrokenPipeError):
        # The reader went away (`qwenrt chat -p ... | head -1`): nothing is left to tell it, and
        # Python's own flush at exit must not complain about the closed pipe either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    if isinstance(exc, (UnicodeDecodeError, UnicodeEncodeError)):
        # Python reads arguments and piped text that are not UTF-8 with their bad bytes
        # kept as surrogates; the error comes when those reach an encoder.
        _fail("the input is not UTF-8 text; give qwenrt prompts and files in UTF-8", 2)
    # The last line of defence: no traceback unless asked.
    first_line = (str(exc).strip().splitlines() or [""])[0]
    _fail(f"unexpected {type(exc).__name__}: {first_line} (run with --debug for details)", 1)


def _caused_by_ctrl_c(exc: BaseException) -> bool:
    """Ctrl-C inside native code (a C extension's initialisation, a C++ callback) comes back as
    another exception raised from the KeyboardInterrupt: that is an interruption all the same."""
    pending: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        pending += [current.__cause__, current.__context__]
    return False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qwenrt")
@click.option("--debug", is_flag=True, help="Show a traceback on errors.")
def cli(debug: bool) -> None:
    """Qwen2.5-0.5B-Instruct on a CPU-only box, through llama.cpp and OpenVINO."""


@cli.command()
@click.argument("source")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Model folder to write [default: the user cache, found by every command].",
)
@click.option("--format", "fmt", type=click.Choice([*ARTIFACT_KEYS, "all"]), default="all", show_default=True)
@click.option("--force", is_flag=True, help="Convert again even if the artifacts are complete.")
@click.option("--no-verify", is_flag=True, help="Do not load the new artifacts in their engines.")
@click.option(
    "--ov-symmetric/--ov-asymmetric", default=False, show_default=True, help="INT8 scheme of the OpenVINO weights."
)
def convert(source: str, out_dir: Path | None, fmt: str, force: bool, no_verify: bool,
            ov_symmetric: bool) -> None:  # fmt: skip
    """Convert SOURCE to GGUF Q8_0 and OpenVINO INT8.

    SOURCE is a Hugging Face checkpoint folder, a hub id (Qwen/Qwen2.5-0.5B-Instruct,
    needs a network), a .gguf file, or 'demo' (offline weights from the package index).
    """
    from qwenrt.convert.openvino_int8 import Int8Scheme
    from qwenrt.convert.pipeline import FORMATS
    from qwenrt.convert.pipeline import convert as run_convert

    formats = FORMATS if fmt == "all" else (fmt,)
    result = run_convert(
        source, out_dir or default_model_dir(), formats, force=force, verify=not no_verify,
        scheme=Int8Scheme(symmetric=ov_symmetric),
        log=lambda line: click.echo(line, err=True),
    )  # fmt: skip
    click.echo("")
    for artifact in result.artifacts:
        state = "kept" if artifact.skipped else f"{artifact.size / 1e6:.0f} MB in {artifact.seconds:.1f} s"
        click.echo(f"  {artifact.key:<9} {artifact.path}  ({state})")
    click.echo(f"  total     {result.seconds:.1f} s, peak memory {result.peak_rss_bytes / 2**30:.2f} GiB")
    click.echo(f"Model folder: {result.out_dir}")


def _model_dir(model: Path | None) -> Path:
    path = model or model_to_read()
    if not path.exists():
        raise ModelNotFoundError(
            f"no model at {path}; make one with 'qwenrt convert demo' (offline demo weights) "
            "or 'qwenrt convert CHECKPOINT', or pass --model DIR"
        )
    return path


HUGE_PAGES_HELP = "Rebuild the loaded weights in 2 MB pages: a few per cent faster decode, seconds longer load."
SET_HELP = ("An engine setting, ahead of the host profile and qwenrt's rules (repeatable; 'qwenrt tune --dry-run' "
            "lists them), e.g. --set INFERENCE_PRECISION_HINT=bf16.")  # fmt: skip


def _parse_settings(pairs: tuple[str, ...]) -> dict[str, Any]:
    """NAME=VALUE pairs; a value is read as JSON where it is JSON (true, 64, null), else as text."""
    import json

    settings: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name.strip():
            raise QwenrtError(f"--set takes NAME=VALUE, not {pair!r}")
        try:
            settings[name.strip()] = json.loads(text)
        except ValueError:
            settings[name.strip()] = text
    return settings


def _settings_for(names: list[str], pairs: tuple[str, ...], verb: str) -> dict[str, Any]:
    """--set's values, each of them a setting of at least one of the engines ``names``."""
    given = _parse_settings(pairs)
    known = {knob.name for name in names for knob in engine_class(name).knobs}
    unknown = sorted(set(given) - known)
    if unknown:
        raise QwenrtError(f"--set {', '.join(unknown)}: no engine {verb} has such a setting; "
                          "'qwenrt tune --dry-run' lists each engine's")  # fmt: skip
    return given


def _engine_options(command: Callable[..., None]) -> Callable[..., None]:
    """The options that open an engine, the same for every command that opens one."""
    options = [
        click.option("--model", type=click.Path(path_type=Path), default=None,
                     help="Model folder [default: the user cache]."),
        click.option("--threads", type=int, default=None, help="CPU threads [default: physical cores]."),
        click.option("--pin", is_flag=True, help="Pin the threads to physical cores."),
        click.option("--huge-pages", is_flag=True, help=HUGE_PAGES_HELP),
        click.option("--context-length", type=int, default=None,
                     help="Context window in tokens [default: the model's trained context, at most 4096]."),
        click.option("--set", "set_values", multiple=True, metavar="NAME=VALUE", help=SET_HELP),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


@cli.command()
@click.option("--runtime", type=RUNTIME_CHOICE, default=RUNTIMES[0], show_default=True, help=RUNTIMES_HELP)
@_engine_options
@click.option("--system", default=None, help="System message.")
@click.option("--max-tokens", type=int, default=512, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 is greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--top-k", type=int, default=0, show_default=True, help="0 is off.")
@click.option("--seed", type=int, default=None)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option(
    "--ignore-eos",
    is_flag=True,
    help="Go on past the model's end-of-sequence token, to --max-tokens (as llama.cpp's --ignore-eos).",
)
@click.option("-p", "--prompt", default=None, help="Answer this prompt and exit.")
@click.option("--stats", is_flag=True, help="Show first-token latency and tokens/s after each answer.")
def chat(runtime: str, model: Path | None, threads: int | None, pin: bool, huge_pages: bool,
         context_length: int | None, set_values: tuple[str, ...], system: str | None, max_tokens: int,
         temperature: float, top_p: float, top_k: int, seed: int | None, stop: tuple[str, ...],
         ignore_eos: bool, prompt: str | None, stats: bool) -> None:  # fmt: skip
    """Chat with the model, streaming; one-shot with -p or a piped prompt."""
    from qwenrt.chat import ChatSession, interactive, print_answer
    from qwenrt.runtimes import EngineOptions, GenerationConfig, engine_class, open_engine

    config = GenerationConfig(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              seed=seed, stop=stop, ignore_eos=ignore_eos)  # fmt: skip
    options = EngineOptions(threads=threads, pin=pin, context_length=context_length, huge_pages=huge_pages,
                            settings=_parse_settings(set_values))  # fmt: skip
    # A missing model is the likelier mistake: report it before waiting on a piped prompt.
    model_dir = _model_dir(model)
    engine_class(runtime).artifact_path(model_dir)
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read()
    if prompt is not None and not prompt.strip():
        raise QwenrtError("the prompt is empty")
    with open_engine(runtime, model_dir, options) as engine:
        session = ChatSession(engine, config, system)
        if prompt is not None:
            print_answer(session, prompt.strip(), sys.stdout, stats)
        else:
            interactive(session, sys.stdout, stats)


def _read_api_key(path: Path, given: str | None) -> str:
    if given:
        raise QwenrtError("give --api-key (or QWENRT_API_KEY) or --api-key-file, not both")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise QwenrtError(f"cannot read the API key from {path}: {getattr(exc, 'strerror', None) or exc}") from None
    key = lines[0].strip() if lines else ""
    if not key:
        raise QwenrtError(f"{path} holds no API key on its first line")
    return key


def _int_list(value: str, option: str) -> list[int]:
    try:
        numbers = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise QwenrtError(f"{option} takes comma-separated whole numbers, not {value!r}") from None
    if not numbers:
        raise QwenrtError(f"{option} is empty")
    return numbers


def _read_prompt_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QwenrtError(f"{path}: prompt file not found") from None
    except UnicodeDecodeError:
        raise QwenrtError(f"{path}: prompt file is not UTF-8 text") from None
    except OSError as exc:
        raise QwenrtError(f"{path}: cannot read prompt file ({exc.strerror})") from None


@cli.command()
@click.option("--model", type=click.Path(path_type=Path), default=None, help="Model folder [default: the user cache].")
@click.option(
    "--runtimes",
    default=",".join(RUNTIMES),
    show_default=True,
    help=f"Engines to compare, separated by commas ({RUNTIMES_HELP}).",
)
@click.option("--threads", "threads_list", default=None, help="Thread counts, e.g. 1,2 [default: physical cores].")
@click.option(
    "--scenario", default="short", show_default=True,
    help="short, long, second-turn, next-conversation, or several separated by commas.",
)  # fmt: skip
@click.option("--prompt", default=None, help="Measure this prompt instead of a scenario.")
@click.option("--prompt-file", type=click.Path(path_type=Path), default=None, help="Measure this file's text.")
@click.option("--max-tokens", type=int, default=128, show_default=True, help="Tokens generated per repetition.")
@click.option("--repeat", type=int, default=5, show_default=True, help="Measured repetitions per cell.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Discarded repetitions per cell.")
@click.option(
    "--rounds",
    type=int,
    default=1,
    show_default=True,
    help="Measure every cell this many times, each in a fresh process, the cells taking turns, and pool "
    "the repetitions: drift in the machine's speed then falls on every engine alike.",
)
@click.option("--timeout", type=float, default=900, show_default=True, help="Seconds allowed per cell.")
@click.option("--pin", is_flag=True, help="Pin threads to physical cores.")
@click.option("--huge-pages", is_flag=True, help=HUGE_PAGES_HELP)
@click.option("--set", "set_values", multiple=True, metavar="NAME=VALUE", help=SET_HELP)
@click.option(
    "--engine-defaults",
    is_flag=True,
    help="Also measure each engine exactly as its library opens it: what qwenrt's settings are worth.",
)
@click.option(
    "--quality",
    is_flag=True,
    help="Also set each engine's artifact against the float model (KL, top token, perplexity; qwenrt eval).",
)
@click.option(
    "--ladder",
    is_flag=True,
    help="Re-measure the write-up's steps: transformers FP32 → engine → threads → INT8 → batch 2.",
)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None)
@click.option("--csv", "csv_out", type=click.Path(path_type=Path), default=None)
@click.option("--markdown", "markdown_out", type=click.Path(path_type=Path), default=None)
@click.option("--plot", "plot_out", type=click.Path(path_type=Path), default=None, help="PNG chart.")
def compare(model: Path | None, runtimes: str, threads_list: str | None, scenario: str, prompt: str | None,
            prompt_file: Path | None, max_tokens: int, repeat: int, warmup: int, rounds: int, timeout: float, pin: bool,
            huge_pages: bool, set_values: tuple[str, ...], engine_defaults: bool, quality: bool, ladder: bool,
            json_out: Path | None, csv_out: Path | None, markdown_out: Path | None,
            plot_out: Path | None) -> None:  # fmt: skip
    """Measure the engines side by side: first token, prefill, decode, CPU and memory."""
    from qwenrt.compare import report as show
    from qwenrt.compare.ladder import LADDER_RUNTIMES
    from qwenrt.compare.measure import CellSpec
    from qwenrt.compare.runner import run_comparison
    from qwenrt.compare.scenarios import scenario as find_scenario
    from qwenrt.runtimes import engine_class
    from qwenrt.runtimes.threads import ThreadPlan

    if ladder:
        _refuse_options_the_ladder_sets()
    model_dir = _model_dir(model)
    names = list(LADDER_RUNTIMES) if ladder else [n.strip() for n in runtimes.split(",") if n.strip()]
    problems: dict[str, QwenrtError] = {}
    for name in names:
        try:
            engine_class(name).artifact_path(model_dir)  # a missing artifact fails now, not in a worker
        except (ModelNotFoundError, ArtifactError) as exc:
            problems[name] = exc
    if problems:
        first = next(iter(problems.values()))
        present = [name for name in names if name not in problems]
        instead = f"; or compare the engines that have a model: --runtimes {','.join(present)}" if present else ""
        raise type(first)(f"{first}{instead}")
    thread_counts = [ThreadPlan.resolve(n).threads for n in _int_list(threads_list, "--threads")] if threads_list \
        else [ThreadPlan.resolve(None).threads]  # fmt: skip
    if max_tokens < 2 or repeat < 1 or warmup < 0 or rounds < 1:
        raise QwenrtError(
            "need --max-tokens of 2 or more, --repeat and --rounds of 1 or more and --warmup of 0 or more"
        )
    if timeout <= 0:
        raise QwenrtError(f"--timeout must be more than 0 seconds, not {timeout:g}")
    for path in (json_out, csv_out, markdown_out, plot_out):
        if path is not None:
            _check_output(path)  # before the measuring, not after it
    if prompt_file is not None:
        prompt = _read_prompt_file(prompt_file)
    if prompt is not None and not prompt.strip():
        raise QwenrtError("the prompt is empty")
    scenarios = [None] if prompt is not None else [find_scenario(s.strip()).name for s in scenario.split(",")]
    given = _settings_for(names, set_values, "compared")
    knobs = {name: {knob.name for knob in engine_class(name).knobs} for name in names}
    specs = [
        CellSpec(runtime=name, model_dir=str(model_dir), threads=threads, scenario=sc or "custom", prompt=prompt,
                 max_tokens=max_tokens, repeat=repeat, warmup=warmup, pin=pin, huge_pages=huge_pages,
                 settings={k: v for k, v in given.items() if k in knobs[name]})
        for sc in scenarios for threads in thread_counts for name in names
    ]  # fmt: skip
    if engine_defaults:
        specs += [
            CellSpec(runtime=name, model_dir=str(model_dir), threads=thread_counts[0], scenario=sc or "custom",
                     prompt=prompt, max_tokens=max_tokens, repeat=repeat, warmup=warmup, engine_defaults=True)
            for sc in scenarios for name in names
        ]  # fmt: skip
    if ladder:
        from qwenrt.compare.ladder import ladder_specs

        specs = ladder_specs(model_dir, max_tokens, repeat, warmup)

    live = sys.stderr.isatty()
    cells_started: set[str] = set()

    def progress(text: str) -> None:
        # One line rewritten in place on a terminal; in a log, one line as each cell starts.
        cell = text.split(":")[0]
        if live:
            click.echo(f"\r\033[K{text}", nl=False, err=True)
        elif cell not in cells_started:
            cells_started.add(cell)
            click.echo(f"{cell} …", err=True)

    if quality:
        engine_class("transformers").artifact_path(model_dir)  # the float model, before minutes of measuring
    result = run_comparison(specs, timeout_s=timeout, progress=progress, kind="ladder" if ladder else "comparison",
                            rounds=rounds)  # fmt: skip
    if quality and not result["interrupted"]:
        from qwenrt.compare.runner import add_quality

        add_quality(result, model_dir, progress)
    if live:
        click.echo("\r\033[K", nl=False, err=True)
    click.echo(show.render_terminal(result))
    writers = [(json_out, show.write_json), (csv_out, show.write_csv), (plot_out, show.write_plot),
               (markdown_out, lambda r, p: p.write_text(show.render_markdown(r), encoding="utf-8"))]  # fmt: skip
    for path, write in writers:
        if path is not None:
            try:
                write(result, path)
            except OSError as exc:
                raise QwenrtError(f"{path}: cannot write the report ({exc.strerror or exc})") from None
            click.echo(f"wrote {path}", err=True)
    if result["interrupted"]:
        # The cells finished before Ctrl-C are reported above; the exit status still says it was cut short.
        click.echo(f"qwenrt: interrupted after {len(result['cells'])} of {len(specs)} cells", err=True)
        sys.exit(130)
    if not show.ok_cells(result):
        reasons = list(dict.fromkeys(cell.error for cell in result["cells"]))
        more = f" (and {len(reasons) - 1} other reasons, above)" if len(reasons) > 1 else ""
        raise QwenrtError(f"no cell could be measured: {reasons[0] if reasons else 'no cells'}{more}")


@cli.command()
@click.option(
    "--runtime",
    type=RUNTIME_CHOICE,
    default=(batching_engine_names() or RUNTIMES)[0],
    show_default=True,
    help=f"The default batches concurrent requests. {RUNTIMES_HELP}",
)
@_engine_options
@click.option(
    "--parallel",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help=f"Requests generated at once ({', '.join(batching_engine_names()) or 'no engine'} batches them; the others "
    "take one at a time).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0 picks a free port.")
@click.option("--max-tokens", "max_tokens_limit", type=click.IntRange(1), default=2048, show_default=True,
              help="The most tokens one request may ask for.")  # fmt: skip
@click.option("--max-queue", type=click.IntRange(0), default=64, show_default=True,
              help="Requests that may wait for a place before the server answers 503.")  # fmt: skip
@click.option("--max-body", "max_body_bytes", type=click.IntRange(1024), default=1 << 20, show_default=True,
              help="Largest request body in bytes.")  # fmt: skip
@click.option(
    "--request-timeout",
    type=click.FloatRange(0.1),
    default=20.0,
    show_default=True,
    help="Seconds a request's headers, then its body, may take to arrive.",
)
@click.option(
    "--keep-alive",
    type=click.FloatRange(0.1),
    default=5.0,
    show_default=True,
    help="Seconds an idle connection stays open between requests.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(1),
    default=128,
    show_default=True,
    help="Open connections beyond this are refused with 503.",
)
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="A browser origin allowed to call the API (repeat for more; '*' for any).")  # fmt: skip
@click.option("--sse-keep-alive", type=click.FloatRange(0.05), default=15.0, show_default=True,
              help="Seconds of silence in a stream (prefill, queue) before a keep-alive comment.")  # fmt: skip
@click.option("--api-key", envvar="QWENRT_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' [env: QWENRT_API_KEY].")  # fmt: skip
@click.option("--api-key-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Read the API key from this file (its first line), as a service does.")  # fmt: skip
@click.option("--model-name", default=None, help="Model id shown to clients [default: the model folder's name].")
@click.option("--prefix-cache/--no-prefix-cache", default=True, show_default=True,
              help="Reuse the KV cache of a conversation's earlier turns.")  # fmt: skip
@click.option("--no-access-log", is_flag=True, help="Log only qwenrt's line per answer, not every HTTP request.")
def serve(runtime: str, model: Path | None, threads: int | None, pin: bool, huge_pages: bool,
          context_length: int | None, set_values: tuple[str, ...], parallel: int, host: str, port: int,
          max_tokens_limit: int, max_queue: int, max_body_bytes: int, request_timeout: float, keep_alive: float,
          max_connections: int, cors_origins: tuple[str, ...], sse_keep_alive: float, api_key: str | None,
          api_key_file: Path | None, model_name: str | None, prefix_cache: bool,
          no_access_log: bool) -> None:  # fmt: skip
    """Serve the model over an OpenAI-compatible API (/v1/chat/completions), streaming.

    Stops cleanly on SIGTERM or Ctrl-C: answers in flight get up to 10 s to finish.
    """
    from qwenrt.runtimes import EngineOptions, engine_class, open_engine
    from qwenrt.serve.app import EngineStart, ServerLimits
    from qwenrt.serve.server import is_loopback, listen, serve

    model_dir = _model_dir(model)
    engine_class(runtime).artifact_path(model_dir)
    if api_key_file is not None:
        api_key = _read_api_key(api_key_file, api_key)
    if not is_loopback(host) and not api_key:
        click.echo(f"qwenrt: warning: listening on {host} without --api-key: anyone who can reach it can use it",
                   err=True)  # fmt: skip
    options = EngineOptions(threads=threads, pin=pin, context_length=context_length, parallel=parallel,
                            prefix_cache=prefix_cache, huge_pages=huge_pages,
                            settings=_parse_settings(set_values))  # fmt: skip
    limits = ServerLimits(max_body_bytes=max_body_bytes, max_tokens=max_tokens_limit, max_queue=max_queue,
                          api_key=api_key, request_timeout_s=request_timeout, keep_alive_s=keep_alive,
                          max_connections=max_connections, cors_origins=cors_origins,
                          sse_keep_alive_s=sse_keep_alive)  # fmt: skip
    # Bind before loading the model: a taken port is reported at once, and /health answers
    # 503 while the model loads.
    sock = listen(host, port)
    start = EngineStart(runtime, model_dir, lambda: open_engine(runtime, model_dir, options))
    try:
        serve(start, model_name or model_dir.name, sock, limits, access_log=not no_access_log)
    finally:
        sock.close()


@cli.command()
@click.option("--model", type=click.Path(path_type=Path), default=None, help="Model folder [default: the user cache].")
@click.option("--runtimes", default=",".join(RUNTIMES), show_default=True, help="Engines to tune, separated by commas.")
@click.option(
    "--objective",
    type=click.Choice(["end-to-end", "first-token", "decode", "prefill"]),
    default="end-to-end",
    show_default=True,
    help="What to make best: a short answer's end-to-end time, its first token, decode or prefill speed.",
)
@click.option(
    "--rounds",
    type=click.IntRange(1, 20),
    default=2,
    show_default=True,
    help="Interleaved measurements of each candidate.",
)
@click.option("--dry-run", is_flag=True, help="List what would be tried, and measure nothing.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write every figure as JSON.")
def tune(model: Path | None, runtimes: str, objective: str, rounds: int, dry_run: bool,
         json_out: Path | None) -> None:  # fmt: skip
    """Measure each engine's settings on this host and save the best as its profile.

    chat, serve and compare then use the profile by default. Each candidate runs in a
    fresh process; candidates take turns, so that noise falls on all of them alike.
    """
    import json

    from qwenrt.host import this_host
    from qwenrt.runtimes import engine_class
    from qwenrt.runtimes.profiles import measured_settings, save_profile
    from qwenrt.tune import report
    from qwenrt.tune.search import OBJECTIVES, plan, starting_config, tune_engine

    model_dir = _model_dir(model)
    engines = [engine_class(name.strip()) for name in runtimes.split(",") if name.strip()]
    if not engines:
        raise QwenrtError("--runtimes is empty")
    for engine in engines:
        engine.artifact_path(model_dir)  # a missing artifact fails now, not after minutes of measuring
    if json_out is not None:
        _check_output(json_out)
    goal = OBJECTIVES[objective]
    host = this_host()
    click.echo(report.host_line(host))
    click.echo(f"objective: {goal.description}")
    results = []
    live = sys.stderr.isatty()

    def progress(text: str) -> None:
        click.echo(f"\r\033[K{text}" if live else text, nl=not live, err=True)

    for engine in engines:
        start, key = starting_config(engine, model_dir)
        if dry_run:
            click.echo(
                "\n"
                + report.render_plan(engine.name, key.engine_build, plan(engine, goal, model_dir), start, goal, rounds)
            )
            continue
        result = tune_engine(engine, model_dir, goal, rounds=rounds, progress=progress)
        if live:
            click.echo("\r\033[K", nl=False, err=True)
        evidence = {"objective": goal.name, "created": datetime_now(), "tuned": result.describe()}
        pinned = measured_settings(result.winner, goal.name, engine.knobs)
        saved = save_profile(result.key, pinned, evidence)
        click.echo("\n" + report.render_result(result, pinned, str(saved)))
        results.append(result.describe())
    if json_out is not None and not dry_run:
        document = {"schema": "qwenrt.tune/1", "host": host.describe(), "objective": goal.name, "engines": results}
        json_out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        click.echo(f"wrote {json_out}", err=True)


@cli.command(name="eval")
@click.option("--model", type=click.Path(path_type=Path), default=None, help="Model folder [default: the user cache].")
@click.option("--runtimes", default=",".join(RUNTIMES), show_default=True, help="Engines to evaluate.")
@click.option(
    "--corpus",
    default="english",
    show_default=True,
    help="english (CPython's documentation), code (standard-library source), or a UTF-8 text file.",
)
@click.option("--context", type=click.IntRange(16), default=512, show_default=True, help="Tokens in a window.")
@click.option("--max-tokens", type=click.IntRange(1), default=8192, show_default=True, help="Scored tokens.")
@click.option("--threads", type=int, default=None, help="CPU threads [default: the host profile's or physical cores].")
@click.option("--set", "set_values", multiple=True, metavar="NAME=VALUE", help=SET_HELP)
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None)
@click.option("--csv", "csv_out", type=click.Path(path_type=Path), default=None)
@click.option("--markdown", "markdown_out", type=click.Path(path_type=Path), default=None)
def evaluate(model: Path | None, runtimes: str, corpus: str, context: int, max_tokens: int, threads: int | None,
             set_values: tuple[str, ...], json_out: Path | None, csv_out: Path | None,
             markdown_out: Path | None) -> None:  # fmt: skip
    """What each engine's artifact costs in quality, against the float checkpoint it was made from.

    Perplexity over the corpus (windows of --context tokens, second halves scored, as
    llama-perplexity does), the KL divergence of each next-token distribution from the
    float model's, how often the top token is the same, and how long greedy answers stay
    the same. The float model reads the corpus once; it is cached beside the model.
    """
    from qwenrt.eval import report as show
    from qwenrt.eval.run import EvalSpec
    from qwenrt.eval.run import evaluate as run_evaluation
    from qwenrt.runtimes.threads import ThreadPlan

    model_dir = _model_dir(model)
    names = [name.strip() for name in runtimes.split(",") if name.strip()]
    for name in [*names, "transformers"]:
        engine_class(name).artifact_path(model_dir)  # a missing artifact or checkpoint fails now
    for path in (json_out, csv_out, markdown_out):
        if path is not None:
            _check_output(path)
    if threads is not None:
        ThreadPlan.resolve(threads)
    given = _settings_for(names, set_values, "evaluated")
    spec = EvalSpec(str(model_dir), corpus, context, max_tokens, threads, settings=given)
    live = sys.stderr.isatty()

    def progress(text: str) -> None:
        click.echo(f"\r\033[K{text}" if live else text, nl=not live, err=True)

    result = run_evaluation(spec, names, progress)
    if live:
        click.echo("\r\033[K", nl=False, err=True)
    click.echo(show.render_terminal(result))
    writers = [(json_out, show.write_json), (csv_out, show.write_csv),
               (markdown_out, lambda r, p: p.write_text(show.render_markdown(r), encoding="utf-8"))]  # fmt: skip
    for path, write in writers:
        if path is not None:
            write(result, path)
            click.echo(f"wrote {path}", err=True)
    if not any(entry["status"] == "ok" for entry in result["engines"]):
        raise QwenrtError("no engine could be evaluated: " + "; ".join(e["error"] for e in result["engines"]))


@cli.command()
@click.option("--model", type=click.Path(path_type=Path), default=None, help="Model folder [default: the user cache].")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="The bundle: a folder, or FILE.tar.")
@click.option("--python", "python_version", default=None, metavar="X.Y",
              help="The target's Python [default: this one's].")  # fmt: skip
@click.option("--platform", "platform_tag", default=None, metavar="TAG",
              help="The target's pip platform tag, e.g. manylinux_2_28_x86_64 [default: this machine's].")  # fmt: skip
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def bundle(model: Path | None, out: Path, python_version: str | None, platform_tag: str | None, force: bool) -> None:
    """One folder that installs and serves the model on a box with no network and no compiler.

    Wheels of qwenrt and its runtime dependencies (no torch, no transformers) for the
    target, llama.cpp built for any x86-64 CPU, the converted model, and install.sh
    (checks every file's sha256, installs offline, probes the engines, --service adds a
    systemd unit). The first bundle compiles the portable llama.cpp (about 25 minutes on
    2 cores); it is cached for the next.
    """
    from qwenrt.bundle import build_bundle
    from qwenrt.bundle.wheelhouse import Target

    target = Target(python_version, platform_tag)
    target.check()
    report = build_bundle(_model_dir(model), out, target, log=lambda line: click.echo(line, err=True), force=force)
    click.echo(f"wrote {report.path}: {report.total_bytes / 1e6:.0f} MB (model {report.model_bytes / 1e6:.0f} MB, "
               f"{len(report.wheels)} wheels {report.wheel_bytes / 1e6:.0f} MB)")  # fmt: skip
    if report.left_out:
        click.echo(f"left out (declared, never loaded at run time): {', '.join(report.left_out)}")
    if report.path.suffix == ".tar":
        click.echo(f"install it: tar xf {report.path} && {report.path.stem}/install.sh [DIR]")
    else:
        click.echo(f"install it: {report.path}/install.sh [DIR]")


def datetime_now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# The ladder's steps are the write-up's own settings: these options would be silently dropped.
_LADDER_SETS = {"runtimes": "--runtimes", "threads_list": "--threads", "scenario": "--scenario", "prompt": "--prompt",
                "prompt_file": "--prompt-file", "pin": "--pin", "huge_pages": "--huge-pages", "set_values": "--set",
                "engine_defaults": "--engine-defaults", "quality": "--quality"}  # fmt: skip


def _refuse_options_the_ladder_sets() -> None:
    context = click.get_current_context()
    given = [flag for name, flag in _LADDER_SETS.items()
             if context.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT]  # fmt: skip
    if given:
        raise QwenrtError(f"--ladder measures the write-up's own steps, engines, threads and prompt; "
                          f"drop {', '.join(given)} or leave out --ladder")  # fmt: skip


def _check_output(path: Path) -> None:
    folder = path.parent
    if path.is_dir():
        raise QwenrtError(f"{path}: is a folder; give a file name for the report")
    if not folder.is_dir():
        raise QwenrtError(f"{path}: the folder {folder} does not exist; create it or write the report elsewhere")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise QwenrtError(f"{path}: no permission to write in {folder}; write the report elsewhere")


if __name__ == "__main__":
    main()
