"""The dual-network trainer on tiny stand-in networks: updates, EMA, loss switches, events, forward counts, resume."""

import copy

import pytest
import torch
from ignite.engine import Events
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointLoader, CheckpointSaver
from torch.utils.data import DataLoader

from scripts.method.losses import SupervisedLoss, ema_alpha
from scripts.method.terms import (
    CrossPseudoSupervisionTerm,
    EmaTeacher,
    InformationDivergenceTerm,
    InterpolationConsistencyTerm,
    MeanTeacherTerm,
)
from scripts.method.trainer import DualNetworkTrainer, SemiSupervisedLoader, loss_terms


class CountingNet(torch.nn.Module):
    """A two-layer conv net that counts forward calls and the rows it saw."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
        self.calls, self.rows = 0, 0

    def forward(self, x):
        self.calls += 1
        self.rows += x.shape[0]
        return self.body(x)


def make_loaders(n_labeled=4, n_unlabeled=8, lb=1, ub=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    labeled = [
        {"image": torch.rand(3, 8, 8, generator=g), "label": (torch.rand(1, 8, 8, generator=g) > 0.5).float()}
        for _ in range(n_labeled)
    ]
    unlabeled = [{"image": torch.rand(3, 8, 8, generator=g)} for _ in range(n_unlabeled)]
    return SemiSupervisedLoader(
        DataLoader(labeled, batch_size=lb, shuffle=True, drop_last=True),
        DataLoader(unlabeled, batch_size=ub, shuffle=True, drop_last=True) if ub else None,
    )


def method(
    cps_weight=0.0, ict_weight=0.0, divergence_weight=0.0, mt_weight=0.0, ict_warmup_iterations=1000, teacher_of="b"
):
    """The trainer's terms and EMA teacher as configs/train.json declares them, from its weights."""
    terms = [
        CrossPseudoSupervisionTerm(cps_weight),
        InformationDivergenceTerm(divergence_weight),
        InterpolationConsistencyTerm(ict_weight, warmup_iterations=ict_warmup_iterations),
        MeanTeacherTerm(mt_weight),
    ]
    return {"loss_function": SupervisedLoss(), "terms": terms, "ema_teacher": EmaTeacher(student=teacher_of)}


def make_trainer(
    iterations=3,
    net_b=True,
    max_epochs=1,
    unlabeled=None,
    max_iterations=None,
    amp=False,
    amp_dtype="bfloat16",
    **weights,
):
    a, b = CountingNet(0), CountingNet(1) if net_b else None
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9) if net_b else None
    kwargs = {"cps_weight": 1.0, "ict_weight": 1.0, "divergence_weight": 1.0, "ict_warmup_iterations": 0}
    if not net_b:
        kwargs = {"cps_weight": 0.0, "ict_weight": 0.0, "divergence_weight": 0.0}
    kwargs.update(weights)
    trainer = DualNetworkTrainer(
        device="cpu",
        max_epochs=max_epochs,
        epoch_length=iterations,
        train_data_loader=make_loaders(ub=4 if (net_b if unlabeled is None else unlabeled) else 0),
        network_a=a,
        optimizer_a=opt_a,
        network_b=b,
        optimizer_b=opt_b,
        rampup_length=200,
        max_iterations=max_iterations,
        amp=amp,
        amp_dtype=amp_dtype,
        **method(**kwargs),
    )
    return trainer, a, b


def params(net):
    return [p.detach().clone() for p in net.parameters()]


def test_iterations_change_both_networks_and_the_teacher():
    torch.manual_seed(0)
    trainer, a, b = make_trainer(iterations=3)
    before_a, before_b, before_t = params(a), params(b), params(trainer.teacher)
    trainer.run()
    assert trainer.state.iteration == 3
    for before, net in ((before_a, a), (before_b, b), (before_t, trainer.teacher)):
        assert any(not torch.equal(p0, p1) for p0, p1 in zip(before, net.parameters()))
    assert not trainer.teacher.training and all(not p.requires_grad for p in trainer.teacher.parameters())


