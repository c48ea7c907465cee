"""One tokenizer policy for every command that reads a tape's token IDs as text or scores them.

A tape's token IDs mean something only under the tokenizer that produced them, so ``tape.json``
records that tokenizer's identity (:class:`~recorder.TokenizerIdentity`: a name and a sha256 of
its files and chat template). ``check``, ``replay``, ``diff`` and ``export`` all need a
tokenizer; each used to pick and compare its own, with four different outcomes for the same
wrong tokenizer. They all call :func:`resolve_tokenizer` now, which does two things:

1. **Pick** the tokenizer: the one given; else a local directory whose identity equals the
   recorded one (directories named in the tape's ``runs/*.json``, gymtape's cached models and
   tokenizers, the embedded default model, the offline Qwen tokenizer); else the default
   model's (:func:`~recorder.default_model_dir`).
2. **Compare** its identity with every tape's recorded one. A difference is a
   :class:`~recorder.TokenizerMismatchError` naming both identities and the fix, unless
   ``allow_mismatch=True``: then the same sentence is in ``mismatch`` and ``warnings``, and the
   command carries it into its report.

A tape that records no tokenizer (ingested Gym JSONL) has nothing to compare against: that is
not a mismatch, and ``warnings`` says the tokenizer could not be confirmed. Identities are
compared by sha256 alone (a directory's name is only a label).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .._errors import GymtapeError, TapeError, TokenizerLoadError, TokenizerMismatchError
from ..tape._layout import RUNS_DIR
from ..tape._meta import TapeMeta, TokenizerIdentity, tokenizer_identity
from ..tape._reader import Tape

#: A Hugging Face hub id: loadable by name, but with no local files to compare.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
#: What the advice at the end of a mismatch says to do.
_FIX = ("pass the tape's tokenizer with --tokenizer DIR, or --allow-tokenizer-mismatch "
        "(allow_tokenizer_mismatch=True) to proceed anyway")


@dataclass(frozen=True)
class ResolvedTokenizer:
    """The tokenizer a command works with, where it came from, and how it compares with the tape."""

    #: The loaded transformers tokenizer (None when resolved with ``load=False``).
    tokenizer: Any
    #: Its local directory (None for a loaded tokenizer whose directory is unknown, or a hub id).
    path: Path | None
    #: Its identity (None when its files are unknown: it could not be compared).
    identity: TokenizerIdentity | None
    #: How it was chosen: ``given``, ``recorded`` (found by the tape's identity) or ``default``.
    source: str
    #: The identity each tape records, in the order given (None: the tape records none).
    recorded: tuple[TokenizerIdentity | None, ...] = ()
    #: The mismatch sentence when ``allow_mismatch`` let a different tokenizer through, else None.
    mismatch: str | None = None
    #: What the command's report should carry (the mismatch, an identity that was not compared).
    warnings: tuple[str, ...] = field(default_factory=tuple)


TapeLike = Tape | TapeMeta | str | os.PathLike[str]


def resolve_tokenizer(
    tapes: TapeLike | Sequence[TapeLike],
    given: str | os.PathLike[str] | ResolvedTokenizer | Any | None = None,
    *,
    allow_mismatch: bool = False,
    load: bool = True,
) -> ResolvedTokenizer:
    """Pick the tokenizer for ``tapes`` and compare it with what they record (see the module doc).

    Args:
        tapes: one tape (a :class:`~recorder.Tape`, its directory, or its
            :class:`~recorder.TapeMeta`), or several that must share one tokenizer (``diff``'s two).
        given: a tokenizer directory or hub id, a loaded transformers tokenizer, a
            :class:`ResolvedTokenizer` (re-compared, not reloaded), or None to find one.
        allow_mismatch: proceed with a tokenizer whose identity differs, with a warning.
        load: load the tokenizer (False: identity and path only).

    Raises:
        TokenizerMismatchError: the identities differ and ``allow_mismatch`` is False.
        TokenizerLoadError: the tokenizer cannot be loaded.
    """
    metas = _metas(tapes)
    recorded = tuple(m.tokenizer for _, m, _ in metas)
    if isinstance(given, ResolvedTokenizer):
        tok, path, ident, source = given.tokenizer, given.path, given.identity, given.source
        if load and tok is None and path is not None:
            tok = _load(path)
    elif given is None:
        path, ident, source = _find(metas)
        tok = _load(path) if load else None
    elif isinstance(given, (str, os.PathLike)):
        path, ident, source = _given_path(given), None, "given"
        if path is not None:
            try:
                ident = tokenizer_identity(path)
            except TapeError as e:  # a directory without tokenizer files
                raise TokenizerLoadError(str(e)) from e
        tok = _load(path if path is not None else given) if load else None
    else:  # a loaded tokenizer: its identity is known when it was loaded from a local directory
        tok, source = given, "given"
        nop = getattr(given, "name_or_path", None)
        path = Path(nop) if nop and Path(nop).is_dir() else None
        ident = _identity_or_none(path) if path is not None else None

    warnings: list[str] = []
    label = ident.name if ident is not None else str(path or given)
    for where, meta, _ in metas:
        if meta.tokenizer is None:
            warnings.append(f"{where} records no tokenizer identity (tape.json tokenizer is null, as for ingested "
                            f"Gym rollouts): not a mismatch, but the tokenizer used ({label}) cannot be confirmed")
        elif ident is None:
            warnings.append(f"the tokenizer's files are unknown ({label}), so its identity was not compared with "
                            f"{where}'s, {_describe(meta.tokenizer)}; pass a tokenizer directory to compare")
    mismatch = _mismatch(metas, ident, path)
    if mismatch is not None:
        if not allow_mismatch:
            raise TokenizerMismatchError(f"{mismatch}; {_FIX}")
        warnings.insert(0, mismatch)
    return ResolvedTokenizer(tokenizer=tok, path=path, identity=ident, source=source, recorded=recorded,
                             mismatch=mismatch, warnings=tuple(dict.fromkeys(warnings)))


def _metas(tapes: TapeLike | Sequence[TapeLike]) -> list[tuple[str, TapeMeta, Tape | None]]:
    """(how to name it, its metadata, the tape when known) per tape."""
    one = isinstance(tapes, (Tape, TapeMeta, str, os.PathLike)) or not isinstance(tapes, Sequence)
    items = [tapes] if one else list(tapes)  # type: ignore[list-item]
    out = []
    for i, t in enumerate(items):
        if isinstance(t, (str, os.PathLike)):
            t = Tape(t)
        if isinstance(t, TapeMeta):
            out.append(("the tape" if len(items) == 1 else f"tape #{i + 1}", t, None))
        else:
            out.append((f"tape {t.location}", t.meta, t))
    return out


def _describe(ident: TokenizerIdentity) -> str:
    return f"{ident.name} (sha256 {ident.sha256[:12]})"


def _mismatch(metas: list[tuple[str, TapeMeta, Tape | None]], ident: TokenizerIdentity | None,
              path: Path | None) -> str | None:
    if ident is None:
        return None
    differing = [(where, m.tokenizer) for where, m, _ in metas
                 if m.tokenizer is not None and m.tokenizer.sha256 != ident.sha256]
    if not differing:
        return None
    recorded = "; ".join(f"{where} was recorded with tokenizer {_describe(t)}" for where, t in differing)
    shown = _describe(ident) + (f" at {path}" if path is not None else "")
    return f"{recorded}, but the tokenizer used is {shown}"


def _given_path(given: str | os.PathLike[str]) -> Path | None:
    """A local directory (or ``tokenizer.json``) as a Path; None for a hub id (``org/name``)."""
    p = Path(given)
    if p.exists():
        return p
    if _HUB_ID.fullmatch(os.fspath(given)):  # transformers may find it in its cache or on the hub
        return None
    raise TokenizerLoadError(f"tokenizer {given} does not exist: pass a directory a tokenizer was saved to "
                             "(save_pretrained), or a hub id (org/name)")


def _identity_or_none(path: Path) -> TokenizerIdentity | None:
    try:
        return tokenizer_identity(path)
    except GymtapeError:
        return None


def _load(src: str | os.PathLike[str]) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(src))
    except (OSError, ValueError) as e:
        raise TokenizerLoadError(f"cannot load a tokenizer from {src}: {e}. Pass --tokenizer DIR "
                                 "(a directory saved with save_pretrained)") from e


# -- finding the recorded tokenizer ---------------------------------------------------------


def _find(metas: list[tuple[str, TapeMeta, Tape | None]]) -> tuple[Path, TokenizerIdentity, str]:
    """The first local directory whose identity is the (first) recorded one, else the default model's."""
    from .engines._models import default_model_dir

    wanted = next((m.tokenizer for _, m, _ in metas if m.tokenizer is not None), None)
    if wanted is not None:
        seen: set[Path] = set()
        for candidate in _candidates(metas, wanted):
            try:
                key = candidate.resolve()
            except OSError:
                continue
            if key in seen or not candidate.is_dir():
                continue
            seen.add(key)
            ident = _identity_or_none(candidate)
            if ident is not None and ident.sha256 == wanted.sha256:
                return candidate, ident, "recorded"
    path = default_model_dir()
    return path, tokenizer_identity(path), "default"


def _candidates(metas: list[tuple[str, TapeMeta, Tape | None]], wanted: TokenizerIdentity) -> Iterator[Path]:
    """Where the recorded tokenizer may live, most likely first; nothing here builds anything
    until the cheap places are exhausted."""
    from .engines._models import DEFAULT_MODEL, cache_dir, default_model_dir

    for _, _, tape in metas:
        if tape is not None:
            yield from _run_dirs(tape)
    cached = [d for sub in ("tokenizers", "models") for d in _subdirs(cache_dir() / sub)]
    yield from sorted(cached, key=lambda d: d.name != wanted.name)
    # the two tokenizers gymtape builds itself, built only when the recorded one has their name
    if wanted.name in (DEFAULT_MODEL, "qwen3"):
        from .engines._qwen import qwen_tokenizer_dir

        try:
            yield default_model_dir() if wanted.name == DEFAULT_MODEL else qwen_tokenizer_dir()
        except GymtapeError:  # its package is not installed: nothing more to find
            return


def _subdirs(d: Path) -> list[Path]:
    try:
        return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def _run_dirs(tape: Tape) -> Iterator[Path]:
    """Local directories named by the tape's ``runs/*.json`` (e.g. `gymtape serve`'s --tokenizer,
    --model); the tape itself may be on object storage, the directories are looked for here."""
    try:
        names = [e.name for e in tape.storage.list(RUNS_DIR) if e.name.endswith(".json") and not e.name.startswith(".")]
    except (OSError, GymtapeError):  # unreadable: nothing to find there
        return
    for name in names:
        try:
            run = orjson.loads(tape.storage.read_bytes(RUNS_DIR, name))
        except (OSError, GymtapeError, orjson.JSONDecodeError):
            continue
        if not isinstance(run, dict):
            continue
        for section in (run, run.get("config")):
            if isinstance(section, dict):
                for key in ("tokenizer", "model"):
                    v = section.get(key)
                    if isinstance(v, str) and v:
                        yield Path(v)
