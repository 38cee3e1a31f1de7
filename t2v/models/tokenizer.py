"""OpenCLIP's byte-level BPE tokenizer, reimplemented so that ids match `open_clip.tokenize`.

Sequence layout: [49406 <start_of_text>] + BPE ids + [49407 <end_of_text>], zero-padded to the
context length (77). A longer prompt is cut to 77 ids whose last one is forced to the end token.
Text is cleaned as open_clip's default "lower" cleaner does: ftfy.fix_text, html.unescape twice,
whitespace collapsed, lower case. The BPE merges are read from the file open_clip_torch ships
(the package itself is not imported). Reference: open_clip/src/open_clip/tokenizer.py.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import logging
from functools import lru_cache
from pathlib import Path

import ftfy
import regex
import torch

log = logging.getLogger(__name__)

START_OF_TEXT = "<start_of_text>"
END_OF_TEXT = "<end_of_text>"
# Words: contractions | letters | one digit | other non-space symbols, case-insensitive.
WORD_PATTERN = regex.compile(
    START_OF_TEXT + "|" + END_OF_TEXT
    + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
NUM_MERGES = 49152 - 256 - 2  # merges the CLIP vocabulary uses (the file holds more)


def default_bpe_path() -> Path:
    """The BPE file inside the installed open_clip_torch package."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip_torch is not installed; it ships the BPE vocabulary")
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


@lru_cache()
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def clean_text(text: str) -> str:
    """open_clip's 'lower' cleaning: fix unicode, unescape HTML twice, collapse spaces, lower."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


WORD_CACHE_SIZE = 100_000  # BPE results kept per tokenizer (open_clip keeps every word)


class Tokenizer:
    """Prompts -> LongTensor (B, context_length) of CLIP BPE ids."""

    def __init__(self, bpe_path: str | Path | None = None, context_length: int = 77):
        with gzip.open(bpe_path or default_bpe_path()) as f:
            lines = f.read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
        symbols = list(byte_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += [START_OF_TEXT, END_OF_TEXT]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.merges = merges
        self.merge_rank = {pair: i for i, pair in enumerate(merges)}
        self.start_id = self.encoder[START_OF_TEXT]  # 49406
        self.end_id = self.encoder[END_OF_TEXT]  # 49407
        self.pad_id = 0  # open_clip pads with zeros ("!"), not with the end token
        self.context_length = context_length
        self.vocab_size = len(vocab)
        self._cache = {START_OF_TEXT: [START_OF_TEXT], END_OF_TEXT: [END_OF_TEXT]}

    def _bpe(self, word: str) -> list[str]:
        """Merge the characters of one word (bytes mapped to unicode) into BPE tokens."""
        if word in self._cache:
            return self._cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = set(zip(parts, parts[1:]))
            best = min(pairs, key=lambda p: self.merge_rank.get(p, float("inf")))
            if best not in self.merge_rank:
                break
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of `best`, left to right
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        if len(self._cache) < WORD_CACHE_SIZE:  # bounded: a long-running server sees many words
            self._cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """BPE ids of one prompt, without start/end tokens."""
        to_unicode = byte_to_unicode()
        ids = []
        for word in WORD_PATTERN.findall(clean_text(text)):
            mapped = "".join(to_unicode[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self._bpe(mapped))
        return ids

    def truncation(self, prompt: str) -> str | None:
        """The warning for a prompt longer than the context (None if it fits): what the model
        reads of it and what it drops."""
        length = len(self.encode(prompt)) + 2  # start and end tokens
        if length <= self.context_length:
            return None
        return (f"the prompt is {length} tokens long; the model reads {self.context_length}, so "
                f"the last {length - self.context_length} tokens are dropped")

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        out = torch.full((len(prompts), self.context_length), self.pad_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids = [self.start_id] + self.encode(prompt) + [self.end_id]
            if len(ids) > self.context_length:
                log.warning("warning: prompt %d: %s", row, self.truncation(prompt))
                ids = ids[: self.context_length]
                ids[-1] = self.end_id
            out[row, : len(ids)] = torch.tensor(ids)
        return out
