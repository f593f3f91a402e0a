"""Training on several devices under torchrun (docs/design.md#scale): `torchrun --nproc_per_node G train_image.py ...`.

Every rank walks the same batches in the same order (the seeded shuffle of one process). Each batch is
split in G contiguous slices, one per rank, for the encoder's forward pass; each layer's SAEs live on one
rank (longest first, balanced by d^2), which receives that layer's tokens of the whole batch from every
rank (`all_to_all_single`, uneven splits) in the batch's order, so it takes exactly the steps one process
would. Rank 0 gathers the pooled rows, receives every SAE at the end, writes the run and renames it into
place. The run equals one process's up to the float rounding of the encoder on smaller batches.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from errors import UserError
from sae import SeedStack, TopKSAE
from saeshare.core import distributed
from saeshare.core.progress import progress
from saeshare.disk.runs import RunWriter
from saeshare.training.steps import (
    EncoderPass,
    TrainedLayers,
    layer_outputs,
    new_trainers,
    sample_order,
    train_steps,
)


def _slices(order: np.ndarray, batch_size: int) -> list[list[int]]:
    """This rank's contiguous share of every batch (possibly empty)."""
    g, r = distributed.world_size(), distributed.rank()
    return [np.array_split(order[s:s + batch_size], g)[r].tolist() for s in range(0, len(order), batch_size)]


def _exchange(tokens: dict[int, torch.Tensor], owner: dict[int, int], dims: dict[int, int]) -> dict[int, torch.Tensor]:
    """Each layer's tokens of the whole batch, on its owner, in rank order (the batch's order)."""
    g, me, layers = distributed.world_size(), distributed.rank(), sorted(tokens)
    device = next(iter(tokens.values())).device
    counts = torch.tensor([len(tokens[layer]) for layer in layers], dtype=torch.long, device=device)
    every = [torch.empty_like(counts) for _ in range(g)]
    dist.all_gather(every, counts)
    counts_GL = torch.stack(every).cpu().numpy()
    send = [torch.cat([tokens[layer].reshape(-1) for layer in layers if owner[layer] == dest] or
                      [torch.empty(0, device=device)]) for dest in range(g)]
    mine = [i for i, layer in enumerate(layers) if owner[layer] == me]
    recv_sizes = [int(sum(counts_GL[src, i] * dims[layers[i]] for i in mine)) for src in range(g)]
    out = torch.empty(sum(recv_sizes), device=device)
    dist.all_to_all_single(out, torch.cat(send), recv_sizes, [len(x) for x in send])
    got: dict[int, list[torch.Tensor]] = {layers[i]: [] for i in mine}
    offset = 0
    for src in range(g):
        for i in mine:
            n = int(counts_GL[src, i]) * dims[layers[i]]
            got[layers[i]].append(out[offset:offset + n].view(-1, dims[layers[i]]))
            offset += n
    return {layer: torch.cat(parts) for layer, parts in got.items()}


Rows = dict[int, dict[str, np.ndarray]]
"""Per layer and row set, pooled rows [B, d]."""


def _gather_rows(rows: list[int], pooled: Rows) -> tuple[np.ndarray, Rows]:
    """On rank 0: the sample rows and pooled vectors of the whole batch (every rank's slice)."""
    objs = [None] * distributed.world_size() if distributed.rank() == 0 else None
    dist.gather_object((rows, pooled), objs, dst=0)
    if objs is None:
        return np.empty(0, dtype=np.int64), {}
    all_rows = np.concatenate([np.asarray(r, dtype=np.int64) for r, _ in objs])
    return all_rows, {layer: {m: np.concatenate([p[layer][m] for _, p in objs if len(p[layer][m])]) for m in sets}
                      for layer, sets in pooled.items()}


class RankPass(NamedTuple):
    """What the distributed pass leaves on this rank."""
    acts: dict[str, dict[int, np.ndarray]]
    """Per row set, every layer's pooled rows [N, d] (rank 0 only; empty elsewhere)."""
    trainers: dict[int, SeedStack]
    """The SAE trainers of the layers this rank owns."""


def encoder_pass(plan: EncoderPass, writers: dict[str, RunWriter]) -> RankPass:
    """The pass split across ranks (see the module's docstring); `writers` on rank 0 only."""
    n, layers, settings, device = len(plan.ds), plan.layers, plan.settings, plan.device
    slices = _slices(sample_order(settings, n), settings.batch_size)
    loader = iter(plan.loader(batch_sampler=[s for s in slices if s]))
    acts: dict[str, dict[int, np.ndarray]] = {m: {} for m in writers}
    trainers: dict[int, SeedStack] = {}
    owner: dict[int, int] | None = None
    dims: dict[int, int] = {}
    for rows_list in progress(slices, desc=plan.desc, unit="batch", disable=distributed.rank() != 0):
        tokens: dict[int, torch.Tensor] = {}
        pooled: Rows = {}
        if rows_list:
            rows, inputs = next(loader)
            recorded = plan.encoder.record(inputs, layers)
            for layer in layers:
                tokens[layer], pooled[layer] = layer_outputs(plan, inputs, recorded[layer], layer, rows)
                dims[layer] = tokens[layer].shape[-1]
        if owner is None:  # every rank has a non-empty slice of the first batch (batch_size >= world size)
            owner = dict(zip(layers, distributed.assign([dims[layer] ** 2 for layer in layers])))
        for layer in layers:
            tokens.setdefault(layer, torch.empty(0, dims[layer], device=device))
            pooled.setdefault(layer, {m: np.empty((0, dims[layer]), dtype=np.float32)
                                      for m in plan.encoder.row_sets()})
        for layer, x in _exchange(tokens, owner, dims).items():
            if layer not in trainers:
                trainers[layer] = new_trainers(dims[layer], layer, settings, device)
            train_steps(trainers[layer], x)
        all_rows, all_pooled = _gather_rows(rows_list, pooled)
        for m, writer in writers.items():
            for layer in layers:
                if layer not in acts[m]:
                    acts[m][layer] = writer.acts(layer, n, dims[layer], plan.acts_dtype)
                acts[m][layer][all_rows] = all_pooled[layer][m]
    return RankPass(acts, trainers)


def train_pass(plan: EncoderPass, writers: dict[str, RunWriter]) -> TrainedLayers | None:
    """The one-process training pass for several ranks: what it trained on rank 0, None elsewhere."""
    settings = plan.settings
    if settings.sae_tokens != "all":
        raise UserError("training under torchrun takes --sae_tokens all (pooled tokens train on one device)")
    if min(settings.batch_size, len(plan.ds)) < distributed.world_size():
        raise UserError(f"a batch of {min(settings.batch_size, len(plan.ds))} samples cannot be split across "
                        f"{distributed.world_size()} ranks: raise --batch_size (or use fewer ranks)")
    plan = dataclasses.replace(plan, desc=f"{plan.desc} on {distributed.world_size()} ranks")
    acts, trainers = encoder_pass(plan, writers)
    mine = {layer: [(t.sae.state(), t.metrics()) for t in ts.trainers] for layer, ts in trainers.items()}
    objs = [None] * distributed.world_size() if distributed.rank() == 0 else None
    dist.gather_object(mine, objs, dst=0)
    if objs is None:
        return None
    return TrainedLayers(acts, {layer: [(TopKSAE.from_state(state, settings.top_k).to(plan.device), m)
                                        for state, m in saes] for part in objs for layer, saes in part.items()})
