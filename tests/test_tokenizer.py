"""The built-in tokenizer that ``write_checkpoint`` writes, and cluster/serving/tokenizer.py: encoding as transformers
encodes, the Gemma chat template, and the incremental detokenizer used for streaming."""

from __future__ import annotations

import json
import random

import pytest
from transformers import AutoTokenizer

from epserve.cluster.fixtures.checkpoint import preset, write_checkpoint
from epserve.cluster.fixtures.tokenizer_files import FILES, tokenizer_json, write_tokenizer
from epserve.cluster.serving.tokenizer import ChatTemplateError, Tokenizer

TEXTS = [
    "Hello world! How are you today?",
    "  def fibonacci(n: int) -> list[int]:\n\treturn [0, 1]  \n",
    "héllo wörld, 日本語のテキスト, emoji 🚀🎉 and Ωμέγα",
    "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "numbers 3.14159 and 32768, symbols {}[]()<>@#$%^&*",
    "",
    " ",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a fox?"}],
    [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "  Hello  "},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Tell me a story."}],
    [{"role": "user", "content": [{"type": "text", "text": "Parts "}, {"type": "text", "text": "work too"}]}],
]


@pytest.fixture(scope="module")
def tiny_tok_dir(tmp_path_factory):
    """A config-only tiny checkpoint: config.json, generation_config.json and the tokenizer files."""
    return write_checkpoint(preset("tiny"), tmp_path_factory.mktemp("tiny-tok"), weights=False)


@pytest.fixture(scope="module")
def tok(tiny_tok_dir):
    return Tokenizer.from_checkpoint(tiny_tok_dir)


@pytest.fixture(scope="module")
def hf_tok(tiny_tok_dir):
    return AutoTokenizer.from_pretrained(str(tiny_tok_dir))


# --------------------------------------------------------------------------------------------- the files


@pytest.mark.parametrize("name", ["tiny", "bench"])
def test_presets_get_a_tokenizer_of_exactly_their_vocabulary(name, tmp_path):
    cfg = preset(name)
    out = write_checkpoint(cfg, tmp_path / name, weights=False)
    assert all((out / f).is_file() for f in FILES)
    tok = Tokenizer.from_checkpoint(out)
    assert tok.vocab_size == cfg.vocab_size
    assert sorted(tok.backend.get_vocab(with_added_tokens=True).values()) == list(range(cfg.vocab_size))
    ids = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<start_of_turn>": 105, "<end_of_turn>": 106}
    assert {t: tok.backend.token_to_id(t) for t in ids} == ids
    assert cfg.eos_token_ids == (1, 106) and (cfg.bos_token_id, cfg.pad_token_id) == (2, 0)
    assert all(tok.is_special(i) for i in range(107)) and not tok.is_special(107)
    assert tok.has_chat_template
    # text round-trips
    for text in TEXTS:
        assert tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


def test_real_architecture_gets_no_tokenizer(tmp_path):
    out = write_checkpoint(preset("gemma-4-26b-a4b"), tmp_path / "real", weights=False)
    assert not any((out / f).exists() for f in FILES)
    assert Tokenizer.from_checkpoint(out) is None


def test_files_are_deterministic(tmp_path):
    a, b = write_tokenizer(tmp_path / "a", 1024), write_tokenizer(tmp_path / "b", 1024)
    for f in FILES:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert tokenizer_json(2048) != tokenizer_json(1024)
    with pytest.raises(ValueError, match="at least 363"):
        tokenizer_json(300)


