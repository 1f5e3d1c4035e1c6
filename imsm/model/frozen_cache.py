"""The frozen stream's states cached across epochs (``trainer.cache_frozen``).

The frozen stream M is the pretrained model: the same example gives the same states in every epoch. The training
loss reads only two things from it: its last hidden states (after the final norm) at the positions whose next token
is a label, and, for a gate that reads it, its query summary (the pooled prompt states). The first time an example
is seen both are stored, keyed by the example's index in the training set (``IndexedDataset`` puts it in the batch);
a later batch whose examples are all stored skips the frozen forward. Exact when the frozen forward is
deterministic: a backbone with active dropout (a config's ``attention_dropout`` etc., or an ``nn.Dropout`` outside
the adapter) is refused. peft's ``lora_dropout`` (and LoRAMoE's, LoHa's module dropout) act on the adapter's path
only, which the frozen stream never takes, so they are fine. Also refused: DeepSpeed ZeRO-3, where each frozen
forward gathers the partitioned weights from every rank, so a rank whose batch is cached would leave the others
waiting. Activation checkpointing does not interfere: the frozen stream runs without gradients and is never
recomputed.

Where the states are kept, in the backbone's dtype, bit for bit as computed (``trainer.cache_frozen``):

- ``true`` / ``memory`` (``MemoryStore``): tensors in CPU memory, kept after training.
- ``disk`` (``DiskStore``): one append-only scratch file per process, ``<run_dir>/frozen_cache/states-rank<r>.bin``
  (``run_dir``: the parent of ``TrainingArguments.output_dir``), read back through ``mmap``, so the OS pages states
  in and out and CPU memory holds only an index (offset and shapes, ~250 bytes per example). The file is created
  empty when ``IMSMTrainer.train`` starts (a stale one, left by a killed job, is deleted, never read: it is not
  resumed from) and deleted when training ends, successfully or not, so the run directory never keeps it.

Cost per example, in CPU memory or in the file: ``(L + q) * d * itemsize + 8 * n`` bytes (plus ~200 bytes of
Python objects in memory; up to 48 bytes of alignment in the file), where L is the example's labelled target tokens
(EOS included), q is 1 when the gate reads the query summary (``query_aware``) and 0 otherwise, d the hidden size,
itemsize that of the frozen states' dtype (the backbone's: 2 for bf16, 4 for fp32), n the example's tokens (kept to
check an entry belongs to its example; int64). ``FrozenCache.nbytes`` sums it, ``DiskStore.file_bytes`` is the
file's size; both are logged when training ends.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

import torch
from torch import nn

from imsm.model.siamese import pool_query

if TYPE_CHECKING:
    from imsm.model.siamese import IMSMModel

log = logging.getLogger(__name__)

STATES_DIR = "frozen_cache"  # under the run directory: trainer.cache_frozen=disk's scratch files

# backbone config fields that switch dropout on inside the frozen forward (transformers' names across families)
DROPOUT_FIELDS = (
    "attention_dropout",
    "hidden_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "dropout",
    "activation_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "ffn_dropout",
)


@dataclass
class FrozenEntry:
    """One example's frozen states: ``tokens`` (n,) its real token ids; ``hidden`` (L, d) at its labelled
    positions, in order; ``query`` (d,) its query summary, or None when the gate does not read it."""

    tokens: torch.Tensor
    hidden: torch.Tensor
    query: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        tensors = [self.tokens, self.hidden] + ([self.query] if self.query is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)


class FrozenStore(Protocol):
    """Where ``FrozenCache`` keeps its entries: a mapping from training-set index to ``FrozenEntry``."""

    def __getitem__(self, key: int) -> FrozenEntry: ...

    def get(self, key: int) -> FrozenEntry | None: ...

    def __len__(self) -> int: ...

    def put(self, key: int, entry: FrozenEntry) -> None:
        """Store ``entry`` (CPU tensors) under ``key``."""

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors."""

    def open(self) -> None:
        """Called when training starts."""

    def close(self) -> None:
        """Called when training ends, also on an error."""


