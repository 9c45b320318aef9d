"""The GPU suite's training steps (scripts/gpu_suite_steps.py): a step captured once and replayed trains exactly as
eager steps do. Off CUDA a stand-in for the graph reruns the captured step, so what is checked here is the
plumbing around the graph: the batch indices and learning rate each replay reads, the warm-up, the capture again
after a change of the model's forward, the fall-back to eager steps."""
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from gpu_suite_cifar import CifarConfig, cifar_vit, evo_scratch_objective  # noqa: E402
from gpu_suite_common import DeadlineReached  # noqa: E402
from gpu_suite_data import DeviceSplit  # noqa: E402
from gpu_suite_steps import WARMUP_STEPS, TrainSteps, step_loss  # noqa: E402
from tokenpace.train.objectives import Objective  # noqa: E402

CFG = CifarConfig(data="-", embed_dim=24, depth=2, num_heads=2, amp="none", erase_prob=0.5)
DATA = DeviceSplit(torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (64,)))
LRS = [1e-3, 5e-4, 2e-3, 1e-4, 3e-3, 7e-4, 1e-3, 2e-4, 4e-4]


def objective() -> Objective:
    torch.manual_seed(0)
    return Objective(cifar_vit(CFG), nn.CrossEntropyLoss()).train()


class Rerun:
    """A CUDA graph's stand-in: capturing runs nothing (a capture launches no kernels); a replay runs the captured
    step again from fresh gradients (the graph's backward writes them, it does not add to them). A graph reads
    the learning-rate tensors it saw at capture, so every replay checks that the runner still fills those: a
    rerun Python step would read a new value however it was set, a real replay would not."""

    def __init__(self, fn, runner: TrainSteps):
        self.fn, self.runner, self.output = fn, runner, None
        self.lrs = [group["lr"] for group in runner.optimizer.param_groups]
        assert all(isinstance(lr, torch.Tensor) for lr in self.lrs)

    def replay(self):
        assert all(group["lr"] is lr for group, lr in zip(self.runner.optimizer.param_groups, self.lrs))
        for p in self.runner.objective.parameters():
            p.grad = None
        self.output = self.fn()
        return self.output


def graphed_runner(obj: Objective, made: list | None = None, **kwargs) -> TrainSteps:
    """A runner on the CPU that captures with :class:`Rerun` (each capture appended to ``made``)."""
    def make(fn):
        graph = Rerun(fn, runner)
        if made is not None:
            made.append(graph)
        return graph

    runner = TrainSteps(obj, DATA, CFG, LRS[0], torch.device("cpu"), graphed=True, graph=make, **kwargs)
    return runner


def train(runner: TrainSteps, steps: int, invalidate_at: int | None = None) -> list[float]:
    torch.manual_seed(1)  # the same augmentation draws for every runner
    losses = []
    for i in range(steps):
        if i == invalidate_at:
            runner.invalidate()
        runner.set_lr(LRS[i % len(LRS)])
        idx = torch.arange(i * 8, i * 8 + 8) % len(DATA)
        losses.append(runner(idx).item())
    return losses


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Equal up to the float32 rounding of a tensor learning rate (a stale one moves weights by about 1e-3)."""
    return all(torch.allclose(p, q, rtol=0, atol=2e-5) for p, q in zip(a.parameters(), b.parameters()))


def test_replayed_steps_train_as_eager_steps_do():
    eager_obj, graph_obj = objective(), objective()
    eager = TrainSteps(eager_obj, DATA, CFG, LRS[0], torch.device("cpu"))
    assert eager.mode == "eager: not on CUDA"
    made = []
    graphed = graphed_runner(graph_obj, made)
    steps = WARMUP_STEPS + 5
    expected, got = train(eager, steps), train(graphed, steps)
    # each replay read its own batch and learning rate: the losses and the weights are the eager ones
    assert got == pytest.approx(expected, abs=1e-6)
    assert same_weights(eager_obj, graph_obj) and not same_weights(eager_obj, objective())
    assert graphed.mode == "cuda_graph" and graphed.captures == 1 and len(made) == 1


def test_a_changed_forward_is_captured_again_after_a_new_warm_up():
    eager_obj, graph_obj = objective(), objective()
    made = []
    graphed = graphed_runner(graph_obj, made)
    steps = 2 * (WARMUP_STEPS + 1) + 2
    expected = train(TrainSteps(eager_obj, DATA, CFG, LRS[0], torch.device("cpu")), steps)
    got = train(graphed, steps, invalidate_at=WARMUP_STEPS + 2)
    assert got == pytest.approx(expected, abs=1e-6) and same_weights(eager_obj, graph_obj)
    assert graphed.captures == 2 and len(made) == 2


def test_a_failed_capture_falls_back_to_eager_steps_and_loses_no_step():
    eager_obj, graph_obj = objective(), objective()

    def refuse(fn):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")

    graphed = TrainSteps(graph_obj, DATA, CFG, LRS[0], torch.device("cpu"), graphed=True, graph=refuse)
    steps = WARMUP_STEPS + 3
    expected = train(TrainSteps(eager_obj, DATA, CFG, LRS[0], torch.device("cpu")), steps)
    assert train(graphed, steps) == pytest.approx(expected, abs=1e-6) and same_weights(eager_obj, graph_obj)
    assert graphed.mode == "eager: the capture failed (CUDA error: operation not permitted when stream is capturing)"
    assert graphed.captures == 0


def test_a_deadline_during_the_capture_is_not_taken_for_a_failed_capture():
    obj = objective()

    def interrupted(fn):
        raise DeadlineReached("hard limit: 20 s past the section's deadline")

    runner = TrainSteps(obj, DATA, CFG, LRS[0], torch.device("cpu"), graphed=True, warmup=1, graph=interrupted)
    runner(torch.arange(8))
    with pytest.raises(DeadlineReached):
        runner(torch.arange(8))
    # without a warm-up the optimizer's state would be made inside the capture, and zeroed at every replay
    with pytest.raises(ValueError, match="warmup must be at least 1 eager step; got 0"):
        TrainSteps(obj, DATA, CFG, LRS[0], torch.device("cpu"), graphed=True, warmup=0)


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the aten calls a CUDA graph cannot capture: reads of a device value by the host (``item``, a tensor
    in an ``if``, data-dependent shapes) and tensors built from host data (a host-to-device copy on CUDA)."""

    BLOCKING = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "unique", "_unique2", "lift_fresh",
                "equal"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if name in self.BLOCKING:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["dense", "evo-layer", "evo-stage", "idle", "evo-cluttered"])