def test_tokenizer_config(tiny_tok_dir):
    config = json.loads((tiny_tok_dir / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<bos>", "<eos>", "<pad>")
    assert "<start_of_turn>" in config["chat_template"]
    special = json.loads((tiny_tok_dir / "special_tokens_map.json").read_text())
    assert special["additional_special_tokens"] == ["<start_of_turn>", "<end_of_turn>"]


# --------------------------------------------------------------------------------------------- vs transformers


def test_transformers_encodes_the_same_ids(tok, hf_tok):
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (2, 1, 0)
    assert len(hf_tok) == 1024
    for text in TEXTS:
        ours = tok.encode(text)
        assert ours[0] == 2
        assert hf_tok.encode(text) == ours, text
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False) == ours[1:]
        assert hf_tok.decode(ours, skip_special_tokens=True) == tok.decode(ours)
        assert hf_tok.decode(ours) == tok.decode(ours, skip_special_tokens=False)


def test_a_tokenizer_that_adds_no_bos_is_followed(tmp_path, tiny_tok_dir):
    """A tokenizer whose own rules add no <bos> (no post-processor, ``add_bos_token`` false) gets none in front
    of a prompt: text tokenizes as transformers' AutoTokenizer tokenizes it, with add_special_tokens=True."""
    out = tmp_path / "no-bos"
    out.mkdir()
    for name in FILES:
        data = json.loads((tiny_tok_dir / name).read_text())
        if name == "tokenizer.json":
            data["post_processor"] = None
        if name == "tokenizer_config.json":
            data["add_bos_token"] = False
        (out / name).write_text(json.dumps(data))
    ours, hf = Tokenizer.from_checkpoint(out), AutoTokenizer.from_pretrained(str(out))
    for text in TEXTS:
        assert ours.encode(text) == hf.encode(text, add_special_tokens=True), text
    assert ours.encode("Hello world")[0] != 2 and ours.encode("<bos>Hello")[:2] == [2, hf.encode("Hello")[0]]


def test_bench_tokenizer_matches_transformers(tmp_path):
    out = write_checkpoint(preset("bench"), tmp_path / "bench", weights=False)
    ours, hf = Tokenizer.from_checkpoint(out), AutoTokenizer.from_pretrained(str(out))
    assert len(hf) == ours.vocab_size == 32768
    for text in TEXTS:
        assert hf.encode(text) == ours.encode(text), text
    ids = list(range(0, 32768, 97))
    assert hf.decode(ids, skip_special_tokens=True) == ours.decode(ids)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_template_renders_as_transformers_does(messages, tok, hf_tok):
    ours = tok.apply_chat_template(messages)
    assert ours == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours.startswith("<bos><start_of_turn>user\n") and ours.endswith("<end_of_turn>\n<start_of_turn>model\n")
    assert tok.encode(ours, add_special_tokens=False) == hf_tok.encode(ours, add_special_tokens=False)
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == \
        hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)


def test_chat_template_gemma_layout(tok):
    text = tok.apply_chat_template(CONVERSATIONS[2])
    assert text == ("<bos><start_of_turn>user\nYou are kind.\n\nHello<end_of_turn>\n"
                    "<start_of_turn>model\nHello! How can I help?<end_of_turn>\n"
                    "<start_of_turn>user\nTell me a story.<end_of_turn>\n<start_of_turn>model\n")
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[:2] == [2, 105] and ids.count(105) == 4 and ids.count(106) == 3


def test_chat_template_refuses_bad_conversations(tok):
    with pytest.raises(ChatTemplateError, match="alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ChatTemplateError, match="alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "a"}])


def test_chat_template_from_a_jinja_file_and_no_tokenizer(tmp_path, tiny_tok_dir):
    assert Tokenizer.from_checkpoint(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text((tiny_tok_dir / "tokenizer.json").read_text())
    bare = Tokenizer.from_checkpoint(tmp_path)
    assert bare is not None and not bare.has_chat_template and bare.bos_token_id == 2
    with pytest.raises(ChatTemplateError, match="no chat template"):
        bare.apply_chat_template(CONVERSATIONS[0])
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    assert Tokenizer.from_checkpoint(tmp_path).apply_chat_template(CONVERSATIONS[0]) == "[user]Hi there"


# --------------------------------------------------------------------------------------------- detokenizer


def _pieces(tok, ids, rng, skip=True):
    d, pieces, i = tok.detokenizer(skip), [], 0
    while i < len(ids):
        k = rng.randint(1, 3)
        pieces.append(d.step(ids[i:i + k]))
        i += k
    pieces.append(d.flush())
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_never_splits_a_character(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    d = tok.detokenizer(skip_special_tokens=False)
    pieces = [d.step([t]) for t in ids]
    assert "\ufffd" not in "".join(pieces)  # multi-byte characters come out whole, never as U+FFFD
    assert "".join(pieces) + d.flush() == text == d.text
    # byte-level tokens: a multi-byte character spans several tokens, which the detokenizer held back
    if "🚀" in text:
        assert any(len(tok.token_bytes(t)) == 1 and tok.token_bytes(t)[0] >= 0x80 for t in ids)
        assert b"".join(tok.token_bytes(t) for t in ids) == text.encode()


def test_incremental_detokenizer_equals_decode_on_random_ids(tok):
    """Random ids (special tokens, lone continuation bytes, incomplete characters) in random step sizes: the
    pieces always join to decode(all ids), and only the final flush may end in U+FFFD."""
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]
        for skip in (True, False):
            pieces = _pieces(tok, ids, rng, skip)
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip)
            assert not any(p.endswith("\ufffd") for p in pieces[:-1])


def test_token_bytes_and_text(tok):
    assert tok.token_bytes(105) == b"<start_of_turn>" and tok.token_text(105) == "<start_of_turn>"
    ids = tok.encode(" hello", add_special_tokens=False)
    assert b"".join(tok.token_bytes(t) for t in ids) == b" hello"
    assert "".join(tok.token_text(t) for t in ids) == " hello"
