"""The `gymtape` command: one subcommand per job.

Each subcommand is a thin layer over the package API. A failure the user can fix (every
``GymtapeError``, and ``OSError``: a full disk, a missing path, no permission) is printed as
one line naming the file and what to do, exit code 2; ``--debug`` (or ``GYMTAPE_DEBUG=1``)
shows its traceback instead. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

app = typer.Typer(
    name="gymtape",
    help="Record NeMo Gym rollouts with exact token IDs and logprobs, then replay and train on them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])


#: Set by the ``--debug`` flag (or ``GYMTAPE_DEBUG=1``) for the command being run.
_debug = {"on": False}


@app.callback()
def _options(debug: Annotated[bool, typer.Option("--debug", envvar="GYMTAPE_DEBUG",
                                                 help="Show the traceback of an error instead of one line.")]
             = False) -> None:
    _debug["on"] = debug


#: What to do about an OSError, by errno: the line a user reads instead of a traceback.
_OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free space there (or write somewhere else) and run the command again",
    errno.EDQUOT: "the disk quota is used up: free space there (or write somewhere else) and run the command again",
    errno.ENOENT: "no such file or folder: check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "it is a folder where a file was expected: give a file",
    errno.EACCES: "permission denied: check its permissions, or use a path you may write",
    errno.EPERM: "operation not permitted: check its permissions, or use a path you may write",
    errno.EROFS: "the filesystem is read-only: write somewhere else",
    errno.EEXIST: "it already exists: remove it or choose another name",
    errno.ENAMETOOLONG: "the file name is too long: choose a shorter path",
    errno.EIO: "an input/output error: the disk or network share may be failing; check it and run again",
}


def _error_line(e: BaseException) -> str | None:
    """The one line a user reads for ``e`` (None: a bug, keep the traceback)."""
    from recorder import GymtapeError

    if isinstance(e, GymtapeError):
        return str(e)
    if isinstance(e, OSError):
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None) or "a file"
        advice = _OS_ADVICE.get(e.errno) if e.errno is not None else None
        what = e.strerror or str(e) or type(e).__name__
        return f"{where}: {what}" + (f"; {advice}" if advice else "")
    return None


def _friendly(fn: F) -> F:
    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as e:
            line = _error_line(e)
            if line is None or _debug["on"]:
                raise
            from rich.markup import escape

            err.print(f"[bold red]error:[/] {escape(line)}", highlight=False, markup=True)
            raise typer.Exit(2) from None

    return run  # type: ignore[return-value]


@contextmanager
def _naming(path: object, *, always: bool = False) -> Iterator[None]:
    """Name ``path`` in an OSError that names no file (pyarrow's do not), so its one line does;
    ``always``: also in one that names a file of its own (a hidden temporary file)."""
    from recorder import GymtapeError

    try:
        yield
    except OSError as e:
        if not isinstance(e, GymtapeError) and (e.filename is None or always):
            e.filename, e.filename2 = str(path), None
        raise


def _flag_values(ctx: typer.Context, config_cls: type, *, renames: dict[str, str] | None = None,
                 given_only: bool = False) -> dict[str, Any]:
    """The command's parameters that are fields of ``config_cls`` (a dataclass), keyed by field
    name: flags map onto config fields one to one (tests/test_config_flags.py checks it).
    ``given_only``: only flags set on the command line or by environment variable, which then
    override a config file."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_cls)}
    out: dict[str, Any] = {}
    for param, value in ctx.params.items():
        name = (renames or {}).get(param, param)
        if name not in names:
            continue
        source = ctx.get_parameter_source(param)
        if given_only and (source is None or source.name in ("DEFAULT", "DEFAULT_MAP")):
            continue
        out[name] = value.value if isinstance(value, Enum) else value
    return out


@app.command()
@_friendly
def ingest(
    files: Annotated[list[Path], typer.Argument(
        help="NeMo Gym rollout JSONL files, or Gym token-capture stores: folders of <rollout_id>.tokens.jsonl "
             "(or those files).", exists=True)],
    tape: Annotated[str, typer.Option("--tape", help="Tape directory or URL (created or appended to).")],
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first malformed line instead of skipping it.")] = False,
    vocab_size: Annotated[int | None, typer.Option("--vocab-size", min=1, help="The tokenizer's vocabulary size: a "
                                                   "line with a token ID at or above it is malformed (default: only "
                                                   "IDs outside 0..2^31-1 are).")] = None,
) -> None:
    """Convert NeMo Gym rollout JSONL, or Gym's token-capture store, into a tape (re-running skips what is there).

    Exit code 1 when lines were given but none could be ingested (every one malformed)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from recorder import ingest_gym_jsonl

    captures = [f for f in files if f.is_dir() or f.name.endswith(".tokens.jsonl")]  # Gym's capture store
    if captures:
        _ingest_capture(captures, tape, strict)
        files = [f for f in files if f not in captures]
        if not files:
            return
    total = sum(f.stat().st_size for f in files)
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("ingest", total=total)
        with _naming(tape):
            report = ingest_gym_jsonl(files, tape, strict=strict, progress=lambda n: bar.advance(task, n),
                                      vocab_size=vocab_size)
    from rich.markup import escape

    for e in report.errors[:20]:
        err.print(f"[yellow]skipped[/] {escape(str(e))}", highlight=False)
    if len(report.errors) > 20:
        err.print(f"[yellow]... and {len(report.errors) - 20} more malformed lines[/]")
    for f in report.flagged[:20]:
        err.print(f"[yellow]flagged[/] {escape(f)}", highlight=False)
    if len(report.flagged) > 20:
        err.print(f"[yellow]... and {len(report.flagged) - 20} more calls with invalid logprobs[/]")
    ts = ", ".join(f"{k}={v}" for k, v in sorted(report.token_status.items()))
    err.print(
        f"ingested {report.rollouts} rollouts, {report.calls} calls from {report.lines} lines into {tape}"
        f" (token fields: {ts or 'none'}; already on tape: {report.skipped_existing}; malformed: {len(report.errors)})",
        highlight=False,
    )
    if report.errors and not report.rollouts and not report.skipped_existing:
        err.print(f"[bold red]error:[/] none of the {report.lines} lines of {escape(', '.join(map(str, files)))} could "
                  "be ingested (every one is malformed, see above): is it NeMo Gym rollout JSONL?", highlight=False)
        raise typer.Exit(1)


def _ingest_capture(paths: list[Path], tape: str, strict: bool) -> None:
    from recorder import ingest_gym_capture

    report = ingest_gym_capture(paths, tape, strict=strict)
    for e in report.errors[:20]:
        err.print(f"[yellow]skipped[/] {e}", highlight=False)
    err.print(
        f"ingested {report.rollouts} captured rollouts ({report.entries} entries) of {report.found} found in "
        f"Gym's capture store into {tape} (incomplete: {report.incomplete}; entries already on tape: "
        f"{report.skipped_existing}; retired in the store: {report.retired}; malformed: {len(report.errors)})",
        highlight=False,
    )


#: --allow-tokenizer-mismatch, the same on every command that reads token IDs with a tokenizer.
_ALLOW_MISMATCH_HELP = ("Proceed when the tokenizer's identity differs from the one tape.json records "
                        "(default: refuse; see recorder.resolve_tokenizer).")


class ExportFormat(str, Enum):
    gym_jsonl = "gym-jsonl"
    sft = "sft"
    dpo = "dpo"


class DpoPairs(str, Enum):
    disjoint = "disjoint"
    all = "all"


@app.command()
@_friendly
def export(
    tape: Annotated[str, typer.Argument(help="Tape: a directory or a URL (s3://bucket/run1).")],
    format: Annotated[ExportFormat, typer.Option("--format", help="gym-jsonl: Gym rollout JSONL; sft / dpo: "
                                                 "Parquet for TRL or PyTorch (see docs/trainer-bridge.md).")] = ExportFormat.gym_jsonl,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output file (default: standard output; "
                                              "required for sft / dpo).")] = None,
    min_reward: Annotated[float | None, typer.Option(help="sft: keep rollouts with at least this reward.")] = 1.0,
    margin: Annotated[float, typer.Option(help="dpo: least reward gap between chosen and rejected.")] = 0.5,
    pairs: Annotated[DpoPairs, typer.Option(help="dpo: each rollout in one pair at most, or every pair.")] = DpoPairs.disjoint,
    all_statuses: Annotated[bool, typer.Option("--all-statuses", help="sft / dpo: include truncated and failed "
                                                "rollouts (default: status ok only).")] = False,
    tokenizer: Annotated[Path | None, typer.Option(help="sft / dpo: tokenizer for the text columns (default: the "
                                                   "tape's, found by its recorded identity; else the embedded "
                                                   "SmolLM2-135M-Instruct's).")] = None,
    no_text: Annotated[bool, typer.Option("--no-text", help="sft / dpo: token columns only, no decoded text.")] = False,
    allow_tokenizer_mismatch: Annotated[bool, typer.Option("--allow-tokenizer-mismatch",
                                                           help="sft / dpo: " + _ALLOW_MISMATCH_HELP)] = False,
) -> None:
    """Write a tape's rollouts out: Gym rollout JSONL, or SFT / DPO training Parquet."""
    if format is not ExportFormat.gym_jsonl:
        from trainer_bridge import TapeFilters, export_dpo, export_sft

        if out is None:
            raise typer.BadParameter(f"--format {format.value} writes Parquet: give --out FILE.parquet")
        tok: Any = None
        if not no_text:
            from recorder import Tape, resolve_tokenizer

            tok = resolve_tokenizer(Tape(tape), tokenizer, allow_mismatch=allow_tokenizer_mismatch)
        filters = TapeFilters(status=None if all_statuses else ("ok",))
        if format is ExportFormat.sft:
            report = export_sft(tape, out, min_reward=min_reward, filters=filters, tokenizer=tok,
                                allow_tokenizer_mismatch=allow_tokenizer_mismatch)
        else:
            report = export_dpo(tape, out, margin=margin, pairs=pairs.value, filters=filters, tokenizer=tok,
                                allow_tokenizer_mismatch=allow_tokenizer_mismatch)
        for w in report.warnings:
            err.print(f"[yellow]warning:[/] {w}", highlight=False)
        skipped = ", ".join(f"{k}: {v}" for k, v in report.skipped.items())
        unit = "sequences" if format is ExportFormat.sft else "pairs"
        err.print(f"exported {report.rows} {unit} ({format.value}) from {report.rollouts_considered} rollouts to {out}"
                  f" (left out: {skipped})", highlight=False)
        return
    from recorder import export_gym_jsonl

    if out is None:
        n = export_gym_jsonl(tape, sys.stdout.buffer)
    else:
        from recorder import atomic_file

        with _naming(out, always=True), atomic_file(out) as f:
            n = export_gym_jsonl(tape, f)
    err.print(f"exported {n} rollouts ({format.value})")


@app.command()
@_friendly
def inspect(
    tape: Annotated[str, typer.Argument(help="Tape: a directory or a URL (s3://bucket/run1).")],
    json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    no_jsonl_ratio: Annotated[bool, typer.Option("--no-jsonl-ratio", help="Skip sizing the equivalent Gym JSONL.")] = False,
) -> None:
    """Summarise a tape: rollouts, calls, tokens, storage, rewards by group, statuses, shards."""
    from recorder import Tape, gym_jsonl_size, summarize

    s = summarize(Tape(tape), jsonl_size=None if no_jsonl_ratio else gym_jsonl_size)
    if json:
        import orjson

        sys.stdout.buffer.write(orjson.dumps(s, option=orjson.OPT_INDENT_2) + b"\n")
        return
    from replay import print_summary

    print_summary(s, Console())


@app.command()
@_friendly
def compact(
    tape: Annotated[str, typer.Argument(help="Tape: a directory or a URL (s3://bucket/run1).")],
    to: Annotated[str | None, typer.Option("--to", help="Publish a compacted copy here instead (a directory or URL "
                                                        "holding no tape yet); the source is left untouched.")] = None,
    retention: Annotated[float, typer.Option("--retention", help="In place: seconds a superseded shard is kept after "
                                                                 "its replacement appears (0: deleted at once).")] = 0.0,
    shard_mb: Annotated[int, typer.Option("--shard-mb", help="Stored megabytes merged into one compacted shard.")] = 128,
    json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Merge a tape's small shards into large ones; readers and a live writer may go on meanwhile."""
    from recorder import compact_tape

    report = compact_tape(tape, to=to, retention=retention, shard_bytes=shard_mb << 20)
    if json:
        import orjson

        sys.stdout.buffer.write(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2) + b"\n")
        return
    where = f"{report.tape} -> {report.to}" if report.to else report.tape
    for t in report.tables.values():
        kept = f", {t.retained} kept for --retention" if t.retained else ""
        err.print(f"{t.table}: {t.shards_in} shard(s) -> {t.shards_out}, {t.rows} rows, {t.bytes_in:,} -> "
                  f"{t.bytes_out:,} bytes; {t.deleted} superseded shard(s) deleted{kept}", highlight=False)
    err.print(f"compacted {where} in {report.seconds:.1f} s" if report.shards_in or report.to
              else f"{where}: nothing to compact", highlight=False)


@app.command()
@_friendly
def check(
    tape: Annotated[str, typer.Argument(help="Tape: a directory or a URL (s3://bucket/run1).")],
    tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="Tokenizer directory (default: the tape's, "
                                                    "found by its recorded identity; else the embedded "
                                                    "SmolLM2-135M-Instruct's).")] = None,
    json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    max_examples: Annotated[int, typer.Option(help="Problems of each type shown with their context.")] = 20,
    allow_tokenizer_mismatch: Annotated[bool, typer.Option("--allow-tokenizer-mismatch",
                                                           help=_ALLOW_MISMATCH_HELP)] = False,
    chat_template: Annotated[Path | None, typer.Option("--chat-template", help="Jinja chat template file that "
                                                       "re-templates the requests instead of the tokenizer's (default: "
                                                       "the one `gymtape serve --chat-template` recorded on the tape).",
                                                       exists=True, dir_okay=False)] = None,
) -> None:
    """Structural train-generation checks (re-tokenization, re-templating, history, fields); exit 1 on problems."""
    from recorder import Tape
    from replay import check_tape

    report = check_tape(Tape(tape), tokenizer, max_examples=max_examples,
                        allow_tokenizer_mismatch=allow_tokenizer_mismatch, chat_template=chat_template)
    if json:
        import orjson

        sys.stdout.buffer.write(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2) + b"\n")
    else:
        from replay import print_check

        print_check(report.to_dict(), Console(), warnings_to=err)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
