"""A character-level tokenizer (vocabulary < 128) for the tiny models of tests/tiny.py.

Ids: 0 <pad>, 1 <s>, 2 </s>, 3 <unk>, then newline and printable ASCII. With ``letter_tokens`` the
answer letters " A" ... " F" are single tokens (as in real tokenizers); without, " A" is two tokens.
"""
from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, models
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]
LETTER_TOKENS = [f" {c}" for c in "ABCDEF"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def tiny_tokenizer(letter_tokens: bool = True, chat_template: bool = False) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per character
    tk.add_special_tokens(SPECIALS)
    if letter_tokens:
        tk.add_tokens([AddedToken(t, normalized=False) for t in LETTER_TOKENS])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    assert len(tok) <= 128
    return tok
