"""Prompt weighting in AUTOMATIC1111's syntax, and prompts longer than the text context.

    (word)          weight x 1.1          [word]        weight / 1.1
    (word:1.3)      weight x 1.3          nesting       the factors multiply
    \\( \\) \\[ \\] \\\\  the literal character   BREAK         start a new chunk here

How a prompt becomes text embeddings (stable-diffusion-webui's prompt_parser and
sd_hijack_clip, "Original" emphasis; docs/sampling-tools.md has the full semantics):

    pieces  = parse_prompt_attention(prompt)            [(text, weight), ...]
    tokens  = weighted_tokens(tokenizer, pieces)        every piece BPE-encoded on its own;
                                                        each token carries its piece's weight
    chunks  = chunk_tokens(tokens, ...)                 75 tokens per chunk (the context minus
                                                        BOS and EOS), split after the last comma
                                                        when it lies within 20 tokens of the end
    z_i     = TextEncoder([BOS] + chunk_i + [EOS] + pads)   one encoder call per chunk
    z_i     = apply_weights(z_i, w_i)                   z * w, then the mean restored
    context = concat(z_1, ..., z_n) along the tokens    (B, 77 n, D)

A prompt with fewer chunks than the longest of its batch continues with its last token
vector, repeated (A1111's prompt_parser.stack_conds); in the pipeline, the shorter of the
prompts and the negative prompts then gets empty chunks, the encoding of [BOS, EOS, pad...]
without weights (A1111's pad_cond_uncond option).
"""

from __future__ import annotations

import re

import torch

from t2v.errors import UserError

EMPHASIS = 1.1  # (word) multiplies by this, [word] divides by it
COMMA_BACKTRACK = 20  # a full chunk is split after its last comma if that is this close
# The mean restoration is skipped when a chunk's mean is below this share of its mean |value|:
# float rounding is ~1e-7 of it, a LayerNorm bias of mean 0.01 against values of ~1 is 1e-2.
MEAN_TOLERANCE = 1e-4
BREAK = ("BREAK", None)  # the piece parse_prompt_attention returns for the keyword BREAK

# One syntax element per match, in this order of preference (as A1111's re_attention):
PROMPT_SYNTAX = re.compile(r"""
      (?P<escape>\\[()\[\]\\]?)         # \( \) \[ \] \\: the character; a lone \ vanishes
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)  # ":1.3)", ": 1.3 )": the innermost "(" closes at 1.3
    | (?P<close>[)\]])
    | [^\\()\[\]:]+ | :                 # plain text
""", re.VERBOSE)
BREAK_KEYWORD = re.compile(r"\s*\bBREAK\b\s*", re.S)

Piece = tuple[str, float | None]  # (text, weight); weight None only for BREAK
Chunk = tuple[list[int], list[float]]  # (ids, weights), context_length of each


def parse_prompt_attention(prompt: str) -> list[Piece]:
    """Split a prompt into (text, weight) pieces, as stable-diffusion-webui's
    `parse_prompt_attention`: a closing ")" multiplies every piece since its "(" by 1.1,
    ":w)" by w, "]" by 1 / 1.1 (innermost bracket first); brackets left open at the end
    apply as if closed there (all "(" first, then all "["); a ")" or "]" with nothing open
    is text, and so is ":w)" with no "(" open. Blanks (any whitespace) may stand between the
    colon, the number and the ")": "(a: 1.3 )" is "a" at 1.3. Neighbouring pieces of equal
    weight merge; an empty prompt is [("", 1.0)]. The word BREAK (with the spaces around it)
    becomes the BREAK piece; unlike A1111, brackets around it do not turn it into text."""
    pieces: list[list] = []  # [text, weight], weights scaled in place as brackets close
    open_round: list[int] = []  # where each open bracket's pieces begin
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[1] is not None:
                piece[1] *= factor

    for match in PROMPT_SYNTAX.finditer(prompt):
        token, weight = match.group(0), match.group("weight")
        if match.group("escape") is not None:
            pieces.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(pieces))
        elif token == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            scale(open_round.pop(), parse_weight(weight, token))
        elif token == ")" and open_round:
            scale(open_round.pop(), EMPHASIS)
        elif token == "]" and open_square:
            scale(open_square.pop(), 1 / EMPHASIS)
        else:
            for i, part in enumerate(BREAK_KEYWORD.split(token)):
                if i > 0:
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])
    for start in open_round:
        scale(start, EMPHASIS)
    for start in open_square:
        scale(start, 1 / EMPHASIS)
    if not pieces:
        pieces = [["", 1.0]]
    merged: list[list] = []
    for piece in pieces:
        if merged and piece[1] is not None and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(text, weight) for text, weight in merged]


