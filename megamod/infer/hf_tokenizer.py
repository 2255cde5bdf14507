"""Our sentencepiece model as a Hugging Face ``LlamaTokenizerFast`` (tokenizers backend).

The pieces, their ids and (BPE) the merges come from the .model file; the pipeline is what
transformers' own Llama tokenizer builds with ``add_prefix_space=False, legacy=False`` (so
loading the directory rebuilds the same thing):

- no normalizer, pre-tokenizer Metaspace(▁, prepend_scheme="never", split=False): spaces become
  ▁ and nothing is prepended — our models are trained with sentencepiece's identity
  normalization and ``add_dummy_prefix=False`` (megamod/data/spm_train.py);
- BPE with ``byte_fallback`` (unknown characters become <0xXX> pieces, as in sentencepiece), or
  Unigram with the piece scores for unigram models;
- decoder: ▁ -> space, byte fallback, fuse;
- control pieces (<unk>, <s>, </s>, <pad>) and user-defined ones (<|endoftext|>) are special
  added tokens, matched whole in text. (Difference from sentencepiece: literal "<s>", "</s>",
  "<pad>" or "<unk>" in text become those ids here; sentencepiece spells them out.)

Unigram models are declared ``PreTrainedTokenizerFast`` (see ``save_hf_tokenizer``).
``add_bos_token`` and ``add_eos_token`` are false: megamod trains without BOS, documents end
with <|endoftext|>, which is the eos token. BPE merges: every split of a piece into two pieces,
ranked by the merged piece's id (sentencepiece's BPE merges the pair whose result scores
highest, and its scores fall with the id). Checked against sentencepiece by ``check_ids``.
"""

from __future__ import annotations

import json
import os
import shutil

from megamod.data.tokenizer import Tokenizer

_NORMAL, _UNKNOWN, _CONTROL, _USER, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6  # sentencepiece ModelProto piece types


def _proto(model_path: str):
    from sentencepiece import sentencepiece_model_pb2

    m = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        m.ParseFromString(f.read())
    return m


def _check_convertible(m, model_path: str) -> None:
    ns, ts = m.normalizer_spec, m.trainer_spec
    problems = []
    if ns.add_dummy_prefix:
        problems.append("add_dummy_prefix=True")
    if ns.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces=True")
    if ns.name not in ("identity", "") or ns.precompiled_charsmap:
        problems.append(f"normalization {ns.name!r}")
    if ts.model_type not in (1, 2):  # UNIGRAM, BPE
        problems.append(f"model type {ts.model_type} (only BPE and unigram)")
    if problems:
        raise ValueError(f"{model_path}: cannot convert this sentencepiece model exactly ({', '.join(problems)}); "
                         f"megamod's tokenizers (tools/train_tokenizer.py) use identity normalization, no dummy prefix")


def build_backend(model_path: str):
    """A ``tokenizers.Tokenizer`` giving sentencepiece's ids for ``model_path``."""
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, pre_tokenizers

    m = _proto(model_path)
    _check_convertible(m, model_path)
    pieces = [(p.piece, p.score, p.type) for p in m.pieces]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    unk = next(i for i, (_, _, t) in enumerate(pieces) if t == _UNKNOWN)
    if m.trainer_spec.model_type == 2:  # BPE
        merges = sorted((i, vocab[p[:c]], vocab[p[c:]]) for i, (p, _, t) in enumerate(pieces) if t == _NORMAL
                        for c in range(1, len(p)) if p[:c] in vocab and p[c:] in vocab)
        model = models.BPE(vocab=vocab, merges=[(pieces[a][0], pieces[b][0]) for _, a, b in merges],
                           unk_token=pieces[unk][0], fuse_unk=True, byte_fallback=m.trainer_spec.byte_fallback)
    else:
        model = models.Unigram([(p, s) for p, s, _ in pieces], unk_id=unk, byte_fallback=m.trainer_spec.byte_fallback)
    tk = Backend(model)
    tk.normalizer = None
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tk.add_special_tokens([AddedToken(p, normalized=False, special=True) for p, _, t in pieces
                           if t in (_UNKNOWN, _CONTROL, _USER)])
    return tk


def special_ids(model_path: str) -> dict[str, int | None]:
    """bos/eos/pad/unk ids as the export declares them: eos is the end-of-document id."""
    tok = Tokenizer(model_path)
    return {"bos": tok.bos_id, "eos": tok.eod_id, "pad": tok.pad_id, "unk": tok.unk_id}


def save_hf_tokenizer(model_path: str, out_dir: str) -> dict[str, int | None]:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and the original
    tokenizer.model into ``out_dir``; returns the special ids."""
    os.makedirs(out_dir, exist_ok=True)
    build_backend(model_path).save(os.path.join(out_dir, "tokenizer.json"))
    shutil.copyfile(model_path, os.path.join(out_dir, "tokenizer.model"))
    tok = Tokenizer(model_path)
    ids = special_ids(model_path)
    names = {k: (tok.id_to_piece(v) if v is not None else None) for k, v in ids.items()}
    specials = {f"{k}_token": v for k, v in names.items() if v is not None}
    # transformers 5's LlamaTokenizer rebuilds a BPE model from tokenizer.json's vocab and merges on
    # load, so a unigram model is declared as the generic class, which loads tokenizer.json as is.
    bpe = _proto(model_path).trainer_spec.model_type == 2
    config = {"tokenizer_class": "LlamaTokenizerFast" if bpe else "PreTrainedTokenizerFast", **specials, "add_bos_token": False, "add_eos_token": False,
              "add_prefix_space": False, "legacy": False, "clean_up_tokenization_spaces": False,
              "model_max_length": 10**30, "use_default_system_prompt": False}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(specials, f, indent=2, ensure_ascii=False)
    return ids


def check_ids(hf_dir: str, model_path: str, texts: list[str]) -> None:
    """transformers' AutoTokenizer on ``hf_dir`` gives sentencepiece's ids (and decodes back to
    sentencepiece's text) on every text; raises naming the first that differs."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(hf_dir)
    sp = Tokenizer(model_path)
    for i, text in enumerate(texts):
        want, got = sp.encode(text), hf(text)["input_ids"]
        if got != want:
            k = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise AssertionError(f"tokenizer export: text {i} differs from sentencepiece at token {k}: "
                                 f"{hf.convert_ids_to_tokens(got[k:k + 4])} vs "
                                 f"{[sp.id_to_piece(t) for t in want[k:k + 4]]}")
        if hf.decode(got) != sp.decode(want):
            raise AssertionError(f"tokenizer export: text {i} decodes differently from sentencepiece")
