"""The zigzag layout of context parallelism (context.py's docstring) and the CP group's two
collectives over it, with the bytes they move."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megamod.compat import all_gather_single, reduce_scatter_single


def chunk_owner(g: int, cp: int) -> tuple[int, int]:
    """Global chunk g (of 2·cp) -> (CP rank holding it, its slot 0/1 on that rank)."""
    return (g, 0) if g < cp else (2 * cp - 1 - g, 1)


def local_chunks(cp: int, rank: int) -> tuple[int, int]:
    """The two global chunks CP rank ``rank`` holds, in local order."""
    return rank, 2 * cp - 1 - rank


def zigzag_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """(S/cp,) global positions of the tokens this rank holds, in local order."""
    c = seq_len // (2 * cp)
    return torch.cat([torch.arange(g * c, (g + 1) * c, device=device) for g in local_chunks(cp, rank)])


def shard_sequence(x: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's zigzag slice of a full-sequence tensor along ``dim`` (S -> S/cp)."""
    if cp == 1:
        return x
    chunks = x.chunk(2 * cp, dim=dim)
    return torch.cat([chunks[g] for g in local_chunks(cp, rank)], dim=dim)


@dataclass
class CPComm:
    """The CP process group of this rank, and the two collectives CP attention needs.

    ``all_gather(x)``: x (B, S/cp, ...) in local zigzag order -> (B, S, ...) in global order.
    ``reduce_scatter(y)``: y (B, S, ...) global -> (B, S/cp, ...) local, summed over the group
    (the backward of all_gather: gradients of gathered keys go back to the rank that owns them).
    Both count what they move, from the tensors handed to the collective: a rank receives (and,
    in the ring NCCL runs, sends) cp − 1 of the cp pieces (``bytes``, by name)."""

    group: object
    rank: int
    size: int
    bytes: dict[str, int] = field(default_factory=dict)

    def _count(self, name: str, piece: torch.Tensor) -> None:
        self.bytes[name] = self.bytes.get(name, 0) + (self.size - 1) * piece.numel() * piece.element_size()

    def _order(self) -> list[int]:
        """Slot (rank·2 + local slot) of every global chunk, in global order."""
        return [2 * r + j for r, j in (chunk_owner(g, self.size) for g in range(2 * self.size))]

    def all_gather(self, x: torch.Tensor, name: str) -> torch.Tensor:
        b, s_loc = x.shape[:2]
        rest = x.shape[2:]
        send = x.transpose(0, 1).contiguous()  # (S/cp, B, ...): gather along the leading dim
        out = send.new_empty(self.size * s_loc, b, *rest)
        all_gather_single(out, send, group=self.group)
        self._count(name, send)
        c = s_loc // 2
        slots = out.view(2 * self.size, c, b, *rest)  # rank-major slots of c tokens
        glob = slots[self._order()].reshape(2 * self.size * c, b, *rest)  # (S, B, ...)
        return glob.transpose(0, 1)  # (B, S, ...) (a view: callers make it contiguous if needed)

    def reduce_scatter(self, y: torch.Tensor, name: str) -> torch.Tensor:
        b, s = y.shape[:2]
        rest = y.shape[2:]
        c = s // (2 * self.size)
        glob = y.transpose(0, 1).reshape(2 * self.size, c, b, *rest)
        inv = [0] * (2 * self.size)
        for g, slot in enumerate(self._order()):
            inv[slot] = g
        send = glob[inv].reshape(s, b, *rest).contiguous()  # rank-major, as all_gather delivered it
        out = send.new_empty(2 * c, b, *rest)
        reduce_scatter_single(out, send, group=self.group)
        self._count(name, out)
        return out.transpose(0, 1)

    def gather_ranks(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x (B, n, ...) -> (B, cp·n, ...): every rank's rows, rank after rank (no layout)."""
        b, n = x.shape[:2]
        send = x.transpose(0, 1).contiguous()
        out = send.new_empty(self.size * n, b, *x.shape[2:])
        all_gather_single(out, send, group=self.group)
        self._count(name, send)
        return out.transpose(0, 1)

    def scatter_ranks(self, y: torch.Tensor, name: str) -> torch.Tensor:
        """The backward of gather_ranks: y (B, cp·n, ...) -> this rank's (B, n, ...), summed over the group."""
        b, m = y.shape[:2]
        send = y.transpose(0, 1).contiguous()
        out = send.new_empty(m // self.size, b, *y.shape[2:])
        reduce_scatter_single(out, send, group=self.group)
        self._count(name, out)
        return out.transpose(0, 1)

    def take_bytes(self) -> dict[str, int]:
        out, self.bytes = self.bytes, {}
        return out
