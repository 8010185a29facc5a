"""A small working tokenizer for the random-weight checkpoints (no tokenizer can be downloaded).

``write_tokenizer(out, vocab_size)`` writes tokenizer.json, tokenizer_config.json (with a Gemma-style chat
template) and special_tokens_map.json for a byte-level BPE tokenizer of exactly ``vocab_size`` ids, trained on
the short English and code text below. The result is deterministic (same files for the same size) and loads in
transformers' ``AutoTokenizer``.

Ids follow Gemma: 0 ``<pad>``, 1 ``<eos>``, 2 ``<bos>``, 3 ``<unk>``, 4 ``<mask>``, 5..104 ``<unused_0..99>``,
105 ``<start_of_turn>``, 106 ``<end_of_turn>``; then the 256 byte tokens and the learned merges. When the text
runs out of merges before the vocabulary is full (the 32768-id ``bench`` preset), the remaining ids are
``<unused_N>`` vocabulary entries that no text encodes to (a random model may still generate them: they decode
to their name).
"""

from __future__ import annotations

import json
from pathlib import Path

PAD, EOS, BOS, UNK, MASK = "<pad>", "<eos>", "<bos>", "<unk>", "<mask>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
NUM_LOW_UNUSED = 100  # ids 5..104
SPECIAL_TOKENS = [PAD, EOS, BOS, UNK, MASK] + [f"<unused_{i}>" for i in range(NUM_LOW_UNUSED)] + \
    [START_OF_TURN, END_OF_TURN]
assert SPECIAL_TOKENS.index(START_OF_TURN) == 105 and SPECIAL_TOKENS.index(END_OF_TURN) == 106
MIN_VOCAB = len(SPECIAL_TOKENS) + 256
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Gemma's chat template (text only): a system message is folded into the first user turn, "assistant" is
# spoken as "model", roles must alternate, and the generation prompt opens a model turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- set role = 'model' -%}"
    "{%- else -%}"
    "{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}"
    "{{ item['text'] | trim }}"
    "{%- else -%}"
    "{{ raise_exception('Only text content is supported') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ raise_exception('Invalid content type') }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}"
)

