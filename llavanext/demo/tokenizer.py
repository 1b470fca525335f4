"""The demo's tokenizer: a byte-level BPE trained on every string the demo and its templates use.

It ships as `tokenizer.json` beside this file; `python -m llavanext.demo.tokenizer` rebuilds it
(deterministically) after the demo's wording changes.
"""

from __future__ import annotations

from pathlib import Path

from llavanext.data.templates import TEMPLATES, VICUNA_SYSTEM
from llavanext.demo.shapes import corpus

PATH = Path(__file__).with_name("tokenizer.json")
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = corpus() + [VICUNA_SYSTEM, "USER:", "ASSISTANT:", "[INST]", "[/INST]", "system", "user",
                        "assistant", *TEMPLATES]
    tok.train_from_iterator(texts * 4, trainer=trainer)
    return tok


def load_demo_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(PATH), bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>",
                                   extra_special_tokens={"image_token": "<image>"})


if __name__ == "__main__":
    train_tokenizer().save(str(PATH))
    print(f"wrote {PATH}")
