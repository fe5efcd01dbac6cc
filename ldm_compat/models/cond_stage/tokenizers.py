"""Offline tokenizer lookup, and the tokenizers the original cond stages used, as stock transformers tokenizers.

Nothing here downloads. A cond stage's ``version`` (a Hub id such as ``openai/clip-vit-large-patch14`` in real
configs, a folder name such as the fixtures' ``tiny_clip``) is looked up, in order, as: the ``tokenizer_path``
override; a path (absolute, or relative to one of ``search_dirs`` — the YAML's folder — or the working directory);
the local Hugging Face Hub cache (``snapshot_download(local_files_only=True)``). A folder counts when it holds the
tokenizer files, directly or in a ``tokenizer/`` subfolder (a diffusers pipeline folder).

OpenCLIP (``open_clip.tokenize``) is the CLIP BPE with its own padding (id 0) and cleaning (``ftfy.fix_text``,
``html.unescape`` twice, strip). Its vocabulary ships inside the open_clip wheel as ``bpe_simple_vocab_16e6.txt.gz``;
we build a stock ``CLIPTokenizer`` with ``pad_token="!"`` (id 0, as diffusers' SD2 folders do) from any local copy of
the CLIP BPE: ``tokenizer_path`` (a tokenizer folder or that ``.gz``), an installed open_clip package, a CLIP tokenizer
folder inside one of ``search_dirs``, or a known CLIP tokenizer in the Hub cache.
"""

from __future__ import annotations

import gzip
import html
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from functools import cache
from pathlib import Path

logger = logging.getLogger(__name__)

TOKENIZER_FLAG = "--tokenizer"
CLIP_FILES = ("vocab.json", "merges.txt")
BERT_FILES = ("vocab.txt",)
OPEN_CLIP_BPE = "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
CLIP_SOT, CLIP_EOT = "<|startoftext|>", "<|endoftext|>"
OPEN_CLIP_PAD = "!"  # id 0 in the CLIP BPE: open_clip.tokenize pads with zeros
OPEN_CLIP_CONTEXT = 77  # the SD2 fork calls open_clip.tokenize(text) with its default context_length

# Hub repos (and subfolder) whose tokenizer is the plain CLIP BPE: the OpenCLIP tokenizer can be built from any of them
KNOWN_CLIP_BPE_REPOS = (
    ("stabilityai/stable-diffusion-2-1", "tokenizer"),
    ("stabilityai/stable-diffusion-2", "tokenizer"),
    ("stabilityai/stable-diffusion-2-1-base", "tokenizer"),
    ("stabilityai/stable-diffusion-2-base", "tokenizer"),
    ("laion/CLIP-ViT-H-14-laion2B-s32B-b79k", ""),
    ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", ""),
    ("openai/clip-vit-large-patch14", ""),
    ("openai/clip-vit-base-patch32", ""),
)
# the BERTEmbedder's tokenizer: "bert-base-uncased" (the Hub renamed it google-bert/bert-base-uncased)
BERT_VERSION = "bert-base-uncased"
BERT_HUB_IDS = ("bert-base-uncased", "google-bert/bert-base-uncased")


class TokenizerNotFoundError(FileNotFoundError):
    """No local tokenizer files for a cond stage; the message says what was wanted, where we looked, and the flag."""


def _has_files(folder: Path, files: Sequence[str]) -> bool:
    return all((folder / name).is_file() for name in files)


def _tokenizer_dir(folder: Path, files: Sequence[str]) -> Path | None:
    """``folder`` or its ``tokenizer/`` subfolder, whichever holds ``files``."""
    for candidate in (folder, folder / "tokenizer"):
        if candidate.is_dir() and _has_files(candidate, files):
            return candidate
    return None


