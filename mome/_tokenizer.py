"""Text tokenizers of mome's models, chosen by the ``tokenizer`` field of their pretrained cfg.

``get_tokenizer(model_name)`` mirrors ``open_clip.get_tokenizer``: it returns a callable
``tokenizer(texts: str | list[str], context_length=None) -> LongTensor [N, context_length]``. The
cfg names the tokenizer as ``"<kind>:<name>"``; each kind has a factory in
:data:`TOKENIZER_FACTORIES`:

- ``open_clip:<open_clip model name>``: ``open_clip.get_tokenizer(name)`` (e.g. ``open_clip:ViT-B-16``,
  the CLIP BPE ``SimpleTokenizer``, whose vocabulary ships inside open_clip: works offline);
- ``hf-hub:<repo id>`` (or a bare repo id such as ``bert-base-uncased``): a Hugging Face
  ``AutoTokenizer``, read from the local cache only (pre-fetch it with ``hf download <repo id>``);
- ``mome:<name>``: a tokenizer built in code for the tiny demo models (``mome:tiny-wordlevel``,
  ``mome:moe_llava_tiny``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ._errors import InvalidArgumentError, PretrainedUnavailableError

__all__ = [
    "MOE_LLAVA_TINY_SPECIAL_TOKENS",
    "MOE_LLAVA_TINY_VOCAB",
    "TINY_VOCAB_SIZE",
    "TOKENIZER_FACTORIES",
    "HFTokenizer",
    "Tokenizer",
    "create_tokenizer",
    "moe_llava_tiny_tokenizer",
    "tiny_wordlevel_tokenizer",
]

Tokenizer = Callable[..., torch.Tensor]
TokenizerFactory = Callable[[str, "int | None", "str | Path | None"], Tokenizer]


def _open_clip_tokenizer(name: str, context_length: int | None, cache_dir: str | Path | None) -> Tokenizer:
    import open_clip

    kwargs: dict[str, Any] = {} if context_length is None else {"context_length": context_length}
    return open_clip.get_tokenizer(name, cache_dir=None if cache_dir is None else str(cache_dir), **kwargs)


class HFTokenizer:
    """A Hugging Face tokenizer with open_clip's call: ``texts -> input_ids [N, context_length]``."""

    def __init__(self, tokenizer: Any, context_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        length = context_length or self.context_length
        padding: dict[str, Any] = {"padding": "longest"} if length is None else {"padding": "max_length"}
        encoded = self.tokenizer(texts, truncation=True, max_length=length, return_tensors="pt", **padding)
        return encoded["input_ids"].long()


def _hf_hub_tokenizer(name: str, context_length: int | None, cache_dir: str | Path | None) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True, cache_dir=cache_dir)
    except (OSError, ValueError) as err:
        raise PretrainedUnavailableError(
            f"the tokenizer {name!r} comes from the Hugging Face Hub and is not in the local cache; fetch it where "
            f"there is network with `hf download {name}` into the same cache ({type(err).__name__}: {err})"
        ) from err
    return HFTokenizer(tokenizer, context_length)


#: The fixed vocabulary of ``mome:tiny-wordlevel`` (after BERT's 5 special tokens): caption words of the
#: embedded demo sets (digits, shapes) and common caption words. Fixed forever: token ids index embeddings.
TINY_WORDS = (
    *".,!?;:'\"-()/",
    *"0123456789",
    *"zero one two three four five six seven eight nine ten".split(),
    *"a an the of in on at to and or is are this that it with without there here what which where how many".split(),
    *"photo picture image drawing scan sketch painting rendering close-up number digit numeral figure".split(),
    *"handwritten written blurry clean dark bright small large big little tiny old new pixelated grey".split(),
    *"shape shapes circle square triangle red green blue yellow white black orange purple colour color".split(),
    *"left right top bottom middle center above below next one's count answer question yes no".split(),
    *"man woman person people dog cat car bird tree street house water sky table food".split(),
)

_TINY_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TINY_VOCAB_SIZE = len(dict.fromkeys([*_TINY_SPECIALS, *TINY_WORDS]))