class MemoryStore(Mapping[int, FrozenEntry]):
    """Entries in CPU memory (``trainer.cache_frozen=true`` or ``memory``); they outlive ``close``."""

    def __init__(self) -> None:
        self._entries: dict[int, FrozenEntry] = {}

    def __getitem__(self, key: int) -> FrozenEntry:
        return self._entries[key]

    def __iter__(self) -> Iterator[int]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: int, entry: FrozenEntry) -> None:
        # own copies: a view would keep the whole batch's tensor alive
        query = None if entry.query is None else entry.query.clone()
        self._entries[key] = FrozenEntry(entry.tokens.clone(), entry.hidden.clone(), query)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass


ALIGN = 16  # every tensor in the file starts at a multiple of this: torch kernels may assume aligned data


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


@dataclass(slots=True)
class _Slot:
    """Where one example lies in the file: from ``offset``, tokens (n,) int64, hidden (labels, width), then query
    (width,) if stored, each padded to ``ALIGN`` bytes."""

    offset: int
    tokens: int
    labels: int
    width: int
    dtype: torch.dtype
    query: bool

    @property
    def nbytes(self) -> int:
        return 8 * self.tokens + (self.labels + self.query) * self.width * self.dtype.itemsize

    @property
    def end(self) -> int:
        row = self.width * self.dtype.itemsize
        return self.offset + _padded(8 * self.tokens) + _padded(self.labels * row) + self.query * _padded(row)