# The training text: plain English, Python, JSON and shell, enough for the tiny preset's 661 merges.
CORPUS = r'''
The quick brown fox jumps over the lazy dog. A serving system answers requests from many users at the same
time: it reads a prompt, turns it into tokens, runs the model one step at a time and sends back the new text
as soon as it is ready. When the cache is full, the scheduler waits, or it takes the blocks of the newest
request back and computes them again later. Every request has an identifier, a prompt, a limit on the number
of tokens it may produce and the reason it stopped: the model wrote an end token, the limit was reached, or
the user went away.

Once upon a time there was a small village by the river. The people who lived there were farmers and
fishermen, and every morning they walked down to the water to see what the night had brought. One day a
stranger arrived with a box of books. He said that he had travelled for many years, from the mountains in
the north to the islands in the south, and that he was looking for a quiet place to write down everything he
had learned. The children followed him everywhere. They asked him about the stars, about the sea, about the
animals in the forest and about the machines in the cities far away. He answered every question with a
story, and the stories were so good that soon the whole village came to listen in the evening.

Hello! How are you today? I am fine, thank you. What would you like to know? Please tell me about the
weather in Paris, London, Berlin, Tokyo and New York. Could you write a short poem about the autumn leaves?
Sure, here is one: the leaves are falling, red and gold, the days are short, the nights are cold. Can you
explain how a neural network learns? It compares its answer with the right one, measures the error, and
changes its weights a little in the direction that makes the error smaller. After many examples, it gets
better. The model has layers; each layer has attention, which lets a word look at the other words, and a
feed-forward block, which transforms each word on its own. In a mixture of experts, a router picks a few
experts for every token, so only a small part of the model works on each word, and the model can be large
while each step stays cheap.

Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday are the days of the week. January,
February, March, April, May, June, July, August, September, October, November and December are the months.
One, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, twenty, thirty, hundred, thousand.
The numbers 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 4096 8192 32768 65536 and 3.14159 or 2.71828.
Red, orange, yellow, green, blue, indigo and violet are the colours of the rainbow. Water, fire, earth and
air. North, south, east and west. Spring, summer, autumn and winter. Good morning, good afternoon, good
evening and good night. Yes, no, maybe, always, never, sometimes, often, usually, rarely.

def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    numbers = [0, 1]
    while len(numbers) < n:
        numbers.append(numbers[-1] + numbers[-2])
    return numbers[:n]


class Request:
    def __init__(self, request_id: str, prompt: list[int], max_tokens: int = 16):
        self.request_id = request_id
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.output: list[int] = []

    def finished(self) -> bool:
        return len(self.output) >= self.max_tokens

    def __repr__(self):
        return f"Request({self.request_id!r}, {len(self.prompt)} prompt tokens)"


async def handle(request, client):
    body = await request.json()
    if "prompt" not in body:
        raise ValueError("the request has no prompt")
    async for item in client.stream(body["prompt"], {"max_tokens": body.get("max_tokens", 16)}):
        yield item["new_token_ids"]


for i in range(10):
    if i % 2 == 0:
        print(i, "is even")
    else:
        print(i, "is odd")

import json
import os
import sys
from pathlib import Path

config = {"model": "gemma", "temperature": 0.7, "top_p": 0.95, "max_tokens": 128, "stream": True}
print(json.dumps(config, indent=2))
path = Path(os.environ.get("HOME", "/tmp")) / "cache" / "model.json"
with open(path, "w") as f:
    f.write(json.dumps({"name": "tiny", "layers": 4, "hidden_size": 256}))

{"id": "cmpl-123", "object": "text_completion", "created": 1700000000, "choices": [{"index": 0, "text": "Hello world",
"finish_reason": "stop"}], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}

$ pip install -e . && python -m pytest tests -q
$ curl -s http://localhost:8000/v1/models | python -m json.tool
$ git commit -m "Add the tokenizer" && git push origin main
if [ -f config.json ]; then echo "found"; else echo "missing"; fi

for (int i = 0; i < n; ++i) { sum += values[i] * weights[i]; }
return x > 0 ? x : -x;
SELECT name, count(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY count(*) DESC LIMIT 10;

The history of computing is full of small ideas that changed everything. Someone wrote the first compiler
so that people could describe a program in words instead of numbers. Someone else invented the network, and
suddenly computers could talk to each other across the world. Today a program may run on thousands of
machines at once, and the hardest part is often not the arithmetic but the communication: deciding which
machine holds which data, when to send it, and what to do when a machine fails in the middle of the work.
Good systems are simple to use, honest about their limits, and quick to explain what went wrong.

She opened the window and looked at the garden. The roses were blooming, the grass was wet with rain, and a
bird was singing in the old apple tree. "What a beautiful day," she said. "Let's go for a walk." They walked
along the path, past the library, the bakery and the little school, until they reached the bridge. From
there they could see the whole town: the church, the market square, the station and the hills beyond.
'''


def _train(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, 2)])
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    if len(vocab) > vocab_size:
        raise AssertionError(f"the trainer made {len(vocab)} ids for a vocabulary of {vocab_size}")
    taken = set(vocab)
    n = NUM_LOW_UNUSED
    for i in range(len(vocab), vocab_size):  # fill up with tokens no text encodes to
        while f"<unused_{n}>" in taken:
            n += 1
        vocab[f"<unused_{n}>"] = i
        n += 1
    assert sorted(vocab.values()) == list(range(vocab_size))
    return data


def tokenizer_json(vocab_size: int) -> str:
    """The tokenizer.json text of the built-in tokenizer with exactly ``vocab_size`` ids."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"the built-in tokenizer needs a vocabulary of at least {MIN_VOCAB} ids, got {vocab_size}")
    return json.dumps(_train(vocab_size), ensure_ascii=False, indent=1) + "\n"


def write_tokenizer(out: str | Path, vocab_size: int) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(tokenizer_json(vocab_size), encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "padding_side": "left", "model_max_length": 1 << 20,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {**special, "additional_special_tokens": [START_OF_TURN, END_OF_TURN]}, indent=2) + "\n", encoding="utf-8")
    return out