def test_ema_update_follows_the_formula():
    torch.manual_seed(0)
    trainer, a, b = make_trainer(iterations=2)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append((params(b), params(e.teacher))))
    trainer.run()
    (b1, t1), (b2, t2) = seen
    # t = 0: alpha = 0, the teacher becomes the student; t = 1: alpha = 0.5
    assert all(torch.allclose(x, y) for x, y in zip(b1, t1))
    alpha = ema_alpha(1)
    assert alpha == 0.5
    assert all(torch.allclose(t, alpha * p + (1 - alpha) * s) for t, p, s in zip(t2, t1, b2))


def test_each_network_runs_once_per_distinct_input():
    torch.manual_seed(0)
    trainer, a, b = make_trainer(iterations=4, ict_warmup_iterations=2)
    teacher_calls = []
    trainer.teacher.register_forward_hook(lambda m, i, o: teacher_calls.append(i[0].shape[0]))
    trainer.run()
    assert a.calls == 4 and a.rows == 4 * 5  # labelled + unlabelled together
    # B: 5 rows, plus the 2 ICT mixes once ICT has started (iterations 3 and 4)
    assert b.calls == 4 and b.rows == 2 * 5 + 2 * 7
    assert teacher_calls == [4, 4]  # both halves in one call, only after the warm-up


def test_events_fire_and_output_holds_every_term():
    torch.manual_seed(0)
    trainer, _, _ = make_trainer(iterations=2)
    steps = ("FORWARD_COMPLETED", "LOSS_COMPLETED", "BACKWARD_COMPLETED", "MODEL_COMPLETED")
    fired = {getattr(IterationEvents, e): 0 for e in steps}
    for event in fired:
        trainer.add_event_handler(event, lambda _, ev=event: fired.__setitem__(ev, fired[ev] + 1))
    trainer.run()
    assert all(count == 2 for count in fired.values()), fired
    terms = loss_terms(trainer.state.output)
    for key in (
        "loss",
        "sup_a",
        "sup_b",
        "cps_a",
        "cps_b",
        "ict",
        "kl",
        "mig",
        "divergence",
        "w_cps",
        "w_ict",
        "w_div",
    ):
        assert key in terms and isinstance(terms[key], float)
    # t = 1, ramp interval = 2 // 200 -> 1: s = 1 of L = 200
    # the ramp spans the 2-iteration run (R = 2, L = 200): at t = 1, s = floor(1 * 200 / 2) = 100
    assert terms["w_cps"] == pytest.approx(torch.exp(torch.tensor(-5 * (1 - 100 / 200) ** 2)).item(), rel=1e-6)
    assert terms["loss"] == pytest.approx(
        terms["sup_a"]
        + terms["sup_b"]
        + terms["w_cps"] * (terms["cps_a"] + terms["cps_b"])
        + terms["w_ict"] * terms["ict"]
        + terms["w_div"] * terms["divergence"],
        rel=1e-5,
    )


def grads_after_one_iteration(**weights):
    torch.manual_seed(0)
    trainer, a, b = make_trainer(iterations=1, **weights)
    grads = {}
    trainer.add_event_handler(
        IterationEvents.BACKWARD_COMPLETED,
        lambda e: grads.update(a=[p.grad.clone() for p in a.parameters()], batch=copy.deepcopy(e.state.batch)),
    )
    trainer.run()
    return trainer, a, grads


def test_zero_weights_remove_the_unsupervised_gradients():
    # with every unsupervised weight at 0, A's gradient is exactly that of its supervised loss alone
    trainer, a, grads = grads_after_one_iteration(cps_weight=0.0, ict_weight=0.0, divergence_weight=0.0)
    assert not {"cps_a", "ict", "divergence"} & set(trainer.state.output)
    ref = CountingNet(0)
    x_l, y = grads["batch"]["labeled"]["image"], grads["batch"]["labeled"]["label"]
    SupervisedLoss()(ref(x_l), y).backward()
    for g, r in zip(grads["a"], ref.parameters()):
        assert torch.allclose(g, r.grad, atol=1e-6)
    # switching one term on changes A's gradient
    _, _, grads_div = grads_after_one_iteration(cps_weight=0.0, ict_weight=0.0, divergence_weight=1.0)
    assert any(not torch.allclose(g0, g1) for g0, g1 in zip(grads["a"], grads_div["a"]))
    trainer_cps, _, _ = grads_after_one_iteration(cps_weight=1.0, ict_weight=0.0, divergence_weight=0.0)
    assert "cps_a" in trainer_cps.state.output and "divergence" not in trainer_cps.state.output
    assert trainer_cps.teacher is None  # no ICT, no teacher kept