class DiskStore(Mapping[int, FrozenEntry]):
    """Entries in an append-only scratch file read through ``mmap`` (``trainer.cache_frozen=disk``).

    ``open`` creates the file empty (deleting a stale one), ``close`` deletes it and forgets every entry: the file
    is never resumed from. An entry read back is a set of tensors viewing the mapping (bit for bit what ``put``
    wrote); treat them as read-only, or clone them.

    Args:
        path: the file, e.g. ``states_file(run_dir, rank)``; its folder is created, and removed when empty.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._slots: dict[int, _Slot] = {}
        self._file: BinaryIO | None = None
        self._map: mmap.mmap | None = None
        self.file_bytes = 0  # the file's size: the stored bytes and their alignment padding

    def __getitem__(self, key: int) -> FrozenEntry:
        slot = self._slots[key]
        if self._map is None or len(self._map) < slot.end:
            # the file grew since it was mapped: map it whole again, privately (copy-on-write: writable, as
            # torch.frombuffer wants, and never written back). The old mapping is dropped, not closed: tensors
            # read from it hold a reference to it, and closing it under them would crash the process.
            self._file.flush()
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        tokens, at = self._read(slot.offset, torch.int64, (slot.tokens,))
        hidden, at = self._read(at, slot.dtype, (slot.labels, slot.width))
        query = self._read(at, slot.dtype, (slot.width,))[0] if slot.query else None
        return FrozenEntry(tokens, hidden, query)

    def __contains__(self, key: object) -> bool:  # without reading the entry
        return key in self._slots

    def __iter__(self) -> Iterator[int]:
        return iter(self._slots)

    def __len__(self) -> int:
        return len(self._slots)

    def put(self, key: int, entry: FrozenEntry) -> None:
        if self._file is None:
            raise RuntimeError(f"{self.path} is not open (IMSMTrainer.train opens it when training starts)")
        hidden, query = entry.hidden, entry.query
        if query is not None and query.dtype != hidden.dtype:
            raise ValueError(f"hidden states in {hidden.dtype} and the query summary in {query.dtype}")
        self._slots[key] = _Slot(
            self.file_bytes,
            entry.tokens.numel(),
            hidden.shape[0],
            hidden.shape[1],
            hidden.dtype,
            query is not None,
        )
        for t in [entry.tokens.to(torch.int64), hidden] + ([query] if query is not None else []):
            # raw bytes: numpy has no bfloat16, but any dtype views as uint8
            data = t.detach().cpu().contiguous().view(torch.uint8).numpy().reshape(-1)
            self._file.write(data)
            self._file.write(bytes(_padded(data.size) - data.size))
            self.file_bytes += _padded(data.size)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._slots.values())

    def open(self) -> None:
        self.close()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)  # a stale file (a killed job's) is never read
        self._file = open(self.path, "w+b")  # noqa: SIM115 - open until close(), across training steps
        self.file_bytes = 0

    def close(self) -> None:
        self._slots.clear()
        self._map = None  # dropped, not closed (see __getitem__)
        if self._file is None:
            return
        self._file.close()
        self._file = None
        self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # other ranks' files may still be there
            self.path.parent.rmdir()

    def _read(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> tuple[torch.Tensor, int]:
        """The tensor at ``offset`` of the mapping, and where the next one starts."""
        count = math.prod(shape)
        if count == 0:  # torch.frombuffer refuses an empty count
            return torch.empty(shape, dtype=dtype), offset
        t = torch.frombuffer(self._map, dtype=dtype, count=count, offset=offset).view(shape)
        return t, offset + _padded(count * dtype.itemsize)


def states_file(run_dir: Path, rank: int = 0) -> Path:
    """The scratch file of ``trainer.cache_frozen=disk`` for process ``rank`` of a run."""
    return Path(run_dir) / STATES_DIR / f"states-rank{rank}.bin"


class FrozenCache:
    """Frozen states per training example in a ``store`` (default: CPU memory); ``hits`` / ``misses`` count
    batches. ``open`` / ``close`` bracket training (``IMSMTrainer.train``)."""

    def __init__(self, store: FrozenStore | None = None) -> None:
        self.entries: FrozenStore = MemoryStore() if store is None else store
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self.entries.nbytes

    def open(self) -> None:
        self.entries.open()

    def close(self) -> None:
        """Log the cost, then close the store (``DiskStore``: its file is deleted)."""
        count = len(self.entries)
        if count:
            on_disk = getattr(self.entries, "file_bytes", None)
            log.info(
                "trainer.cache_frozen: %d examples, %.1f MB of frozen states (%d bytes per example)%s; "
                "%d batches read them, %d ran the frozen stream",
                count,
                self.nbytes / 1e6,
                self.nbytes // count,
                "" if on_disk is None else f", a {on_disk / 1e6:.1f} MB file (deleted now)",
                self.hits,
                self.misses,
            )
        self.entries.close()

    def frozen_at_labels(
        self,
        model: IMSMModel,
        index: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        query_mask: torch.Tensor | None,
        rows: torch.Tensor,
        cols: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen states ``IMSMModel.forward`` mixes: stored ones, or a frozen forward that stores them.

        Args:
            model: the siamese model (its frozen stream runs on a miss).
            index: (batch,) each row's index in the training set.
            input_ids, attention_mask: (batch, seq).
            query_mask: (batch, seq), 1 on prompt tokens; None when the gate reads no query summary.
            rows, cols: (n,) the labelled positions (row-major, as ``nonzero`` gives them).

        Returns:
            h_M at the labelled positions (n, d), and q_M of each position's row (n, d) or None.
        """
        keys = index.tolist()
        counts = torch.bincount(rows, minlength=len(keys)).tolist()
        tokens = [ids[mask.bool()] for ids, mask in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)]
        entries = [self.entries.get(k) for k in keys]
        for key, entry, ids, count in zip(keys, entries, tokens, counts, strict=True):
            if entry is not None and (entry.hidden.shape[0] != count or not torch.equal(entry.tokens, ids)):
                raise ValueError(
                    f"trainer.cache_frozen: training example {key} is not the one cached under its index "
                    f"({count} labelled tokens now, {entry.hidden.shape[0]} cached): the training set changed "
                    "during training"
                )
        if all(e is not None for e in entries):
            self.hits += 1
            hidden = torch.cat([e.hidden for e in entries]).to(input_ids.device, non_blocking=True)
            if query_mask is None:
                return hidden, None
            query = torch.stack([e.query for e in entries]).to(input_ids.device, non_blocking=True)
            return hidden, query[rows]
        self.misses += 1
        base = model.stream_hidden(input_ids, attention_mask, adapter=False)
        query = None if query_mask is None else pool_query(base, query_mask, model.pooling)
        hidden = base[:, :-1][rows, cols]
        per_row = torch.split(hidden.detach().cpu(), counts)
        queries = query.detach().cpu() if query is not None else [None] * len(keys)
        for key, entry, ids, h, q in zip(keys, entries, tokens, per_row, queries, strict=True):
            if (
                entry is None
            ):  # a stored one stays: the same states, and a file that grows only once per example
                self.entries.put(key, FrozenEntry(ids, h, q))
        return hidden, None if query is None else query[rows]


