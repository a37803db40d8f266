"""A third-party engine in a few lines: the public ``Engine`` and ``HookedSession`` suffice."""

import torch

from lightning_finalops import (
    Engine,
    FinalOpsHook,
    HookedSession,
    LoggingTensorHook,
    StopAtStepHook,
)


class LoopEngine(Engine):
    """An Ignite-style loop's engine: it counts its iterations and names its metrics."""

    hook_attributes = ("model",)

    def __init__(self, model):
        self.model, self.iteration, self.metrics = model, 0, {}

    @property
    def global_step(self):
        return self.iteration

    def named_values(self):
        return self.metrics


def train(model, batches, hooks):
    """The loop: its events become the core's calls, nothing more."""
    engine, opt = LoopEngine(model), torch.optim.SGD(model.parameters(), lr=0.1)
    session = HookedSession(hooks, engine, agree_across_ranks=True)
    session.begin()
    session.create()
    for x, y in batches:
        if session.should_stop:
            break

        def step(x=x, y=y):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            engine.iteration += 1
            engine.metrics["last_loss"] = loss.detach()
            return {"loss": loss}

        session.run_step(step)
    session.end()


def test_a_third_party_engine_runs_the_standard_hooks():
    model = torch.nn.Linear(2, 1)
    batches = [(torch.randn(4, 2), torch.randn(4, 1)) for _ in range(10)]
    final = FinalOpsHook({"loss": "loss", "named": "last_loss",
                          "w": lambda: model.weight.norm()})
    train(model, batches, [StopAtStepHook(last_step=6), LoggingTensorHook(["loss"], 2), final])
    step, values = final.final_ops_history[-1]
    assert step == 6 and set(values) == {"loss", "named", "w"}
    assert torch.equal(values["loss"], values["named"])
    assert torch.allclose(values["w"], model.weight.norm())