@_friendly
def replay(
    tape: Annotated[str, typer.Argument(help="Tape: a directory or a URL (s3://bucket/run1).")],
    model: Annotated[Path | None, typer.Option(help="Checkpoint directory to re-score with (default: the embedded "
                                                    "SmolLM2-135M-Instruct, unless --engine-url is given).")] = None,
    engine_url: Annotated[str | None, typer.Option(help="Re-score on this running vLLM instead (prompt_logprobs).")] = None,
    engine_model: Annotated[str | None, typer.Option(help="Model name at --engine-url (default: the first served).")] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer for decoding tokens (default: the model's; with "
                                                   "--engine-url, the tape's, found by its recorded identity).")] = None,
    device: Annotated[str, typer.Option(help="torch device for --model (cpu, cuda).")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    json: Annotated[bool, typer.Option("--json", help="Print the JSON report (gymtape.replay/1) instead of tables.")] = False,
    html: Annotated[Path | None, typer.Option("--html", help="Also write a self-contained HTML report here.")] = None,
    fail_above: Annotated[list[str] | None, typer.Option("--fail-above", help="METRIC=VALUE (repeatable): exit 1 when "
                                                         "the overall metric is above VALUE, e.g. max_abs_dlogprob=1e-3.")] = None,
    is_bounds: Annotated[str, typer.Option(help="LO,HI: importance ratios outside count in frac_outside_is_bounds.")] = "0.5,2",
    token_budget: Annotated[int | None, typer.Option(help="--model: tokens per packed batch (default: 2048 on "
                                                          "cpu, 16384 on a GPU).")] = None,
    chunk_tokens: Annotated[int | None, typer.Option(help="--model: positions per output-head chunk (default: 256 "
                                                          "on cpu, 1024 on a GPU).")] = None,
    concurrency: Annotated[int, typer.Option(help="--engine-url: requests in flight.")] = 16,
    worst: Annotated[int, typer.Option(help="Worst tokens kept in the report.")] = 20,
    details: Annotated[int, typer.Option(help="Worst rollouts kept token by token (for --html).")] = 20,
    top: Annotated[int, typer.Option(help="Rows shown per terminal table.")] = 10,
    ray: Annotated[int | None, typer.Option("--ray", help="--model: score on N Ray Data workers (one model replica "
                                            "each; RAY_ADDRESS picks a running cluster).")] = None,
    allow_tokenizer_mismatch: Annotated[bool, typer.Option("--allow-tokenizer-mismatch",
                                                           help=_ALLOW_MISMATCH_HELP)] = False,
) -> None:
    """Re-score every generated token (trainer-side model or live vLLM) against the recorded logprobs; exit 1 above --fail-above."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from replay import ReplayError, parse_fail_above, replay_tape

    thresholds = parse_fail_above(fail_above or [])
    try:
        lo, hi = (float(x) for x in is_bounds.split(","))
    except ValueError:
        raise ReplayError(f"--is-bounds {is_bounds!r}: expected LO,HI, e.g. 0.5,2") from None
    if engine_url is not None and model is not None:
        raise ReplayError("give --model or --engine-url, not both")
    scorer: dict[str, Any] = {"engine_url": engine_url, "engine_model": engine_model}
    if engine_url is None:
        from recorder import default_model_dir
        from replay import ScoreSettings

        scorer["model"] = model or default_model_dir()
        scorer["settings"] = ScoreSettings(token_budget=token_budget, chunk_tokens=chunk_tokens)
        if ray is not None and ray < 1:
            raise ReplayError(f"--ray needs at least 1 worker, got {ray}")
        scorer["ray_workers"] = ray
    elif ray is not None:
        raise ReplayError("--ray scores with --model on Ray workers; it does not apply to --engine-url")
    progress = Progress(TextColumn("[bold]replay"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"),
                        TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal)
    state: dict[str, Any] = {}

    def advance(n: int, total: int) -> None:
        if "task" not in state:
            state["task"] = progress.add_task("replay", total=total)
        progress.advance(state["task"], n)

    with progress:
        report = replay_tape(tape, tokenizer=tokenizer, device=device, dtype=dtype, is_bounds=(lo, hi),
                             fail_above=thresholds, concurrency=concurrency, worst_tokens=worst,
                             detail_rollouts=details, progress=advance, allow_tokenizer_mismatch=allow_tokenizer_mismatch,
                             **scorer).to_dict()
    if html is not None:
        from replay import write_replay_html

        write_replay_html(report, html)
    if json:
        import orjson

        sys.stdout.buffer.write(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        from replay import print_replay

        print_replay(report, Console(), top=top)  # also prints the warnings
        if html is not None:
            err.print(f"wrote {html}", highlight=False)
    if report["threshold_failures"]:
        if json:
            for f in report["threshold_failures"]:
                err.print(f"[red]threshold crossed:[/] {f}", highlight=False)
        raise typer.Exit(1)


class MatchBy(str, Enum):
    task = "task"
    id = "id"


@app.command()
@_friendly
def diff(
    tape_a: Annotated[str, typer.Argument(help="First tape, a directory or URL (changes are reported as B - A).")],
    tape_b: Annotated[str, typer.Argument(help="Second tape, a directory or URL.")],
    by: Annotated[MatchBy, typer.Option("--by", help="Pair rollouts by (env, task, repeat) or by rollout id.")]
    = MatchBy.task,
    tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="Tokenizer directory for the decoded text "
                                                    "(default: the tapes', found by their recorded identity; else "
                                                    "the embedded SmolLM2-135M-Instruct's).")] = None,
    json: Annotated[bool, typer.Option("--json", help="Print the JSON report (gymtape.diff/1) instead of tables.")]
    = False,
    html: Annotated[Path | None, typer.Option("--html", help="Also write a self-contained HTML report here.")] = None,
    top: Annotated[int, typer.Option(help="Divergences shown in the terminal.")] = 10,
    fail_on_divergence: Annotated[bool, typer.Option("--fail-on-divergence",
                                                     help="Exit 1 when any matched pair diverges.")] = False,
    allow_tokenizer_mismatch: Annotated[bool, typer.Option("--allow-tokenizer-mismatch",
                                                           help=_ALLOW_MISMATCH_HELP)] = False,
) -> None:
    """Pair the rollouts of two tapes and show where each pair first diverges, reward and logprob changes."""
    from replay import diff_tapes, print_diff, write_diff_html

    report = diff_tapes(tape_a, tape_b, by=by.value, tokenizer=tokenizer,
                        allow_tokenizer_mismatch=allow_tokenizer_mismatch).to_dict()
    if html is not None:
        write_diff_html(report, html)
    if json:
        import orjson

        sys.stdout.buffer.write(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print_diff(report, Console(), top=top)
        if html is not None:
            err.print(f"wrote {html}", highlight=False)
    if fail_on_divergence and report["summary"]["diverged"]:
        raise typer.Exit(1)


@app.command()
@_friendly
def synth(
    tasks: Annotated[Path, typer.Argument(help="Gym task JSONL (responses_create_params lines).", exists=True)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output rollout JSONL.")],
    repeats: Annotated[int, typer.Option(help="Rollouts per task.")] = 2,
    calls: Annotated[int, typer.Option(help="Model calls per rollout.")] = 4,
    context_tokens: Annotated[int, typer.Option(help="Context length reached by the last call.")] = 1024,
    vocab_size: Annotated[int, typer.Option(help="Token IDs are drawn from [0, vocab_size).")] = 151_936,
    rewrite_every: Annotated[int, typer.Option(help="Every Nth rollout rewrites its history (0: none).")] = 0,
    empty_every: Annotated[int, typer.Option(help="Every Nth rollout has empty token fields (0: none).")] = 0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Make synthetic multi-turn Gym rollout JSONL (random tokens) to try gymtape without a model."""
    import orjson

    from recorder import GymFormatError, synthesize_gym_rollouts

    task_lines = []
    for n, line in enumerate(tasks.read_bytes().splitlines(), 1):
        if line.strip():
            try:
                task_lines.append(orjson.loads(line))
            except orjson.JSONDecodeError as e:
                raise GymFormatError(str(tasks), n, f"not a JSON task line ({e}); give Gym task JSONL") from e
    n = 0
    with open(out, "wb") as f:
        for line in synthesize_gym_rollouts(task_lines, repeats=repeats, calls=calls, context_tokens=context_tokens,
                                            vocab_size=vocab_size, rewrite_every=rewrite_every,
                                            empty_every=empty_every, seed=seed):
            f.write(orjson.dumps(line) + b"\n")
            n += 1
    err.print(f"wrote {n} synthetic rollouts to {out}")