def active_dropout(backbone: nn.Module) -> list[str]:
    """Where dropout would act in the frozen forward in training mode: ``field=value`` of the backbone config and
    names of ``nn.Dropout`` modules outside any adapter (peft's ``lora_dropout`` and the like only touch the
    adapter's path)."""
    config = getattr(backbone, "config", None)
    found = [
        f"{field}={getattr(config, field)}"
        for field in DROPOUT_FIELDS
        if isinstance(getattr(config, field, None), int | float) and getattr(config, field) > 0
    ]
    adapter_parts = set()
    for module in backbone.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(
            base, nn.Module
        ):  # a peft tuner layer or a LoRAMoE layer: all but its base layer is adapter
            adapter_parts |= {id(m) for m in module.modules()} - {id(m) for m in base.modules()}
    found += [
        name
        for name, m in backbone.named_modules()
        if isinstance(m, nn.Dropout) and m.p > 0 and id(m) not in adapter_parts
    ]
    return found


def frozen_cache_for(
    model: IMSMModel, zero3: bool = False, world_size: int = 1, disk_file: Path | None = None
) -> FrozenCache | None:
    """A ``FrozenCache`` after checking it is exact; None without a gate.

    Args:
        model: the siamese model to train.
        zero3: DeepSpeed ZeRO-3 partitions the weights (refused).
        world_size: processes training together (each caches what it sees).
        disk_file: ``trainer.cache_frozen=disk``'s scratch file (``states_file``); None: in CPU memory.

    Raises:
        ValueError: dropout acts in the frozen forward, or DeepSpeed ZeRO-3 partitions the weights.
    """
    setting = f"trainer.cache_frozen={'memory' if disk_file is None else 'disk'}"
    if model.gate is None:
        log.warning("%s with gate=none: there is no frozen stream to cache; ignored", setting)
        return None
    dropout = active_dropout(model.backbone)
    if dropout:
        raise ValueError(
            f"{setting}, but dropout acts in the frozen stream ({', '.join(dropout[:4])}): its "
            "states differ in every epoch, so stored ones would not be what the run computes. Set "
            "trainer.cache_frozen=false, or the backbone's dropout to 0."
        )
    if zero3:
        raise ValueError(
            f"{setting} is not supported under DeepSpeed ZeRO-3: every frozen forward gathers the "
            "partitioned weights from all ranks, and a rank whose batch is cached would skip it. Use "
            "trainer=deepspeed_z2 or ddp, or trainer.cache_frozen=false."
        )
    if world_size > 1:
        log.warning(
            "%s with %d processes: each process caches the examples it saw, and the sampler deals them out anew "
            "every epoch, so most later batches miss and run the frozen stream",
            setting,
            world_size,
        )
    return FrozenCache(None if disk_file is None else DiskStore(disk_file))