def _hub_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of ``repo_id``, without network; None when it is not cached (or not a repo id)."""
    if not repo_id or repo_id.count("/") > 1 or repo_id.startswith((".", "/", "~")):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (HFValidationError, FileNotFoundError, OSError, ValueError):
        return None


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def local_candidates(name: str, search_dirs: Iterable[Path]) -> list[Path]:
    """Where a ``version`` name is looked for as a folder: as given, under each search dir, under the working dir."""
    path = Path(os.path.expanduser(name))
    if path.is_absolute():
        return [path]
    return [Path(d) / path for d in search_dirs] + [Path.cwd() / path]


def find_pretrained_folder(name: str, search_dirs: Iterable[Path], files: Sequence[str]) -> Path | None:
    """The local folder (or cached Hub snapshot) that ``name`` names and that holds ``files``; None if none does.

    The folder returned is the one holding ``files`` (possibly ``<folder>/tokenizer``)."""
    if not name:
        return None
    for candidate in local_candidates(name, search_dirs):
        found = _tokenizer_dir(candidate, files)
        if found is not None:
            return found
    snapshot = _hub_snapshot(name)
    return _tokenizer_dir(snapshot, files) if snapshot is not None else None


def not_found(owner: str, wanted: str, name: str, search_dirs: Iterable[Path], files: Sequence[str]):
    """The one-line error for a missing tokenizer: what, where we looked, and the flag that supplies it."""
    where = ", ".join(str(p) for p in local_candidates(name, search_dirs)) if name else "no version given"
    return TokenizerNotFoundError(
        f"{owner}: no local tokenizer for {wanted} (looked for {'/'.join(files)} in: {where}; "
        f"and the Hugging Face cache {hub_cache_dir()}); pass {TOKENIZER_FLAG} PATH to a folder that holds them"
    )


def resolve_tokenizer_folder(
    owner: str, name: str, search_dirs: Iterable[Path], tokenizer_path, files: Sequence[str], hub_ids=()
) -> Path:
    """``tokenizer_path`` when given (it must hold ``files``), else the folder ``name`` or one of ``hub_ids`` names."""
    search_dirs = list(search_dirs)
    if tokenizer_path is not None:
        found = _tokenizer_dir(Path(tokenizer_path), files)
        if found is None:
            raise TokenizerNotFoundError(
                f"{owner}: {TOKENIZER_FLAG} {tokenizer_path}: expected a folder with {', '.join(files)}"
            )
        return found
    for candidate in (name, *hub_ids):
        found = find_pretrained_folder(candidate, search_dirs, files)
        if found is not None:
            return found
    raise not_found(owner, f"version {name!r}", name, search_dirs, files)


# --- the CLIP BPE as open_clip builds it -------------------------------------------------------------------------


@cache
def byte_unicode_table() -> tuple[str, ...]:
    """The 256 printable stand-ins of GPT-2/CLIP byte-level BPE, in vocabulary order (printable bytes first)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    return tuple([chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))])


def clip_bpe_from_open_clip_vocab(path: str | os.PathLike) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of open_clip's ``bpe_simple_vocab_16e6.txt.gz``, built as open_clip's SimpleTokenizer does:
    256 byte symbols, the same with ``</w>``, the first 48894 merges joined, then the start and end tokens."""
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : CLIP_VOCAB_SIZE - 2 * 256 - 2 + 1]]
    symbols = list(byte_unicode_table())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [CLIP_SOT, CLIP_EOT]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"{path}: expected the CLIP BPE ({CLIP_VOCAB_SIZE} tokens), built {len(vocab)}")
    return vocab, merges


def _is_clip_bpe_folder(folder: Path) -> bool:
    """A tokenizer folder whose vocab is the CLIP BPE (49408 tokens, start/end at 49406/49407)."""
    if not _has_files(folder, CLIP_FILES):
        return False
    try:
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return len(vocab) == CLIP_VOCAB_SIZE and vocab.get(CLIP_SOT) == 49406 and vocab.get(CLIP_EOT) == 49407


def _installed_open_clip_bpe() -> Path | None:
    """open_clip's vocabulary file when the package is installed (located without importing it)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / OPEN_CLIP_BPE
    return path if path.is_file() else None


def _open_clip_bpe_sources(search_dirs: Iterable[Path], tokenizer_path) -> Iterator[Path]:
    """Candidate CLIP BPE sources (tokenizer folders or .gz files), best first, looked at lazily."""
    if tokenizer_path is not None:
        path = Path(tokenizer_path)
        if path.is_dir() and (path / OPEN_CLIP_BPE).is_file():
            yield path / OPEN_CLIP_BPE
        elif path.is_file() and path.name.endswith(".gz"):
            yield path
        else:
            found = _tokenizer_dir(path, CLIP_FILES)
            if found is not None and _is_clip_bpe_folder(found):
                yield found
        return
    installed = _installed_open_clip_bpe()
    if installed is not None:
        yield installed
    for directory in map(Path, search_dirs):
        if (directory / OPEN_CLIP_BPE).is_file():
            yield directory / OPEN_CLIP_BPE
        if directory.is_dir():
            for sub in sorted(p for p in directory.iterdir() if p.is_dir()):
                found = _tokenizer_dir(sub, CLIP_FILES)
                if found is not None and _is_clip_bpe_folder(found):
                    yield found
    for repo_id, subfolder in KNOWN_CLIP_BPE_REPOS:
        snapshot = _hub_snapshot(repo_id)
        if snapshot is not None and _is_clip_bpe_folder(snapshot / subfolder):
            yield snapshot / subfolder


