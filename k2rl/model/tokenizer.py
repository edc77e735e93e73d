"""A local byte-level BPE tokenizer carrying K2's special tokens and chat template.

Tiny and mini models need a tokenizer without any download: we train a byte-level BPE on text the
project generates itself (deterministic for a given vocab size), add K2's special tokens and write it
in the HF layout (tokenizer.json + tokenizer_config.json with the chat template) so vLLM, transformers
and our own code all load the same files. The real K2 tokenizer loads from its own files instead.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from k2rl.model.template import CHAT_TEMPLATE

BOS, EOS, PAD, UNK = "[BOS]", "[EOS]", "[PAD]", "[UNK]"
IM_USER, IM_ASSISTANT, IM_SYSTEM = "<|im_user|>", "<|im_assistant|>", "<|im_system|>"
IM_MIDDLE, IM_END = "<|im_middle|>", "<|im_end|>"
CALLS_BEGIN, CALLS_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, CALL_ARG, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"

SPECIAL_TOKENS = [
    BOS, EOS, PAD, UNK, IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE, IM_END,
    CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_ARG, CALL_END,
]

_WORDS = (
    "the a an to of and or in on for with from by at is are was be have has do does not no yes "
    "please thanks hello hi sorry sure ok okay can could would should will may might must need want "
    "i you we they he she it my your our their me us them this that these those here there what which "
    "who when where why how find book cancel change update create delete list get set check send pay "
    "transfer refund order return ship track flight hotel seat ticket booking reservation account "
    "balance card payment amount date time day week month year today tomorrow morning evening meeting "
    "event calendar email message subject body contact user customer item product price total cart "
    "address city name number id status pending confirmed cancelled done error invalid missing "
    "unknown tool call result return function arguments required optional string integer boolean "
    "object array true false null assistant system help information details available unavailable "
    "first last next previous new old all any some each more less than then also only just one two "
    "three four five six seven eight nine ten hundred thousand dollars usd eur from to via between "
    "I'm I'll don't can't won't it's that's let's done found sent booked paid moved added removed "
    # the vocabulary of the built-in tool domains (shop, bank, airline, calendar)
    "shop bank airline sku qty buy drop add item items search show stock placed shipped delivered returned "
    "cancelled everything sold out name names passenger passengers reservations route fare bags bag credit "
    "travel seat seats flights accounts account transfers payee payees iban card cards freeze frozen limit "
    "monthly spending dispute transaction transactions history recent inbox sender read invite events "
    "start end move delete contact contacts email emails subject conflict move moved keeping length "
    "customer customer's assistant tools ask refuse what you need lost stolen saved money difference "
    "settled checked each one alone afford answer type function description parameters properties "
    # names a policy copies from a request into a tool argument (shop items, payees, people, titles)
    "mug lamp pen desk chair sofa rug kettle clock vase towel pillow plate bowl spoon fork knife cup jar "
    "hat scarf sock shoe belt map kite ball radio fan bike tent rope soap brush comb box "
    "Alice Moss Bob Reed City Power Water Co Gym Plus Dr Patel Rent Ltd Net Fast Coffee Hub Fuel Stop Book "
    "Nook Mega Mart Taxi Go Pizza Place Shoe Box Game Zone Ann Lee Raj Shah Mia Chen Tom Ford Eva Diaz Sam "
    "Kim Zoe Park Leo Rossi Ivy Max Dentist Team sync Lunch Yoga Budget review Piano lesson Interview club "
    "Haircut Sprint demo Call mom Invoice Party Trip plans Report draft Contract Photos Tickets"
).split()


def _declaration(rng: random.Random) -> str:
    """A tool declaration list exactly as the chat template writes it (json.dumps, sorted schema keys)."""
    def param():
        kind = rng.choice(["string", "integer", "number", "boolean"])
        return {"description": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(0, 4))), "type": kind} if rng.random() < 0.3 \
            else ({"default": rng.randint(0, 5), "type": kind} if rng.random() < 0.2 else {"type": kind})
    tools = []
    for _ in range(rng.randint(1, 4)):
        props = {rng.choice(_WORDS) + rng.choice(["", "_id", "_name"]): param() for _ in range(rng.randint(0, 3))}
        params = {"properties": props, "required": list(props)[:1], "type": "object"} if props else {"properties": {}, "type": "object"}
        tools.append({"type": "function", "function": {
            "name": rng.choice(_WORDS) + rng.choice(["", "_" + rng.choice(_WORDS)]),
            "description": (" ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 8))) + ".").capitalize(),
            "parameters": params}})
    return json.dumps(tools)


def _training_corpus(seed: int = 0, lines: int = 4000) -> list[str]:
    """Synthetic text that looks like tool-use dialogs: words, numbers, ids, dates, JSON results and
    tool declarations (so a prompt's declaration block costs few tokens)."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16)))
        sentence = words[:1].upper() + words[1:] + rng.choice([".", "?", "!", ","])
        kind = i % 5
        if kind == 0:
            out.append(sentence)
        elif kind == 1:
            args = {rng.choice(_WORDS) + "_" + rng.choice(_WORDS): rng.choice(
                [rng.randint(0, 9999), rng.choice(_WORDS), rng.random() > 0.5, f"{rng.choice(_WORDS).upper()}{rng.randint(100, 999)}"])
                for _ in range(rng.randint(1, 4))}
            out.append(f"functions.{rng.choice(_WORDS)}_{rng.choice(_WORDS)}:{rng.randint(0, 20)} " + json.dumps(args))
        elif kind == 2:
            out.append(f"## Return of functions.{rng.choice(_WORDS)}:{rng.randint(0, 9)}\n"
                       + json.dumps({"status": rng.choice(["ok", "error"]), "id": rng.randint(1, 99999),
                                     "date": f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"}))
        elif kind == 3:
            out.append(_declaration(rng))
        else:
            out.append(f"{sentence} {rng.randint(0, 100000)} {rng.randint(1, 12)}:{rng.randint(0, 59):02d} ${rng.randint(1, 5000)}.{rng.randint(0, 99):02d}")
    return out


def train_tokenizer(vocab_size: int, seed: int = 0) -> Tokenizer:
    """Train the byte-level BPE; special tokens take the first ids, in SPECIAL_TOKENS order."""
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    # A small model copies what tokenizes the same wherever it appears. Digits stay single tokens, so
    # ids like O123 copy digit by digit (not as a BPE's arbitrary multi-digit chunks); and the space
    # before a word is a token of its own, so "radio" in "buy 2 radio" and in {"q": "radio"} is one and
    # the same token (with the space merged in they were two unrelated ones). Costs ~11% more tokens.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r" (?=[A-Za-z])"), "isolated"),
                                                 pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(seed), trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: Path, model_max_length: int) -> None:
    """Write tokenizer.json and tokenizer_config.json (with K2's chat template) in the HF layout."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    added = {
        str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                   "single_word": False, "special": True}
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}, indent=2) + "\n")
