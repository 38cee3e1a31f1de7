import logging

import open_clip
import pytest
import torch

from t2v.models.tokenizer import Tokenizer

PROMPTS = [
    "An astronaut riding a horse on the moon",
    "a panda eating bamboo, 4k, high quality!!!",
    "Numbers 1234567890 and 3.14159 and 1st, 2nd, 3rd",
    "don't, can't, we'll, they've, I'm, she'd, it's",
    "Punctuation: (brackets) [square] {curly} <angle> @#$%^&*~`|\\/ ... ?!",
    "Café crème brûlée, naïve façade, Zürich, São Paulo, Ångström",
    "“Curly quotes” and ‘single’ ones — with dashes – too",
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &amp;amp; double-escaped",
    "ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ １２３",
    "emoji 🎉🚀 and 🐱‍👤 zero-width joiners",
    "日本語のテキスト、中文文本, 한국어 텍스트, русский текст, ελληνικά",
    "mojibake: CafÃ© and â€œquotesâ€\x9d",
    "   leading and trailing   whitespace\t\nand\nnewlines   ",
    "",
    "   ",
    "UPPER lower MiXeD",
    "a " * 80,
    " ".join(f"word{i}" for i in range(200)),
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


def test_ids_equal_open_clip(tokenizer):
    ours = tokenizer(PROMPTS)
    reference = open_clip.tokenize(PROMPTS)
    assert ours.dtype == torch.long and ours.shape == (len(PROMPTS), 77)
    for prompt, a, b in zip(PROMPTS, ours, reference):
        assert torch.equal(a, b), f"ids differ for {prompt!r}"


def test_layout(tokenizer):
    ids = tokenizer("a cat")[0]
    assert ids[0].item() == 49406 and ids[3].item() == 49407
    assert (ids[4:] == 0).all()  # zero padding, not the end token
    empty = tokenizer("")[0]
    assert empty[:2].tolist() == [49406, 49407] and (empty[2:] == 0).all()


def test_single_string_is_a_batch_of_one(tokenizer):
    assert torch.equal(tokenizer("a dog"), tokenizer(["a dog"]))


def test_truncation_keeps_end_token_and_warns(tokenizer, caplog):
    prompt = " ".join(["dog"] * 100)
    with caplog.at_level(logging.WARNING, logger="t2v.models.tokenizer"):
        ids = tokenizer([prompt])[0]
    assert ids[-1].item() == 49407 and ids[0].item() == 49406
    assert (ids[1:-1] != 0).all()
    # 100 words + start + end = 102 ids; 25 do not fit in 77.
    assert any("25 tokens are dropped" in r.getMessage() for r in caplog.records)


def test_no_warning_when_it_fits(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="t2v.models.tokenizer"):
        tokenizer(["dog " * 75])  # 75 + 2 = 77: fits exactly
    assert not caplog.records


def test_word_cache_is_bounded(monkeypatch):
    import t2v.models.tokenizer

    monkeypatch.setattr(t2v.models.tokenizer, "WORD_CACHE_SIZE", 10)
    tok = Tokenizer()
    words = " ".join(f"word{i}" for i in range(50))
    ids = tok.encode(words)
    assert len(tok._cache) <= 10 and tok.encode(words) == ids  # same ids without the cache
