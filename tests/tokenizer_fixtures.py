"""Real-shaped tokenizers built inside the tests: no downloads, seeded, cached per session.

Two families cover what the env, the judge and the data pipeline must survive:

* :func:`llama2_spm_tokenizer` - a SentencePiece BPE model trained with Llama-2's trainer settings
  (``byte_fallback``, ``add_dummy_prefix``, ``split_digits``, whitespace-only pieces allowed, no
  whitespace clean-up, unk/bos/eos = 0/1/2) on a small bundled corpus, saved as a Llama-2-shaped
  ``tokenizer.json``: BPE with byte fallback, the leading-space normalizer
  (``Prepend("▁")`` + ``Replace(" ", "▁")``), no pre-tokenizer, the ``▁``/byte-fallback/fuse/strip
  decoder and a ``<s> $A`` post-processor. That is how transformers 4.x's ``LlamaTokenizerFast`` and
  ``PreTrainedTokenizerFast`` load the hub's Llama-1/2 ``tokenizer.json``; with it ``" Equal"`` tokenized
  on its own starts with a lone whitespace piece (``▁``, Llama-2 id 29871), the premise of issue 7's
  defect 2.
* :func:`byte_level_bpe_tokenizer` - a byte-level BPE like Llama-3 / Qwen2 (``Ġ`` word-start bytes),
  with a Llama-3-style chat template, two EOS ids (``<|eot_id|>``, ``<|end_of_text|>``) and a pad token
  distinct from both.

Each returns a loaded tokenizer (``AutoTokenizer.from_pretrained`` of the saved dir, local files only)
whose directory is ``tok.name_or_path``. The files are built once per session in a cache dir (training
takes a second or two) and copied into the caller's ``tmp_path``, so a test may modify its copy.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

SEED = 1234  # sentencepiece's trainer is deterministic given the input; the corpus order is fixed.

# Text that the env's prompts and the judge put around instructions, so the vocabularies learn the
# words in them (the answers must become whole pieces as in a real 32k vocabulary).
_EXTRA = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: Here are two instructions. ASSISTANT: Equal",
    "USER: Decide whether they are equal. ASSISTANT: Not Equal",
    "Answer with exactly one of: Equal, Not Equal. Do not explain.",
    "Equal Not Equal Equal Not Equal Equal Not Equal",
    "First instruction: Second instruction: Original instruction: Rewritten instruction:",
    "#Given Prompt# #Rewritten Prompt# #Created Prompt# given prompt rewritten prompt",
    "Rewritten instruction: Rewrite the instruction with 10 to 20 more words in 2024 and 1999.",
    "Sorry, I cannot answer that. As an AI language model I do not know.",
    "### Instruction: ### Response: Below is an instruction that describes a task.",
]


def _corpus() -> list[str]:
    from teams_rl_jax.env import phrases
    from teams_rl_jax.env.prompts import OPERATION_PROMPTS
    from teams_rl_jax.env.seeds import read_seed_records

    texts, _ = read_seed_records()
    lines = list(texts) + _EXTRA * 8
    for bank in phrases.BANKS.values():
        lines += list(bank)
    for general, specifics in phrases.CONCRETE_TERMS.items():
        lines += [general, *specifics]
    lines += list(phrases.TEMPLATE_PHRASES) + [" ".join(sorted(phrases.STOPWORDS))] * 4
    for prompt in OPERATION_PROMPTS.values():
        lines += [ln for ln in prompt.splitlines() if ln.strip()]
    return lines


@functools.lru_cache(maxsize=None)
def _cache_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="teams_rl_tok_"))
    atexit.register(shutil.rmtree, root, True)  # the session's build cache goes with the session
    return root


def _copy(src: Path, tmp_path) -> "object":
    from transformers import AutoTokenizer

    dst = Path(tmp_path) / src.name
    if not dst.exists():
        shutil.copytree(src, dst)
    return AutoTokenizer.from_pretrained(str(dst), local_files_only=True)


# ----------------------------------------------------------------------------- Llama-2 SentencePiece
@functools.lru_cache(maxsize=None)
def _build_llama2_spm(vocab_size: int = 1000) -> Path:
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    out = _cache_root() / "llama2_spm"
    work = _cache_root() / "llama2_spm_train"
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(_corpus()) + "\n", encoding="utf-8")
    # Llama-2's trainer_spec (read from its tokenizer.model), scaled down in vocabulary size.
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(work / "tokenizer"), model_type="bpe", vocab_size=vocab_size,
        character_coverage=0.99995, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, add_dummy_prefix=True, normalization_rule_name="identity",
        split_by_unicode_script=True, split_by_whitespace=True, treat_whitespace_as_suffix=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        max_sentence_length=4192, num_threads=1, minloglevel=2, seed_sentencepiece_size=100000,
        input_sentence_size=0, shuffle_input_sentence=False,
    )
    extractor = SentencePieceExtractor(str(work / "tokenizer.model"))
    vocab = {p.piece: i for i, p in enumerate(extractor.proto.pieces)}
    from transformers.convert_slow_tokenizer import generate_merges

    scores = {p.piece: p.score for p in extractor.proto.pieces}
    merges = generate_merges(vocab, scores)
    # The hub's Llama-2 tokenizer.json, field by field (transformers 4.x LlamaConverter, legacy=True).
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(out))
    shutil.copy(work / "tokenizer.model", out / "tokenizer.model")
    return out


def llama2_spm_tokenizer(tmp_path):
    """A Llama-2-shaped SentencePiece tokenizer (unk=0, bos ``<s>``=1, eos ``</s>``=2, no pad token).

    Loaded from its ``tokenizer.json`` as ``PreTrainedTokenizerFast``, which keeps the file's
    leading-space normalizer (transformers 5's ``LlamaTokenizer`` class would rebuild it with a
    Metaspace pre-tokenizer instead, hiding the whitespace-piece behaviour this fixture exists for).
    """
    return _copy(_build_llama2_spm(), tmp_path)


# ----------------------------------------------------------------------------- byte-level BPE (Llama-3)
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BYTE_LEVEL_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                       "<|end_header_id|>", "<|pad|>")


@functools.lru_cache(maxsize=None)
def _build_byte_level(vocab_size: int = 1500) -> Path:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from teams_rl_jax.env.prompts import OPERATION_PROMPTS

    out = _cache_root() / "byte_level_bpe"
    tok = Tokenizer(models.BPE())
    # Llama-3's pre-tokenizer: its split regex (digits in runs of up to three, punctuation keeps its
    # trailing newlines, newline runs split from the next word), then byte-level mapping.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    # Ordinary tokens first (ids 0..), specials appended at the end like Llama-3 (id 0 is "!" there).
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    # Whole multi-line prompts too, so merges such as ".\n", ":\n" and "\n\n" are learned (Llama-3 has them).
    multi = [p for p in OPERATION_PROMPTS.values()] + ["\n\n".join(_EXTRA), ".\n".join(_EXTRA), ":\n".join(_EXTRA)]
    tok.train_from_iterator(_corpus() + multi * 8, trainer)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in BYTE_LEVEL_SPECIALS])
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                       special_tokens=[("<|begin_of_text|>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|pad|>", clean_up_tokenization_spaces=False)
    fast.chat_template = LLAMA3_CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    # generation_config.json lists both EOS ids, as Llama-3-Instruct's does.
    eos = [tok.token_to_id("<|eot_id|>"), tok.token_to_id("<|end_of_text|>")]
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": bos, "eos_token_id": eos}))
    return out


def byte_level_bpe_tokenizer(tmp_path):
    """A Llama-3-like byte-level BPE: chat template, eos ``<|eot_id|>`` (+ ``<|end_of_text|>`` in
    ``generation_config.json``), bos ``<|begin_of_text|>``, pad ``<|pad|>`` distinct from both EOS ids;
    ordinary tokens start at id 0 (as ``"!"`` does in Llama-3), specials come last."""
    return _copy(_build_byte_level(), tmp_path)


def eos_ids_of(tokenizer) -> list[int]:
    """All EOS ids a fixture tokenizer's checkpoint declares (tokenizer eos + generation_config.json)."""
    ids = [tokenizer.eos_token_id]
    gen = Path(tokenizer.name_or_path) / "generation_config.json"
    if gen.exists():
        e = json.loads(gen.read_text()).get("eos_token_id")
        ids += e if isinstance(e, list) else [e]
    return sorted({int(i) for i in ids if i is not None})
