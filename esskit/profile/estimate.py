"""Peak GPU memory of a training step, estimated on the CPU in seconds.

The trainer's step (`step.training_step`) runs on fake tensors (`FakeTensorMode`: shapes, dtypes
and storages, no data) under `MemoryTracker`, a dispatch mode that adds up the bytes of every live
storage the way the CUDA caching allocator rounds them, and replays their allocations and frees
through a model of that allocator (`allocator.py`) for its reserved memory, fragmentation
included. Parameters, gradients, SGD momentum buffers, autograd's saved activations, AMP casts
(and autocast's weight cache) are all storages created by aten ops, so all are counted; nothing
in the library is patched.

Two things differ from a real GPU and are handled here:
- Fake tensors live on the CPU device: the autograd engine needs a real CUDA device to run backward
  through CUDA-device fake tensors. So AMP uses CPU autocast (convolutions in fp16/bf16, as on CUDA;
  esskit's losses cast to fp32 either way) and SGD is switched to its foreach kernels, which it
  picks by itself for CUDA parameters.
- Fake tensors have no values, so ops whose output shape depends on data cannot run. The trainer's
  step has none: the ESS losses weight ignore pixels by 0 instead of selecting the kept pixels
  with a boolean mask (`esskit.losses._kept_mean`). For other code that does index with a mask,
  `MemoryTracker(all_true_masks=True)` treats every boolean mask as all-true and replaces it by
  the integer indices `nonzero()` would return (counted, as the GPU allocates them); the step's
  random labels (`step.synthetic_batch`) have no ignore pixels, so that reading would be exact.
- Custom ops with a fake implementation (torch's chunked `linear_cross_entropy`) show only their
  outputs; `esskit.lean_loss.full_cross_entropy` therefore runs esskit's own chunked function on
  fake tensors, whose chunk buffers are counted.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException,
                                          FakeTensorMode, UnsupportedOperatorException)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from esskit.config import Config
from esskit.errors import EsskitError, is_batchnorm_one_value
from esskit.profile.allocator import Block, CachingAllocatorModel, SimulatedOutOfMemory, block_bytes
from esskit.profile.search import BATCHNORM_FAILURE, Trial
from esskit.profile.step import MixedPrecision, build_training, synthetic_batch, training_step

MIB = 2**20

aten = torch.ops.aten
# Ops taking `indices: Tensor?[]` as their second argument, where a bool mask means nonzero().
MASK_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
                  aten._index_put_impl_.default}


class EstimateError(EsskitError):
    pass


class MemoryTracker(TorchDispatchMode):
    """Live and peak bytes of every storage created by an aten op while the mode is active.

    Each storage is counted once, when it first appears in an op's output (views share it), and
    freed when it is garbage collected (a weakref finaliser: PyTorch keeps one Python object per
    storage alive as long as the storage is). `live_allocated` / `peak_allocated` add up 512-byte
    blocks (`max_memory_allocated`); `reserved` / `peak` are the segments of a replayed caching
    allocator (`allocator.CachingAllocatorModel`: `max_memory_reserved`, fragmentation included),
    which raises `SimulatedOutOfMemory` past `cap` bytes.
    """

    def __init__(self, all_true_masks: bool = False, cap: int | None = None):
        super().__init__()
        self.all_true_masks = all_true_masks
        self.allocator = CachingAllocatorModel(cap)
        self.live_allocated = self.peak_allocated = 0
        self._sizes: dict[int, int] = {}  # id(storage) -> nbytes
        self._blocks: dict[int, Block] = {}  # id(storage) -> its block in the allocator model

    @property
    def reserved(self) -> int:
        return self.allocator.reserved

    @property
    def peak(self) -> int:
        return self.allocator.peak_reserved

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, nbytes = id(storage), storage.nbytes()
        old = self._sizes.get(key)
        if old == nbytes:
            return
        if old is None:
            weakref.finalize(storage, self._free, key)
        else:  # resized in place (out= ops): a new block replaces the old one
            self._free(key)
        self._sizes[key] = nbytes
        self.live_allocated += block_bytes(nbytes)
        self.peak_allocated = max(self.peak_allocated, self.live_allocated)
        if nbytes:  # empty storages take no block
            self._blocks[key] = self.allocator.malloc(nbytes)

    def _free(self, key: int) -> None:
        nbytes = self._sizes.pop(key, None)
        if nbytes is not None:
            self.live_allocated -= block_bytes(nbytes)
        block = self._blocks.pop(key, None)
        if block is not None:
            self.allocator.free(block)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.all_true_masks and func in MASK_INDEX_OPS:
            args = (args[0], self._mask_indices(args[1]), *args[2:])
        out = func(*args, **kwargs)
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.track(leaf)
        return out

    def _mask_indices(self, indices: list) -> list:
        """Bool masks (all-true by construction, see the module doc) -> what ATen turns them into:
        the columns of `mask.nonzero()`, one [n, ndim] int64 allocation."""
        result = []
        for index in indices:
            if index is None or index.dtype != torch.bool:
                result.append(index)
                continue
            if index.dim() == 0:
                raise EstimateError("a 0-d boolean index cannot be resolved without values")
            flat = torch.arange(index.numel(), device=index.device)
            coords, rest = [], flat
            for size in reversed(index.shape):
                coords.append(rest % size)
                rest = rest // size
            nonzero = torch.stack(coords[::-1], dim=1) if index.dim() > 1 else flat.unsqueeze(1)
            self.track(nonzero)  # the GPU allocates it too, for the duration of the op
            result.extend(nonzero.unbind(1))
        return result


@dataclass(frozen=True)
class MemoryEstimate:
    peak_bytes: int  # reserved-memory estimate (the replayed caching allocator's segments)
    peak_allocated_bytes: int  # allocated-memory estimate (512-byte blocks)
    fits: bool = True  # False: the allocator model ran out of memory under the cap

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / MIB

    @property
    def peak_allocated_mib(self) -> float:
        return self.peak_allocated_bytes / MIB


def estimate_training_peak(cfg: Config, batch: int, steps: int = 2, cap_bytes: int | None = None) -> MemoryEstimate:
    """Peak memory of `steps` training steps at `batch` images of `cfg.data.crop`.

    Two steps by default: from the second one the SGD momentum buffers are alive during the
    forward and backward, which is when the trainer peaks. With `cap_bytes` (the budget) the step
    is replayed again when its uncapped peak exceeds the cap: the allocator then releases its
    cached segments before giving up, as on a capped GPU. `peak_bytes` stays the uncapped need when
    even that does not fit.
    """
    estimate = _replay(cfg, batch, steps, None)
    if cap_bytes is None or estimate.peak_bytes <= cap_bytes:
        return estimate  # the cap was never reached: a capped replay is the same
    try:
        return _replay(cfg, batch, steps, cap_bytes)
    except SimulatedOutOfMemory:
        return MemoryEstimate(estimate.peak_bytes, estimate.peak_allocated_bytes, fits=False)


def reads_tensor_values(cfg: Config) -> bool:
    """The step needs real tensor values (FAISS copies them to numpy): no fake-tensor estimate."""
    return cfg.method.knn == "faiss" and cfg.method.name != "baseline"


def _replay(cfg: Config, batch: int, steps: int, cap_bytes: int | None) -> MemoryEstimate:
    if reads_tensor_values(cfg):
        raise EstimateError("method.knn = 'faiss' reads tensor values, which the fake-tensor estimate has none of; "
                            "estimate with method.knn = 'torch' or measure with --device cuda")
    try:
        with FakeTensorMode(), MemoryTracker(cap=cap_bytes) as tracker:
            model, optimizer = build_training(cfg, "cpu")
            for group in optimizer.param_groups:
                group["foreach"] = True  # what SGD picks by itself for CUDA parameters
            amp = MixedPrecision(cfg.train.mixed_precision, "cpu", scaler=False)
            for _ in range(steps):
                images, target = synthetic_batch(cfg, batch, "cpu")
                training_step(model, optimizer, images, target, cfg, amp)
                del images, target
    except (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException) as e:
        raise EstimateError(f"{cfg.model.backbone} / {cfg.method.name}: the fake-tensor estimate cannot run "
                            f"{getattr(e, 'func', e)} ({type(e).__name__}); measure with --device cuda") from None
    return MemoryEstimate(tracker.peak, tracker.peak_allocated)


class Estimator:
    """`esskit profile --device meta`: a batch fits when the replayed allocator stays within budget."""

    source = "estimated"
    device_name = "meta"

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes

    def try_batch(self, cfg: Config, batch: int) -> Trial:
        try:
            estimate = estimate_training_peak(cfg, batch, cap_bytes=self.budget_bytes)
        except ValueError as error:
            if not is_batchnorm_one_value(error):
                raise
            return Trial(batch, False, failure=BATCHNORM_FAILURE)
        return Trial(batch, estimate.fits, estimate.peak_bytes, estimate.peak_allocated_bytes)

    def extra(self, cfg: Config, batch: int, tried: int | None = None) -> dict:
        return {}  # no times: fake tensors do no work