def test_supervised_only_without_second_network():
    torch.manual_seed(0)
    trainer, a, _ = make_trainer(iterations=2, net_b=False)
    before = params(a)
    trainer.run()
    assert a.rows == 2  # labelled rows only
    assert any(not torch.equal(p0, p1) for p0, p1 in zip(before, a.parameters()))
    with pytest.raises(ValueError, match="needs a second network"):
        make_trainer(net_b=False, cps_weight=1.0)


def capture_outputs(module, store):
    module.register_forward_hook(lambda m, i, o: store.append((i[0].detach().clone(), o.detach().clone())))


@pytest.mark.parametrize("term", ["mt", "ict"])
def test_single_unext_with_its_own_ema_teacher(term):
    """Mean Teacher and ICT on the UNeXt alone: the teacher is an EMA of A, and each term matches its formula."""
    torch.manual_seed(0)
    weights = {"mt_weight": 1.0, "ict_weight": 0.0} if term == "mt" else {"ict_weight": 1.0, "ict_warmup_iterations": 0}
    trainer, a, _ = make_trainer(iterations=1, net_b=False, unlabeled=True, teacher_of="a", **weights)
    assert type(trainer.teacher) is CountingNet and trainer.teacher is not a
    student, teacher = [], []
    capture_outputs(a, student)
    capture_outputs(trainer.teacher, teacher)
    trainer.run()
    out = loss_terms(trainer.state.output)
    ((x, logits_a),) = student
    ((x_t, logits_t),) = teacher
    x_u = x[1:5]
    p_t = torch.softmax(logits_t, 1)
    if term == "mt":
        assert a.rows == 5 and x_t.shape[0] == 4  # A sees labelled + unlabelled once; the teacher a noisy x_u
        noise = x_t - x_u
        assert 0 < noise.abs().max() <= 0.2 + 1e-6
        expected = ((torch.softmax(logits_a[1:5], 1) - p_t) ** 2).mean()
    else:
        assert a.rows == 5 + 2 and torch.equal(x_t, x_u)  # the two mixes join A's forward; the teacher sees x_u
        u0, u1 = x_u.chunk(2)
        mixed = x[5:]
        lam = ((mixed - u0) / (u1 - u0))[:, :1, :1, :1]  # recover lam from the mix
        target = (1 - lam) * p_t[:2] + lam * p_t[2:]
        expected = ((torch.softmax(logits_a[5:], 1) - target) ** 2).mean()
    assert out[term] == pytest.approx(float(expected), rel=1e-5)
    assert out["loss"] == pytest.approx(out["sup_a"] + out[f"w_{term}"] * out[term], rel=1e-5)
    # t = 0: alpha = 0, the teacher becomes the student A
    assert all(torch.equal(t, s) for t, s in zip(trainer.teacher.parameters(), a.parameters()))


def test_teacher_of_is_checked():
    with pytest.raises(ValueError, match="teacher_of must be"):
        make_trainer(net_b=False, teacher_of="c")
    with pytest.raises(ValueError, match="mt_weight=1.0 needs a second network"):
        make_trainer(net_b=False, unlabeled=True, mt_weight=1.0)  # teacher_of defaults to B


