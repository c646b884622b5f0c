"""trainer.batch's shared-memory slots: a worker reuses the slot of a batch the consumer let go of, and never
one whose batch (or any view of it) is still held; pinning hands a slot back at once."""

from __future__ import annotations

import torch
from test_data import take, write_dataset
from torch.utils.data._utils.pin_memory import pin_memory

from trainer.batch import BUSY, FREE, HEADER, Lent, Ring, SlotBatch
from trainer.config import DataConfig
from trainer.data import train_loader


def _slot_batch(ring: Ring, side: int = 2) -> SlotBatch:
    n = side * side
    flat = ring.take(HEADER + 2 * n)
    flat[HEADER:] = torch.arange(2 * n, dtype=torch.uint8)
    return SlotBatch((flat[HEADER : HEADER + n].view(1, 1, side, side), flat[HEADER + n :].view(1, side, side), 0))


def test_a_worker_reuses_slots_but_never_overwrites_what_the_consumer_keeps(tmp_path):
    manifest = write_dataset(tmp_path, {"train": [1, 1, 2]})
    cfg = DataConfig(batch_size=3, shuffle_buffer=5, workers=0)
    expected = [(i.clone(), m.clone()) for i, m, _ in take(train_loader(manifest, "train", cfg, 0, 0, 0, False), 40)]
    cfg = DataConfig(batch_size=3, shuffle_buffer=5, workers=1)
    stream = iter(train_loader(manifest, "train", cfg, 0, 0, 0, pin=False))
    kept, storages = {}, set()
    for k in range(40):
        images, masks, _ = next(stream)
        storages.add(images.untyped_storage().data_ptr())
        assert torch.equal(images, expected[k][0]) and torch.equal(masks, expected[k][1])
        if k == 3:
            kept[k] = images, masks  # the whole batch
        elif k == 17:
            kept[k] = images[1:2], masks[1:2]  # a view is enough to keep a slot lent
        del images, masks
    assert len(storages) <= 5  # the ring's slots (2 prefetched + 3), each reused (40 storages without it)
    for k, (images, masks) in kept.items():  # 35 batches later, the kept ones are as they arrived
        rows = slice(None) if k == 3 else slice(1, 2)
        assert torch.equal(images, expected[k][0][rows]) and torch.equal(masks, expected[k][1][rows]), k


def test_a_slot_comes_back_once_nothing_references_it():
    ring, lent = Ring(1), Lent()
    images, masks, _ = lent.track(_slot_batch(ring))
    (storage,) = [entry[0] for entry in lent.slots.values()]  # the one reference Lent keeps
    del ring  # the worker's own reference; in a real run it lives in another process
    view = masks[0, 1:]
    del images, masks
    lent.hand_back()
    assert storage[0] == BUSY  # a view of the masks still holds the slot
    del view
    lent.hand_back()
    assert storage[0] == FREE


def test_a_ring_uses_fresh_memory_while_every_slot_is_lent():
    ring = Ring(2)
    a, b = _slot_batch(ring), _slot_batch(ring)
    c = _slot_batch(ring)  # both slots lent: memory outside the ring
    assert len(ring.slots) == 2 and c[0].untyped_storage().data_ptr() not in {
        s.data_ptr() for s, _ in ring.slots
    }
    assert torch.equal(a[0], b[0])  # filled alike, and neither touched by c
    a[0].untyped_storage()[0] = FREE
    assert _slot_batch(ring)[0].data_ptr() == a[0].data_ptr()  # the handed-back slot is taken again


def test_pinning_copies_the_batch_and_hands_the_slot_back(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self.clone())  # no GPU needed
    ring = Ring(1)
    batch = _slot_batch(ring)
    pinned = pin_memory(batch)  # what the DataLoader's pinning thread calls on each item
    assert type(pinned) is tuple and torch.equal(pinned[0], batch[0]) and torch.equal(pinned[1], batch[1])
    assert pinned[0].data_ptr() != batch[0].data_ptr()
    assert ring.slots[0][1][0] == FREE
