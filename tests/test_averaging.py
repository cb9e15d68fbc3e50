"""Weight averaging (esmm/averaging.py): the lazy row-by-row average of the sparse tables is the
plain moving average of every weight, the model gets its own weights back, and a resumed
average goes on as if uninterrupted."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from esmm.averaging import WeightAverage, step_decay


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(50, 4, sparse=True)
        self.head = nn.Linear(4, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.table(ids)).squeeze(1)


def optimizers(model: Tiny) -> list[torch.optim.Optimizer]:
    return [
        torch.optim.SparseAdam([model.table.weight], lr=0.05),
        torch.optim.Adam(model.head.parameters(), lr=0.01),
    ]


def train(model: Tiny, opts, average: WeightAverage | None, steps: int, seed: int, plain=None):
    """``steps`` steps on batches that touch a few of the 50 rows each; ``plain`` (a dict of
    every parameter's naive moving average, updated over the whole tensor) goes along."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 12, (8,), generator=gen)  # rows 12..49 are never touched
        target = torch.rand(8, generator=gen)
        loss = ((model(ids) - target) ** 2).mean()
        for opt in opts:
            opt.zero_grad()
        loss.backward()
        if average is not None:
            average.before_step()
        for opt in opts:
            opt.step()
        if average is not None:
            average.after_step()
        if plain is not None:
            decay = step_decay(average.decay, average.steps)
            for name, p in model.named_parameters():
                plain[name] = decay * plain[name] + (1 - decay) * p.detach()


def test_lazy_sparse_average_equals_the_plain_moving_average_of_every_weight() -> None:
    torch.manual_seed(0)
    model = Tiny()
    average = WeightAverage(model, [model.table.weight], decay=0.9)
    plain = {name: p.detach().clone() for name, p in model.named_parameters()}
    train(model, optimizers(model), average, steps=60, seed=1, plain=plain)
    last = {name: p.detach().clone() for name, p in model.named_parameters()}
    with average.applied():
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), plain[name], rtol=1e-5, atol=1e-6)
            assert not torch.equal(p.detach(), last[name]), name
    for name, p in model.named_parameters():  # its own weights back after the block
        assert torch.equal(p.detach(), last[name]), name
    # rows never touched keep their initial weight in the average too
    torch.testing.assert_close(average.average["table.weight"][12:], last["table.weight"][12:])


def test_a_resumed_average_goes_on_as_if_uninterrupted() -> None:
    torch.manual_seed(0)
    whole = Tiny()
    resumed = Tiny()
    resumed.load_state_dict(whole.state_dict())
    opts_whole, opts_resumed = optimizers(whole), optimizers(resumed)
    avg_whole = WeightAverage(whole, [whole.table.weight], decay=0.8)
    avg_resumed = WeightAverage(resumed, [resumed.table.weight], decay=0.8)
    train(whole, opts_whole, avg_whole, steps=30, seed=2)
    train(resumed, opts_resumed, avg_resumed, steps=30, seed=2)
    # a new process: the model, optimizers and average restored from their state
    state = {
        "model": resumed.state_dict(),
        "opts": [o.state_dict() for o in opts_resumed],
        "average": avg_resumed.state_dict(),
    }
    restarted = Tiny()
    restarted.load_state_dict(state["model"])
    opts_restarted = optimizers(restarted)
    for opt, opt_state in zip(opts_restarted, state["opts"], strict=True):
        opt.load_state_dict(opt_state)
    avg_restarted = WeightAverage(restarted, [restarted.table.weight], decay=0.8)
    avg_restarted.load_state_dict(state["average"])
    train(whole, opts_whole, avg_whole, steps=20, seed=3)
    train(restarted, opts_restarted, avg_restarted, steps=20, seed=3)
    avg_whole.synchronise()
    avg_restarted.synchronise()
    for name in avg_whole.average:
        torch.testing.assert_close(avg_restarted.average[name], avg_whole.average[name])


def test_copy_to_model_keeps_the_average() -> None:
    torch.manual_seed(0)
    model = Tiny()
    average = WeightAverage(model, [model.table.weight], decay=0.5)
    train(model, optimizers(model), average, steps=5, seed=4)
    average.synchronise()
    expected = {name: a.clone() for name, a in average.average.items()}
    average.copy_to_model()
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), expected[name]), name


def test_decay_outside_zero_one_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        WeightAverage(Tiny(), [], decay=1.0)


def test_train_step_with_an_average_takes_the_same_step_and_averages_it() -> None:
    """In the trainer's own step, with Horovod's DistributedOptimizer (one process): the
    allreduce-then-step order the average needs moves the weights exactly as the plain step
    does, and the average after one step is d·w0 + (1 − d)·w1 with d = step_decay(decay, 1)."""
    import horovod.torch as hvd

    from esmm.model import ModelConfig, build_model
    from esmm.steps import OptimConfig, build_optimizers, train_step
    from esmm.train import TrainConfig
    from tests.test_model import FIELDS, make_batch

    hvd.init()
    cfg = TrainConfig(model=ModelConfig(embedding_dim=3, hidden_dims=[8]), optim=OptimConfig())
    batch = make_batch(size=16)
    batch["conversion"][:4] = 1.0
    torch.manual_seed(0)
    plain, averaged = build_model(FIELDS, cfg.model), build_model(FIELDS, cfg.model)
    averaged.load_state_dict(plain.state_dict())
    start = {name: p.detach().clone() for name, p in averaged.named_parameters()}
    average = WeightAverage(averaged, averaged.sparse_parameters(), decay=0.9)
    for model, avg in ((plain, None), (averaged, average)):
        optimizers = build_optimizers(model, cfg.optim, hvd)
        train_step(model, optimizers, batch, cfg, torch.Generator().manual_seed(0), avg)
    decay = step_decay(0.9, 1)
    average.synchronise()
    moved = 0
    for (name, p), (_, q) in zip(
        plain.named_parameters(), averaged.named_parameters(), strict=True
    ):
        assert torch.equal(p.detach(), q.detach()), name
        expected = decay * start[name] + (1 - decay) * q.detach()
        torch.testing.assert_close(average.average[name], expected, rtol=1e-6, atol=1e-7)
        moved += int(not torch.equal(q.detach(), start[name]))
    assert moved == len(start)  # every parameter took the step (sparse tables on their rows)