def parse_weight(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UserError(f"prompt weighting: {where!r} has no number as its weight; write e.g. "
                        "(word:1.3)") from None


def weighted_tokens(tokenizer, pieces: list[Piece]) -> list[list[tuple[int, float]]]:
    """BPE ids with their weights: each piece encoded on its own (so "(red)ball" is two
    words), every id with its piece's weight. The result is one run of (id, weight) per
    BREAK-separated part of the prompt (one run when there is no BREAK)."""
    runs: list[list[tuple[int, float]]] = [[]]
    for text, weight in pieces:
        if weight is None:
            runs.append([])
        else:
            runs[-1].extend((token, weight) for token in tokenizer.encode(text))
    return runs


def chunk_tokens(runs: list[list[tuple[int, float]]], start_id: int, end_id: int, pad_id: int,
                 comma_id: int, length: int = 75, comma_backtrack: int = COMMA_BACKTRACK
                 ) -> list[Chunk]:
    """Cut weighted ids into chunks of `length` tokens, as sd_hijack_clip's tokenize_line:
    when a chunk is full and the next token is not a comma, the tokens after the chunk's last
    comma move to the next chunk if that comma is at most `comma_backtrack` tokens from the
    end (0: never); every run (BREAK) starts a new chunk. Each chunk becomes
    [start] + ids + [end] + [pad] * (length - len(ids)) with weights 1.0 on the added
    tokens. At least one chunk; an empty prompt gives the empty chunk."""
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close(ids: list[int], weights: list[float]) -> None:
        pad = length - len(ids)
        chunks.append(([start_id] + ids + [end_id] + [pad_id] * pad,
                       [1.0] + weights + [1.0] + [1.0] * pad))

    for n, run in enumerate(runs):
        if n > 0:  # BREAK: close the chunk, even an empty one
            close(ids, weights)
            ids, weights, last_comma = [], [], -1
        for token, weight in run:
            if token == comma_id:
                last_comma = len(ids)
            elif (comma_backtrack and len(ids) == length and last_comma != -1
                  and len(ids) - last_comma <= comma_backtrack):
                cut = last_comma + 1
                close(ids[:cut], weights[:cut])
                ids, weights, last_comma = ids[cut:], weights[cut:], -1
            if len(ids) == length:
                close(ids, weights)
                ids, weights, last_comma = [], [], -1
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        close(ids, weights)
    return chunks


def prompt_chunks(tokenizer, prompt: str) -> list[Chunk]:
    """A prompt's chunks (ids and weights, `tokenizer.context_length` each)."""
    return chunk_tokens(weighted_tokens(tokenizer, parse_prompt_attention(prompt)),
                        tokenizer.start_id, tokenizer.end_id, tokenizer.pad_id,
                        tokenizer.encoder[",</w>"], tokenizer.context_length - 2)


def empty_chunk(tokenizer) -> Chunk:
    """[BOS, EOS, pad, ...] with weights 1: what shorter prompts are padded with."""
    return chunk_tokens([[]], tokenizer.start_id, tokenizer.end_id, tokenizer.pad_id,
                        tokenizer.encoder[",</w>"], tokenizer.context_length - 2)[0]


def apply_weights(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis on one chunk per row: z (B, L, D), weights (B, L).
    Per row b (one prompt's chunk), in float32:

        m = mean(z_b);  z_b = z_b * weights_b[:, None];  z_b = z_b * (m / mean(z_b))

    the means over all L x D values, BOS, EOS and padding included. Rows whose weights are
    all 1 are returned unchanged (bit for bit). A1111 takes the mean over the whole batch it
    encodes together (one prompt's texts) and in the encoder's dtype.

    One deviation: when either mean is within MEAN_TOLERANCE x mean(|z_b|) of zero, the mean
    is float rounding, not signal, and the ratio an arbitrary number (it flips the sign of
    the whole chunk at -1, or is infinite), so that row is left at z_b * weights_b. This
    happens when every token's output has mean 0, as behind a final LayerNorm with zero bias
    (the demo model's random text encoder)."""
    plain = (weights == 1).all(dim=1)
    if bool(plain.all()):
        return z
    zf = z.float()
    weighted = zf * weights.to(zf)[:, :, None]
    original_mean = zf.mean(dim=(1, 2), keepdim=True)
    weighted_mean = weighted.mean(dim=(1, 2), keepdim=True)
    meaningful = ((original_mean.abs() > MEAN_TOLERANCE * zf.abs().mean(dim=(1, 2), keepdim=True))
                  & (weighted_mean.abs()
                     > MEAN_TOLERANCE * weighted.abs().mean(dim=(1, 2), keepdim=True)))
    restored = torch.where(meaningful, weighted * (original_mean / weighted_mean), weighted)
    return torch.where(plain[:, None, None], z, restored.to(z.dtype))


def count_chunks(tokenizer, prompts: list[str]) -> int:
    """The most chunks any of the prompts needs (1 for no prompts)."""
    return max([1] + [len(prompt_chunks(tokenizer, prompt)) for prompt in prompts])


@torch.no_grad()
def encode_weighted(text_encoder, tokenizer, prompts: list[str], min_chunks: int = 1
                    ) -> torch.Tensor:
    """Weighted prompts -> (B, context_length x n, D) embeddings, n = the most chunks any
    prompt needs, at least `min_chunks`. As A1111 batches prompts of different lengths
    (prompt_parser.stack_conds): a prompt with fewer chunks than the batch's longest is
    padded with its own last token vector (the weighted encoder output at its last
    position), repeated. Chunks past the batch's longest, up to `min_chunks`, are the empty
    prompt's encoding (A1111's pad_cond_uncond: how prompts and negative prompts are brought
    to one length). The text encoder runs once per chunk index, on the prompts that have a
    chunk there."""
    chunked = [prompt_chunks(tokenizer, prompt) for prompt in prompts]
    device = next(text_encoder.parameters()).device
    if not prompts:  # as the unweighted encoder: (0, L, D)
        return encode_empty(text_encoder, tokenizer)[:0].repeat(1, min_chunks, 1)
    encoded: list[list[torch.Tensor]] = [[] for _ in prompts]
    for i in range(max(len(chunks) for chunks in chunked)):
        rows = [b for b, chunks in enumerate(chunked) if i < len(chunks)]
        ids = torch.tensor([chunked[b][i][0] for b in rows], device=device)
        weights = torch.tensor([chunked[b][i][1] for b in rows], dtype=torch.float32,
                               device=device)
        for b, z in zip(rows, apply_weights(text_encoder(ids), weights)):
            encoded[b].append(z)
    longest = max(len(chunks) for chunks in chunked)
    context = torch.stack([pad_with_last_vector(torch.cat(z), longest * tokenizer.context_length)
                           for z in encoded])
    if min_chunks <= longest:
        return context
    empty = encode_empty(text_encoder, tokenizer).to(context)
    return torch.cat([context, empty.repeat(len(prompts), min_chunks - longest, 1)], dim=1)


def encode_empty(text_encoder, tokenizer) -> torch.Tensor:
    """The empty prompt's encoding (1, context_length, D), without weights."""
    device = next(text_encoder.parameters()).device
    return text_encoder(torch.tensor([empty_chunk(tokenizer)[0]], device=device))


def pad_with_last_vector(z: torch.Tensor, length: int) -> torch.Tensor:
    """(L, D) -> (length, D): z, then its last row repeated (A1111's stack_conds)."""
    return torch.cat([z, z[-1:].expand(length - z.shape[0], -1)])
