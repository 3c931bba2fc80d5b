"""The tokenizer as the data pipeline sees it: text -> ids, plus the Qwen chat/vision special ids.

Loads from a local directory only (a HF `tokenizer.json`, as shipped with Qwen3 and
LLaVA-OneVision-1.5 checkpoints) or a SentencePiece `.model` whose user-defined symbols include the
special tokens. Nothing is ever downloaded. `build_tiny_tokenizer` makes a small byte-level BPE with
the same special tokens, so the demo and the tests run the real code path without a hub.
"""
import json
import os
from typing import Iterable, List

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

# what a tokenizer makes of this text identifies it well enough to tell two tokenizers of the
# same size apart (words, digits, code, CJK, the chat markup): see SFTTokenizer.fingerprint
FINGERPRINT_TEXT = ("<|im_start|>user\nWhat colour is the large circle in the picture? Answer "
                    "with one word.<|im_end|>\n<|im_start|>assistant\nRed, 42.5% (x_1 != y-2)."
                    "<|im_end|>\n 图中有几个红色的圆? Ça coûte 3€.")


class SFTTokenizer:
    """Wraps a HF fast tokenizer (tokenizers.Tokenizer) or a SentencePiece processor.

    Picklable, so energon's data workers can each hold one.
    """

    def __init__(self, path: str):
        self.path = path
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "tokenizer.json")):
            from tokenizers import Tokenizer
            self._hf = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
            self._sp = None
            lookup = self._hf.token_to_id
            self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        elif os.path.isfile(path) and path.endswith(".model"):
            import sentencepiece
            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
            self._hf = None
            lookup = self._sp_piece_id
            self.vocab_size = self._sp.get_piece_size()
        else:
            raise FileNotFoundError(
                f"tokenizer not found at {path}: give a directory with tokenizer.json (as shipped "
                "with the HF checkpoint) or a SentencePiece .model file")
        missing = [t for t in SPECIAL_TOKENS if lookup(t) is None]
        if missing:
            raise ValueError(f"tokenizer {path} lacks the special tokens {missing}; the chat "
                             "template and image placeholders need them")
        self.special_ids = {token: lookup(token) for token in SPECIAL_TOKENS}
        self.im_start_id, self.im_end_id = self.special_ids[IM_START], self.special_ids[IM_END]
        self.vision_start_id = self.special_ids[VISION_START]
        self.vision_end_id = self.special_ids[VISION_END]
        self.image_pad_id = self.special_ids[IMAGE_PAD]
        self.pad_id = self.eod_id = self.special_ids[END_OF_TEXT]

    def fingerprint(self) -> dict:
        """Vocabulary size, special ids and the ids of FINGERPRINT_TEXT: recorded with each
        checkpoint, so loading it with another tokenizer (which would silently feed the model
        ids it never learned) is refused; see `fingerprint_differences`."""
        return {"vocab_size": self.vocab_size, "special_token_ids": dict(self.special_ids),
                "text_ids": self.encode(FINGERPRINT_TEXT)}

    def _sp_piece_id(self, piece: str):
        index = self._sp.piece_to_id(piece)
        return None if index == self._sp.unk_id() and piece != self._sp.id_to_piece(index) else index

    def encode(self, text: str) -> List[int]:
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False).ids
        return self._sp.encode(text)

    def encode_text(self, text: str) -> List[int]:
        """A conversation's text as written: chat markup typed in it (`<|im_end|>`,
        `<|image_pad|>`) stays text. Parsed as markup, one user's `<|image_pad|>` broke the
        sample's image count and stopped the run, and an `<|im_end|>` in an answer taught the
        model to stop mid-answer. (A SentencePiece model splits its own symbols as it does.)"""
        if self._hf is None:
            return self._sp.encode(text)
        self._hf.encode_special_tokens = True
        try:
            return self._hf.encode(text, add_special_tokens=False).ids
        finally:
            self._hf.encode_special_tokens = False

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=False)
        return self._sp.decode(ids)

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


def fingerprint_differences(recorded: dict, current: dict) -> List[str]:
    """How tokenizer fingerprint `current` differs from `recorded` (empty: the same tokenizer as
    far as the record tells). A record may hold only some of the keys."""
    differences = []
    if "vocab_size" in recorded and recorded["vocab_size"] != current["vocab_size"]:
        differences.append(f"{current['vocab_size']} tokens, not {recorded['vocab_size']}")
    special = recorded.get("special_token_ids") or {}
    moved = [f"{token} is {current['special_token_ids'].get(token)}, not {index}"
             for token, index in sorted(special.items())
             if current["special_token_ids"].get(token) != index]
    differences.extend(moved)
    if "text_ids" in recorded and not differences and recorded["text_ids"] != current["text_ids"]:
        differences.append("it splits the same text into other ids")
    return differences


def build_tiny_tokenizer(out_dir: str, texts: Iterable[str], vocab_size: int = 512) -> str:
    """Trains a small byte-level BPE on `texts` with the Qwen special tokens; returns `out_dir`.

    Writes tokenizer.json and a tokenizer_config.json, so `transformers.AutoTokenizer` loads it too.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": IM_END,
              "pad_token": END_OF_TEXT, "model_max_length": 1 << 20,
              "additional_special_tokens": list(SPECIAL_TOKENS[1:])}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as handle:
        json.dump(config, handle, indent=1)
    return out_dir
