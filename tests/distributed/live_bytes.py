"""Peak bytes of tensors that torch ops allocate inside a ``with`` block and keep alive together.

CPU torch has no ``max_memory_allocated``, and tracemalloc does not see torch's allocator, so the
meter watches every op through a ``TorchDispatchMode``: an op output on a storage none of its
inputs has is a new allocation and counts ``nbytes`` until the last tensor object viewing it is
gone (views of a counted storage keep it counted; views of parameters, which existed before, are
never counted). Collectives fill buffers that ``empty_like`` allocated, so they are seen too.

    meter = LiveBytes()
    with meter:
        item = next(stream)
    meter.peak   # the largest sum of live new storages seen so far
"""

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = {}  # storage data_ptr -> [nbytes, tensor objects alive on it]
        self.now = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor, inputs)
        return out

    def _track(self, tensor, inputs):
        storage = tensor.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if key == 0 or nbytes == 0:
            return
        if key in self.live:
            self.live[key][1] += 1
        elif key in inputs:
            return  # a view or in-place result on a storage from before (a parameter)
        else:
            self.live[key] = [nbytes, 1]
            self.now += nbytes
            self.peak = max(self.peak, self.now)
        weakref.finalize(tensor, self._release, key)

    def _release(self, key):
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.live[key]
