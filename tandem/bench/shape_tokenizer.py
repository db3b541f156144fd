"""A stand-in tokenizer for benchmark shapes (config.json and dummy weights, no tokenizer):
a word-level vocabulary of exactly the model's size, token i <-> the word "w{i}".

With it the server detokenizes and streams text for every token, as it would for a real
model, so a serving benchmark on a shapes-only directory measures the whole path. Prompts
of such benchmarks go out as token ids; what the words say does not matter.

    python -m tandem.bench.shape_tokenizer SRC_DIR DST_DIR   # copy config.json, add one
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from tokenizers import Tokenizer, models, pre_tokenizers


def write_shape_tokenizer(model_dir: str) -> str:
    """Write tokenizer.json (+ tokenizer_config.json) for config.json's vocabulary."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    vocab_size = int(config["vocab_size"])
    eos = config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = os.path.join(model_dir, "tokenizer.json")
    tok.save(path)
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast",
                   "eos_token": f"w{eos}" if eos is not None else None}, f)
    return path


def main(argv: list[str]) -> int:
    src, dst = argv
    os.makedirs(dst, exist_ok=True)
    if os.path.abspath(src) != os.path.abspath(dst):
        shutil.copy(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))
    print(write_shape_tokenizer(dst))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