class Split(str, Enum):
    train = "train"
    validation = "validation"


@app.command()
@_friendly
def record(
    ctx: typer.Context,
    tape: Annotated[Path | None, typer.Option(help="Tape directory (default: the config's `tape`).")] = None,
    agent_url: Annotated[str | None, typer.Option(help="A running Gym agent server (POST /run).")] = None,
    env: Annotated[str | None, typer.Option("--env", help="A built-in environment (see --list-envs).")] = None,
    name: Annotated[str | None, typer.Option(help="Environment name stored in the tape (default: --env, or "
                                                  "gym_agent).")] = None,
    tasks: Annotated[Path | None, typer.Option(help="Gym task JSONL (built-in envs: their split).")] = None,
    split: Annotated[Split, typer.Option(help="Built-in env split when --tasks is not given.")] = Split.train,
    task_index: Annotated[list[int] | None, typer.Option(help="Record only this task (0-based line of the task "
                                                              "file; repeatable, kept in order).")] = None,
    repeats: Annotated[int, typer.Option(help="Rollouts per task.")] = 1,
    concurrency: Annotated[int, typer.Option(help="Rollouts in flight.")] = 8,
    model_url: Annotated[list[str] | None, typer.Option(help="Built-in envs: chat endpoint base URL, e.g. http://127.0.0.1:8000/v1; "
                                                             "repeat for replicas (each call goes to the next).")] = None,
    model: Annotated[str, typer.Option(help="Built-in envs: model name sent to the chat endpoint.")] = "default",
    server_url: Annotated[list[str] | None, typer.Option(help="A gymtape serve replica the calls go through (repeatable; "
                                                              "none: fine, the join is resolved on --tape); waited for "
                                                              "when it goes away.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling override.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Sampling override.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Sampling override (max tokens per call).")] = None,
    seed: Annotated[int | None, typer.Option(help="Sample each (task, repeat) with its own seed derived from this "
                                                  "one: a re-run samples the same rollouts.")] = None,
    config: Annotated[Path | None, typer.Option(help="Run YAML listing environments (see docs/record.md).", exists=True)] = None,
    select: Annotated[str | None, typer.Option(help="Comma-separated env names from --config.")] = None,
    resume: Annotated[bool, typer.Option(help="Skip (env, task, repeat) triples already on the tape.")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="With --resume: run again the triples whose "
                                               "rows failed, lost calls or are incomplete; the new row supersedes "
                                               "the old.")] = False,
    server_wait: Annotated[float, typer.Option(help="Seconds to wait for a model or agent server that stopped "
                                                    "answering before the rest of the work fails (0: at once).")] = 300.0,
    limit: Annotated[int | None, typer.Option(help="Record at most this many rollouts.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per rollout before retry/failure.")] = 600.0,
    retries: Annotated[int, typer.Option(help="Retries on transient errors.")] = 2,
    list_envs: Annotated[bool, typer.Option("--list-envs", help="List built-in environments and exit.")] = False,
) -> None:
    """Collect rollouts from Gym agents or built-in environments into a tape (resumable)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from recorder import BUILTIN_ENVS, EnvConfig, RecordConfig, RecordConfigError, load_config
    from recorder import record as run_record

    if list_envs:
        for name, e in BUILTIN_ENVS.items():
            Console().print(f"[bold]{name}[/]: {e.description} (tasks: {e.tasks_path('train').parent})")
        return
    sampling = {k: v for k, v in (("temperature", temperature), ("top_p", top_p), ("max_tokens", max_tokens))
                if v is not None}
    # flags that map onto RecordConfig; with --config only those given override the YAML's values
    run_flags = _flag_values(ctx, RecordConfig, given_only=config is not None)
    run_flags.pop("tape", None)
    if config is not None:
        renames = {"env": "builtin", "task_index": "task_indices"}
        flag_of = {v: k for k, v in renames.items()}
        one_env = sorted(flag_of.get(f, f) for f in _flag_values(ctx, EnvConfig, renames=renames, given_only=True))
        one_env = [f for f in one_env if f != "seed"]
        if one_env:
            raise RecordConfigError(f"{', '.join('--' + f.replace('_', '-') for f in one_env)}: describe one "
                                    f"environment without --config; set them per environment in {config}")
        cfg = load_config(config, tape=tape, select=select.split(",") if select else None)
        for e in cfg.envs:
            e.sampling = {**e.sampling, **sampling}
            e.seed = seed if seed is not None else e.seed
    else:
        if tape is None:
            raise RecordConfigError("give --tape (or --config with a `tape:`)")
        tasks_file = tasks
        if env is not None and tasks is None:
            tasks_file = BUILTIN_ENVS[env].tasks_path(split.value) if env in BUILTIN_ENVS else None
        one = EnvConfig(name=name or env or "gym_agent", tasks=tasks_file, repeats=repeats, agent_url=agent_url,
                        builtin=env, model_url=model_url, model=model, server_url=server_url, sampling=sampling,
                        task_indices=task_index or None, seed=seed)
        cfg = RecordConfig(tape=tape, envs=[one])
    for key, value in run_flags.items():
        setattr(cfg, key, value)
    progress = Progress(TextColumn("[bold]record"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[rate]}"), console=err, disable=not err.is_terminal)
    state: dict[str, Any] = {}

    def on_start(total: int, skipped: int) -> None:
        state["task"] = progress.add_task("record", total=total, rate="")
        state["t0"] = __import__("time").perf_counter()
        if skipped:
            err.print(f"resume: {skipped} rollouts already on the tape are skipped")

    def on_result(report: Any, n: int) -> None:
        dt = max(1e-9, __import__("time").perf_counter() - state["t0"])
        mean = report.mean_reward
        rate = f"{report.done / dt:.2f} rollouts/s  {report.tokens / dt:,.0f} tok/s  reward {mean:.3f}" if mean is not None \
            else f"{report.done / dt:.2f} rollouts/s"
        progress.update(state["task"], advance=n, rate=rate)

    with progress, _naming(cfg.tape):
        report = run_record(cfg, on_result=on_result, on_start=on_start,
                            on_message=lambda m: err.print(m, style="yellow", markup=False, highlight=False))
    for f in report.failures[:10]:
        err.print(f"[yellow]failed[/] {f}", highlight=False)
    mean = f"{report.mean_reward:.3f}" if report.mean_reward is not None else "-"
    err.print(f"recorded {report.done} rollouts into {cfg.tape} in {report.elapsed_s:.1f} s: ok {report.ok}, "
              f"truncated {report.truncated}, failed {report.failed}, joined with server calls {report.joined}, "
              f"skipped (resume) {report.skipped}, run again after failing {report.retried}; {report.tokens:,} "
              f"generated tokens; mean reward {mean}"
              + (f"; waited {report.server_wait_s:.0f} s for servers" if report.server_wait_s >= 1 else ""),
              highlight=False)


class EngineName(str, Enum):
    hf = "hf"
    vllm = "vllm"


@app.command()
@_friendly
def serve(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", help="JSON/YAML file of serve settings (the fields of "
                                                "recorder.ServeConfig, e.g. a run's serve.json); flags given as well "
                                                "override it.", exists=True, dir_okay=False)] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    tape: Annotated[Path | None, typer.Option(help="Record every call to this tape directory.")] = None,
    engine: Annotated[EngineName, typer.Option(help="hf: in-process transformers; vllm: a vLLM server.")] = EngineName.hf,
    model: Annotated[str | None, typer.Option(help="hf: checkpoint dir (default: embedded SmolLM2-135M-Instruct); "
                                                   "vllm: model to start, or to pick at --upstream.")] = None,
    upstream: Annotated[str | None, typer.Option(help="vllm: URL of a running vLLM server (else one is started).")] = None,
    api_key: Annotated[str | None, typer.Option(help="Require 'Authorization: Bearer KEY' (not on /health).",
                                                envvar="GYMTAPE_API_KEY")] = None,
    max_request_bytes: Annotated[int, typer.Option(help="Largest request body; a larger one is answered 413 before "
                                                        "it is read.")] = 32 * 2**20,
    max_requests_in_flight: Annotated[int, typer.Option(help="Requests handled at once (/health not counted); more "
                                                             "are answered 429 with Retry-After.")] = 512,
    allow_origin: Annotated[list[str] | None, typer.Option(help="A browser origin allowed to call the server, e.g. "
                                                                "http://localhost:3000 (repeatable; '*': any). Other "
                                                                "cross-site requests are refused 403.")] = None,
    openapi: Annotated[bool, typer.Option(help="Serve /docs, /redoc and /openapi.json (behind --api-key when "
                                               "set).")] = False,
    tokenizer: Annotated[str | None, typer.Option(help="Tokenizer directory (default: the model's).")] = None,
    chat_template: Annotated[str | None, typer.Option(help="Jinja chat template file overriding the tokenizer's.")] = None,
    eos_token: Annotated[str | None, typer.Option(help="End-of-turn token for the splice (default: eos).")] = None,
    retemplate: Annotated[bool, typer.Option("--retemplate", help="Behave like a stock OpenAI server: ignore "
                                             "message-level token IDs and re-template every prompt from text (no "
                                             "splice; for A/B measurements, see gymtape train --ab).")] = False,
    tool_parser: Annotated[str, typer.Option(help="Tool-call format in generated text.")] = "hermes",
    reasoning: Annotated[bool, typer.Option(help="Split <think>...</think> into reasoning_content.")] = True,
    device: Annotated[str, typer.Option(help="hf: torch device (cpu, cuda).")] = "cpu",
    dtype: Annotated[str, typer.Option(help="hf/local vllm: float32, bfloat16, ...")] = "float32",
    max_batch_size: Annotated[int, typer.Option(help="hf: requests per batch.")] = 16,
    max_model_len: Annotated[int | None, typer.Option(help="Context limit (default: the model's).")] = None,
    served_model_name: Annotated[str | None, typer.Option(help="Model name in responses.")] = None,
    policy_version: Annotated[int, typer.Option(help="Policy version stamped on calls at start.")] = 0,
    flush_seconds: Annotated[float, typer.Option(help="Seal the write-ahead log into a Parquet shard after this many "
                                                       "seconds (calls are durable and visible when answered; this "
                                                       "sets shard size only).")] = 60.0,
    upstream_timeout: Annotated[float, typer.Option(help="vllm: seconds to wait for an answer before 504.")] = 600.0,
    vllm_port: Annotated[int, typer.Option(help="vllm without --upstream: port of the started server (0: a free "
                                                "one).")] = 0,
    vllm_log: Annotated[str | None, typer.Option(help="vllm without --upstream: log file of the started server.")] = None,
    vllm_arg: Annotated[list[str] | None, typer.Option(help="vllm without --upstream: extra argument for the started "
                                                           "server (repeatable), e.g. --vllm-arg=--enforce-eager.")] = None,
) -> None:
    """Serve an on-policy OpenAI-compatible endpoint for NeMo Gym and record every call."""
    import dataclasses

    from recorder import ServeConfig, run_server

    values = _flag_values(ctx, ServeConfig, renames={"vllm_arg": "vllm_args"}, given_only=config is not None)
    if "vllm_args" in values:
        values["vllm_args"] = tuple(values["vllm_args"] or ())
    if "allow_origin" in values:
        values["allow_origin"] = tuple(values["allow_origin"] or ())
    settings = ServeConfig(**values) if config is None else dataclasses.replace(ServeConfig.from_file(config), **values)
    run_server(settings)


@app.command()
@_friendly
def train(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="Run directory: tape, validation tape, weights, metrics.jsonl, curve.png.")],
    env: Annotated[str, typer.Option("--env", help="Built-in environment to train on (see gymtape record --list-envs).")] = "plus",
    model: Annotated[str | None, typer.Option(help="Initial checkpoint dir (default: embedded SmolLM2-135M-Instruct).")] = None,
    steps: Annotated[int, typer.Option(help="Optimiser steps (each bumps the served policy version).")] = 100,
    groups_per_step: Annotated[int, typer.Option(help="Tasks per step (GRPO groups).")] = 8,
    group_size: Annotated[int, typer.Option(help="Rollouts per task.")] = 4,
    max_tokens: Annotated[int, typer.Option(help="Max tokens per answer (training and validation).")] = 32,
    temperature: Annotated[float, typer.Option(help="Sampling temperature of training rollouts.")] = 1.0,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 2e-5,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
    betas: Annotated[tuple[float, float], typer.Option(help="AdamW betas (two numbers: --betas 0.9 0.99).")] = (0.9, 0.99),
    max_grad_norm: Annotated[float, typer.Option(help="Clip the gradient norm to this before each step.")] = 1.0,
    max_staleness: Annotated[int, typer.Option(help="0: on-policy; K: sampling runs up to K versions ahead (async).")] = 0,
    correction: Annotated[str, typer.Option(help="Mismatch correction: tis, mis-token, mis-sequence, geo-mask, none.")] = "tis",
    is_cap: Annotated[float, typer.Option(help="TIS cap on the per-token ratio.")] = 2.0,
    is_low: Annotated[float | None, typer.Option(help="MIS / geo-mask lower ratio bound (default per correction).")] = None,
    is_high: Annotated[float | None, typer.Option(help="MIS / geo-mask upper ratio bound (default per correction).")] = None,
    clip_low: Annotated[float, typer.Option(help="PPO clip: ratio >= 1 - clip_low.")] = 0.2,
    clip_high: Annotated[float, typer.Option(help="PPO clip: ratio <= 1 + clip_high.")] = 0.28,
    aggregate: Annotated[str, typer.Option(help="Loss aggregation: token-mean or seq-mean-token-mean.")] = "token-mean",
    std_normalize: Annotated[bool, typer.Option(help="GRPO advantage divided by the group's reward std "
                                                     "(--no-std-normalize: Dr. GRPO).")] = True,
    val_every: Annotated[int, typer.Option(help="Validate every N steps (0: only first and last).")] = 10,
    val_tasks: Annotated[int, typer.Option(help="Validation tasks (greedy, from the env's validation split).")] = 64,
    val_samples: Annotated[int, typer.Option(help="Also sample each validation task N times at --temperature "
                                             "(val_reward_sampled); 0: greedy only.")] = 0,
    token_budget: Annotated[int, typer.Option(help="Trainer micro-batch size in tokens (packed, no padding).")] = 4096,
    serve_dtype: Annotated[str, typer.Option(help="Dtype of the sampling server's engine.")] = "float32",
    threads: Annotated[int | None, typer.Option(help="torch threads for the trainer.")] = None,
    serve_threads: Annotated[int | None, typer.Option(help="torch threads for the sampling server (async mode on a "
                                                           "small CPU machine: split the cores).")] = None,
    seed: Annotated[int, typer.Option(help="Seeds task order, sampling and torch.")] = 0,
    port: Annotated[int, typer.Option(help="Port of the sampling server (0: a free one).")] = 0,
    concurrency: Annotated[int, typer.Option(help="Rollouts in flight while collecting.")] = 64,
    keep_checkpoints: Annotated[int, typer.Option(help="Checkpoints kept under weights/ (the latest ones).")] = 2,
    batch_timeout: Annotated[float, typer.Option(help="Seconds the trainer waits for a training batch.")] = 600.0,
    server_timeout: Annotated[float, typer.Option(help="Seconds to wait for the sampling server to start.")] = 300.0,
    plot: Annotated[bool, typer.Option(help="Write curve.png at the end.")] = True,
    retemplate: Annotated[bool, typer.Option("--retemplate", help="Train without the on-policy splice: the server "
                                             "re-templates every prompt from text and the trainer trains on the "
                                             "sequences a re-templating trainer builds.")] = False,
    chat_template: Annotated[str | None, typer.Option(help="Chat template of the sampling server: a Jinja file, or "
                                                      "a bundled one by name (qwen3_nothink.jinja: Qwen3's "
                                                      "non-thinking mode).")] = None,
    ab: Annotated[bool, typer.Option("--ab", help="Run both arms (splice, then --retemplate) from the same seed "
                                     "under OUT/splice and OUT/retemplate, check both tapes and write the A/B "
                                     "report (--ab-report).")] = False,
    ab_report: Annotated[Path, typer.Option(help="With --ab: the Markdown report (a PNG of the curves is written "
                                                 "beside it).")] = Path("on-policy-ab.md"),
) -> None:
    """Reference GRPO loop: serve the policy, record rollouts, follow the tape, update, push weights."""
    from trainer_bridge import TrainConfig
    from trainer_bridge import train as run_train

    cfg = TrainConfig(**_flag_values(ctx, TrainConfig))
    if ab:
        from replay import run_ab

        if retemplate:
            raise typer.BadParameter("--ab runs both arms; leave out --retemplate", param_hint="--retemplate")
        result = run_ab(cfg, ab_report, log=lambda line: err.print(line, highlight=False, markup=False))
        err.print(f"A/B of {steps} steps per arm in {result.seconds:.0f} s; report: {result.report_path}; "
                  f"plot: {result.plot_path}", highlight=False)
        return
    report = run_train(cfg, log=lambda line: err.print(line, highlight=False, markup=False))
    base, final = report.base_val_reward, report.final_val_reward
    delta = f" ({final - base:+.3f})" if base is not None and final is not None else ""
    err.print(f"trained {steps} steps in {report.seconds:.0f} s; policy version {report.final_version}; validation "
              f"reward {base if base is None else f'{base:.3f}'} -> {final if final is None else f'{final:.3f}'}{delta}; "
              f"metrics: {report.metrics_path}" + (f"; plot: {report.plot_path}" if report.plot_path else ""),
              highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
