"""Token-level access to K2's chat format: encode rendered messages, decode with special tokens kept.

The agent loop appends `encode_message(...)` ids to a trajectory one message at a time; because every
message begins and ends with a special token, the concatenation equals encoding the whole rendered
conversation, so rollout and training see the same ids.
"""
from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from k2rl.model import template
from k2rl.model.tokenizer import BOS, EOS, IM_END, PAD, UNK
from k2rl.validation import ValidationFailed


class ChatTokenizer:
    """A model directory's tokenizer with K2's chat helpers.

    Loads through transformers, so both our tokenizer.json and the real K2 files (tiktoken model plus
    `tokenization_kimi.py`, hence trust_remote_code) work.
    """

    def __init__(self, model_dir: str | Path):
        if not (Path(model_dir) / "tokenizer_config.json").exists():
            raise ValidationFailed(f"{model_dir}: no tokenizer_config.json; point at a model directory "
                                   f"(build one with `k2rl make-model`)")
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)
        self.im_end_id = self._required_id(IM_END)
        self.eos_id = self._token_id(EOS)
        self.bos_id = self._token_id(BOS)
        self.pad_id = self._token_id(PAD)
        self.stop_ids = [i for i in (self.im_end_id, self.eos_id) if i is not None]

    def _token_id(self, token: str) -> int | None:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        return None if token_id is None or token_id == self.tokenizer.unk_token_id and token != UNK else token_id

    def _required_id(self, token: str) -> int:
        token_id = self._token_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer has no {token} token: not a K2-format tokenizer")
        return token_id

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int], keep_special: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=not keep_special, clean_up_tokenization_spaces=False)

    def encode_conversation(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = False) -> list[int]:
        return self.encode(template.render(messages, tools, add_generation_prompt))

    def encode_message(self, message: dict) -> list[int]:
        return self.encode(template.render_message(message))

    def encode_tools(self, tools: list[dict]) -> list[int]:
        return self.encode(template.render_tools(tools))

    def generation_prompt(self) -> list[int]:
        return self.encode(template.GENERATION_PROMPT)

    def parse_turn(self, generated_ids: list[int]) -> template.ParsedTurn:
        return template.parse_turn(self.decode(generated_ids, keep_special=True))