def test_resume_continues_iterations_and_optimiser_state(tmp_path):
    def build(max_epochs):
        trainer, a, b = make_trainer(iterations=3, max_epochs=max_epochs)
        objs = {
            "a": a,
            "b": b,
            "teacher": trainer.teacher,
            "optimizer_a": trainer.optimizer_a,
            "optimizer_b": trainer.optimizer_b,
            "trainer": trainer,
        }
        return trainer, objs

    torch.manual_seed(0)
    first, objs = build(max_epochs=1)
    CheckpointSaver(str(tmp_path), objs, file_prefix="resume", save_interval=1, n_saved=1).attach(first)
    first.run()
    saved = next(tmp_path.glob("resume_*.pt"))
    mom_saved = [s["momentum_buffer"].clone() for s in first.optimizer_a.state_dict()["state"].values()]

    second, objs2 = build(max_epochs=2)
    CheckpointLoader(str(saved), objs2).attach(second)
    started = []
    second.add_event_handler(Events.ITERATION_STARTED, lambda e: started.append(e.state.iteration))
    checked = {}

    def check_loaded(engine):  # runs after CheckpointLoader (attached first) at STARTED
        mom = [s["momentum_buffer"] for s in engine.optimizer_a.state_dict()["state"].values()]
        checked["momentum"] = len(mom) == len(mom_saved) and all(torch.equal(x, y) for x, y in zip(mom_saved, mom))
        checked["teacher"] = all(
            torch.equal(x, y) for x, y in zip(objs["teacher"].parameters(), objs2["teacher"].parameters())
        )
        checked["iteration"] = engine.state.iteration

    second.add_event_handler(Events.STARTED, check_loaded)
    second.run()
    assert checked == {"momentum": True, "teacher": True, "iteration": 3}
    assert started == [4, 5, 6] and second.state.iteration == 6


def test_loader_errors_name_the_problem():
    with pytest.raises(ValueError, match="2 labelled images for a labelled batch of 4"):
        SemiSupervisedLoader(DataLoader([{"image": torch.zeros(1)}] * 2, batch_size=4, drop_last=True))


def test_teacher_follows_the_students_batch_norm_statistics():
    """The teacher runs in eval mode, so its BN running statistics must be the EMA of the student's, not the init."""
    a = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    trainer = DualNetworkTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=2,
        train_data_loader=make_loaders(),
        network_a=a,
        optimizer_a=opt,
        **method(mt_weight=1.0, teacher_of="a"),
    )
    seen = []
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: seen.append(
            (a[1].running_mean.clone(), e.teacher[1].running_mean.clone(), e.teacher[1].num_batches_tracked.clone())
        ),
    )
    trainer.run()
    (s0, t0, n0), (s1, t1, n1) = seen
    assert torch.equal(t0, s0) and s0.abs().sum() > 0  # t = 0: alpha 0, the teacher takes the student's statistics
    assert torch.allclose(t1, 0.5 * t0 + 0.5 * s1)  # t = 1: alpha 0.5
    assert int(n1) == int(a[1].num_batches_tracked) == 2 * 1  # integer buffers are copied (one forward per iteration)


def test_fp16_autocast_uses_one_gradient_scaler():
    """amp_dtype float16: one GradScaler scales the summed loss and steps both optimisers; bf16 needs none."""
    trainer, a, b = make_trainer(iterations=2, amp=True, amp_dtype="float16")
    assert isinstance(trainer.grad_scaler, torch.amp.GradScaler) and trainer.amp_dtype is torch.float16
    dtypes = []
    a.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    before_a, before_b = params(a), params(b)
    scales = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: scales.append(e.grad_scaler.get_scale()))
    trainer.run()
    assert dtypes == [torch.float16, torch.float16]  # the forward ran in fp16
    assert len(scales) == 2 and all(0 < s < float("inf") for s in scales)
    for before, net in ((before_a, a), (before_b, b)):  # both optimisers stepped through the scaler
        assert any(not torch.equal(x, y) for x, y in zip(before, params(net)))
    assert make_trainer(amp=True)[0].grad_scaler is None  # bf16 default
    with pytest.raises(ValueError, match="amp_dtype must be"):
        make_trainer(amp=True, amp_dtype="float8")


