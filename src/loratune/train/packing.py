"""How training examples are put into batches: length-grouped sampling and sequence packing.

Length grouping sorts examples by length inside random groups of 50 batches (transformers'
``get_length_grouped_indices``) and then shuffles the order of the resulting batches, so each
batch pads little and the step order carries no long-to-short pattern.

Packing (causal models only) places several examples of one micro-batch side by side in one
row, first-fit decreasing, no row longer than the micro-batch's longest example. Position ids
restart at 0 for every example, and the batch carries no ``attention_mask``. From those
position ids transformers 5.25 builds a causal mask that is block-diagonal over the examples
for the eager and SDPA attention kernels (``masking_utils.find_packed_sequence_indices``), as
long as no KV cache is passed. The micro-batch contains the same examples and label tokens as
without packing, so the loss is the same up to float rounding, but fewer pad tokens go
through the model.

NOTE: the tests check Llama with eager and SDPA attention. Flash attention also reads packed
position ids in transformers, but it was not run here (no GPU), and a model whose remote code
builds its own mask may ignore them and let examples attend to each other.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from loratune.data.formatting import IGNORE_INDEX


GROUP_BATCHES = 50


class ShuffledLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped sampler whose batches come in random order.

    transformers' ``LengthGroupedSampler`` sorts each random group of up to 50 batches from
    longest to shortest and yields the batches in that order. It also shrinks the groups so
    that there are at least 4 of them, which leaves small data sets nearly unsorted (80
    examples at batch 8 form groups of 2 batches). This sampler always uses groups of 50
    batches, because it shuffles the batch order itself. A data set under 50 batches is
    then sorted as a whole, so its batches differ little between epochs, but they come in
    a new order each epoch (the length bucketing that fairseq uses). Each index appears exactly
    once per epoch, the batch with the longest example comes first, so an out-of-memory
    error shows on the first step, and a partial batch comes last.
    """

    def __iter__(self):
        indices = get_length_grouped_indices(
            self.lengths, self.batch_size, mega_batch_mult=GROUP_BATCHES, generator=self.generator
        )
        batches = [indices[start : start + self.batch_size] for start in range(0, len(indices), self.batch_size)]
        # The DataLoader cuts this flat stream into batches again, so a partial batch must stay
        # last: anywhere else it would shift every later batch boundary and mix lengths.
        last = len(batches) if len(batches[-1]) == self.batch_size else len(batches) - 1
        if last > 2:
            order = torch.randperm(last - 1, generator=self.generator).tolist()
            batches = batches[:1] + [batches[1 + position] for position in order] + batches[last:]
        return iter([index for batch in batches for index in batch])


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group example indices into rows of at most ``capacity`` tokens, first-fit decreasing.

    Returns one list of indices per row, each row in the order its examples were placed.
    An example longer than ``capacity`` gets a row to itself.
    """
    rows: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True):
        for row, space in enumerate(free):
            if lengths[index] <= space:
                rows[row].append(index)
                free[row] -= lengths[index]
                break
        else:
            rows.append([index])
            free.append(capacity - lengths[index])
    return rows


class PackingCollator:
    """Pack a micro-batch of causal-LM features into rows with per-example position ids.

    Each row is as wide as the longest example (rounded up to ``pad_to_multiple_of``). Inside
    a row, every example's first label is set to ``IGNORE_INDEX`` so that no token is trained
    to predict the start of the next example. The pad tail of a row is a segment of its own
    with ``IGNORE_INDEX`` labels. The batch has ``input_ids``, ``labels`` and ``position_ids``,
    and deliberately no ``attention_mask``.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(feature["input_ids"]) for feature in features]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of

        input_ids, labels, positions = [], [], []
        for row in pack_rows(lengths, width):
            row_ids, row_labels, row_positions = [], [], []
            for index in row:
                feature = features[index]
                if len(feature["labels"]) != len(feature["input_ids"]):
                    raise ValueError(
                        f"packing needs causal features with one label per input token; got "
                        f"{len(feature['input_ids'])} input ids and {len(feature['labels'])} labels"
                    )
                row_ids += feature["input_ids"]
                row_labels += [IGNORE_INDEX] + list(feature["labels"][1:])
                row_positions += range(len(feature["input_ids"]))
            tail = width - len(row_ids)
            input_ids.append(row_ids + [self.pad_token_id] * tail)
            labels.append(row_labels + [IGNORE_INDEX] * tail)
            positions.append(row_positions + list(range(tail)))
        return {
            "input_ids": torch.tensor(input_ids),
            "labels": torch.tensor(labels),
            "position_ids": torch.tensor(positions),
        }