def open_clip_tokenizer(search_dirs: Iterable[Path], tokenizer_path=None, owner: str = "FrozenOpenCLIPEmbedder"):
    """A stock ``CLIPTokenizer`` that gives ``open_clip.tokenize``'s ids (with :func:`open_clip_clean` applied)."""
    from transformers import CLIPTokenizer

    search_dirs = list(search_dirs)
    source = next(_open_clip_bpe_sources(search_dirs, tokenizer_path), None)
    if source is None:
        where = f"{TOKENIZER_FLAG} {tokenizer_path}" if tokenizer_path is not None else (
            f"an installed open_clip, CLIP tokenizer folders in {', '.join(map(str, search_dirs)) or 'no search dir'}, "
            f"the Hugging Face cache {hub_cache_dir()} ({', '.join(r for r, _ in KNOWN_CLIP_BPE_REPOS[:2])}, …)"
        )  # fmt: skip
        raise TokenizerNotFoundError(
            f"{owner}: no local copy of the CLIP BPE vocabulary that open_clip uses (looked in: {where}); pass "
            f"{TOKENIZER_FLAG} PATH to a CLIP tokenizer folder (vocab.json, merges.txt) or to {OPEN_CLIP_BPE}"
        )
    logger.info("%s: CLIP BPE vocabulary from %s", owner, source)
    kwargs = dict(pad_token=OPEN_CLIP_PAD, model_max_length=OPEN_CLIP_CONTEXT)
    if source.is_file():
        vocab, merges = clip_bpe_from_open_clip_vocab(source)
        return CLIPTokenizer(vocab=vocab, merges=merges, **kwargs)
    return CLIPTokenizer.from_pretrained(source, **kwargs)


_warned_no_ftfy = False


def ftfy_fix(text: str) -> str:
    """``ftfy.fix_text`` when ftfy is installed: the original tokenizers ran it (open_clip needs it, so the SD2 env
    had it); it only changes mis-decoded or unusual text (mojibake, curly quotes, full-width forms)."""
    global _warned_no_ftfy
    try:
        import ftfy
    except ImportError:
        if not _warned_no_ftfy and not text.isascii():
            logger.warning(
                "ftfy is not installed: non-ASCII prompts may tokenize unlike the original (pip install ftfy)"
            )
            _warned_no_ftfy = True
        return text
    return ftfy.fix_text(text)


def open_clip_clean(text: str) -> str:
    """open_clip's ``basic_clean``: ``ftfy.fix_text``, ``html.unescape`` twice, strip. Whitespace folding and
    lower-casing are the CLIP tokenizer's own normalizer."""
    return html.unescape(html.unescape(ftfy_fix(text))).strip()


HF_SPECIALS_PATTERN = r"<\|startoftext\|>|<\|endoftext\|>"
OPEN_CLIP_SPECIALS_PATTERN = "<start_of_text>|<end_of_text>"


def _retarget_split(node) -> None:
    """Swap the special-token alternatives of the pre-tokenizer's Split regex for open_clip's, in place."""
    if isinstance(node, dict):
        pattern = node.get("pattern")
        if node.get("type") == "Split" and isinstance(pattern, dict) and "Regex" in pattern:
            pattern["Regex"] = pattern["Regex"].replace(HF_SPECIALS_PATTERN, OPEN_CLIP_SPECIALS_PATTERN)
        for value in node.values():
            _retarget_split(value)
    elif isinstance(node, list):
        for value in node:
            _retarget_split(value)


class OpenCLIPTokenize:
    """``open_clip.tokenize`` on a stock ``CLIPTokenizer``'s CLIP BPE: ``[sot] + bpe(clean(text)) + [eot]``, cut to
    the context with the last id set to eot, zero-padded.

    The BPE pipeline is the tokenizer's own (normalizer, regex split, byte-level BPE) with open_clip's special tokens:
    no pad token, so ``!`` (our pad token, id 0, as in diffusers' SD2 folders) stays an ordinary symbol that merges
    (``!!`` is one token, which the stock tokenizer would split); ``<start_of_text>`` / ``<end_of_text>`` in a prompt
    are the start/end ids, while ``<|startoftext|>`` / ``<|endoftext|>`` are plain text, as in open_clip."""

    SPECIALS = ("<start_of_text>", "<end_of_text>")

    def __init__(self, tokenizer, context_length: int = OPEN_CLIP_CONTEXT):
        from tokenizers import Tokenizer

        self.context_length = context_length
        self.sot, self.eot = tokenizer.convert_tokens_to_ids(CLIP_SOT), tokenizer.convert_tokens_to_ids(CLIP_EOT)
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
        spec["padding"] = spec["truncation"] = None
        spec["added_tokens"] = [dict(id=CLIP_VOCAB_SIZE + i, content=c, single_word=False, lstrip=False, rstrip=False,
                                     normalized=True, special=True) for i, c in enumerate(self.SPECIALS)]  # fmt: skip
        _retarget_split(spec.get("pre_tokenizer"))
        self.bpe = Tokenizer.from_str(json.dumps(spec))
        # the added specials get fresh ids: map them onto the vocabulary's start/end ids
        self.remap = {self.bpe.token_to_id(c): i for c, i in zip(self.SPECIALS, (self.sot, self.eot), strict=True)}

    def __call__(self, texts):
        import torch

        texts = [texts] if isinstance(texts, str) else list(texts)
        result = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            body = self.bpe.encode(open_clip_clean(text), add_special_tokens=False).ids
            ids = [self.sot, *(self.remap.get(i, i) for i in body), self.eot]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.eot
            result[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return result