def random_transform_loaders(num_workers: int) -> SemiSupervisedLoader:
    """Two shuffled MONAI loaders whose datasets have random transforms (numpy generators in the transforms)."""
    from monai.data import DataLoader as MonaiDataLoader
    from monai.data import Dataset
    from monai.transforms import Compose, RandFlipd, RandGaussianNoised

    def dataset(n):
        items = [{"image": torch.full((1, 4, 4), float(i))} for i in range(n)]
        return Dataset(items, Compose([RandGaussianNoised("image", prob=0.5), RandFlipd("image", prob=0.5)]))

    return SemiSupervisedLoader(
        MonaiDataLoader(dataset(4), batch_size=2, shuffle=True, drop_last=True, num_workers=num_workers),
        MonaiDataLoader(dataset(6), batch_size=4, shuffle=True, drop_last=True, num_workers=num_workers),
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_state_resumes_the_same_batches(num_workers):
    """A loader rebuilt from scratch and given the state_dict continues with exactly the batches, shuffles and random
    transform draws of the uninterrupted one, across wraps, while the training draws from the global generators."""
    from scripts.utils.checkpoints import RandomGeneratorState

    def draw(stream, n):
        out = []
        for _ in range(n):
            batch = next(stream)
            out.append((batch["labeled"]["image"].clone(), batch["unlabeled"]["image"].clone()))
            torch.rand(3)  # the training's own draws between batches (dropout, ICT mixing)
        return out

    torch.manual_seed(0)
    loader = random_transform_loaders(num_workers)
    stream = iter(loader)
    first = draw(stream, 5)  # the labelled loader (2 batches a pass) wraps twice, the unlabelled (1 a pass) five times
    state, generators = loader.state_dict(), RandomGeneratorState().state_dict()
    assert state["labeled"]["passes"] == 2 and state["labeled"]["position"] == 1
    expected = draw(stream, 4)

    torch.manual_seed(123)  # the resumed process starts from elsewhere
    resumed = random_transform_loaders(num_workers)
    resumed.load_state_dict(state)
    RandomGeneratorState().load_state_dict(generators)
    again = draw(iter(resumed), 4)
    for (l0, u0), (l1, u1) in zip(expected, again):
        assert torch.equal(l0, l1) and torch.equal(u0, u1)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first[:4], expected))  # the batches do change


def test_random_generator_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    from scripts.utils.checkpoints import RandomGeneratorState

    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    torch.save({"rng": RandomGeneratorState().state_dict()}, tmp_path / "c.pt")
    expected = (torch.rand(2), np.random.rand(2), random.random(), np.random.randn())
    RandomGeneratorState().load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True)["rng"])
    got = (torch.rand(2), np.random.rand(2), random.random(), np.random.randn())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2:] == got[2:]


def test_same_batch_supervised_forward_sees_the_unlabelled_rows_but_scores_only_the_labelled():
    """forward_unlabeled: the UNeXt's forward (and its batch-norm statistics) take labelled + unlabelled rows; the
    loss is the supervised loss of the labelled rows alone."""
    from scripts.method.losses import SupervisedLoss
    from scripts.method.trainer import DualNetworkTrainer
    from scripts.networks import UNeXt

    torch.manual_seed(0)
    network = UNeXt(in_channels=1, out_channels=2)
    seen = []
    network.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    x_l, y = torch.rand(1, 1, 64, 64), (torch.rand(1, 1, 64, 64) > 0.5).float()
    x_u = torch.rand(4, 1, 64, 64)
    loader = [{"labeled": {"image": x_l, "label": y}, "unlabeled": {"image": x_u}}]
    trainer = DualNetworkTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=loader,
        epoch_length=1,
        network_a=network,
        optimizer_a=torch.optim.SGD(network.parameters(), lr=0.0),
        forward_unlabeled=True,
        **method(),
    )
    trainer.run()
    assert seen == [5]
    out = trainer.state.output
    expected = SupervisedLoss()(out["pred"], y)  # pred: the labelled rows' logits of that same forward
    assert float(out["loss"]) == pytest.approx(float(expected), rel=1e-6)
    assert not {"cps_a", "ict", "divergence"} & set(out)


