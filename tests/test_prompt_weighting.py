"""Prompt weighting (t2v.sampling.prompt_weighting) against the semantics of docs/sampling-tools.md."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from t2v.pipeline.options import load_config
from t2v.errors import UserError
from t2v.pipeline.text_to_video import TextToVideo
from t2v.sampling.prompt_weighting import (BREAK, apply_weights, chunk_tokens, empty_chunk,
                                  encode_weighted, parse_prompt_attention, prompt_chunks,
                                  weighted_tokens)
from t2v.cli.sample import main
from t2v.models.tokenizer import Tokenizer

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
UP, DOWN = 1.1, 1 / 1.1
FLOAT32_TOL = 1e-5  # apply_weights computes in float32; the reference in float64


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


@pytest.fixture(scope="module")
def pipe():
    return TextToVideo.from_config(load_config(TINY).model, seed=0)


def ids(tokenizer, text):
    return tokenizer.encode(text)


# -- the parser ----------------------------------------------------------------------------

# The examples of stable-diffusion-webui's parse_prompt_attention docstring, verbatim.
A1111_EXAMPLES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
      ("hill", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize("prompt, expected", A1111_EXAMPLES)
def test_parser_reproduces_a1111_examples_exactly(prompt, expected):
    assert parse_prompt_attention(prompt) == expected  # floats compared exactly


@pytest.mark.parametrize("prompt, expected", [
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
    ("[a]", [("a", DOWN)]),
    ("[[a]]", [("a", 1.0 * DOWN * DOWN)]),
    ("((a))", [("a", 1.0 * UP * UP)]),
    ("(a:1.3)", [("a", 1.3)]),
    ("(a:0)", [("a", 0.0)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a:.5)", [("a", 0.5)]),
    ("((a:2):3)", [("a", 6.0)]),
    ("((a):0.5) b", [("a", 1.0 * UP * 0.5), (" b", 1.0)]),  # innermost factor first
    ("(a [b] c)", [("a ", UP), ("b", 1.0 * DOWN * UP), (" c", UP)]),
    ("[(a) b]", [("a", 1.0 * UP * DOWN), (" b", DOWN)]),
    ("[a", [("a", DOWN)]),  # open at the end: closed there
    ("([a", [("a", 1.0 * UP * DOWN)]),  # open "(" applied before open "["
    ("[(a", [("a", 1.0 * UP * DOWN)]),
    ("a) b]", [("a) b]", 1.0)]),  # nothing open: text
    ("x:1.3) y", [("x:1.3) y", 1.0)]),  # ":w)" with no "(" open: text
    ("a: b", [("a: b", 1.0)]),
    ("\\(a\\)", [("(a)", 1.0)]),
    ("(\\(a\\))", [("(a)", UP)]),
    ("\\[a\\]", [("[a]", 1.0)]),
    ("a\\\\b", [("a\\b", 1.0)]),  # \\ is one backslash
    ("a\\b", [("ab", 1.0)]),  # a lone backslash vanishes
    ("a (b) (c) d", [("a ", 1.0), ("b", UP), (" ", 1.0), ("c", UP), (" d", 1.0)]),
    ("(a)(b:1.1)", [("ab", 1.1)]),  # equal neighbours merge
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), BREAK, ("", 1.0), BREAK, ("b", 1.0)]),
    ("(a BREAK b)", [("a", UP), BREAK, ("b", UP)]),
    ("aBREAKb a break b", [("aBREAKb a break b", 1.0)]),  # a word of its own, upper case
])
def test_parser_semantics(prompt, expected):
    assert parse_prompt_attention(prompt) == expected


# Current A1111 (re_attention's `:\s*([+-]?[.\d]+)\s*\)`): blanks may stand around the number.
@pytest.mark.parametrize("prompt, expected", [
    ("(glowing lanterns: 1.4)", [("glowing lanterns", 1.4)]),
    ("(river:1.2 )", [("river", 1.2)]),
    ("(a: 1.3)", [("a", 1.3)]),
    ("(a : 1.3 ) b", [("a ", 1.3), (" b", 1.0)]),  # a blank before the colon is text
    ("(a:\t1.3\n)", [("a", 1.3)]),  # any whitespace
    ("(a:  -.5  )", [("a", -0.5)]),
    ("((a: 2) :3 )", [("a", 6.0), (" ", 3.0)]),
    ("a (((house: 1.3 )) [on] a (hill : 0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1),
      ("hill ", 0.55), (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("(a: 1.3 x)", [("a: 1.3 x", UP)]),  # not a number then ")": text, and "(" closes at 1.1
    ("(a: x 1.3)", [("a: x 1.3", UP)]),
    ("x: 1.3 ) y", [("x: 1.3 ) y", 1.0)]),  # no "(" open: text
])
def test_parser_allows_blanks_around_the_weight(prompt, expected):
    assert parse_prompt_attention(prompt) == expected


@pytest.mark.parametrize("prompt", ["(a:1.2.3)", "(a:.)", "(a:1..)", "[(a:-.)]",
                                    "(a: 1.2.3 )"])
def test_parser_refuses_weights_that_are_no_number(prompt):
    with pytest.raises(UserError, match="no number as its weight") as info:
        parse_prompt_attention(prompt)
    assert "\n" not in str(info.value)


# -- tokens, chunks ------------------------------------------------------------------------

def test_every_token_carries_its_pieces_weight(tokenizer):
    runs = weighted_tokens(tokenizer, parse_prompt_attention("a (red:1.5) [ball], a (big) cat"))
    expected = ([(i, 1.0) for i in ids(tokenizer, "a")]
                + [(i, 1.5) for i in ids(tokenizer, "red")]
                + [(i, DOWN) for i in ids(tokenizer, "ball")]
                + [(i, 1.0) for i in ids(tokenizer, ", a")]
                + [(i, UP) for i in ids(tokenizer, "big")]
                + [(i, 1.0) for i in ids(tokenizer, "cat")])
    assert runs == [expected]
    (chunk_ids, chunk_weights), = prompt_chunks(tokenizer, "a (red:1.5) [ball], a (big) cat")
    n = len(expected)
    assert len(chunk_ids) == len(chunk_weights) == 77
    assert chunk_ids == [tokenizer.start_id] + [i for i, _ in expected] + [tokenizer.end_id] \
        + [0] * (75 - n)
    assert chunk_weights == [1.0] + [w for _, w in expected] + [1.0] * (76 - n)


def test_pieces_are_encoded_on_their_own(tokenizer):
    """'(red)ball' is the words 'red' and 'ball', not 'redball' (A1111 encodes per piece)."""
    runs = weighted_tokens(tokenizer, parse_prompt_attention("(red)ball"))
    assert [i for i, _ in runs[0]] == ids(tokenizer, "red") + ids(tokenizer, "ball")
    assert ids(tokenizer, "red") + ids(tokenizer, "ball") != ids(tokenizer, "redball")


@pytest.mark.parametrize("prompt", ["a red ball", "", "an astronaut riding a horse, 4k",
                                    "Ünïcode &amp; HTML"])
def test_prompt_without_syntax_gives_the_tokenizers_ids(tokenizer, prompt):
    (chunk_ids, chunk_weights), = prompt_chunks(tokenizer, prompt)
    assert chunk_ids == tokenizer(prompt)[0].tolist() and set(chunk_weights) == {1.0}


def test_empty_chunk_is_the_empty_prompt(tokenizer):
    chunk_ids, chunk_weights = empty_chunk(tokenizer)
    assert chunk_ids == [tokenizer.start_id, tokenizer.end_id] + [0] * 75
    assert chunk_ids == tokenizer("")[0].tolist() and chunk_weights == [1.0] * 77


def run_of(tokens, weight=1.0):
    return [(t, weight) for t in tokens]


def test_long_prompts_split_into_75_token_chunks_with_bos_and_eos(tokenizer):
    cat = ids(tokenizer, "cat")
    assert len(cat) == 1
    chunks = prompt_chunks(tokenizer, " ".join(["cat"] * 160))
    assert len(chunks) == 3
    for k, (chunk_ids, chunk_weights) in enumerate(chunks):
        real = min(75, 160 - 75 * k)
        assert len(chunk_ids) == len(chunk_weights) == 77
        assert chunk_ids[0] == tokenizer.start_id and chunk_ids[real + 1] == tokenizer.end_id
        assert chunk_ids[1:real + 1] == cat * real and chunk_ids[real + 2:] == [0] * (75 - real)


def test_chunks_split_after_a_comma_within_20_tokens(tokenizer):
    comma, = ids(tokenizer, ",")
    A, B = 1000, 2000  # any ids that are not the comma
    special = dict(start_id=1, end_id=2, pad_id=0, comma_id=comma, length=75)

    # 70 tokens, comma, 10 tokens: the 76th token finds the comma 5 tokens from the end.
    chunks = chunk_tokens([run_of([A] * 70 + [comma] + [B] * 10)], **special)
    assert chunks[0][0] == [1] + [A] * 70 + [comma] + [2] + [0] * 4
    assert chunks[1][0] == [1] + [B] * 10 + [2] + [0] * 65

    # The comma 21 tokens from the end: too far, the chunk is cut at 75 tokens.
    chunks = chunk_tokens([run_of([A] * 54 + [comma] + [B] * 30)], **special)
    assert chunks[0][0] == [1] + [A] * 54 + [comma] + [B] * 20 + [2]
    assert chunks[1][0] == [1] + [B] * 10 + [2] + [0] * 65

    # Exactly 20: split. Backtracking off (0): never.
    chunks = chunk_tokens([run_of([A] * 55 + [comma] + [B] * 30)], **special)
    assert chunks[0][0][:58] == [1] + [A] * 55 + [comma] + [2]
    off = chunk_tokens([run_of([A] * 70 + [comma] + [B] * 10)], **special, comma_backtrack=0)
    assert off[0][0] == [1] + [A] * 70 + [comma] + [B] * 4 + [2]

    # A comma arriving when the chunk is full starts the next chunk.
    chunks = chunk_tokens([run_of([A] * 75 + [comma] + [B])], **special)
    assert chunks[0][0] == [1] + [A] * 75 + [2] and chunks[1][0][:4] == [1, comma, B, 2]


def test_moved_tokens_keep_their_weights(tokenizer):
    comma, = ids(tokenizer, ",")
    run = run_of([5] * 70 + [comma]) + run_of([7] * 10, 1.3)
    chunks = chunk_tokens([run], 1, 2, 0, comma)
    assert chunks[1][1][:12] == [1.0] + [1.3] * 10 + [1.0]


def test_break_starts_a_new_chunk(tokenizer):
    chunks = prompt_chunks(tokenizer, "a red ball BREAK (blue:1.2) sky")
    assert len(chunks) == 2
    assert chunks[0][0] == tokenizer("a red ball")[0].tolist()
    assert chunks[1][0][:4] == [tokenizer.start_id, *ids(tokenizer, "blue sky"),
                                tokenizer.end_id]
    assert chunks[1][1][:4] == [1.0, 1.2, 1.0, 1.0]
    assert len(prompt_chunks(tokenizer, "BREAK a")) == 2  # an empty first chunk, as A1111


# -- applying the weights ------------------------------------------------------------------

def test_mean_restoration_formula():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 77, 8, generator=g) + 0.3
    weights = 1 + 0.5 * torch.rand(3, 77, generator=g)
    weights[1] = 1.0  # a row without weights stays exactly as it is
    out = apply_weights(z, weights)
    for b in range(3):
        zb, wb = z[b].double(), weights[b].double()
        scaled = zb * wb[:, None]
        expected = scaled * (zb.mean() / scaled.mean())
        torch.testing.assert_close(out[b].double(), expected, rtol=FLOAT32_TOL, atol=FLOAT32_TOL)
        assert abs(out[b].double().mean() - zb.mean()) < FLOAT32_TOL  # the mean is restored
    assert torch.equal(out[1], z[1])
    assert not torch.allclose(out[0], z[0] * weights[0][:, None])  # the restoration acts


def test_zero_mean_chunks_are_weighted_without_restoration(pipe):
    """Behind a LayerNorm with zero bias every token's output has mean 0, so the chunk's mean
    is rounding noise; the restoration (a ratio of two such noises) is skipped."""
    z = torch.nn.functional.layer_norm(torch.randn(2, 77, 16), (16,))
    weights = torch.ones(2, 77)
    weights[:, 3] = 1.5
    assert torch.equal(apply_weights(z, weights), z * weights[:, :, None])
    # The tiny model's random text encoder is such an encoder (as the demo model's is).
    assert torch.equal(pipe.text_encoder.final_layer_norm.bias, torch.zeros(32))
    (chunk_ids, chunk_weights), = prompt_chunks(pipe.tokenizer, "a blue (circle:1.2)")
    z = pipe.encode_prompt(["a blue (circle:1.2)"], weighted=True)
    alone = pipe.text_encoder(torch.tensor([chunk_ids]))
    assert torch.equal(z, alone * torch.tensor(chunk_weights)[None, :, None])
    # Off zero, the restoration acts.
    weighted = apply_weights(z + 0.5, torch.tensor([chunk_weights]))
    assert not torch.equal(weighted, (z + 0.5) * torch.tensor(chunk_weights)[None, :, None])


def test_all_ones_is_the_identity_bit_for_bit():
    z = torch.randn(2, 77, 8, dtype=torch.float16)
    assert apply_weights(z, torch.ones(2, 77)) is z


def test_no_syntax_gives_exactly_the_unweighted_embeddings(pipe):
    prompts = ["a red ball", "an astronaut riding a horse, 4k", ""]
    assert torch.equal(pipe.encode_prompt(prompts, weighted=True), pipe.encode_prompt(prompts))
    kwargs = dict(num_frames=2, height=32, width=32, steps=2, seed=3, output="latents",
                  progress=False, negative_prompt="blurry")
    plain = pipe("a red ball", **kwargs).frames
    assert torch.equal(pipe("a red ball", prompt_weighting=True, **kwargs).frames, plain)
    assert not torch.equal(pipe("a (red:1.5) ball", prompt_weighting=True, **kwargs).frames,
                           plain)
    assert torch.equal(pipe("a (red:1.5) ball", **kwargs).frames,  # off: the literal text
                       pipe("a (red:1.5) ball", prompt_weighting=False, **kwargs).frames)


def test_each_chunk_is_encoded_and_weighted_on_its_own(pipe, tokenizer):
    prompt = ", ".join(["a (red:1.4) ball"] * 25) + ", [blue] sky"
    chunks = prompt_chunks(tokenizer, prompt)
    assert len(chunks) >= 2
    z = pipe.encode_prompt([prompt], weighted=True)
    assert z.shape == (1, 77 * len(chunks), 32)
    for k, (chunk_ids, chunk_weights) in enumerate(chunks):
        alone = pipe.text_encoder(torch.tensor([chunk_ids]))
        expected = apply_weights(alone, torch.tensor([chunk_weights]))
        assert torch.equal(z[:, 77 * k:77 * (k + 1)], expected)


def test_shorter_prompts_of_a_batch_repeat_their_last_vector(pipe, tokenizer):
    """A1111's stack_conds: a prompt with fewer chunks than the batch's longest continues with
    its own last (weighted) token vector, repeated; not with empty chunks."""
    long = " ".join(["cat"] * 100)  # 2 chunks
    prompts = ["a dog", long, "a (red:1.3) [cat]"]
    batch = encode_weighted(pipe.text_encoder, tokenizer, prompts)
    assert batch.shape == (3, 154, 32)
    for b in (0, 2):
        assert torch.equal(batch[b, 77:], batch[b, 76:77].expand(77, -1))
        alone = encode_weighted(pipe.text_encoder, tokenizer, [prompts[b]])
        torch.testing.assert_close(batch[b, :77], alone[0], rtol=FLOAT32_TOL, atol=FLOAT32_TOL)
    torch.testing.assert_close(batch[1], encode_weighted(pipe.text_encoder, tokenizer, [long])[0],
                               rtol=FLOAT32_TOL, atol=FLOAT32_TOL)


def test_min_chunks_appends_the_empty_prompt(pipe, tokenizer):
    """A1111's pad_cond_uncond: past the batch's longest prompt, the encoding of "" (one
    encoder call, repeated), for every prompt of the batch."""
    long = " ".join(["cat"] * 100)
    empty = pipe.text_encoder(torch.tensor([empty_chunk(tokenizer)[0]]))
    batch = encode_weighted(pipe.text_encoder, tokenizer, ["a dog", long], min_chunks=3)
    assert batch.shape == (2, 231, 32)
    assert torch.equal(batch[:, 154:], empty.expand(2, -1, -1))
    assert torch.equal(batch[0, 77:154], batch[0, 76:77].expand(77, -1))
    assert encode_weighted(pipe.text_encoder, tokenizer, [], min_chunks=2).shape == (0, 154, 32)


def test_prompts_and_negatives_are_padded_with_empty_chunks(pipe, tokenizer):
    long = " ".join(["cat"] * 100)
    empty = pipe.text_encoder(torch.tensor([empty_chunk(tokenizer)[0]]))
    context = pipe.prompt_context(["a dog"], long, 9.0, prompt_weighting=True)
    negative, positive = context.chunk(2)
    assert context.shape == (2, 154, 32)
    assert torch.equal(positive[:, :77], pipe.encode_prompt(["a dog"]))
    assert torch.equal(positive[:, 77:], empty)
    # Two prompts of 1 and 2 chunks, a short negative: the short prompt repeats its last
    # vector, the negatives (shorter than the longest prompt) get the empty prompt.
    context = pipe.prompt_context(["a dog", long], "blurry", 9.0, prompt_weighting=True)
    negative, positive = context.chunk(2)
    assert context.shape == (4, 154, 32)
    assert torch.equal(positive[0, 77:], positive[0, 76:77].expand(77, -1))
    assert torch.equal(negative[:, 77:], empty.expand(2, -1, -1))
    # And through the pipeline: a long negative prompt with a short prompt.
    frames = pipe("a dog", long, num_frames=2, height=32, width=32, steps=1, seed=0,
                  prompt_weighting=True, output="latents", progress=False).frames
    assert torch.isfinite(frames).all()


# -- the CLI -------------------------------------------------------------------------------

def read_pngs(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB"))
                     for p in sorted(folder.glob("*.png"))])


def test_cli_flag_end_to_end(tmp_path, capsys):
    prompt = "a (red:1.5) ball, [dark] background"
    out = tmp_path / "weighted"
    assert main(["--config", str(TINY), "--prompt", prompt, "--prompt-weighting", "--seed",
                 "3", "--format", "png", "--out", str(out), "--no-progress"]) == 0
    written = Path(capsys.readouterr().out.strip())
    s = load_config(TINY).sample
    pipe = TextToVideo.from_config(load_config(TINY).model, seed=0)
    kwargs = dict(num_frames=s.num_frames, height=s.height, width=s.width, steps=s.steps,
                  seed=3, progress=False)
    expected = pipe(prompt, prompt_weighting=True, **kwargs).frames[0].numpy()
    assert np.array_equal(read_pngs(written), expected)
    assert not np.array_equal(expected, pipe(prompt, **kwargs).frames[0].numpy())
    sidecar = json.loads(written.with_name(written.name + ".json").read_text())
    assert sidecar["config"]["sample"]["prompt_weighting"] is True
    # Default off; the config key does the same as the flag.
    assert load_config(TINY).sample.prompt_weighting is False
    assert load_config(TINY, ["sample.prompt_weighting=true"]).sample.prompt_weighting is True


def test_cli_bad_weight_is_one_line(tmp_path, capsys):
    code = main(["--config", str(TINY), "--prompt", "a (red:1.2.3) ball", "--prompt-weighting",
                 "--out", str(tmp_path / "v.mp4"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "no number as its weight" in errors[0]
