"""A thin wrapper over a sentencepiece model, with the ids the trainer needs named.

``tools/train_tokenizer.py`` adds the end-of-document piece ``<|endoftext|>`` as a user-defined
symbol, so text that contains that string literally encodes to the EOD id, as in GPT-2.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import sentencepiece as spm

EOD_PIECE = "<|endoftext|>"
PAD_PIECE = "<pad>"


class Tokenizer:
    def __init__(self, model_path: str) -> None:
        if not os.path.isfile(model_path):
            raise FileNotFoundError(f"{model_path}: no such sentencepiece model "
                                    "(train one with tools/train_tokenizer.py)")
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(model_path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model_path}: not a sentencepiece model ({e})") from e
        self.vocab_size: int = self._sp.GetPieceSize()
        self.eod_id: int = self._find_eod()
        self.pad_id: int = self._find_pad()
        self.bos_id: int | None = self._sp.bos_id() if self._sp.bos_id() >= 0 else None  # megamod trains without BOS
        self.unk_id: int = self._sp.unk_id()

    def _find_eod(self) -> int:
        # piece_to_id returns unk for pieces that are not in the vocabulary.
        eod = self._sp.PieceToId(EOD_PIECE)
        if eod != self._sp.unk_id():
            return eod
        if self._sp.eos_id() >= 0:  # models not trained by us: their </s> ends documents
            return self._sp.eos_id()
        raise ValueError(f"{self.model_path}: has neither {EOD_PIECE!r} nor an eos piece to mark "
                         "document ends; retrain with tools/train_tokenizer.py")

    def _find_pad(self) -> int:
        if self._sp.pad_id() >= 0:
            return self._sp.pad_id()
        pad = self._sp.PieceToId(PAD_PIECE)
        if pad != self._sp.unk_id():
            return pad
        # Padded positions are masked out of the loss, so any valid id serves; EOD is the
        # choice that cannot collide with real text.
        return self.eod_id

    def encode(self, text: str) -> list[int]:
        return self._sp.EncodeAsIds(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """sentencepiece's C++ batch path; ``num_threads`` > 1 encodes in parallel threads."""
        return self._sp.Encode(list(texts), out_type=int, num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self._sp.IdToPiece(int(i))

    # Worker processes get the path and load the model themselves.
    def __getstate__(self) -> dict:
        return {"model_path": self.model_path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_path"])
