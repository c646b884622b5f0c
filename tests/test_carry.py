"""trainer.batch.carry: an error raised in a DataLoader worker reaches the main process with its type and message,
for the trainer's loaders and evaluate's alike (torch alone would wrap it in a RuntimeError and a traceback)."""

from __future__ import annotations

import pytest
from torch.utils.data import DataLoader, IterableDataset

from evaluate import EvaluateError
from shardgen.reader import CorruptSample, StorageUnavailable
from trainer.batch import carry, uncarry


class _Failing(IterableDataset):
    def __init__(self, error: Exception, errors):
        self.error, self.errors = error, errors

    def _items(self):
        yield 1
        yield 2
        raise self.error

    def __iter__(self):
        return carry(self._items(), self.errors)


@pytest.mark.parametrize("error, errors", [
    (CorruptSample("s3://b/train-000001.tar", "scan_0_1", "broken tar: unexpected end of data"),
     (CorruptSample, StorageUnavailable)),
    (StorageUnavailable("s3://b/x.tar: storage failed 6 times in a row"), (CorruptSample, StorageUnavailable)),
    (EvaluateError("s3://b/test-000000.tar: image 'a' is incomplete"), EvaluateError),
])  # fmt: skip
def test_worker_errors_arrive_whole(error, errors):
    loader = DataLoader(_Failing(error, errors), batch_size=None, num_workers=1)
    got = []
    with pytest.raises(type(error)) as raised:
        for item in loader:
            got.append(uncarry(item))
    assert got == [1, 2] and str(raised.value) == str(error)


def test_errors_not_carried_pass_as_they_are():
    with pytest.raises(KeyError):
        list(carry(iter(_Failing(KeyError("x"), EvaluateError)._items()), EvaluateError))