def test_the_suites_training_steps_never_wait_for_the_host(method):
    """What makes a step capturable: nothing in augmentation, forward or backward reads a device value back or
    copies host data in (the graph's warm-up checks the same on CUDA, with the fused AdamW update, whose CPU
    stand-in reads its step count; a step that waits for the host runs eagerly)."""
    import tokenpace

    cfg = CFG.cluttered() if method == "evo-cluttered" else CFG
    name, _, mode = method.partition("-")
    if name == "evo":  # as train_evo trains it: average-pool head and an auxiliary class-token head
        obj = evo_scratch_objective(cfg).train()
        if mode == "stage":
            tokenpace.apply(obj.model, "evo", keep=cfg.evo_keep, mode="stage")
    else:
        obj = objective()
        if name == "idle":
            tokenpace.apply(obj.model, "idle", keep=0.7)
    cpu = torch.device("cpu")
    step_loss(obj, DATA, torch.arange(8), cfg, cpu)  # the warm-up's lazy state (the channel statistics)
    with HostReads() as reads:
        loss = step_loss(obj, DATA, torch.arange(8, 16), cfg, cpu)
    assert reads.calls == [] and loss.isfinite()
    assert all(p.grad is not None for p in obj.parameters() if p.requires_grad)


class Replays:
    """The simplest stand-in for a graph: a replay runs the step again."""

    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        return self.fn()


def test_preflight_trains_every_kind_of_step_from_graphs_and_stops_at_the_first_failure():
    from gpu_suite_preflight import VARIANTS, preflight

    result = preflight(torch.device("cpu"), graph=Replays)
    assert result["ok"] is True and result["variants"] == {v: "ok" for v in VARIANTS}
    assert set(VARIANTS) == {"dense", "evo", "idle", "evo-cluttered"}

    made = []

    def refuse_evo(fn):  # dense captures; Evo's capture is refused: the rest is not tried
        made.append(fn)
        if len(made) > 1:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        return Replays(fn)

    result = preflight(torch.device("cpu"), graph=refuse_evo)
    assert result["ok"] is False
    assert result["variants"] == {
        "dense": "ok", "evo": "RuntimeError: the steps ran 'eager: the capture failed (CUDA error: operation not "
                             "permitted when stream is capturing)' with 0 of 2 captures"}


def test_preflight_results_are_read_from_the_child_or_reported_missing():
    from gpu_suite_preflight import Launched, collect

    def child(code: str) -> Launched:
        return Launched([sys.executable, "-c", code])

    done = collect(child('print("log line"); print(\'{"ok": true, "variants": {"dense": "ok"}}\')'), 30)
    assert done["ok"] is True and done["variants"] == {"dense": "ok"} and done["waited_s"] >= 0
    crashed = collect(child('import sys; sys.exit("CUDA error: out of memory")'), 30)
    assert crashed == {"ok": False, "error": "exit code 1, no result: CUDA error: out of memory"}
    for last_line in ('["ok"]', '{"variants": {}}', '{"ok": "yes"}'):  # JSON, but not a verdict
        odd = collect(child(f"print({last_line!r})"), 30)
        assert odd == {"ok": False, "error": "exit code 0, no result: no output"}
    hung = child("import time; time.sleep(60)")
    assert collect(hung, 0.5) == {"ok": False, "error": "no result within 0 s of its start (killed)"}
    assert hung.proc.poll() is not None  # killed, not left behind


def test_the_real_trial_runs_in_its_own_process_to_its_verdict():
    """The script itself (its imports, its path to this checkout's tokenpace): on the CPU the capture is refused,
    and the refusal is the verdict it prints."""
    from gpu_suite_preflight import collect, start

    result = collect(start("cpu"), 120)
    assert result["ok"] is False and list(result["variants"]) == ["dense"]
    assert result["variants"]["dense"].startswith("RuntimeError: the steps ran 'eager: the capture failed (")