@pytest.mark.parametrize("max_epochs", [3, 4])
def test_max_iterations_ends_the_run_in_a_short_last_epoch(max_epochs):
    """5 iterations in epochs of 2: the third epoch has one iteration and still ends in EPOCH_COMPLETED (validation,
    checkpoint), also when max_epochs would allow more; a run resumed after that has nothing left to do."""
    trainer, _, _ = make_trainer(iterations=2, max_epochs=max_epochs, max_iterations=5)
    ends = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: ends.append(e.state.iteration))
    trainer.run()
    assert trainer.state.iteration == 5 and ends == [2, 4, 5]
    assert trainer.iterations == 5

    resumed, a, _ = make_trainer(iterations=2, max_epochs=max_epochs, max_iterations=5)
    resumed.add_event_handler(Events.STARTED, lambda e: e.load_state_dict(trainer.state_dict()))
    resumed.run()
    assert resumed.state.iteration == 5 and a.calls == 0


def test_teacher_rows_are_read_by_name_with_ict_and_mean_teacher_together():
    """ICT and Mean Teacher on one teacher: one teacher call on x_u and x_u + noise; each term's target is the
    teacher's output on its own input, found here by comparing inputs, not by where the rows sit."""
    torch.manual_seed(0)
    trainer, a, _ = make_trainer(
        iterations=1,
        net_b=False,
        unlabeled=True,
        teacher_of="a",
        ict_weight=1.0,
        ict_warmup_iterations=0,
        mt_weight=1.0,
    )
    student, teacher = [], []
    capture_outputs(a, student)
    capture_outputs(trainer.teacher, teacher)
    trainer.run()
    out = loss_terms(trainer.state.output)
    ((x, logits_a),) = student
    ((x_t, logits_t),) = teacher  # one teacher call
    x_u = x[1:5]
    clean = [i for i in range(x_t.shape[0]) if torch.equal(x_t[i], x_u[i % 4])]
    noisy = [i for i in range(x_t.shape[0]) if i not in clean]
    assert len(clean) == len(noisy) == 4 and (x_t[noisy] - x_u).abs().max() <= 0.2 + 1e-6
    p_t = torch.softmax(logits_t, 1)
    p_s = torch.softmax(logits_a, 1)
    assert out["mt"] == pytest.approx(float(((p_s[1:5] - p_t[noisy]) ** 2).mean()), rel=1e-5)
    t_u = p_t[clean]
    lam = ((x[5:] - x_u[:2]) / (x_u[2:] - x_u[:2]))[:, :1, :1, :1]
    target = (1 - lam) * t_u[:2] + lam * t_u[2:]
    assert out["ict"] == pytest.approx(float(((p_s[5:] - target) ** 2).mean()), rel=1e-5)
    assert out["loss"] == pytest.approx(out["sup_a"] + out["w_ict"] * out["ict"] + out["w_mt"] * out["mt"], rel=1e-5)


def test_a_term_without_its_network_or_with_a_negative_weight_is_refused():
    with pytest.raises(ValueError, match="divergence_weight=1.0 needs a second network"):
        make_trainer(net_b=False, divergence_weight=1.0)
    with pytest.raises(ValueError, match="ict_weight must be >= 0"):
        InterpolationConsistencyTerm(weight=-1.0)


def test_log_line_names_the_iteration_the_ramp_reaches_full_weight():
    """Full weight from t = R (rampup_iterations, default the run), whether or not R is a multiple of L."""
    trainer, _, _ = make_trainer(iterations=10, max_epochs=30, ict_warmup_iterations=7)  # 300 iterations, L = 200
    assert trainer.ramp_iterations() == 300
    trainer.rampup_iterations = 150  # fewer iterations than steps: no longer stretched to L = 200 iterations
    line = trainer.describe_terms()
    assert "CPS (weight 1, ramped to full by iteration 150; 1.00 at the last iteration)" in line
    assert "ICT (weight 1, ramped to full by iteration 150, from iteration 7; " in line
    assert trainer.unsupervised_weights(149)["w_cps"] < 1.0 == trainer.unsupervised_weights(150)["w_cps"]
    trainer.rampup_iterations = 1000  # r = 5
    assert "CPS (weight 1, ramped to full by iteration 1000; 0.08 at the last iteration)" in trainer.describe_terms()
    assert trainer.unsupervised_weights(999)["w_ict"] < 1.0 == trainer.unsupervised_weights(1000)["w_ict"]