def tiny_wordlevel_tokenizer() -> Any:
    """A BERT-style word-level tokenizer built in code (no download): ``[PAD]=0 [UNK] [CLS] [SEP] [MASK]``
    then :data:`TINY_WORDS`; lower-cases, splits on whitespace and punctuation (BERT's pre-tokenizer),
    wraps a text as ``[CLS] words [SEP]``. For the tiny demo models (VLMo-tiny, vocabulary 1000)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(dict.fromkeys([*_TINY_SPECIALS, *TINY_WORDS]))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


# ---------------------------------------------------------------------------------------------
# MoE-LLaVA's tiny variant's tokenizer: a word-level vocabulary built in code (no download).
# ---------------------------------------------------------------------------------------------
#: Special tokens of the tiny tokenizer; ids 0..4 in this order.
MOE_LLAVA_TINY_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
#: Words of the tiny tokenizer (lower-cased): the chat template, the synthetic shapes questions and
#: answers (``mome.data.shapes``) and a few common words, numbers and punctuation.
MOE_LLAVA_TINY_VOCAB: tuple[str, ...] = (
    # chat template and punctuation
    "user", "assistant", "system", ":", "?", ".", ",", "!", "'", "-",
    # shapes questions
    "what", "which", "how", "many", "where", "is", "are", "the", "a", "an", "there", "in", "of", "on",
    "this", "these", "image", "picture", "shape", "shapes", "colour", "color", "does", "do", "have",
    "has", "shown", "see", "you", "can", "count", "answer", "with", "one", "word", "number", "position",
    "describe", "and", "it", "they", "i",
    # shapes answers
    "red", "green", "blue", "yellow", "circle", "square", "triangle", "circles", "squares", "triangles",
    "two", "three", "four", "five", "zero", "left", "middle", "right", "top", "bottom", "center",
    "yes", "no",
    # digits
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9",
)  # fmt: skip


def moe_llava_tiny_tokenizer() -> Any:
    """The tiny variant's tokenizer: a transformers ``PreTrainedTokenizerFast`` built deterministically in code.

    A ``tokenizers`` WordLevel model over :data:`MOE_LLAVA_TINY_SPECIAL_TOKENS` (ids 0-4: pad, bos ``<s>``, eos
    ``</s>``, unk, ``<image>``) then :data:`MOE_LLAVA_TINY_VOCAB`, with a lower-casing normaliser and a
    whitespace/punctuation pre-tokeniser; decoding joins words with spaces. ``len(tokenizer)`` is the
    tiny model's vocabulary size and ``<image>`` (id 4) its image placeholder id. (``mome.get_tokenizer``
    reads tokenizers from the pretrained cfg's ``tokenizer`` field; this one is exposed as a function.)
    """
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(MOE_LLAVA_TINY_SPECIAL_TOKENS + MOE_LLAVA_TINY_VOCAB)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="right",
        model_max_length=128,
    )
    return tokenizer


_BUILT_IN_TOKENIZERS: dict[str, Callable[[], Any]] = {
    "tiny-wordlevel": tiny_wordlevel_tokenizer,
    "moe_llava_tiny": moe_llava_tiny_tokenizer,
}


def _mome_tokenizer(name: str, context_length: int | None, cache_dir: str | Path | None) -> Tokenizer:
    if name not in _BUILT_IN_TOKENIZERS:
        known = sorted(_BUILT_IN_TOKENIZERS)
        raise InvalidArgumentError("tokenizer", f"one of the built-in {[f'mome:{k}' for k in known]}", f"mome:{name}")
    return HFTokenizer(_BUILT_IN_TOKENIZERS[name](), context_length)


#: Tokenizer kinds (the part of ``pretrained_cfg.tokenizer`` before the first ``:``) and their factories
#: ``(name, context_length, cache_dir) -> tokenizer``.
TOKENIZER_FACTORIES: dict[str, TokenizerFactory] = {
    "open_clip": _open_clip_tokenizer,
    "hf-hub": _hf_hub_tokenizer,
    "mome": _mome_tokenizer,  # built in code, offline: mome:tiny-wordlevel
}


def create_tokenizer(spec: str, context_length: int | None = None, cache_dir: str | Path | None = None) -> Tokenizer:
    """The tokenizer named ``"<kind>:<name>"`` (a bare name is a Hugging Face Hub repo id)."""
    kind, sep, name = spec.partition(":")
    if not sep:
        kind, name = "hf-hub", spec
    if kind not in TOKENIZER_FACTORIES:
        raise InvalidArgumentError("tokenizer", f"'<kind>:<name>' with a kind of {sorted(TOKENIZER_FACTORIES)}", spec)
    if not name:
        raise InvalidArgumentError("tokenizer", f"a name after '{kind}:'", spec)
    return TOKENIZER_FACTORIES[kind](name, context_length, cache_dir)
